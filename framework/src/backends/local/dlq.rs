//! A dead-letter queue in memory that keeps what it is sent, for tests of a consumer's
//! invalid-message handling: which messages were dead-lettered, and why.
//!
//! Writing dead letters to a topic of the [`LocalBroker`](super::LocalBroker) keeps only the
//! payloads; the origin and the reason, which a test wants to check, would be lost.

use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backends::{Delivered, DeliveryFuture, ProduceError};
use crate::dlq::{DeadLetter, DlqProducer};

/// A [`DlqProducer`] that keeps every dead letter in memory and confirms it at once; clones
/// share the same letters.
///
/// # Examples
///
/// ```
/// use rill::backends::local::{LocalBroker, LocalDlq};
/// use rill::dlq::DlqPolicy;
/// use rill::processor::StreamProcessor;
/// use rill::steps::{CommitOffsets, RunTask};
/// use rill::{InvalidMessage, Message, Partition, Topic};
///
/// let broker = LocalBroker::new();
/// let topic = Topic::new("in");
/// broker.create_topic(&topic, 1);
/// let partition = Partition::new(topic.clone(), 0);
/// broker.produce_to(&partition, "bad").unwrap();
///
/// let refuse = |m: Message<&'static str>| -> Result<Message<()>, _> {
///     Err(InvalidMessage::of(&m, "refused").into())
/// };
/// let factory = move |_: &[Partition]| {
///     RunTask::new(refuse, CommitOffsets::new(std::time::Duration::ZERO))
/// };
/// let dlq = LocalDlq::new();
/// let mut processor = StreamProcessor::new(broker.subscribe("g", &[topic]), factory)
///     .with_dlq(DlqPolicy::new(dlq.clone()));
/// while broker.committed("g", &partition) != Some(1) {
///     processor.run_once().unwrap();
/// }
///
/// let letters = dlq.dead_letters();
/// assert_eq!((letters[0].payload, letters[0].offset), ("bad", 0));
/// assert_eq!(letters[0].reason, "refused");
/// ```
pub struct LocalDlq<T> {
    letters: Arc<Mutex<Vec<DeadLetter<T>>>>,
}

impl<T> LocalDlq<T> {
    /// Keeps nothing yet.
    pub fn new() -> Self {
        Self {
            letters: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Every dead letter received, in order.
    pub fn dead_letters(&self) -> Vec<DeadLetter<T>>
    where
        T: Clone,
    {
        self.letters.lock().clone()
    }

    /// How many dead letters were received.
    pub fn len(&self) -> usize {
        self.letters.lock().len()
    }

    /// Whether none was received.
    pub fn is_empty(&self) -> bool {
        self.letters.lock().is_empty()
    }
}

impl<T> Clone for LocalDlq<T> {
    fn clone(&self) -> Self {
        Self {
            letters: Arc::clone(&self.letters),
        }
    }
}

impl<T> Default for LocalDlq<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Send> DlqProducer<T> for LocalDlq<T> {
    fn produce(
        &mut self,
        dead_letter: DeadLetter<T>,
    ) -> Result<DeliveryFuture, ProduceError<DeadLetter<T>>> {
        let mut letters = self.letters.lock();
        // Kept under the origin's partition, at its place in the list.
        let delivered = Delivered {
            partition: dead_letter.partition.clone(),
            offset: letters.len() as u64,
        };
        letters.push(dead_letter);
        Ok(Box::pin(futures::future::ready(Ok(delivered))))
    }
}

impl<T> fmt::Debug for LocalDlq<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalDlq")
            .field("dead_letters", &self.len())
            .finish()
    }
}
