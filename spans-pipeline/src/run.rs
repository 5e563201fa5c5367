//! `spans-pipeline run`: the consumer as a long-running service.
//!
//! It connects to Redis and Kafka from the configuration, serves Prometheus metrics and
//! touches a health file if asked to, and runs the stream processor on the calling thread
//! until SIGINT or SIGTERM, which stop it gracefully: the pipeline is joined (the flush
//! workers finish their current flush), the last offsets are committed, the group is left.
//!
//! SIGHUP reloads the configuration file (with the same environment and command-line
//! overrides). The kill-switch applies at once; buffer options (timeouts, limits, compression
//! level, lock TTL, memory limit) and batching settings apply by rebuilding the pipeline in
//! place (joined and committed first, no rebalance). Kafka, Redis and observability settings
//! need a restart; the log says which changed. An invalid file is refused and the running
//! configuration kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rill::backends::kafka::{KafkaConsumer, KafkaDlqProducer, KafkaPayload, KafkaProducer};
use rill::dlq::{DlqPolicy, Undeliverable};
use rill::processor::{ProcessorConfig, ProcessorHandle, StreamProcessor};
use rill::steps::HealthCheck;
use rill::{Partition, ProcessingStrategy, ProcessingStrategyFactory, Producer, Topic};

use crate::buffer::RedisConnection;
use crate::config::{Config, ConfigError};
use crate::consumer::{KillSwitchHandle, SettingsHandle, SpansStrategyFactory};

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
    /// The tokio runtime or a signal handler could not start.
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
    let kill_switch = KillSwitchHandle::new(config.kill_switch.clone());
    let factory = SpansStrategyFactory::new(
        connection,
        config.buffer.options(),
        config.kafka.slice_id,
        Arc::clone(&producer) as Arc<dyn Producer<KafkaPayload>>,
        Topic::new(&config.kafka.output_topic),
        config.consumer_settings(),
        kill_switch.clone(),
        runtime.handle().clone(),
    );
    let factory = if config.kafka.outcomes_topic.is_empty() {
        factory
    } else {
        factory.with_outcomes(Topic::new(&config.kafka.outcomes_topic))
    };
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
    let mut processor = match &config.observability.health_file {
        Some(path) => StreamProcessor::new(consumer, with_health_file(factory, path.clone())),
        None => StreamProcessor::new(consumer, factory),
    }
    .with_config(processor_config);
    if !config.kafka.dlq_topic.is_empty() {
        // A dead letter that cannot be delivered (a missing topic) is logged, counted and
        // committed past after its attempts: stopping would re-read and duplicate on restart.
        processor = processor.with_dlq(
            DlqPolicy::new(KafkaDlqProducer::new(
                Arc::clone(&producer),
                Topic::new(&config.kafka.dlq_topic),
            ))
            .with_undeliverable(Undeliverable::CommitPast),
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

fn producer(config: &Config) -> Result<KafkaProducer, RunError> {
    KafkaProducer::new(&config.kafka_producer_config())
        .map_err(|error| RunError::Kafka(error.to_string()))
}

/// Wraps every pipeline the factory builds in a step that touches `path` while polled.
fn with_health_file(
    mut factory: SpansStrategyFactory,
    path: PathBuf,
) -> impl ProcessingStrategyFactory<KafkaPayload> + 'static {
    move |partitions: &[Partition]| -> Box<dyn ProcessingStrategy<KafkaPayload>> {
        Box::new(HealthCheck::new(path.clone(), factory.create(partitions)))
    }
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
            self.settings
                .replace(next.buffer.options(), next.consumer_settings());
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
