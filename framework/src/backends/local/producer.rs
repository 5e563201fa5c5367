//! A producer writing to the in-memory broker, with injectable faults.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use futures::channel::oneshot;
use parking_lot::Mutex;

use super::broker::LocalBroker;
#[cfg(test)]
use crate::backends::poll_delivery;
use crate::backends::{
    Delivered, DeliveryError, DeliveryFuture, Destination, ProduceError, Producer,
};
use crate::message::Partition;

struct Held<T> {
    partition: Partition,
    payload: T,
    reply: oneshot::Sender<Result<Delivered, DeliveryError>>,
}

struct State<T> {
    next_partition: usize,
    holding: bool,
    held: VecDeque<Held<T>>,
    capacity: usize,
    fail_next: usize,
    queue_full_next: usize,
}

/// A [`Producer`] writing to a [`LocalBroker`]; clones share the same queue and faults.
///
/// By default a payload is written and confirmed at once. Tests can hold deliveries back
/// ([`hold_deliveries`](Self::hold_deliveries)), let the queue fill up (then `produce` returns
/// [`ProduceError::QueueFull`]), and fail deliveries.
///
/// # Examples
///
/// ```
/// use futures::executor::block_on;
/// use rill::backends::local::{LocalBroker, LocalProducer};
/// use rill::{Destination, Partition, Producer, Topic};
///
/// let broker = LocalBroker::new();
/// let topic = Topic::new("out");
/// broker.create_topic(&topic, 1);
/// let producer = LocalProducer::new(broker.clone());
///
/// let delivery = producer.produce(&Destination::Topic(topic.clone()), "x").unwrap();
///
/// assert_eq!(block_on(delivery).unwrap().offset, 0);
/// assert_eq!(broker.payloads(&Partition::new(topic, 0)), ["x"]);
/// ```
pub struct LocalProducer<T> {
    broker: LocalBroker<T>,
    state: Arc<Mutex<State<T>>>,
}

impl<T> Clone for LocalProducer<T> {
    fn clone(&self) -> Self {
        Self {
            broker: self.broker.clone(),
            state: Arc::clone(&self.state),
        }
    }
}

impl<T> LocalProducer<T> {
    /// A producer that delivers at once, with room for 10 000 held deliveries.
    pub fn new(broker: LocalBroker<T>) -> Self {
        Self {
            broker,
            state: Arc::new(Mutex::new(State {
                next_partition: 0,
                holding: false,
                held: VecDeque::new(),
                capacity: 10_000,
                fail_next: 0,
                queue_full_next: 0,
            })),
        }
    }

    /// Sets how many deliveries may wait before `produce` reports a full queue.
    #[must_use]
    pub fn with_capacity(self, capacity: usize) -> Self {
        self.state.lock().capacity = capacity;
        self
    }

    /// Stops confirming deliveries: payloads queue up (unwritten) until released.
    pub fn hold_deliveries(&self) {
        self.state.lock().holding = true;
    }

    /// Writes every held payload, in order, confirms them, and delivers at once again.
    pub fn release_deliveries(&self) {
        let held: Vec<Held<T>> = {
            let mut state = self.state.lock();
            state.holding = false;
            state.held.drain(..).collect()
        };
        for held in held {
            let result = self.write(&held.partition, held.payload);
            // The receiver may be gone (an aborted step): nobody to tell then.
            let _ = held.reply.send(result);
        }
    }

    /// How many deliveries are held.
    pub fn held(&self) -> usize {
        self.state.lock().held.len()
    }

    /// Makes the next `count` deliveries fail (nothing is written).
    pub fn fail_next_deliveries(&self, count: usize) {
        self.state.lock().fail_next = count;
    }

    /// Makes the next `count` calls to `produce` report a full queue.
    pub fn reject_next(&self, count: usize) {
        self.state.lock().queue_full_next = count;
    }

    fn write(&self, partition: &Partition, payload: T) -> Result<Delivered, DeliveryError> {
        let offset = self
            .broker
            .produce_to(partition, payload)
            .map_err(|e| DeliveryError::Failed(e.into()))?;
        Ok(Delivered {
            partition: partition.clone(),
            offset,
        })
    }

    fn choose_partition(
        &self,
        destination: &Destination,
        state: &mut State<T>,
    ) -> Option<Partition> {
        match destination {
            Destination::Partition(partition) => Some(partition.clone()),
            Destination::Topic(topic) => {
                let partitions = self.broker.partitions(topic);
                if partitions.is_empty() {
                    return None;
                }
                let index = state.next_partition % partitions.len();
                state.next_partition = state.next_partition.wrapping_add(1);
                Some(partitions[index].clone())
            }
        }
    }
}

