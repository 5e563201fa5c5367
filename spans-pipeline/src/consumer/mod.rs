//! The process-spans consumer, assembled from `rill` steps.
//!
//! For each assignment the stream processor asks [`SpansStrategyFactory`] for a pipeline:
//!
//! 1. **decode** (`RunTask`, [`decode_span`]): validate each message as a span; an invalid one
//!    goes to the dead-letter queue with the field that is wrong. Runs first because only here
//!    is a message still on its own, named by its partition and offset.
//! 2. **kill-switch** (`Filter`): drop spans the operator disabled; their offsets still count
//!    as done.
//! 3. **batch** (`Reduce`): up to `max_batch_size` spans or `max_batch_time` from the first.
//! 4. **process** (`RunTaskInThreads`, [`ProcessSpans`]): write the batch to Redis and pass on
//!    its clock; the next batch is encoded while one is written. Redis trouble is
//!    backpressure, not failure.
//! 5. **flush** ([`FlushSegments`]): background workers flush due segments to the output topic;
//!    their lag or a full Redis becomes backpressure.
//! 6. **commit** (`CommitOffsets`): offsets are committed once the spans are in Redis, exactly
//!    as Sentry does, never before.

mod decode;
mod flush_step;
mod flush_worker;
mod outcomes;
mod process_spans;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rill::backends::kafka::KafkaPayload;
use rill::steps::{CommitOffsets, Filter, Reduce, RunTask, RunTaskInThreads};
use rill::{
    CommitRequest, Message, Partition, ProcessingStrategy, ProcessingStrategyFactory, Producer,
    SharedClock, StrategyError, SubmitError, SystemClock, Topic,
};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

pub use decode::{KillSwitch, KillSwitchHandle, SpanMessage, decode_span};
pub use flush_step::{FlushError, FlushSegments, FlushSettings, startup_timeout};
pub use flush_worker::{HealthClock, SharedState, WorkerContext};
pub use outcomes::Outcomes;
pub(crate) use outcomes::PRODUCE_FAILED;
pub use process_spans::ProcessSpans;

use crate::buffer::connection::RESPONSE_TIMEOUT;
use crate::buffer::{BufferError, BufferOptions, RedisConnection, SpansBuffer};
use crate::config::Config;

/// Batching and commits: the `[consumer]` section of the configuration.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerSettings {
    /// Spans per batch (Sentry's `--max-batch-size`).
    pub max_batch_size: u64,
    /// Longest a batch waits from its first span (`--max-batch-time-ms`).
    #[serde(with = "humantime_serde")]
    pub max_batch_time: Duration,
    /// How often offsets are committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long a rebalance or shutdown waits for the pipeline (and the flush workers).
    #[serde(with = "humantime_serde")]
    pub join_timeout: Duration,
    /// How long the pipeline may reject input before the partitions are paused.
    #[serde(with = "humantime_serde")]
    pub backpressure_grace: Duration,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            max_batch_size: 2000,
            max_batch_time: Duration::from_secs(1),
            commit_interval: Duration::from_secs(1),
            join_timeout: Duration::from_secs(25),
            backpressure_grace: Duration::from_secs(5),
        }
    }
}

/// What a pipeline is built with: the `[buffer]`, `[consumer]` and `[flusher]` sections.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineSettings {
    /// The buffer's options.
    pub buffer: BufferOptions,
    /// Batching and commits.
    pub consumer: ConsumerSettings,
    /// The flush workers.
    pub flusher: FlushSettings,
}

impl PipelineSettings {
    /// The sections of `config` a pipeline is built with.
    pub fn of(config: &Config) -> Self {
        Self {
            buffer: config.buffer.clone(),
            consumer: config.consumer.clone(),
            flusher: config.flusher.clone(),
        }
    }
}

/// The settings that can be replaced while the consumer runs: the factory reads them each
/// time it builds a pipeline, so replacing them and asking the stream processor to rebuild
/// (`ProcessorHandle::request_rebuild`) applies them without a restart.
#[derive(Clone, Debug)]
pub struct SettingsHandle(Arc<RwLock<PipelineSettings>>);

impl SettingsHandle {
    /// A handle holding `settings`.
    pub fn new(settings: PipelineSettings) -> Self {
        Self(Arc::new(RwLock::new(settings)))
    }

    /// Replaces them; pipelines built from now on use the new ones.
    pub fn replace(&self, settings: PipelineSettings) {
        *self
            .0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = settings;
    }

    /// The current values.
    pub fn current(&self) -> PipelineSettings {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Builds the spans pipeline for each assignment; see the module docs.
pub struct SpansStrategyFactory {
    connection: RedisConnection,
    settings: SettingsHandle,
    slice_id: Option<u32>,
    producer: Arc<dyn Producer<KafkaPayload>>,
    output: Topic,
    kill_switch: KillSwitchHandle,
    runtime: Handle,
    outcomes: Option<Outcomes>,
    clock: SharedClock,
}

impl std::fmt::Debug for SpansStrategyFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpansStrategyFactory")
            .field("output", &self.output)
            .field("settings", &self.settings.current())
            .finish_non_exhaustive()
    }
}

