//! The dead-letter queue: where invalid messages go, and when their offsets may be committed.
//!
//! The processor keeps a copy of every raw message it submits (only when a DLQ is configured)
//! until its offset is committed. When a step reports an [`InvalidMessage`](crate::InvalidMessage), that copy is sent
//! to the [`DlqProducer`] with its original partition and offset; the offset is marked done only
//! when the delivery is confirmed, so a commit never skips a message that is neither processed
//! nor safely dead-lettered. Limits stop a consumer that sees nothing but bad input, with an
//! error rather than a panic.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::task::Poll;
use std::time::SystemTime;

use crate::backends::{
    DeliveryError, DeliveryFuture, Destination, ProduceError, Producer, poll_delivery,
};
use crate::commit::CommitRequest;
use crate::message::{Message, Partition};

/// An invalid message on its way to the dead-letter queue.
#[derive(Clone)]
pub struct DeadLetter<T> {
    /// The raw payload, as consumed.
    pub payload: T,
    /// Where it was consumed from (its topic is the original topic).
    pub partition: Partition,
    /// Its offset there.
    pub offset: u64,
    /// Its broker timestamp, if any.
    pub timestamp: Option<SystemTime>,
    /// Why it was found invalid.
    pub reason: String,
}

impl<T> fmt::Debug for DeadLetter<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// Sends dead letters somewhere durable (a Kafka topic, with the origin in headers).
///
/// Any `FnMut(DeadLetter<T>) -> Result<DeliveryFuture, ProduceError<DeadLetter<T>>> + Send` is
/// a `DlqProducer`.
pub trait DlqProducer<T>: Send {
    /// Enqueues one dead letter; the future resolves on the broker's delivery report.
    ///
    /// # Errors
    ///
    /// [`ProduceError::QueueFull`] hands the dead letter back to be retried later;
    /// [`ProduceError::Failed`] counts as a failed delivery attempt.
    fn produce(
        &mut self,
        dead_letter: DeadLetter<T>,
    ) -> Result<DeliveryFuture, ProduceError<DeadLetter<T>>>;
}

impl<T, F> DlqProducer<T> for F
where
    F: FnMut(DeadLetter<T>) -> Result<DeliveryFuture, ProduceError<DeadLetter<T>>> + Send,
{
    fn produce(
        &mut self,
        dead_letter: DeadLetter<T>,
    ) -> Result<DeliveryFuture, ProduceError<DeadLetter<T>>> {
        self(dead_letter)
    }
}

/// A [`DlqProducer`] that writes the raw payload to one destination with any [`Producer`].
///
/// The origin (topic, partition, offset, reason) is logged, not written: payload types that
/// can carry it (Kafka headers) deserve a producer of their own.
#[derive(Debug)]
pub struct DlqTopic<P> {
    producer: P,
    destination: Destination,
}

impl<P> DlqTopic<P> {
    /// Dead letters go to `destination` through `producer`.
    pub fn new(producer: P, destination: impl Into<Destination>) -> Self {
        Self {
            producer,
            destination: destination.into(),
        }
    }
}

impl<T, P: Producer<T>> DlqProducer<T> for DlqTopic<P> {
    fn produce(
        &mut self,
        dead_letter: DeadLetter<T>,
    ) -> Result<DeliveryFuture, ProduceError<DeadLetter<T>>> {
        let DeadLetter {
            payload,
            partition,
            offset,
            timestamp,
            reason,
        } = dead_letter;
        tracing::info!(%partition, offset, %reason, "Dead-lettering invalid message.");
        self.producer
            .produce(&self.destination, payload)
            .map_err(|error| {
                let rebuild = |payload| DeadLetter {
                    payload,
                    partition: partition.clone(),
                    offset,
                    timestamp,
                    reason: reason.clone(),
                };
                match error {
                    ProduceError::QueueFull(payload) => ProduceError::QueueFull(rebuild(payload)),
                    ProduceError::Failed { payload, source } => ProduceError::Failed {
                        payload: rebuild(payload),
                        source,
                    },
                }
            })
    }
}

