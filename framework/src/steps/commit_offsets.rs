//! The last step of a pipeline: reports offsets of finished messages, by a commit policy.

use std::time::{Duration, Instant, SystemTime};

use crate::clock::{ClockSampler, SharedClock, SystemClock};
use crate::commit::CommitRequest;
use crate::error::{StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::metrics;
use crate::strategy::ProcessingStrategy;

/// How often [`CommitOffsets`] releases the offsets it collected: when `interval` has passed
/// since the last release, or when `messages` messages are waiting, whichever comes first.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::steps::CommitPolicy;
///
/// let policy = CommitPolicy::every(Duration::from_secs(1)).or_every_messages(10_000);
/// assert_eq!(policy.interval(), Some(Duration::from_secs(1)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitPolicy {
    interval: Option<Duration>,
    messages: Option<u64>,
}

impl CommitPolicy {
    /// Release once `interval` has passed since the last release.
    pub const fn every(interval: Duration) -> Self {
        Self {
            interval: Some(interval),
            messages: None,
        }
    }

    /// Release once `messages` messages are waiting.
    pub const fn every_messages(messages: u64) -> Self {
        Self {
            interval: None,
            messages: Some(messages),
        }
    }

    /// Also release once `messages` messages are waiting.
    #[must_use]
    pub const fn or_every_messages(mut self, messages: u64) -> Self {
        self.messages = Some(messages);
        self
    }

    /// The time part of the policy.
    pub const fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// The count part of the policy.
    pub const fn messages(&self) -> Option<u64> {
        self.messages
    }

    /// Whether `waiting` messages collected since `last_release` should be released `now`.
    pub(crate) fn is_due(&self, now: Instant, last_release: Instant, waiting: u64) -> bool {
        if waiting == 0 {
            return false;
        }
        if self.interval.is_none() && self.messages.is_none() {
            return true;
        }
        self.interval
            .is_some_and(|interval| now.duration_since(last_release) >= interval)
            || self.messages.is_some_and(|messages| waiting >= messages)
    }
}

/// Collects the offsets of every message it receives and releases them as a
/// [`CommitRequest`] from `poll` according to a [`CommitPolicy`]; `join` releases the rest.
///
/// It never rejects. About once a second it records the time from a message's broker
/// timestamp to this step as [`LATENCY_SECONDS`](crate::metrics::LATENCY_SECONDS).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::steps::CommitOffsets;
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let mut step = CommitOffsets::new(Duration::ZERO);
/// let partition = Partition::new(Topic::new("events"), 0);
/// step.submit(Message::broker((), partition.clone(), 4, None)).unwrap();
///
/// let done = ProcessingStrategy::<()>::poll(&mut step).unwrap().unwrap();
/// assert_eq!(done.offsets(&partition), vec![4..5]);
/// ```
#[derive(Debug)]
pub struct CommitOffsets {
    policy: CommitPolicy,
    clock: SharedClock,
    sampler: ClockSampler,
    pending: CommitRequest,
    waiting: u64,
    /// `waiting` at the previous poll: whether messages arrived since.
    waiting_at_poll: u64,
    last_release: Instant,
    /// A partition was revoked: release at the next poll, whatever the policy.
    release_soon: bool,
    last_timestamp: Option<SystemTime>,
    last_latency_sample: Instant,
}

impl CommitOffsets {
    /// Releases collected offsets every `interval` (zero: on every poll).
    pub fn new(interval: Duration) -> Self {
        Self::with_policy(CommitPolicy::every(interval))
    }

    /// Releases collected offsets according to `policy`.
    pub fn with_policy(policy: CommitPolicy) -> Self {
        let clock = SystemClock::shared();
        let now = clock.now();
        Self {
            policy,
            clock,
            sampler: ClockSampler::new(),
            pending: CommitRequest::new(),
            waiting: 0,
            waiting_at_poll: 0,
            last_release: now,
            release_soon: false,
            last_timestamp: None,
            last_latency_sample: now,
        }
    }

    /// Reads time from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.last_release = clock.now();
        self.last_latency_sample = self.last_release;
        self.sampler.reset();
        self.clock = clock;
        self
    }

    fn release(&mut self, now: Instant) -> Option<CommitRequest> {
        self.last_release = now;
        self.release_soon = false;
        self.waiting = 0;
        self.waiting_at_poll = 0;
        if self.pending.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.pending))
    }

    fn sample_latency(&mut self, now: Instant) {
        if now.duration_since(self.last_latency_sample) < Duration::from_secs(1) {
            return;
        }
        if let Some(timestamp) = self.last_timestamp.take() {
            if let Ok(latency) = SystemTime::now().duration_since(timestamp) {
                ::metrics::histogram!(metrics::LATENCY_SECONDS).record(latency.as_secs_f64());
            }
            self.last_latency_sample = now;
        }
    }
}

