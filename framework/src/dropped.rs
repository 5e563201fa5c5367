//! Steps that drop some messages on purpose: their offsets still become committable.
//!
//! A dropped message (filtered out, unfolded into nothing) is done the moment it is dropped.
//! Reporting each one at once would make the processor commit on every iteration of a stream
//! that is mostly dropped, so they are released with whatever the next step releases, or by a
//! [`CommitPolicy`] of their own when the next step has nothing to say.
//!
//! A message dropped right after parts that carry no offsets is different: it may be the last
//! part of a split message, whose offsets stand for those earlier parts, still being worked on
//! further down (in a batch, a task). Released at once, they would let the processor commit
//! past unfinished work. They are *deferred* instead, and released by whichever comes first:
//! the next message forwarded carries them (it finishes after those parts, every built-in step
//! keeping order); `poll` releases them once the next step is
//! [idle](crate::ProcessingStrategy::is_idle); `join` releases them only if the next step's
//! join finished before its deadline, since a join cut short abandoned the earlier parts (the
//! offsets are then dropped and the messages redelivered).
//!
//! [`DroppingForwarder`] is the part `Filter` and `Unfold` share: held messages, dropped
//! offsets and the clock.

use std::time::{Duration, Instant};

use crate::carried_over::CarriedOver;
use crate::clock::{ClockSampler, SharedClock, SystemClock, earliest};
use crate::commit::{self, CommitRequest};
use crate::error::{InvalidMessage, StrategyError};
use crate::message::Message;
use crate::metrics;
use crate::steps::CommitPolicy;
use crate::strategy::ProcessingStrategy;

#[derive(Debug)]
pub(crate) struct DroppingForwarder<U> {
    pub(crate) carried_over: CarriedOver<U>,
    offsets: CommitRequest,
    /// Offsets of messages dropped behind parts that carry none, waiting until those are done.
    deferred: CommitRequest,
    /// The last message forwarded carried no offsets and may not be done: a message dropped
    /// now may stand for it.
    blind: bool,
    /// The `step` label of the `MESSAGES_FILTERED` metric, if dropping counts as filtering.
    counts_as_filtered: Option<&'static str>,
    /// Dropped since the metric was last updated (once per poll, not per message).
    filtered_unrecorded: u64,
    count: u64,
    /// `count` at the previous poll: whether messages were dropped since.
    count_at_poll: u64,
    policy: CommitPolicy,
    /// A partition was revoked: release the dropped offsets at the next poll, whatever the
    /// policy, so its hand-over does not wait for them.
    release_soon: bool,
    last_release: Instant,
    clock: SharedClock,
    sampler: ClockSampler,
}

impl<U> DroppingForwarder<U> {
    /// Releases dropped offsets at least every second, on the system clock.
    pub(crate) fn new() -> Self {
        let clock = SystemClock::shared();
        Self {
            carried_over: CarriedOver::new(),
            offsets: CommitRequest::new(),
            deferred: CommitRequest::new(),
            blind: false,
            counts_as_filtered: None,
            filtered_unrecorded: 0,
            count: 0,
            count_at_poll: 0,
            policy: CommitPolicy::every(Duration::from_secs(1)),
            release_soon: false,
            last_release: clock.now(),
            clock,
            sampler: ClockSampler::new(),
        }
    }

    pub(crate) fn set_clock(&mut self, clock: SharedClock) {
        self.last_release = clock.now();
        self.sampler.reset();
        self.clock = clock;
    }

    pub(crate) const fn set_policy(&mut self, policy: CommitPolicy) {
        self.policy = policy;
    }

    /// Renames the `step` label of a step counting its dropped messages.
    pub(crate) const fn set_metric_name(&mut self, step: &'static str) {
        if self.counts_as_filtered.is_some() {
            self.counts_as_filtered = Some(step);
        }
    }

