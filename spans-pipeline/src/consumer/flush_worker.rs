//! The flush workers: background tasks that flush finished segments to the output topic.
//!
//! Each worker owns a [`SpansBuffer`] for its shards (Kafka partitions) and loops: compute
//! `now` from the wall clock plus the shared drift, flush the segments due at `now`, produce
//! every resulting message and wait for the deliveries, then clean the flushed segments out of
//! Redis. It reports after every iteration that succeeded through [`WorkerHealth`]: when it
//! last flushed and since when it has been at its flush limit. A failed flush is retried with a
//! growing pause when it may pass (a lost connection, a server loading or full) and is not a
//! report: a worker that keeps failing falls silent and is replaced. One that cannot pass
//! (`WRONGTYPE`, `NOPERM`, a script error, a reply the store does not understand) ends the
//! worker at once, so the step replaces it and, if it keeps happening, fails the consumer. The [`FlushSegments`](super::FlushSegments)
//! step reads those to detect dead or hung workers and to apply backpressure.
//!
//! A worker is stopped at an iteration boundary (never between produce and cleanup) when the
//! shared stop flag is set. A worker that was replaced (its health slot's generation moved on)
//! stops before producing or cleaning up anything more: it checks its generation before every
//! message it sends and before cleanup, not only between iterations, because a worker stuck in
//! a synchronous call cannot be aborted until it yields, and on waking it would otherwise send
//! the rest of its iteration's messages within that same poll, beside its replacement.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use rill::backends::kafka::{KafkaPayload, is_message_too_large};
use rill::{Clock, DeliveryError, Destination, ProduceError, Producer, SharedClock, Topic};

use super::decode::seconds;
use super::flush_step::FlushSettings;
use super::outcomes::{Outcomes, PRODUCE_FAILED};
use crate::buffer::keys::SegmentKey;
use crate::buffer::{
    BufferError, BufferOptions, FlushedSegment, RedisConnection, SpansBuffer, output,
};
use crate::error_chain::ErrorChain;
use crate::metrics as names;

/// Everything a worker needs besides its shards; cheap to clone (shared handles).
#[derive(Clone)]
pub struct WorkerContext {
    /// Redis, shared by every worker (a multiplexed connection).
    pub connection: RedisConnection,
    /// Buffer options (timeouts, limits, compression).
    pub options: BufferOptions,
    /// Kafka slice id of the consumer, if any (part of the queue keys).
    pub slice_id: Option<u32>,
    /// Where flushed segments go.
    pub producer: Arc<dyn Producer<KafkaPayload>>,
    /// The output topic (`buffered-segments`).
    pub topic: Topic,
    /// The workers' settings: idle pause, produce attempts and backoff, restarts.
    pub flusher: FlushSettings,
    /// State shared by all workers of one step.
    pub shared: Arc<SharedState>,
    /// The time workers report their health in, read by the step.
    pub clock: HealthClock,
    /// Where outcome records go, if anywhere.
    pub outcomes: Option<Outcomes>,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("topic", &self.topic)
            .field("slice_id", &self.slice_id)
            .finish_non_exhaustive()
    }
}

/// The time of health reports: whole seconds on an injected [`Clock`] since the step started,
/// from 1 (0 in a report means "not yet"). Production runs on the system clock; a test on a
/// [`ManualClock`](rill::ManualClock) moves it and sees a silent worker replaced at the exact
/// second, without waiting.
///
/// Only health is on this clock. Which segments are due is decided on the stream's time (the
/// wall clock plus the drift of the latest batch), because queue deadlines are Unix seconds.
#[derive(Clone, Debug)]
pub struct HealthClock {
    clock: SharedClock,
    epoch: Instant,
}

impl HealthClock {
    /// Health time starting now on `clock`.
    pub fn new(clock: SharedClock) -> Self {
        let epoch = clock.now();
        Self { clock, epoch }
    }

