//! The first step of the consumer: validate each Kafka message as a span, and decide whether
//! the kill-switch drops it.
//!
//! Validation happens here, one message at a time, because this is the last place where a bad
//! message can be named by its own partition and offset: an invalid span goes to the
//! dead-letter queue with the field that is wrong, and the pipeline goes on. What travels on is
//! the raw message (shared, not copied), the two facts the batch step needs, and where the
//! span's fields sit in the bytes ([`SpanLayout`]), so the buffer rebuilds the span without
//! parsing the message a second time.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use rill::backends::kafka::KafkaPayload;
use rill::{InvalidMessage, Message, SubmitError};

use crate::span::{Span, SpanLayout};

/// A validated span message on its way to the buffer.
#[derive(Clone, Debug)]
pub struct SpanMessage {
    /// The raw Kafka message.
    pub payload: KafkaPayload,
    /// Kafka partition it was read from: its flush queue shard.
    pub partition: u16,
    /// Broker timestamp (LogAppendTime), whole seconds: the buffer's clock.
    pub timestamp_secs: i64,
    /// Whether the kill-switch drops it (the `Filter` after this step removes it).
    pub killed: bool,
    /// Where the decoded fields sit in the bytes; `None` when an id had escapes.
    pub layout: Option<SpanLayout>,
}

impl SpanMessage {
    /// The span, rebuilt from its layout, or decoded again when it has none.
    pub fn span(&self) -> Result<Span<'_>, crate::span::SpanError> {
        let value = self.payload.value().unwrap_or_default();
        match self
            .layout
            .as_ref()
            .and_then(|layout| layout.span(value, self.partition))
        {
            Some(span) => Ok(span),
            None => Span::decode(value, self.partition),
        }
    }
}

/// Spans to drop at the consumer (`spans.drop-in-buffer`): any match on organization,
/// project, trace or partition drops the span.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KillSwitch {
    /// Organization ids.
    pub organizations: HashSet<u64>,
    /// Project ids.
    pub projects: HashSet<u64>,
    /// Trace ids.
    pub traces: HashSet<String>,
    /// Kafka partition indexes.
    pub partitions: HashSet<u16>,
}

impl KillSwitch {
    /// Whether `span` is to be dropped.
    pub fn matches(&self, span: &Span<'_>) -> bool {
        self.organizations.contains(&span.organization_id)
            || self.projects.contains(&span.project_id)
            || self.partitions.contains(&span.partition)
            || (!self.traces.is_empty() && self.traces.contains(span.trace_id.as_ref()))
    }

    fn is_empty(&self) -> bool {
        self.organizations.is_empty()
            && self.projects.is_empty()
            && self.traces.is_empty()
            && self.partitions.is_empty()
    }
}

/// A kill-switch that can be replaced while the consumer runs (configuration reload).
#[derive(Clone, Debug, Default)]
pub struct KillSwitchHandle(Arc<RwLock<KillSwitch>>);

impl KillSwitchHandle {
    /// A handle holding `kill_switch`.
    pub fn new(kill_switch: KillSwitch) -> Self {
        Self(Arc::new(RwLock::new(kill_switch)))
    }

    /// Replaces the kill-switch; spans decoded from now on use the new one.
    pub fn replace(&self, kill_switch: KillSwitch) {
        let mut current = self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = kill_switch;
    }

    fn matches(&self, span: &Span<'_>) -> bool {
        let current = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        !current.is_empty() && current.matches(span)
    }
}

/// Validates `message` as a span: the function of the consumer's first `RunTask`.
///
/// # Errors
///
/// [`SubmitError::InvalidMessage`] naming the partition, offset and the wrong field, for a
/// message that is not a valid span (it goes to the dead-letter queue).
pub fn decode_span(
    kill_switch: &KillSwitchHandle,
    message: Message<KafkaPayload>,
) -> Result<Message<SpanMessage>, SubmitError<KafkaPayload>> {
    let invalid = |message: &Message<KafkaPayload>, reason: String| {
        SubmitError::InvalidMessage(InvalidMessage::of(message, reason))
    };
    let Some(partition) = message.partition().map(|p| u16::try_from(p.index())) else {
        // A derived message never reaches the first step; refuse it rather than guess.
        return Err(invalid(&message, "not a broker message".to_owned()));
    };
    let Ok(partition) = partition else {
        return Err(invalid(&message, "partition index above 65535".to_owned()));
    };
    let (killed, layout) = {
        let value = message.payload().value().unwrap_or_default();
        match Span::decode(value, partition) {
            Ok(span) => (kill_switch.matches(&span), SpanLayout::of(&span)),
            Err(error) => {
                return Err(invalid(&message, error.to_string()));
            }
        }
    };
    let timestamp_secs = seconds(message.timestamp().unwrap_or_else(SystemTime::now));
    Ok(message.map(|payload| SpanMessage {
        payload,
        partition,
        timestamp_secs,
        killed,
        layout,
    }))
}

