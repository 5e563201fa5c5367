//! Drop messages that fail a predicate; their offsets still become committable.

use std::fmt;
use std::time::Instant;

use super::CommitPolicy;
use crate::clock::SharedClock;
use crate::commit::CommitRequest;
use crate::dropped::DroppingForwarder;
use crate::error::{StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::strategy::ProcessingStrategy;

/// Forwards messages for which `predicate` returns true and drops the others.
///
/// A dropped message is done: its offset is reported with the next step's next commit
/// request, or after one second when the next step reports nothing (so a stream that is
/// mostly filtered out still commits, without committing on every message).
///
/// # Examples
///
/// ```
/// use rill::steps::{CommitOffsets, Filter};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let mut step = Filter::new(
///     |m: &Message<u32>| m.payload().is_multiple_of(2),
///     CommitOffsets::new(std::time::Duration::ZERO),
/// );
/// let partition = Partition::new(Topic::new("numbers"), 0);
/// step.submit(Message::broker(1, partition.clone(), 0, None)).unwrap(); // dropped
/// step.submit(Message::broker(2, partition.clone(), 1, None)).unwrap(); // kept
///
/// // Both offsets are done.
/// assert_eq!(step.poll().unwrap().unwrap().offsets(&partition), vec![0..2]);
/// ```
pub struct Filter<F, N, T> {
    predicate: F,
    next_step: N,
    forwarder: DroppingForwarder<T>,
}

impl<F, N, T> Filter<F, N, T> {
    /// Keeps the messages for which `predicate` is true, in front of `next_step`.
    pub fn new(predicate: F, next_step: N) -> Self {
        Self {
            predicate,
            next_step,
            forwarder: DroppingForwarder::new().counting_as_filtered("filter"),
        }
    }

    crate::dropped::dropping_builders!();
}

impl<T, F, N> ProcessingStrategy<T> for Filter<F, N, T>
where
    F: FnMut(&Message<T>) -> bool,
    N: ProcessingStrategy<T>,
{
    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        if self.forwarder.carried_over.is_holding() {
            return Err(SubmitError::MessageRejected(message));
        }
        if (self.predicate)(&message) {
            self.forwarder.forward(&mut self.next_step, message)?;
        } else {
            self.forwarder.drop_message(&message);
        }
        Ok(())
    }

    crate::dropped::delegate_to_forwarder!(T);
}

crate::dropped::debug_dropping_step!(Filter<F, N, T>);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::testing::{RecordingStep, message, partition};

    fn even(m: &Message<u32>) -> bool {
        m.payload().is_multiple_of(2)
    }

    #[test]
    fn forwards_only_matching_messages() {
        let next = RecordingStep::new();
        let mut step = Filter::new(even, next.clone());

        for (offset, n) in [1, 2, 3, 4].into_iter().enumerate() {
            step.submit(message(offset as u64, n)).unwrap();
        }

        assert_eq!(next.payloads(), [2, 4]);
    }

    #[test]
    fn dropped_offsets_ride_along_with_the_next_steps_commit() {
        let next = RecordingStep::new().commit_on_poll();
        let mut step = Filter::new(even, next);
        step.submit(message(0, 1)).unwrap();
        step.submit(message(1, 2)).unwrap();

        let done = step.poll().unwrap().unwrap();

        assert_eq!(done.offsets(&partition(0)), vec![0..2]);
    }

    #[test]
    fn dropped_offsets_are_released_by_time_when_nothing_else_is() {
        let clock = ManualClock::new();
        let mut step = Filter::new(even, RecordingStep::new())
            .with_clock(clock.shared())
            .with_commit_policy(CommitPolicy::every(Duration::from_secs(1)));
        step.submit(message(0, 1)).unwrap();
        assert_eq!(step.poll().unwrap(), None);
        assert_eq!(
            step.next_deadline(),
            Some(clock.now() + Duration::from_secs(1))
        );

        clock.advance(Duration::from_secs(1));

        assert_eq!(
            step.poll().unwrap().unwrap().offsets(&partition(0)),
            vec![0..1]
        );
    }

    #[test]
    fn a_revocation_releases_dropped_offsets_at_the_next_poll_and_is_passed_on() {
        let clock = ManualClock::new();
        let next = RecordingStep::new();
        let mut step = Filter::new(even, next.clone())
            .with_clock(clock.shared())
            .with_commit_policy(CommitPolicy::every(Duration::from_secs(1)));
        step.submit(message(0, 1)).unwrap();
        assert_eq!(step.poll().unwrap(), None);

        step.partitions_changed(&[], &[partition(0)]);

        assert_eq!(
            step.poll().unwrap().unwrap().offsets(&partition(0)),
            vec![0..1]
        );
        assert_eq!(next.changes(), [(vec![], vec![partition(0)])]);
    }

    #[test]
    fn join_reports_every_dropped_offset() {
        let mut step = Filter::new(even, RecordingStep::new());
        step.submit(message(5, 1)).unwrap();

        let done = step.join(None).unwrap().unwrap();

        assert_eq!(done.offsets(&partition(0)), vec![5..6]);
    }

    #[test]
    fn rejects_while_holding_a_kept_message() {
        let next = RecordingStep::new().reject_next(1);
        let mut step = Filter::new(even, next.clone());
        step.submit(message(0, 2)).unwrap();

        let result = step.submit(message(1, 1));

        assert!(matches!(result, Err(SubmitError::MessageRejected(_))));
        step.poll().unwrap();
        assert_eq!(next.payloads(), [2]);
    }
}
