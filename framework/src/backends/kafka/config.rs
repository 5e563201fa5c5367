//! Typed settings for Kafka consumers and producers, checked before librdkafka sees them.
//!
//! The framework relies on a few client settings being a certain way (manual commits, offsets
//! resolved by the consumer itself), so the typed fields own those keys and free-form
//! overrides cannot change them; everything else passes through to librdkafka unchanged.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::backends::{InitialOffset, RebalanceProtocol};

/// Settings the typed fields own; overrides may not set them.
const OWNED_KEYS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "partition.assignment.strategy",
    "max.poll.interval.ms",
];

/// Errors in Kafka settings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaConfigError {
    /// A required setting is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// An override tried to set a key the typed settings own.
    #[error("override {0:?} is managed by the typed settings; set the field instead")]
    OwnedKey(String),
    /// A duration is outside what librdkafka accepts.
    #[error("{name} must be between {min:?} and {max:?}, got {value:?}")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: Duration,
        /// Smallest accepted value.
        min: Duration,
        /// Largest accepted value.
        max: Duration,
    },
}

/// Settings of a consumer-group member.
///
/// # Examples
///
/// ```
/// use rill::backends::kafka::{KafkaConsumerConfig, RebalanceProtocol};
///
/// let config = KafkaConsumerConfig::new("127.0.0.1:9092", "spans")
///     .with_rebalance_protocol(RebalanceProtocol::Cooperative)
///     .with_override("fetch.min.bytes", "1");
///
/// assert!(config.validate().is_ok());
/// assert!(config.with_override("enable.auto.commit", "true").validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConsumerConfig {
    bootstrap_servers: String,
    group_id: String,
    initial_offset: InitialOffset,
    rebalance_protocol: RebalanceProtocol,
    max_poll_interval: Duration,
    overrides: BTreeMap<String, String>,
}

impl KafkaConsumerConfig {
    /// Settings for `group_id` on the brokers in `bootstrap_servers` (`host:port,...`).
    pub fn new(bootstrap_servers: impl Into<String>, group_id: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: group_id.into(),
            initial_offset: InitialOffset::default(),
            rebalance_protocol: RebalanceProtocol::default(),
            max_poll_interval: Duration::from_secs(300),
            overrides: BTreeMap::new(),
        }
    }

    /// Where to start on partitions without a committed offset (default: earliest).
    #[must_use]
    pub const fn with_initial_offset(mut self, initial_offset: InitialOffset) -> Self {
        self.initial_offset = initial_offset;
        self
    }

    /// The rebalance protocol (default: cooperative).
    #[must_use]
    pub const fn with_rebalance_protocol(mut self, protocol: RebalanceProtocol) -> Self {
        self.rebalance_protocol = protocol;
        self
    }

    /// Longest time between two polls before the broker evicts the member (default 5 min).
    /// A revocation must be handled (pipeline joined, offsets committed) well within it.
    #[must_use]
    pub const fn with_max_poll_interval(mut self, interval: Duration) -> Self {
        self.max_poll_interval = interval;
        self
    }

    /// Passes any other librdkafka setting through (security, timeouts, fetch sizes).
    #[must_use]
    pub fn with_override(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.overrides.insert(key.into(), value.into());
        self
    }

    /// The group id.
    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// The initial offset policy.
    pub const fn initial_offset(&self) -> InitialOffset {
        self.initial_offset
    }

    /// The rebalance protocol.
    pub const fn rebalance_protocol(&self) -> RebalanceProtocol {
        self.rebalance_protocol
    }

    /// Checks the settings without connecting.
    ///
    /// # Errors
    ///
    /// The first problem found.
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(KafkaConfigError::Empty("bootstrap servers"));
        }
        if self.group_id.trim().is_empty() {
            return Err(KafkaConfigError::Empty("group id"));
        }
        check_range(
            "max poll interval",
            self.max_poll_interval,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        check_overrides(&self.overrides)
    }

    /// The librdkafka configuration these settings stand for.
    ///
    /// # Errors
    ///
    /// As [`validate`](Self::validate).
    pub fn client_config(&self) -> Result<ClientConfig, KafkaConfigError> {
        self.validate()?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", &self.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // The consumer resolves missing offsets itself (see `InitialOffset`); librdkafka
            // only falls back to this if a resolved offset is out of range.
            .set(
                "auto.offset.reset",
                match self.initial_offset {
                    InitialOffset::Latest => "latest",
                    InitialOffset::Earliest | InitialOffset::Error => "earliest",
                },
            )
            .set(
                "partition.assignment.strategy",
                match self.rebalance_protocol {
                    RebalanceProtocol::Eager => "range,roundrobin",
                    RebalanceProtocol::Cooperative => "cooperative-sticky",
                },
            )
            .set(
                "max.poll.interval.ms",
                self.max_poll_interval.as_millis().to_string(),
            );
        for (key, value) in &self.overrides {
            config.set(key, value);
        }
        Ok(config)
    }
}

