//! Run an async task per message on a tokio runtime, with bounded concurrency, in order.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;
use tokio::task::JoinHandle;

use super::run_blocking::BlockingPool;
use crate::carried_over::{CarriedOver, RETRY_INTERVAL, retry_until};
use crate::clock::{SharedClock, SystemClock, earliest};
use crate::commit::CommitRequest;
use crate::error::{BoxError, InvalidMessage, StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::metrics;
use crate::strategy::ProcessingStrategy;

/// How a task of [`RunTaskInThreads`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The message can never be processed: it goes to the dead-letter queue.
    #[error(transparent)]
    InvalidMessage(#[from] InvalidMessage),

    /// The task failed; the pipeline stops (retry inside the task if the failure is
    /// transient: nothing is dropped silently).
    #[error("task failed")]
    Failed(#[source] BoxError),
}

/// A task in flight: its handle (to abort it) and where it leaves its outcome.
///
/// The outcome comes through a channel rather than the handle so that it is there before
/// the task wakes a waiting loop: a handle reads as finished only a moment after the task's
/// last statement ran.
struct Task<U> {
    handle: JoinHandle<()>,
    outcome: oneshot::Receiver<Result<Message<U>, TaskError>>,
}

/// Spawns `task(message)` on a tokio runtime for each message and forwards the results in
/// submission order, with at most `concurrency` tasks in flight.
///
/// [`new`](Self::new) runs async tasks on a runtime the caller owns;
/// [`blocking`](Self::blocking) runs plain blocking or CPU-bound functions on threads of the
/// step's own, with the same guarantees.
///
/// Results are taken from the front of the queue only: a slow task holds back the finished
/// ones behind it, so order is kept and the next step sees messages as they were submitted.
///
/// # Backpressure
///
/// `submit` rejects when `concurrency` tasks are in flight or a result is held. When the next
/// step rejects a result, it is held and no later result is taken until it is accepted:
/// nothing is overwritten, lost or reordered.
///
/// # Join
///
/// Waits (checking every millisecond, never spinning) for the tasks until the deadline, then
/// aborts the rest; their offsets are never reported, so they are redelivered.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::steps::{CommitOffsets, RunTaskInThreads, TaskError};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let runtime = tokio::runtime::Runtime::new().unwrap();
/// let mut step = RunTaskInThreads::new(
///     |m: Message<u64>| async move { Ok::<_, TaskError>(m.map(|n| n + 1)) },
///     4,
///     runtime.handle().clone(),
///     CommitOffsets::new(Duration::ZERO),
/// );
/// let partition = Partition::new(Topic::new("numbers"), 0);
/// step.submit(Message::broker(1, partition.clone(), 0, None)).unwrap();
///
/// let done = step.join(None).unwrap().unwrap();
/// assert_eq!(done.offsets(&partition), vec![0..1]);
/// ```
pub struct RunTaskInThreads<F, N, U> {
    task: F,
    concurrency: usize,
    runtime: Handle,
    in_flight: VecDeque<Task<U>>,
    next_step: N,
    carried_over: CarriedOver<U>,
    clock: SharedClock,
    /// The runtime the step owns (see [`RunTaskInThreads::blocking`]), dropped after the
    /// tasks it runs.
    pool: Option<BlockingPool>,
    metric_name: &'static str,
}

impl<F, N, U> RunTaskInThreads<F, N, U> {
    /// Runs `task` for each message on `runtime`, at most `concurrency` (at least 1) at a
    /// time, in front of `next_step`.
    pub fn new(task: F, concurrency: usize, runtime: Handle, next_step: N) -> Self {
        Self {
            task,
            concurrency: concurrency.max(1),
            runtime,
            in_flight: VecDeque::new(),
            next_step,
            carried_over: CarriedOver::new(),
            clock: SystemClock::shared(),
            pool: None,
            metric_name: "run_task_in_threads",
        }
    }

    /// Names the step in its metrics' `step` label (default `run_task_in_threads`).
    #[must_use]
    pub const fn with_metric_name(mut self, name: &'static str) -> Self {
        self.metric_name = name;
        self
    }

    /// Keeps `pool` alive as long as the step.
    pub(super) fn owning(mut self, pool: BlockingPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Reads time from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }
}

impl<F, N, U> RunTaskInThreads<F, N, U>
where
    N: ProcessingStrategy<U>,
    U: Send + 'static,
{
    /// Forwards finished results from the front, stopping at the first unfinished task or
    /// when the next step pushes back.
    fn forward_finished(&mut self) -> Result<(), StrategyError> {
        while !self.carried_over.is_holding() {
            let Some(front) = self.in_flight.front_mut() else {
                break;
            };
            let outcome = match front.outcome.try_recv() {
                Ok(outcome) => outcome,
                Err(TryRecvError::Empty) => break,
                // Ended without an outcome: the task panicked.
                Err(TryRecvError::Closed) if front.handle.is_finished() => {
                    let error = match (&mut front.handle).now_or_never() {
                        Some(Err(join_error)) => StrategyError::other(join_error),
                        _ => StrategyError::other("a task ended without its outcome"),
                    };
                    self.in_flight.pop_front();
                    return Err(error);
                }
                Err(TryRecvError::Closed) => break,
            };
            self.in_flight.pop_front();
            match outcome {
                Ok(message) => self.carried_over.forward(&mut self.next_step, message)?,
                Err(TaskError::InvalidMessage(invalid)) => return Err(invalid.into()),
                Err(TaskError::Failed(error)) => return Err(StrategyError::Other(error)),
            }
        }
        ::metrics::gauge!(metrics::TASKS_IN_FLIGHT, metrics::STEP => self.metric_name)
            .set(self.in_flight.len() as f64);
        Ok(())
    }

    fn abort_all(&mut self) {
        for task in self.in_flight.drain(..) {
            task.handle.abort();
        }
    }
}

impl<T, U, F, Fut, N> ProcessingStrategy<T> for RunTaskInThreads<F, N, U>
where
    F: FnMut(Message<T>) -> Fut,
    Fut: Future<Output = Result<Message<U>, TaskError>> + Send + 'static,
    N: ProcessingStrategy<U>,
    U: Send + 'static,
{
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        // Forward finished results before polling the next step, so it sees them this round.
        self.carried_over.retry(&mut self.next_step)?;
        self.forward_finished()?;
        self.carried_over.poll_next(&mut self.next_step)?;
        Ok(self.carried_over.take_commit())
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        if self.carried_over.is_holding() || self.in_flight.len() >= self.concurrency {
            return Err(SubmitError::MessageRejected(message));
        }
        let task = (self.task)(message);
        let (sender, outcome) = oneshot::channel();
        let handle = self.runtime.spawn(async move {
            // Nobody reads it once the step is gone.
            let _ = sender.send(task.await);
            // A loop waiting for room looks again now rather than after its retry pause.
            crate::wake::notify();
        });
        self.in_flight.push_back(Task { handle, outcome });
        Ok(())
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        let clock = Arc::clone(&self.clock);
        let finished = retry_until(&*clock, deadline, || {
            self.carried_over.poll_next(&mut self.next_step)?;
            self.forward_finished()?;
            Ok::<_, StrategyError>(self.in_flight.is_empty())
        })?;
        if !finished {
            tracing::warn!(
                abandoned = self.in_flight.len(),
                "Join deadline passed with tasks in flight; aborting them."
            );
            self.abort_all();
        }
        self.carried_over
            .join_next(&mut self.next_step, deadline, &*self.clock)
    }

    fn close(&mut self) {
        self.next_step.close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        self.next_step.partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        self.abort_all();
        self.carried_over.clear();
        self.next_step.terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Task completions do not wake the processor: have it look again shortly.
        let soon = (!self.in_flight.is_empty()).then(|| self.clock.now() + RETRY_INTERVAL);
        earliest(soon, self.next_step.next_deadline())
    }

    fn is_idle(&self) -> bool {
        self.in_flight.is_empty() && !self.carried_over.is_holding() && self.next_step.is_idle()
    }
}

impl<F, N, U> Drop for RunTaskInThreads<F, N, U> {
    fn drop(&mut self) {
        // A dropped step must not leave tasks running whose results nobody will read.
        for task in self.in_flight.drain(..) {
            task.handle.abort();
        }
    }
}

impl<F, N: fmt::Debug, U> fmt::Debug for RunTaskInThreads<F, N, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunTaskInThreads")
            .field("concurrency", &self.concurrency)
            .field("in_flight", &self.in_flight.len())
            .field("next_step", &self.next_step)
            .field("holding", &self.carried_over.is_holding())
            .field("owns_its_threads", &self.pool.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::*;
    use crate::clock::Clock;
    use crate::testing::{RecordingStep, message, partition, poll_until, poll_until_error};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn at_most_concurrency_tasks_run_at_once() {
        let runtime = runtime();
        let gate = Arc::new(Notify::new());
        let gate_in = Arc::clone(&gate);
        let mut step = RunTaskInThreads::new(
            move |m: Message<u64>| {
                let gate = Arc::clone(&gate_in);
                async move {
                    gate.notified().await;
                    Ok(m)
                }
            },
            2,
            runtime.handle().clone(),
            RecordingStep::new(),
        );

        step.submit(message(0, 0)).unwrap();
        step.submit(message(1, 1)).unwrap();
        let third = step.submit(message(2, 2));

        // rust-arroyo let concurrency + 1 tasks run.
        assert!(matches!(third, Err(SubmitError::MessageRejected(_))));
        gate.notify_waiters();
    }

    #[test]
    fn results_keep_submission_order_when_later_tasks_finish_first() {
        let runtime = runtime();
        let next = RecordingStep::new();
        let mut step = RunTaskInThreads::new(
            |m: Message<u64>| async move {
                // Earlier messages sleep longer.
                tokio::time::sleep(Duration::from_millis(30 - 10 * m.payload())).await;
                Ok(m)
            },
            3,
            runtime.handle().clone(),
            next.clone(),
        );
        for offset in 0..3 {
            step.submit(message(offset, offset)).unwrap();
        }

        poll_until(&mut step, || next.accepted() == 3);

        assert_eq!(next.payloads(), [0, 1, 2]);
    }

    #[test]
    fn nothing_is_lost_or_reordered_when_the_next_step_rejects() {
        let runtime = runtime();
        let next = RecordingStep::new().reject_next(2);
        let mut step = RunTaskInThreads::new(
            |m: Message<u64>| async move { Ok(m) },
            3,
            runtime.handle().clone(),
            next.clone(),
        );
        for offset in 0..3 {
            step.submit(message(offset, offset)).unwrap();
        }

        // The probe that lost message 0 in rust-arroyo: all done, next step rejects twice.
        std::thread::sleep(Duration::from_millis(50));
        poll_until(&mut step, || next.accepted() == 3);

        assert_eq!(next.payloads(), [0, 1, 2]);
    }

    #[test]
    fn an_invalid_task_result_is_reported_from_poll() {
        let runtime = runtime();
        let mut step = RunTaskInThreads::new(
            |m: Message<u64>| async move {
                Err::<Message<u64>, _>(InvalidMessage::of(&m, "bad").into())
            },
            1,
            runtime.handle().clone(),
            RecordingStep::new(),
        );
        step.submit(message(9, 0)).unwrap();

        let error = poll_until_error(&mut step);

        let StrategyError::InvalidMessage(invalid) = error else {
            panic!("expected an invalid message, got {error:?}");
        };
        assert_eq!(invalid.offset(), Some(9));
    }

    #[test]
    fn join_waits_for_tasks_and_returns_their_offsets() {
        let runtime = runtime();
        let mut step = RunTaskInThreads::new(
            |m: Message<u64>| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(m)
            },
            2,
            runtime.handle().clone(),
            RecordingStep::new().commit_on_poll(),
        );
        step.submit(message(0, 0)).unwrap();
        step.submit(message(1, 1)).unwrap();

        let done = step
            .join(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap()
            .unwrap();

        assert_eq!(done.offsets(&partition(0)), vec![0..2]);
    }

    #[test]
    fn join_aborts_tasks_still_running_at_the_deadline() {
        let runtime = runtime();
        let next = RecordingStep::new().commit_on_poll();
        let clock = crate::clock::ManualClock::new();
        let mut step = RunTaskInThreads::new(
            |m: Message<u64>| async move {
                std::future::pending::<()>().await;
                Ok(m)
            },
            1,
            runtime.handle().clone(),
            next.clone(),
        )
        .with_clock(clock.shared());
        step.submit(message(0, 0)).unwrap();

        let done = step
            .join(Some(clock.now() + Duration::from_millis(100)))
            .unwrap();

        assert_eq!(done, None);
        assert!(next.payloads().is_empty());
        assert!(next.joined());
    }
}