/// Messages a consumer needs to see before [`DlqLimits::with_max_invalid_ratio`] applies, so one
/// early bad message does not count as a ratio of 1.
pub const RATIO_MIN_MESSAGES: u64 = 100;

/// When to stop instead of dead-lettering: a stream of nothing but bad input usually means a
/// bug or a wrong topic, not bad messages.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DlqLimits {
    max_invalid_ratio: Option<f64>,
    max_consecutive_invalid: Option<u64>,
}

impl DlqLimits {
    /// No limits: every invalid message is dead-lettered.
    pub const fn none() -> Self {
        Self {
            max_invalid_ratio: None,
            max_consecutive_invalid: None,
        }
    }

    /// Stop when more than `ratio` (0 to 1) of a partition's messages since its assignment
    /// were invalid (checked once [`RATIO_MIN_MESSAGES`] were seen).
    #[must_use]
    pub const fn with_max_invalid_ratio(mut self, ratio: f64) -> Self {
        self.max_invalid_ratio = Some(ratio);
        self
    }

    /// Stop when more than `count` invalid messages follow each other in a partition.
    #[must_use]
    pub const fn with_max_consecutive_invalid(mut self, count: u64) -> Self {
        self.max_consecutive_invalid = Some(count);
        self
    }
}

/// What the processor does with a dead letter whose every delivery attempt failed (a missing
/// or unwritable dead-letter topic, a broker away for longer than the attempts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Undeliverable {
    /// Stop with [`DlqError::DeliveryFailed`]: nothing is committed past a message that is
    /// neither processed nor dead-lettered (the default). A restart reads it again.
    #[default]
    Fail,
    /// Log it as an error, count it (`rill.dlq.undeliverable` and
    /// [`ProcessorStats::dead_letters_dropped`](crate::processor::ProcessorStats)) and commit
    /// past it: the invalid message is lost, the consumer goes on. For pipelines where one bad
    /// message must not stop (and, on restart, re-read and duplicate) everything else.
    CommitPast,
}

/// How the processor dead-letters invalid messages.
///
/// # Examples
///
/// ```
/// use rill::backends::local::{LocalBroker, LocalProducer};
/// use rill::dlq::{DlqLimits, DlqPolicy, DlqTopic};
/// use rill::Topic;
///
/// let broker = LocalBroker::<String>::new();
/// let dlq_topic = Topic::new("events-dlq");
/// broker.create_topic(&dlq_topic, 1);
///
/// let policy = DlqPolicy::new(DlqTopic::new(LocalProducer::new(broker), dlq_topic))
///     .with_limits(DlqLimits::none().with_max_consecutive_invalid(100))
///     .with_max_buffered_per_partition(50_000);
/// # let _ = policy;
/// ```
pub struct DlqPolicy<T> {
    producer: Box<dyn DlqProducer<T>>,
    limits: DlqLimits,
    max_buffered_per_partition: usize,
    max_attempts: u32,
    undeliverable: Undeliverable,
    clone_message: fn(&Message<T>) -> Message<T>,
}

impl<T> DlqPolicy<T> {
    /// Dead letters go to `producer`; no limits, 100 000 buffered messages per partition,
    /// three delivery attempts.
    pub fn new(producer: impl DlqProducer<T> + 'static) -> Self
    where
        T: Clone,
    {
        Self {
            producer: Box::new(producer),
            limits: DlqLimits::none(),
            max_buffered_per_partition: 100_000,
            max_attempts: 3,
            undeliverable: Undeliverable::Fail,
            clone_message: Message::clone,
        }
    }

    /// Sets the limits.
    #[must_use]
    pub const fn with_limits(mut self, limits: DlqLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Sets how many raw messages of one partition are kept, waiting for their commit. When a
    /// partition reaches it, the processor stops submitting that partition's messages
    /// (backpressure) until commits free room.
    #[must_use]
    pub const fn with_max_buffered_per_partition(mut self, count: usize) -> Self {
        self.max_buffered_per_partition = count;
        self
    }

    /// Sets how many times a delivery is attempted before the processor stops (or, with
    /// [`Undeliverable::CommitPast`], gives the dead letter up).
    #[must_use]
    pub const fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets what happens to a dead letter once its attempts ran out.
    #[must_use]
    pub const fn with_undeliverable(mut self, undeliverable: Undeliverable) -> Self {
        self.undeliverable = undeliverable;
        self
    }
}

impl<T> fmt::Debug for DlqPolicy<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DlqPolicy")
            .field("limits", &self.limits)
            .field(
                "max_buffered_per_partition",
                &self.max_buffered_per_partition,
            )
            .field("max_attempts", &self.max_attempts)
            .field("undeliverable", &self.undeliverable)
            .finish_non_exhaustive()
    }
}

