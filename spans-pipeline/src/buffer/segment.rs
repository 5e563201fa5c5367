//! The values that travel through a flush: what the script returned for a subsegment, which
//! segments are ready, what was loaded for each, and what is produced.
//!
//! A loaded segment keeps its candidate, payloads, payload keys and ingest counters in one
//! structure, so nothing downstream pairs up parallel lists.

use crate::buffer::keys::SegmentKey;
use crate::buffer::output;

/// What `add-buffer.lua` returned for one subsegment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InsertedSubsegment {
    /// The segment the subsegment now belongs to (ends in the salt if it detached).
    pub segment_key: SegmentKey,
    /// Whether that segment has seen its root span.
    pub has_root_span: bool,
    /// The salt of the subsegment.
    pub salt: String,
    /// Kafka partition of the subsegment's first span: its flush queue shard.
    pub partition: u16,
    /// Span ids whose own segment was merged into this one (their queue entries are stale).
    pub merged_segment_span_ids: Vec<String>,
    /// Script metrics, present only when the call was sampled.
    pub sampled: Option<ScriptSample>,
}

impl InsertedSubsegment {
    /// Whether the subsegment detached into a segment of its own (its key ends in the salt).
    pub fn is_detached(&self) -> bool {
        self.segment_key.is_detached_with(&self.salt)
    }

    /// The flush queue shard.
    pub fn queue_shard(&self) -> u16 {
        self.partition
    }
}

/// Metrics a sampled script call reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScriptSample {
    /// Total script time in microseconds.
    pub latency_us: u64,
    /// Named latencies (`redirect_step_latency_us`, ...).
    pub latencies: Vec<(String, i64)>,
    /// Named metrics (`redirect_depth`, `detached_segment_too_large`, ...).
    pub metrics: Vec<(String, i64)>,
}

impl ScriptSample {
    /// The value of metric `name`, if reported.
    pub fn metric(&self, name: &str) -> Option<i64> {
        self.metrics
            .iter()
            .find(|(metric, _)| metric == name)
            .map(|(_, value)| *value)
    }
}

/// A segment whose deadline has passed, read from one flush queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushCandidate {
    /// The queue key it was read from.
    pub queue_key: String,
    /// The segment.
    pub segment_key: SegmentKey,
    /// Its deadline (queue score, Unix seconds).
    pub deadline: i64,
}

/// The ingest counters of a segment (`ic`, `ibc`); `None` when the key is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestMetadata {
    /// Spans ingested into the segment, including merged children.
    pub span_count: Option<u64>,
    /// Uncompressed payload bytes ingested.
    pub byte_count: Option<u64>,
}

/// Everything loaded for one candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedSegment {
    /// The candidate this was loaded for.
    pub candidate: FlushCandidate,
    /// The span payloads, decompressed.
    pub payloads: Vec<Vec<u8>>,
    /// The payload keys that hold them (removed in done).
    pub payload_keys: Vec<String>,
    /// The ingest counters.
    pub ingested: IngestMetadata,
    /// Stored members that looked like zstd frames but did not decompress (set aside; each
    /// held at least one span).
    pub corrupt_members: u64,
}

impl LoadedSegment {
    /// Spans ingested but not loaded (for example merged away while being flushed); these are
    /// reported as lost with reason `segment_too_large`. A corrupt member counts as one span
    /// here, since it is reported (as `invalid_payload`) on its own.
    pub fn missing_spans(&self) -> u64 {
        self.ingested
            .span_count
            .unwrap_or(0)
            .saturating_sub(self.payloads.len() as u64)
            .saturating_sub(self.corrupt_members)
    }
}

/// One span of a flushed segment, with `is_segment` and `sentry.segment.id` written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSpan {
    /// The span's id.
    pub span_id: String,
    /// The span's organization, if readable.
    pub organization_id: Option<u64>,
    /// Whether it is the segment's root.
    pub is_segment: bool,
    /// The JSON to produce.
    pub payload: Vec<u8>,
}

/// A segment ready to produce, with what done needs to clean it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushedSegment {
    /// The segment.
    pub segment_key: SegmentKey,
    /// Every queue the segment was read from in this flush (usually one).
    pub queue_keys: Vec<String>,
    /// Project of the segment.
    pub project_id: u64,
    /// Organization of the segment, from its spans (`None` if none was loaded).
    pub organization_id: Option<u64>,
    /// The spans (empty when nothing was left to load).
    pub spans: Vec<OutputSpan>,
    /// Payload keys to remove in done.
    pub payload_keys: Vec<String>,
    /// The token of the flush lock this flush holds on the segment (`None`: locks off). Done
    /// cleans up only while the lock still holds it.
    pub lock_token: Option<String>,
}

impl FlushedSegment {
    /// The messages to produce for this segment: one `{"flush_id", "spans"}` message, or, when
    /// the spans add up to more than `max_segment_bytes`, greedy chunks in order, each marked
    /// `"skip_enrichment": true`. Every message gets a fresh `flush_id`.
    pub fn to_messages(&self, max_segment_bytes: u64) -> Vec<Vec<u8>> {
        output::segment_messages(self.payloads().into_iter(), max_segment_bytes)
    }

    /// The output payloads of the spans, in order.
    pub fn payloads(&self) -> Vec<&[u8]> {
        self.spans
            .iter()
            .map(|span| span.payload.as_slice())
            .collect()
    }
}

/// Spans lost from one project in one flush, to report as an outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostSpans {
    /// Organization, when any span of the project was loaded.
    pub organization_id: Option<u64>,
    /// Project.
    pub project_id: u64,
    /// Number of spans.
    pub quantity: u64,
    /// Outcome reason: `segment_too_large`.
    pub reason: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate() -> FlushCandidate {
        FlushCandidate {
            queue_key: "span-buf:q:0".to_owned(),
            segment_key: SegmentKey::new("1:t", "root"),
            deadline: 5,
        }
    }

    #[test]
    fn an_inserted_subsegment_is_detached_when_its_key_ends_in_its_salt() {
        let mut inserted = InsertedSubsegment {
            segment_key: SegmentKey::new("1:t", "root"),
            has_root_span: true,
            salt: "salt".to_owned(),
            partition: 7,
            merged_segment_span_ids: Vec::new(),
            sampled: None,
        };
        assert!(!inserted.is_detached());
        assert_eq!(inserted.queue_shard(), 7);
        inserted.segment_key = SegmentKey::new("1:t", "salt");
        assert!(inserted.is_detached());
    }

    #[test]
    fn a_loaded_segment_counts_spans_ingested_but_not_loaded() {
        let loaded = LoadedSegment {
            candidate: candidate(),
            payloads: vec![b"{}".to_vec()],
            payload_keys: vec!["k".to_owned()],
            ingested: IngestMetadata {
                span_count: Some(3),
                byte_count: Some(90),
            },
            corrupt_members: 0,
        };
        assert_eq!(loaded.missing_spans(), 2);
        let unknown = LoadedSegment {
            ingested: IngestMetadata::default(),
            ..loaded.clone()
        };
        assert_eq!(unknown.missing_spans(), 0);
        let corrupt = LoadedSegment {
            ingested: loaded.ingested,
            corrupt_members: 1,
            ..unknown
        };
        assert_eq!(corrupt.missing_spans(), 1);
    }
}
