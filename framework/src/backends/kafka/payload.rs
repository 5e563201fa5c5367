//! The payload of a Kafka message: key, value and headers, shared behind one `Arc`.
//!
//! A consumed message is copied once out of librdkafka's buffers; after that, every clone (the
//! processor keeps one for the dead-letter queue until the offset is committed) is a reference
//! count, not a copy.

use std::fmt;
use std::sync::Arc;

/// A Kafka message's key, value and headers.
///
/// # Examples
///
/// ```
/// use rill::backends::kafka::KafkaPayload;
///
/// let payload = KafkaPayload::new(None, Some(b"{}".to_vec()))
///     .with_header("origin", b"test".to_vec());
///
/// assert_eq!(payload.value(), Some(&b"{}"[..]));
/// assert_eq!(payload.header("origin"), Some(&b"test"[..]));
/// ```
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KafkaPayload(Arc<Parts>);

#[derive(Clone, PartialEq, Eq, Default)]
struct Parts {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
}

impl KafkaPayload {
    /// A payload with `key` and `value` and no headers.
    pub fn new(key: Option<Vec<u8>>, value: Option<Vec<u8>>) -> Self {
        Self(Arc::new(Parts {
            key,
            value,
            headers: Vec::new(),
        }))
    }

    /// Adds a header (headers keep their order; names may repeat, as in Kafka).
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: Vec<u8>) -> Self {
        Arc::make_mut(&mut self.0)
            .headers
            .push((name.into(), value));
        self
    }

    /// The message key.
    pub fn key(&self) -> Option<&[u8]> {
        self.0.key.as_deref()
    }

    /// The message value; `None` for a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        self.0.value.as_deref()
    }

    /// All headers as (name, value) pairs, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(header, _)| *header == name)
            .map(|(_, value)| value)
    }
}

/// The value's bytes, empty for a message without a value (a tombstone): what a codec
/// decodes.
impl AsRef<[u8]> for KafkaPayload {
    fn as_ref(&self) -> &[u8] {
        self.value().unwrap_or_default()
    }
}

// Written by hand: payload bytes never end up in logs, only their sizes.
impl fmt::Debug for KafkaPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPayload")
            .field("key_len", &self.0.key.as_ref().map(Vec::len))
            .field("value_len", &self.0.value.as_ref().map(Vec::len))
            .field("headers", &self.0.headers.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_bytes() {
        let payload = KafkaPayload::new(Some(b"k".to_vec()), Some(vec![7; 1024]));

        let clone = payload.clone();

        assert!(Arc::ptr_eq(&payload.0, &clone.0));
    }

    #[test]
    fn debug_shows_sizes_not_bytes() {
        let payload = KafkaPayload::new(None, Some(b"secret".to_vec()));

        let printed = format!("{payload:?}");

        assert!(!printed.contains("secret"));
        assert!(printed.contains("value_len: Some(6)"));
    }
}
