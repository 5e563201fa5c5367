//! The spans buffer: assembles spans into segments in Redis and flushes finished segments.
//!
//! [`SpansBuffer`] holds the decisions (grouping a batch into subsegments, queue deadlines,
//! which segments to flush, loss accounting, building output); [`SpansBufferStore`] is the
//! only code that talks to Redis. The three phases are:
//!
//! 1. **process** ([`SpansBuffer::process_spans`]): write each subsegment's payloads, merge it
//!    into its segment with `add-buffer.lua`, push the segment's flush deadline;
//! 2. **flush** ([`SpansBuffer::load_due_segments`]): read segments whose deadline passed, lock
//!    them (optionally), load their payloads and return them ready to produce;
//! 3. **done** ([`SpansBuffer::done_flush_segments`]): after the produce succeeded, delete
//!    everything the flushed segments left in Redis.
//!
//! The data model is described in `docs/redis-data-model.md`; the choices made where Sentry's
//! behaviour is a quirk are in `docs/decisions.md`.

mod codec;
pub(crate) mod connection;
mod error;
mod inspect;
pub mod keys;
pub(crate) mod options;
pub(crate) mod output;
mod parallel;
mod script;
mod segment;
mod stats;
mod store;
mod subsegment;
mod write_order;

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use codec::PayloadEncoder;
pub use connection::RedisConnection;
pub use error::BufferError;
pub use inspect::{BufferInspector, InspectLimits, InspectProgress, InspectReport};
pub use keys::SegmentKey;
pub use options::BufferOptions;
pub use output::patch_span;
use segment::LoadedSegment;
pub use segment::{FlushCandidate, FlushedSegment, InsertedSubsegment, LostSpans, OutputSpan};
pub use stats::FlushStats;
use store::PreparedWrite;
pub use store::{QueueStats, SpansBufferStore};
pub use subsegment::{Subsegment, build_subsegments};
pub(crate) use write_order::{WriteOrder, WriteRetry};

use crate::metrics as names;
use crate::span::Span;

/// Outcome reason for spans ingested but not found at flush time.
pub const SEGMENT_TOO_LARGE: &str = "segment_too_large";

/// Outcome reason for stored payload members that are not spans (neither a zstd frame of
/// spans nor a JSON object), dropped at flush time instead of produced.
pub const INVALID_PAYLOAD: &str = "invalid_payload";

/// What one `process_spans` call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessStats {
    /// Spans processed.
    pub spans: usize,
    /// Segment spans (roots) among them.
    pub root_spans: usize,
    /// Subsegments written, i.e. script calls.
    pub subsegments: usize,
    /// Subsegments that detached into their own segment.
    pub detached: usize,
}

/// A batch encoded by [`SpansBuffer::prepare`], ready for [`SpansBuffer::write_in_order`]. It
/// owns its data (not the spans it was made from), so it can be written from another task.
#[derive(Clone, Debug)]
pub(crate) struct PreparedBatch {
    write: PreparedWrite,
    spans: usize,
    root_spans: usize,
}

/// A batch whose subsegments are in Redis, from [`SpansBuffer::write_scripts`], waiting
/// for [`SpansBuffer::queue_segments`].
#[derive(Clone, Debug)]
struct WrittenBatch {
    inserted: Vec<InsertedSubsegment>,
    spans: usize,
    root_spans: usize,
}

/// The result of one flush: segments to produce (then pass to `done_flush_segments`), spans
/// lost per project, whether a shard hit its limit, and the flush's statistics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flush {
    /// Segments, including empty ones (nothing to produce, but done must clean them up).
    pub segments: Vec<FlushedSegment>,
    /// Spans ingested but not loaded, per project.
    pub lost: Vec<LostSpans>,
    /// Whether some queue returned as many segments as the per-shard limit allows.
    pub any_shard_at_limit: bool,
    /// Observability of this flush.
    pub stats: FlushStats,
}

/// The spans buffer of one consumer (or one flusher): the shards it owns and its options.
#[derive(Debug)]
pub struct SpansBuffer {
    store: SpansBufferStore,
    assigned_shards: Vec<u16>,
    slice_id: Option<u32>,
}

impl SpansBuffer {
    /// A buffer for `assigned_shards` (Kafka partitions) and an optional Kafka slice id.
    pub async fn new(
        conn: RedisConnection,
        options: BufferOptions,
        assigned_shards: Vec<u16>,
        slice_id: Option<u32>,
    ) -> Result<Self, BufferError> {
        Ok(Self {
            store: SpansBufferStore::new(conn, options).await?,
            assigned_shards,
            slice_id,
        })
    }

    /// The store, for inspection.
    pub fn store(&self) -> &SpansBufferStore {
        &self.store
    }

