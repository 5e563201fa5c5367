//! Blocking and CPU-bound functions on a bounded pool of threads the step owns.
//!
//! `RunTaskInThreads` runs futures: a function that blocks (a synchronous client, a parser
//! that takes milliseconds) would need a runtime owned by the user and `spawn_blocking` by
//! hand. [`RunTaskInThreads::blocking`] does that once: it starts a small runtime of its own,
//! whose blocking pool holds at most `concurrency` threads, and runs each call there. Order,
//! backpressure and join are those of `RunTaskInThreads`, since it is one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::runtime::{Builder, Runtime};

use super::run_task_in_threads::{RunTaskInThreads, TaskError};
use crate::message::Message;

/// One call of a blocking function, as the task [`RunTaskInThreads::blocking`] runs.
pub type BlockingCall<U> = Pin<Box<dyn Future<Output = Result<Message<U>, TaskError>> + Send>>;

/// The task of a [`RunTaskInThreads::blocking`] step: hands each message to the pool.
pub type BlockingTask<T, U> = Box<dyn FnMut(Message<T>) -> BlockingCall<U> + Send>;

/// The worker threads of a [`RunTaskInThreads::blocking`] step could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The operating system refused the threads.
    #[error("could not start the worker threads")]
    Start(#[source] std::io::Error),
}

/// A runtime owned by one step. Dropped without waiting: a function still running (it cannot
/// be interrupted) finishes on its own and its result is discarded.
pub(super) struct BlockingPool(Option<Runtime>);

impl Drop for BlockingPool {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            // Waiting here would block the consumer loop, and panics inside a runtime.
            runtime.shutdown_background();
        }
    }
}

impl<N, U> RunTaskInThreads<(), N, U> {
    /// Runs the blocking `function` for each message on at most `concurrency` (at least 1)
    /// threads of the step's own, in front of `next_step`; results are forwarded in
    /// submission order.
    ///
    /// A call still running when a join's deadline passes cannot be interrupted: its result
    /// is discarded and the message redelivered.
    ///
    /// # Errors
    ///
    /// [`PoolError::Start`] if the threads cannot be started.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use rill::steps::{CommitOffsets, RunTaskInThreads};
    /// use rill::{Message, Partition, ProcessingStrategy, Topic};
    ///
    /// let slow_square = |m: Message<u64>| {
    ///     std::thread::sleep(Duration::from_millis(2)); // a blocking call
    ///     Ok(m.map(|n| n * n))
    /// };
    /// let mut step =
    ///     RunTaskInThreads::blocking(slow_square, 4, CommitOffsets::new(Duration::ZERO))?;
    /// let partition = Partition::new(Topic::new("numbers"), 0);
    /// step.submit(Message::broker(3, partition.clone(), 0, None)).unwrap();
    ///
    /// let done = step.join(None).unwrap().unwrap();
    /// assert_eq!(done.offsets(&partition), vec![0..1]);
    /// # Ok::<(), rill::steps::PoolError>(())
    /// ```
    pub fn blocking<T, G>(
        function: G,
        concurrency: usize,
        next_step: N,
    ) -> Result<RunTaskInThreads<BlockingTask<T, U>, N, U>, PoolError>
    where
        G: Fn(Message<T>) -> Result<Message<U>, TaskError> + Send + Sync + 'static,
        T: Send + 'static,
        U: Send + 'static,
    {
        let concurrency = concurrency.max(1);
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(concurrency)
            .thread_name("rill-blocking")
            .build()
            .map_err(PoolError::Start)?;
        let handle = runtime.handle().clone();
        let function = Arc::new(function);
        let task: BlockingTask<T, U> = Box::new(move |message: Message<T>| -> BlockingCall<U> {
            let function = Arc::clone(&function);
            Box::pin(async move {
                tokio::task::spawn_blocking(move || function(message))
                    .await
                    .unwrap_or_else(|panicked| Err(TaskError::Failed(Box::new(panicked))))
            })
        });
        Ok(RunTaskInThreads::new(task, concurrency, handle, next_step)
            .owning(BlockingPool(Some(runtime))))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use parking_lot::Mutex;

    use super::*;
    use crate::error::{InvalidMessage, StrategyError, SubmitError};
    use crate::strategy::ProcessingStrategy;
    use crate::testing::{RecordingStep, message, partition, poll_until, poll_until_error};

    #[test]
    fn at_most_concurrency_functions_run_at_once_and_a_full_step_hands_the_message_back() {
        let running = Arc::new(AtomicUsize::new(0));
        let (release, gate) = mpsc::channel::<()>();
        let gate = Arc::new(Mutex::new(gate));
        let counter = Arc::clone(&running);
        let next = RecordingStep::new();
        let mut step = RunTaskInThreads::blocking(
            move |m: Message<u64>| {
                counter.fetch_add(1, Ordering::SeqCst);
                gate.lock().recv().ok();
                Ok(m)
            },
            2,
            next.clone(),
        )
        .unwrap();
        step.submit(message(0, 0)).unwrap();
        step.submit(message(1, 1)).unwrap();

        let third = step.submit(message(2, 2));

        let Err(SubmitError::MessageRejected(back)) = third else {
            panic!("a full step must hand the message back");
        };
        assert_eq!(back.offset(), Some(2));
        poll_until(&mut step, || running.load(Ordering::SeqCst) >= 1);
        release.send(()).unwrap();
        release.send(()).unwrap();
        poll_until(&mut step, || next.accepted() == 2);
        assert_eq!(next.payloads(), [0, 1]);
    }

    #[test]
    fn results_keep_submission_order_when_later_calls_finish_first() {
        let next = RecordingStep::new();
        let mut step = RunTaskInThreads::blocking(
            |m: Message<u64>| {
                std::thread::sleep(Duration::from_millis(30 - 10 * m.payload()));
                Ok(m)
            },
            3,
            next.clone(),
        )
        .unwrap();
        for offset in 0..3 {
            step.submit(message(offset, offset)).unwrap();
        }

        poll_until(&mut step, || next.accepted() == 3);

        assert_eq!(next.payloads(), [0, 1, 2]);
    }

    #[test]
    fn an_invalid_result_is_reported_and_join_returns_the_offsets_done() {
        let mut step = RunTaskInThreads::blocking(
            |m: Message<u64>| match m.payload() {
                0 => Err(InvalidMessage::of(&m, "zero").into()),
                _ => Ok(m),
            },
            1,
            RecordingStep::new().commit_on_poll(),
        )
        .unwrap();
        step.submit(message(0, 0)).unwrap();
        let error = poll_until_error(&mut step);
        assert!(matches!(error, StrategyError::InvalidMessage(_)));
        step.submit(message(1, 1)).unwrap();

        let done = step
            .join(Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();

        assert_eq!(done.unwrap().offsets(&partition(0)), vec![1..2]);
    }

    #[test]
    fn a_panicking_function_fails_the_step_instead_of_losing_the_message() {
        let mut step = RunTaskInThreads::blocking(
            |_: Message<u64>| -> Result<Message<u64>, TaskError> { panic!("boom") },
            1,
            RecordingStep::new(),
        )
        .unwrap();
        step.submit(message(0, 0)).unwrap();

        let error = poll_until_error(&mut step);
        assert!(matches!(error, StrategyError::Other(_)));
    }
}
