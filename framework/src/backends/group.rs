//! Consumer-group settings every backend understands: how partitions move between members,
//! and where a member starts reading a partition its group never committed.

/// How a group moves partitions between members on a rebalance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RebalanceProtocol {
    /// Every member gives up all its partitions, then receives its new share (Kafka's
    /// `range,roundrobin`).
    Eager,
    /// Members give up only the partitions that move; the others keep flowing (Kafka's
    /// `cooperative-sticky`).
    #[default]
    Cooperative,
}

/// Where a member starts reading a partition its group never committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitialOffset {
    /// The oldest message still in the partition.
    #[default]
    Earliest,
    /// Only messages produced after the assignment.
    Latest,
    /// Refuse: the consumer reports an error naming the partition.
    Error,
}
