//! Messages, topics and partitions: what moves through a pipeline.
//!
//! A [`Message`] is moved by value from step to step. It is either a *broker message*, read
//! from one partition at one offset, or a *derived message* (a batch, an unfolded part) that
//! carries the offsets it makes committable once it is done. Both kinds keep their metadata
//! through [`Message::map`], [`Message::replace`] and [`Message::take`], so a step can change
//! the payload without losing track of which offsets the message stands for.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use crate::commit::CommitRequest;

/// A topic name, cheap to clone (a reference-counted string).
///
/// # Examples
///
/// ```
/// use rill::Topic;
///
/// let topic = Topic::new("events");
/// assert_eq!(topic.as_str(), "events");
/// assert_eq!(topic, Topic::from("events"));
/// ```
#[derive(Clone, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    /// Creates a topic name.
    pub fn new(name: &str) -> Self {
        Self(Arc::from(name))
    }

    /// The topic's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq for Topic {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        // Most comparisons are between clones of one name: skip the string compare then.
        Arc::ptr_eq(&self.0, &other.0) || self.0 == other.0
    }
}

impl Eq for Topic {}

impl Hash for Topic {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl From<&str> for Topic {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One partition of a topic.
///
/// # Examples
///
/// ```
/// use rill::{Partition, Topic};
///
/// let partition = Partition::new(Topic::new("events"), 3);
/// assert_eq!(partition.to_string(), "events/3");
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition {
    topic: Topic,
    index: u32,
}

impl Partition {
    /// Creates a partition reference.
    pub const fn new(topic: Topic, index: u32) -> Self {
        Self { topic, index }
    }

    /// The topic the partition belongs to.
    pub const fn topic(&self) -> &Topic {
        &self.topic
    }

    /// The partition's index within its topic.
    pub const fn index(&self) -> u32 {
        self.index
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.index)
    }
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.index)
    }
}

/// Where a message came from, or which offsets it stands for.
#[derive(Clone, Debug, PartialEq)]
enum Metadata {
    Broker {
        partition: Partition,
        offset: u64,
        timestamp: Option<SystemTime>,
    },
    Derived {
        committable: CommitRequest,
    },
}

/// A payload with the metadata that says which offsets it makes committable.
///
/// # Examples
///
/// ```
/// use rill::{Message, Partition, Topic};
///
/// let partition = Partition::new(Topic::new("events"), 0);
/// let message = Message::broker(b"{\"n\":1}".to_vec(), partition.clone(), 41, None);
///
/// let parsed = message.map(|bytes| bytes.len());
///
/// assert_eq!(*parsed.payload(), 7);
/// assert_eq!(parsed.offset(), Some(41));
/// assert_eq!(parsed.partition(), Some(&partition));
/// ```
#[derive(Clone, PartialEq)]
pub struct Message<T> {
    payload: T,
    metadata: Metadata,
}

impl<T> Message<T> {
    /// A message as read from `partition` at `offset`.
    pub const fn broker(
        payload: T,
        partition: Partition,
        offset: u64,
        timestamp: Option<SystemTime>,
    ) -> Self {
        Self {
            payload,
            metadata: Metadata::Broker {
                partition,
                offset,
                timestamp,
            },
        }
    }

    /// A message built from others (a batch, one part of an unfolded message); once it is
    /// done, the offsets in `committable` are done.
    pub const fn derived(payload: T, committable: CommitRequest) -> Self {
        Self {
            payload,
            metadata: Metadata::Derived { committable },
        }
    }

    /// The payload.
    pub const fn payload(&self) -> &T {
        &self.payload
    }

    /// The payload, mutably.
    pub const fn payload_mut(&mut self) -> &mut T {
        &mut self.payload
    }

    /// Drops the metadata and returns the payload.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// The partition of a broker message; `None` for a derived message.
    pub const fn partition(&self) -> Option<&Partition> {
        match &self.metadata {
            Metadata::Broker { partition, .. } => Some(partition),
            Metadata::Derived { .. } => None,
        }
    }

    /// The offset of a broker message; `None` for a derived message.
    pub const fn offset(&self) -> Option<u64> {
        match &self.metadata {
            Metadata::Broker { offset, .. } => Some(*offset),
            Metadata::Derived { .. } => None,
        }
    }

    /// The broker timestamp of a broker message, when the broker gave one.
    pub const fn timestamp(&self) -> Option<SystemTime> {
        match &self.metadata {
            Metadata::Broker { timestamp, .. } => *timestamp,
            Metadata::Derived { .. } => None,
        }
    }

