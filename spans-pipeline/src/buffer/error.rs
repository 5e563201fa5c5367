//! Errors of the spans buffer. None of them is about one message: a bad span is rejected by
//! [`crate::span::Span::decode`] before it reaches the buffer, and a bad entry found in Redis
//! (a queue member that is not a segment key, a payload member that is not a span) is set
//! aside where it is found. What is left are infrastructure failures, and the flusher must tell
//! the ones that pass (a connection lost, a server loading, full or failing over) from the ones
//! that would fail the same way at every retry (a permission, a key of the wrong type, a
//! script error, a reply the store does not understand): [`BufferError::is_transient`].

use crate::buffer::codec::DecodeError;
use crate::buffer::options::OptionsError;

/// Server error codes of conditions that pass by themselves: retrying the same command later
/// can succeed.
const TRANSIENT_CODES: &[&str] = &[
    "OOM",
    "BUSY",
    "LOADING",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "MOVED",
    "ASK",
    "NOSCRIPT",
    "NOREPLICAS",
    "MISCONF",
];

/// Why a buffer operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BufferError {
    /// Redis did not answer or refused a command.
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    /// Redis refused one command of a batch with an error reply.
    #[error("redis refused {command}: {code} {detail}")]
    Refused {
        /// The command.
        command: &'static str,
        /// The error code (`WRONGTYPE`, `NOPERM`, `OOM`, ...).
        code: String,
        /// The rest of the error message.
        detail: String,
    },
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
    /// An error for a reply that is not what `command` should answer; an error reply becomes
    /// [`BufferError::Refused`] with its code.
    pub(crate) fn unexpected(command: &'static str, reply: &redis::Value) -> Self {
        match reply {
            redis::Value::ServerError(error) => Self::Refused {
                command,
                code: error.code().to_owned(),
                detail: error.details().unwrap_or_default().to_owned(),
            },
            other => Self::UnexpectedReply {
                command,
                reply: format!("{other:?}"),
            },
        }
    }

    /// Whether the same operation may succeed if retried later: the connection failed or
    /// timed out, or the server answered with a condition that passes (see `TRANSIENT_CODES`
    /// in this module). Everything else (`NOPERM`, `WRONGTYPE`, a script error, a reply the
    /// store does not understand, bad options) would fail again at every retry.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis(error) => match error.code() {
                Some(code) => TRANSIENT_CODES.contains(&code),
                None => !matches!(
                    error.kind(),
                    redis::ErrorKind::Parse
                        | redis::ErrorKind::AuthenticationFailed
                        | redis::ErrorKind::UnexpectedReturnType
                        | redis::ErrorKind::InvalidClientConfig
                ),
            },
            Self::Refused { code, .. } => TRANSIENT_CODES.contains(&code.as_str()),
            Self::Interrupted(_) => true,
            Self::UnexpectedReply { .. }
            | Self::Decode(_)
            | Self::Compress(_)
            | Self::Options(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> BufferError {
        let reply = redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
        BufferError::unexpected("ZRANGEBYSCORE", &reply)
    }

    #[test]
    fn tells_conditions_that_pass_from_ones_that_repeat() {
        for line in [
            "OOM command not allowed when used memory > 'maxmemory'.",
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script.",
            "CLUSTERDOWN The cluster is down",
        ] {
            assert!(refused(line).is_transient(), "{line}");
        }
        for line in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOPERM User flusher has no permissions to run the 'zrangebyscore' command",
            "ERR user_script:1: Script attempted to access nonexistent global variable 'x'",
        ] {
            let error = refused(line);
            assert!(!error.is_transient(), "{line}");
            assert!(matches!(error, BufferError::Refused { .. }), "{error:?}");
        }
        let error = BufferError::unexpected("ZRANGEBYSCORE", &redis::Value::Int(1));
        assert!(matches!(error, BufferError::UnexpectedReply { .. }));
        assert!(!error.is_transient());
    }
}