impl SpansStrategyFactory {
    /// The consumer `config` describes, wired the one way `run`, the demo, the benches and the
    /// tests all use: buffer options, batching, flush workers, slice id, output topic, the
    /// outcomes topic (off when empty) and the kill-switch all come from `config`. It writes
    /// to Redis through `connection` and produces flushed segments (and outcomes) with
    /// `producer`; Redis calls and flush workers run on `runtime`, which must not be the thread
    /// the stream processor runs on.
    ///
    /// `config` is taken as it is: [`Config::load`](crate::config::Config::load) has checked
    /// it already, and tests may use values a file could not hold (a one-second flush lock).
    pub fn from_config(
        config: &Config,
        connection: RedisConnection,
        producer: Arc<dyn Producer<KafkaPayload>>,
        runtime: Handle,
    ) -> Self {
        let outcomes = (!config.kafka.outcomes_topic.is_empty()).then(|| {
            Outcomes::new(
                Arc::clone(&producer),
                Topic::new(&config.kafka.outcomes_topic),
            )
        });
        Self {
            connection,
            settings: SettingsHandle::new(PipelineSettings::of(config)),
            slice_id: config.kafka.slice_id,
            producer,
            output: Topic::new(&config.kafka.output_topic),
            kill_switch: KillSwitchHandle::new(config.kill_switch.clone()),
            runtime,
            outcomes,
            clock: SystemClock::shared(),
        }
    }

    /// Runs the flush step's health checks on `clock` instead of the system clock.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// The handle to replace the options and settings at run time.
    pub fn settings(&self) -> SettingsHandle {
        self.settings.clone()
    }

    /// The handle to replace the kill-switch at run time.
    pub fn kill_switch(&self) -> KillSwitchHandle {
        self.kill_switch.clone()
    }

    fn build(
        &self,
        shards: &[u16],
    ) -> Result<Box<dyn ProcessingStrategy<KafkaPayload> + Send>, StartError> {
        let PipelineSettings {
            buffer: options,
            consumer: settings,
            flusher,
        } = self.settings.current();
        let context = WorkerContext {
            connection: self.connection.clone(),
            options: options.clone(),
            slice_id: self.slice_id,
            producer: Arc::clone(&self.producer),
            topic: self.output.clone(),
            flusher,
            shared: Arc::new(SharedState::default()),
            clock: HealthClock::new(Arc::clone(&self.clock)),
            outcomes: self.outcomes.clone(),
        };
        // Built from the last step back.
        let commit = CommitOffsets::new(settings.commit_interval);
        let flush = FlushSegments::start(context, shards, self.runtime.clone(), commit)?;
        let buffer = self.runtime.block_on(SpansBuffer::new(
            self.connection.clone(),
            options,
            shards.to_vec(),
            self.slice_id,
        ))?;
        let process = ProcessSpans::new(buffer);
        let process = RunTaskInThreads::new(
            move |batch: Message<Vec<SpanMessage>>| process.task(batch),
            process_spans::CONCURRENT_BATCHES,
            self.runtime.clone(),
            flush,
        );
        let batch = Reduce::vec(settings.max_batch_size, settings.max_batch_time, process);
        let keep = Filter::new(
            |message: &Message<SpanMessage>| !message.payload().killed,
            batch,
        );
        let kill_switch = self.kill_switch.clone();
        Ok(Box::new(RunTask::new(
            move |message: Message<KafkaPayload>| decode_span(&kill_switch, message),
            keep,
        )))
    }
}

impl ProcessingStrategyFactory<KafkaPayload> for SpansStrategyFactory {
    fn create(
        &mut self,
        partitions: &[Partition],
    ) -> Box<dyn ProcessingStrategy<KafkaPayload> + Send> {
        let mut shards: Vec<u16> = partitions
            .iter()
            .filter_map(|partition| u16::try_from(partition.index()).ok())
            .collect();
        shards.sort_unstable();
        shards.dedup();
        match self.build(&shards) {
            Ok(pipeline) => pipeline,
            Err(error) => {
                tracing::error!(%error, "Cannot start the spans pipeline.");
                Box::new(Failed(Some(error)))
            }
        }
    }

    /// The flushers' startup gate, plus a Redis response timeout for each of the two other
    /// Redis calls a build waits for (the first memory sample, the buffer's script load): a
    /// consumer waiting in them is starting, not stuck.
    fn create_timeout(&self) -> Duration {
        flush_step::startup_timeout(&self.settings.current().buffer) + RESPONSE_TIMEOUT * 2
    }

    /// The flush workers own the shards of the partitions the pipeline was built for (as
    /// Sentry's consumer restarts its flusher on every rebalance): a new assignment needs a
    /// new pipeline.
    fn rebuilds_on_rebalance(&self) -> bool {
        true
    }
}

/// Why a pipeline could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The flusher did not start.
    #[error("flusher did not start")]
    Flusher(#[from] FlushError),
    /// The buffer could not reach Redis.
    #[error("buffer did not start")]
    Buffer(#[from] BufferError),
}

/// A pipeline that could not be built: it fails the stream processor on its first poll with
/// the reason, instead of panicking inside the factory.
#[derive(Debug)]
struct Failed(Option<StartError>);

impl ProcessingStrategy<KafkaPayload> for Failed {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        match self.0.take() {
            Some(error) => Err(StrategyError::Other(Box::new(error))),
            None => Ok(None),
        }
    }

    fn submit(&mut self, message: Message<KafkaPayload>) -> Result<(), SubmitError<KafkaPayload>> {
        Err(SubmitError::MessageRejected(message))
    }

    fn join(
        &mut self,
        _: Option<std::time::Instant>,
    ) -> Result<Option<CommitRequest>, StrategyError> {
        Ok(None)
    }

    fn terminate(&mut self) {}
}
