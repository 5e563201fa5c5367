//! Fold messages into batches, by count or weight, within a time window.

use std::fmt;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::carried_over::CarriedOver;
use crate::clock::{ClockSampler, SharedClock, SystemClock, earliest, expired};
use crate::commit::CommitRequest;
use crate::error::{InvalidMessage, StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::metrics;
use crate::strategy::ProcessingStrategy;

/// The batch being built: its value, the offsets it stands for, and when it started.
struct Batch<B> {
    value: B,
    offsets: CommitRequest,
    weight: u64,
    started: Instant,
}

/// Folds payloads into a batch and forwards the batch as one derived message.
///
/// A batch is flushed when its weight reaches `max_batch_weight` (each payload weighs 1
/// unless [`with_weight`](Self::with_weight) says otherwise), or when `max_batch_time` has
/// passed since its *first* message. The time window is checked on every `poll`, so it fires
/// even when no new message arrives; [`next_deadline`](ProcessingStrategy::next_deadline) tells
/// the processor when. The batch message carries the offsets of every payload in it.
///
/// `accumulate` may push back by returning the payload (`Err(payload)`): the message is handed
/// back to the caller as rejected, and the batch is left as it was.
///
/// # Backpressure
///
/// While a finished batch is held by a full next step, new input is rejected.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::steps::{Reduce, Noop};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let mut step = Reduce::new(
///     Vec::new,
///     |batch: &mut Vec<u32>, n: u32| {
///         batch.push(n);
///         Ok(())
///     },
///     100,
///     Duration::from_secs(1),
///     Noop,
/// );
/// let partition = Partition::new(Topic::new("numbers"), 0);
/// step.submit(Message::broker(1, partition, 0, None)).unwrap();
/// ```
pub struct Reduce<T, B, I, F, N> {
    initial: I,
    accumulate: F,
    weight: fn(&T) -> u64,
    max_batch_weight: u64,
    max_batch_time: Duration,
    batch: Option<Batch<B>>,
    /// Messages added since the previous poll: whether the stream is busy.
    added_since_poll: bool,
    /// The window closed while the next step was busy: the batch is offered on every poll.
    overdue: bool,
    next_step: N,
    carried_over: CarriedOver<B>,
    clock: SharedClock,
    sampler: ClockSampler,
    metric_name: &'static str,
    input: PhantomData<fn(T)>,
}

impl<T, B, I, F, N> Reduce<T, B, I, F, N> {
    /// Batches with `accumulate` into values made by `initial`, flushing at
    /// `max_batch_weight` or `max_batch_time`, in front of `next_step`.
    pub fn new(
        initial: I,
        accumulate: F,
        max_batch_weight: u64,
        max_batch_time: Duration,
        next_step: N,
    ) -> Self {
        Self {
            initial,
            accumulate,
            weight: |_| 1,
            max_batch_weight,
            max_batch_time,
            batch: None,
            added_since_poll: false,
            overdue: false,
            next_step,
            carried_over: CarriedOver::new(),
            clock: SystemClock::shared(),
            sampler: ClockSampler::new(),
            metric_name: "reduce",
            input: PhantomData,
        }
    }

    /// Weighs each payload with `weight` (bytes, spans) instead of counting messages.
    #[must_use]
    pub fn with_weight(mut self, weight: fn(&T) -> u64) -> Self {
        self.weight = weight;
        self
    }

    /// Names the step in its metrics' `step` label (default `reduce`).
    #[must_use]
    pub const fn with_metric_name(mut self, name: &'static str) -> Self {
        self.metric_name = name;
        self
    }

    /// Reads time from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.sampler.reset();
        self.clock = clock;
        self
    }
}

impl<T, N> Reduce<T, Vec<T>, fn() -> Vec<T>, fn(&mut Vec<T>, T) -> Result<(), T>, N> {
    /// Collects payloads into a `Vec`, at most `max_batch_size` per batch.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use rill::steps::{Noop, Reduce};
    ///
    /// let _step = Reduce::<u8, _, _, _, _>::vec(1000, Duration::from_millis(500), Noop);
    /// ```
    pub fn vec(max_batch_size: u64, max_batch_time: Duration, next_step: N) -> Self {
        fn push<T>(batch: &mut Vec<T>, item: T) -> Result<(), T> {
            batch.push(item);
            Ok(())
        }
        Self::new(Vec::new, push, max_batch_size, max_batch_time, next_step)
    }
}

