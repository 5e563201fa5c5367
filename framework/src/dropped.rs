//! Steps that drop some messages on purpose: their offsets still become committable.
//!
//! A dropped message (filtered out, unfolded into nothing) is done the moment it is dropped.
//! Reporting each one at once would make the processor commit on every iteration of a stream
//! that is mostly dropped, so they are released with whatever the next step releases, or by a
//! [`CommitPolicy`] of their own when the next step has nothing to say.
//!
//! A dropped *derived* message is different: it may be the last part of a split batch, whose
//! offsets ride on that last part while the earlier parts are still being worked on further
//! down (in a batch, a task). Its offsets are therefore not reported upwards but attached to
//! the next message forwarded, which finishes after those earlier parts; at the latest they
//! are reported by `join`, once everything forwarded is done.
//!
//! [`DroppingForwarder`] is the part `Filter` and `Unfold` share: held messages, dropped
//! offsets and the clock.

use std::time::{Duration, Instant};

use crate::carried_over::CarriedOver;
use crate::clock::{ClockSampler, SharedClock, SystemClock, earliest};
use crate::commit::{self, CommitRequest};
use crate::error::{InvalidMessage, StrategyError};
use crate::message::Message;
use crate::steps::CommitPolicy;
use crate::strategy::ProcessingStrategy;

#[derive(Debug)]
pub(crate) struct DroppingForwarder<U> {
    pub(crate) carried_over: CarriedOver<U>,
    offsets: CommitRequest,
    /// Offsets of dropped derived messages, waiting for the next forwarded message.
    deferred: CommitRequest,
    count: u64,
    /// `count` at the previous poll: whether messages were dropped since.
    count_at_poll: u64,
    policy: CommitPolicy,
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
            count: 0,
            count_at_poll: 0,
            policy: CommitPolicy::every(Duration::from_secs(1)),
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

    /// Records the offsets of a dropped message.
    pub(crate) fn drop_message<T>(&mut self, message: &Message<T>) {
        if message.partition().is_some() {
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
        let message = if self.deferred.is_empty() {
            message
        } else {
            let mut committable = std::mem::take(&mut self.deferred);
            message.add_committable_to(&mut committable);
            Message::derived(message.into_payload(), committable)
        };
        self.carried_over.forward(next, message)
    }

    /// Polls `next` and returns its done offsets, with the dropped ones when it has some or
    /// when the policy says they waited long enough.
    pub(crate) fn poll<N>(&mut self, next: &mut N) -> Result<Option<CommitRequest>, StrategyError>
    where
        N: ProcessingStrategy<U>,
    {
        self.carried_over.poll_next(next)?;
        let downstream = self.carried_over.take_commit();
        if self.count == 0 {
            return Ok(downstream);
        }
        let busy = self.count != self.count_at_poll;
        self.count_at_poll = self.count;
        if downstream.is_some() {
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

    /// Joins `next` and returns everything done, dropped offsets included.
    pub(crate) fn join<N>(
        &mut self,
        next: &mut N,
        deadline: Option<Instant>,
    ) -> Result<Option<CommitRequest>, StrategyError>
    where
        N: ProcessingStrategy<U>,
    {
        let joined = self.carried_over.join_next(next, deadline, &*self.clock)?;
        let now = self.clock.now();
        let deferred = Some(std::mem::take(&mut self.deferred)).filter(|d| !d.is_empty());
        Ok(commit::merge(
            commit::merge(joined, self.take_dropped(now)),
            deferred,
        ))
    }

    pub(crate) fn terminate<N>(&mut self, next: &mut N)
    where
        N: ProcessingStrategy<U>,
    {
        self.carried_over.clear();
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
