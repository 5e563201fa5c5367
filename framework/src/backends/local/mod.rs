//! An in-memory broker: topics, partitions, consumer groups with rebalancing, a producer, a
//! dead-letter queue.
//!
//! It makes every step and the stream processor testable without Kafka, deterministically:
//! consumers serve their partitions round robin in sorted order, group rebalances are computed
//! the same way every time, and commits and deliveries can be observed and faults injected.

mod broker;
mod consumer;
mod dlq;
mod producer;

pub use broker::LocalBroker;
pub use consumer::LocalConsumer;
pub use dlq::LocalDlq;
pub use producer::LocalProducer;
