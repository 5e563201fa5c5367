//! `FlushSegments`: the step between the buffer writes and the commits, which runs the flush
//! workers and turns their trouble into backpressure.
//!
//! It receives, for every batch written to Redis, the batch's clock (its smallest broker
//! timestamp) and forwards the message unchanged to `CommitOffsets`: the spans are in Redis,
//! so their offsets may be committed. Meanwhile it:
//!
//! - keeps the flusher clock from the batches it accepts: `drift = batch clock − wall clock`,
//!   so workers flush by the stream's time and a lagging consumer does not flush segments
//!   early (spec 5.2); a batch it hands back does not move the clock, so flushing goes on
//!   (and frees Redis memory) while input is held back;
//! - spreads the assigned partitions (shards) round-robin over `min(workers, shards)` workers,
//!   and waits at start until every worker has completed an iteration: a flusher that cannot
//!   run must not let the consumer fill Redis;
//! - watches every worker: one whose task ended, or that has not completed an iteration for
//!   `flusher_max_unhealthy` (hung, or every flush failing), is stopped for good (its generation is
//!   retired and its task aborted) and replaced after a backoff that doubles with each
//!   replacement in a row (1 s to 30 s), so a Redis outage of a few seconds costs a few
//!   replacements, not all of them; after `max_restarts` replacements in a row the pipeline
//!   fails loudly. A replacement that flushed for a while (`flusher_max_unhealthy`, at least
//!   10 s)
//!   clears the count;
//! - rejects input (`MessageRejected`) while a worker has been at its flush limit for longer
//!   than `flusher_backpressure`, or while Redis memory is above `max_memory_percentage`;
//! - on join (revocation, shutdown) stops the workers at their next iteration boundary, so no
//!   flush is left half produced, within the join deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rill::{
    CarriedOver, CommitRequest, Message, Partition, ProcessingStrategy, StrategyError, SubmitError,
};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::decode::seconds;
use super::flush_worker::{WorkerContext, WorkerHealth, run_worker, shard_label};
use serde::{Deserialize, Serialize};

use crate::buffer::{BufferError, BufferOptions, RedisConnection, SpansBufferStore};
use crate::metrics as names;

/// The flush workers: the `[flusher]` section of the configuration. Sentry's
/// `spans.buffer.flusher.*` options that govern them (`flusher_max_unhealthy`,
/// `flusher_backpressure`, `max_memory_percentage`) are [`BufferOptions`], in `[buffer]`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushSettings {
    /// Flush workers (`--flusher-processes`); never more than the assigned partitions.
    pub workers: usize,
    /// Pause of a worker after an iteration that flushed nothing (Sentry: 1 s).
    #[serde(with = "humantime_serde")]
    pub idle_sleep: Duration,
    /// Sends per flushed message before its segment is given up (with an outcome).
    pub produce_attempts: u32,
    /// Pause before resending; doubles each time.
    #[serde(with = "humantime_serde")]
    pub produce_backoff: Duration,
    /// Replacements of one worker before the consumer fails.
    pub max_restarts: u32,
}

impl Default for FlushSettings {
    fn default() -> Self {
        Self {
            workers: 1,
            idle_sleep: Duration::from_secs(1),
            produce_attempts: 3,
            produce_backoff: Duration::from_millis(200),
            max_restarts: 10,
        }
    }
}

/// How long [`FlushSegments::start`] waits at most for every worker's first iteration: twice
/// `flusher_max_unhealthy`.
pub fn startup_timeout(options: &BufferOptions) -> Duration {
    options.flusher_max_unhealthy * 2
}

/// Why the flusher stopped the pipeline.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlushError {
    /// A worker did not complete its first iteration in time.
    #[error("flush worker {worker} (shards [{shards}]) didn't start up in {timeout:?}")]
    StartupTimeout {
        /// The worker's index.
        worker: usize,
        /// Its shards.
        shards: String,
        /// How long it was given.
        timeout: Duration,
    },
    /// A worker ended before completing its first iteration.
    #[error("flush worker {worker} (shards [{shards}]) exited during startup")]
    ExitedDuringStartup {
        /// The worker's index.
        worker: usize,
        /// Its shards.
        shards: String,
    },
    /// A worker had to be replaced too often.
    #[error("flush worker {worker} (shards [{shards}]) was restarted {restarts} times")]
    TooManyRestarts {
        /// The worker's index.
        worker: usize,
        /// Its shards.
        shards: String,
        /// Restarts so far.
        restarts: u32,
    },
}

