//! Outcome records for spans the buffer could not deliver, on an optional Kafka topic.
//!
//! Sentry accounts for dropped data with "outcomes": one JSON record per (organization,
//! project, reason) with a quantity. The flusher writes one when it gives up a segment it could
//! not produce (reason `produce_failed`) and when a flush finds fewer spans than were ingested
//! into a segment (reason `segment_too_large`, as Sentry's buffer reports it). The records
//! follow the shape of Sentry's outcomes topic: `outcome` 3 is "invalid", `category` 16 is
//! indexed spans. Without a topic configured, the same facts are logged and counted only.

use std::sync::Arc;
use std::time::SystemTime;

use rill::backends::kafka::KafkaPayload;
use rill::{Destination, Producer, Topic};

use crate::metrics as names;

/// Sentry's outcome id for data dropped as invalid.
const OUTCOME_INVALID: u8 = 3;
/// Sentry's data category of indexed spans.
const CATEGORY_SPAN_INDEXED: u8 = 16;

/// Reason of an outcome for spans of a segment that could not be produced.
pub(crate) const PRODUCE_FAILED: &str = "produce_failed";

/// Writes outcome records to a topic.
#[derive(Clone)]
pub struct Outcomes {
    producer: Arc<dyn Producer<KafkaPayload>>,
    topic: Topic,
}

impl std::fmt::Debug for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcomes")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Outcomes {
    /// Records go to `topic` through `producer`.
    pub fn new(producer: Arc<dyn Producer<KafkaPayload>>, topic: Topic) -> Self {
        Self { producer, topic }
    }

    /// Writes one record; its delivery is awaited on a task of its own, so a flush never
    /// holds its segments' locks while an outcome's delivery takes its time (up to
    /// librdkafka's `message.timeout.ms` for a topic the broker does not have). A failure is
    /// logged: outcomes are accounting, and the spans they describe are already gone. Call
    /// inside the tokio runtime.
    pub fn send(&self, organization_id: Option<u64>, project_id: u64, reason: &str, quantity: u64) {
        let body = outcome_json(
            SystemTime::now(),
            organization_id,
            project_id,
            reason,
            quantity,
        );
        let reason = reason.to_owned();
        let delivery = self.producer.produce(
            &Destination::Topic(self.topic.clone()),
            KafkaPayload::new(None, Some(body)),
        );
        tokio::spawn(async move {
            let result = match delivery {
                Ok(delivery) => delivery
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string()),
                Err(error) => Err(format!("{error:?}")),
            };
            match result {
                Ok(()) => metrics::counter!(names::OUTCOMES, "reason" => reason).increment(1),
                Err(error) => tracing::error!(
                    error,
                    project_id,
                    reason,
                    quantity,
                    "Writing an outcome record failed."
                ),
            }
        });
    }
}

/// One outcome record, as Sentry's outcomes consumers read them.
pub(crate) fn outcome_json(
    at: SystemTime,
    organization_id: Option<u64>,
    project_id: u64,
    reason: &str,
    quantity: u64,
) -> Vec<u8> {
    let organization = organization_id.map_or("null".to_owned(), |id| id.to_string());
    let reason = sonic_rs::to_string(reason).unwrap_or_else(|_| "\"unknown\"".to_owned());
    format!(
        r#"{{"timestamp":"{}","org_id":{organization},"project_id":{project_id},"key_id":null,"outcome":{OUTCOME_INVALID},"reason":{reason},"event_id":null,"category":{CATEGORY_SPAN_INDEXED},"quantity":{quantity}}}"#,
        humantime::format_rfc3339_micros(at)
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn a_record_has_sentrys_outcome_fields() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);

        let body = outcome_json(at, Some(3), 42, "segment_too_large", 7);

        assert_eq!(
            String::from_utf8(body).unwrap(),
            r#"{"timestamp":"2023-11-14T22:13:20.000000Z","org_id":3,"project_id":42,"key_id":null,"outcome":3,"reason":"segment_too_large","event_id":null,"category":16,"quantity":7}"#
        );
    }

    #[test]
    fn an_unknown_organization_is_null() {
        let body = outcome_json(UNIX_EPOCH, None, 1, PRODUCE_FAILED, 1);

        assert!(
            String::from_utf8(body)
                .unwrap()
                .contains(r#""org_id":null"#)
        );
    }
}