impl<T, B, I, F, N> Reduce<T, B, I, F, N>
where
    N: ProcessingStrategy<B>,
{
    /// Counts a batch sent on for `reason` in the step's metric.
    fn count_flush(&self, reason: &'static str) {
        ::metrics::counter!(metrics::BATCHES_FLUSHED, "reason" => reason, metrics::STEP => self.metric_name)
            .increment(1);
    }

    /// Forwards the current batch, if any; it is held if the next step is full.
    fn flush(&mut self, reason: &'static str) -> Result<(), InvalidMessage> {
        self.overdue = false;
        let Some(batch) = self.batch.take() else {
            return Ok(());
        };
        self.count_flush(reason);
        let message = Message::derived(batch.value, batch.offsets);
        self.carried_over.forward(&mut self.next_step, message)
    }

    /// Offers the batch whose window closed to the next step; if the next step is busy, the
    /// batch stays open and keeps growing until it is full or the next step takes it (a group
    /// commit: the batch size follows the load, the window only bounds latency when idle).
    fn flush_when_taken(&mut self) -> Result<(), InvalidMessage> {
        let Some(batch) = self.batch.take() else {
            return Ok(());
        };
        let message = Message::derived(batch.value, batch.offsets);
        match self.next_step.submit(message) {
            Ok(()) => {
                self.overdue = false;
                self.count_flush("time");
                Ok(())
            }
            Err(SubmitError::MessageRejected(message)) => {
                self.overdue = true;
                let offsets = message.committable();
                self.batch = Some(Batch {
                    value: message.into_payload(),
                    offsets,
                    weight: batch.weight,
                    started: batch.started,
                });
                Ok(())
            }
            Err(SubmitError::InvalidMessage(invalid)) => Err(invalid),
        }
    }

    fn window_closed(&self, now: Instant) -> bool {
        self.batch
            .as_ref()
            .is_some_and(|batch| now.duration_since(batch.started) >= self.max_batch_time)
    }
}

impl<T, B, I, F, N> ProcessingStrategy<T> for Reduce<T, B, I, F, N>
where
    I: FnMut() -> B,
    F: FnMut(&mut B, T) -> Result<(), T>,
    N: ProcessingStrategy<B>,
{
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        self.carried_over.poll_next(&mut self.next_step)?;
        let busy = std::mem::take(&mut self.added_since_poll);
        if self.batch.is_some() && !self.carried_over.is_holding() {
            let due = self.overdue
                || self
                    .sampler
                    .sample(&*self.clock, busy)
                    .is_some_and(|now| self.window_closed(now));
            if due {
                self.flush_when_taken()?;
            }
        }
        Ok(self.carried_over.take_commit())
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        if self.carried_over.is_holding() {
            return Err(SubmitError::MessageRejected(message));
        }
        let (metadata, payload) = message.take();
        let weight = (self.weight)(&payload);
        let batch = match &mut self.batch {
            Some(batch) => batch,
            None => self.batch.insert(Batch {
                value: (self.initial)(),
                offsets: CommitRequest::new(),
                weight: 0,
                started: self.clock.now(),
            }),
        };
        if let Err(payload) = (self.accumulate)(&mut batch.value, payload) {
            return Err(SubmitError::MessageRejected(metadata.replace(payload).0));
        }
        metadata.add_committable_to(&mut batch.offsets);
        batch.weight += weight;
        self.added_since_poll = true;
        if batch.weight >= self.max_batch_weight {
            self.flush("size")?;
        }
        Ok(())
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        // The batch goes out behind whatever is held, so hand that over first.
        self.carried_over
            .hand_over(&mut self.next_step, deadline, &*self.clock)?;
        if expired(&*self.clock, deadline) {
            self.batch = None;
            self.overdue = false;
        } else {
            self.flush("join")?;
        }
        self.carried_over
            .join_next(&mut self.next_step, deadline, &*self.clock)
    }

    fn close(&mut self) {
        self.next_step.close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        // The open batch may hold messages of a revoked partition, whose hand-over waits for
        // them: it goes out at the next poll instead of at the end of its window.
        if !revoked.is_empty() && self.batch.is_some() {
            self.overdue = true;
        }
        self.next_step.partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        self.batch = None;
        self.overdue = false;
        self.carried_over.clear();
        self.next_step.terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        // An overdue batch waits for the next step, whose deadline says when to look again.
        let window = self
            .batch
            .as_ref()
            .filter(|_| !self.overdue)
            .map(|b| b.started + self.max_batch_time);
        earliest(window, self.next_step.next_deadline())
    }

    fn is_idle(&self) -> bool {
        self.batch.is_none() && !self.carried_over.is_holding() && self.next_step.is_idle()
    }
}