/// One worker slot: the running task and what it reports.
struct Worker {
    shards: Vec<u16>,
    health: Arc<WorkerHealth>,
    task: JoinHandle<Result<(), BufferError>>,
    /// Replacements in a row, without a replacement that kept flushing in between.
    restarts: u32,
    /// When the current task starts (after its backoff, for a replacement).
    started: Instant,
}

/// Pause before the first replacement of a worker starts; doubles with each one in a row.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause before a replacement starts.
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(30);
/// A replacement that reported for at least this long (or `max_unhealthy`, if longer) clears
/// the count of replacements in a row.
const RESTART_FORGIVEN_AFTER: Duration = Duration::from_secs(10);

/// The pause before the `restarts`-th replacement in a row starts.
fn restart_backoff(restarts: u32) -> Duration {
    RESTART_BACKOFF
        .saturating_mul(1 << restarts.saturating_sub(1).min(16))
        .min(MAX_RESTART_BACKOFF)
}

/// The flush step; see the module docs.
pub struct FlushSegments<N> {
    context: WorkerContext,
    runtime: Handle,
    workers: Vec<Worker>,
    memory: Option<MemoryWatch>,
    last_health_check: Instant,
    failure: Option<FlushError>,
    next_step: N,
    carried_over: CarriedOver<i64>,
    /// Set by `close`: no more input comes, so backpressure is over.
    closed: bool,
}

impl<N> std::fmt::Debug for FlushSegments<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushSegments")
            .field("workers", &self.workers.len())
            .field("settings", &self.context.flusher)
            .finish_non_exhaustive()
    }
}

impl<N> FlushSegments<N> {
    /// Starts the workers for `shards` on `runtime` and waits until each completed one
    /// iteration (at most [`startup_timeout`]).
    ///
    /// Must not be called from one of `runtime`'s threads.
    ///
    /// # Errors
    ///
    /// A worker that ended or did not report in time: the consumer must not write to Redis
    /// without a working flusher.
    pub fn start(
        context: WorkerContext,
        shards: &[u16],
        runtime: Handle,
        next_step: N,
    ) -> Result<Self, FlushError> {
        let count = context
            .flusher
            .workers
            .clamp(1, shards.len().max(1))
            .min(shards.len());
        let mut assignment: Vec<Vec<u16>> = vec![Vec::new(); count];
        for (index, shard) in shards.iter().enumerate() {
            assignment[index % count].push(*shard);
        }
        let workers = assignment
            .into_iter()
            .map(|shards| {
                let health = Arc::new(WorkerHealth::default());
                let task = spawn(&runtime, &context, &shards, &health, 0, Duration::ZERO);
                Worker {
                    shards,
                    health,
                    task,
                    restarts: 0,
                    started: context.clock.now(),
                }
            })
            .collect();
        let max_ratio = context.options.max_memory_percentage;
        let memory = (max_ratio < 1.0).then(|| {
            MemoryWatch::start(
                &runtime,
                context.connection.clone(),
                context.options.clone(),
                max_ratio,
            )
        });
        let last_health_check = context.clock.now();
        let mut step = Self {
            context,
            runtime,
            workers,
            memory,
            last_health_check,
            failure: None,
            next_step,
            carried_over: CarriedOver::new(),
            closed: false,
        };
        step.wait_until_started()?;
        Ok(step)
    }

