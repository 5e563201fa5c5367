//! The Kafka backend: a consumer-group member and a producer on librdkafka (`rdkafka`).
//!
//! - [`KafkaConsumer`] implements [`Consumer`](crate::Consumer): rebalances become events
//!   handled by the stream processor's loop (eager and cooperative protocols), commits are
//!   manual and confirmed, revoked partitions are given up only after the processor committed
//!   for them.
//! - [`KafkaProducer`] implements [`Producer`](crate::Producer): a delivery future per message
//!   that resolves on the broker's delivery report; a full queue is backpressure.
//! - [`KafkaDlqProducer`] writes invalid messages to a dead-letter topic, unchanged, with their
//!   origin in headers.
//! - [`KafkaPayload`] is the message type both use: key, value and headers behind one `Arc`.

mod config;
mod consumer;
mod context;
mod dlq;
mod payload;
mod producer;

pub use crate::backends::{InitialOffset, RebalanceProtocol};
pub use config::{KafkaConfigError, KafkaConsumerConfig, KafkaProducerConfig};
pub use consumer::{KafkaConsumer, KafkaConsumerError};
pub use dlq::{
    INVALID_REASON_HEADER, KafkaDlqProducer, ORIGINAL_OFFSET_HEADER, ORIGINAL_PARTITION_HEADER,
    ORIGINAL_TOPIC_HEADER,
};
pub use payload::KafkaPayload;
pub use producer::{KafkaProducer, KafkaProducerError, TopicCheckError, is_message_too_large};
