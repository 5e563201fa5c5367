//! The one place that holds messages the next step rejected.
//!
//! Every step that forwards messages must: keep what the next step pushed back, retry it on
//! `poll` before taking new input, merge the next step's commit requests into its own without
//! ever dropping one, and pass its join deadline on. rust-arroyo copies that logic into every
//! step and got it wrong several times (a lost message, a reordered one, a consumer stuck in
//! backpressure forever). Here it is written and tested once.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::clock::{Clock, expired};
use crate::commit::{self, CommitRequest};
use crate::error::{InvalidMessage, StrategyError, SubmitError};
use crate::message::Message;
use crate::strategy::ProcessingStrategy;

/// How long join loops wait between two attempts, so they never spin (at most 1000 per second).
pub(crate) const RETRY_INTERVAL: Duration = Duration::from_millis(1);

/// Messages the next step rejected, kept in order until it accepts them, plus the commit
/// requests collected from the next step and not yet returned.
///
/// # Examples
///
/// A pass-through step written with the helper:
///
/// ```
/// use std::time::Instant;
/// use rill::{CarriedOver, CommitRequest, Message, ProcessingStrategy, StrategyError,
///            SubmitError, SystemClock};
///
/// struct PassThrough<N> {
///     next_step: N,
///     carried_over: CarriedOver<u32>,
/// }
///
/// impl<N: ProcessingStrategy<u32>> ProcessingStrategy<u32> for PassThrough<N> {
///     fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
///         self.carried_over.poll_next(&mut self.next_step)?;
///         Ok(self.carried_over.take_commit())
///     }
///
///     fn submit(&mut self, message: Message<u32>) -> Result<(), SubmitError<u32>> {
///         if self.carried_over.is_holding() {
///             return Err(SubmitError::MessageRejected(message));
///         }
///         self.carried_over.forward(&mut self.next_step, message)?;
///         Ok(())
///     }
///
///     fn join(&mut self, deadline: Option<Instant>)
///         -> Result<Option<CommitRequest>, StrategyError> {
///         self.carried_over.join_next(&mut self.next_step, deadline, &SystemClock)
///     }
///
///     fn terminate(&mut self) {
///         self.carried_over.clear();
///         self.next_step.terminate();
///     }
/// }
/// # let _ = PassThrough { next_step: rill::steps::Noop, carried_over: CarriedOver::new() };
/// ```
#[derive(Debug)]
pub struct CarriedOver<T> {
    // Almost always zero or one message; a queue so that a caller that forwards while already
    // holding keeps order instead of losing a message.
    messages: VecDeque<Message<T>>,
    pending_commit: Option<CommitRequest>,
}

impl<T> CarriedOver<T> {
    /// Holds nothing.
    pub const fn new() -> Self {
        Self {
            messages: VecDeque::new(),
            pending_commit: None,
        }
    }

    /// Whether a rejected message waits to be resubmitted. A step should reject new input
    /// while this is true.
    #[inline]
    pub fn is_holding(&self) -> bool {
        !self.messages.is_empty()
    }

    /// Offers `message` to `next`, keeping it if `next` pushes back.
    ///
    /// If messages are already held, `message` is queued behind them (order is kept); steps
    /// normally check [`is_holding`](Self::is_holding) first.
    ///
    /// # Errors
    ///
    /// The next step's [`InvalidMessage`].
    #[inline]
    pub fn forward<N>(&mut self, next: &mut N, message: Message<T>) -> Result<(), InvalidMessage>
    where
        N: ProcessingStrategy<T> + ?Sized,
    {
        if self.is_holding() {
            self.messages.push_back(message);
            return self.retry(next);
        }
        match next.submit(message) {
            Ok(()) => Ok(()),
            Err(SubmitError::MessageRejected(message)) => {
                self.messages.push_back(message);
                Ok(())
            }
            Err(SubmitError::InvalidMessage(invalid)) => Err(invalid),
        }
    }

    /// Keeps `message` behind those already held without offering it, to be resubmitted on
    /// the next [`poll_next`](Self::poll_next): for a step that stops forwarding at an error
    /// and must not lose what comes after it.
    pub fn hold(&mut self, message: Message<T>) {
        self.messages.push_back(message);
    }

    /// Resubmits held messages, in order, until the next step rejects one.
    ///
    /// # Errors
    ///
    /// The next step's [`InvalidMessage`]; the messages behind it stay held.
    pub fn retry<N>(&mut self, next: &mut N) -> Result<(), InvalidMessage>
    where
        N: ProcessingStrategy<T> + ?Sized,
    {
        if self.messages.is_empty() {
            return Ok(());
        }
        while let Some(message) = self.messages.pop_front() {
            match next.submit(message) {
                Ok(()) => {}
                Err(SubmitError::MessageRejected(message)) => {
                    self.messages.push_front(message);
                    return Ok(());
                }
                Err(SubmitError::InvalidMessage(invalid)) => return Err(invalid),
            }
        }
        Ok(())
    }

    /// Polls `next`, keeps its commit request, then resubmits held messages.
    ///
    /// # Errors
    ///
    /// The next step's poll error, or an invalid held message. Commit requests already
    /// collected stay here for [`take_commit`](Self::take_commit).
    #[inline]
    pub fn poll_next<N>(&mut self, next: &mut N) -> Result<(), StrategyError>
    where
        N: ProcessingStrategy<T> + ?Sized,
    {
        let committed = next.poll()?;
        self.add_commit(committed);
        self.retry(next)?;
        Ok(())
    }