/// Why dead-lettering stopped the processor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DlqError {
    /// A configured limit was exceeded.
    #[error("dead-letter limit exceeded on {partition}: {limit}")]
    LimitExceeded {
        /// The partition whose messages exceeded it.
        partition: Partition,
        /// Which limit, with the observed value.
        limit: String,
    },

    /// A step reported an invalid message the processor never submitted (or already
    /// committed), so there is nothing to dead-letter.
    #[error("invalid message at {partition}, offset {offset} is not buffered")]
    MessageNotBuffered {
        /// Partition named by the step.
        partition: Partition,
        /// Offset named by the step.
        offset: u64,
    },

    /// Every delivery attempt failed.
    #[error(
        "dead-letter delivery of {partition}, offset {offset} failed after {attempts} attempts"
    )]
    DeliveryFailed {
        /// The message's partition.
        partition: Partition,
        /// The message's offset.
        offset: u64,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: DeliveryError,
    },
}

#[derive(Debug, Default, Clone)]
struct LimitState {
    start: u64,
    last_invalid: Option<u64>,
    valid: u64,
    invalid: u64,
    consecutive: u64,
}

impl LimitState {
    /// Counts the invalid message at `offset`, and the valid ones since the previous one.
    fn record_invalid(&mut self, offset: u64) {
        // Offsets strictly between two invalid ones are the valid messages: O - L - 1.
        let valid_between = match self.last_invalid {
            Some(last) => offset.saturating_sub(last).saturating_sub(1),
            None => offset.saturating_sub(self.start),
        };
        self.valid += valid_between;
        self.invalid += 1;
        self.consecutive = if valid_between == 0 && self.last_invalid.is_some() {
            self.consecutive + 1
        } else {
            1
        };
        self.last_invalid = Some(offset);
    }

    fn check(&self, limits: &DlqLimits) -> Option<String> {
        if let Some(max) = limits.max_consecutive_invalid
            && self.consecutive > max
        {
            return Some(format!(
                "{} consecutive invalid messages (max {max})",
                self.consecutive
            ));
        }
        let seen = self.valid + self.invalid;
        if let Some(max) = limits.max_invalid_ratio
            && seen >= RATIO_MIN_MESSAGES
        {
            #[allow(clippy::cast_precision_loss)] // a ratio of counts far below 2^52
            let ratio = self.invalid as f64 / seen as f64;
            if ratio > max {
                return Some(format!("invalid ratio {ratio:.3} (max {max})"));
            }
        }
        None
    }
}

struct Outgoing<T> {
    partition: Partition,
    offset: u64,
    raw: Message<T>,
    reason: String,
    attempts: u32,
    delivery: Option<DeliveryFuture>,
}

/// The processor's dead-letter state: raw copies, deliveries in flight, limit counters.
pub(crate) struct DeadLetterQueue<T> {
    policy: DlqPolicy<T>,
    buffers: HashMap<Partition, VecDeque<Message<T>>>,
    outgoing: VecDeque<Outgoing<T>>,
    limits: HashMap<Partition, LimitState>,
    delivered: u64,
    dropped: u64,
}

impl<T> DeadLetterQueue<T> {
    pub(crate) fn new(policy: DlqPolicy<T>) -> Self {
        Self {
            policy,
            buffers: HashMap::new(),
            outgoing: VecDeque::new(),
            limits: HashMap::new(),
            delivered: 0,
            dropped: 0,
        }
    }

