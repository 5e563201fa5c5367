//! The step trait every pipeline stage implements, and the factory that builds pipelines.

use std::time::{Duration, Instant};

use crate::commit::CommitRequest;
use crate::error::{BoxError, StrategyError, SubmitError};
use crate::message::{Message, Partition};

/// One stage of a pipeline: takes messages, does work, hands results to the step after it.
///
/// A pipeline is a chain of steps, each owning the next; the stream processor owns the first
/// and calls these methods from one thread.
///
/// A step need not be `Send`: nothing here crosses threads. A processor built on one thread
/// and run on another (the usual way: build, take its handle, spawn) moves its pipelines with
/// it, so [`StreamProcessor::new`](crate::processor::StreamProcessor::new) asks for `Send`
/// ones; [`StreamProcessor::local`](crate::processor::StreamProcessor::local) runs pipelines
/// that are not (an `Rc` payload, a step holding a `RefCell`) on the thread that built it.
///
/// # Backpressure
///
/// A step that cannot take a message right now returns [`SubmitError::MessageRejected`] with
/// the message inside. Nothing is cloned and nothing is lost: the caller keeps the message,
/// keeps calling [`poll`](Self::poll) so work drains, and submits it again. A step holding a
/// rejected message of its own rejects new input until that one is accepted; the
/// [`CarriedOver`](crate::CarriedOver) helper implements exactly this, and every built-in step
/// uses it.
///
/// # Commits
///
/// Offsets flow backwards. `poll` and `join` return a [`CommitRequest`] naming offsets whose
/// work is *done* in this step or any step after it (processed by the last step, filtered out,
/// folded into a finished batch). The stream processor feeds them to its
/// [`OffsetLedger`](crate::OffsetLedger), which commits a partition only up to its first
/// offset not yet done. A step must never drop a request returned by its next step: it merges
/// it into its own and returns it, even after an error (keep it for the next call).
///
/// # Examples
///
/// ```
/// use rill::steps::{CommitOffsets, RunTask};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let mut pipeline = RunTask::new(
///     |m: Message<&str>| Ok(m.map(str::len)),
///     CommitOffsets::new(std::time::Duration::ZERO),
/// );
/// let partition = Partition::new(Topic::new("words"), 0);
///
/// pipeline.submit(Message::broker("hello", partition.clone(), 0, None)).unwrap();
/// let done = pipeline.poll().unwrap().unwrap();
///
/// assert_eq!(done.offsets(&partition), vec![0..1]);
/// ```
pub trait ProcessingStrategy<T> {
    /// Does pending work and returns offsets that are now done.
    ///
    /// Called on every iteration of the consumer loop; must not block.
    ///
    /// # Errors
    ///
    /// [`StrategyError::InvalidMessage`] for a message found invalid after it was accepted
    /// (it goes to the dead-letter queue); [`StrategyError::Other`] stops the processor.
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError>;

    /// Offers a message to the step. `Ok` means accepted, not processed.
    ///
    /// # Errors
    ///
    /// [`SubmitError::MessageRejected`] with the message inside if the step is at capacity
    /// (see [Backpressure](#backpressure)); [`SubmitError::InvalidMessage`] if the message can
    /// never be processed. With `InvalidMessage` the step has taken the message (the error
    /// names the invalid one, usually this one but possibly one it held): the caller does not
    /// submit it again.
    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>>;

    /// Finishes all accepted work, waiting until `deadline` at most (`None`: as long as it
    /// takes), and returns the final offsets that are done.
    ///
    /// Work not finished by the deadline is abandoned: its offsets are not reported, so they
    /// are never committed and the broker delivers those messages again. The deadline is
    /// passed on unchanged to the next step, which therefore gets whatever time is left.
    ///
    /// # Errors
    ///
    /// As for [`poll`](Self::poll).
    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError>;

    /// Announces that nothing more will be submitted: the stream processor calls it right
    /// before [`join`](Self::join) on a revocation or shutdown.
    ///
    /// A step whose rejections exist only to pause consumption (a lagging background worker,
    /// a full store) may accept everything from now on, so the messages still in the pipeline
    /// reach the end before the deadline instead of waiting it out. A step that wraps a next
    /// step forwards the call; the default does nothing.
    fn close(&mut self) {}