    /// Counts dropped messages in the `MESSAGES_FILTERED` metric, labelled `step`.
    pub(crate) const fn counting_as_filtered(mut self, step: &'static str) -> Self {
        self.counts_as_filtered = Some(step);
        self
    }

    /// Records the offsets of a dropped message.
    ///
    /// A derived message is deferred as well as any dropped behind parts without offsets: its
    /// offsets may stand for work still in flight further down (see the module docs).
    pub(crate) fn drop_message<T>(&mut self, message: &Message<T>) {
        if self.counts_as_filtered.is_some() {
            self.filtered_unrecorded += 1;
        }
        if message.partition().is_some() && !self.blind {
            message.add_committable_to(&mut self.offsets);
            self.count += 1;
        } else {
            message.add_committable_to(&mut self.deferred);
        }
    }

    /// Forwards `message` to `next` (held if rejected), carrying any deferred offsets.
    pub(crate) fn forward<N>(
        &mut self,
        next: &mut N,
        message: Message<U>,
    ) -> Result<(), InvalidMessage>
    where
        N: ProcessingStrategy<U>,
    {
        let message = self.carry_deferred(message);
        self.carried_over.forward(next, message)
    }

    /// Holds `message` to be forwarded on the next poll, carrying any deferred offsets.
    pub(crate) fn hold(&mut self, message: Message<U>) {
        let message = self.carry_deferred(message);
        self.carried_over.hold(message);
    }

    fn carry_deferred(&mut self, message: Message<U>) -> Message<U> {
        let message = if self.deferred.is_empty() {
            message
        } else {
            let mut committable = std::mem::take(&mut self.deferred);
            message.add_committable_to(&mut committable);
            Message::derived(message.into_payload(), committable)
        };
        self.blind = !message.carries_offsets();
        message
    }

    /// Whether nothing is held here and `next` is idle: every message forwarded is done.
    pub(crate) fn is_idle<N>(&self, next: &N) -> bool
    where
        N: ProcessingStrategy<U>,
    {
        !self.carried_over.is_holding() && next.is_idle()
    }

    /// Releases the deferred offsets if everything forwarded before them is done.
    fn release_deferred_if_idle<N>(&mut self, next: &N)
    where
        N: ProcessingStrategy<U>,
    {
        if (self.blind || !self.deferred.is_empty()) && self.is_idle(next) {
            self.blind = false;
            if !self.deferred.is_empty() {
                self.offsets.merge(&std::mem::take(&mut self.deferred));
                self.count += 1;
            }
        }
    }

    /// Polls `next` and returns its done offsets, with the dropped ones when it has some or
    /// when the policy says they waited long enough.
    pub(crate) fn poll<N>(&mut self, next: &mut N) -> Result<Option<CommitRequest>, StrategyError>
    where
        N: ProcessingStrategy<U>,
    {
        if let Some(step) = self.counts_as_filtered
            && self.filtered_unrecorded > 0
        {
            ::metrics::counter!(metrics::MESSAGES_FILTERED, metrics::STEP => step)
                .increment(self.filtered_unrecorded);
            self.filtered_unrecorded = 0;
        }
        self.carried_over.poll_next(next)?;
        self.release_deferred_if_idle(next);
        let downstream = self.carried_over.take_commit();
        if self.count == 0 {
            return Ok(downstream);
        }
        let busy = self.count != self.count_at_poll;
        self.count_at_poll = self.count;
        if downstream.is_some() || std::mem::take(&mut self.release_soon) {
            let now = self.last_release;
            return Ok(commit::merge(downstream, self.take_dropped(now)));
        }
        match self.sampler.sample(&*self.clock, busy) {
            Some(now) if self.policy.is_due(now, self.last_release, self.count) => {
                Ok(self.take_dropped(now))
            }
            _ => Ok(None),
        }
    }

