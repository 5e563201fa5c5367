//! A last step that discards everything.

use std::time::Instant;

use crate::commit::CommitRequest;
use crate::error::{StrategyError, SubmitError};
use crate::message::Message;
use crate::strategy::ProcessingStrategy;

/// Accepts and drops every message, and never reports an offset as done.
///
/// Its offsets are never committed: use it for benchmarks and for pipelines whose last real
/// step commits elsewhere; end a real pipeline with [`CommitOffsets`](super::CommitOffsets).
///
/// # Examples
///
/// ```
/// use rill::steps::Noop;
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let mut step = Noop;
/// let partition = Partition::new(Topic::new("events"), 0);
/// step.submit(Message::broker("dropped", partition, 0, None)).unwrap();
/// assert_eq!(ProcessingStrategy::<&str>::poll(&mut step).unwrap(), None);
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct Noop;

impl<T> ProcessingStrategy<T> for Noop {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        Ok(None)
    }

    fn submit(&mut self, _message: Message<T>) -> Result<(), SubmitError<T>> {
        Ok(())
    }

    fn join(&mut self, _deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        Ok(None)
    }

    fn terminate(&mut self) {}

    fn is_idle(&self) -> bool {
        true
    }
}