    /// The assignment changed while this pipeline keeps running (incremental rebalancing, see
    /// the [processor](crate::processor::StreamProcessor)'s docs): messages of `assigned`
    /// partitions are submitted from now on, none of `revoked` ones any more.
    ///
    /// The processor hands a revoked partition over once every offset of it that was submitted
    /// is reported done (or at the join deadline). A step that holds work back by time (a
    /// batch window, a commit interval) releases it at its next [`poll`](Self::poll), so the
    /// revocation does not wait for the timer; a step with per-partition state updates it. A
    /// step that wraps a next step forwards the call; the default does nothing. Never called
    /// when the processor rebuilds the pipeline on every rebalance: a new pipeline is then
    /// built with the new partitions.
    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        let _ = (assigned, revoked);
    }

    /// Stops at once, abandoning work in progress (aborting tasks), and terminates the next step.
    fn terminate(&mut self);

    /// The next instant at which this step or a step after it has timed work to do (a batch
    /// window closing, a commit interval ending), so the processor does not sleep past it.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Whether every message this step accepted is done, here and in every step after it
    /// (processed by the last step, dropped or reported invalid), even if some of their
    /// offsets are still to be reported.
    ///
    /// A step that drops the last part of a split message asks it: the parts before it carry
    /// no offsets of their own, so only this says when the dropped part's offsets may be
    /// released. `false`, the default, is always safe: those offsets then wait for the next
    /// message forwarded or for `join`.
    fn is_idle(&self) -> bool {
        false
    }
}

impl<T, S> ProcessingStrategy<T> for Box<S>
where
    S: ProcessingStrategy<T> + ?Sized,
{
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        (**self).poll()
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        (**self).submit(message)
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        (**self).join(deadline)
    }

    fn close(&mut self) {
        (**self).close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        (**self).partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        (**self).terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        (**self).next_deadline()
    }

    fn is_idle(&self) -> bool {
        (**self).is_idle()
    }
}

/// Builds a pipeline for the partitions currently assigned.
///
/// The stream processor calls it from its own loop (never from inside a client library
/// callback) whenever the assignment changes, after the previous pipeline was joined and its
/// offsets committed. Any `FnMut(&[Partition]) -> S + Send` whose `S` is a step is a factory:
/// the closure returns its pipeline as it is (no `Box<dyn ..>` return type to spell out).
///
/// A factory that can fail (it opens a connection, reads a file) is
/// [`fallible`](crate::fallible): its error stops the processor with
/// [`RunError::Factory`](crate::processor::RunError::Factory).
///
/// `P` is the pipeline as the processor keeps it: `dyn ProcessingStrategy<T> + Send` (the
/// default) for a processor that may move to another thread, `dyn ProcessingStrategy<T>` for
/// one that stays where it was built
/// ([`StreamProcessor::local`](crate::processor::StreamProcessor::local)). A closure is a
/// factory of both, as far as its pipeline allows.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::steps::{CommitOffsets, RunTask};
/// use rill::{Message, Partition, ProcessingStrategyFactory};
///
/// let mut factory = |_: &[Partition]| {
///     RunTask::new(|m: Message<u32>| Ok(m.map(|n| n + 1)), CommitOffsets::new(Duration::ZERO))
/// };
/// let _pipeline = ProcessingStrategyFactory::<u32>::create(&mut factory, &[]);
/// ```
pub trait ProcessingStrategyFactory<T, P: ?Sized = dyn ProcessingStrategy<T> + Send>: Send {
    /// Builds a pipeline for `partitions` (sorted), the whole current assignment.
    fn create(&mut self, partitions: &[Partition]) -> Box<P>;

    /// Builds a pipeline, or says why it cannot; what the processor calls. By default
    /// [`create`](Self::create), which cannot fail.
    ///
    /// # Errors
    ///
    /// Whatever kept the factory from building the pipeline.
    fn try_create(&mut self, partitions: &[Partition]) -> Result<Box<P>, BoxError> {
        Ok(self.create(partitions))
    }

    /// The longest [`create`](Self::create) may block (a pipeline that waits at start for its
    /// workers): the processor counts as alive while it waits that long. Zero by default, a
    /// factory that does not wait.
    fn create_timeout(&self) -> Duration {
        Duration::ZERO
    }

    /// Whether the processor must join and rebuild the pipeline on every assignment change,
    /// also with a cooperative protocol: for pipelines that use the partitions given to
    /// [`create`](Self::create) and do not follow
    /// [`partitions_changed`](ProcessingStrategy::partitions_changed). `false` by default: with
    /// a cooperative protocol the pipeline keeps running through rebalances (incremental
    /// rebalancing) and the factory is called only when there is none.
    fn rebuilds_on_rebalance(&self) -> bool {
        false
    }
}

