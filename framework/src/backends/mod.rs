//! Broker clients: the [`Consumer`] and [`Producer`] traits the processor and steps are
//! written against, and the in-memory broker that implements them for tests and demos.
//!
//! # Consumer contract
//!
//! Assignment changes are *events* returned by [`Consumer::poll`], never callbacks: the
//! stream processor handles them in its own loop, where it can join the pipeline, commit and
//! rebuild it. A backend whose client library reports rebalances through callbacks (librdkafka)
//! records them there and returns them from the next `poll`, and it defers giving up revoked
//! partitions until [`Consumer::complete_revocation`], so the processor commits for them while
//! it still owns them. Incremental (cooperative) rebalancing is the general case: an event may
//! add or remove some partitions while others stay assigned; an eager rebalance is simply a
//! revocation of everything followed by an assignment.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::BoxError;
use crate::message::{Message, Partition};

mod group;
pub mod kafka;
pub mod local;
mod producer;

pub use group::{InitialOffset, RebalanceProtocol};
pub(crate) use producer::poll_delivery;
pub use producer::{Delivered, DeliveryError, DeliveryFuture, Destination, ProduceError, Producer};

/// Something that happened on a consumer, returned by [`Consumer::poll`].
#[derive(Debug)]
pub enum ConsumerEvent<T> {
    /// A message from an assigned, unpaused partition.
    Message(Message<T>),

    /// These partitions were added to the assignment; each maps to the offset its first
    /// message will have (the committed offset, or the reset position).
    Assigned(HashMap<Partition, u64>),

    /// These partitions are being taken away. The consumer still owns them (and may commit for
    /// them) until [`Consumer::complete_revocation`] is called.
    Revoked(Vec<Partition>),
}

/// A consumer-group member: the source of a stream processor.
///
/// Called from one thread only (the processor's loop); it need not be `Sync`.
pub trait Consumer<T> {
    /// Waits up to `timeout` for the next event; `Ok(None)` when nothing happened.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::Transient`] for a failure worth retrying (the processor logs it and
    /// polls again); any other error stops the processor.
    fn poll(&mut self, timeout: Duration) -> Result<Option<ConsumerEvent<T>>, ConsumerError>;

    /// Stops delivering messages of `partitions` (assignment events keep flowing).
    ///
    /// # Errors
    ///
    /// [`ConsumerError::UnassignedPartition`] for a partition not assigned.
    fn pause(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError>;

    /// Delivers messages of `partitions` again, from where delivery stopped.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::UnassignedPartition`] for a partition not assigned.
    fn resume(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError>;

    /// The working offsets: for each assigned partition, the offset of the next message
    /// `poll` will return.
    fn tell(&self) -> HashMap<Partition, u64>;

    /// Moves the working offsets: the next messages of these partitions start at the given
    /// offsets.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::UnassignedPartition`] for a partition not assigned.
    fn seek(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError>;

    /// Commits `positions` (for each partition, the offset of the next message to read) and
    /// returns once the broker confirmed it. Partitions not named keep their committed offset.
    ///
    /// # Errors
    ///
    /// [`ConsumerError::Transient`] if the commit cannot be made right now but may succeed
    /// later (the group is rebalancing, the coordinator moved): the processor keeps the
    /// positions and tries again. [`ConsumerError::CommitFailed`] if the broker refused for
    /// good or did not confirm in time: the processor stops.
    fn commit(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError>;

    /// Tells the consumer the processor has finished with revoked `partitions` (pipeline
    /// joined, offsets committed): it may now give them up.
    ///
    /// # Errors
    ///
    /// A broker error while giving the partitions up.
    fn complete_revocation(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError>;

    /// How the group moves partitions on a rebalance. With
    /// [`Cooperative`](RebalanceProtocol::Cooperative), the processor keeps its pipeline
    /// running for the partitions that stay and hands a revoked one over once its work is done
    /// (see the [processor](crate::processor::StreamProcessor)'s docs). The default,
    /// [`Eager`](RebalanceProtocol::Eager), makes it join and rebuild the pipeline on every
    /// assignment change, which suits any consumer.
    fn rebalance_protocol(&self) -> RebalanceProtocol {
        RebalanceProtocol::Eager
    }

    /// Leaves the consumer group; called once, after the final commit, when the processor
    /// stops. No event is handled after it.
    ///
    /// # Errors
    ///
    /// A broker error while leaving.
    fn close(&mut self) -> Result<(), ConsumerError>;
}

/// Errors of a [`Consumer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The partition is not assigned to this consumer.
    #[error("partition {0} is not assigned")]
    UnassignedPartition(Partition),

    /// The requested offset does not exist in the partition.
    #[error("offset {offset} is out of range for {partition}")]
    OffsetOutOfRange {
        /// The partition.
        partition: Partition,
        /// The offset asked for.
        offset: u64,
    },

    /// The consumer was closed.
    #[error("consumer is closed")]
    Closed,

    /// A commit was refused or not confirmed.
    #[error("offset commit failed")]
    CommitFailed(#[source] BoxError),

    /// A failure worth retrying (a transport hiccup); the processor polls again.
    #[error("transient consumer error")]
    Transient(#[source] BoxError),

    /// Any other broker or client failure.
    #[error("consumer failed")]
    Broker(#[source] BoxError),
}
