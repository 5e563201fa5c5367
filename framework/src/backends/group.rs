//! Consumer-group settings every backend understands: how partitions move between members,
//! and where a member starts reading a partition its group never committed.

/// How a group moves partitions between members on a rebalance; in configuration files
/// `eager` or `cooperative`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RebalanceProtocol {
    /// Every member gives up all its partitions, then receives its new share (Kafka's
    /// `range,roundrobin`).
    Eager,
    /// Members give up only the partitions that move; the others keep flowing (Kafka's
    /// `cooperative-sticky`).
    #[default]
    Cooperative,
}

/// Where a member starts reading a partition its group never committed; in configuration
/// files `earliest`, `latest` or `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialOffset {
    /// The oldest message still in the partition.
    #[default]
    Earliest,
    /// Only messages produced after the assignment.
    Latest,
    /// Refuse: the consumer reports an error naming the partition.
    Error,
}