    /// The clock's current instant.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The clock itself.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// Whole seconds since the epoch, plus one.
    pub fn seconds(&self) -> i64 {
        let elapsed = self.clock.now().saturating_duration_since(self.epoch);
        i64::try_from(elapsed.as_secs())
            .unwrap_or(i64::MAX - 1)
            .saturating_add(1)
    }
}

/// State shared between the step and all its workers.
#[derive(Debug, Default)]
pub struct SharedState {
    /// Seconds to add to the wall clock: the latest batch's timestamp minus the wall clock when
    /// it was processed (Sentry's `current_drift`).
    pub drift: AtomicI64,
    /// Set to stop every worker at its next iteration boundary.
    pub stop: AtomicBool,
}

/// What one worker reports, read by the step on the consumer thread.
#[derive(Debug, Default)]
pub(super) struct WorkerHealth {
    /// [`HealthClock::seconds`] of the last completed iteration (0: not started yet).
    pub healthy_since: AtomicI64,
    /// [`HealthClock::seconds`] since which every iteration hit the flush limit (0: not at the
    /// limit).
    pub backpressure_since: AtomicI64,
    /// The generation allowed to work; a worker whose generation is older stops.
    pub generation: AtomicU64,
    /// Whether the worker's latest flush failed (it then stops reporting `healthy_since`).
    pub failing: AtomicBool,
}

impl WorkerHealth {
    fn is_current(&self, generation: u64) -> bool {
        self.generation.load(Ordering::SeqCst) == generation
    }
}

/// One worker's claim to its shards: its health slot and the generation it was started as.
#[derive(Clone, Copy, Debug)]
struct Tenure<'a> {
    health: &'a WorkerHealth,
    generation: u64,
}

impl Tenure<'_> {
    /// Whether the worker has not been replaced.
    fn holds(&self) -> bool {
        self.health.is_current(self.generation)
    }
}