/// Settings of a producer.
///
/// # Examples
///
/// ```
/// use rill::backends::kafka::KafkaProducerConfig;
///
/// let config = KafkaProducerConfig::new("127.0.0.1:9092").with_override("linger.ms", "5");
/// assert!(config.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaProducerConfig {
    bootstrap_servers: String,
    overrides: BTreeMap<String, String>,
}

impl KafkaProducerConfig {
    /// Settings for the brokers in `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            overrides: BTreeMap::new(),
        }
    }

    /// Passes any other librdkafka setting through (acks, compression, security).
    #[must_use]
    pub fn with_override(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.overrides.insert(key.into(), value.into());
        self
    }

    /// Checks the settings without connecting.
    ///
    /// # Errors
    ///
    /// The first problem found.
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        if self.bootstrap_servers.trim().is_empty() {
            return Err(KafkaConfigError::Empty("bootstrap servers"));
        }
        if self.overrides.contains_key("bootstrap.servers") {
            return Err(KafkaConfigError::OwnedKey("bootstrap.servers".to_owned()));
        }
        Ok(())
    }

    /// The librdkafka configuration these settings stand for.
    ///
    /// # Errors
    ///
    /// As [`validate`](Self::validate).
    pub fn client_config(&self) -> Result<ClientConfig, KafkaConfigError> {
        self.validate()?;
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        for (key, value) in &self.overrides {
            config.set(key, value);
        }
        Ok(config)
    }
}

fn check_overrides(overrides: &BTreeMap<String, String>) -> Result<(), KafkaConfigError> {
    match overrides
        .keys()
        .find(|key| OWNED_KEYS.contains(&key.as_str()))
    {
        Some(key) => Err(KafkaConfigError::OwnedKey(key.clone())),
        None => Ok(()),
    }
}

fn check_range(
    name: &'static str,
    value: Duration,
    min: Duration,
    max: Duration,
) -> Result<(), KafkaConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(KafkaConfigError::OutOfRange {
            name,
            value,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_commits_cannot_be_overridden() {
        let config =
            KafkaConsumerConfig::new("b:1", "g").with_override("enable.auto.commit", "true");

        assert_eq!(
            config.validate(),
            Err(KafkaConfigError::OwnedKey("enable.auto.commit".to_owned()))
        );
    }

    #[test]
    fn empty_group_is_refused() {
        let config = KafkaConsumerConfig::new("b:1", " ");

        assert_eq!(config.validate(), Err(KafkaConfigError::Empty("group id")));
    }

    #[test]
    fn max_poll_interval_is_checked() {
        let config =
            KafkaConsumerConfig::new("b:1", "g").with_max_poll_interval(Duration::from_millis(10));

        assert!(matches!(
            config.validate(),
            Err(KafkaConfigError::OutOfRange {
                name: "max poll interval",
                ..
            })
        ));
    }

    #[test]
    fn cooperative_protocol_selects_the_sticky_assignor() {
        let config = KafkaConsumerConfig::new("b:1", "g")
            .with_rebalance_protocol(RebalanceProtocol::Cooperative)
            .client_config()
            .unwrap();

        assert_eq!(
            config.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(config.get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn overrides_pass_through() {
        let config = KafkaProducerConfig::new("b:1")
            .with_override("compression.type", "lz4")
            .client_config()
            .unwrap();

        assert_eq!(config.get("compression.type"), Some("lz4"));
    }
}
