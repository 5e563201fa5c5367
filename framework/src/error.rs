//! Error types shared by all steps.

use std::fmt;

use crate::commit::CommitRequest;
use crate::message::{Message, Partition};

/// A type-erased error, for failures the framework only reports. `Send + Sync + 'static`, so
/// it crosses threads.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why [`ProcessingStrategy::submit`](crate::ProcessingStrategy::submit) did not take a message.
#[derive(thiserror::Error)]
pub enum SubmitError<T> {
    /// The step is at capacity. The message is handed back unchanged: keep polling and submit
    /// it again later.
    #[error("step is at capacity")]
    MessageRejected(Message<T>),

    /// The message can never be processed and should go to the dead-letter queue.
    #[error(transparent)]
    InvalidMessage(#[from] InvalidMessage),
}

impl<T> SubmitError<T> {
    /// Maps the payload type of a rejected message, keeping an invalid-message error as is.
    pub fn map_rejected<U>(self, f: impl FnOnce(Message<T>) -> Message<U>) -> SubmitError<U> {
        match self {
            Self::MessageRejected(message) => SubmitError::MessageRejected(f(message)),
            Self::InvalidMessage(invalid) => SubmitError::InvalidMessage(invalid),
        }
    }
}

// Written by hand so that `T` need not be `Debug` and payloads never end up in logs.
impl<T> fmt::Debug for SubmitError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MessageRejected(message) => {
                f.debug_tuple("MessageRejected").field(message).finish()
            }
            Self::InvalidMessage(invalid) => {
                f.debug_tuple("InvalidMessage").field(invalid).finish()
            }
        }
    }
}

/// A message that can never be processed, identified by where it came from.
///
/// Made by [`InvalidMessage::of`] from any message, in one call. For a broker message the
/// stream processor looks the raw message up by partition and offset and sends it to the
/// dead-letter queue; its offset becomes committable once that delivery is confirmed. A
/// derived message (a batch, an unfolded part) stands for the offsets it carries: each of
/// those raw messages is dead-lettered with the same reason. A part that carries no offsets
/// (every part of an unfolded message but its last) is counted and logged, and its work is
/// done: the message it came from is still committed through its last part.
///
/// # Examples
///
/// ```
/// use rill::{InvalidMessage, Message, Partition, Topic};
///
/// let message = Message::broker("not json", Partition::new(Topic::new("in"), 0), 7, None);
/// let invalid = InvalidMessage::of(&message, "expected a json object");
///
/// assert_eq!(invalid.offset(), Some(7));
/// assert_eq!(invalid.to_string(), "invalid message at in/0, offset 7: expected a json object");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid message {origin}: {reason}")]
pub struct InvalidMessage {
    origin: Origin,
    reason: String,
}

/// Where an invalid message came from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    Broker { partition: Partition, offset: u64 },
    Derived(CommitRequest),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Broker { partition, offset } => write!(f, "at {partition}, offset {offset}"),
            Self::Derived(offsets) if offsets.is_empty() => {
                f.write_str("derived from others, with no offsets of its own")
            }
            Self::Derived(offsets) => {
                f.write_str("derived from")?;
                for (index, (partition, set)) in offsets.iter().enumerate() {
                    let separator = if index == 0 { " " } else { ", " };
                    write!(f, "{separator}{partition} offsets {:?}", set.ranges())?;
                }
                Ok(())
            }
        }
    }
}

impl InvalidMessage {
    /// An invalid message at `partition` and `offset`.
    pub fn new(partition: Partition, offset: u64, reason: impl Into<String>) -> Self {
        Self {
            origin: Origin::Broker { partition, offset },
            reason: reason.into(),
        }
    }

    /// The error for `message`, whatever its kind: a broker message names its partition and
    /// offset, a derived message the offsets it carries.
    pub fn of<T>(message: &Message<T>, reason: impl Into<String>) -> Self {
        match (message.partition(), message.offset()) {
            (Some(partition), Some(offset)) => Self::new(partition.clone(), offset, reason),
            _ => Self {
                origin: Origin::Derived(message.committable()),
                reason: reason.into(),
            },
        }
    }

    /// The partition of an invalid broker message; `None` for a derived one.
    pub const fn partition(&self) -> Option<&Partition> {
        match &self.origin {
            Origin::Broker { partition, .. } => Some(partition),
            Origin::Derived(_) => None,
        }
    }

    /// The offset of an invalid broker message; `None` for a derived one.
    pub const fn offset(&self) -> Option<u64> {
        match &self.origin {
            Origin::Broker { offset, .. } => Some(*offset),
            Origin::Derived(_) => None,
        }
    }

    /// Why it cannot be processed, for logs and the dead-letter queue.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// Every raw message it stands for, as `(partition, offset)`: one for a broker message,
    /// those it carries for a derived one (possibly none).
    pub fn origins(&self) -> Vec<(Partition, u64)> {
        match &self.origin {
            Origin::Broker { partition, offset } => vec![(partition.clone(), *offset)],
            Origin::Derived(offsets) => offsets
                .iter()
                .flat_map(|(partition, set)| {
                    set.ranges()
                        .iter()
                        .flat_map(Clone::clone)
                        .map(move |offset| (partition.clone(), offset))
                })
                .collect(),
        }
    }
}

/// A failure reported by `poll` or `join`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StrategyError {
    /// A message turned out to be invalid after it was accepted (for instance by an
    /// asynchronous task); it goes to the dead-letter queue and the pipeline goes on.
    #[error(transparent)]
    InvalidMessage(#[from] InvalidMessage),

    /// Any other failure; the stream processor stops.
    #[error("step failed")]
    Other(#[source] BoxError),
}

impl StrategyError {
    /// Wraps any error as [`StrategyError::Other`].
    pub fn other(error: impl Into<BoxError>) -> Self {
        Self::Other(error.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Topic;

    #[test]
    fn errors_cross_threads() {
        fn assert_send_sync<E: Send + Sync + 'static>() {}

        assert_send_sync::<StrategyError>();
        assert_send_sync::<SubmitError<Vec<u8>>>();
    }

    #[test]
    fn rejected_message_debug_hides_the_payload() {
        let message = Message::broker("secret", Partition::new(Topic::new("t"), 0), 0, None);

        let printed = format!("{:?}", SubmitError::MessageRejected(message));

        assert!(printed.starts_with("MessageRejected"));
        assert!(!printed.contains("secret"));
    }

    #[test]
    fn a_derived_message_is_invalid_for_every_offset_it_carries() {
        let partition = Partition::new(Topic::new("t"), 1);
        let mut batch = CommitRequest::new();
        batch.add_range(&partition, 4..6);

        let invalid = InvalidMessage::of(&Message::derived((), batch), "bad batch");

        assert_eq!(invalid.offset(), None);
        assert_eq!(invalid.origins(), [(partition.clone(), 4), (partition, 5)]);
        assert_eq!(
            invalid.to_string(),
            "invalid message derived from t/1 offsets [4..6]: bad batch"
        );
    }

    #[test]
    fn a_part_without_offsets_is_invalid_for_none() {
        let invalid = InvalidMessage::of(&Message::derived((), CommitRequest::new()), "bad");

        assert!(invalid.origins().is_empty());
        assert_eq!(invalid.reason(), "bad");
    }
}
