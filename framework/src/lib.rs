//! Composable stream-processing steps with backpressure and safe offset commits.
//!
//! A pipeline is a chain of steps; each owns the next. The stream processor polls a consumer,
//! submits each message to the first step, and calls `poll` on it every iteration. A step
//! that is full hands the message back ([`SubmitError::MessageRejected`]); a message that can
//! never be processed is reported ([`SubmitError::InvalidMessage`]) and goes to the
//! dead-letter queue. Steps report the offsets whose work is done; an [`OffsetLedger`] turns
//! them into commits that never pass unfinished work and never move backwards.
//!
//! # Quick start
//!
//! A pipeline that parses numbers, skips bad input and commits, run by a stream processor on
//! the in-memory broker:
//!
//! ```
//! use std::time::Duration;
//! use rill::backends::local::LocalBroker;
//! use rill::processor::{ProcessorConfig, StreamProcessor};
//! use rill::steps::{CommitOffsets, RunTask};
//! use rill::{InvalidMessage, Message, Partition, SubmitError, Topic};
//!
//! fn parse(m: Message<&'static str>) -> Result<Message<u64>, SubmitError<&'static str>> {
//!     match m.payload().parse::<u64>() {
//!         Ok(n) => Ok(m.map(|_| n)),
//!         Err(e) => Err(InvalidMessage::of(&m, e.to_string()).into()),
//!     }
//! }
//!
//! let broker = LocalBroker::new();
//! let topic = Topic::new("numbers");
//! broker.create_topic(&topic, 1);
//! let partition = Partition::new(topic.clone(), 0);
//! for payload in ["1", "2", "not a number", "4"] {
//!     broker.produce_to(&partition, payload).unwrap();
//! }
//!
//! // parse → commit, built from the last step back, once per assignment.
//! let factory = |_: &[Partition]| RunTask::new(parse, CommitOffsets::new(Duration::ZERO));
//! let consumer = broker.subscribe("quick-start", &[topic]);
//! let mut processor = StreamProcessor::new(consumer, factory)
//!     .with_config(ProcessorConfig::default().with_poll_timeout(Duration::ZERO));
//!
//! while broker.committed("quick-start", &partition) != Some(4) {
//!     processor.run_once().unwrap();
//! }
//! processor.shutdown().unwrap();
//! assert_eq!(processor.stats().invalid_messages, 1); // logged and skipped: no DLQ here
//! ```
//!
//! # Where things are
//!
//! - [`Message`], [`Partition`], [`Topic`]: what flows; [`CommitRequest`] and [`OffsetLedger`]:
//!   which offsets are done and what may be committed.
//! - [`ProcessingStrategy`]: the step contract (backpressure, commits, join); [`CarriedOver`]:
//!   the helper every forwarding step uses.
//! - [`steps`]: `RunTask`, `RunTaskInThreads`, `Reduce`, `Filter`, `Unfold`, `Produce`,
//!   `CommitOffsets`, `Noop`, `HealthCheck`.
//! - [`processor`]: the [`StreamProcessor`](processor::StreamProcessor) loop;
//!   [`dlq`]: dead-letter policy; [`backends`]: the [`Consumer`] and [`Producer`] traits, the
//!   in-memory broker and the Kafka backend.
//! - [`json`]: decode and encode serde JSON payloads in one call.
//! - [`Clock`], [`ManualClock`]: injected time; [`metrics`]: metric names.
//! - `testing` (feature `test-utils`): `RecordingStep`, `RejectWhen`, message builders, and
//!   `testing::kafka`, librdkafka's mock cluster with clients to fill and read it.
#![warn(missing_docs)]
// Tests compare offset ranges as `[start..end]`, which is what they mean.
#![cfg_attr(test, allow(clippy::single_range_in_vec_init))]

pub mod backends;
mod carried_over;
mod clock;
mod commit;
pub mod dlq;
mod dropped;
mod error;
mod fast_hash;
pub mod json;
mod ledger;
mod message;
pub mod metrics;
pub mod processor;
pub mod steps;
mod strategy;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod wake;

pub use backends::{
    Consumer, ConsumerError, ConsumerEvent, Delivered, DeliveryError, DeliveryFuture, Destination,
    ProduceError, Producer,
};
pub use carried_over::CarriedOver;
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use commit::{CommitRequest, OffsetSet, merge};
pub use error::{BoxError, InvalidMessage, StrategyError, SubmitError};
pub use ledger::OffsetLedger;
pub use message::{Message, Partition, Topic};
pub use strategy::{
    BoxedPipeline, Fallible, ProcessingStrategy, ProcessingStrategyFactory, WrapPipelines,
    fallible, wrap_pipelines,
};
