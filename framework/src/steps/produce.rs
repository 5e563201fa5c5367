//! Produce every message to a topic, forwarding it only once the broker confirmed it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use crate::backends::{
    DeliveryError, DeliveryFuture, Destination, ProduceError, Producer, poll_delivery,
};
use crate::carried_over::{CarriedOver, RETRY_INTERVAL, retry_until};
use crate::clock::{SharedClock, SystemClock, earliest};
use crate::commit::CommitRequest;
use crate::error::{StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::metrics;
use crate::strategy::ProcessingStrategy;

/// Why [`Produce`] stopped the pipeline.
#[derive(Debug, thiserror::Error)]
#[error("delivery to {destination:?} failed after {attempts} attempts")]
pub struct ProduceFailed {
    /// Where the message was going.
    pub destination: Destination,
    /// How many times it was sent.
    pub attempts: u32,
    /// The last failure.
    #[source]
    pub source: DeliveryError,
}

/// A message sent (or waiting to be sent again) and its delivery.
struct InFlight<T> {
    message: Message<T>,
    delivery: Option<DeliveryFuture>,
    attempts: u32,
    last_error: Option<DeliveryError>,
}

/// Produces each payload to `destination` and forwards the message to the next step once the
/// broker confirmed its delivery, in submission order.
///
/// A failed delivery is sent again, up to `max_attempts` times in all (default 3); then the
/// pipeline fails with [`ProduceFailed`] rather than dropping the message. A resent message
/// may land after messages submitted later.
///
/// # Backpressure
///
/// `submit` rejects when `max_in_flight` deliveries are unconfirmed (default 10 000), when a
/// confirmed message is held for a full next step, and when the producer's own queue is full
/// ([`ProduceError::QueueFull`]): a full queue is backpressure, never an error.
///
/// Payloads are cloned once per send (the original is forwarded), so they should be cheap to
/// clone (an `Arc`, `Bytes`).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::backends::local::{LocalBroker, LocalProducer};
/// use rill::steps::{CommitOffsets, Produce};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let broker = LocalBroker::new();
/// let out = Topic::new("out");
/// broker.create_topic(&out, 1);
/// let mut step = Produce::new(
///     LocalProducer::new(broker.clone()),
///     out.clone(),
///     CommitOffsets::new(Duration::ZERO),
/// );
/// let input = Partition::new(Topic::new("in"), 0);
/// step.submit(Message::broker("hello", input.clone(), 7, None)).unwrap();
///
/// let done = step.poll().unwrap().unwrap();
/// assert_eq!(done.offsets(&input), vec![7..8]);
/// assert_eq!(broker.payloads(&Partition::new(out, 0)), ["hello"]);
/// ```
pub struct Produce<P, N, T> {
    producer: P,
    destination: Destination,
    /// The destination's topic as the metrics' `topic` label, made once.
    topic_label: ::metrics::SharedString,
    max_in_flight: usize,
    max_attempts: u32,
    in_flight: VecDeque<InFlight<T>>,
    next_step: N,
    carried_over: CarriedOver<T>,
    clock: SharedClock,
    metric_name: &'static str,
}

impl<P, N, T> Produce<P, N, T> {
    /// Produces to `destination` with `producer`, in front of `next_step`.
    pub fn new(producer: P, destination: impl Into<Destination>, next_step: N) -> Self {
        let destination = destination.into();
        let topic_label = std::sync::Arc::<str>::from(destination.topic().as_str()).into();
        Self {
            producer,
            destination,
            topic_label,
            max_in_flight: 10_000,
            max_attempts: 3,
            in_flight: VecDeque::new(),
            next_step,
            carried_over: CarriedOver::new(),
            clock: SystemClock::shared(),
            metric_name: "produce",
        }
    }

    /// Names the step in its metrics' `step` label (default `produce`); they also carry the
    /// destination's `topic`.
    #[must_use]
    pub const fn with_metric_name(mut self, name: &'static str) -> Self {
        self.metric_name = name;
        self
    }

    /// Counts deliveries of `status` in the step's metric.
    fn count_deliveries(&self, status: &'static str, count: u64) {
        ::metrics::counter!(
            metrics::PRODUCE_DELIVERIES,
            "status" => status,
            metrics::STEP => self.metric_name,
            metrics::TOPIC => self.topic_label.clone()
        )
        .increment(count);
    }

    /// Sets how many deliveries may be unconfirmed at once.
    #[must_use]
    pub fn with_max_in_flight(mut self, count: usize) -> Self {
        self.max_in_flight = count.max(1);
        self
    }

    /// Sets how many times a message is sent before the pipeline fails.
    #[must_use]
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Reads time from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
}

impl<P, N, T> Produce<P, N, T>
where
    P: Producer<T>,
    N: ProcessingStrategy<T>,
    T: Clone,
{
    /// Sends what needs (re)sending, and forwards confirmed messages from the front.
    fn drive(&mut self) -> Result<(), StrategyError> {
        let mut exhausted = None;
        for (index, entry) in self.in_flight.iter_mut().enumerate() {
            if entry.delivery.is_some() {
                continue;
            }
            match self
                .producer
                .produce(&self.destination, entry.message.payload().clone())
            {
                Ok(delivery) => {
                    entry.attempts += 1;
                    entry.delivery = Some(delivery);
                }
                // Still full: the rest waits too, in order.
                Err(ProduceError::QueueFull(_)) => break,
                Err(ProduceError::Failed { source, .. }) => {
                    entry.attempts += 1;
                    entry.last_error = Some(DeliveryError::Failed(source));
                    if entry.attempts >= self.max_attempts {
                        exhausted = Some(index);
                        break;
                    }
                }
            }
        }
        if let Some(index) = exhausted {
            return Err(self.failure(index));
        }
        let mut confirmed = 0;
        let result = self.forward_confirmed(&mut confirmed);
        if confirmed > 0 {
            self.count_deliveries("ok", confirmed);
        }
        result
    }

    /// Forwards confirmed messages from the front, counting them in `confirmed`.
    fn forward_confirmed(&mut self, confirmed: &mut u64) -> Result<(), StrategyError> {
        while !self.carried_over.is_holding() {
            let Some(front) = self.in_flight.front_mut() else {
                break;
            };
            let Some(delivery) = front.delivery.as_mut() else {
                break;
            };
            match poll_delivery(delivery) {
                Poll::Pending => break,
                Poll::Ready(Ok(_)) => {
                    *confirmed += 1;
                    if let Some(done) = self.in_flight.pop_front() {
                        self.carried_over
                            .forward(&mut self.next_step, done.message)?;
                    }
                }
                Poll::Ready(Err(error)) => {
                    front.delivery = None;
                    front.last_error = Some(error);
                    if front.attempts >= self.max_attempts {
                        self.count_deliveries("failed", 1);
                        return Err(self.failure(0));
                    }
                    let attempts = front.attempts;
                    self.count_deliveries("retried", 1);
                    tracing::warn!(attempts, "Delivery failed; producing again.");
                    // Resent on the next call, keeping its place at the front.
                    break;
                }
            }
        }
        Ok(())
    }

    fn failure(&mut self, index: usize) -> StrategyError {
        let entry = self.in_flight.remove(index);
        let (attempts, source) = entry.map_or((0, DeliveryError::Canceled), |e| {
            (e.attempts, e.last_error.unwrap_or(DeliveryError::Canceled))
        });
        StrategyError::other(ProduceFailed {
            destination: self.destination.clone(),
            attempts,
            source,
        })
    }
}

impl<P, N, T> ProcessingStrategy<T> for Produce<P, N, T>
where
    P: Producer<T>,
    N: ProcessingStrategy<T>,
    T: Clone + Send,
{
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        // Forward what was confirmed before polling the next step, so it is seen this round.
        self.carried_over.retry(&mut self.next_step)?;
        self.drive()?;
        self.carried_over.poll_next(&mut self.next_step)?;
        Ok(self.carried_over.take_commit())
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        if self.carried_over.is_holding() || self.in_flight.len() >= self.max_in_flight {
            return Err(SubmitError::MessageRejected(message));
        }
        let (delivery, attempts, last_error) = match self
            .producer
            .produce(&self.destination, message.payload().clone())
        {
            Ok(delivery) => (Some(delivery), 1, None),
            Err(ProduceError::QueueFull(_)) => return Err(SubmitError::MessageRejected(message)),
            // Counted as a failed attempt: `poll` sends it again or fails the pipeline.
            Err(ProduceError::Failed { source, .. }) => {
                (None, 1, Some(DeliveryError::Failed(source)))
            }
        };
        self.in_flight.push_back(InFlight {
            message,
            delivery,
            attempts,
            last_error,
        });
        Ok(())
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        let clock = Arc::clone(&self.clock);
        let confirmed = retry_until(&*clock, deadline, || {
            self.carried_over.poll_next(&mut self.next_step)?;
            self.drive()?;
            Ok::<_, StrategyError>(self.in_flight.is_empty())
        })?;
        if !confirmed {
            tracing::warn!(
                unconfirmed = self.in_flight.len(),
                "Join deadline passed with deliveries unconfirmed; they will be redelivered."
            );
            self.in_flight.clear();
        }
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
        self.in_flight.clear();
        self.carried_over.clear();
        self.next_step.terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Delivery reports do not wake the processor: have it look again shortly.
        let soon = (!self.in_flight.is_empty()).then(|| self.clock.now() + RETRY_INTERVAL);
        earliest(soon, self.next_step.next_deadline())
    }

    fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && !self.carried_over.is_holding() && self.next_step.is_idle()
    }
}

