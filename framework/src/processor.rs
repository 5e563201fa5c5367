//! The stream processor: runs a pipeline on a consumer, handles rebalances, commits.
//!
//! One loop, on one thread, owns the consumer, the pipeline, the [`OffsetLedger`] and the
//! dead-letter state. Each iteration it polls the consumer for one event (a message or an
//! assignment change), drives dead-letter deliveries, polls the pipeline, submits waiting
//! messages, commits what the ledger allows, and pauses or resumes partitions.
//!
//! # Where to call `run`
//!
//! [`StreamProcessor::run`] blocks until shutdown. Call it from a thread of its own (or
//! `tokio::task::spawn_blocking`), not from an async task: steps may wait briefly for their
//! work during a join. The processor never calls `Handle::block_on`, so steps that use a tokio
//! runtime (`RunTaskInThreads`) work either way.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::backends::{Consumer, ConsumerError, ConsumerEvent, RebalanceProtocol};
use crate::carried_over::retry_until;
use crate::clock::{SharedClock, SystemClock};
use crate::commit::CommitRequest;
use crate::dlq::{DeadLetterQueue, DlqError, DlqPolicy};
use crate::error::{BoxError, InvalidMessage, StrategyError, SubmitError};
use crate::ledger::OffsetLedger;
use crate::message::{Message, Partition};
use crate::metrics;
use crate::strategy::{ProcessingStrategy, ProcessingStrategyFactory};

/// Shortest pause between two attempts to commit positions whose commit failed transiently.
const COMMIT_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Most consumer events taken in one iteration of the loop, before the pipeline is polled.
///
/// Taking messages that are already there in a row, then submitting them, then polling the
/// pipeline once, spreads the cost of `poll` over many messages; the bound keeps timers and
/// dead-letter deliveries checked often.
pub const EVENTS_PER_ITERATION: usize = 64;

/// Longest wait for a consumer event while a revoked partition's work is in flight, so its
/// hand-over follows the end of that work closely.
const REVOCATION_CHECK_INTERVAL: Duration = Duration::from_millis(10);

/// Settings of a [`StreamProcessor`].
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    poll_timeout: Duration,
    backpressure_grace: Duration,
    join_timeout: Duration,
    max_pending_messages: usize,
    retry_interval: Duration,
    stall_timeout: Duration,
    rebuild_on_rebalance: bool,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            poll_timeout: Duration::from_millis(100),
            backpressure_grace: Duration::from_secs(5),
            join_timeout: Duration::from_secs(25),
            max_pending_messages: 1_000,
            retry_interval: Duration::from_millis(1),
            stall_timeout: Duration::from_secs(10),
            rebuild_on_rebalance: false,
        }
    }
}

impl ProcessorConfig {
    /// Longest wait for a consumer event when idle (default 100 ms); shortened to the
    /// pipeline's [`next_deadline`](ProcessingStrategy::next_deadline).
    #[must_use]
    pub const fn with_poll_timeout(mut self, timeout: Duration) -> Self {
        self.poll_timeout = timeout;
        self
    }

    /// How long the pipeline may reject continuously before all partitions are paused
    /// (default 5 s). Pausing makes librdkafka drop its prefetched messages, so short bursts
    /// of backpressure are ridden out without it.
    #[must_use]
    pub const fn with_backpressure_grace(mut self, grace: Duration) -> Self {
        self.backpressure_grace = grace;
        self
    }

    /// How long a rebalance or shutdown waits for the pipeline to finish its work (default
    /// 25 s, below Kafka's usual session timeout).
    #[must_use]
    pub const fn with_join_timeout(mut self, timeout: Duration) -> Self {
        self.join_timeout = timeout;
        self
    }

    /// How many polled messages may wait for the pipeline (default 1000); when reached, all
    /// partitions are paused at once, whatever the grace period.
    #[must_use]
    pub const fn with_max_pending_messages(mut self, count: usize) -> Self {
        self.max_pending_messages = count;
        self
    }

    /// The pause between two attempts to submit a rejected message (default 1 ms, so at most
    /// about a thousand retries per second).
    #[must_use]
    pub const fn with_retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// How long the loop may go without starting an iteration, beyond the waits it bounds
    /// itself (a join up to its deadline, a factory up to its
    /// [`create_timeout`](ProcessingStrategyFactory::create_timeout)), before
    /// [`Liveness::is_alive`] says it is stuck (default 10 s).
    #[must_use]
    pub const fn with_stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Joins and rebuilds the pipeline on every assignment change, whatever the consumer's
    /// [protocol](Consumer::rebalance_protocol) (default `false`: incremental rebalancing when
    /// it is cooperative, see [Rebalances](StreamProcessor#rebalances)). For a pipeline that
    /// reads its partitions only when the factory builds it and does not follow
    /// [`partitions_changed`](ProcessingStrategy::partitions_changed); a factory can say so
    /// itself ([`rebuilds_on_rebalance`](ProcessingStrategyFactory::rebuilds_on_rebalance)).
    #[must_use]
    pub const fn with_rebuild_on_rebalance(mut self, rebuild: bool) -> Self {
        self.rebuild_on_rebalance = rebuild;
        self
    }
}

/// Whether the processor loop is alive, for a liveness probe (a health file, an HTTP check):
/// readable from any thread through [`ProcessorHandle::liveness`].
///
/// The loop marks itself alive at every iteration, also with no partition assigned (a member
/// of a group with more members than partitions polls and is alive), and before each wait it
/// bounds itself (a join during a rebalance or shutdown, the factory's startup) for that wait
/// plus the stall timeout. So it reads "not alive" only when the loop is stuck past every
/// bound it set, never because it is idle.
#[derive(Debug, Clone)]
pub struct Liveness {
    base: Instant,
    /// Milliseconds after `base` until which the loop counts as alive; 0 before it started.
    alive_until: Arc<AtomicU64>,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            alive_until: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Liveness {
    /// Whether the loop showed it is alive recently enough (see the type's docs).
    pub fn is_alive(&self) -> bool {
        let now = self.millis(Instant::now());
        now < self.alive_until.load(Ordering::Acquire)
    }

    /// Counts the loop as alive until `until`.
    fn alive_until(&self, until: Instant) {
        self.alive_until
            .store(self.millis(until).max(1), Ordering::Release);
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }
}

/// Asks a running processor to stop or to rebuild its pipeline; clones control the same
/// processor, from any thread.
#[derive(Debug, Clone, Default)]
pub struct ProcessorHandle {
    shutdown: Arc<AtomicBool>,
    rebuild: Arc<AtomicBool>,
    liveness: Liveness,
    stats: Arc<parking_lot::Mutex<ProcessorStats>>,
}

impl ProcessorHandle {
    /// Asks for a graceful stop: [`StreamProcessor::run`] joins the pipeline, commits, closes
    /// the consumer and returns.
    pub fn signal_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
    }

    /// Whether a stop was asked for.
    pub fn is_shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Asks for the pipeline to be rebuilt for the same partitions: the processor joins it
    /// (up to the join timeout), commits, and asks the factory for a new one. This is how new
    /// settings (a reloaded configuration the factory reads) take effect without a restart or
    /// a rebalance. Several requests before the next iteration make one rebuild.
    pub fn request_rebuild(&self) {
        self.rebuild.store(true, Ordering::Release);
    }

    /// Whether the processor loop is alive; see [`Liveness`].
    pub const fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// What the processor did so far, as of its last iteration: readable from any thread
    /// while [`StreamProcessor::run`] owns the processor.
    pub fn stats(&self) -> ProcessorStats {
        self.stats.lock().clone()
    }

    fn take_rebuild_request(&self) -> bool {
        self.rebuild.swap(false, Ordering::AcqRel)
    }
}

/// Counters of what a processor did, for summaries and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessorStats {
    /// Messages received from the consumer.
    pub messages_polled: u64,
    /// Messages the pipeline accepted.
    pub messages_submitted: u64,
    /// Submissions the pipeline rejected.
    pub rejections: u64,
    /// Invalid messages reported by the pipeline.
    pub invalid_messages: u64,
    /// Invalid messages whose dead-letter delivery was confirmed.
    pub dead_lettered: u64,
    /// Invalid messages whose dead-letter delivery failed every attempt and that were committed
    /// past ([`Undeliverable::CommitPast`](crate::dlq::Undeliverable::CommitPast)).
    pub dead_letters_dropped: u64,
    /// Commits sent to the consumer.
    pub commits: u64,
    /// Times all partitions were paused.
    pub pauses: u64,
    /// Assignment changes handled.
    pub rebalances: u64,
}

