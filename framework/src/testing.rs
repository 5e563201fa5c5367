//! Test doubles for steps: a recording next step and message builders; and in [`kafka`], a
//! real Kafka in process (librdkafka's mock cluster) with clients to fill and read it.
//!
//! Compiled for this crate's tests and, with the `test-utils` feature, for other crates' tests;
//! never part of a production build.

pub mod kafka;

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::commit::CommitRequest;
use crate::error::{InvalidMessage, StrategyError, SubmitError};
use crate::message::{Message, Partition, Topic};
use crate::strategy::ProcessingStrategy;

/// The topic of [`message`] and [`partition`].
pub const TEST_TOPIC: &str = "test";

/// Partition `index` of [`TEST_TOPIC`].
pub fn partition(index: u32) -> Partition {
    Partition::new(Topic::new(TEST_TOPIC), index)
}

/// A broker message on partition 0 of [`TEST_TOPIC`] at `offset`.
pub fn message<T>(offset: u64, payload: T) -> Message<T> {
    Message::broker(payload, partition(0), offset, None)
}

#[derive(Debug)]
struct State<T> {
    messages: Vec<Message<T>>,
    reject_next: usize,
    rejected: usize,
    invalid_offsets: Vec<u64>,
    commit_on_poll: bool,
    uncommitted: CommitRequest,
    joined: bool,
    closed: bool,
    closed_before_join: bool,
    terminated: bool,
    polls: usize,
    /// Partitions whose accepted offsets are kept back (their work unfinished) until released.
    holding: Vec<Partition>,
    held: CommitRequest,
    /// `partitions_changed` calls: (assigned, revoked).
    changes: Vec<(Vec<Partition>, Vec<Partition>)>,
}

/// A last step that records what it receives and can push back on demand.
///
/// Clones share state: keep one in the test, give the other to the step under test.
///
/// # Examples
///
/// ```
/// use rill::ProcessingStrategy;
/// use rill::testing::{RecordingStep, message};
///
/// let next = RecordingStep::new().reject_next(1);
/// let mut step = next.clone();
///
/// assert!(step.submit(message(0, "a")).is_err()); // rejected once
/// step.submit(message(0, "a")).unwrap();
///
/// assert_eq!(next.payloads(), ["a"]);
/// ```
#[derive(Debug)]
pub struct RecordingStep<T> {
    state: Arc<Mutex<State<T>>>,
}

impl<T> Clone for RecordingStep<T> {
    fn clone(&self) -> Self {
        Self {
            state: Arc::clone(&self.state),
        }
    }
}

impl<T> RecordingStep<T> {
    /// Accepts everything and never reports done offsets.
    pub fn new() -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                messages: Vec::new(),
                reject_next: 0,
                rejected: 0,
                invalid_offsets: Vec::new(),
                commit_on_poll: false,
                uncommitted: CommitRequest::new(),
                joined: false,
                closed: false,
                closed_before_join: false,
                terminated: false,
                polls: 0,
                holding: Vec::new(),
                held: CommitRequest::new(),
                changes: Vec::new(),
            })),
        }
    }

    /// Rejects the next `count` submissions (more may be added later with the same call).
    #[must_use]
    pub fn reject_next(self, count: usize) -> Self {
        self.set_reject_next(count);
        self
    }

    /// Rejects the next `count` submissions, from now on.
    pub fn set_reject_next(&self, count: usize) {
        self.state.lock().reject_next = count;
    }

    /// From now on, reports what it accepted as done on `poll` and `join` (and counts as
    /// idle): the work it stood for finished.
    pub fn set_commit_on_poll(&self) {
        self.state.lock().commit_on_poll = true;
    }

    /// Reports submitted messages as invalid when their offset is in `offsets`.
    #[must_use]
    pub fn invalid_at(self, offsets: &[u64]) -> Self {
        self.state.lock().invalid_offsets = offsets.to_vec();
        self
    }

    /// Reports the offsets of accepted messages as done on the next `poll` or `join`.
    #[must_use]
    pub fn commit_on_poll(self) -> Self {
        self.set_commit_on_poll();
        self
    }

    /// From now on, keeps the offsets of `partitions` it accepts back, as work that has not
    /// finished, until [`release_held`](Self::release_held).
    pub fn set_holding(&self, partitions: &[Partition]) {
        self.state.lock().holding = partitions.to_vec();
    }

    /// Reports the offsets kept back as done (with `commit_on_poll`), and keeps no more back.
    pub fn release_held(&self) {
        let mut state = self.state.lock();
        state.holding.clear();
        let held = std::mem::take(&mut state.held);
        state.uncommitted.merge(&held);
    }

    /// The `partitions_changed` calls received so far: (assigned, revoked).
    pub fn changes(&self) -> Vec<(Vec<Partition>, Vec<Partition>)> {
        self.state.lock().changes.clone()
    }

    /// The messages accepted so far, metadata included.
    pub fn messages(&self) -> Vec<Message<T>>
    where
        T: Clone,
    {
        self.state.lock().messages.clone()
    }

    /// The payloads accepted so far.
    pub fn payloads(&self) -> Vec<T>
    where
        T: Clone,
    {
        let state = self.state.lock();
        state.messages.iter().map(|m| m.payload().clone()).collect()
    }

    /// How many messages were accepted.
    pub fn accepted(&self) -> usize {
        self.state.lock().messages.len()
    }

    /// How many submissions were rejected.
    pub fn rejected(&self) -> usize {
        self.state.lock().rejected
    }

    /// How many times `poll` was called.
    pub fn polls(&self) -> usize {
        self.state.lock().polls
    }

    /// Whether `join` was called.
    pub fn joined(&self) -> bool {
        self.state.lock().joined
    }

    /// Whether `close` was called before the first `join`.
    pub fn closed_before_join(&self) -> bool {
        self.state.lock().closed_before_join
    }

    /// Whether `terminate` was called.
    pub fn terminated(&self) -> bool {
        self.state.lock().terminated
    }

    fn take_done(state: &mut State<T>) -> Option<CommitRequest> {
        if !state.commit_on_poll || state.uncommitted.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut state.uncommitted))
    }
}

