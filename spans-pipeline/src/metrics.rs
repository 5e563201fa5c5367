//! Metric names, in one place. They follow Sentry's names so dashboards carry over.

/// Spans received by `process_spans`.
pub const PROCESS_SPANS: &str = "spans.buffer.process_spans.count_spans";
/// Subsegments (script calls) written per batch.
pub const PROCESS_SUBSEGMENTS: &str = "spans.buffer.process_spans.num_subsegments";
/// Sampled script latency in microseconds.
pub const EVALSHA_LATENCY_US: &str = "spans.buffer.process_spans.evalsha_latency_us";
/// Sampled redirect depth.
pub const REDIRECT_DEPTH: &str = "spans.buffer.redirect_depth";
/// Sampled subsegments detached because the segment was too large.
pub const DETACHED_TOO_LARGE: &str = "spans.buffer.detached_segment_too_large";
/// Sampled subsegments detached because the segment was flush-locked.
pub const DETACHED_LOCKED: &str = "spans.buffer.detached_segment_locked";
/// Sampled subsegments written again (a retry or a replay) and not counted a second time.
pub const ALREADY_COUNTED: &str = "spans.buffer.subsegment_already_counted";
/// Candidates whose flush lock was held by someone else.
pub const LOCK_CONTENTION: &str = "spans.buffer.flush_segments.lock_contention";
/// Segments flushed.
pub const FLUSHED_SEGMENTS: &str = "spans.buffer.flush_segments.num_segments";
/// Spans flushed.
pub const FLUSHED_SPANS: &str = "spans.buffer.flush_segments.num_spans";
/// Bytes of flushed spans.
pub const SEGMENT_SIZE_BYTES: &str = "spans.buffer.segment_size_bytes";
/// Segments that had nothing left to load.
pub const EMPTY_SEGMENTS: &str = "spans.buffer.empty_segments";
/// Segments whose keys expired before they were flushed.
pub const EXPIRED_BEFORE_FLUSH: &str = "spans.buffer.segment_expired_before_flush";
/// Spans ingested but not loaded at flush.
pub const DROPPED_SPANS: &str = "spans.buffer.flush_segments.dropped_spans";
/// Time to read flush candidates, in milliseconds.
pub const LOAD_IDS_LATENCY_MS: &str = "spans.buffer.flush_segments.load_ids_latency_ms";
/// Time to load segment data, in milliseconds.
pub const LOAD_DATA_LATENCY_MS: &str = "spans.buffer.flush_segments.load_data_latency_ms";
/// Time to build output spans, in milliseconds.
pub const BUILD_LATENCY_MS: &str = "spans.buffer.flush_segments.build_latency_ms";

/// Batches whose write to Redis failed (they are retried).
pub const PROCESS_FAILURES: &str = "spans.buffer.process_spans.redis_failures";
/// Flush workers found dead or hung and replaced (tags `cause`, `shard`).
pub const FLUSHER_UNHEALTHY: &str = "spans.buffer.flusher_unhealthy";
/// Submissions rejected because a flush worker lags behind.
pub const FLUSHER_BACKPRESSURE: &str = "spans.buffer.flusher.backpressure";
/// Submissions rejected because Redis memory is above the limit.
pub const FLUSHER_HARD_BACKPRESSURE: &str = "spans.buffer.flusher.hard_backpressure";
/// Flushed messages produced (tag `status`: `ok`, `failed`).
pub const FLUSHER_PRODUCE: &str = "spans.buffer.flusher.produce";
/// Seconds a flush waited for its deliveries.
pub const FLUSHER_WAIT_PRODUCE_SECONDS: &str = "spans.buffer.flusher.wait_produce";
/// Spans of segments given up because they could not be produced.
pub const FLUSHER_PRODUCE_FAILED_SPANS: &str = "spans.buffer.flusher.produce_failed_spans";
/// Flush queue members removed because they are not segment keys (tag `queue`).
pub const BAD_QUEUE_ENTRIES: &str = "spans.buffer.flusher.bad_queue_entries";
/// Stored payloads dropped at flush because they are not spans (not a JSON object, or a
/// zstd frame that does not decompress).
pub const INVALID_PAYLOADS: &str = "spans.buffer.flusher.invalid_payloads";
/// Flushed segments left in Redis at cleanup because their flush lock expired or was taken
/// over (they are flushed again: duplicates, not losses).
pub const FLUSH_LOCKS_LOST: &str = "spans.buffer.flusher.flush_locks_lost";
/// Messages sent again as two halves after one was refused for its size.
pub const FLUSHER_SPLIT_MESSAGES: &str = "spans.buffer.flusher.split_messages";
/// Flush worker errors (tag `phase`: `flush`, `done`).
pub const FLUSHER_ERRORS: &str = "spans.buffer.flusher.errors";
/// Redis used/available memory ratio, summed over every master.
pub const REDIS_MEMORY_RATIO: &str = "spans.buffer.redis_memory_ratio";
/// Outcome records written (tag `reason`).
pub const OUTCOMES: &str = "spans.buffer.outcomes";
/// Segments waiting in each flush queue (tag `shard`), sampled once a second per worker.
pub const STORED_SEGMENTS: &str = "spans.buffer.stored_segments";
/// Seconds the worker's clock is past the earliest deadline of each flush queue (tag
/// `shard`), 0 when nothing is due: how far the flush is behind. Sampled with
/// [`STORED_SEGMENTS`].
pub const FLUSH_LAG_SECONDS: &str = "spans.buffer.flush_lag_seconds";
/// Spans per batch written by `process_spans`.
pub const PROCESS_BATCH_SPANS: &str = "spans.buffer.process_spans.batch_spans";