    /// The options.
    pub fn options(&self) -> &BufferOptions {
        self.store.options()
    }

    /// The shards this buffer flushes.
    pub fn assigned_shards(&self) -> &[u16] {
        &self.assigned_shards
    }

    /// Replaces the shards this buffer flushes (after a rebalance).
    pub fn set_assigned_shards(&mut self, shards: Vec<u16>) {
        self.assigned_shards = shards;
    }

    /// The queue key of a shard.
    pub fn queue_key(&self, shard: u16) -> String {
        keys::queue(self.slice_id, shard)
    }

    /// Writes a batch of spans into the buffer. `now` is the batch's clock (the minimum Kafka
    /// timestamp, in seconds): segments become due `root-timeout` or `timeout` after it.
    ///
    /// This is `prepare` then `write_in_order` in an order of its own; the consumer, which
    /// encodes the next batch while this one is written, calls the two itself, with one
    /// `WriteOrder` for all its batches.
    pub async fn process_spans(
        &self,
        spans: &[Span<'_>],
        now: i64,
    ) -> Result<ProcessStats, BufferError> {
        let place = WriteOrder::new().place();
        self.write_in_order(place, self.prepare(spans), now, WriteRetry::Never)
            .await
    }

    /// Groups a batch into subsegments and encodes their commands, without touching Redis.
    ///
    /// Several batches may be prepared at once (each takes its own compressor), but they must
    /// be written in order: see [`SpansBuffer::write_in_order`].
    pub(crate) fn prepare(&self, spans: &[Span<'_>]) -> Result<PreparedBatch, BufferError> {
        let options = self.store.options();
        let subsegments = subsegment::build_subsegments(spans, options.max_spans_per_evalsha);
        let chunk_len = match options.pipeline_batch_size {
            0 => subsegments.len(),
            size => size,
        };
        Ok(PreparedBatch {
            write: self.store.prepare_write(&subsegments, chunk_len)?,
            spans: spans.len(),
            root_spans: spans.iter().filter(|span| span.is_segment_span).count(),
        })
    }

    /// The first phase of a write: the payloads. They need no order with other batches (their
    /// keys are named by this batch's salts), so they are sent as soon as the batch is
    /// prepared; Redis then has them to work on while the client reads the replies of the
    /// batch before.
    async fn write_payloads(&self, batch: &PreparedBatch) -> Result<(), BufferError> {
        self.store.write_payloads(&batch.write).await
    }

    /// The second phase: the script calls, after this batch's payloads and in batch order.
    ///
    /// The next batch's `write_scripts` may start as soon as this one returned, before this
    /// batch's [`SpansBuffer::queue_segments`]: a later batch's scripts may run before an
    /// earlier batch's queue update, as long as the queue updates run in batch order (the
    /// later one then removes what it merged away, and sets the latest deadlines).
    async fn write_scripts(&self, batch: &PreparedBatch) -> Result<WrittenBatch, BufferError> {
        Ok(WrittenBatch {
            inserted: self.store.write_scripts(&batch.write).await?,
            spans: batch.spans,
            root_spans: batch.root_spans,
        })
    }

    /// The last phase: each segment's flush deadline, in batch order.
    async fn queue_segments(
        &self,
        batch: &WrittenBatch,
        now: i64,
    ) -> Result<ProcessStats, BufferError> {
        self.store
            .update_queue(&batch.inserted, now, self.slice_id)
            .await?;
        let stats = ProcessStats {
            spans: batch.spans,
            root_spans: batch.root_spans,
            subsegments: batch.inserted.len(),
            detached: batch.inserted.iter().filter(|i| i.is_detached()).count(),
        };
        record_process_metrics(
            &stats,
            &batch.inserted,
            self.options().evalsha_latency_threshold,
        );
        Ok(stats)
    }

    /// Reads the segments of the assigned shards that are due at `now` and loads them (Sentry's
    /// `flush_segments`); [`SpansBuffer::done_flush_segments`] cleans them up once produced.
    pub async fn load_due_segments(&self, now: i64) -> Result<Flush, BufferError> {
        let mut stats = FlushStats::default();
        if self.assigned_shards.is_empty() {
            return Ok(Flush::default());
        }
        let options = self.store.options();
        let limit = options
            .max_flush_segments
            .div_ceil(self.assigned_shards.len())
            .max(1);
        let queues: Vec<String> = self
            .assigned_shards
            .iter()
            .map(|&shard| self.queue_key(shard))
            .collect();

        let started = Instant::now();
        let per_queue = self
            .store
            .load_flush_candidates(&queues, now, limit)
            .await?;
        stats.load_ids_latency = started.elapsed();
        // Sentry compares a segment's span count with this limit; we use the intent of the
        // check (a queue returned as many segments as allowed). See docs/decisions.md.
        let any_shard_at_limit = per_queue.iter().any(|candidates| candidates.len() >= limit);
        let (candidates, also_queued_in) = dedupe_candidates(per_queue);
        stats.candidates = candidates.len();

        let started = Instant::now();
        // One token per flush: its cleanup acts only on the locks that still hold it.
        let lock_token =
            (!options.flush_lock_ttl.is_zero()).then(|| uuid::Uuid::new_v4().simple().to_string());
        let (candidates, contention) = self
            .store
            .acquire_flush_locks(candidates, lock_token.as_deref().unwrap_or_default())
            .await?;
        stats.lock_contention = contention;
        let loaded = self.store.load_segments(candidates).await?;
        stats.load_data_latency = started.elapsed();

        let started = Instant::now();
        let mut lost: HashMap<(u64, &'static str), LostSpans> = HashMap::new();
        for segment in &loaded {
            self.account_losses(segment, now, &mut lost, &mut stats);
        }
        let built = build_flushed_segments(loaded);
        let mut segments = Vec::with_capacity(built.len());
        for (mut flushed, invalid) in built {
            flushed.lock_token.clone_from(&lock_token);
            if invalid > 0 {
                add_lost(&mut lost, flushed.project_id, INVALID_PAYLOAD, invalid);
                stats.dropped_spans += invalid;
            }
            if let Some(queues) = also_queued_in.get(&flushed.segment_key) {
                flushed.queue_keys.extend(queues.iter().cloned());
            }
            for reason in [SEGMENT_TOO_LARGE, INVALID_PAYLOAD] {
                if let Some(project) = lost.get_mut(&(flushed.project_id, reason)) {
                    project.organization_id = project.organization_id.or(flushed.organization_id);
                }
            }
            stats.spans += flushed.spans.len();
            stats.bytes += flushed.spans.iter().map(|s| s.payload.len()).sum::<usize>();
            if options.log_flushed_segments {
                tracing::info!(
                    segment_key = %flushed.segment_key,
                    queue_key = ?flushed.queue_keys,
                    span_count = flushed.spans.len(),
                    project_id = flushed.project_id,
                    "spans.buffer.flushed_segment"
                );
            }
            segments.push(flushed);
        }
        stats.segments = segments.len();
        stats.build_latency = started.elapsed();
        stats.emit();

        let mut lost: Vec<LostSpans> = lost.into_values().collect();
        lost.sort_by_key(|l| (l.project_id, l.reason));
        Ok(Flush {
            segments,
            lost,
            any_shard_at_limit,
            stats,
        })
    }

    /// Counts spans ingested but not loaded, and empty or expired segments.
    fn account_losses(
        &self,
        segment: &LoadedSegment,
        now: i64,
        lost: &mut HashMap<(u64, &'static str), LostSpans>,
        stats: &mut FlushStats,
    ) {
        let missing = segment.missing_spans();
        if missing > 0 {
            let project_id = segment.candidate.segment_key.project_id();
            add_lost(lost, project_id, SEGMENT_TOO_LARGE, missing);
            stats.dropped_spans += missing;
        }
        if segment.payloads.is_empty() {
            stats.empty_segments += 1;
            if segment.ingested.span_count.is_none() {
                let options = self.store.options();
                let age = now - segment.candidate.deadline
                    + i64::try_from(options.root_timeout.as_secs()).unwrap_or(0);
                if age > i64::try_from(options.redis_ttl.as_secs()).unwrap_or(i64::MAX) {
                    stats.expired_before_flush += 1;
                }
            }
        }
    }

    /// Removes everything the flushed segments left in Redis. Call after they were produced.
    pub async fn done_flush_segments(
        &self,
        segments: &[FlushedSegment],
    ) -> Result<(), BufferError> {
        if segments.is_empty() {
            return Ok(());
        }
        let left = self.store.cleanup_flushed_segments(segments).await?;
        if left > 0 {
            metrics::counter!(names::FLUSH_LOCKS_LOST).increment(left as u64);
        }
        Ok(())
    }

    /// Extends this flush's locks on `segments` by the lock TTL, so a produce that takes
    /// longer than the TTL keeps them; returns how many locks are no longer this flush's.
    pub async fn extend_flush_locks(
        &self,
        segments: &[FlushedSegment],
    ) -> Result<usize, BufferError> {
        let held = self.store.extend_flush_locks(segments).await?;
        Ok(held.into_iter().filter(|held| !held).count())
    }
}

/// Adds `quantity` spans of `project_id` lost for `reason`.
fn add_lost(
    lost: &mut HashMap<(u64, &'static str), LostSpans>,
    project_id: u64,
    reason: &'static str,
    quantity: u64,
) {
    lost.entry((project_id, reason))
        .or_insert(LostSpans {
            organization_id: None,
            project_id,
            quantity: 0,
            reason,
        })
        .quantity += quantity;
}

/// One candidate per segment key (the first queue that returned it); the other queues that
/// returned the same key are remembered so done removes those entries too.
fn dedupe_candidates(
    per_queue: Vec<Vec<FlushCandidate>>,
) -> (Vec<FlushCandidate>, HashMap<SegmentKey, Vec<String>>) {
    let mut seen: HashMap<SegmentKey, Vec<String>> = HashMap::new();
    let mut candidates = Vec::new();
    for candidate in per_queue.into_iter().flatten() {
        match seen.get_mut(&candidate.segment_key) {
            Some(queues) => queues.push(candidate.queue_key),
            None => {
                seen.insert(candidate.segment_key.clone(), Vec::new());
                candidates.push(candidate);
            }
        }
    }
    seen.retain(|_, queues| !queues.is_empty());
    (candidates, seen)
}

/// Spans per thread below which a flush's output is built on the calling thread alone.
const SPANS_PER_BUILD_THREAD: usize = 1_000;

/// Builds the output of every loaded segment, in order, on several threads when it is large;
/// each with the number of its payloads dropped as not a JSON object.
fn build_flushed_segments(loaded: Vec<LoadedSegment>) -> Vec<(FlushedSegment, u64)> {
    parallel::map_ordered(
        loaded,
        |segment| segment.payloads.len(),
        SPANS_PER_BUILD_THREAD,
        build_flushed_segment,
    )
}

/// Writes `is_segment` and `sentry.segment.id` into each loaded span. A payload that is not a
/// JSON object is dropped, logged with its segment and counted: produced verbatim it would
/// make the whole message invalid for every reader downstream.
fn build_flushed_segment(segment: LoadedSegment) -> (FlushedSegment, u64) {
    let key = segment.candidate.segment_key;
    let patcher = output::SpanPatcher::new(key.segment_span_id());
    let mut spans: Vec<OutputSpan> = Vec::with_capacity(segment.payloads.len());
    let mut invalid = 0;
    for payload in &segment.payloads {
        match patcher.patch_object(payload) {
            Some(span) => spans.push(span),
            None => {
                tracing::error!(
                    segment_key = %key,
                    bytes = payload.len(),
                    start = %payload.iter().take(32).copied().collect::<Vec<u8>>().escape_ascii(),
                    "Dropping a stored payload that is not a JSON object."
                );
                invalid += 1;
            }
        }
    }
    if invalid > 0 {
        metrics::counter!(names::INVALID_PAYLOADS).increment(invalid);
    }
    let flushed = FlushedSegment {
        project_id: key.project_id(),
        organization_id: spans.iter().find_map(|span| span.organization_id),
        queue_keys: vec![segment.candidate.queue_key],
        segment_key: key,
        spans,
        payload_keys: segment.payload_keys,
        lock_token: None,
    };
    (flushed, invalid + segment.corrupt_members)
}

fn record_process_metrics(
    stats: &ProcessStats,
    inserted: &[InsertedSubsegment],
    latency_threshold: Duration,
) {
    metrics::counter!(names::PROCESS_SPANS).increment(stats.spans as u64);
    metrics::histogram!(names::PROCESS_SUBSEGMENTS).record(stats.subsegments as f64);
    metrics::histogram!(names::PROCESS_BATCH_SPANS).record(stats.spans as f64);
    for sample in inserted.iter().filter_map(|i| i.sampled.as_ref()) {
        metrics::histogram!(names::EVALSHA_LATENCY_US).record(sample.latency_us as f64);
        if let Some(depth) = sample.metric("redirect_depth") {
            metrics::histogram!(names::REDIRECT_DEPTH).record(depth as f64);
        }
        if let Some(n) = sample.metric("detached_segment_too_large") {
            metrics::counter!(names::DETACHED_TOO_LARGE).increment(n.max(0) as u64);
        }
        if let Some(n) = sample.metric("detached_segment_locked") {
            metrics::counter!(names::DETACHED_LOCKED).increment(n.max(0) as u64);
        }
        if let Some(n) = sample.metric("already_counted") {
            metrics::counter!(names::ALREADY_COUNTED).increment(n.max(0) as u64);
        }
        if u128::from(sample.latency_us) > latency_threshold.as_micros() {
            tracing::warn!(
                latency_us = sample.latency_us,
                "Slow add-buffer script call."
            );
        }
    }
}
