//! Writes each batch of spans into the Redis buffer, then passes the batch's clock on.
//!
//! This is Sentry's `process_batch`: decode, `SpansBuffer::process_spans(spans, now)` with `now`
//! the smallest broker timestamp of the batch, and hand that timestamp to the flusher (its
//! clock follows the stream, see `flush_segments`). Once this step forwards a batch its spans
//! are in Redis, which is what lets `CommitOffsets` commit them.
//!
//! When Redis fails, the batch is handed back (`MessageRejected`) instead of failing the
//! pipeline: the stream processor keeps it, retries, and pauses consumption if the outage
//! lasts, so nothing is committed past unwritten spans and the consumer recovers by itself when
//! Redis does. Retries back off (doubling from 100 ms to 5 s) so a dead Redis is not hammered.
//! Writing a batch twice is harmless: payload keys are named by a hash of their span ids.

use std::time::{Duration, Instant};

use rill::{Message, SubmitError};
use tokio::runtime::Handle;

use super::decode::{SpanMessage, seconds};
use super::error_chain::ErrorChain;
use crate::buffer::SpansBuffer;
use crate::metrics as names;
use crate::span::Span;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The buffer-writing function of the consumer's `RunTask` over batches.
#[derive(Debug)]
pub struct ProcessSpans {
    buffer: SpansBuffer,
    runtime: Handle,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl ProcessSpans {
    /// Writes batches into `buffer`, running its Redis calls on `runtime`.
    ///
    /// The stream processor must not run on one of `runtime`'s threads: each batch waits for
    /// its Redis round trips.
    pub fn new(buffer: SpansBuffer, runtime: Handle) -> Self {
        Self {
            buffer,
            runtime,
            retry_at: None,
            backoff: FIRST_BACKOFF,
        }
    }

    /// Writes one batch; returns its clock (the smallest broker timestamp, in seconds).
    ///
    /// # Errors
    ///
    /// [`SubmitError::MessageRejected`] with the batch when Redis failed or the backoff after a
    /// failure has not passed yet.
    pub fn process(
        &mut self,
        batch: Message<Vec<SpanMessage>>,
    ) -> Result<Message<i64>, SubmitError<Vec<SpanMessage>>> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(SubmitError::MessageRejected(batch));
        }
        let now = batch
            .payload()
            .iter()
            .map(|span| span.timestamp_secs)
            .min()
            .unwrap_or_else(|| seconds(std::time::SystemTime::now()));
        let result = {
            let spans: Vec<Span<'_>> = batch
                .payload()
                .iter()
                .filter_map(|message| {
                    let value = message.payload.value().unwrap_or_default();
                    // Validated by the decode step; a failure here would be a decoder bug, and
                    // that span is skipped rather than blocking the partition.
                    Span::decode(value, message.partition)
                        .inspect_err(|error| {
                            tracing::error!(%error, "A span validated earlier failed to decode.");
                        })
                        .ok()
                })
                .collect();
            self.runtime
                .block_on(self.buffer.process_spans(&spans, now))
        };
        match result {
            Ok(_) => {
                self.retry_at = None;
                self.backoff = FIRST_BACKOFF;
                Ok(batch.map(|_| now))
            }
            Err(error) => {
                tracing::warn!(error = %ErrorChain(&error), retry_in = ?self.backoff, "Writing spans to Redis failed; retrying.");
                metrics::counter!(names::PROCESS_FAILURES).increment(1);
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                Err(SubmitError::MessageRejected(batch))
            }
        }
    }
}
