//! Writes each batch of spans into the Redis buffer, then passes the batch's clock on.
//!
//! This is Sentry's `process_batch`: decode, `SpansBuffer::process_spans(spans, now)` with `now`
//! the smallest broker timestamp of the batch, and hand that timestamp to the flusher (its
//! clock follows the stream, see `flush_segments`). Once this step forwards a batch its spans
//! are in Redis, which is what lets `CommitOffsets` commit them.
//!
//! Sentry's consumer encodes a batch and then waits for Redis, so the two take turns. Here each
//! batch is a task of a `RunTaskInThreads` step with two in flight: the next batch is decoded,
//! grouped and compressed while the previous one is written. Writes still happen one batch at
//! a time, in consumption order (a [`WriteOrder`] ticket per batch), because a segment's queue deadline must be
//! the one of its latest batch.
//!
//! When Redis fails, the task keeps its batch and retries with backoff (doubling from 100 ms to
//! 5 s), so a dead Redis is not hammered; with both tasks waiting the step rejects new batches,
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
use crate::buffer::{PreparedBatch, SpansBuffer, WriteOrder};
use crate::metrics as names;
use crate::span::Span;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Batches a `ProcessSpans` step works on at once: one being written, one being prepared.
pub(super) const CONCURRENT_BATCHES: usize = 2;

/// The buffer-writing task of the consumer's `RunTaskInThreads` over batches.
#[derive(Debug)]
pub struct ProcessSpans {
    buffer: Arc<SpansBuffer>,
    order: Arc<WriteOrder>,
}

impl ProcessSpans {
    /// Writes batches into `buffer`.
    pub fn new(buffer: SpansBuffer) -> Self {
        Self {
            buffer: Arc::new(buffer),
            order: Arc::new(WriteOrder::new()),
        }
    }

    /// The task for one batch: prepare it, wait for the previous batch to be written, write it
    /// (retrying until Redis takes it), and resolve to the batch's clock (the smallest broker
    /// timestamp, in seconds). Call in submission order.
    ///
    /// # Errors
    ///
    /// [`TaskError::Failed`] when the batch cannot be encoded (compression failed); the
    /// pipeline stops rather than skip spans.
    pub fn task(
        &self,
        batch: Message<Vec<SpanMessage>>,
    ) -> impl Future<Output = Result<Message<i64>, TaskError>> + Send + use<> {
        let ticket = self.order.ticket();
        let buffer = Arc::clone(&self.buffer);
        let order = Arc::clone(&self.order);
        async move {
            let now = clock(batch.payload());
            let prepared = prepare(&buffer, batch.payload());
            order.wait_for_turn(&ticket).await;
            let result = match prepared {
                Ok(prepared) => {
                    write_until_done(&buffer, &prepared, now).await;
                    Ok(batch.map(|_| now))
                }
                Err(error) => Err(TaskError::Failed(Box::new(error))),
            };
            order.finish(ticket);
            result
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

fn prepare(
    buffer: &SpansBuffer,
    batch: &[SpanMessage],
) -> Result<PreparedBatch, crate::buffer::BufferError> {
    let spans: Vec<Span<'_>> = batch
        .iter()
        .filter_map(|message| {
            let value = message.payload.value().unwrap_or_default();
            // Validated by the decode step; a failure here would be a decoder bug, and that
            // span is skipped rather than blocking the partition.
            Span::decode(value, message.partition)
                .inspect_err(|error| {
                    tracing::error!(%error, "A span validated earlier failed to decode.");
                })
                .ok()
        })
        .collect();
    buffer.prepare(&spans)
}

/// Writes until Redis accepts the batch, backing off between attempts.
async fn write_until_done(buffer: &SpansBuffer, prepared: &PreparedBatch, now: i64) {
    let mut backoff = FIRST_BACKOFF;
    while let Err(error) = buffer.write(prepared, now).await {
        tracing::warn!(error = %ErrorChain(&error), retry_in = ?backoff, "Writing spans to Redis failed; retrying.");
        metrics::counter!(names::PROCESS_FAILURES).increment(1);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