impl<T> Default for RecordingStep<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> ProcessingStrategy<T> for RecordingStep<T> {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        let mut state = self.state.lock();
        state.polls += 1;
        Ok(Self::take_done(&mut state))
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        let mut state = self.state.lock();
        if state.reject_next > 0 {
            state.reject_next -= 1;
            state.rejected += 1;
            return Err(SubmitError::MessageRejected(message));
        }
        if let (Some(partition), Some(offset)) = (message.partition(), message.offset())
            && state.invalid_offsets.contains(&offset)
        {
            return Err(InvalidMessage::new(partition.clone(), offset, "rejected by test").into());
        }
        let held = message
            .partition()
            .is_some_and(|partition| state.holding.contains(partition));
        if held {
            message.add_committable_to(&mut state.held);
        } else {
            message.add_committable_to(&mut state.uncommitted);
        }
        state.messages.push(message);
        Ok(())
    }

    fn join(&mut self, _deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        let mut state = self.state.lock();
        if !state.joined {
            state.closed_before_join = state.closed;
        }
        state.joined = true;
        Ok(Self::take_done(&mut state))
    }

    fn close(&mut self) {
        self.state.lock().closed = true;
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        self.state
            .lock()
            .changes
            .push((assigned.to_vec(), revoked.to_vec()));
    }

    fn terminate(&mut self) {
        self.state.lock().terminated = true;
    }

    /// Idle when it reports what it accepts as done (`commit_on_poll`) or accepted nothing:
    /// without `commit_on_poll` it stands for a step whose work never finishes.
    fn is_idle(&self) -> bool {
        let state = self.state.lock();
        state.commit_on_poll || state.messages.is_empty()
    }
}

/// Polls `step` every millisecond until `done` holds; panics after ten seconds (a test's
/// condition that never comes true fails instead of hanging).
///
/// # Panics
///
/// When the condition is not reached in time, or `poll` fails.
#[allow(clippy::unwrap_used)]
pub fn poll_until<T, S: ProcessingStrategy<T> + ?Sized>(
    step: &mut S,
    mut done: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "condition not reached");
        step.poll().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Polls `step` every millisecond until it reports an error, and returns it.
///
/// # Panics
///
/// When no error comes within ten seconds.
pub fn poll_until_error<T, S: ProcessingStrategy<T> + ?Sized>(step: &mut S) -> StrategyError {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match step.poll() {
            Err(error) => return error,
            Ok(_) => assert!(Instant::now() < deadline, "no error reported"),
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// An in-memory broker with `topic` of `partitions` partitions, each holding the payloads
/// `0..per_partition` at the same offsets.
pub fn numbered_broker(
    topic: &str,
    partitions: u32,
    per_partition: u64,
) -> (crate::backends::local::LocalBroker<u64>, Topic) {
    let broker = crate::backends::local::LocalBroker::new();
    let topic = Topic::new(topic);
    broker.create_topic(&topic, partitions);
    for index in 0..partitions {
        for n in 0..per_partition {
            let stored = broker.produce_to(&Partition::new(topic.clone(), index), n);
            debug_assert_eq!(stored.ok(), Some(n));
        }
    }
    (broker, topic)
}

/// Passes everything through to `next_step`, except that a submission is rejected (the
/// message handed back) whenever `reject` returns true: rejection storms, flaky steps.
///
/// # Examples
///
/// ```
/// use rill::ProcessingStrategy;
/// use rill::testing::{RecordingStep, RejectWhen, message};
///
/// let mut calls = 0;
/// let mut step = RejectWhen::new(move || { calls += 1; calls % 2 == 1 }, RecordingStep::new());
///
/// assert!(step.submit(message(0, "a")).is_err());
/// assert!(step.submit(message(0, "a")).is_ok());
/// ```
#[derive(Debug)]
pub struct RejectWhen<F, N> {
    reject: F,
    next_step: N,
}

impl<F, N> RejectWhen<F, N> {
    /// Rejects when `reject` returns true, otherwise submits to `next_step`.
    pub const fn new(reject: F, next_step: N) -> Self {
        Self { reject, next_step }
    }
}

impl<T, F, N> ProcessingStrategy<T> for RejectWhen<F, N>
where
    F: FnMut() -> bool,
    N: ProcessingStrategy<T>,
{
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        self.next_step.poll()
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        if (self.reject)() {
            return Err(SubmitError::MessageRejected(message));
        }
        self.next_step.submit(message)
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        self.next_step.join(deadline)
    }

    fn close(&mut self) {
        self.next_step.close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        self.next_step.partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        self.next_step.terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.next_step.next_deadline()
    }

    fn is_idle(&self) -> bool {
        self.next_step.is_idle()
    }
}