/// Why [`StreamProcessor::run`] stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// A step failed with [`StrategyError::Other`].
    #[error("pipeline step failed")]
    Strategy(#[source] BoxError),

    /// A step panicked; the pipeline was dropped.
    #[error("pipeline step panicked during {during}: {message}")]
    Panicked {
        /// The call that panicked (`poll`, `submit`, `join`, `create`).
        during: &'static str,
        /// The panic message.
        message: String,
    },

    /// The consumer failed.
    #[error("consumer failed")]
    Consumer(#[from] ConsumerError),

    /// Dead-lettering failed or hit a limit.
    #[error("dead-letter queue failed")]
    DeadLetter(#[from] DlqError),

    /// The factory could not build a pipeline
    /// ([`try_create`](ProcessingStrategyFactory::try_create) failed).
    #[error("the factory could not build a pipeline")]
    Factory(#[source] BoxError),
}

/// Runs a pipeline, built by a factory for each assignment, on a [`Consumer`].
///
/// # Backpressure
///
/// A rejected message is kept (with any messages polled after it, up to
/// [`max_pending_messages`](ProcessorConfig::with_max_pending_messages)) and retried at most
/// once per [`retry_interval`](ProcessorConfig::with_retry_interval). While it waits, further
/// messages stay in the consumer's own queue: the consumer is polled for one event per
/// [`poll_timeout`](ProcessorConfig::with_poll_timeout), so assignment changes are handled
/// without piling messages up. After
/// [`backpressure_grace`](ProcessorConfig::with_backpressure_grace) of continuous rejection, or
/// with the pending queue full, all partitions are paused; they resume once every waiting
/// message was accepted, so one accepted message does not resume what the next rejection
/// pauses again.
///
/// # Commits
///
/// Every polled offset is recorded in an [`OffsetLedger`]; offsets the pipeline reports done,
/// and offsets whose dead-letter delivery is confirmed, are marked. A partition is committed up
/// to its low watermark, so commits never pass unfinished work and never go backwards.
///
/// # Rebalances
///
/// With a consumer whose [protocol](Consumer::rebalance_protocol) is cooperative (and
/// [`rebuild_on_rebalance`](ProcessorConfig::with_rebuild_on_rebalance) off), rebalancing is
/// *incremental*: the pipeline keeps running through it and the factory is called only for the
/// first assignment. Newly assigned partitions join it; a revoked partition's waiting messages
/// are dropped (never committed, so redelivered to the new owner), nothing more of it is
/// submitted, and the partitions that stay keep flowing while the revoked one's work in flight
/// finishes. Once none is left (or at the [`join_timeout`](ProcessorConfig::with_join_timeout),
/// leaving the rest to the next owner), it is committed and the consumer is told the
/// revocation is complete. The pipeline learns of both through
/// [`partitions_changed`](ProcessingStrategy::partitions_changed).
///
/// Otherwise (an eager protocol, or rebuilding asked for), on any assignment change the
/// pipeline is joined (up to the join timeout), what it finished is committed, and a new
/// pipeline is built for the new assignment. Pending messages of revoked partitions are dropped,
/// and the consumer is told when a revocation is complete. Work a timed-out join abandoned on a
/// partition that stays assigned is replayed: the consumer is rewound to that partition's
/// watermark.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::backends::local::LocalBroker;
/// use rill::processor::StreamProcessor;
/// use rill::steps::{CommitOffsets, RunTask};
/// use rill::{Message, Partition, ProcessingStrategy, Topic};
///
/// let broker = LocalBroker::new();
/// let topic = Topic::new("numbers");
/// broker.create_topic(&topic, 1);
/// let partition = Partition::new(topic.clone(), 0);
/// for n in 0..10_u64 {
///     broker.produce_to(&partition, n).unwrap();
/// }
///
/// let consumer = broker.subscribe("doubler", &[topic]);
/// let factory = |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
///     Box::new(RunTask::new(
///         |m: Message<u64>| Ok(m.map(|n| n * 2)),
///         CommitOffsets::new(Duration::ZERO),
///     ))
/// };
/// let mut processor = StreamProcessor::new(consumer, factory);
///
/// while broker.committed("doubler", &partition) != Some(10) {
///     processor.run_once().unwrap();
/// }
/// processor.shutdown().unwrap();
/// ```
///
/// # Threads
///
/// `P` is the pipeline as the processor keeps it. With [`new`](Self::new) it is `Send`, and so
/// is the processor (its consumer and messages permitting): build it, take its
/// [`handle`](Self::handle), run it on a thread of its own. [`local`](Self::local) takes
/// pipelines that are not `Send`, and the processor then stays on the thread that built it.
pub struct StreamProcessor<T, C, P: ?Sized = dyn ProcessingStrategy<T> + Send> {
    consumer: C,
    factory: Box<dyn ProcessingStrategyFactory<T, P>>,
    strategy: Option<Box<P>>,
    ledger: OffsetLedger,
    pending: VecDeque<Message<T>>,
    dlq: Option<DeadLetterQueue<T>>,
    config: ProcessorConfig,
    clock: SharedClock,
    handle: ProcessorHandle,
    backpressure_since: Option<Instant>,
    retry_at: Option<Instant>,
    /// When the consumer was last polled.
    consumer_polled_at: Option<Instant>,
    paused: Vec<Partition>,
    /// Partitions revoked incrementally whose work is still in flight, with the instant at
    /// which they are handed over anyway.
    revoking: HashMap<Partition, Instant>,
    committed: HashMap<Partition, u64>,
    /// Positions whose commit failed transiently, retried with the next commit.
    uncommitted: HashMap<Partition, u64>,
    /// No retry-only commit before this instant, so a refusing broker is not hammered.
    commit_retry_at: Option<Instant>,
    stats: ProcessorStats,
    closed: bool,
}

impl<T: 'static, C: Consumer<T>> StreamProcessor<T, C> {
    /// A processor polling `consumer` and building pipelines with `factory`, with default
    /// settings, the system clock and no dead-letter queue (invalid messages are logged and
    /// skipped).
    pub fn new(consumer: C, factory: impl ProcessingStrategyFactory<T> + 'static) -> Self {
        Self::from_factory(consumer, Box::new(factory))
    }
}

impl<T: 'static, C: Consumer<T>> StreamProcessor<T, C, dyn ProcessingStrategy<T>> {
    /// As [`new`](StreamProcessor::new), for pipelines that need not be `Send`: the
    /// processor runs on the thread that built it.
    ///
    /// # Examples
    ///
    /// Payloads behind an `Rc`:
    ///
    /// ```
    /// use std::rc::Rc;
    /// use std::time::Duration;
    /// use rill::backends::local::LocalBroker;
    /// use rill::processor::StreamProcessor;
    /// use rill::steps::{CommitOffsets, RunTask};
    /// use rill::{Message, Partition, Topic};
    ///
    /// let broker = LocalBroker::new();
    /// let topic = Topic::new("words");
    /// broker.create_topic(&topic, 1);
    /// let partition = Partition::new(topic.clone(), 0);
    /// for word in ["a", "bb", "ccc"] {
    ///     broker.produce_to(&partition, Rc::<str>::from(word)).unwrap();
    /// }
    ///
    /// let factory = |_: &[Partition]| {
    ///     RunTask::new(
    ///         |m: Message<Rc<str>>| Ok(m.map(|word| Rc::<str>::from(word.to_uppercase()))),
    ///         CommitOffsets::new(Duration::ZERO),
    ///     )
    /// };
    /// let mut processor = StreamProcessor::local(broker.subscribe("upper", &[topic]), factory);
    /// while broker.committed("upper", &partition) != Some(3) {
    ///     processor.run_once().unwrap();
    /// }
    /// processor.shutdown().unwrap();
    /// ```
    ///
    /// Such a processor cannot move to another thread:
    ///
    /// ```compile_fail
    /// # use std::rc::Rc;
    /// # use std::time::Duration;
    /// # use rill::backends::local::LocalBroker;
    /// # use rill::processor::StreamProcessor;
    /// # use rill::steps::{CommitOffsets, RunTask};
    /// # use rill::{Message, Partition, Topic};
    /// let broker = LocalBroker::<Rc<str>>::new();
    /// let factory = |_: &[Partition]| {
    ///     RunTask::new(|m: Message<Rc<str>>| Ok(m), CommitOffsets::new(Duration::ZERO))
    /// };
    /// let mut processor = StreamProcessor::local(broker.subscribe("g", &[Topic::new("t")]), factory);
    /// std::thread::spawn(move || processor.run());
    /// ```
    pub fn local(
        consumer: C,
        factory: impl ProcessingStrategyFactory<T, dyn ProcessingStrategy<T>> + 'static,
    ) -> Self {
        Self::from_factory(consumer, Box::new(factory))
    }
}

impl<T: 'static, C: Consumer<T>, P: ProcessingStrategy<T> + ?Sized> StreamProcessor<T, C, P> {
    fn from_factory(consumer: C, factory: Box<dyn ProcessingStrategyFactory<T, P>>) -> Self {
        Self {
            consumer,
            factory,
            strategy: None,
            ledger: OffsetLedger::new(),
            pending: VecDeque::new(),
            dlq: None,
            config: ProcessorConfig::default(),
            clock: SystemClock::shared(),
            handle: ProcessorHandle::default(),
            backpressure_since: None,
            retry_at: None,
            consumer_polled_at: None,
            paused: Vec::new(),
            revoking: HashMap::new(),
            committed: HashMap::new(),
            uncommitted: HashMap::new(),
            commit_retry_at: None,
            stats: ProcessorStats::default(),
            closed: false,
        }
    }

    /// Uses `config`.
    #[must_use]
    pub fn with_config(mut self, config: ProcessorConfig) -> Self {
        self.config = config;
        self
    }

    /// Reads time (grace periods, join deadlines) from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Sends invalid messages to a dead-letter queue.
    #[must_use]
    pub fn with_dlq(mut self, policy: DlqPolicy<T>) -> Self {
        self.dlq = Some(DeadLetterQueue::new(policy));
        self
    }

    /// A handle to stop [`run`](Self::run) from another thread.
    pub fn handle(&self) -> ProcessorHandle {
        self.handle.clone()
    }

    /// What the processor did so far.
    pub fn stats(&self) -> ProcessorStats {
        let mut stats = self.stats.clone();
        stats.dead_lettered = self.dlq.as_ref().map_or(0, DeadLetterQueue::delivered);
        stats.dead_letters_dropped = self.dlq.as_ref().map_or(0, DeadLetterQueue::dropped);
        stats
    }

    /// The last position committed for each partition.
    pub const fn committed(&self) -> &HashMap<Partition, u64> {
        &self.committed
    }

    /// The consumer.
    pub const fn consumer(&self) -> &C {
        &self.consumer
    }

    /// Runs until [`ProcessorHandle::signal_shutdown`], then stops gracefully (join, final
    /// commit, close).
    ///
    /// # Errors
    ///
    /// The first [`RunError`]; the pipeline is then terminated (or dropped, after a panic)
    /// and the consumer closed, without a final commit.
    pub fn run(&mut self) -> Result<(), RunError> {
        while !self.handle.is_shutdown_requested() {
            if let Err(error) = self.run_once() {
                self.abort(&error);
                return Err(error);
            }
        }
        self.shutdown()
    }

    /// One iteration of the loop; [`run`](Self::run) calls it until shutdown.
    ///
    /// # Errors
    ///
    /// As [`run`](Self::run), but nothing is terminated or closed.
    pub fn run_once(&mut self) -> Result<(), RunError> {
        self.alive_for(Duration::ZERO);
        if self.handle.take_rebuild_request() {
            self.rebuild_in_place()?;
        }
        self.poll_consumer()?;
        self.poll_dlq()?;
        self.poll_strategy()?;
        self.submit_pending()?;
        self.commit()?;
        self.finish_revocations(false)?;
        self.update_pause()?;
        self.publish_stats();
        Ok(())
    }

    fn publish_stats(&self) {
        *self.handle.stats.lock() = self.stats();
    }

    /// Stops gracefully: joins the pipeline (up to the join timeout), waits for dead-letter
    /// deliveries, commits, and closes the consumer.
    ///
    /// # Errors
    ///
    /// A failure while joining or committing; the consumer is closed anyway.
    pub fn shutdown(&mut self) -> Result<(), RunError> {
        if self.closed {
            return Ok(());
        }
        let deadline = self.clock.now() + self.config.join_timeout;
        let drained = self
            .drain(deadline)
            .and_then(|()| self.finish_revocations(true));
        if let Err(error) = &drained {
            self.abort(error);
            return drained;
        }
        self.pending.clear();
        self.closed = true;
        self.publish_stats();
        self.consumer.close()?;
        Ok(())
    }

    fn abort(&mut self, error: &RunError) {
        if let Some(mut strategy) = self.strategy.take() {
            // A panicked pipeline is in an unknown state: drop it without calling into it.
            if !matches!(error, RunError::Panicked { .. }) {
                let _ = catch_unwind(AssertUnwindSafe(|| strategy.terminate()));
            }
        }
        self.pending.clear();
        if !self.closed {
            self.closed = true;
            if let Err(close_error) = self.consumer.close() {
                tracing::warn!(%close_error, "Closing the consumer after a failure failed too.");
            }
        }
    }

    /// Takes the events the consumer has ready: waits for the first (see
    /// [`poll_timeout`](Self::poll_timeout)), then takes messages already there without
    /// waiting, up to [`EVENTS_PER_ITERATION`] or a full pending queue. An assignment change
    /// ends the round, so the new pipeline is polled at once.
    ///
    /// While the pipeline rejects, messages are left in the consumer (librdkafka keeps its
    /// prefetch) rather than piled into `pending`: the consumer is then polled only once per
    /// [`poll_timeout`](ProcessorConfig::with_poll_timeout), for one event, so assignment
    /// changes are still handled, and the loop waits for the next retry instead. Pausing would
    /// throw the prefetch away; a pipeline bound by its writer rejects most of the time.
    fn poll_consumer(&mut self) -> Result<(), RunError> {
        let now = self.clock.now();
        let mut timeout = self.poll_timeout(now);
        let holding_back = self.backpressure_since.is_some() && !self.pending.is_empty();
        if holding_back
            && self
                .consumer_polled_at
                .is_some_and(|at| now.saturating_duration_since(at) < self.config.poll_timeout)
        {
            // Room usually comes from a task finishing on another thread, which ends the
            // wait; the retry is due then, whatever the pause left.
            self.clock.wait(timeout);
            self.retry_at = None;
            return Ok(());
        }
        self.consumer_polled_at = Some(now);
        let polled_before = self.stats.messages_polled;
        let result = self.take_ready_events(&mut timeout, holding_back);
        // One metric update per round, not per message: a recorder's lookup costs more than
        // the bookkeeping of a message.
        let polled = self.stats.messages_polled - polled_before;
        if polled > 0 {
            ::metrics::counter!(metrics::MESSAGES_POLLED).increment(polled);
        }
        result
    }

    fn take_ready_events(
        &mut self,
        timeout: &mut Duration,
        holding_back: bool,
    ) -> Result<(), RunError> {
        let events = if holding_back {
            1
        } else {
            EVENTS_PER_ITERATION
        };
        for _ in 0..events {
            match self.consumer.poll(*timeout) {
                Ok(Some(event)) => {
                    let is_message = matches!(event, ConsumerEvent::Message(_));
                    self.handle_event(event)?;
                    if !is_message || self.pending.len() >= self.config.max_pending_messages {
                        break;
                    }
                }
                Ok(None) => break,
                Err(ConsumerError::Transient(error)) => {
                    tracing::warn!(%error, "Transient consumer error; polling again.");
                    break;
                }
                Err(error) => return Err(error.into()),
            }
            *timeout = Duration::ZERO;
        }
        Ok(())
    }

    fn poll_timeout(&self, now: Instant) -> Duration {
        if !self.pending.is_empty() && self.strategy.is_some() {
            return self
                .retry_at
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        }
        let mut timeout = self.config.poll_timeout;
        if let Some(deadline) = self.strategy.as_ref().and_then(|s| s.next_deadline()) {
            timeout = timeout.min(deadline.saturating_duration_since(now));
        }
        if self.dlq.as_ref().is_some_and(|dlq| !dlq.is_idle()) {
            timeout = timeout.min(self.config.retry_interval);
        }
        if !self.revoking.is_empty() {
            // The group waits for the hand-over: look again soon after the work finishes.
            timeout = timeout.min(REVOCATION_CHECK_INTERVAL);
        }
        timeout
    }

    fn handle_event(&mut self, event: ConsumerEvent<T>) -> Result<(), RunError> {
        match event {
            ConsumerEvent::Message(message) => {
                self.stats.messages_polled += 1;
                let recorded = match (message.partition(), message.offset()) {
                    (Some(partition), Some(offset)) => {
                        (self.revoking.is_empty() || !self.revoking.contains_key(partition))
                            && self.ledger.record_polled(partition, offset)
                    }
                    _ => false,
                };
                if recorded {
                    self.pending.push_back(message);
                } else {
                    tracing::warn!(?message, "Dropping a message of a partition not assigned.");
                }
                Ok(())
            }
            ConsumerEvent::Assigned(partitions) => self.assign(partitions),
            ConsumerEvent::Revoked(partitions) => self.revoke(&partitions),
        }
    }

    /// Whether assignment changes are handled incrementally, keeping the pipeline running.
    fn incremental(&self) -> bool {
        !self.config.rebuild_on_rebalance
            && !self.factory.rebuilds_on_rebalance()
            && self.consumer.rebalance_protocol() == RebalanceProtocol::Cooperative
    }

    fn assign(&mut self, partitions: HashMap<Partition, u64>) -> Result<(), RunError> {
        self.stats.rebalances += 1;
        ::metrics::counter!(metrics::PARTITIONS_ASSIGNED).increment(partitions.len() as u64);
        tracing::info!(partitions = ?partitions.keys().collect::<Vec<_>>(), "Partitions assigned.");
        if self.incremental() {
            return self.assign_incrementally(partitions);
        }
        if self.strategy.is_some() {
            let deadline = self.clock.now() + self.config.join_timeout;
            self.drain(deadline)?;
            self.rewind_abandoned()?;
        }
        for (partition, start) in partitions {
            if let Some(dlq) = &mut self.dlq {
                dlq.assign(&partition, start);
            }
            self.ledger.assign(partition, start);
        }
        self.rebuild()
    }

    fn revoke(&mut self, partitions: &[Partition]) -> Result<(), RunError> {
        self.stats.rebalances += 1;
        ::metrics::counter!(metrics::PARTITIONS_REVOKED).increment(partitions.len() as u64);
        tracing::info!(?partitions, "Partitions revoked.");
        if self.incremental() {
            return self.revoke_incrementally(partitions);
        }
        let deadline = self.clock.now() + self.config.join_timeout;
        self.drain(deadline)?;
        // Never committed, so the next owner reads them again.
        self.pending
            .retain(|m| m.partition().is_some_and(|p| !partitions.contains(p)));
        for partition in partitions {
            self.forget(partition);
        }
        self.rewind_abandoned()?;
        self.consumer.complete_revocation(partitions)?;
        self.rebuild()
    }

    /// Forgets everything about a partition given up: its ledger, dead letters, pause and
    /// commits. Done reports still to come for it are ignored.
    fn forget(&mut self, partition: &Partition) {
        self.ledger.revoke(partition);
        if let Some(dlq) = &mut self.dlq {
            dlq.forget(partition);
        }
        self.paused.retain(|p| p != partition);
        self.committed.remove(partition);
        self.uncommitted.remove(partition);
    }

    /// Adds partitions to the running pipeline; builds one only if there is none yet.
    fn assign_incrementally(
        &mut self,
        partitions: HashMap<Partition, u64>,
    ) -> Result<(), RunError> {
        let mut added: Vec<Partition> = partitions.keys().cloned().collect();
        added.sort();
        for (partition, start) in partitions {
            // A group never gives a partition back before its revocation completed; should one
            // do so, the old ownership is over.
            if self.revoking.remove(&partition).is_some() {
                self.forget(&partition);
            }
            if let Some(dlq) = &mut self.dlq {
                dlq.assign(&partition, start);
            }
            self.ledger.assign(partition, start);
        }
        let Some(strategy) = self.strategy.as_mut() else {
            return self.rebuild();
        };
        if added.is_empty() {
            return Ok(());
        }
        guard("partitions_changed", || {
            strategy.partitions_changed(&added, &[])
        })?;
        // Paused for backpressure: the newcomers wait with the others.
        if !self.paused.is_empty() {
            self.consumer.pause(&added)?;
            self.paused.extend(added);
        }
        Ok(())
    }

    /// Stops feeding revoked partitions to the running pipeline and lets their work in flight
    /// finish; [`finish_revocations`](Self::finish_revocations) hands them over.
    fn revoke_incrementally(&mut self, partitions: &[Partition]) -> Result<(), RunError> {
        let deadline = self.clock.now() + self.config.join_timeout;
        // Waiting messages are never submitted nor committed: the next owner reads them again.
        // They are the last polled of their partition, so the ledger forgets its tail.
        let mut dropped_from: HashMap<Partition, u64> = HashMap::new();
        self.pending.retain(|m| match (m.partition(), m.offset()) {
            (Some(partition), Some(offset)) if partitions.contains(partition) => {
                let from = dropped_from.entry(partition.clone()).or_insert(offset);
                *from = (*from).min(offset);
                false
            }
            _ => true,
        });
        for (partition, from) in &dropped_from {
            self.ledger.forget_polled_from(partition, *from);
        }
        if self.pending.is_empty() {
            self.backpressure_since = None;
            self.retry_at = None;
        }
        self.paused.retain(|p| !partitions.contains(p));
        for partition in partitions {
            self.revoking.insert(partition.clone(), deadline);
        }
        if let Some(strategy) = self.strategy.as_mut() {
            guard("partitions_changed", || {
                strategy.partitions_changed(&[], partitions)
            })?;
        }
        self.finish_revocations(false)
    }

    /// Hands over the revoked partitions whose work is all done (or all of them with `force`,
    /// or those past their deadline): commits them, forgets them, and completes their
    /// revocation.
    fn finish_revocations(&mut self, force: bool) -> Result<(), RunError> {
        if self.revoking.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let mut ready = Vec::new();
        for (partition, &deadline) in &self.revoking {
            let in_flight = self.ledger.in_flight(partition);
            if in_flight == 0 || force || now >= deadline {
                if in_flight > 0 {
                    tracing::warn!(
                        %partition,
                        in_flight,
                        "Handing a revoked partition over with work in flight; the next owner \
                         reads it again."
                    );
                }
                ready.push(partition.clone());
            }
        }
        if ready.is_empty() {
            return Ok(());
        }
        ready.sort();
        // As in a drain: positions whose commit just failed get their last chance now.
        self.commit_retry_at = None;
        self.commit()?;
        for partition in &ready {
            self.revoking.remove(partition);
            self.forget(partition);
        }
        tracing::info!(partitions = ?ready, "Revocation complete.");
        self.consumer.complete_revocation(&ready)?;
        Ok(())
    }

    /// Joins the pipeline, dead-letters what it reports, waits for dead-letter deliveries and
    /// commits; all bounded by `deadline`.
    fn drain(&mut self, deadline: Instant) -> Result<(), RunError> {
        self.alive_for(deadline.saturating_duration_since(self.clock.now()));
        if let Some(mut strategy) = self.strategy.take() {
            let started = self.clock.now();
            guard("close", || strategy.close())?;
            loop {
                match guard("join", || strategy.join(Some(deadline)))? {
                    Ok(done) => {
                        self.mark_done(done.as_ref());
                        break;
                    }
                    // Join again for the rest, unless time is up (a step reporting invalid
                    // messages forever must not keep the rebalance waiting).
                    Err(StrategyError::InvalidMessage(invalid)) => {
                        self.invalid(invalid)?;
                        if self.clock.now() >= deadline {
                            break;
                        }
                    }
                    Err(StrategyError::Other(error)) => return Err(RunError::Strategy(error)),
                }
            }
            let joined = self.clock.now().saturating_duration_since(started);
            ::metrics::histogram!(metrics::JOIN_SECONDS).record(joined.as_secs_f64());
        }
        let clock = Arc::clone(&self.clock);
        retry_until(&*clock, Some(deadline), || {
            self.poll_dlq()?;
            Ok::<_, RunError>(self.dlq.as_ref().is_none_or(DeadLetterQueue::is_idle))
        })?;
        // The last chance before a revocation or shutdown: positions whose commit failed
        // moments ago (typically because the group was rebalancing, which is why this drain
        // runs) are sent again now rather than after the retry pause, or they would be dropped
        // with the partition and read again by the next owner.
        self.commit_retry_at = None;
        self.commit()?;
        self.backpressure_since = None;
        self.retry_at = None;
        Ok(())
    }

    /// Replays work abandoned by a timed-out join on partitions that stay assigned.
    fn rewind_abandoned(&mut self) -> Result<(), RunError> {
        let partitions: Vec<Partition> = self.ledger.partitions().cloned().collect();
        for partition in partitions {
            let waiting = self
                .pending
                .iter()
                .filter(|m| m.partition() == Some(&partition))
                .count();
            let dead_lettering = self.dlq.as_ref().map_or(0, |dlq| dlq.in_flight(&partition));
            if self.ledger.in_flight(&partition) <= waiting + dead_lettering {
                continue;
            }
            let Some(watermark) = self.ledger.watermark(&partition) else {
                continue;
            };
            tracing::warn!(%partition, watermark, "Join abandoned work; rewinding to replay it.");
            self.consumer
                .seek(&HashMap::from([(partition.clone(), watermark)]))?;
            self.ledger.rewind(&partition, watermark);
            self.pending.retain(|m| m.partition() != Some(&partition));
            if let Some(dlq) = &mut self.dlq {
                dlq.forget(&partition);
                dlq.assign(&partition, watermark);
            }
        }
        Ok(())
    }

    /// Joins and commits the current pipeline, then builds a new one for the same partitions.
    fn rebuild_in_place(&mut self) -> Result<(), RunError> {
        tracing::info!("Rebuilding the pipeline.");
        let deadline = self.clock.now() + self.config.join_timeout;
        self.drain(deadline)?;
        self.finish_revocations(true)?;
        self.rewind_abandoned()?;
        self.rebuild()
    }

    fn rebuild(&mut self) -> Result<(), RunError> {
        let mut partitions: Vec<Partition> = self.ledger.partitions().cloned().collect();
        partitions.sort();
        if !self.paused.is_empty() {
            let paused = std::mem::take(&mut self.paused);
            self.consumer.resume(&paused)?;
        }
        if partitions.is_empty() {
            self.strategy = None;
            return Ok(());
        }
        self.alive_for(self.factory.create_timeout());
        let factory = &mut self.factory;
        let created = guard("create", || factory.try_create(&partitions))?;
        self.strategy = Some(created.map_err(RunError::Factory)?);
        Ok(())
    }

    /// Marks the loop alive for `wait` (a wait it bounds itself) plus the stall timeout.
    fn alive_for(&self, wait: Duration) {
        let until = Instant::now() + wait + self.config.stall_timeout;
        self.handle.liveness.alive_until(until);
    }

    fn poll_strategy(&mut self) -> Result<(), RunError> {
        let Some(strategy) = self.strategy.as_mut() else {
            return Ok(());
        };
        // A task finishing from here on ends the next wait for room at once.
        crate::wake::observe();
        match guard("poll", || strategy.poll())? {
            Ok(done) => {
                self.mark_done(done.as_ref());
                Ok(())
            }
            Err(StrategyError::InvalidMessage(invalid)) => self.invalid(invalid),
            Err(StrategyError::Other(error)) => Err(RunError::Strategy(error)),
        }
    }

    fn submit_pending(&mut self) -> Result<(), RunError> {
        let now = self.clock.now();
        if self.retry_at.is_some_and(|at| now < at) {
            return Ok(());
        }
        while let Some(message) = self.pending.pop_front() {
            let Some(strategy) = self.strategy.as_mut() else {
                self.pending.push_front(message);
                return Ok(());
            };
            if let (Some(dlq), Some(partition)) = (&mut self.dlq, message.partition()) {
                if !dlq.has_room(partition) {
                    self.pending.push_front(message);
                    self.start_backpressure(now);
                    return Ok(());
                }
                dlq.buffer(&message);
            }
            match guard("submit", || strategy.submit(message))? {
                Ok(()) => {
                    self.stats.messages_submitted += 1;
                    self.end_backpressure(now);
                }
                Err(SubmitError::MessageRejected(message)) => {
                    self.pending.push_front(message);
                    self.start_backpressure(now);
                    return Ok(());
                }
                Err(SubmitError::InvalidMessage(invalid)) => {
                    self.end_backpressure(now);
                    self.invalid(invalid)?;
                }
            }
        }
        Ok(())
    }

    fn start_backpressure(&mut self, now: Instant) {
        self.stats.rejections += 1;
        ::metrics::counter!(metrics::MESSAGES_REJECTED).increment(1);
        self.backpressure_since.get_or_insert(now);
        self.retry_at = Some(now + self.config.retry_interval);
    }

    fn end_backpressure(&mut self, now: Instant) {
        self.retry_at = None;
        if let Some(since) = self.backpressure_since.take() {
            let seconds = now.saturating_duration_since(since).as_secs_f64();
            ::metrics::histogram!(metrics::BACKPRESSURE_SECONDS).record(seconds);
        }
    }

    fn update_pause(&mut self) -> Result<(), RunError> {
        let now = self.clock.now();
        let sustained = self.backpressure_since.is_some_and(|since| {
            now.saturating_duration_since(since) >= self.config.backpressure_grace
        });
        let full = self.pending.len() >= self.config.max_pending_messages;
        if (sustained || full) && self.paused.is_empty() {
            // Partitions being revoked deliver nothing more: the consumer no longer has them.
            let mut partitions: Vec<Partition> = self
                .ledger
                .partitions()
                .filter(|p| !self.revoking.contains_key(*p))
                .cloned()
                .collect();
            if partitions.is_empty() {
                return Ok(());
            }
            partitions.sort();
            if sustained {
                tracing::warn!(
                    partitions = partitions.len(),
                    "Pausing consumer after sustained backpressure."
                );
            } else {
                tracing::info!(
                    partitions = partitions.len(),
                    "Pausing consumer: the pending queue is full."
                );
            }
            self.consumer.pause(&partitions)?;
            self.paused = partitions;
            self.stats.pauses += 1;
            ::metrics::counter!(metrics::PAUSES).increment(1);
        } else if self.pending.is_empty() && !self.paused.is_empty() {
            // Resumed only once everything waiting was taken: the pipeline has room again.
            // Resuming at the first accepted message paused again at the next rejection.
            let paused = std::mem::take(&mut self.paused);
            tracing::info!(partitions = paused.len(), "Resuming consumer.");
            self.consumer.resume(&paused)?;
        }
        Ok(())
    }

    fn poll_dlq(&mut self) -> Result<(), RunError> {
        if let Some(dlq) = &mut self.dlq {
            let done = dlq.poll()?;
            self.ledger.mark_done(&done);
        }
        Ok(())
    }

    fn invalid(&mut self, invalid: InvalidMessage) -> Result<(), RunError> {
        self.stats.invalid_messages += 1;
        let origins = invalid.origins();
        if origins.is_empty() {
            tracing::warn!(
                %invalid,
                "Skipping an invalid part with no offsets of its own; the message it came from \
                 is committed through its last part."
            );
            ::metrics::counter!(metrics::INVALID_MESSAGES, "outcome" => "skipped").increment(1);
            return Ok(());
        }
        // A batch stands for many messages: one log line and one counter update for all.
        let (owned, foreign): (Vec<_>, Vec<_>) = origins
            .into_iter()
            .partition(|(partition, _)| self.ledger.owns(partition));
        if !foreign.is_empty() {
            tracing::warn!(
                %invalid,
                messages = foreign.len(),
                "Ignoring an invalid message of a partition not assigned."
            );
        }
        if owned.is_empty() {
            return Ok(());
        }
        let count = owned.len() as u64;
        match &mut self.dlq {
            Some(dlq) => {
                tracing::warn!(%invalid, messages = count, "Dead-lettering invalid message.");
                for (partition, offset) in owned {
                    ::metrics::counter!(metrics::INVALID_MESSAGES, "outcome" => "dead_lettered")
                        .increment(1);
                    dlq.dead_letter(partition, offset, invalid.reason().to_owned())?;
                }
            }
            None => {
                tracing::warn!(
                    %invalid,
                    messages = count,
                    "Skipping invalid message: no dead-letter queue configured."
                );
                ::metrics::counter!(metrics::INVALID_MESSAGES, "outcome" => "skipped")
                    .increment(count);
                let mut done = CommitRequest::new();
                for (partition, offset) in &owned {
                    done.add(partition, *offset);
                }
                self.ledger.mark_done(&done);
            }
        }
        Ok(())
    }

    fn mark_done(&mut self, done: Option<&CommitRequest>) {
        if let Some(done) = done {
            self.ledger.mark_done(done);
        }
    }

    /// Commits what the ledger allows, plus earlier positions whose commit failed transiently.
    ///
    /// A transient failure ([`ConsumerError::Transient`]: the group is rebalancing, the
    /// coordinator moved) is not fatal: the positions are kept and sent again with the next
    /// commit, at most once per [`COMMIT_RETRY_INTERVAL`] when nothing new is committable. If
    /// the partition is revoked first, they are dropped: the next owner reads those messages
    /// again (at-least-once).
    fn commit(&mut self) -> Result<(), RunError> {
        let mut positions = self.ledger.take_committable();
        if positions.is_empty()
            && (self.uncommitted.is_empty()
                || self.commit_retry_at.is_some_and(|at| self.clock.now() < at))
        {
            return Ok(());
        }
        for (partition, position) in self.uncommitted.drain() {
            if self.ledger.owns(&partition) {
                // Newer positions from the ledger are never lower.
                positions.entry(partition).or_insert(position);
            }
        }
        if positions.is_empty() {
            return Ok(());
        }
        if let Some(dlq) = &mut self.dlq {
            dlq.trim(&positions);
        }
        match self.consumer.commit(&positions) {
            Ok(()) => {
                self.stats.commits += 1;
                ::metrics::counter!(metrics::COMMITS).increment(1);
                self.committed.extend(positions);
                self.commit_retry_at = None;
                Ok(())
            }
            Err(ConsumerError::Transient(error)) => {
                tracing::warn!(%error, partitions = positions.len(), "Commit failed; retrying later.");
                ::metrics::counter!(metrics::COMMIT_FAILURES).increment(1);
                self.uncommitted = positions;
                self.commit_retry_at = Some(self.clock.now() + COMMIT_RETRY_INTERVAL);
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }
}

impl<T, C: std::fmt::Debug, P: ?Sized> std::fmt::Debug for StreamProcessor<T, C, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamProcessor")
            .field("consumer", &self.consumer)
            .field("ledger", &self.ledger)
            .field("pending", &self.pending.len())
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Runs a call into the pipeline, turning a panic into [`RunError::Panicked`].
fn guard<R>(during: &'static str, call: impl FnOnce() -> R) -> Result<R, RunError> {
    catch_unwind(AssertUnwindSafe(call)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(ToString::to_string)
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        RunError::Panicked { during, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::local::{LocalBroker, LocalConsumer, LocalProducer};
    use crate::clock::ManualClock;
    use crate::dlq::{DlqLimits, DlqTopic};
    use crate::message::Topic;
    use crate::steps::{CommitOffsets, Reduce, RunTask};
    use crate::testing::{RecordingStep, numbered_broker};
    use std::collections::HashSet;

    const GROUP: &str = "g";

    struct Fixture {
        broker: LocalBroker<u64>,
        topic: Topic,
    }

    impl Fixture {
        fn new(partitions: u32, per_partition: u64) -> Self {
            let (broker, topic) = numbered_broker("in", partitions, per_partition);
            Self { broker, topic }
        }

        fn partition(&self, index: u32) -> Partition {
            Partition::new(self.topic.clone(), index)
        }

        fn consumer(&self) -> LocalConsumer<u64> {
            self.broker
                .subscribe(GROUP, std::slice::from_ref(&self.topic))
        }

        fn committed(&self, index: u32) -> Option<u64> {
            self.broker.committed(GROUP, &self.partition(index))
        }
    }

    fn recording(step: &RecordingStep<u64>) -> impl ProcessingStrategyFactory<u64> + 'static {
        let step = step.clone();
        move |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> { Box::new(step.clone()) }
    }

    fn committing() -> impl ProcessingStrategyFactory<u64> + 'static {
        |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
            Box::new(CommitOffsets::new(Duration::ZERO))
        }
    }

    fn fast() -> ProcessorConfig {
        ProcessorConfig::default().with_poll_timeout(Duration::ZERO)
    }

    fn run_until<T: 'static, C: Consumer<T>>(
        processor: &mut StreamProcessor<T, C>,
        mut done: impl FnMut(&StreamProcessor<T, C>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(processor) {
            assert!(Instant::now() < deadline, "condition not reached");
            processor.run_once().unwrap();
        }
    }

    #[test]
    fn commits_every_partition_once_the_work_is_done() {
        let fixture = Fixture::new(3, 10);
        let mut processor =
            StreamProcessor::new(fixture.consumer(), committing()).with_config(fast());

        run_until(&mut processor, |_| {
            (0..3).all(|i| fixture.committed(i) == Some(10))
        });
        processor.shutdown().unwrap();

        assert_eq!(processor.stats().messages_polled, 30);
    }

    #[test]
    fn a_requested_rebuild_joins_commits_and_creates_a_new_pipeline_for_the_same_partitions() {
        let fixture = Fixture::new(2, 10);
        let created = Arc::new(std::sync::Mutex::new(Vec::<Vec<Partition>>::new()));
        let factory = {
            let created = Arc::clone(&created);
            move |partitions: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
                created.lock().unwrap().push(partitions.to_vec());
                Box::new(CommitOffsets::new(Duration::from_secs(3600)))
            }
        };
        let mut processor = StreamProcessor::new(fixture.consumer(), factory).with_config(fast());
        run_until(&mut processor, |p| p.stats().messages_submitted == 20);
        // The long commit interval holds every offset back until the pipeline is joined.
        assert_eq!(fixture.committed(0), None);

        processor.handle().request_rebuild();
        processor.run_once().unwrap();

        assert_eq!(fixture.committed(0), Some(10));
        assert_eq!(fixture.committed(1), Some(10));
        let created = created.lock().unwrap();
        assert_eq!(created.len(), 2);
        assert_eq!(created[0], created[1]);
        assert_eq!(created[1], [fixture.partition(0), fixture.partition(1)]);
    }

    #[test]
    fn nothing_is_committed_while_a_message_is_unfinished() {
        let fixture = Fixture::new(1, 3);
        let step = RecordingStep::new(); // accepts, never reports done
        let mut processor =
            StreamProcessor::new(fixture.consumer(), recording(&step)).with_config(fast());

        run_until(&mut processor, |_| step.accepted() == 3);

        assert_eq!(fixture.committed(0), None);
    }

    #[test]
    fn a_shutdown_closes_the_pipeline_before_joining_it() {
        let fixture = Fixture::new(1, 3);
        let step = RecordingStep::new();
        let mut processor =
            StreamProcessor::new(fixture.consumer(), recording(&step)).with_config(fast());
        run_until(&mut processor, |_| step.accepted() == 3);

        processor.shutdown().unwrap();

        assert!(step.joined());
        assert!(step.closed_before_join());
    }

    #[test]
    fn a_rejected_message_is_retried_until_accepted_without_loss() {
        let fixture = Fixture::new(1, 5);
        let step = RecordingStep::new().reject_next(20).commit_on_poll();
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast().with_retry_interval(Duration::ZERO));

        run_until(&mut processor, |_| fixture.committed(0) == Some(5));

        assert_eq!(step.payloads(), [0, 1, 2, 3, 4]);
        assert_eq!(processor.stats().rejections, 20);
    }

    #[test]
    fn retries_are_spaced_so_the_loop_never_spins() {
        let fixture = Fixture::new(1, 1);
        let step = RecordingStep::new().reject_next(usize::MAX);
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step));
        let started = Instant::now();

        while started.elapsed() < Duration::from_millis(200) {
            processor.run_once().unwrap();
        }

        // One retry per millisecond at most (rust-arroyo made ~600 000 here).
        assert!(
            step.rejected() <= 220,
            "{} retries in 200 ms",
            step.rejected()
        );
        assert!(step.rejected() >= 10);
    }

    #[test]
    fn partitions_pause_after_the_grace_period_and_resume_when_accepted() {
        let fixture = Fixture::new(2, 3);
        let clock = ManualClock::new();
        let step = RecordingStep::new().reject_next(usize::MAX);
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_clock(clock.shared())
            .with_config(fast().with_backpressure_grace(Duration::from_secs(5)));
        run_until(&mut processor, |_| step.rejected() > 0);

        clock.advance(Duration::from_secs(4));
        processor.run_once().unwrap();
        assert!(processor.consumer().paused().is_empty());
        clock.advance(Duration::from_secs(1));
        processor.run_once().unwrap();
        assert_eq!(processor.consumer().paused().len(), 2);

        step.set_reject_next(0);
        clock.advance(Duration::from_millis(1));
        processor.run_once().unwrap();

        assert!(processor.consumer().paused().is_empty());
        assert_eq!(processor.stats().pauses, 1);
    }

    #[test]
    fn a_full_pending_queue_pauses_at_once() {
        let fixture = Fixture::new(1, 50);
        let step = RecordingStep::new().reject_next(usize::MAX);
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast().with_max_pending_messages(10));

        run_until(&mut processor, |p| p.stats().pauses == 1);
        for _ in 0..20 {
            processor.run_once().unwrap();
        }

        assert_eq!(processor.stats().messages_polled, 10);
    }

    #[test]
    fn invalid_messages_are_committed_only_after_dead_letter_delivery() {
        let fixture = Fixture::new(1, 4);
        let dlq_topic = Topic::new("dlq");
        fixture.broker.create_topic(&dlq_topic, 1);
        let producer = LocalProducer::new(fixture.broker.clone());
        producer.hold_deliveries();
        let step = RecordingStep::new().invalid_at(&[2]).commit_on_poll();
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast())
            .with_dlq(DlqPolicy::new(DlqTopic::new(
                producer.clone(),
                dlq_topic.clone(),
            )));

        run_until(&mut processor, |_| fixture.committed(0) == Some(2));
        for _ in 0..10 {
            processor.run_once().unwrap();
        }
        assert_eq!(fixture.committed(0), Some(2));
        producer.release_deliveries();
        run_until(&mut processor, |_| fixture.committed(0) == Some(4));

        assert_eq!(fixture.broker.payloads(&Partition::new(dlq_topic, 0)), [2]);
        assert_eq!(processor.stats().dead_lettered, 1);
    }

    #[test]
    fn the_last_message_of_a_partition_can_be_dead_lettered_and_committed() {
        let fixture = Fixture::new(1, 3);
        let dlq_topic = Topic::new("dlq");
        fixture.broker.create_topic(&dlq_topic, 1);
        let step = RecordingStep::new().invalid_at(&[2]).commit_on_poll();
        let producer = LocalProducer::new(fixture.broker.clone());
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast())
            .with_dlq(DlqPolicy::new(DlqTopic::new(producer, dlq_topic)));

        run_until(&mut processor, |_| fixture.committed(0) == Some(3));
    }

    #[test]
    fn an_invalid_batch_dead_letters_every_message_it_stands_for() {
        let fixture = Fixture::new(1, 4);
        let dlq_topic = Topic::new("dlq");
        fixture.broker.create_topic(&dlq_topic, 1);
        let producer = LocalProducer::new(fixture.broker.clone());
        let factory = |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
            let refuse = |batch: Message<Vec<u64>>| -> Result<Message<()>, SubmitError<_>> {
                Err(InvalidMessage::of(&batch, "the whole batch is bad").into())
            };
            let commit = CommitOffsets::new(Duration::ZERO);
            Box::new(Reduce::vec(
                2,
                Duration::from_secs(60),
                RunTask::new(refuse, commit),
            ))
        };
        let mut processor = StreamProcessor::new(fixture.consumer(), factory)
            .with_config(fast())
            .with_dlq(DlqPolicy::new(DlqTopic::new(producer, dlq_topic.clone())));

        run_until(&mut processor, |_| fixture.committed(0) == Some(4));

        let dead = fixture.broker.payloads(&Partition::new(dlq_topic, 0));
        assert_eq!(dead, [0, 1, 2, 3]);
        assert_eq!(processor.stats().invalid_messages, 2);
    }

    #[test]
    fn a_factory_that_fails_stops_the_processor_with_its_error() {
        let fixture = Fixture::new(1, 1);
        let factory = crate::fallible(|_: &[Partition]| {
            Err::<CommitOffsets, _>(std::io::Error::other("no connection"))
        });
        let mut processor = StreamProcessor::new(fixture.consumer(), factory).with_config(fast());

        let deadline = Instant::now() + Duration::from_secs(10);
        let error = loop {
            match processor.run_once() {
                Err(error) => break error,
                Ok(()) => assert!(Instant::now() < deadline, "the factory was never called"),
            }
        };

        let RunError::Factory(source) = error else {
            panic!("expected a factory error, got {error:?}");
        };
        assert_eq!(source.to_string(), "no connection");
    }

    #[test]
    fn the_handle_reports_stats_while_another_thread_runs_the_processor() {
        let fixture = Fixture::new(1, 5);
        let commit = |_: &[Partition]| CommitOffsets::new(Duration::ZERO);
        let mut processor = StreamProcessor::new(fixture.consumer(), commit).with_config(fast());
        let handle = processor.handle();
        let runner = std::thread::spawn(move || processor.run());

        let deadline = Instant::now() + Duration::from_secs(10);
        while handle.stats().messages_submitted < 5 {
            assert!(Instant::now() < deadline, "stats never reached 5 messages");
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.signal_shutdown();

        runner.join().unwrap().unwrap();
        assert_eq!(handle.stats().messages_polled, 5);
    }

    #[test]
    fn without_a_dead_letter_queue_invalid_messages_are_skipped() {
        let fixture = Fixture::new(1, 3);
        let step = RecordingStep::new().invalid_at(&[0, 1, 2]);
        let mut processor =
            StreamProcessor::new(fixture.consumer(), recording(&step)).with_config(fast());

        run_until(&mut processor, |_| fixture.committed(0) == Some(3));

        assert_eq!(processor.stats().invalid_messages, 3);
    }

    #[test]
    fn exceeding_a_dead_letter_limit_is_an_error_not_a_panic() {
        let fixture = Fixture::new(1, 5);
        let dlq_topic = Topic::new("dlq");
        fixture.broker.create_topic(&dlq_topic, 1);
        let step = RecordingStep::new().invalid_at(&[0, 1, 2, 3, 4]);
        let policy = DlqPolicy::new(DlqTopic::new(
            LocalProducer::new(fixture.broker.clone()),
            dlq_topic,
        ))
        .with_limits(DlqLimits::none().with_max_consecutive_invalid(2));
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast())
            .with_dlq(policy);

        let error = (0..1000).find_map(|_| processor.run_once().err());

        assert!(matches!(
            error,
            Some(RunError::DeadLetter(DlqError::LimitExceeded { .. }))
        ));
    }

    /// One message, and a dead-letter policy of three attempts whose three deliveries fail.
    fn failing_dead_letters() -> (Fixture, DlqPolicy<u64>, Topic) {
        let fixture = Fixture::new(1, 1);
        let dlq_topic = Topic::new("dlq");
        fixture.broker.create_topic(&dlq_topic, 1);
        let producer = LocalProducer::new(fixture.broker.clone());
        producer.fail_next_deliveries(3);
        let policy =
            DlqPolicy::new(DlqTopic::new(producer, dlq_topic.clone())).with_max_attempts(3);
        (fixture, policy, dlq_topic)
    }

    #[test]
    fn a_failing_dead_letter_delivery_is_retried_then_fatal() {
        let (fixture, policy, _) = failing_dead_letters();
        let step = RecordingStep::new().invalid_at(&[0]);
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast())
            .with_dlq(policy);

        let error = (0..1000).find_map(|_| processor.run_once().err());

        assert!(matches!(
            error,
            Some(RunError::DeadLetter(DlqError::DeliveryFailed {
                attempts: 3,
                ..
            }))
        ));
        assert_eq!(fixture.committed(0), None);
    }

    #[test]
    fn an_undeliverable_dead_letter_is_counted_and_committed_past_when_asked() {
        let (fixture, policy, dlq_topic) = failing_dead_letters();
        let policy = policy.with_undeliverable(crate::dlq::Undeliverable::CommitPast);
        let step = RecordingStep::new().invalid_at(&[0]);
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast())
            .with_dlq(policy);

        let deadline = Instant::now() + Duration::from_secs(10);
        while fixture.committed(0) != Some(1) {
            assert!(
                Instant::now() < deadline,
                "never committed past the dead letter"
            );
            processor.run_once().unwrap();
        }

        let stats = processor.stats();
        assert_eq!((stats.dead_letters_dropped, stats.dead_lettered), (1, 0));
        assert!(
            fixture
                .broker
                .payloads(&Partition::new(dlq_topic, 0))
                .is_empty()
        );
    }

    /// A step whose poll blocks while `stuck` is set and whose join waits out its deadline,
    /// telling while it joins.
    #[derive(Debug, Clone, Default)]
    struct Stalls {
        stuck: Arc<AtomicBool>,
        joining: Arc<AtomicBool>,
    }

    impl ProcessingStrategy<u64> for Stalls {
        fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
            while self.stuck.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None)
        }
        fn submit(&mut self, _message: Message<u64>) -> Result<(), SubmitError<u64>> {
            Ok(())
        }
        fn join(
            &mut self,
            deadline: Option<Instant>,
        ) -> Result<Option<CommitRequest>, StrategyError> {
            self.joining.store(true, Ordering::SeqCst);
            if let Some(deadline) = deadline {
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            }
            self.joining.store(false, Ordering::SeqCst);
            Ok(None)
        }
        fn terminate(&mut self) {}
    }

    fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn liveness_lapses_when_the_loop_is_stuck_and_holds_through_a_bounded_join() {
        let fixture = Fixture::new(1, 0);
        let step = Stalls::default();
        let factory = {
            let step = step.clone();
            move |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
                Box::new(step.clone())
            }
        };
        let stall = Duration::from_millis(300);
        let join_timeout = Duration::from_millis(1500);
        let mut processor = StreamProcessor::new(fixture.consumer(), factory).with_config(
            fast()
                .with_stall_timeout(stall)
                .with_join_timeout(join_timeout),
        );
        let handle = processor.handle();
        let liveness = handle.liveness().clone();
        assert!(!liveness.is_alive(), "alive before the loop ran");
        let runner = std::thread::spawn(move || processor.run());

        wait_for("the loop is alive", || liveness.is_alive());
        step.stuck.store(true, Ordering::SeqCst);
        let stuck_at = Instant::now();
        wait_for("a stuck loop is no longer alive", || !liveness.is_alive());
        assert!(stuck_at.elapsed() >= stall - Duration::from_millis(50));
        step.stuck.store(false, Ordering::SeqCst);
        wait_for("the loop is alive again", || liveness.is_alive());

        // A shutdown joins the pipeline for up to its deadline, longer than the stall timeout:
        // a bounded wait, alive throughout.
        handle.signal_shutdown();
        let mut joined_for = Duration::ZERO;
        while !runner.is_finished() {
            let sampled = Instant::now();
            if step.joining.load(Ordering::SeqCst) {
                assert!(
                    liveness.is_alive(),
                    "not alive {joined_for:?} into the join"
                );
                joined_for += sampled.elapsed().max(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        runner.join().unwrap().unwrap();
        assert!(joined_for > stall, "joined for {joined_for:?} only");
    }

    #[test]
    fn a_panicking_step_becomes_an_error() {
        #[derive(Debug)]
        struct Panics;
        impl ProcessingStrategy<u64> for Panics {
            fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
                Ok(None)
            }
            fn submit(&mut self, _message: Message<u64>) -> Result<(), SubmitError<u64>> {
                panic!("step exploded")
            }
            fn join(&mut self, _: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
                Ok(None)
            }
            fn terminate(&mut self) {}
        }
        let fixture = Fixture::new(1, 1);
        let factory =
            |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> { Box::new(Panics) };
        let mut processor = StreamProcessor::new(fixture.consumer(), factory).with_config(fast());

        let result = processor.run();

        assert!(matches!(
            result,
            Err(RunError::Panicked { during: "submit", ref message }) if message == "step exploded"
        ));
    }

    #[test]
    fn a_join_that_keeps_reporting_invalid_messages_ends_at_the_deadline() {
        #[derive(Debug)]
        struct AlwaysInvalid;
        impl ProcessingStrategy<u64> for AlwaysInvalid {
            fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
                Ok(None)
            }
            fn submit(&mut self, _message: Message<u64>) -> Result<(), SubmitError<u64>> {
                Ok(())
            }
            fn join(&mut self, _: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
                let partition = Partition::new(Topic::new("in"), 0);
                Err(InvalidMessage::new(partition, 0, "again").into())
            }
            fn terminate(&mut self) {}
        }
        let fixture = Fixture::new(1, 1);
        let factory = |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
            Box::new(AlwaysInvalid)
        };
        let mut processor = StreamProcessor::new(fixture.consumer(), factory)
            .with_config(fast().with_join_timeout(Duration::from_millis(50)));
        run_until(&mut processor, |p| p.stats().messages_submitted == 1);

        processor.shutdown().unwrap();

        assert!(processor.stats().invalid_messages >= 1);
    }

    /// Partition 1 is revoked while every polled message waits for a pipeline that rejects
    /// them all: its messages are dropped, never submitted nor committed, and it is handed over
    /// at once, the pipeline joined for it or not (`rebuild`).
    fn revoke_with_everything_waiting(rebuild: bool) {
        let fixture = Fixture::new(2, 3);
        let step = RecordingStep::new()
            .reject_next(usize::MAX)
            .commit_on_poll();
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step)).with_config(
            fast()
                .with_retry_interval(Duration::ZERO)
                .with_rebuild_on_rebalance(rebuild),
        );
        run_until(&mut processor, |p| p.stats().messages_polled == 6);

        // A second member joins: partition 1 moves to it.
        let mut second = fixture.consumer();
        run_until(&mut processor, |p| p.stats().rebalances == 2);

        // The new owner starts where nobody committed: from the beginning.
        assert_eq!(
            next_assignment(&mut second),
            Some(HashMap::from([(fixture.partition(1), 0)]))
        );
        step.set_reject_next(0);
        run_until(&mut processor, |_| fixture.committed(0) == Some(3));
        let offsets_of_p1: Vec<_> = step
            .messages()
            .iter()
            .filter(|m| m.partition() == Some(&fixture.partition(1)))
            .map(|m| m.offset())
            .collect();
        assert!(
            offsets_of_p1.is_empty(),
            "revoked messages submitted: {offsets_of_p1:?}"
        );
        assert_eq!(step.joined(), rebuild);
        assert_eq!(fixture.committed(1), None);
    }

    #[test]
    fn a_revocation_joins_commits_and_drops_pending_messages_of_revoked_partitions() {
        revoke_with_everything_waiting(true);
    }

    #[test]
    fn waiting_messages_of_a_revoked_partition_are_dropped_and_do_not_delay_the_hand_over() {
        revoke_with_everything_waiting(false);
    }

    #[test]
    fn a_join_that_times_out_replays_abandoned_work_on_kept_partitions() {
        let fixture = Fixture::new(2, 2);
        let clock = ManualClock::new();
        let step = RecordingStep::new(); // never reports done: join abandons everything
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_clock(clock.shared())
            .with_config(fast().with_rebuild_on_rebalance(true));
        run_until(&mut processor, |_| step.accepted() == 4);

        let _second = fixture.consumer();
        run_until(&mut processor, |p| p.stats().rebalances == 2);

        // Partition 0 stays; its two messages are read again.
        run_until(&mut processor, |_| step.accepted() == 6);
        let replayed: Vec<_> = step.messages()[4..].iter().map(|m| m.offset()).collect();
        assert_eq!(replayed, [Some(0), Some(1)]);
    }

    /// A recording factory that counts the pipelines it builds.
    fn counted(
        step: &RecordingStep<u64>,
    ) -> (
        impl ProcessingStrategyFactory<u64> + 'static,
        Arc<AtomicU64>,
    ) {
        let created = Arc::new(AtomicU64::new(0));
        let factory = {
            let (step, created) = (step.clone(), Arc::clone(&created));
            move |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
                created.fetch_add(1, Ordering::SeqCst);
                Box::new(step.clone())
            }
        };
        (factory, created)
    }

    /// A step that finishes its work at once, except on `partition`, until released.
    fn slow_on(partition: &Partition) -> RecordingStep<u64> {
        let step = RecordingStep::new().commit_on_poll();
        step.set_holding(std::slice::from_ref(partition));
        step
    }

    fn next_assignment(consumer: &mut LocalConsumer<u64>) -> Option<HashMap<Partition, u64>> {
        while let Some(event) = consumer.poll(Duration::ZERO).unwrap() {
            if let ConsumerEvent::Assigned(assigned) = event {
                return Some(assigned);
            }
        }
        None
    }

    #[test]
    fn a_cooperative_rebalance_keeps_the_pipeline_running_and_hands_over_once_work_is_done() {
        let fixture = Fixture::new(2, 5);
        let (p0, p1) = (fixture.partition(0), fixture.partition(1));
        // Partition 1's work is slow: none of it finishes until released.
        let step = slow_on(&p1);
        let (factory, created) = counted(&step);
        let mut processor = StreamProcessor::new(fixture.consumer(), factory).with_config(fast());
        run_until(&mut processor, |_| {
            step.accepted() == 10 && fixture.committed(0) == Some(5)
        });

        // A second member joins: partition 1 moves to it, partition 0 stays.
        let mut second = fixture.consumer();
        run_until(&mut processor, |p| p.stats().rebalances == 2);
        assert_eq!(
            step.changes(),
            [(vec![], vec![p1.clone()])],
            "told of the revocation"
        );

        // Partition 0 keeps flowing while partition 1's work is in flight; 1 is not handed over.
        for n in 5..10 {
            fixture.broker.produce_to(&p0, n).unwrap();
        }
        run_until(&mut processor, |_| fixture.committed(0) == Some(10));
        assert_eq!(fixture.committed(1), None);
        assert_eq!(next_assignment(&mut second), None, "handed over too early");

        // The slow work finishes: partition 1 is committed and handed over.
        step.release_held();
        run_until(&mut processor, |_| fixture.committed(1) == Some(5));
        assert_eq!(
            next_assignment(&mut second),
            Some(HashMap::from([(p1.clone(), 5)]))
        );

        // The second member leaves: partition 1 comes back and joins the running pipeline.
        drop(second);
        fixture.broker.produce_to(&p1, 5).unwrap();
        run_until(&mut processor, |_| fixture.committed(1) == Some(6));
        assert_eq!(step.changes().last(), Some(&(vec![p1], vec![])));
        assert_eq!(created.load(Ordering::SeqCst), 1, "the factory ran again");
        assert!(!step.joined(), "the pipeline was joined during a rebalance");
        let offsets_of_p0: Vec<_> = step
            .messages()
            .iter()
            .filter(|m| m.partition() == Some(&p0))
            .filter_map(Message::offset)
            .collect();
        assert_eq!(
            offsets_of_p0,
            (0..10).collect::<Vec<_>>(),
            "read once, in order"
        );
    }

    #[test]
    fn a_revoked_partition_whose_work_never_finishes_is_handed_over_at_the_join_deadline() {
        let fixture = Fixture::new(2, 4);
        let p1 = fixture.partition(1);
        let clock = ManualClock::new();
        let step = slow_on(&p1);
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_clock(clock.shared())
            .with_config(fast().with_join_timeout(Duration::from_secs(5)));
        run_until(&mut processor, |_| step.accepted() == 8);

        let mut second = fixture.consumer();
        run_until(&mut processor, |p| p.stats().rebalances == 2);
        clock.advance(Duration::from_secs(4));
        processor.run_once().unwrap();
        assert_eq!(
            next_assignment(&mut second),
            None,
            "handed over before the deadline"
        );

        clock.advance(Duration::from_secs(1));
        processor.run_once().unwrap();

        // Nothing of partition 1 finished: the next owner starts from the beginning.
        assert_eq!(next_assignment(&mut second), Some(HashMap::from([(p1, 0)])));
        // Done reports arriving later for it are ignored: it is no longer ours.
        step.release_held();
        for _ in 0..10 {
            processor.run_once().unwrap();
        }
        assert_eq!(fixture.committed(1), None);
        assert_eq!(fixture.committed(0), Some(4));
    }

    #[test]
    fn backpressure_during_a_revocation_pauses_only_the_partitions_that_stay() {
        let fixture = Fixture::new(2, 3);
        let (p0, p1) = (fixture.partition(0), fixture.partition(1));
        let step = slow_on(&p1);
        let mut processor = StreamProcessor::new(fixture.consumer(), recording(&step))
            .with_config(fast().with_max_pending_messages(1));
        run_until(&mut processor, |_| step.accepted() == 6);
        let _second = fixture.consumer();
        run_until(&mut processor, |p| p.stats().rebalances == 2);

        step.set_reject_next(usize::MAX);
        fixture.broker.produce_to(&p0, 3).unwrap();
        run_until(&mut processor, |p| p.stats().pauses == 1);

        assert_eq!(processor.consumer().paused(), HashSet::from([p0]));
    }

    #[test]
    fn an_eager_group_still_joins_and_rebuilds_the_pipeline() {
        let fixture = Fixture::new(2, 3);
        fixture.broker.configure_group(
            GROUP,
            crate::backends::RebalanceProtocol::Eager,
            crate::backends::InitialOffset::Earliest,
        );
        let step = RecordingStep::new().commit_on_poll();
        let (factory, created) = counted(&step);
        let mut processor = StreamProcessor::new(fixture.consumer(), factory).with_config(fast());
        run_until(&mut processor, |_| fixture.committed(1) == Some(3));

        let _second = fixture.consumer();
        run_until(&mut processor, |p| p.stats().rebalances == 3);

        assert!(step.joined());
        assert_eq!(created.load(Ordering::SeqCst), 2);
        assert!(step.changes().is_empty());
    }

    #[test]
    fn shutdown_from_another_thread_joins_and_commits_work_in_flight() {
        let fixture = Fixture::new(1, 100);
        let commit = |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
            Box::new(CommitOffsets::new(Duration::from_secs(3600)))
        };
        let mut processor = StreamProcessor::new(fixture.consumer(), commit);
        let handle = processor.handle();
        let broker = fixture.broker.clone();
        let runner = std::thread::spawn(move || {
            let result = processor.run();
            (result, processor.stats())
        });

        // The commit interval is an hour: only the shutdown's join commits.
        while broker.high_watermark(&fixture.partition(0)) != 100 {}
        std::thread::sleep(Duration::from_millis(50));
        handle.signal_shutdown();
        let (result, stats) = runner.join().unwrap();

        result.unwrap();
        assert_eq!(stats.messages_polled, 100);
        assert_eq!(fixture.committed(0), Some(100));
    }

    /// A local consumer whose commits fail transiently while `failing` is set, as a Kafka
    /// group's do while it rebalances.
    struct TransientCommits {
        inner: LocalConsumer<u64>,
        failing: Arc<AtomicBool>,
    }

    impl Consumer<u64> for TransientCommits {
        fn poll(&mut self, timeout: Duration) -> Result<Option<ConsumerEvent<u64>>, ConsumerError> {
            self.inner.poll(timeout)
        }

        fn pause(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
            self.inner.pause(partitions)
        }

        fn resume(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
            self.inner.resume(partitions)
        }

        fn tell(&self) -> HashMap<Partition, u64> {
            self.inner.tell()
        }

        fn seek(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
            self.inner.seek(positions)
        }

        fn commit(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(ConsumerError::Transient(
                    "group rebalance in progress".into(),
                ));
            }
            self.inner.commit(positions)
        }

        fn complete_revocation(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
            self.inner.complete_revocation(partitions)
        }

        fn close(&mut self) -> Result<(), ConsumerError> {
            self.inner.close()
        }
    }

    #[test]
    fn a_commit_that_failed_moments_before_a_revocation_is_sent_again_before_handing_over() {
        let fixture = Fixture::new(2, 5);
        let clock = ManualClock::new();
        let failing = Arc::new(AtomicBool::new(true));
        let consumer = TransientCommits {
            inner: fixture.consumer(),
            failing: Arc::clone(&failing),
        };
        let mut processor = StreamProcessor::new(consumer, committing())
            .with_clock(clock.shared())
            .with_config(fast());
        run_until(&mut processor, |p| p.stats().messages_polled == 10);
        for _ in 0..10 {
            processor.run_once().unwrap();
        }
        assert_eq!(fixture.committed(1), None);

        // The group settles and partition 1 moves to a second member, within the retry pause.
        failing.store(false, Ordering::SeqCst);
        let _second = fixture.consumer();
        run_until(&mut processor, |p| p.stats().rebalances == 2);

        assert_eq!(
            fixture.committed(1),
            Some(5),
            "committed before handing over"
        );
        assert_eq!(fixture.committed(0), Some(5));
    }

    #[test]
    fn commits_never_name_a_partition_after_its_revocation() {
        let fixture = Fixture::new(4, 20);
        let mut processor =
            StreamProcessor::new(fixture.consumer(), committing()).with_config(fast());
        run_until(&mut processor, |p| p.stats().messages_polled >= 10);

        let mut second = fixture.consumer();
        for _ in 0..500 {
            processor.run_once().unwrap();
            while second.poll(Duration::ZERO).unwrap().is_some() {}
        }

        // The local broker refuses commits from non-owners, so success means none happened.
        let log = fixture.broker.commit_log(GROUP);
        assert!(!log.is_empty());
    }
}
