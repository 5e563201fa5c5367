//! Error types shared by all steps.

use std::fmt;

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
/// The stream processor looks the raw message up by partition and offset and sends it to the
/// dead-letter queue; its offset becomes committable once that delivery is confirmed.
///
/// # Examples
///
/// ```
/// use rill::{InvalidMessage, Message, Partition, Topic};
///
/// let message = Message::broker("not json", Partition::new(Topic::new("in"), 0), 7, None);
/// let invalid = InvalidMessage::of(&message, "expected a json object").unwrap();
///
/// assert_eq!(invalid.offset, 7);
/// assert_eq!(invalid.to_string(), "invalid message at in/0, offset 7: expected a json object");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid message at {partition}, offset {offset}: {reason}")]
pub struct InvalidMessage {
    /// Partition the message was read from.
    pub partition: Partition,
    /// Offset of the message in `partition`.
    pub offset: u64,
    /// Why it cannot be processed, for logs and the dead-letter queue.
    pub reason: String,
}

impl InvalidMessage {
    /// An invalid message at `partition` and `offset`.
    pub fn new(partition: Partition, offset: u64, reason: impl Into<String>) -> Self {
        Self {
            partition,
            offset,
            reason: reason.into(),
        }
    }

    /// The error for a broker message; `None` for a derived message, which has no single
    /// origin to dead-letter.
    pub fn of<T>(message: &Message<T>, reason: impl Into<String>) -> Option<Self> {
        let partition = message.partition()?.clone();
        let offset = message.offset()?;
        Some(Self::new(partition, offset, reason))
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
    fn derived_messages_have_no_invalid_origin() {
        let message = Message::derived((), crate::CommitRequest::new());

        assert_eq!(InvalidMessage::of(&message, "bad"), None);
    }
}
