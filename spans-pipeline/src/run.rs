//! `spans-pipeline run`: the consumer as a long-running service.
//!
//! It connects to Redis and Kafka from the configuration, serves Prometheus metrics and
//! touches a health file if asked to (while the processor loop is alive, which a member
//! without partitions, or one waiting for its flushers or a rebalance, is too: a stale file
//! means stuck, never idle), and runs the stream processor on the calling thread
//! until SIGINT or SIGTERM, which stop it gracefully: the pipeline is joined (the flush
//! workers finish their current flush), the last offsets are committed, the group is left.
//!
//! At start it asks the brokers for the dead-letter topic: a missing one is a warning (invalid
//! messages are then logged, counted and committed past, since stopping would re-read and
//! duplicate everything after them on every restart), or, with `kafka.dlq_required`, a refusal
//! to start that names the topic.
//!
//! SIGHUP reloads the configuration file (with the same environment and command-line
//! overrides). The kill-switch applies at once; buffer options (timeouts, limits, compression
//! level, lock TTL, memory limit) and batching settings apply by rebuilding the pipeline in
//! place (joined and committed first, no rebalance). Kafka, Redis and observability settings
//! need a restart; the log says which changed. An invalid file is refused and the running
//! configuration kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rill::backends::kafka::{
    KafkaConsumer, KafkaDlqProducer, KafkaPayload, KafkaProducer, TopicCheckError,
};
use rill::dlq::{DlqPolicy, Undeliverable};
use rill::processor::{Liveness, ProcessorConfig, ProcessorHandle, StreamProcessor};
use rill::{Producer, Topic};

use crate::buffer::RedisConnection;
use crate::config::{Config, ConfigError, KafkaSection};
use crate::consumer::{KillSwitchHandle, PipelineSettings, SettingsHandle, SpansStrategyFactory};
use crate::error_chain::ErrorChain;

/// How long the start-time check of the dead-letter topic waits for the brokers.
const TOPIC_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the configuration comes from, kept to reload it on SIGHUP.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    /// The TOML file, if any.
    pub path: Option<PathBuf>,
    /// `section.key=value` overrides from the command line.
    pub overrides: Vec<String>,
}

impl ConfigSource {
    /// Loads the configuration: file, then `SPANS_PIPELINE__*` variables, then overrides.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`].
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.path.as_deref(), std::env::vars(), &self.overrides)
    }
}

/// Why the consumer stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The tokio runtime, a signal handler or the health-file thread could not start.
    #[error("cannot start the runtime")]
    Runtime(#[source] std::io::Error),
    /// The Prometheus endpoint could not start.
    #[error("cannot start the metrics endpoint: {0}")]
    Metrics(String),
    /// Redis could not be reached at start.
    #[error("cannot connect to redis")]
    Redis(#[source] redis::RedisError),
    /// A Kafka client could not be created.
    #[error("cannot create a kafka client: {0}")]
    Kafka(String),
    /// `kafka.dlq_required` is set and the brokers do not offer the dead-letter topic.
    #[error(
        "the dead-letter topic {topic} is required (kafka.dlq_required) but cannot be used; \
         create it, or unset kafka.dlq_required to start without it"
    )]
    DeadLetterTopic {
        /// `kafka.dlq_topic`.
        topic: String,
        /// What the brokers answered (boxed: librdkafka's errors are large).
        #[source]
        source: Box<TopicCheckError>,
    },
    /// The stream processor failed.
    #[error(transparent)]
    Processor(#[from] rill::processor::RunError),
}

/// Runs the consumer until SIGINT or SIGTERM; see the module docs.
///
/// # Errors
///
/// See [`RunError`].
pub fn run(source: ConfigSource, config: Config) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("spans-pipeline-io")
        .build()
        .map_err(RunError::Runtime)?;
    if let Some(address) = config.observability.metrics_listen {
        let _entered = runtime.enter();
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(address)
            .install()
            .map_err(|error| RunError::Metrics(error.to_string()))?;
        crate::metrics::register();
        tracing::info!(%address, "Serving Prometheus metrics.");
    }
    let connection = runtime
        .block_on(RedisConnection::connect_with_tls(
            &config.redis.connection_urls()?,
            config.redis.cluster,
            config.redis.tls_certificates()?,
        ))
        .map_err(RunError::Redis)?;
    let producer = Arc::new(producer(&config)?);
    let factory = SpansStrategyFactory::from_config(
        &config,
        connection,
        Arc::clone(&producer) as Arc<dyn Producer<KafkaPayload>>,
        runtime.handle().clone(),
    );
    let kill_switch = factory.kill_switch();
    let settings = factory.settings();
    let topics: Vec<&str> = config
        .kafka
        .input_topics
        .iter()
        .map(String::as_str)
        .collect();
    let consumer = KafkaConsumer::subscribe(&config.kafka_consumer_config(), &topics)
        .map_err(|error| RunError::Kafka(error.to_string()))?;
    let processor_config = ProcessorConfig::default()
        .with_join_timeout(config.consumer.join_timeout)
        .with_backpressure_grace(config.consumer.backpressure_grace);
    let mut processor = StreamProcessor::new(consumer, factory).with_config(processor_config);
    if let Some(path) = &config.observability.health_file {
        touch_while_alive(path.clone(), processor.handle().liveness().clone())
            .map_err(RunError::Runtime)?;
    }
    if let Some(undeliverable) = dead_letter_policy(&producer, &config.kafka)? {
        processor = processor.with_dlq(
            DlqPolicy::new(KafkaDlqProducer::new(
                Arc::clone(&producer),
                Topic::new(&config.kafka.dlq_topic),
            ))
            .with_undeliverable(undeliverable),
        );
    }
    let reloader = Reloader {
        source,
        running: config,
        kill_switch,
        settings,
        handle: processor.handle(),
    };
    runtime.spawn(watch_signals(reloader));
    tracing::info!("Consuming.");
    let result = processor.run();
    if let Err(error) = producer.flush(Duration::from_secs(10)) {
        tracing::warn!(%error, "Messages were still in flight at exit.");
    }
    tracing::info!(stats = ?processor.stats(), "Stopped.");
    result.map_err(RunError::from)
}