/// Runs one worker until the stop flag is set or it is replaced.
///
/// # Errors
///
/// Creating its buffer failed (Redis unreachable at start), or a flush or cleanup failed in a
/// way a retry cannot fix ([`BufferError::is_transient`] is false): the step sees the worker
/// exit and restarts it, with a backoff, until `max_restarts`.
pub(super) async fn run_worker(
    context: WorkerContext,
    shards: Vec<u16>,
    health: Arc<WorkerHealth>,
    generation: u64,
) -> Result<(), BufferError> {
    let buffer = SpansBuffer::new(
        context.connection.clone(),
        context.options.clone(),
        shards.clone(),
        context.slice_id,
    )
    .await?;
    let shard_label = shard_label(&shards);
    let queues: Vec<(u16, String)> = shards
        .iter()
        .map(|&shard| (shard, buffer.queue_key(shard)))
        .collect();
    let tenure = Tenure {
        health: &health,
        generation,
    };
    let mut gauged_at: Option<std::time::Instant> = None;
    let mut failures: u32 = 0;
    while !context.shared.stop.load(Ordering::SeqCst) && tenure.holds() {
        if gauged_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
            let now = seconds(SystemTime::now()) + context.shared.drift.load(Ordering::SeqCst);
            record_queue_gauges(&buffer, &queues, now).await;
            gauged_at = Some(std::time::Instant::now());
        }
        let reported = context.clock.seconds();
        let now = seconds(SystemTime::now()) + context.shared.drift.load(Ordering::SeqCst);
        let flushed = match buffer.load_due_segments(now).await {
            Ok(flush) => {
                report_losses(&context, &flush);
                if flush.any_shard_at_limit {
                    let _ = health.backpressure_since.compare_exchange(
                        0,
                        reported,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                } else {
                    health.backpressure_since.store(0, Ordering::SeqCst);
                }
                let anything = !flush.segments.is_empty();
                if anything && tenure.holds() {
                    produce_and_clean_up(&context, &buffer, &flush.segments, &shard_label, tenure)
                        .await?;
                }
                Ok(anything)
            }
            Err(error) => Err(error),
        };
        match flushed {
            Ok(anything) => {
                failures = 0;
                health.failing.store(false, Ordering::SeqCst);
                // Alive means flushing: a worker whose every flush fails stops reporting, so
                // the step replaces it after `max_unhealthy` and, if that keeps happening,
                // fails the consumer instead of leaving its shards silently stuck.
                health.healthy_since.store(reported, Ordering::SeqCst);
                if !anything {
                    tokio::time::sleep(context.flusher.idle_sleep).await;
                }
            }
            Err(error) if error.is_transient() => {
                metrics::counter!(names::FLUSHER_ERRORS, "phase" => "flush").increment(1);
                failures = failures.saturating_add(1);
                health.failing.store(true, Ordering::SeqCst);
                tracing::warn!(error = %ErrorChain(&error), shards = %shard_label, failures, "Flushing segments failed; retrying.");
                tokio::time::sleep(retry_pause(context.flusher.idle_sleep, failures)).await;
            }
            Err(error) => {
                metrics::counter!(names::FLUSHER_ERRORS, "phase" => "flush").increment(1);
                health.failing.store(true, Ordering::SeqCst);
                tracing::error!(error = %ErrorChain(&error), shards = %shard_label, "Flushing segments failed in a way a retry cannot fix; the worker stops.");
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Longest pause between two failed flushes.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// The pause after the `failures`-th failed flush in a row: `idle_sleep`, doubling, at most
/// [`MAX_RETRY_PAUSE`] (or `idle_sleep` if that is longer).
fn retry_pause(idle_sleep: Duration, failures: u32) -> Duration {
    let doubled = idle_sleep.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_RETRY_PAUSE.max(idle_sleep))
}

/// Logs and records the spans a flush found missing.
fn report_losses(context: &WorkerContext, flush: &crate::buffer::Flush) {
    for lost in &flush.lost {
        tracing::warn!(
            project_id = lost.project_id,
            organization_id = ?lost.organization_id,
            quantity = lost.quantity,
            reason = lost.reason,
            "Spans ingested but not flushed."
        );
        if let Some(outcomes) = &context.outcomes {
            outcomes.send(
                lost.organization_id,
                lost.project_id,
                lost.reason,
                lost.quantity,
            );
        }
    }
}

/// Sets the stored-segments gauge of each shard (`ZCARD` of its queue), as Sentry's consumer
/// does on every batch, and the flush-lag gauge (how far `now` is past the queue's earliest
/// deadline); here once a second per worker.
async fn record_queue_gauges(buffer: &SpansBuffer, queues: &[(u16, String)], now: i64) {
    let keys: Vec<String> = queues.iter().map(|(_, key)| key.clone()).collect();
    let store = buffer.store();
    match store.queue_stats(&keys, now).await {
        Ok(stats) => {
            for ((shard, _), stats) in queues.iter().zip(stats) {
                let shard = shard.to_string();
                metrics::gauge!(names::STORED_SEGMENTS, "shard" => shard.clone())
                    .set(stats.size as f64);
                let lag = stats
                    .oldest_deadline
                    .map_or(0, |deadline| (now - deadline).max(0));
                metrics::gauge!(names::FLUSH_LAG_SECONDS, "shard" => shard).set(lag as f64);
            }
        }
        Err(error) => tracing::debug!(error = %ErrorChain(&error), "Reading queue sizes failed."),
    }
}

/// Produces every message of `segments`, waits for the deliveries, then cleans all of them up.
/// A worker replaced meanwhile stops sending and leaves the segments to its replacement.
///
/// A segment whose messages cannot be delivered after the retries is given up: logged, counted
/// (`spans.buffer.flusher.produce_failed_spans`) and cleaned up like the others, as Sentry does,
/// so one poisoned segment cannot block its queue forever.
async fn produce_and_clean_up(
    context: &WorkerContext,
    buffer: &SpansBuffer,
    segments: &[FlushedSegment],
    shard_label: &str,
    tenure: Tenure<'_>,
) -> Result<(), BufferError> {
    let started = std::time::Instant::now();
    let deliveries = segments
        .iter()
        .filter(|segment| !segment.spans.is_empty())
        .map(|segment| deliver_segment(context, segment, tenure));
    // The locks are extended while the deliveries are awaited, however long librdkafka takes:
    // a lock that expired under a produce would let a later subsegment merge into the segment
    // being flushed.
    let results = tokio::select! {
        results = join_all(deliveries) => results,
        () = keep_flush_locks(context, buffer, segments) => unreachable!("keeps the locks until cancelled"),
    };
    if !tenure.holds() {
        // Left in Redis, the segments are flushed by the replacement; cleaning them up here
        // could delete what it has not produced yet.
        tracing::warn!(
            shards = shard_label,
            "A replaced flush worker stops mid-flush."
        );
        return Ok(());
    }
    metrics::histogram!(names::FLUSHER_WAIT_PRODUCE_SECONDS)
        .record(started.elapsed().as_secs_f64());
    for (segment, result) in segments
        .iter()
        .filter(|segment| !segment.spans.is_empty())
        .zip(results)
    {
        match result {
            Ok(messages) => {
                metrics::counter!(names::FLUSHER_PRODUCE, "status" => "ok").increment(messages);
            }
            Err(Undelivered { error, spans }) => {
                metrics::counter!(names::FLUSHER_PRODUCE, "status" => "failed").increment(1);
                metrics::counter!(names::FLUSHER_PRODUCE_FAILED_SPANS).increment(spans);
                tracing::error!(
                    error = %ErrorChain(&error),
                    segment_key = %segment.segment_key,
                    project_id = segment.project_id,
                    trace_id = %trace_of(&segment.segment_key),
                    spans,
                    segment_spans = segment.spans.len(),
                    shards = shard_label,
                    "Giving up spans of a segment that could not be produced."
                );
                if let Some(outcomes) = &context.outcomes {
                    outcomes.send(
                        segment.organization_id,
                        segment.project_id,
                        PRODUCE_FAILED,
                        spans,
                    );
                }
            }
        }
    }
    match buffer.done_flush_segments(segments).await {
        Ok(()) => Ok(()),
        Err(error) => {
            // Left in Redis, the segments are flushed again later: duplicates, not losses. A
            // cleanup that would fail the same way every time stops the worker instead of
            // producing the same segments again and again.
            tracing::warn!(error = %ErrorChain(&error), shards = shard_label, "Cleaning up flushed segments failed.");
            metrics::counter!(names::FLUSHER_ERRORS, "phase" => "done").increment(1);
            if error.is_transient() {
                Ok(())
            } else {
                Err(error)
            }
        }
    }
}

/// Extends the flush's locks every third of the lock TTL until cancelled; never returns.
/// With locks off it only waits.
async fn keep_flush_locks(
    context: &WorkerContext,
    buffer: &SpansBuffer,
    segments: &[FlushedSegment],
) {
    let ttl = context.options.flush_lock_ttl;
    if ttl.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(ttl / 3).await;
        match buffer.extend_flush_locks(segments).await {
            Ok(0) => {}
            Ok(lost) => tracing::warn!(lost, "Flush locks were lost while producing."),
            Err(error) => {
                tracing::warn!(error = %ErrorChain(&error), "Extending flush locks failed.");
            }
        }
    }
}

/// Why a segment could not be produced.
#[derive(Debug, thiserror::Error)]
enum DeliverError {
    #[error("delivery failed after {attempts} attempts")]
    Delivery {
        attempts: u32,
        #[source]
        source: DeliveryError,
    },
    #[error("producer refused the message after {attempts} attempts")]
    Refused {
        attempts: u32,
        #[source]
        source: rill::BoxError,
    },
    #[error("the flush worker was replaced")]
    Replaced,
}

impl DeliverError {
    /// Whether the producer or the broker refused the message for its size: sending it again
    /// cannot work, sending its spans in smaller messages can.
    fn is_too_large(&self) -> bool {
        match self {
            Self::Delivery { source, .. } => is_message_too_large(source),
            Self::Refused { source, .. } => is_message_too_large(source.as_ref()),
            Self::Replaced => false,
        }
    }
}

/// Spans of a segment that were not delivered, and the last reason.
#[derive(Debug)]
struct Undelivered {
    error: DeliverError,
    spans: u64,
}

/// The trace id of a segment key (`…{<project>:<trace>}…`), for logs.
fn trace_of(segment_key: &SegmentKey) -> &str {
    segment_key
        .project_and_trace()
        .split_once(':')
        .map_or("", |(_, trace)| trace)
}

/// Produces the messages of one segment; returns how many were delivered.
///
/// A message the producer or the broker refuses for its size (`MSG_SIZE_TOO_LARGE`) is not
/// sent again as it is: its spans are cut in two halves, each sent as a message of its own
/// marked `skip_enrichment` (a part of a segment, as Sentry marks its chunks), and so on down
/// to single spans. Only a single span too large for any message, or a message that fails for
/// another reason after every attempt, is given up; the error counts the spans not delivered.
async fn deliver_segment(
    context: &WorkerContext,
    segment: &FlushedSegment,
    tenure: Tenure<'_>,
) -> Result<u64, Undelivered> {
    let spans = segment.payloads();
    let mut pending = output::segment_chunk_messages(&spans, context.options.max_segment_bytes);
    let mut delivered = 0;
    let mut failure: Option<Undelivered> = None;
    while !pending.is_empty() {
        let sends = pending.into_iter().map(|(chunk, message)| async move {
            let payload = KafkaPayload::new(None, Some(message));
            (chunk, deliver(context, payload, tenure).await)
        });
        let mut split = Vec::new();
        for (chunk, result) in join_all(sends).await {
            match result {
                Ok(()) => delivered += 1,
                Err(error) if error.is_too_large() && chunk.len() > 1 => {
                    let middle = chunk.start + chunk.len() / 2;
                    for half in [chunk.start..middle, middle..chunk.end] {
                        let message = output::chunk_message(&spans[half.clone()], true);
                        split.push((half, message));
                    }
                }
                Err(error) => {
                    let spans = chunk.len() as u64 + failure.as_ref().map_or(0, |f| f.spans);
                    failure = Some(Undelivered { error, spans });
                }
            }
        }
        if !split.is_empty() {
            tracing::warn!(
                segment_key = %segment.segment_key,
                messages = split.len(),
                "A message was refused for its size; sending its spans in smaller messages."
            );
            metrics::counter!(names::FLUSHER_SPLIT_MESSAGES).increment(split.len() as u64);
        }
        pending = split;
    }
    match failure {
        Some(failure) => Err(failure),
        None => Ok(delivered),
    }
}

/// Sends one message until it is delivered or the attempts run out. A full producer queue is
/// waited out without counting as an attempt. Nothing is sent once the worker was replaced.
async fn deliver(
    context: &WorkerContext,
    payload: KafkaPayload,
    tenure: Tenure<'_>,
) -> Result<(), DeliverError> {
    let destination = Destination::Topic(context.topic.clone());
    let mut backoff = context.flusher.produce_backoff;
    let mut attempt = 1;
    loop {
        if !tenure.holds() {
            return Err(DeliverError::Replaced);
        }
        let failure = match context.producer.produce(&destination, payload.clone()) {
            Ok(delivery) => match delivery.await {
                Ok(_) => return Ok(()),
                Err(source) => DeliverError::Delivery {
                    attempts: attempt,
                    source,
                },
            },
            Err(ProduceError::QueueFull(_)) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            Err(ProduceError::Failed { source, .. }) => DeliverError::Refused {
                attempts: attempt,
                source,
            },
        };
        if attempt >= context.flusher.produce_attempts || failure.is_too_large() {
            return Err(failure);
        }
        tracing::warn!(error = %failure, attempt, "Producing a segment failed; retrying.");
        tokio::time::sleep(backoff).await;
        backoff = backoff.saturating_mul(2);
        attempt += 1;
    }
}

/// `0,3,6` for logs and metric tags.
pub(crate) fn shard_label(shards: &[u16]) -> String {
    shards
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