/// Boxes a step as the pipeline type `Self` of a processor: what lets one closure be a factory
/// of `Send` pipelines and of local ones.
pub trait BoxedPipeline<T, S> {
    /// `step`, boxed.
    fn boxed(step: S) -> Box<Self>;

    /// A pipeline whose first `poll` reports `error`: what a [`fallible`] factory's `create`
    /// returns when it could not build one.
    fn not_built(error: BoxError) -> Box<Self>;
}

impl<T, S: ProcessingStrategy<T> + Send + 'static> BoxedPipeline<T, S>
    for dyn ProcessingStrategy<T> + Send
{
    fn boxed(step: S) -> Box<Self> {
        Box::new(step)
    }

    fn not_built(error: BoxError) -> Box<Self> {
        Box::new(NotBuilt(Some(error)))
    }
}

impl<T, S: ProcessingStrategy<T> + 'static> BoxedPipeline<T, S> for dyn ProcessingStrategy<T> {
    fn boxed(step: S) -> Box<Self> {
        Box::new(step)
    }

    fn not_built(error: BoxError) -> Box<Self> {
        Box::new(NotBuilt(Some(error)))
    }
}

impl<T, P, F, S> ProcessingStrategyFactory<T, P> for F
where
    F: FnMut(&[Partition]) -> S + Send,
    P: BoxedPipeline<T, S> + ?Sized,
{
    fn create(&mut self, partitions: &[Partition]) -> Box<P> {
        P::boxed(self(partitions))
    }
}

/// Makes a factory of a closure that may fail; see [`fallible`].
#[derive(Debug)]
pub struct Fallible<F>(F);

/// A factory of `build`, which returns its pipeline or the error that keeps it from building
/// one; the error stops the processor with
/// [`RunError::Factory`](crate::processor::RunError::Factory).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::steps::CommitOffsets;
/// use rill::{Partition, ProcessingStrategyFactory, fallible};
///
/// let mut factory = fallible(|_: &[Partition]| {
///     let interval = "5".parse::<u64>()?; // from a file, say
///     Ok::<_, std::num::ParseIntError>(CommitOffsets::new(Duration::from_secs(interval)))
/// });
/// assert!(ProcessingStrategyFactory::<u32>::try_create(&mut factory, &[]).is_ok());
/// ```
pub const fn fallible<F>(build: F) -> Fallible<F> {
    Fallible(build)
}

impl<T, P, F, S, E> ProcessingStrategyFactory<T, P> for Fallible<F>
where
    F: FnMut(&[Partition]) -> Result<S, E> + Send,
    P: BoxedPipeline<T, S> + ?Sized,
    E: Into<BoxError>,
{
    /// The pipeline, or one whose first `poll` reports why it could not be built.
    fn create(&mut self, partitions: &[Partition]) -> Box<P> {
        match self.try_create(partitions) {
            Ok(pipeline) => pipeline,
            Err(error) => P::not_built(error),
        }
    }

    fn try_create(&mut self, partitions: &[Partition]) -> Result<Box<P>, BoxError> {
        match (self.0)(partitions) {
            Ok(pipeline) => Ok(P::boxed(pipeline)),
            Err(error) => Err(error.into()),
        }
    }
}

/// A factory whose pipelines are `inner`'s, each passed through `wrap`; see [`wrap_pipelines`].
#[derive(Debug)]
pub struct WrapPipelines<F, W> {
    inner: F,
    wrap: W,
}

/// A factory that builds its pipelines with `inner` and hands each, with the partitions it was
/// built for, to `wrap` (to record assignments, time the pipeline, put a step in front of it).
///
/// Unlike a closure that calls `inner`, it keeps what `inner` says of itself: its
/// [`try_create`](ProcessingStrategyFactory::try_create) errors, its
/// [`create_timeout`](ProcessingStrategyFactory::create_timeout) and whether it
/// [`rebuilds_on_rebalance`](ProcessingStrategyFactory::rebuilds_on_rebalance).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::steps::CommitOffsets;
/// use rill::{Partition, ProcessingStrategy, ProcessingStrategyFactory, wrap_pipelines};
///
/// let mut built = Vec::new();
/// let inner = |_: &[Partition]| CommitOffsets::new(Duration::ZERO);
/// let mut factory = wrap_pipelines(
///     inner,
///     move |partitions: &[Partition], pipeline: Box<dyn ProcessingStrategy<u32> + Send>| {
///         built.push(partitions.to_vec());
///         pipeline
///     },
/// );
/// let _pipeline = factory.create(&[]);
/// ```
pub const fn wrap_pipelines<F, W>(inner: F, wrap: W) -> WrapPipelines<F, W> {
    WrapPipelines { inner, wrap }
}

