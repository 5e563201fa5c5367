//! `FlushStats`: the observability of one flush, gathered while it runs and emitted once.
//!
//! Keeping the counting out of the flush logic keeps `load_due_segments` readable and gives tests
//! and the replay tool one value to inspect.

use std::time::Duration;

use crate::metrics as names;

/// Counts and latencies of one `load_due_segments` call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Candidates read from the queues.
    pub candidates: usize,
    /// Candidates skipped because another flusher held their lock.
    pub lock_contention: usize,
    /// Segments returned (including empty ones).
    pub segments: usize,
    /// Spans returned.
    pub spans: usize,
    /// Bytes of the returned spans.
    pub bytes: usize,
    /// Segments with nothing left to load.
    pub empty_segments: usize,
    /// Empty segments whose keys had expired before the flush.
    pub expired_before_flush: usize,
    /// Spans ingested but not loaded.
    pub dropped_spans: u64,
    /// Time spent reading the queues.
    pub load_ids_latency: Duration,
    /// Time spent taking locks and loading segments.
    pub load_data_latency: Duration,
    /// Time spent building output spans.
    pub build_latency: Duration,
}

impl FlushStats {
    /// Emits everything as metrics, once.
    pub fn emit(&self) {
        metrics::counter!(names::LOCK_CONTENTION).increment(self.lock_contention as u64);
        metrics::counter!(names::FLUSHED_SEGMENTS).increment(self.segments as u64);
        metrics::counter!(names::FLUSHED_SPANS).increment(self.spans as u64);
        metrics::counter!(names::EMPTY_SEGMENTS).increment(self.empty_segments as u64);
        metrics::counter!(names::EXPIRED_BEFORE_FLUSH).increment(self.expired_before_flush as u64);
        metrics::counter!(names::DROPPED_SPANS).increment(self.dropped_spans);
        metrics::histogram!(names::SEGMENT_SIZE_BYTES).record(self.bytes as f64);
        metrics::histogram!(names::LOAD_IDS_LATENCY_MS).record(millis(self.load_ids_latency));
        metrics::histogram!(names::LOAD_DATA_LATENCY_MS).record(millis(self.load_data_latency));
        metrics::histogram!(names::BUILD_LATENCY_MS).record(millis(self.build_latency));
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
