//! Errors of the spans buffer. None of them is about one message: a bad span is rejected by
//! [`crate::span::Span::decode`] before it reaches the buffer, so these are infrastructure
//! failures the consumer retries or crashes on.

use crate::buffer::codec::DecodeError;
use crate::buffer::options::OptionsError;

/// Why a buffer operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    /// Redis did not answer or refused a command.
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    /// Redis answered something the store does not understand.
    #[error("unexpected reply to {command}: {reply}")]
    UnexpectedReply {
        /// The command.
        command: &'static str,
        /// The reply, debug-formatted.
        reply: String,
    },
    /// A stored payload batch could not be decompressed.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Payloads could not be compressed.
    #[error("failed to compress payloads")]
    Compress(#[source] std::io::Error),
    /// A Redis request task was cancelled or panicked.
    #[error("redis request task failed")]
    Interrupted(#[source] tokio::task::JoinError),
    /// The options cannot work together.
    #[error("invalid buffer options")]
    Options(#[from] OptionsError),
}

impl BufferError {
    pub(crate) fn unexpected(command: &'static str, reply: &redis::Value) -> Self {
        Self::UnexpectedReply {
            command,
            reply: format!("{reply:?}"),
        }
    }
}