    /// Joins `next` and returns everything done, dropped offsets included, except deferred
    /// ones when the join was cut short by its deadline (the work they stand for may have been
    /// abandoned: they are redelivered).
    pub(crate) fn join<N>(
        &mut self,
        next: &mut N,
        deadline: Option<Instant>,
    ) -> Result<Option<CommitRequest>, StrategyError>
    where
        N: ProcessingStrategy<U>,
    {
        self.release_deferred_if_idle(next);
        let joined = self.carried_over.join_next(next, deadline, &*self.clock)?;
        let now = self.clock.now();
        self.blind = false;
        let mut deferred = Some(std::mem::take(&mut self.deferred)).filter(|d| !d.is_empty());
        if deferred.is_some() && deadline.is_some_and(|deadline| now >= deadline) {
            tracing::warn!(
                "Join deadline passed with work in flight before a dropped message; \
                 its offsets will be redelivered."
            );
            deferred = None;
        }
        Ok(commit::merge(
            commit::merge(joined, self.take_dropped(now)),
            deferred,
        ))
    }

    /// Some partitions were revoked while the pipeline keeps running: their dropped offsets go
    /// out at the next poll (see [`ProcessingStrategy::partitions_changed`]).
    pub(crate) const fn partitions_revoked(&mut self) {
        self.release_soon = true;
    }

    pub(crate) fn terminate<N>(&mut self, next: &mut N)
    where
        N: ProcessingStrategy<U>,
    {
        self.carried_over.clear();
        self.deferred = CommitRequest::new();
        self.blind = false;
        next.terminate();
    }

    pub(crate) fn next_deadline<N>(&self, next: &N) -> Option<Instant>
    where
        N: ProcessingStrategy<U>,
    {
        let release = (self.count > 0)
            .then(|| self.policy.interval().map(|i| self.last_release + i))
            .flatten();
        earliest(release, next.next_deadline())
    }

    fn take_dropped(&mut self, now: Instant) -> Option<CommitRequest> {
        self.last_release = now;
        if self.count == 0 {
            return None;
        }
        self.count = 0;
        self.count_at_poll = 0;
        Some(std::mem::take(&mut self.offsets))
    }
}

/// The `ProcessingStrategy` methods a step built on a [`DroppingForwarder`] (fields
/// `forwarder` and `next_step`) leaves to it: all but `poll` and `submit`. `$output` is the
/// type of the messages it forwards.
macro_rules! delegate_to_forwarder {
    ($output:ty) => {
        fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
            self.forwarder.poll(&mut self.next_step)
        }

        fn join(
            &mut self,
            deadline: Option<Instant>,
        ) -> Result<Option<CommitRequest>, StrategyError> {
            self.forwarder.join(&mut self.next_step, deadline)
        }

        fn close(&mut self) {
            ProcessingStrategy::<$output>::close(&mut self.next_step);
        }

        fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
            if !revoked.is_empty() {
                self.forwarder.partitions_revoked();
            }
            ProcessingStrategy::<$output>::partitions_changed(
                &mut self.next_step,
                assigned,
                revoked,
            );
        }

        fn terminate(&mut self) {
            self.forwarder.terminate(&mut self.next_step);
        }

        fn next_deadline(&self) -> Option<Instant> {
            self.forwarder.next_deadline(&self.next_step)
        }

        fn is_idle(&self) -> bool {
            self.forwarder.is_idle(&self.next_step)
        }
    };
}
pub(crate) use delegate_to_forwarder;

/// The builder methods of a step whose dropped messages are released by a commit policy.
macro_rules! dropping_builders {
    () => {
        /// Releases offsets of dropped messages by `policy` when the next step reports none
        /// (default: every second).
        #[must_use]
        pub fn with_commit_policy(mut self, policy: CommitPolicy) -> Self {
            self.forwarder.set_policy(policy);
            self
        }

        /// Reads time from `clock`.
        #[must_use]
        pub fn with_clock(mut self, clock: SharedClock) -> Self {
            self.forwarder.set_clock(clock);
            self
        }

        /// Names the step in its metrics' `step` label (default: its kind).
        #[must_use]
        pub fn with_metric_name(mut self, name: &'static str) -> Self {
            self.forwarder.set_metric_name(name);
            self
        }
    };
}
pub(crate) use dropping_builders;