/// Checks the dead-letter topic and chooses what becomes of a dead letter that cannot be
/// delivered; `None` without a dead-letter topic.
///
/// By default a dead letter is committed past after its attempts (logged and counted):
/// stopping would re-read and duplicate on every restart what came after it. With
/// `kafka.dlq_required` the topic must exist at start, and a dead letter is never given up: the
/// consumer stops instead.
fn dead_letter_policy(
    producer: &KafkaProducer,
    kafka: &KafkaSection,
) -> Result<Option<Undeliverable>, RunError> {
    if kafka.dlq_topic.is_empty() {
        return Ok(None);
    }
    match producer.check_topic(&Topic::new(&kafka.dlq_topic), TOPIC_CHECK_TIMEOUT) {
        Ok(partitions) => {
            tracing::info!(topic = %kafka.dlq_topic, partitions, "Dead-letter topic found.");
        }
        Err(source) if kafka.dlq_required => {
            return Err(RunError::DeadLetterTopic {
                topic: kafka.dlq_topic.clone(),
                source: Box::new(source),
            });
        }
        Err(error) => tracing::warn!(
            topic = %kafka.dlq_topic,
            error = %ErrorChain(&error),
            "The dead-letter topic cannot be used: invalid messages will be logged, counted \
             (rill.dlq.undeliverable) and committed past. Create the topic, or set \
             kafka.dlq_required = true to refuse to start without it."
        ),
    }
    Ok(Some(if kafka.dlq_required {
        Undeliverable::Fail
    } else {
        Undeliverable::CommitPast
    }))
}

fn producer(config: &Config) -> Result<KafkaProducer, RunError> {
    KafkaProducer::new(&config.kafka_producer_config())
        .map_err(|error| RunError::Kafka(error.to_string()))
}

/// How often the health file is touched while the processor loop is alive.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the health thread looks at the loop's liveness, so the first touch follows the
/// loop's start closely.
const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Touches `path` every [`HEALTH_INTERVAL`] while `liveness` says the processor loop is alive,
/// from a thread of its own: also with no partition assigned, in the flushers' startup gate or
/// while a rebalance drains, and never while the loop is stuck past the waits it bounds.
fn touch_while_alive(path: PathBuf, liveness: Liveness) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("spans-pipeline-health".to_owned())
        .spawn(move || {
            let mut touched: Option<Instant> = None;
            loop {
                let due = touched.is_none_or(|at| at.elapsed() >= HEALTH_INTERVAL);
                if due && liveness.is_alive() {
                    touched = Some(Instant::now());
                    if let Err(error) = std::fs::write(&path, b"") {
                        tracing::warn!(%error, path = %path.display(), "Could not touch the health file.");
                    }
                }
                std::thread::sleep(HEALTH_CHECK_INTERVAL);
            }
        })
        .map(drop)
}

/// Applies a reloaded configuration.
struct Reloader {
    source: ConfigSource,
    running: Config,
    kill_switch: KillSwitchHandle,
    settings: SettingsHandle,
    handle: ProcessorHandle,
}

impl Reloader {
    fn reload(&mut self) {
        let next = match self.source.load() {
            Ok(next) => next,
            Err(error) => {
                tracing::error!(%error, "Reload refused; the running configuration stays.");
                return;
            }
        };
        let restart_only = self.running.restart_only_changes(&next);
        if !restart_only.is_empty() {
            tracing::warn!(
                sections = ?restart_only,
                "Reloaded settings that take effect only after a restart."
            );
        }
        if next.kill_switch != self.running.kill_switch {
            self.kill_switch.replace(next.kill_switch.clone());
            tracing::info!("Kill-switch reloaded.");
        }
        if next.buffer != self.running.buffer
            || next.consumer != self.running.consumer
            || next.flusher != self.running.flusher
        {
            self.settings.replace(PipelineSettings::of(&next));
            self.handle.request_rebuild();
            tracing::info!("Buffer and pipeline settings reloaded; rebuilding the pipeline.");
        }
        // Sections that need a restart keep describing what actually runs.
        self.running = Config {
            kafka: self.running.kafka.clone(),
            redis: self.running.redis.clone(),
            observability: self.running.observability.clone(),
            ..next
        };
    }
}

async fn watch_signals(mut reloader: Reloader) {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = signals else {
        tracing::error!("Cannot install signal handlers; stop the consumer with SIGKILL only.");
        return;
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: stopping after the current work.");
                reloader.handle.signal_shutdown();
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT: stopping after the current work.");
                reloader.handle.signal_shutdown();
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration.");
                reloader.reload();
            }
        }
    }
}