impl<T, P, F, W> ProcessingStrategyFactory<T, P> for WrapPipelines<F, W>
where
    P: ?Sized,
    F: ProcessingStrategyFactory<T, P>,
    W: FnMut(&[Partition], Box<P>) -> Box<P> + Send,
{
    fn create(&mut self, partitions: &[Partition]) -> Box<P> {
        let pipeline = self.inner.create(partitions);
        (self.wrap)(partitions, pipeline)
    }

    fn try_create(&mut self, partitions: &[Partition]) -> Result<Box<P>, BoxError> {
        let pipeline = self.inner.try_create(partitions)?;
        Ok((self.wrap)(partitions, pipeline))
    }

    fn create_timeout(&self) -> Duration {
        self.inner.create_timeout()
    }

    fn rebuilds_on_rebalance(&self) -> bool {
        self.inner.rebuilds_on_rebalance()
    }
}

/// The pipeline a [`Fallible`] factory's `create` returns when it could not build one.
#[derive(Debug)]
struct NotBuilt(Option<BoxError>);

impl NotBuilt {
    fn error(&mut self) -> StrategyError {
        StrategyError::Other(
            self.0
                .take()
                .unwrap_or_else(|| "the pipeline was not built".into()),
        )
    }
}

impl<T> ProcessingStrategy<T> for NotBuilt {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        Err(self.error())
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        Err(SubmitError::MessageRejected(message))
    }

    fn join(&mut self, _: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        Err(self.error())
    }

    fn terminate(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;
    use std::time::Duration;

    use super::*;
    use crate::processor::StreamProcessor;
    use crate::steps::{CommitOffsets, RunTask};
    use crate::testing::numbered_broker;

    /// A factory that says it waits at start and must be rebuilt on every rebalance.
    struct Particular;

    impl ProcessingStrategyFactory<u64> for Particular {
        fn create(&mut self, _: &[Partition]) -> Box<dyn ProcessingStrategy<u64> + Send> {
            Box::new(CommitOffsets::new(Duration::ZERO))
        }

        fn create_timeout(&self) -> Duration {
            Duration::from_secs(7)
        }

        fn rebuilds_on_rebalance(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_wrapped_factory_keeps_what_its_inner_factory_says_of_itself() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = std::sync::Arc::clone(&seen);
        let mut factory = wrap_pipelines(
            Particular,
            move |partitions: &[Partition], pipeline: Box<dyn ProcessingStrategy<u64> + Send>| {
                recorded.lock().unwrap().push(partitions.to_vec());
                pipeline
            },
        );
        let partition = Partition::new(crate::Topic::new("t"), 3);

        assert_eq!(factory.create_timeout(), Duration::from_secs(7));
        assert!(factory.rebuilds_on_rebalance());
        assert!(factory.try_create(std::slice::from_ref(&partition)).is_ok());
        assert_eq!(*seen.lock().unwrap(), [vec![partition]]);
    }

    #[test]
    fn a_failing_inner_factory_fails_the_wrapped_one_without_calling_wrap() {
        let wrapped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let called = std::sync::Arc::clone(&wrapped);
        let failing = fallible(|_: &[Partition]| {
            Err::<CommitOffsets, _>(std::io::Error::other("no connection"))
        });
        let mut factory = wrap_pipelines(
            failing,
            move |_: &[Partition], pipeline: Box<dyn ProcessingStrategy<u64> + Send>| {
                called.store(true, std::sync::atomic::Ordering::SeqCst);
                pipeline
            },
        );

        assert!(factory.try_create(&[]).is_err());
        assert!(!wrapped.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn a_closure_builds_pipelines_that_are_not_send_for_a_local_processor() {
        let (broker, topic) = numbered_broker("in", 1, 3);
        // The factory is `Send`; the pipeline it builds counts through an `Rc`, so is not.
        let factory = |_: &[Partition]| {
            let seen = Rc::new(Cell::new(0_u64));
            RunTask::new(
                move |m: Message<u64>| {
                    seen.set(seen.get() + 1);
                    Ok(m.map(|n| n + seen.get()))
                },
                CommitOffsets::new(Duration::ZERO),
            )
        };
        let mut processor =
            StreamProcessor::local(broker.subscribe("g", std::slice::from_ref(&topic)), factory);

        let partition = Partition::new(topic, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while broker.committed("g", &partition) != Some(3) {
            assert!(Instant::now() < deadline, "not all committed");
            processor.run_once().unwrap();
        }
        processor.shutdown().unwrap();
    }
}