/// Counters of the consumer and of `rill`, each with the label values it can take: those the
/// dashboard (`dashboards/spans-pipeline.json`) queries and those of rare events an alert may
/// watch. [`register`] starts them at zero.
const COUNTERS: &[(&str, &[(&str, &str)])] = &[
    (PROCESS_SPANS, &[]),
    (PROCESS_FAILURES, &[]),
    (FLUSHED_SEGMENTS, &[]),
    (FLUSHED_SPANS, &[]),
    (DROPPED_SPANS, &[]),
    (EXPIRED_BEFORE_FLUSH, &[]),
    (EMPTY_SEGMENTS, &[]),
    (LOCK_CONTENTION, &[]),
    (FLUSHER_BACKPRESSURE, &[]),
    (FLUSHER_HARD_BACKPRESSURE, &[]),
    (FLUSHER_PRODUCE, &[("status", "ok")]),
    (FLUSHER_PRODUCE, &[("status", "failed")]),
    (FLUSHER_PRODUCE_FAILED_SPANS, &[]),
    (FLUSHER_ERRORS, &[("phase", "flush")]),
    (FLUSHER_ERRORS, &[("phase", "done")]),
    (INVALID_PAYLOADS, &[]),
    (FLUSH_LOCKS_LOST, &[]),
    (OUTCOMES, &[("reason", crate::consumer::PRODUCE_FAILED)]),
    (OUTCOMES, &[("reason", crate::buffer::SEGMENT_TOO_LARGE)]),
    (OUTCOMES, &[("reason", crate::buffer::INVALID_PAYLOAD)]),
    (ALREADY_COUNTED, &[]),
    (FLUSHER_SPLIT_MESSAGES, &[]),
    (rill::metrics::MESSAGES_POLLED, &[]),
    (rill::metrics::MESSAGES_REJECTED, &[]),
    (rill::metrics::PAUSES, &[]),
    (rill::metrics::COMMITS, &[]),
    (rill::metrics::COMMIT_FAILURES, &[]),
    (
        rill::metrics::INVALID_MESSAGES,
        &[("outcome", "dead_lettered")],
    ),
    (rill::metrics::INVALID_MESSAGES, &[("outcome", "skipped")]),
    (rill::metrics::DLQ_UNDELIVERABLE, &[]),
];

/// Starts every counter the dashboard queries at zero, so a counter of a rare event (a pause,
/// a dead letter, a lost span) is exported before its first event: `rate()` then reads 0
/// rather than no data, and the dashboard's test can check that every series exists.
pub fn register() {
    for (name, labels) in COUNTERS {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(key, value)| metrics::Label::new(*key, *value))
            .collect();
        metrics::counter!(*name, labels).increment(0);
    }
}
