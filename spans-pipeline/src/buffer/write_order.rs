//! The one way a batch is written: payloads, then script calls, then queue deadlines, the
//! last two one batch at a time in consumption order, each phase retried as the caller asks.
//!
//! Preparing a batch (decoding, grouping, compressing) is worth doing ahead, on other threads,
//! and its payloads need no order (their keys are named by the batch's own salts). Its script
//! calls and its queue update do: a segment's deadline must be its latest batch's, and a
//! segment merged away by a later batch must not be queued again by an earlier one. A caller
//! takes a [`WritePlace`] per batch, in consumption order, and hands it to
//! [`SpansBuffer::write_in_order`], which waits for each turn and always passes it on, also
//! when the batch failed: a batch that gives up must not strand the ones behind it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::{BufferError, PreparedBatch, ProcessStats, SpansBuffer};
use crate::error_chain::ErrorChain;
use crate::metrics as names;

/// The order batches write in: hands out [`WritePlace`]s, one per batch. Clones share it.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteOrder {
    shared: Arc<Shared>,
}

/// A batch's place in a [`WriteOrder`], taken in the order the batches were consumed.
#[derive(Debug)]
#[must_use = "a place not written holds up every later batch"]
pub(crate) struct WritePlace {
    shared: Arc<Shared>,
    place: u64,
}

/// How a phase that Redis failed is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteRetry {
    /// Not at all: the error is returned (the replay, the benches).
    Never,
    /// After a pause that doubles from `first` up to `max`, until Redis takes the write or
    /// fails with an error that would repeat at every retry (the consumer).
    Backoff {
        /// The first pause.
        first: Duration,
        /// The longest pause.
        max: Duration,
    },
}

/// The phases that go one batch at a time.
#[derive(Clone, Copy, Debug)]
enum Phase {
    Scripts = 0,
    Queues = 1,
}

#[derive(Debug)]
struct Shared {
    next_place: AtomicU64,
    /// Per phase, the place whose turn it is.
    turns: [watch::Sender<u64>; 2],
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            next_place: AtomicU64::new(0),
            turns: [watch::Sender::new(0), watch::Sender::new(0)],
        }
    }
}

impl WriteOrder {
    /// A new order; its first place writes first.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The next place in line. Take places in the order the batches must be written.
    pub(crate) fn place(&self) -> WritePlace {
        WritePlace {
            shared: Arc::clone(&self.shared),
            place: self.shared.next_place.fetch_add(1, Ordering::SeqCst),
        }
    }
}

impl WritePlace {
    /// Runs `work` in this place's turn of `phase`, then gives the turn to the next place.
    async fn in_turn<T>(&self, phase: Phase, work: impl Future<Output = T>) -> T {
        let turn = &self.shared.turns[phase as usize];
        // The sender lives in `shared`, which this place holds, so the wait can only end
        // with the turn.
        let _ = turn.subscribe().wait_for(|&next| next == self.place).await;
        let done = work.await;
        turn.send_replace(self.place + 1);
        done
    }
}

impl SpansBuffer {
    /// Writes a batch in its place of the write order: its payloads at once, its script calls
    /// after the previous place's, its queue deadlines (`now` as in
    /// [`SpansBuffer::process_spans`]) after the previous place's queue update. Each phase is
    /// tried again as `retry` says.
    ///
    /// `batch` is the result of [`SpansBuffer::prepare`]; an error (or any phase's) is
    /// returned once the place's turns were passed on, so the batches behind it still write.
    /// Writing the same batch again after a failure is harmless.
    pub(crate) async fn write_in_order(
        &self,
        place: WritePlace,
        batch: Result<PreparedBatch, BufferError>,
        now: i64,
        retry: WriteRetry,
    ) -> Result<ProcessStats, BufferError> {
        let batch = match batch {
            Ok(batch) => until_done(retry, || self.write_payloads(&batch))
                .await
                .map(|()| batch),
            Err(error) => Err(error),
        };
        let written = place
            .in_turn(Phase::Scripts, async {
                let batch = batch?;
                until_done(retry, || self.write_scripts(&batch)).await
            })
            .await;
        place
            .in_turn(Phase::Queues, async {
                let written = written?;
                until_done(retry, || self.queue_segments(&written, now)).await
            })
            .await
    }
}

/// Runs `attempt` until Redis accepts it, backing off between attempts as `retry` says, or
/// until it fails with an error that would repeat at every retry (`NOPERM`, `WRONGTYPE`, a
/// script error, a reply the store does not understand): that one is returned, instead of a
/// retry loop that never ends.
async fn until_done<T, F, Fut>(retry: WriteRetry, mut attempt: F) -> Result<T, BufferError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, BufferError>>,
{
    let WriteRetry::Backoff { first, max } = retry else {
        return attempt().await;
    };
    let mut backoff = first;
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
                backoff = (backoff * 2).min(max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn places_take_their_turns_in_the_order_they_were_taken() {
        let order = WriteOrder::new();
        let written = Arc::new(Mutex::new(Vec::new()));
        let places: Vec<WritePlace> = (0..8).map(|_| order.place()).collect();
        // Started in reverse, so any order but the places' would show.
        let mut tasks = Vec::new();
        for (index, place) in places.into_iter().enumerate().rev() {
            let written = Arc::clone(&written);
            tasks.push(tokio::spawn(async move {
                for phase in [Phase::Scripts, Phase::Queues] {
                    place
                        .in_turn(phase, async {
                            written.lock().unwrap().push((phase as usize, index));
                        })
                        .await;
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let written = written.lock().unwrap();
        for phase in [Phase::Scripts as usize, Phase::Queues as usize] {
            let order: Vec<usize> = written
                .iter()
                .filter(|(p, _)| *p == phase)
                .map(|&(_, index)| index)
                .collect();
            assert_eq!(order, (0..8).collect::<Vec<_>>());
        }
    }
}