impl<T: Send + 'static> Producer<T> for LocalProducer<T> {
    fn produce(
        &self,
        destination: &Destination,
        payload: T,
    ) -> Result<DeliveryFuture, ProduceError<T>> {
        let mut state = self.state.lock();
        if state.queue_full_next > 0 {
            state.queue_full_next -= 1;
            return Err(ProduceError::QueueFull(payload));
        }
        let Some(partition) = self.choose_partition(destination, &mut state) else {
            return Err(ProduceError::Failed {
                payload,
                source: format!("unknown destination {destination:?}").into(),
            });
        };
        if state.fail_next > 0 {
            state.fail_next -= 1;
            let failure = DeliveryError::Failed("injected delivery failure".into());
            return Ok(Box::pin(futures::future::ready(Err(failure))));
        }
        if state.holding {
            if state.held.len() >= state.capacity {
                return Err(ProduceError::QueueFull(payload));
            }
            let (reply, delivery) = oneshot::channel();
            state.held.push_back(Held {
                partition,
                payload,
                reply,
            });
            return Ok(Box::pin(async move {
                delivery.await.unwrap_or(Err(DeliveryError::Canceled))
            }));
        }
        drop(state);
        let result = self.write(&partition, payload);
        Ok(Box::pin(futures::future::ready(result)))
    }
}

impl<T> fmt::Debug for LocalProducer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("LocalProducer")
            .field("holding", &state.holding)
            .field("held", &state.held.len())
            .field("capacity", &state.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use futures::executor::block_on;

    use super::*;
    use crate::message::Topic;

    fn setup(partitions: u32) -> (LocalBroker<u32>, Topic, LocalProducer<u32>) {
        let broker = LocalBroker::new();
        let topic = Topic::new("out");
        broker.create_topic(&topic, partitions);
        let producer = LocalProducer::new(broker.clone());
        (broker, topic, producer)
    }

    #[test]
    fn a_topic_destination_spreads_round_robin() {
        let (broker, topic, producer) = setup(2);
        let destination = Destination::Topic(topic.clone());

        for n in 0..4 {
            block_on(producer.produce(&destination, n).unwrap()).unwrap();
        }

        assert_eq!(broker.payloads(&Partition::new(topic.clone(), 0)), [0, 2]);
        assert_eq!(broker.payloads(&Partition::new(topic, 1)), [1, 3]);
    }

    #[test]
    fn held_deliveries_resolve_in_order_on_release() {
        let (broker, topic, producer) = setup(1);
        let destination = Destination::Partition(Partition::new(topic.clone(), 0));
        producer.hold_deliveries();
        let mut first = producer.produce(&destination, 1).unwrap();
        let second = producer.produce(&destination, 2).unwrap();

        assert!(poll_delivery(&mut first).is_pending());
        assert!(broker.payloads(&Partition::new(topic, 0)).is_empty());
        producer.release_deliveries();

        assert_eq!(block_on(first).unwrap().offset, 0);
        assert_eq!(block_on(second).unwrap().offset, 1);
    }

    #[test]
    fn a_full_queue_hands_the_payload_back() {
        let (_broker, topic, producer) = setup(1);
        let producer = producer.with_capacity(1);
        producer.hold_deliveries();
        let destination = Destination::Topic(topic);
        let _first = producer.produce(&destination, 1).unwrap();

        let result = producer.produce(&destination, 2);

        assert!(matches!(result, Err(ProduceError::QueueFull(2))));
    }

    #[test]
    fn injected_failures_write_nothing() {
        let (broker, topic, producer) = setup(1);
        producer.fail_next_deliveries(1);

        let delivery = producer
            .produce(&Destination::Topic(topic.clone()), 1)
            .unwrap();

        assert!(matches!(block_on(delivery), Err(DeliveryError::Failed(_))));
        assert!(broker.payloads(&Partition::new(topic, 0)).is_empty());
    }

    #[test]
    fn an_unknown_topic_fails_at_once() {
        let (_broker, _topic, producer) = setup(1);

        let result = producer.produce(&Destination::Topic(Topic::new("nope")), 1);

        assert!(matches!(
            result,
            Err(ProduceError::Failed { payload: 1, .. })
        ));
    }
}