impl<P, N: fmt::Debug, T> fmt::Debug for Produce<P, N, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Produce")
            .field("destination", &self.destination)
            .field("in_flight", &self.in_flight.len())
            .field("next_step", &self.next_step)
            .field("holding", &self.carried_over.is_holding())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::local::{LocalBroker, LocalProducer};
    use crate::message::{Partition, Topic};
    use crate::testing::{RecordingStep, message};

    struct Fixture {
        broker: LocalBroker<u32>,
        producer: LocalProducer<u32>,
        out: Partition,
        next: RecordingStep<u32>,
    }

    impl Fixture {
        fn new() -> Self {
            let broker = LocalBroker::new();
            let topic = Topic::new("out");
            broker.create_topic(&topic, 1);
            Self {
                producer: LocalProducer::new(broker.clone()),
                broker,
                out: Partition::new(topic, 0),
                next: RecordingStep::new(),
            }
        }

        fn step(&self) -> Produce<LocalProducer<u32>, RecordingStep<u32>, u32> {
            Produce::new(self.producer.clone(), self.out.clone(), self.next.clone())
        }
    }

    #[test]
    fn forwards_only_after_delivery_is_confirmed() {
        let fixture = Fixture::new();
        fixture.producer.hold_deliveries();
        let mut step = fixture.step();
        step.submit(message(0, 1)).unwrap();

        step.poll().unwrap();
        assert!(fixture.next.payloads().is_empty());
        fixture.producer.release_deliveries();
        step.poll().unwrap();

        assert_eq!(fixture.next.payloads(), [1]);
        assert_eq!(fixture.broker.payloads(&fixture.out), [1]);
    }

    #[test]
    fn a_full_producer_queue_is_backpressure() {
        let fixture = Fixture::new();
        fixture.producer.reject_next(1);
        let mut step = fixture.step();

        let result = step.submit(message(0, 1));

        let Err(SubmitError::MessageRejected(back)) = result else {
            panic!("expected the message back");
        };
        assert_eq!(back.offset(), Some(0));
        step.submit(back).unwrap();
        step.poll().unwrap();
        assert_eq!(fixture.next.payloads(), [1]);
    }

    #[test]
    fn confirmed_messages_are_forwarded_in_submission_order() {
        let fixture = Fixture::new();
        fixture.producer.hold_deliveries();
        let mut step = fixture.step();
        for offset in 0..3 {
            step.submit(message(offset, offset as u32)).unwrap();
        }

        fixture.producer.release_deliveries();
        step.poll().unwrap();

        assert_eq!(fixture.next.payloads(), [0, 1, 2]);
    }

    #[test]
    fn a_failed_delivery_is_retried() {
        let fixture = Fixture::new();
        fixture.producer.fail_next_deliveries(2);
        let mut step = fixture.step().with_max_attempts(3);
        step.submit(message(0, 5)).unwrap();

        for _ in 0..4 {
            step.poll().unwrap();
        }

        assert_eq!(fixture.next.payloads(), [5]);
        assert_eq!(fixture.broker.payloads(&fixture.out), [5]);
    }

    #[test]
    fn delivery_failures_beyond_the_policy_fail_the_pipeline_loudly() {
        let fixture = Fixture::new();
        fixture.producer.fail_next_deliveries(3);
        let mut step = fixture.step().with_max_attempts(3);
        step.submit(message(0, 5)).unwrap();

        let error = (0..10).find_map(|_| step.poll().err());

        let Some(StrategyError::Other(error)) = error else {
            panic!("expected a failure, got {error:?}");
        };
        let failed = error.downcast_ref::<ProduceFailed>().unwrap();
        assert_eq!(failed.attempts, 3);
        assert!(fixture.next.payloads().is_empty());
    }

    #[test]
    fn a_payload_the_producer_refuses_fails_the_pipeline_after_the_retry_policy() {
        let fixture = Fixture::new();
        let unknown = Topic::new("missing");
        let mut step = Produce::new(fixture.producer.clone(), unknown, fixture.next.clone())
            .with_max_attempts(2);
        step.submit(message(0, 1)).unwrap(); // refused once: kept for another attempt

        let error = step.poll().err();

        let Some(StrategyError::Other(error)) = error else {
            panic!("expected a failure, got {error:?}");
        };
        assert_eq!(error.downcast_ref::<ProduceFailed>().unwrap().attempts, 2);
        assert!(fixture.next.payloads().is_empty());
    }

    #[test]
    fn rejects_when_too_many_deliveries_are_unconfirmed() {
        let fixture = Fixture::new();
        fixture.producer.hold_deliveries();
        let mut step = fixture.step().with_max_in_flight(1);
        step.submit(message(0, 1)).unwrap();

        let result = step.submit(message(1, 2));

        assert!(matches!(result, Err(SubmitError::MessageRejected(_))));
    }

    #[test]
    fn join_waits_for_confirmations_until_the_deadline() {
        let fixture = Fixture::new();
        fixture.producer.hold_deliveries();
        let clock = crate::clock::ManualClock::new();
        let mut step = fixture.step().with_clock(clock.shared());
        step.submit(message(0, 1)).unwrap();

        step.join(Some(
            crate::clock::Clock::now(&clock) + std::time::Duration::from_millis(10),
        ))
        .unwrap();

        // Never confirmed: never forwarded, so never committed.
        assert!(fixture.next.payloads().is_empty());
        assert!(fixture.next.joined());
    }
}