/// `Debug` for a step built on a [`DroppingForwarder`]: its next step and whether it holds a
/// message, never a payload.
macro_rules! debug_dropping_step {
    ($name:ident<$f:ident, $n:ident, $t:ident>) => {
        impl<$f, $n: fmt::Debug, $t> fmt::Debug for $name<$f, $n, $t> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($name))
                    .field("next_step", &self.next_step)
                    .field("holding", &self.forwarder.carried_over.is_holding())
                    .finish_non_exhaustive()
            }
        }
    };
}
pub(crate) use debug_dropping_step;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::steps::{Filter, Unfold};
    use crate::testing::{RecordingStep, message, partition};

    /// Splits `n` into the parts `n * 10 + 1 ..= n * 10 + 3`; the last carries the input's
    /// offsets and is dropped by the filter, the two before it go to `next`.
    fn split_then_drop_the_last_part(
        clock: &ManualClock,
        next: RecordingStep<u32>,
    ) -> impl ProcessingStrategy<u32> + use<> {
        let filter = Filter::new(|m: &Message<u32>| m.payload() % 10 != 3, next)
            .with_clock(clock.shared())
            .with_commit_policy(CommitPolicy::every(Duration::from_secs(1)));
        Unfold::new(|n: u32| (1..=3).map(move |i| n * 10 + i), filter).with_clock(clock.shared())
    }

    fn batch(offsets: std::ops::Range<u64>) -> CommitRequest {
        let mut request = CommitRequest::new();
        request.add_range(&partition(0), offsets);
        request
    }

    #[test]
    fn a_dropped_last_part_waits_for_the_parts_before_it() {
        // The input is a broker message: its last part keeps its offset, yet the parts
        // before it are not done.
        let clock = ManualClock::new();
        let next = RecordingStep::new();
        let mut step = split_then_drop_the_last_part(&clock, next.clone());
        step.submit(message(0, 1)).unwrap();
        assert_eq!(next.payloads(), [11, 12]);

        clock.advance(Duration::from_secs(2));

        assert_eq!(step.poll().unwrap(), None);
    }

    #[test]
    fn a_dropped_last_part_is_released_by_poll_once_the_parts_before_it_are_done() {
        let clock = ManualClock::new();
        let next = RecordingStep::new();
        let mut step = split_then_drop_the_last_part(&clock, next.clone());
        step.submit(Message::derived(1, batch(0..3))).unwrap();
        assert_eq!(step.poll().unwrap(), None);

        next.set_commit_on_poll();
        clock.advance(Duration::from_secs(1));

        let done = step.poll().unwrap().unwrap();
        assert_eq!(done.offsets(&partition(0)), vec![0..3]);
    }

    #[test]
    fn a_join_cut_short_does_not_report_a_dropped_last_part() {
        // The next step's join abandoned the parts before it (a deadline, aborted tasks).
        let clock = ManualClock::new();
        let mut step = split_then_drop_the_last_part(&clock, RecordingStep::new());
        step.submit(Message::derived(1, batch(0..3))).unwrap();
        step.submit(message(3, 2)).unwrap();

        let done = step.join(Some(clock.now())).unwrap();

        assert_eq!(done, None);
    }

    #[test]
    fn a_join_that_finished_reports_a_dropped_last_part() {
        let clock = ManualClock::new();
        let next = RecordingStep::new();
        let mut step = split_then_drop_the_last_part(&clock, next.clone());
        step.submit(Message::derived(1, batch(0..3))).unwrap();
        next.set_commit_on_poll();

        let done = step
            .join(Some(clock.now() + Duration::from_secs(1)))
            .unwrap();

        assert_eq!(done.unwrap().offsets(&partition(0)), vec![0..3]);
    }
}
