//! `[kafka]`: brokers, group, topics and the librdkafka settings passed through, with the
//! values of secret settings kept out of every log line and error.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rill::backends::kafka::{
    InitialOffset, KafkaConsumerConfig, KafkaProducerConfig, RebalanceProtocol,
};
use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};
use crate::buffer::output;

/// librdkafka's setting of the largest message a producer accepts.
const MESSAGE_MAX_BYTES: &str = "message.max.bytes";
/// Its default here: Sentry's producers' 50,000,000 bytes (librdkafka's own is 1,000,000,
/// smaller than one default segment of 10 MiB).
const DEFAULT_MESSAGE_MAX_BYTES: &str = "50000000";

/// Producer settings applied before `producer_overrides` (which win): Sentry's producers'
/// message size limit, and lz4 compression, which shrinks JSON spans several times on the wire
/// and so keeps big segments under the broker's own limit.
pub const PRODUCER_DEFAULTS: [(&str, &str); 2] = [
    (MESSAGE_MAX_BYTES, DEFAULT_MESSAGE_MAX_BYTES),
    ("compression.type", "lz4"),
];

/// `[kafka]`. Security settings (`security.protocol`, `sasl.*`, `ssl.*`) go in the overrides,
/// which are passed to librdkafka as they are; secret values among them are never printed.
#[derive(Clone, Deserialize, PartialEq, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSection {
    /// `host:port,...` of the brokers.
    pub bootstrap_servers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topics with incoming spans.
    pub input_topics: Vec<String>,
    /// Topic flushed segments go to.
    pub output_topic: String,
    /// Topic for invalid messages; empty to log and skip them instead.
    pub dlq_topic: String,
    /// Refuse to start unless the brokers know `dlq_topic`, and stop (rather than commit
    /// past) when a dead letter cannot be delivered. Off: a missing topic is a warning at
    /// start, and an undeliverable dead letter is logged, counted and committed past.
    pub dlq_required: bool,
    /// Topic for outcome records of spans given up or lost at flush (Sentry's `outcomes`);
    /// empty: off, the losses are only logged and counted.
    pub outcomes_topic: String,
    /// Kafka slice id (part of the queue keys), when running sliced.
    pub slice_id: Option<u32>,
    /// `eager` or `cooperative`.
    pub rebalance_protocol: RebalanceProtocol,
    /// Where to start without a committed offset: `earliest`, `latest` or `error`.
    pub initial_offset: InitialOffset,
    /// Longest time between two polls before the broker evicts the member.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Extra librdkafka settings of the consumer (security, fetch sizes).
    pub consumer_overrides: BTreeMap<String, String>,
    /// Extra librdkafka settings of the producers (acks, compression, security).
    pub producer_overrides: BTreeMap<String, String>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".to_owned(),
            group_id: "process-spans".to_owned(),
            input_topics: vec!["ingest-spans".to_owned()],
            output_topic: "buffered-segments".to_owned(),
            dlq_topic: "ingest-spans-dlq".to_owned(),
            dlq_required: false,
            outcomes_topic: "outcomes".to_owned(),
            slice_id: None,
            rebalance_protocol: RebalanceProtocol::Cooperative,
            initial_offset: InitialOffset::Earliest,
            max_poll_interval: Duration::from_secs(300),
            consumer_overrides: BTreeMap::new(),
            producer_overrides: BTreeMap::new(),
        }
    }
}

// Written by hand so passwords and keys among the librdkafka overrides never reach logs.
impl fmt::Debug for KafkaSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaSection")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("input_topics", &self.input_topics)
            .field("output_topic", &self.output_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("dlq_required", &self.dlq_required)
            .field("outcomes_topic", &self.outcomes_topic)
            .field("slice_id", &self.slice_id)
            .field("rebalance_protocol", &self.rebalance_protocol)
            .field("initial_offset", &self.initial_offset)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("consumer_overrides", &Redacted(&self.consumer_overrides))
            .field("producer_overrides", &Redacted(&self.producer_overrides))
            .finish()
    }
}

/// librdkafka settings, printed with the values of secret ones hidden.
struct Redacted<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(key, value)| {
                let shown = if is_secret_setting(key) {
                    "<set>"
                } else {
                    value.as_str()
                };
                (key, shown)
            }))
            .finish()
    }
}

/// Whether the librdkafka setting `key` holds a secret: a password, a private key, a client
/// secret or a login configuration that may embed one.
pub fn is_secret_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|marker| key.contains(marker))
}

/// Parts of a setting's name that mark its value as a secret.
const SECRET_MARKERS: [&str; 5] = [
    "password",
    "secret",
    "key.pem",
    "jaas.config",
    "oauthbearer.config",
];

impl Config {
    /// The settings of the input consumer: typed ones from `[kafka]`, then every
    /// `consumer_overrides` entry passed through to librdkafka (security settings included).
    pub fn kafka_consumer_config(&self) -> KafkaConsumerConfig {
        let kafka = &self.kafka;
        let mut consumer = KafkaConsumerConfig::new(&kafka.bootstrap_servers, &kafka.group_id)
            .with_rebalance_protocol(kafka.rebalance_protocol)
            .with_initial_offset(kafka.initial_offset)
            .with_max_poll_interval(kafka.max_poll_interval);
        for (key, value) in &kafka.consumer_overrides {
            consumer = consumer.with_override(key, value);
        }
        consumer
    }

    /// The settings of the producer (output, dead letters, outcomes): [`PRODUCER_DEFAULTS`],
    /// then every `producer_overrides` entry passed through to librdkafka.
    pub fn kafka_producer_config(&self) -> KafkaProducerConfig {
        let mut producer = KafkaProducerConfig::new(&self.kafka.bootstrap_servers)
            .with_override("client.id", "spans-pipeline.flusher");
        for (key, value) in PRODUCER_DEFAULTS {
            producer = producer.with_override(key, value);
        }
        for (key, value) in &self.kafka.producer_overrides {
            producer = producer.with_override(key, value);
        }
        producer
    }

    /// Checks that the producer takes the largest message a flush builds: a chunk of up to
    /// `buffer.max_segment_bytes` of spans plus its envelope. A smaller `message.max.bytes`
    /// would have librdkafka refuse every big segment, which would then be lost.
    pub(super) fn validate_message_size(&self) -> Result<(), ConfigError> {
        let key = "kafka.producer_overrides.\"message.max.bytes\"";
        let configured = self
            .kafka
            .producer_overrides
            .get(MESSAGE_MAX_BYTES)
            .map_or(DEFAULT_MESSAGE_MAX_BYTES, String::as_str);
        let limit: u64 = configured.trim().parse().map_err(|_| ConfigError::Value {
            key,
            reason: format!("{configured:?} is not a number of bytes"),
        })?;
        let segment = self.buffer.max_segment_bytes;
        let largest = segment.saturating_add(output::message_overhead(segment));
        if segment > 0 && largest > limit {
            return Err(ConfigError::Value {
                key,
                reason: format!(
                    "{limit} bytes cannot carry a segment of buffer.max_segment_bytes = {segment} \
                     (up to {largest} bytes as a message); raise message.max.bytes or lower \
                     buffer.max_segment_bytes"
                ),
            });
        }
        Ok(())
    }
}