    /// Adds done offsets to return with the next [`take_commit`](Self::take_commit) (a step's
    /// own, such as those of messages it filtered out).
    #[inline]
    pub fn add_commit(&mut self, request: Option<CommitRequest>) {
        if request.is_some() {
            self.pending_commit = commit::merge(self.pending_commit.take(), request);
        }
    }

    /// The done offsets collected so far, leaving none.
    #[inline]
    pub fn take_commit(&mut self) -> Option<CommitRequest> {
        self.pending_commit.take()
    }

    /// Joins `next`: [hands over](Self::hand_over) held messages, then joins `next` with the
    /// same deadline and returns every done offset collected.
    ///
    /// Messages still held at the deadline are dropped: their offsets were never reported, so
    /// they are redelivered.
    ///
    /// # Errors
    ///
    /// As [`poll_next`](Self::poll_next), and the next step's join error.
    pub fn join_next<N>(
        &mut self,
        next: &mut N,
        deadline: Option<Instant>,
        clock: &dyn Clock,
    ) -> Result<Option<CommitRequest>, StrategyError>
    where
        N: ProcessingStrategy<T> + ?Sized,
    {
        self.hand_over(next, deadline, clock)?;
        let committed = next.join(deadline)?;
        self.add_commit(committed);
        Ok(self.take_commit())
    }

    /// Retries held messages until `next` accepts them all or `deadline` passes; what is still
    /// held then is dropped (its offsets were never reported, so it is redelivered).
    ///
    /// # Errors
    ///
    /// As [`poll_next`](Self::poll_next).
    pub fn hand_over<N>(
        &mut self,
        next: &mut N,
        deadline: Option<Instant>,
        clock: &dyn Clock,
    ) -> Result<(), StrategyError>
    where
        N: ProcessingStrategy<T> + ?Sized,
    {
        let handed_over = retry_until(clock, deadline, || {
            if self.is_holding() {
                self.poll_next(next)?;
            }
            Ok::<_, StrategyError>(!self.is_holding())
        })?;
        if !handed_over {
            tracing::warn!(
                held = self.messages.len(),
                "Join deadline passed with rejected messages held; they will be redelivered."
            );
            self.messages.clear();
        }
        Ok(())
    }

    /// Drops held messages (on terminate); their offsets are never reported.
    pub fn clear(&mut self) {
        self.messages.clear();
    }
}

/// Calls `attempt` until it reports being done or `deadline` passes on `clock`, waiting
/// [`RETRY_INTERVAL`] between attempts (never spinning); returns whether it got done.
pub(crate) fn retry_until<E>(
    clock: &dyn Clock,
    deadline: Option<Instant>,
    mut attempt: impl FnMut() -> Result<bool, E>,
) -> Result<bool, E> {
    loop {
        if attempt()? {
            return Ok(true);
        }
        if expired(clock, deadline) {
            return Ok(false);
        }
        clock.sleep(RETRY_INTERVAL);
    }
}

impl<T> Default for CarriedOver<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::testing::{RecordingStep, message};

    #[test]
    fn forward_holds_a_rejected_message() {
        let mut next = RecordingStep::new().reject_next(1);
        let mut carried = CarriedOver::new();

        carried.forward(&mut next, message(0, 1_u32)).unwrap();

        assert!(carried.is_holding());
        assert!(next.payloads().is_empty());
    }

    #[test]
    fn poll_resubmits_held_messages_in_order() {
        let mut next = RecordingStep::new().reject_next(2);
        let mut carried = CarriedOver::new();
        carried.forward(&mut next, message(0, 1_u32)).unwrap();
        carried.forward(&mut next, message(1, 2_u32)).unwrap();

        carried.poll_next(&mut next).unwrap();

        assert_eq!(next.payloads(), [1, 2]);
        assert!(!carried.is_holding());
    }

    #[test]
    fn poll_keeps_the_next_steps_commit_requests() {
        let mut next = RecordingStep::new().commit_on_poll();
        let mut carried = CarriedOver::new();
        carried.forward(&mut next, message(4, 1_u32)).unwrap();

        carried.poll_next(&mut next).unwrap();
        carried.poll_next(&mut next).unwrap();

        let done = carried.take_commit().unwrap();
        assert_eq!(done.offsets(&crate::testing::partition(0)), vec![4..5]);
        assert_eq!(carried.take_commit(), None);
    }

    #[test]
    fn join_gives_up_on_held_messages_at_the_deadline() {
        let mut next = RecordingStep::new().reject_next(usize::MAX);
        let clock = ManualClock::new();
        let mut carried = CarriedOver::new();
        carried.forward(&mut next, message(0, 1_u32)).unwrap();
        let deadline = clock.now() + Duration::from_millis(50);

        carried
            .join_next(&mut next, Some(deadline), &clock)
            .unwrap();

        assert!(!carried.is_holding());
        assert!(next.payloads().is_empty());
        assert!(next.joined());
        assert!(clock.now() >= deadline);
    }

    #[test]
    fn join_hands_over_held_messages_before_joining_next() {
        let mut next = RecordingStep::new().reject_next(3);
        let clock = ManualClock::new();
        let mut carried = CarriedOver::new();
        carried.forward(&mut next, message(0, 7_u32)).unwrap();

        carried.join_next(&mut next, None, &clock).unwrap();

        assert_eq!(next.payloads(), [7]);
    }
}