/// Whole seconds since the Unix epoch, as Sentry's `int(timestamp)`.
pub(crate) fn seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |elapsed| {
        i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rill::{Partition, Topic};

    use super::*;

    const SPAN: &str = r#"{"organization_id":1,"project_id":12,"trace_id":"b5a1e4b5d4c64e9c9e2a5d1c3f2e4d6a","span_id":"aaaaaaaaaaaaaaaa","start_timestamp":1.0,"end_timestamp":2.0,"received":2.0,"retention_days":90,"status":"ok","name":"x"}"#;

    fn message(value: &str, partition: u32, offset: u64) -> Message<KafkaPayload> {
        Message::broker(
            KafkaPayload::new(None, Some(value.as_bytes().to_vec())),
            Partition::new(Topic::new("ingest-spans"), partition),
            offset,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_900)),
        )
    }

    #[test]
    fn a_valid_span_keeps_its_bytes_partition_and_broker_second() {
        let decoded = decode_span(&KillSwitchHandle::default(), message(SPAN, 3, 7)).unwrap();

        assert_eq!(decoded.payload().payload.value(), Some(SPAN.as_bytes()));
        assert_eq!(decoded.payload().partition, 3);
        assert_eq!(decoded.payload().timestamp_secs, 1_700_000_000);
        assert!(!decoded.payload().killed);
        assert_eq!(decoded.offset(), Some(7));
    }

    #[test]
    fn an_invalid_span_names_the_field_partition_and_offset() {
        let broken = SPAN.replace(r#""span_id":"aaaaaaaaaaaaaaaa""#, r#""span_id":null"#);

        let error = decode_span(&KillSwitchHandle::default(), message(&broken, 2, 9)).unwrap_err();

        let SubmitError::InvalidMessage(invalid) = error else {
            panic!("expected an invalid message");
        };
        assert_eq!(invalid.offset(), Some(9));
        assert_eq!(invalid.partition().map(Partition::index), Some(2));
        assert!(invalid.reason().contains("span_id"), "{}", invalid.reason());
    }

    #[test]
    fn bytes_that_are_not_json_are_invalid() {
        let error = decode_span(&KillSwitchHandle::default(), message("\u{0}\u{1}", 0, 0));

        assert!(matches!(error, Err(SubmitError::InvalidMessage(_))));
    }

    #[test]
    fn the_kill_switch_marks_matching_projects_and_can_be_replaced() {
        let handle = KillSwitchHandle::new(KillSwitch {
            projects: HashSet::from([12]),
            ..KillSwitch::default()
        });

        let killed = decode_span(&handle, message(SPAN, 0, 0)).unwrap();
        handle.replace(KillSwitch {
            traces: HashSet::from(["other".to_owned()]),
            ..KillSwitch::default()
        });
        let kept = decode_span(&handle, message(SPAN, 0, 1)).unwrap();

        assert!(killed.payload().killed);
        assert!(!kept.payload().killed);
    }

    #[test]
    fn the_kill_switch_matches_partitions_and_organizations() {
        let by_partition = KillSwitchHandle::new(KillSwitch {
            partitions: HashSet::from([5]),
            ..KillSwitch::default()
        });
        let by_organization = KillSwitchHandle::new(KillSwitch {
            organizations: HashSet::from([1]),
            ..KillSwitch::default()
        });

        assert!(
            decode_span(&by_partition, message(SPAN, 5, 0))
                .unwrap()
                .payload()
                .killed
        );
        assert!(
            !decode_span(&by_partition, message(SPAN, 4, 0))
                .unwrap()
                .payload()
                .killed
        );
        assert!(
            decode_span(&by_organization, message(SPAN, 0, 0))
                .unwrap()
                .payload()
                .killed
        );
    }
}
