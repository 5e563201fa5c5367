//! Writes each batch of spans into the Redis buffer, then passes the batch's clock on.
//!
//! This is Sentry's `process_batch`: decode, `SpansBuffer::process_spans(spans, now)` with `now`
//! the smallest broker timestamp of the batch, and hand that timestamp to the flusher (its
//! clock follows the stream, see `flush_step.rs`). Once this step forwards a batch its spans
//! are in Redis, which is what lets `CommitOffsets` commit them.
//!
//! Sentry's consumer encodes a batch and then waits for Redis, so the two take turns. Here each
//! batch is a task of a `RunTaskInThreads` step with three in flight: one batch is decoded,
//! grouped, compressed and its payloads sent while the one before runs its scripts and the
//! one before that writes its queue deadlines. Scripts and queue updates each happen one batch
//! at a time, in consumption order (a [`WriteOrder`] ticket per batch and write), because a
//! segment's queue deadline must be the one of its latest batch; see
//! `SpansBuffer::write_scripts`.
//!
//! When Redis fails, the task keeps its batch and retries with backoff (doubling from 100 ms to
//! 5 s), so a dead Redis is not hammered; with every task waiting the step rejects new batches,
//! the stream processor pauses consumption, nothing is committed past unwritten spans, and the
//! consumer recovers by itself when Redis does. Writing a batch twice is harmless: payload keys
//! are named by a hash of their span ids.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rill::Message;
use rill::steps::TaskError;

use super::decode::{SpanMessage, seconds};
use super::error_chain::ErrorChain;
use crate::buffer::{BufferError, PreparedBatch, SpansBuffer, WriteOrder};
use crate::metrics as names;
use crate::span::Span;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Batches a `ProcessSpans` step works on at once: one being prepared, one writing its
/// subsegments, one its queue deadlines.
pub(super) const CONCURRENT_BATCHES: usize = 3;

/// The buffer-writing task of the consumer's `RunTaskInThreads` over batches.
#[derive(Debug)]
pub struct ProcessSpans {
    buffer: Arc<SpansBuffer>,
    /// Order of the subsegment writes.
    scripts: Arc<WriteOrder>,
    /// Order of the queue updates.
    queues: Arc<WriteOrder>,
}

impl ProcessSpans {
    /// Writes batches into `buffer`.
    pub fn new(buffer: SpansBuffer) -> Self {
        Self {
            buffer: Arc::new(buffer),
            scripts: Arc::new(WriteOrder::new()),
            queues: Arc::new(WriteOrder::new()),
        }
    }

    /// The task for one batch: prepare it, write its payloads, then its script calls and its
    /// queue deadlines, each after the previous batch's (retrying until Redis takes them), and
    /// resolve to the
    /// batch's clock (the smallest broker timestamp, in seconds). Call in submission order.
    ///
    /// # Errors
    ///
    /// [`TaskError::Failed`] when the batch cannot be encoded (compression failed) or Redis
    /// refuses it with an error that repeats at every retry; the pipeline stops rather than
    /// skip spans or retry forever.
    pub fn task(
        &self,
        batch: Message<Vec<SpanMessage>>,
    ) -> impl Future<Output = Result<Message<i64>, TaskError>> + Send + use<> {
        let (script_ticket, queue_ticket) = (self.scripts.ticket(), self.queues.ticket());
        let buffer = Arc::clone(&self.buffer);
        let (scripts, queues) = (Arc::clone(&self.scripts), Arc::clone(&self.queues));
        async move {
            let now = clock(batch.payload());
            // The first error that ends this batch; every ticket is still finished, so the
            // batches behind it are not stranded while the pipeline stops.
            let mut failed = None;
            let mut prepared = prepare(&buffer, batch.payload())
                .map_err(|error| failed = Some(error))
                .ok();
            if let Some(batch) = &prepared
                && let Err(error) = until_done(|| buffer.write_payloads(batch)).await
            {
                failed = Some(error);
                prepared = None;
            }
            scripts.wait_for_turn(&script_ticket).await;
            let written = match &prepared {
                Some(prepared) => until_done(|| buffer.write_scripts(prepared))
                    .await
                    .map_err(|error| failed = Some(error))
                    .ok(),
                None => None,
            };
            scripts.finish(script_ticket);
            queues.wait_for_turn(&queue_ticket).await;
            if let Some(written) = &written
                && let Err(error) = until_done(|| buffer.queue_segments(written, now)).await
            {
                failed = Some(error);
            }
            queues.finish(queue_ticket);
            match failed {
                None => Ok(batch.map(|_| now)),
                Some(error) => Err(TaskError::Failed(Box::new(error))),
            }
        }
    }
}

/// The smallest broker timestamp of a batch, in seconds (now for an empty batch).
fn clock(batch: &[SpanMessage]) -> i64 {
    batch
        .iter()
        .map(|span| span.timestamp_secs)
        .min()
        .unwrap_or_else(|| seconds(std::time::SystemTime::now()))
}

fn prepare(buffer: &SpansBuffer, batch: &[SpanMessage]) -> Result<PreparedBatch, BufferError> {
    let spans: Vec<Span<'_>> = batch
        .iter()
        .filter_map(|message| {
            // Validated by the decode step, which kept where the fields are; a failure here
            // would be a decoder bug, and that span is skipped rather than blocking the
            // partition.
            message
                .span()
                .inspect_err(|error| {
                    tracing::error!(%error, "A span validated earlier failed to decode.");
                })
                .ok()
        })
        .collect();
    buffer.prepare(&spans)
}

/// Runs `attempt` until Redis accepts it, backing off between attempts, or until it fails
/// with an error that would repeat at every retry (`NOPERM`, `WRONGTYPE`, a script error, a
/// reply the store does not understand): that one is returned, and stops the pipeline before
/// the batch is committed, instead of a retry loop that never ends.
async fn until_done<T, F, Fut>(mut attempt: F) -> Result<T, BufferError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BufferError>>,
{
    let mut backoff = FIRST_BACKOFF;
    loop {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(error) if !error.is_transient() => {
                tracing::error!(error = %ErrorChain(&error), "Writing spans to Redis failed with an error that repeats at every retry; stopping the pipeline.");
                metrics::counter!(names::PROCESS_FAILURES).increment(1);
                return Err(error);
            }
            Err(error) => {
                tracing::warn!(error = %ErrorChain(&error), retry_in = ?backoff, "Writing spans to Redis failed; retrying.");
                metrics::counter!(names::PROCESS_FAILURES).increment(1);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