    /// Starts counting for a newly assigned partition.
    pub(crate) fn assign(&mut self, partition: &Partition, start: u64) {
        self.limits.insert(
            partition.clone(),
            LimitState {
                start,
                ..LimitState::default()
            },
        );
    }

    /// Forgets everything about `partition` (revoked, or rewound).
    pub(crate) fn forget(&mut self, partition: &Partition) {
        self.buffers.remove(partition);
        self.limits.remove(partition);
        self.outgoing.retain(|o| o.partition != *partition);
    }

    /// Whether another message of `partition` may be buffered.
    pub(crate) fn has_room(&self, partition: &Partition) -> bool {
        self.buffers
            .get(partition)
            .is_none_or(|b| b.len() < self.policy.max_buffered_per_partition)
    }

    /// Keeps a copy of `message` (once per offset) until its offset is committed.
    pub(crate) fn buffer(&mut self, message: &Message<T>) {
        let (Some(partition), Some(offset)) = (message.partition(), message.offset()) else {
            return;
        };
        let buffer = self.buffers.entry(partition.clone()).or_default();
        if buffer
            .back()
            .and_then(Message::offset)
            .is_some_and(|last| last >= offset)
        {
            return;
        }
        buffer.push_back((self.policy.clone_message)(message));
    }

    /// Drops copies of messages below the committed positions.
    pub(crate) fn trim(&mut self, positions: &HashMap<Partition, u64>) {
        for (partition, &position) in positions {
            if let Some(buffer) = self.buffers.get_mut(partition) {
                while buffer
                    .front()
                    .and_then(Message::offset)
                    .is_some_and(|o| o < position)
                {
                    buffer.pop_front();
                }
            }
        }
    }

    /// Starts dead-lettering the raw message at `partition` and `offset`.
    pub(crate) fn dead_letter(
        &mut self,
        partition: Partition,
        offset: u64,
        reason: String,
    ) -> Result<(), DlqError> {
        let state = self.limits.entry(partition.clone()).or_default();
        state.record_invalid(offset);
        if let Some(limit) = state.check(&self.policy.limits) {
            return Err(DlqError::LimitExceeded { partition, limit });
        }
        let raw = self
            .buffers
            .get_mut(&partition)
            .and_then(|buffer| {
                let index = buffer
                    .binary_search_by_key(&offset, |m| m.offset().unwrap_or(u64::MAX))
                    .ok()?;
                buffer.remove(index)
            })
            .ok_or_else(|| DlqError::MessageNotBuffered {
                partition: partition.clone(),
                offset,
            })?;
        self.outgoing.push_back(Outgoing {
            partition,
            offset,
            raw,
            reason,
            attempts: 0,
            delivery: None,
        });
        Ok(())
    }

    /// Sends what waits, checks deliveries, and returns the offsets now safely dead-lettered
    /// (or given up under [`Undeliverable::CommitPast`]).
    pub(crate) fn poll(&mut self) -> Result<CommitRequest, DlqError> {
        let mut done = CommitRequest::new();
        let mut index = 0;
        while index < self.outgoing.len() {
            let entry = &mut self.outgoing[index];
            let failure = if entry.delivery.is_none() {
                let dead_letter = DeadLetter {
                    payload: (self.policy.clone_message)(&entry.raw).into_payload(),
                    partition: entry.partition.clone(),
                    offset: entry.offset,
                    timestamp: entry.raw.timestamp(),
                    reason: entry.reason.clone(),
                };
                match self.policy.producer.produce(dead_letter) {
                    Ok(delivery) => {
                        entry.attempts += 1;
                        entry.delivery = Some(delivery);
                        None
                    }
                    // Full: try again on the next poll, keeping order.
                    Err(ProduceError::QueueFull(_)) => break,
                    Err(ProduceError::Failed { source, .. }) => {
                        entry.attempts += 1;
                        Some(DeliveryError::Failed(source))
                    }
                }
            } else {
                None
            };
            let failure = match (failure, entry.delivery.as_mut()) {
                (Some(failure), _) => failure,
                (None, None) => {
                    index += 1;
                    continue;
                }
                (None, Some(delivery)) => match poll_delivery(delivery) {
                    Poll::Pending => {
                        index += 1;
                        continue;
                    }
                    Poll::Ready(Ok(_)) => {
                        if let Some(delivered) = self.outgoing.remove(index) {
                            done.add(&delivered.partition, delivered.offset);
                            self.delivered += 1;
                        }
                        continue;
                    }
                    Poll::Ready(Err(error)) => {
                        entry.delivery = None;
                        error
                    }
                },
            };
            if entry.attempts < self.policy.max_attempts {
                tracing::warn!(error = %failure, attempts = entry.attempts, "Dead-letter delivery failed; retrying.");
                continue;
            }
            let error = DlqError::DeliveryFailed {
                partition: entry.partition.clone(),
                offset: entry.offset,
                attempts: entry.attempts,
                source: failure,
            };
            if self.policy.undeliverable == Undeliverable::Fail {
                return Err(error);
            }
            tracing::error!(
                error = %error_chain(&error),
                reason = %entry.reason,
                "Giving up a dead letter that could not be delivered; committing past it."
            );
            ::metrics::counter!(crate::metrics::DLQ_UNDELIVERABLE).increment(1);
            if let Some(dropped) = self.outgoing.remove(index) {
                done.add(&dropped.partition, dropped.offset);
                self.dropped += 1;
            }
        }
        Ok(done)
    }

