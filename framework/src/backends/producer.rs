//! The producer trait: produce returns a delivery future, or hands the payload back when full.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::error::BoxError;
use crate::message::{Partition, Topic};

/// Where to produce a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Any partition of the topic, chosen by the producer (by key, or round robin).
    Topic(Topic),
    /// One partition.
    Partition(Partition),
}

impl Destination {
    /// The topic written to.
    pub fn topic(&self) -> &Topic {
        match self {
            Self::Topic(topic) => topic,
            Self::Partition(partition) => partition.topic(),
        }
    }
}

impl From<Topic> for Destination {
    fn from(topic: Topic) -> Self {
        Self::Topic(topic)
    }
}

impl From<Partition> for Destination {
    fn from(partition: Partition) -> Self {
        Self::Partition(partition)
    }
}

/// Where a produced message landed, from the broker's delivery report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The partition written to.
    pub partition: Partition,
    /// The message's offset in it.
    pub offset: u64,
}

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The broker reported a failure for this message.
    #[error("delivery failed")]
    Failed(#[source] BoxError),

    /// The producer went away before reporting.
    #[error("delivery report lost: producer dropped")]
    Canceled,
}

/// Resolves when the broker confirms (or refuses) one message.
///
/// # Polling contract
///
/// The future must complete on its own, driven by the client's I/O thread (librdkafka's
/// delivery reports, the in-memory broker's channel), not by the executor polling it:
/// the `Produce` step polls it from the consumer loop with a no-op waker.
pub type DeliveryFuture = Pin<Box<dyn Future<Output = Result<Delivered, DeliveryError>> + Send>>;

/// Why [`Producer::produce`] did not take a payload; the payload is handed back either way.
#[derive(thiserror::Error)]
pub enum ProduceError<T> {
    /// The producer's local queue is full: backpressure, try again later.
    #[error("producer queue is full")]
    QueueFull(T),

    /// The producer cannot take this payload (closed, payload too large, unknown topic).
    #[error("produce failed")]
    Failed {
        /// The payload, handed back.
        payload: T,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

// Written by hand so that `T` need not be `Debug` and payloads never end up in logs.
impl<T> fmt::Debug for ProduceError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::QueueFull(_) => f.write_str("QueueFull(..)"),
            Self::Failed { source, .. } => f
                .debug_struct("Failed")
                .field("source", source)
                .finish_non_exhaustive(),
        }
    }
}

/// A client that writes payloads to a broker, asynchronously.
///
/// `produce` only enqueues; the returned [`DeliveryFuture`] resolves on the broker's
/// delivery report. Work built on it is durable only once that future resolves to `Ok`.
pub trait Producer<T>: Send + Sync {
    /// Enqueues `payload` for `destination`.
    ///
    /// # Errors
    ///
    /// [`ProduceError::QueueFull`] when the local queue is full (backpressure, not a failure);
    /// [`ProduceError::Failed`] when the payload can never be enqueued.
    fn produce(
        &self,
        destination: &Destination,
        payload: T,
    ) -> Result<DeliveryFuture, ProduceError<T>>;
}

impl<T, P: Producer<T> + ?Sized> Producer<T> for std::sync::Arc<P> {
    fn produce(
        &self,
        destination: &Destination,
        payload: T,
    ) -> Result<DeliveryFuture, ProduceError<T>> {
        (**self).produce(destination, payload)
    }
}

/// Polls a delivery once, without an executor (see the polling contract of [`DeliveryFuture`]).
pub(crate) fn poll_delivery(
    delivery: &mut DeliveryFuture,
) -> std::task::Poll<Result<Delivered, DeliveryError>> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    delivery.as_mut().poll(&mut context)
}
