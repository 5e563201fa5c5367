//! Apply a function to every message.

use std::fmt;
use std::marker::PhantomData;
use std::time::Instant;

use crate::carried_over::CarriedOver;
use crate::clock::{SharedClock, SystemClock};
use crate::commit::CommitRequest;
use crate::error::{StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::strategy::ProcessingStrategy;

/// Applies `function` to each message and submits the result to the next step.
///
/// `function` runs on the consumer thread, exactly once per message, so it should be cheap
/// (parsing, validation). It may return [`SubmitError::InvalidMessage`] to route the message to
/// the dead-letter queue, or [`SubmitError::MessageRejected`] (handing its input back) to push
/// back itself.
///
/// # Backpressure
///
/// When the next step rejects a transformed message, it is held and this step rejects new
/// input until `poll` hands it over; the function is not run again.
///
/// # Examples
///
/// ```
/// use rill::steps::{Noop, RunTask};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let mut step = RunTask::new(|m: Message<&str>| Ok(m.map(str::len)), Noop);
/// let partition = Partition::new(Topic::new("words"), 0);
/// step.submit(Message::broker("hello", partition, 0, None)).unwrap();
/// ```
pub struct RunTask<F, N, U> {
    function: F,
    next_step: N,
    carried_over: CarriedOver<U>,
    clock: SharedClock,
    output: PhantomData<fn() -> U>,
}

impl<F, N, U> RunTask<F, N, U> {
    /// Creates a step that maps messages with `function` before `next_step`.
    pub fn new(function: F, next_step: N) -> Self {
        Self {
            function,
            next_step,
            carried_over: CarriedOver::new(),
            clock: SystemClock::shared(),
            output: PhantomData,
        }
    }

    /// Uses `clock` to wait between retries in `join`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
}

impl<T, U, F, N> ProcessingStrategy<T> for RunTask<F, N, U>
where
    F: FnMut(Message<T>) -> Result<Message<U>, SubmitError<T>>,
    N: ProcessingStrategy<U>,
{
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        self.carried_over.poll_next(&mut self.next_step)?;
        Ok(self.carried_over.take_commit())
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        // Keep at most one transformed message in hand: reject until it drains.
        if self.carried_over.is_holding() {
            return Err(SubmitError::MessageRejected(message));
        }
        let transformed = (self.function)(message)?;
        self.carried_over
            .forward(&mut self.next_step, transformed)?;
        Ok(())
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        self.carried_over
            .join_next(&mut self.next_step, deadline, &*self.clock)
    }

    fn close(&mut self) {
        self.next_step.close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        self.next_step.partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        self.carried_over.clear();
        self.next_step.terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.next_step.next_deadline()
    }

    fn is_idle(&self) -> bool {
        !self.carried_over.is_holding() && self.next_step.is_idle()
    }
}

impl<F, N: fmt::Debug, U> fmt::Debug for RunTask<F, N, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunTask")
            .field("next_step", &self.next_step)
            .field("holding", &self.carried_over.is_holding())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::error::InvalidMessage;
    use crate::testing::{RecordingStep, message, partition};

    fn double(m: Message<u32>) -> Result<Message<u32>, SubmitError<u32>> {
        Ok(m.map(|n| n * 2))
    }

    #[test]
    fn forwards_transformed_payload() {
        let next = RecordingStep::new();
        let mut step = RunTask::new(double, next.clone());

        step.submit(message(0, 21)).unwrap();

        assert_eq!(next.payloads(), [42]);
    }

    #[test]
    fn rejects_new_input_while_holding_a_rejected_message() {
        let next = RecordingStep::new().reject_next(1);
        let mut step = RunTask::new(double, next.clone());

        step.submit(message(0, 1)).unwrap(); // next step is full: held, not lost
        let second = step.submit(message(1, 2));

        assert!(matches!(second, Err(SubmitError::MessageRejected(_))));
        assert!(next.payloads().is_empty());
    }

    #[test]
    fn poll_resubmits_the_held_message() {
        let next = RecordingStep::new().reject_next(1);
        let mut step = RunTask::new(double, next.clone());
        step.submit(message(0, 1)).unwrap();

        step.poll().unwrap();

        assert_eq!(next.payloads(), [2]);
    }

    #[test]
    fn the_function_runs_exactly_once_per_message_under_backpressure() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&calls);
        let next = RecordingStep::new().reject_next(5);
        let mut step = RunTask::new(
            move |m: Message<u32>| {
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(m)
            },
            next.clone(),
        );

        step.submit(message(0, 1)).unwrap();
        for _ in 0..10 {
            step.poll().unwrap();
        }

        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(next.payloads(), [1]);
    }

    #[test]
    fn the_function_can_push_back_itself() {
        let mut step = RunTask::new(
            |m: Message<u32>| Err(SubmitError::MessageRejected(m)),
            RecordingStep::<u32>::new(),
        );

        let result = step.submit(message(3, 1));

        let Err(SubmitError::MessageRejected(back)) = result else {
            panic!("expected the input back");
        };
        assert_eq!(back.offset(), Some(3));
    }

    #[test]
    fn invalid_input_is_reported_with_its_origin() {
        let mut step = RunTask::new(
            |m: Message<u32>| Err(InvalidMessage::of(&m, "odd").into()),
            RecordingStep::<u32>::new(),
        );

        let result = step.submit(message(5, 1));

        let Err(SubmitError::InvalidMessage(invalid)) = result else {
            panic!("expected an invalid message");
        };
        assert_eq!(invalid.origins(), [(partition(0), 5)]);
    }

    #[test]
    fn poll_returns_the_next_steps_done_offsets() {
        let next = RecordingStep::new().commit_on_poll();
        let mut step = RunTask::new(double, next);
        step.submit(message(0, 1)).unwrap();
        step.submit(message(1, 1)).unwrap();

        let done = step.poll().unwrap().unwrap();

        assert_eq!(done.offsets(&partition(0)), vec![0..2]);
    }

    #[test]
    fn join_hands_over_the_held_message() {
        let next = RecordingStep::new().reject_next(3);
        let clock = ManualClock::new();
        let mut step = RunTask::new(double, next.clone()).with_clock(clock.shared());
        step.submit(message(0, 5)).unwrap();

        step.join(Some(clock.now() + Duration::from_secs(1)))
            .unwrap();

        assert_eq!(next.payloads(), [10]);
        assert!(next.joined());
    }

    #[test]
    fn terminate_reaches_the_next_step() {
        let next = RecordingStep::<u32>::new();
        let mut step = RunTask::new(double, next.clone());

        step.terminate();

        assert!(next.terminated());
    }
}