    /// Dead letters of `partition` not yet confirmed.
    pub(crate) fn in_flight(&self, partition: &Partition) -> usize {
        self.outgoing
            .iter()
            .filter(|o| o.partition == *partition)
            .count()
    }

    /// Whether no dead letter waits for confirmation.
    pub(crate) fn is_idle(&self) -> bool {
        self.outgoing.is_empty()
    }

    /// Dead letters confirmed so far.
    pub(crate) const fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Dead letters given up so far ([`Undeliverable::CommitPast`]).
    pub(crate) const fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// `error: its source: its source…`, for one log field.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_messages_between_two_invalid_ones_are_counted_exactly() {
        // rust-arroyo counted O - L + 1 here (3 for invalid offsets 3 and 5).
        let mut state = LimitState::default();

        state.record_invalid(3);
        state.record_invalid(5);

        assert_eq!(state.valid, 3 + 1); // offsets 0, 1, 2, then 4
        assert_eq!(state.invalid, 2);
        assert_eq!(state.consecutive, 1);
    }

    #[test]
    fn consecutive_invalid_offsets_trip_the_limit() {
        let limits = DlqLimits::none().with_max_consecutive_invalid(2);
        let mut state = LimitState::default();

        state.record_invalid(0);
        state.record_invalid(1);
        assert_eq!(state.check(&limits), None);
        state.record_invalid(2);

        assert!(state.check(&limits).is_some());
    }

    #[test]
    fn the_ratio_applies_only_after_enough_messages() {
        let limits = DlqLimits::none().with_max_invalid_ratio(0.5);
        let mut state = LimitState::default();

        state.record_invalid(1);
        assert_eq!(state.check(&limits), None);
        for offset in (3..RATIO_MIN_MESSAGES * 2).step_by(2) {
            state.record_invalid(offset);
        }
        assert_eq!(state.check(&limits), None); // exactly half invalid
        state.record_invalid(RATIO_MIN_MESSAGES * 2);
        state.record_invalid(RATIO_MIN_MESSAGES * 2 + 1);

        assert!(state.check(&limits).is_some());
    }

    #[test]
    fn dead_lettering_an_unbuffered_message_is_an_error_not_a_silent_skip() {
        let mut queue = DeadLetterQueue::new(DlqPolicy::new(
            |dead: DeadLetter<u8>| -> Result<DeliveryFuture, ProduceError<DeadLetter<u8>>> {
                Err(ProduceError::QueueFull(dead))
            },
        ));
        let partition = Partition::new(crate::Topic::new("t"), 0);

        let result = queue.dead_letter(partition, 4, "bad".to_owned());

        assert!(matches!(
            result,
            Err(DlqError::MessageNotBuffered { offset: 4, .. })
        ));
    }
}