    fn wait_until_started(&mut self) -> Result<(), FlushError> {
        let timeout = startup_timeout(&self.context.options);
        let failure = self.workers.iter().enumerate().find_map(|(index, worker)| {
            while worker.health.healthy_since.load(Ordering::SeqCst) == 0 {
                if worker.task.is_finished() {
                    return Some(FlushError::ExitedDuringStartup {
                        worker: index,
                        shards: shard_label(&worker.shards),
                    });
                }
                if self
                    .context
                    .clock
                    .now()
                    .saturating_duration_since(worker.started)
                    > timeout
                {
                    return Some(FlushError::StartupTimeout {
                        worker: index,
                        shards: shard_label(&worker.shards),
                        timeout,
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        });
        match failure {
            Some(error) => {
                self.stop_all();
                Err(error)
            }
            None => Ok(()),
        }
    }

    /// Replaces dead and hung workers; checked at most once a second.
    fn check_workers(&mut self) -> Result<(), FlushError> {
        let instant = self.context.clock.now();
        if instant.saturating_duration_since(self.last_health_check) < Duration::from_secs(1) {
            return Ok(());
        }
        self.last_health_check = instant;
        let now = self.context.clock.seconds();
        let max_unhealthy = self.context.options.flusher_max_unhealthy;
        let max_unhealthy_secs = whole_seconds(max_unhealthy);
        for index in 0..self.workers.len() {
            let worker = &self.workers[index];
            let healthy_since = worker.health.healthy_since.load(Ordering::SeqCst);
            let silent = if healthy_since > 0 {
                now - healthy_since > max_unhealthy_secs
            } else {
                instant.saturating_duration_since(worker.started)
                    > startup_timeout(&self.context.options)
            };
            let cause = if worker.task.is_finished() {
                Some("no_process")
            } else if silent && worker.health.failing.load(Ordering::SeqCst) {
                Some("failing")
            } else if silent {
                Some("hang")
            } else {
                None
            };
            if let Some(cause) = cause {
                self.replace(index, cause)?;
            } else if worker.restarts > 0
                && healthy_since > 0
                && instant.saturating_duration_since(worker.started)
                    > max_unhealthy.max(RESTART_FORGIVEN_AFTER)
            {
                tracing::info!(worker = index, shards = %shard_label(&worker.shards), "A replaced flush worker is flushing again.");
                self.workers[index].restarts = 0;
            }
        }
        Ok(())
    }

    fn replace(&mut self, index: usize, cause: &'static str) -> Result<(), FlushError> {
        let worker = &mut self.workers[index];
        let shards = shard_label(&worker.shards);
        metrics::counter!(names::FLUSHER_UNHEALTHY, "cause" => cause, "shard" => shards.clone())
            .increment(1);
        worker.restarts += 1;
        if worker.restarts > self.context.flusher.max_restarts {
            return Err(FlushError::TooManyRestarts {
                worker: index,
                shards,
                restarts: worker.restarts - 1,
            });
        }
        let backoff = restart_backoff(worker.restarts);
        tracing::warn!(worker = index, %shards, cause, restarts = worker.restarts, ?backoff, "Replacing a flush worker.");
        // Retire the old generation first: even if the task is stuck where abort cannot reach
        // it, it checks its generation before producing or cleaning up anything more.
        let generation = worker.health.generation.fetch_add(1, Ordering::SeqCst) + 1;
        worker.task.abort();
        worker.health.healthy_since.store(0, Ordering::SeqCst);
        worker.health.backpressure_since.store(0, Ordering::SeqCst);
        worker.health.failing.store(false, Ordering::SeqCst);
        worker.task = spawn(
            &self.runtime,
            &self.context,
            &worker.shards,
            &worker.health,
            generation,
            backoff,
        );
        // A start in the future: the time since it stays zero until then, so the backoff does
        // not count as silence.
        worker.started = self.context.clock.now() + backoff;
        Ok(())
    }

    /// Whether some worker has been at its flush limit for longer than allowed.
    fn flusher_lagging(&self, now: i64) -> bool {
        let limit = whole_seconds(self.context.options.flusher_backpressure);
        self.workers.iter().any(|worker| {
            let since = worker.health.backpressure_since.load(Ordering::SeqCst);
            since > 0 && now - since > limit
        })
    }

    fn stop_all(&mut self) {
        self.context.shared.stop.store(true, Ordering::SeqCst);
        for worker in &self.workers {
            worker.health.generation.fetch_add(1, Ordering::SeqCst);
            worker.task.abort();
        }
        if let Some(memory) = &self.memory {
            memory.task.abort();
        }
    }

    /// Waits for the workers to finish their current iteration, until `deadline`; whatever is
    /// still running then is stopped for good.
    fn stop_workers_by(&mut self, deadline: Option<Instant>) {
        self.context.shared.stop.store(true, Ordering::SeqCst);
        while !self.workers.iter().all(|worker| worker.task.is_finished()) {
            if deadline.is_some_and(|deadline| self.context.clock.now() >= deadline) {
                tracing::warn!("Flush workers did not stop in time; aborting them.");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.stop_all();
    }
}

impl<N: ProcessingStrategy<i64>> ProcessingStrategy<i64> for FlushSegments<N> {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        if self.failure.is_none()
            && let Err(error) = self.check_workers()
        {
            self.failure = Some(error);
        }
        if let Some(error) = self.failure.take() {
            self.stop_all();
            return Err(StrategyError::Other(Box::new(error)));
        }
        self.carried_over.poll_next(&mut self.next_step)?;
        Ok(self.carried_over.take_commit())
    }

    fn submit(&mut self, message: Message<i64>) -> Result<(), SubmitError<i64>> {
        if self.carried_over.is_holding() {
            return Err(SubmitError::MessageRejected(message));
        }
        let now = seconds(SystemTime::now());
        let reported = self.context.clock.seconds();
        // After `close` the batches still arriving are the pipeline's last, already in Redis:
        // holding them back would only make the join wait out its deadline and leave their
        // offsets uncommitted.
        if !self.closed && self.flusher_lagging(reported) {
            metrics::counter!(names::FLUSHER_BACKPRESSURE).increment(1);
            return Err(SubmitError::MessageRejected(message));
        }
        if !self.closed && self.memory.as_ref().is_some_and(MemoryWatch::exceeded) {
            metrics::counter!(names::FLUSHER_HARD_BACKPRESSURE).increment(1);
            return Err(SubmitError::MessageRejected(message));
        }
        // Only an accepted batch moves the flusher clock (Sentry moves it before the memory
        // check). A batch handed back while Redis is full is offered again and again, and each
        // time it would set the clock back to its own time: no segment would come due, nothing
        // would be flushed, memory would never fall and consumption never resume. Left alone,
        // the clock runs on with the wall clock and flushing frees the memory.
        self.context
            .shared
            .drift
            .store(message.payload() - now, Ordering::SeqCst);
        self.carried_over.forward(&mut self.next_step, message)?;
        Ok(())
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        // Stop first so the workers wind down while the next step joins.
        self.context.shared.stop.store(true, Ordering::SeqCst);
        let committed =
            self.carried_over
                .join_next(&mut self.next_step, deadline, self.context.clock.clock());
        self.stop_workers_by(deadline);
        committed
    }

    fn close(&mut self) {
        self.closed = true;
        self.next_step.close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        self.next_step.partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        self.stop_all();
        self.carried_over.clear();
        self.next_step.terminate();
    }
}

impl<N> Drop for FlushSegments<N> {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// `duration` rounded up to whole seconds, the resolution of the workers' reports.
///
/// A worker's report is a whole second, so `now - since > whole_seconds(limit)` holds only once
/// more than `limit` really passed; rounding down instead would replace a healthy worker (or
/// reject input) as soon as the second changes when the limit is under a second.
fn whole_seconds(duration: Duration) -> i64 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i64::try_from(seconds).unwrap_or(i64::MAX)
}

fn spawn(
    runtime: &Handle,
    context: &WorkerContext,
    shards: &[u16],
    health: &Arc<WorkerHealth>,
    generation: u64,
    delay: Duration,
) -> JoinHandle<Result<(), BufferError>> {
    let task = run_worker(
        context.clone(),
        shards.to_vec(),
        Arc::clone(health),
        generation,
    );
    runtime.spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let result = task.await;
        if let Err(error) = &result {
            tracing::error!(%error, "Flush worker stopped.");
        }
        result
    })
}

/// Samples Redis memory once a second in the background, so `submit` never waits for Redis.
/// The first sample is taken before the step starts, so a consumer started while Redis is
/// already full rejects its very first batch.
struct MemoryWatch {
    exceeded: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl MemoryWatch {
    /// Takes the first sample, then keeps sampling on `runtime`; must not be called from one of
    /// its threads.
    fn start(
        runtime: &Handle,
        connection: RedisConnection,
        options: BufferOptions,
        max_ratio: f64,
    ) -> Self {
        let exceeded = Arc::new(AtomicBool::new(false));
        let Some(store) = runtime
            .block_on(SpansBufferStore::new(connection, options))
            .inspect_err(|error| tracing::error!(%error, "Cannot watch Redis memory."))
            .ok()
        else {
            return Self {
                exceeded,
                task: runtime.spawn(async {}),
            };
        };
        let mut sampler = MemorySampler {
            store,
            exceeded: Arc::clone(&exceeded),
            max_ratio,
            warned: false,
        };
        runtime.block_on(sampler.sample());
        let task = runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                sampler.sample().await;
            }
        });
        Self { exceeded, task }
    }

    fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::SeqCst)
    }
}

