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
//! at a time, in consumption order (a [`WriteOrder`] place per batch, see
//! `SpansBuffer::write_in_order`), because a segment's queue deadline must be the one of its
//! latest batch.
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
use crate::buffer::{BufferError, PreparedBatch, SpansBuffer, WriteOrder, WriteRetry};
use crate::span::Span;

/// Batches a `ProcessSpans` step works on at once: one being prepared, one writing its
/// subsegments, one its queue deadlines.
pub(super) const CONCURRENT_BATCHES: usize = 3;

/// How a write that Redis failed is retried: from 100 ms, doubling up to 5 s.
const RETRY: WriteRetry = WriteRetry::Backoff {
    first: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// The buffer-writing task of the consumer's `RunTaskInThreads` over batches.
#[derive(Debug)]
pub struct ProcessSpans {
    buffer: Arc<SpansBuffer>,
    order: WriteOrder,
}

impl ProcessSpans {
    /// Writes batches into `buffer`.
    pub fn new(buffer: SpansBuffer) -> Self {
        Self {
            buffer: Arc::new(buffer),
            order: WriteOrder::new(),
        }
    }

    /// The task for one batch: prepare it, write its payloads, then its script calls and its
    /// queue deadlines, each after the previous batch's (retrying until Redis takes them), and
    /// resolve to the batch's clock (the smallest broker timestamp, in seconds). Call in
    /// submission order.
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
        let place = self.order.place();
        let buffer = Arc::clone(&self.buffer);
        async move {
            let now = clock(batch.payload());
            let prepared = prepare(&buffer, batch.payload());
            match buffer.write_in_order(place, prepared, now, RETRY).await {
                Ok(_) => Ok(batch.map(|_| now)),
                Err(error) => Err(TaskError::Failed(Box::new(error))),
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