    /// The offsets this message makes committable once it is done.
    ///
    /// A broker message stands for its own offset; a derived message for the offsets it was
    /// built with.
    pub fn committable(&self) -> CommitRequest {
        let mut request = CommitRequest::new();
        self.add_committable_to(&mut request);
        request
    }

    /// Whether this message makes any offset committable once done: false only for a derived
    /// message built with none (a part of an unfolded message other than its last), whose
    /// work is accounted for by a message after it.
    #[inline]
    pub fn carries_offsets(&self) -> bool {
        match &self.metadata {
            Metadata::Broker { .. } => true,
            Metadata::Derived { committable } => !committable.is_empty(),
        }
    }

    /// Adds the offsets this message makes committable to `request`, without allocating for
    /// a broker message.
    #[inline]
    pub fn add_committable_to(&self, request: &mut CommitRequest) {
        match &self.metadata {
            Metadata::Broker {
                partition, offset, ..
            } => request.add(partition, *offset),
            Metadata::Derived { committable } => request.merge(committable),
        }
    }

    /// Replaces the payload, keeping the metadata; returns the new message and the old payload.
    pub fn replace<U>(self, payload: U) -> (Message<U>, T) {
        (
            Message {
                payload,
                metadata: self.metadata,
            },
            self.payload,
        )
    }

    /// Splits the metadata from the payload without copying either.
    pub fn take(self) -> (Message<()>, T) {
        self.replace(())
    }

    /// Transforms the payload, keeping the metadata.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Message<U> {
        Message {
            payload: f(self.payload),
            metadata: self.metadata,
        }
    }

    /// Transforms the payload with a fallible function, keeping the metadata on success.
    ///
    /// # Errors
    ///
    /// Returns the error of `f`.
    pub fn try_map<U, E>(self, f: impl FnOnce(T) -> Result<U, E>) -> Result<Message<U>, E> {
        Ok(Message {
            payload: f(self.payload)?,
            metadata: self.metadata,
        })
    }
}

// Written by hand so that `T` need not be `Debug` and payloads never end up in logs.
impl<T> fmt::Debug for Message<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.metadata {
            Metadata::Broker {
                partition, offset, ..
            } => f
                .debug_struct("Message")
                .field("partition", partition)
                .field("offset", offset)
                .finish_non_exhaustive(),
            Metadata::Derived { committable } => f
                .debug_struct("Message")
                .field("committable", committable)
                .finish_non_exhaustive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(index: u32) -> Partition {
        Partition::new(Topic::new("t"), index)
    }

    #[test]
    fn map_keeps_partition_offset_and_timestamp() {
        let at = SystemTime::UNIX_EPOCH;
        let message = Message::broker(2_u32, partition(1), 7, Some(at));

        let mapped = message.map(|n| n.to_string());

        assert_eq!(mapped.payload(), "2");
        assert_eq!(mapped.partition(), Some(&partition(1)));
        assert_eq!(mapped.offset(), Some(7));
        assert_eq!(mapped.timestamp(), Some(at));
    }

    #[test]
    fn take_and_replace_round_trip_the_payload() {
        let message = Message::broker(vec![1_u8], partition(0), 3, None);

        let (empty, payload) = message.take();
        let (restored, ()) = empty.replace(payload);

        assert_eq!(restored.payload(), &[1]);
        assert_eq!(restored.offset(), Some(3));
    }

    #[test]
    fn broker_message_makes_its_own_offset_committable() {
        let message = Message::broker((), partition(2), 9, None);

        let committable = message.committable();

        assert_eq!(committable.offsets(&partition(2)), vec![9..10]);
    }

    #[test]
    fn derived_message_makes_its_sources_committable() {
        let mut sources = CommitRequest::new();
        sources.add(&partition(0), 4);
        sources.add(&partition(0), 5);
        let message = Message::derived("batch", sources.clone());

        assert_eq!(message.committable(), sources);
        assert_eq!(message.partition(), None);
        assert_eq!(message.offset(), None);
    }

    #[test]
    fn try_map_keeps_the_error() {
        let message = Message::broker("x", partition(0), 0, None);

        let result = message.try_map(|s| s.parse::<u32>());

        assert!(result.is_err());
    }

    #[test]
    fn debug_never_prints_the_payload() {
        let message = Message::broker("secret", partition(0), 1, None);

        let printed = format!("{message:?}");

        assert!(!printed.contains("secret"));
        assert!(printed.contains("t/0"));
    }
}