/// One Redis memory reading after another, each setting the watch's flag.
struct MemorySampler {
    store: SpansBufferStore,
    exceeded: Arc<AtomicBool>,
    max_ratio: f64,
    warned: bool,
}

impl MemorySampler {
    async fn sample(&mut self) {
        match self.store.memory_usage().await {
            Ok(usage) => {
                let ratio = usage.ratio();
                metrics::gauge!(names::REDIS_MEMORY_RATIO).set(ratio);
                let over = ratio > self.max_ratio;
                if over && !self.warned {
                    tracing::error!(
                        ratio,
                        max_ratio = self.max_ratio,
                        "Redis memory is above the limit; pausing consumption until it falls."
                    );
                }
                self.warned = over;
                self.exceeded.store(over, Ordering::SeqCst);
            }
            Err(error) => tracing::warn!(%error, "Reading Redis memory failed."),
        }
    }
}

#[cfg(test)]
mod tests {
    use integration_tests::redis_server::RedisServer;
    use rill::backends::kafka::KafkaPayload;
    use rill::backends::local::{LocalBroker, LocalProducer};
    use rill::steps::Noop;
    use rill::{ManualClock, Topic};

    use super::*;
    use crate::consumer::flush_worker::{HealthClock, SharedState};

    /// A step on a manual clock over shard 0 of a fresh Redis, whose one worker reports once and
    /// then idles for an hour of real time: silent, for the step, as soon as the clock moves.
    struct Silent {
        clock: ManualClock,
        step: FlushSegments<Noop>,
        _runtime: tokio::runtime::Runtime,
        _server: RedisServer,
    }

