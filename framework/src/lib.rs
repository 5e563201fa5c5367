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
//! ```
//! use std::time::Duration;
//! use rill::steps::{CommitOffsets, RunTask};
//! use rill::{InvalidMessage, Message, Partition, ProcessingStrategy, SubmitError, Topic};
//!
//! // parse → commit, built from the last step back.
//! let commit = CommitOffsets::new(Duration::ZERO);
//! let mut pipeline = RunTask::new(
//!     |m: Message<&str>| match m.payload().parse::<u64>() {
//!         Ok(n) => Ok(m.map(|_| n)),
//!         Err(e) => Err(SubmitError::InvalidMessage(
//!             InvalidMessage::of(&m, e.to_string()).expect("a broker message"),
//!         )),
//!     },
//!     commit,
//! );
//!
//! let partition = Partition::new(Topic::new("numbers"), 0);
//! pipeline.submit(Message::broker("41", partition.clone(), 0, None)).unwrap();
//! let invalid = pipeline.submit(Message::broker("x", partition.clone(), 1, None));
//!
//! assert!(matches!(invalid, Err(SubmitError::InvalidMessage(_))));
//! assert_eq!(pipeline.poll().unwrap().unwrap().offsets(&partition), vec![0..1]);
//! ```
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
mod ledger;
mod message;
pub mod metrics;
pub mod processor;
pub mod steps;
mod strategy;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

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
pub use strategy::{ProcessingStrategy, ProcessingStrategyFactory};