impl<T> ProcessingStrategy<T> for CommitOffsets {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        if self.waiting == 0 {
            return Ok(None);
        }
        let busy = self.waiting != self.waiting_at_poll;
        self.waiting_at_poll = self.waiting;
        let due_by_count = self
            .policy
            .messages()
            .is_some_and(|messages| self.waiting >= messages);
        if due_by_count || self.release_soon {
            let now = self.clock.now();
            return Ok(self.release(now));
        }
        // Not read again since the last check: nothing can have become due.
        let Some(now) = self.sampler.sample(&*self.clock, busy) else {
            return Ok(None);
        };
        self.sample_latency(now);
        if self.policy.is_due(now, self.last_release, self.waiting) {
            return Ok(self.release(now));
        }
        Ok(None)
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        message.add_committable_to(&mut self.pending);
        self.waiting += 1;
        if let Some(timestamp) = message.timestamp() {
            self.last_timestamp = Some(timestamp);
        }
        Ok(())
    }

    fn join(&mut self, _deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        let now = self.clock.now();
        Ok(self.release(now))
    }

    fn terminate(&mut self) {}

    /// A revoked partition's offsets go out at the next poll: its hand-over waits for them.
    fn partitions_changed(&mut self, _assigned: &[Partition], revoked: &[Partition]) {
        if !revoked.is_empty() {
            self.release_soon = true;
        }
    }

    fn is_idle(&self) -> bool {
        true
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.waiting == 0 {
            return None;
        }
        self.policy
            .interval()
            .map(|interval| self.last_release + interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::testing::{message, partition};

    fn step(policy: CommitPolicy) -> (CommitOffsets, ManualClock) {
        let clock = ManualClock::new();
        (
            CommitOffsets::with_policy(policy).with_clock(clock.shared()),
            clock,
        )
    }

    fn poll(step: &mut CommitOffsets) -> Option<CommitRequest> {
        ProcessingStrategy::<()>::poll(step).unwrap()
    }

    #[test]
    fn releases_nothing_before_the_interval() {
        let (mut step, clock) = step(CommitPolicy::every(Duration::from_secs(1)));
        step.submit(message(0, ())).unwrap();

        clock.advance(Duration::from_millis(999));

        assert_eq!(poll(&mut step), None);
    }

    #[test]
    fn a_revocation_releases_at_the_next_poll_whatever_the_interval() {
        let (mut step, _clock) = step(CommitPolicy::every(Duration::from_secs(3600)));
        step.submit(message(0, ())).unwrap();
        assert_eq!(poll(&mut step), None);

        ProcessingStrategy::<()>::partitions_changed(&mut step, &[], &[partition(0)]);

        let done = poll(&mut step).unwrap();
        assert_eq!(done.offsets(&partition(0)), vec![0..1]);
        step.submit(message(1, ())).unwrap();
        assert_eq!(poll(&mut step), None, "back to the interval");
    }

    #[test]
    fn an_assignment_alone_changes_nothing() {
        let (mut step, _clock) = step(CommitPolicy::every(Duration::from_secs(3600)));
        step.submit(message(0, ())).unwrap();

        ProcessingStrategy::<()>::partitions_changed(&mut step, &[partition(1)], &[]);

        assert_eq!(poll(&mut step), None);
    }

    #[test]
    fn releases_every_offset_once_the_interval_passed() {
        let (mut step, clock) = step(CommitPolicy::every(Duration::from_secs(1)));
        for offset in 0..3 {
            step.submit(message(offset, ())).unwrap();
        }

        clock.advance(Duration::from_secs(1));

        let done = poll(&mut step).unwrap();
        assert_eq!(done.offsets(&partition(0)), vec![0..3]);
        assert_eq!(poll(&mut step), None);
    }

    #[test]
    fn releases_on_message_count_without_waiting() {
        let (mut step, _clock) =
            step(CommitPolicy::every(Duration::from_secs(60)).or_every_messages(2));
        step.submit(message(0, ())).unwrap();
        assert_eq!(poll(&mut step), None);

        step.submit(message(1, ())).unwrap();

        assert_eq!(poll(&mut step).unwrap().offsets(&partition(0)), vec![0..2]);
    }

    #[test]
    fn out_of_order_offsets_are_all_reported() {
        let (mut step, _clock) = step(CommitPolicy::every(Duration::ZERO));

        for offset in [5, 3, 4] {
            step.submit(message(offset, ())).unwrap();
        }

        assert_eq!(poll(&mut step).unwrap().offsets(&partition(0)), vec![3..6]);
    }

    #[test]
    fn join_releases_regardless_of_policy() {
        let (mut step, _clock) = step(CommitPolicy::every(Duration::from_secs(60)));
        step.submit(message(7, ())).unwrap();

        let done = ProcessingStrategy::<()>::join(&mut step, None)
            .unwrap()
            .unwrap();

        assert_eq!(done.offsets(&partition(0)), vec![7..8]);
    }

    #[test]
    fn the_next_deadline_is_the_end_of_the_interval_when_offsets_wait() {
        let (mut step, clock) = step(CommitPolicy::every(Duration::from_secs(2)));
        assert_eq!(ProcessingStrategy::<()>::next_deadline(&step), None);

        step.submit(message(0, ())).unwrap();

        assert_eq!(
            ProcessingStrategy::<()>::next_deadline(&step),
            Some(clock.now() + Duration::from_secs(2))
        );
    }
}
