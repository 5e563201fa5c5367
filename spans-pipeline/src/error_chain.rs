//! Logs an error with its causes.
//!
//! The buffer's errors say what failed ("redis command failed") and keep the cause as their
//! `source`; a log line of the top-level message alone would hide whether Redis timed out,
//! refused a script or dropped the connection.

use std::fmt;

/// Displays `outer: cause: root cause`.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn every_cause_is_shown_in_order() {
        let error = Outer(std::io::Error::other("timed out"));

        assert_eq!(ErrorChain(&error).to_string(), "outer: timed out");
    }
}