impl<T, B, I, F, N: fmt::Debug> fmt::Debug for Reduce<T, B, I, F, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reduce")
            .field("max_batch_weight", &self.max_batch_weight)
            .field("max_batch_time", &self.max_batch_time)
            .field("batch_weight", &self.batch.as_ref().map(|b| b.weight))
            .field("next_step", &self.next_step)
            .field("holding", &self.carried_over.is_holding())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::testing::{RecordingStep, message, partition};

    type Batcher = Reduce<
        u32,
        Vec<u32>,
        fn() -> Vec<u32>,
        fn(&mut Vec<u32>, u32) -> Result<(), u32>,
        RecordingStep<Vec<u32>>,
    >;

    fn batcher(size: u64, window: Duration) -> (Batcher, RecordingStep<Vec<u32>>, ManualClock) {
        let next = RecordingStep::new();
        let clock = ManualClock::new();
        let step = Reduce::vec(size, window, next.clone()).with_clock(clock.shared());
        (step, next, clock)
    }

    #[test]
    fn flushes_when_the_batch_is_full() {
        let (mut step, next, _clock) = batcher(3, Duration::from_secs(10));

        for offset in 0..7 {
            step.submit(message(offset, offset as u32)).unwrap();
        }

        assert_eq!(next.payloads(), [vec![0, 1, 2], vec![3, 4, 5]]);
    }

    #[test]
    fn a_batch_carries_the_offsets_of_its_messages() {
        let (mut step, next, _clock) = batcher(2, Duration::from_secs(10));

        step.submit(message(4, 0)).unwrap();
        step.submit(message(5, 0)).unwrap();

        assert_eq!(
            next.messages()[0].committable().offsets(&partition(0)),
            vec![4..6]
        );
    }

    #[test]
    fn the_window_starts_at_the_first_message_not_the_last_flush() {
        let (mut step, next, clock) = batcher(100, Duration::from_secs(1));
        clock.advance(Duration::from_secs(60)); // idle long before the first message

        step.submit(message(0, 1)).unwrap();
        step.poll().unwrap();
        step.submit(message(1, 2)).unwrap();
        step.poll().unwrap();

        // rust-arroyo flushed `[1]` alone here.
        assert!(next.payloads().is_empty());
        clock.advance(Duration::from_secs(1));
        step.poll().unwrap();
        assert_eq!(next.payloads(), [vec![1, 2]]);
    }

    #[test]
    fn a_revocation_flushes_the_open_batch_at_the_next_poll_and_is_passed_on() {
        let (mut step, next, _clock) = batcher(100, Duration::from_secs(3600));
        step.submit(message(0, 1)).unwrap();
        step.poll().unwrap();
        assert!(next.payloads().is_empty());

        step.partitions_changed(&[], &[partition(0)]);
        step.poll().unwrap();

        assert_eq!(next.payloads(), [vec![1]]);
        assert_eq!(next.changes(), [(vec![], vec![partition(0)])]);
    }

    #[test]
    fn the_timer_fires_without_new_messages_and_is_announced() {
        let (mut step, next, clock) = batcher(100, Duration::from_millis(500));
        step.submit(message(0, 1)).unwrap();

        assert_eq!(
            step.next_deadline(),
            Some(clock.now() + Duration::from_millis(500))
        );
        clock.advance(Duration::from_millis(500));
        step.poll().unwrap();

        assert_eq!(next.payloads(), [vec![1]]);
        assert_eq!(step.next_deadline(), None);
    }

    #[test]
    fn batches_by_weight() {
        let next = RecordingStep::new();
        let mut step = Reduce::vec(10, Duration::from_secs(10), next.clone())
            .with_weight(|n: &u32| u64::from(*n));

        for (offset, n) in [4_u32, 5, 1, 3].into_iter().enumerate() {
            step.submit(message(offset as u64, n)).unwrap();
        }

        assert_eq!(next.payloads(), [vec![4, 5, 1]]);
    }

    #[test]
    fn a_held_batch_rejects_input_until_it_drains() {
        let next = RecordingStep::new().reject_next(1);
        let mut step = Reduce::vec(1, Duration::from_secs(10), next.clone());
        step.submit(message(0, 1)).unwrap();

        let second = step.submit(message(1, 2));
        step.poll().unwrap();

        assert!(matches!(second, Err(SubmitError::MessageRejected(_))));
        assert_eq!(next.payloads(), [vec![1]]);
    }

    #[test]
    fn the_accumulator_can_push_back_without_changing_the_batch() {
        let next = RecordingStep::new();
        let mut step = Reduce::new(
            Vec::new,
            |batch: &mut Vec<u32>, n: u32| {
                if n == 0 {
                    Err(n)
                } else {
                    batch.push(n);
                    Ok(())
                }
            },
            10,
            Duration::from_secs(10),
            next.clone(),
        );
        step.submit(message(0, 1)).unwrap();

        let result = step.submit(message(1, 0));
        step.join(None).unwrap();

        let Err(SubmitError::MessageRejected(back)) = result else {
            panic!("expected the message back");
        };
        assert_eq!(back.offset(), Some(1));
        assert_eq!(next.payloads(), [vec![1]]);
        assert_eq!(
            next.messages()[0].committable().offsets(&partition(0)),
            vec![0..1]
        );
    }

    #[test]
    fn join_flushes_the_partial_batch_behind_a_held_one() {
        let next = RecordingStep::new().reject_next(2).commit_on_poll();
        let clock = ManualClock::new();
        let mut step =
            Reduce::vec(2, Duration::from_secs(10), next.clone()).with_clock(clock.shared());
        step.submit(message(0, 1)).unwrap();
        step.submit(message(1, 2)).unwrap(); // full: flushed, held
        assert!(step.submit(message(2, 3)).is_err());
        step.poll().unwrap(); // still held (second rejection)
        step.carried_over.retry(&mut step.next_step).unwrap();
        step.submit(message(2, 3)).unwrap();

        let done = step
            .join(Some(clock.now() + Duration::from_secs(1)))
            .unwrap()
            .unwrap();

        assert_eq!(next.payloads(), [vec![1, 2], vec![3]]);
        assert_eq!(done.offsets(&partition(0)), vec![0..3]);
    }
}
