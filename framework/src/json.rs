//! Serde JSON payloads, decoded or encoded in one call from a step's function.
//!
//! Nearly every consumer starts by parsing JSON and marking what does not parse invalid. These
//! functions have the shape of a [`RunTask`](crate::steps::RunTask) function, so that first
//! step is `RunTask::new(json::decode::<Event, _>, next)`, with the parse error as the
//! dead-letter reason.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{InvalidMessage, SubmitError};
use crate::message::Message;

/// Decodes the payload's bytes (a Kafka payload's value) as JSON into `T`, keeping the
/// message's metadata.
///
/// # Errors
///
/// [`SubmitError::InvalidMessage`] with the parse error as its reason.
///
/// # Examples
///
/// ```
/// use rill::{Message, Partition, Topic, json};
///
/// #[derive(serde::Deserialize)]
/// struct Event {
///     user: u64,
/// }
///
/// let partition = Partition::new(Topic::new("events"), 0);
/// let good = Message::broker(br#"{"user":7}"#.to_vec(), partition.clone(), 0, None);
/// let bad = Message::broker(b"{".to_vec(), partition, 1, None);
///
/// assert_eq!(json::decode::<Event, _>(good).unwrap().payload().user, 7);
/// assert!(json::decode::<Event, _>(bad).is_err());
/// ```
pub fn decode<T, B>(message: Message<B>) -> Result<Message<T>, SubmitError<B>>
where
    T: DeserializeOwned,
    B: AsRef<[u8]>,
{
    match serde_json::from_slice::<T>(message.payload().as_ref()) {
        Ok(value) => Ok(message.replace(value).0),
        Err(error) => Err(InvalidMessage::of(&message, format!("invalid JSON: {error}")).into()),
    }
}

/// Encodes the payload as JSON bytes, keeping the message's metadata.
///
/// # Errors
///
/// [`SubmitError::InvalidMessage`] for a value serde cannot write as JSON (a map whose keys
/// are not strings).
pub fn encode<T: Serialize>(message: Message<T>) -> Result<Message<Vec<u8>>, SubmitError<T>> {
    match serde_json::to_vec(message.payload()) {
        Ok(bytes) => Ok(message.replace(bytes).0),
        Err(error) => Err(InvalidMessage::of(&message, format!("not JSON: {error}")).into()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::testing::message;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Event {
        user: u64,
        name: String,
    }

    #[test]
    fn encode_then_decode_round_trips_and_keeps_the_offset() {
        let event = Event {
            user: 3,
            name: "a".to_owned(),
        };

        let encoded = encode(message(5, event)).unwrap();
        let decoded = decode::<Event, _>(encoded).unwrap();

        assert_eq!(decoded.offset(), Some(5));
        assert_eq!(decoded.payload().name, "a");
    }

    #[test]
    fn bytes_that_do_not_parse_are_invalid_with_the_parse_error() {
        let result = decode::<Event, _>(message(2, br#"{"user":"x"}"#.to_vec()));

        let Err(SubmitError::InvalidMessage(invalid)) = result else {
            panic!("expected an invalid message");
        };
        assert_eq!(invalid.offset(), Some(2));
        assert!(
            invalid.reason().starts_with("invalid JSON"),
            "{}",
            invalid.reason()
        );
    }

    #[test]
    fn a_value_json_cannot_hold_is_invalid() {
        let map = HashMap::from([((1, 2), 3)]);

        assert!(matches!(
            encode(message(0, map)),
            Err(SubmitError::InvalidMessage(_))
        ));
    }
}
