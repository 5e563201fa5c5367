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

/// Parts of an `ERR` reply's message that mark a refusal the same command meets at every
/// retry: a script that fails, a command or argument the server does not take. `ERR` is
/// Redis' generic code, used as well for conditions that pass (`max number of clients
/// reached`, a timeout in a module), so an `ERR` reply is deterministic only when its message
/// says so; any other counts as one that passes, and the caller's backoff and health checks
/// deal with it if it does not.
const DETERMINISTIC_ERR_MESSAGES: &[&str] = &[
    "script",
    "unknown command",
    "unknown subcommand",
    "wrong number of arguments",
    "syntax error",
    "not an integer",
    "not a valid float",
    "invalid expire time",
    "cluster support disabled",
];

/// Whether a server refusal with `code` and the rest of its message `detail` may pass.
fn refusal_may_pass(code: &str, detail: &str) -> bool {
    if code == "ERR" {
        let detail = detail.to_ascii_lowercase();
        return !DETERMINISTIC_ERR_MESSAGES
            .iter()
            .any(|part| detail.contains(part));
    }
    TRANSIENT_CODES.contains(&code)
}

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
    /// in this module, and an `ERR` whose message is not one of `DETERMINISTIC_ERR_MESSAGES`).
    /// Everything else (`NOPERM`, `WRONGTYPE`, a script error, a reply the store does not
    /// understand, bad options) would fail again at every retry.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Redis(error) => match error.code() {
                Some(code) => refusal_may_pass(code, error.detail().unwrap_or_default()),
                None => !matches!(
                    error.kind(),
                    redis::ErrorKind::Parse
                        | redis::ErrorKind::AuthenticationFailed
                        | redis::ErrorKind::UnexpectedReturnType
                        | redis::ErrorKind::InvalidClientConfig
                ),
            },
            Self::Refused { code, detail, .. } => refusal_may_pass(code, detail),
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
            "ERR max number of clients reached",
        ] {
            assert!(refused(line).is_transient(), "{line}");
        }
        for line in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOPERM User flusher has no permissions to run the 'zrangebyscore' command",
            "ERR user_script:1: Script attempted to access nonexistent global variable 'x'",
            "ERR Error running script (call to f_0123): @user_script:12: bad argument",
            "ERR unknown command 'EVALSHA_RO', with args beginning with: ",
            "ERR wrong number of arguments for 'zadd' command",
        ] {
            let error = refused(line);
            assert!(!error.is_transient(), "{line}");
            assert!(matches!(error, BufferError::Refused { .. }), "{error:?}");
        }
        for line in [
            "ERR max number of clients reached",
            "ERR user_script:1: Script attempted to access nonexistent global variable 'x'",
        ] {
            let reply = redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
            let error = BufferError::Redis(reply.extract_error().unwrap_err());
            assert_eq!(
                error.is_transient(),
                line.contains("clients"),
                "{line} as a redis error"
            );
        }
        let error = BufferError::unexpected("ZRANGEBYSCORE", &redis::Value::Int(1));
        assert!(matches!(error, BufferError::UnexpectedReply { .. }));
        assert!(!error.is_transient());
    }
}