    impl Silent {
        fn start(max_restarts: u32) -> Self {
            let server = RedisServer::start();
            let runtime = tokio::runtime::Runtime::new().unwrap();
            let clock = ManualClock::new();
            let connection = runtime
                .block_on(RedisConnection::connect(&[server.url()], false))
                .unwrap();
            let context = WorkerContext {
                connection,
                options: BufferOptions::default(),
                slice_id: None,
                producer: Arc::new(LocalProducer::<KafkaPayload>::new(LocalBroker::new())),
                topic: Topic::new("buffered-segments"),
                flusher: FlushSettings {
                    idle_sleep: Duration::from_secs(3600),
                    max_restarts,
                    ..FlushSettings::default()
                },
                shared: Arc::new(SharedState::default()),
                clock: HealthClock::new(clock.shared()),
                outcomes: None,
            };
            let step = FlushSegments::start(context, &[0], runtime.handle().clone(), Noop).unwrap();
            Self {
                clock,
                step,
                _runtime: runtime,
                _server: server,
            }
        }

        /// Moves the clock by `by` and polls the step.
        fn poll_after(&mut self, by: Duration) -> Result<Option<CommitRequest>, StrategyError> {
            self.clock.advance(by);
            ProcessingStrategy::<i64>::poll(&mut self.step)
        }
    }

    #[test]
    fn a_worker_silent_for_longer_than_max_unhealthy_is_replaced_at_that_second() {
        let mut silent = Silent::start(10);
        let max_unhealthy = BufferOptions::default().flusher_max_unhealthy;

        silent.poll_after(max_unhealthy).unwrap();
        assert_eq!(
            silent.step.workers[0].restarts, 0,
            "silent for just the limit"
        );

        silent.poll_after(Duration::from_secs(1)).unwrap();
        assert_eq!(silent.step.workers[0].restarts, 1, "silent for longer");
    }

    #[test]
    fn a_worker_replaced_more_often_than_max_restarts_fails_the_step() {
        let mut silent = Silent::start(0);
        let max_unhealthy = BufferOptions::default().flusher_max_unhealthy;

        let error = silent
            .poll_after(max_unhealthy + Duration::from_secs(1))
            .unwrap_err();
        let StrategyError::Other(error) = error else {
            panic!("not the flusher's error: {error:?}");
        };
        assert!(
            matches!(
                error.downcast_ref::<FlushError>(),
                Some(FlushError::TooManyRestarts { worker: 0, .. })
            ),
            "{error:?}"
        );
    }

    fn watch_with_maxmemory(maxmemory: &str, max_ratio: f64) -> bool {
        let server = RedisServer::start();
        server.config_set("maxmemory", maxmemory);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let connection = runtime
            .block_on(RedisConnection::connect(&[server.url()], false))
            .unwrap();
        let watch = MemoryWatch::start(
            runtime.handle(),
            connection,
            BufferOptions::default(),
            max_ratio,
        );
        let exceeded = watch.exceeded();
        watch.task.abort();
        exceeded
    }

    #[test]
    fn limits_under_a_second_wait_for_a_whole_second() {
        assert_eq!(whole_seconds(Duration::from_millis(500)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(60)), 60);
        assert_eq!(whole_seconds(Duration::ZERO), 0);
        assert_eq!(whole_seconds(Duration::MAX), i64::MAX);
    }

    #[test]
    fn replacements_in_a_row_wait_longer_and_longer_up_to_a_bound() {
        let pauses: Vec<u64> = (1..=8).map(|n| restart_backoff(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(restart_backoff(u32::MAX), MAX_RESTART_BACKOFF);
    }

    #[test]
    fn memory_watch_knows_redis_is_full_as_soon_as_it_starts() {
        assert!(watch_with_maxmemory("100mb", 0.000_001));
    }

    #[test]
    fn memory_watch_lets_input_through_while_redis_has_room() {
        assert!(!watch_with_maxmemory("0", 0.9));
    }
}
