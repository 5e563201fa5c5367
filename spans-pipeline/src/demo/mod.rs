//! `spans-pipeline demo`: the whole consumer on an embedded default, with a readable summary.
//!
//! It starts librdkafka's mock Kafka cluster in this process and a local `redis-server` on a
//! free port (or uses `--redis-url`), and runs the full pipeline (decode → batch →
//! ProcessSpans → FlushSegments → CommitOffsets) with production's flush timeouts on the
//! reference workload's shape. The consumer runs on workload time, as in production: each
//! message's Kafka timestamp is its span's `received` time, and the feeder replays the traffic
//! faster than it happened (`--rate`), so the demo takes seconds, not the minutes the traffic
//! spans. A last span stamped past the longest timeout (the clock tick) moves workload time on
//! once everything is committed, as later traffic would. The output topic is read back and
//! the summary says what a user wants to know: traces in and how many came out as one complete
//! segment, spans lost (must be 0), duplicates, dead letters (a few malformed messages are
//! mixed in), keys left in Redis, and the throughput.

mod feed;
mod local_redis;
mod output;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rill::Topic;
use rill::backends::kafka::{
    KafkaConsumer, KafkaConsumerConfig, KafkaDlqProducer, KafkaPayload, KafkaProducer,
    KafkaProducerConfig,
};
use rill::dlq::DlqPolicy;
use rill::processor::{ProcessorConfig, StreamProcessor};

pub use local_redis::{LocalRedis, LocalRedisError};

use self::feed::Feeder;
use self::output::{OutputReader, Tally};
use crate::buffer::{BufferOptions, RedisConnection, SpansBufferStore};
use crate::config::Config;
use crate::consumer::SpansStrategyFactory;
use crate::progress::Progress;
use crate::workload::{WorkloadShape, clock_tick, generate};

const INPUT: &str = "ingest-spans";
const OUTPUT: &str = "buffered-segments";
const DLQ: &str = "ingest-spans-dlq";
const GROUP: &str = "process-spans";
/// Partitions of the output topic. The mock broker keeps only about 5 MB of each partition,
/// and a flush writes up to `max-flush-segments` segments at once: spread over this many
/// partitions a burst stays far below that, so the reader never finds data already dropped.
const OUTPUT_PARTITIONS: i32 = 32;
/// How far past the last span the clock tick is stamped: past the 60 s segment timeout.
const TICK_AFTER: Duration = Duration::from_secs(70);
/// Longest wait for every span to come out once everything is committed and the tick sent.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait, once every span is out, for Redis to empty: the tick's own segment comes due
/// a root timeout (10 s) after it, then a flush iteration and its cleanup, with room to spare.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest the consumer may take to join its group and get its partitions.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoSettings {
    /// Spans to produce, in traces of the reference workload's shape.
    pub spans: usize,
    /// Spans produced per second (the workload's own rate is 2,000 a second; the demo replays
    /// it this much faster).
    pub rate: f64,
    /// Partitions of the input topic.
    pub partitions: i32,
    /// Flush workers.
    pub flusher_workers: usize,
    /// A Redis to use instead of starting one.
    pub redis_url: Option<String>,
    /// Whether `redis_url` is a cluster.
    pub cluster: bool,
    /// Seed of the synthetic load.
    pub seed: u64,
    /// Show progress on stderr (a bar on a terminal, a line a second otherwise).
    pub progress: bool,
}

impl Default for DemoSettings {
    fn default() -> Self {
        Self {
            spans: 50_000,
            rate: 40_000.0,
            partitions: 8,
            flusher_workers: 2,
            redis_url: None,
            cluster: false,
            seed: 42,
            progress: true,
        }
    }
}

/// What the demo measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DemoReport {
    /// Valid spans produced.
    pub spans_in: usize,
    /// Traces they belong to.
    pub traces_in: usize,
    /// Malformed messages produced.
    pub malformed_in: usize,
    /// Messages the consumer dead-lettered.
    pub dead_lettered: u64,
    /// Segment messages read from the output topic.
    pub segments_out: usize,
    /// Traces that came out as exactly one segment holding every span of the trace.
    pub whole_traces: usize,
    /// Distinct spans read from the output topic.
    pub spans_out: usize,
    /// Spans read more than once.
    pub duplicate_spans: usize,
    /// Spans produced but never seen in the output.
    pub lost_spans: usize,
    /// Keys left in Redis after the last flush.
    pub redis_keys_left: u64,
    /// Workload time the load spans (first to last `received`).
    pub workload_time: Duration,
    /// From the first span produced to the last message read by the consumer.
    pub read_time: Duration,
    /// From the first span produced to every offset committed.
    pub ingest_time: Duration,
    /// From the first span produced to the last span read back.
    pub elapsed: Duration,
}

impl DemoReport {
    /// Spans per second through the whole pipeline.
    pub fn throughput(&self) -> f64 {
        self.spans_in as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    /// Spans per second from the first produced to the last read by the consumer.
    pub fn read_rate(&self) -> f64 {
        self.spans_in as f64 / self.read_time.as_secs_f64().max(f64::EPSILON)
    }

    /// Spans per second from the first produced to every offset committed.
    pub fn ingest_rate(&self) -> f64 {
        self.spans_in as f64 / self.ingest_time.as_secs_f64().max(f64::EPSILON)
    }

    /// Share of the traces that came out as one complete segment, in percent.
    pub fn whole_share(&self) -> f64 {
        100.0 * self.whole_traces as f64 / self.traces_in.max(1) as f64
    }
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "spans in            {:>10}  in {} traces, {:.1?} of traffic replayed in {:.1?}",
            self.spans_in, self.traces_in, self.workload_time, self.read_time
        )?;
        writeln!(
            f,
            "malformed in        {:>10}  (dead-lettered: {})",
            self.malformed_in, self.dead_lettered
        )?;
        writeln!(
            f,
            "segments out        {:>10}  {} of {} traces ({:.1} %) as one complete segment",
            self.segments_out,
            self.whole_traces,
            self.traces_in,
            self.whole_share()
        )?;
        writeln!(
            f,
            "spans out           {:>10}  (duplicates: {})",
            self.spans_out, self.duplicate_spans
        )?;
        writeln!(f, "spans lost          {:>10}", self.lost_spans)?;
        writeln!(f, "redis keys left     {:>10}", self.redis_keys_left)?;
        writeln!(
            f,
            "read                {:>10.0} spans/s (first span produced → the last one read by \
             the consumer)",
            self.read_rate()
        )?;
        writeln!(
            f,
            "ingest              {:>10.0} spans/s (→ every offset committed, {:.1?} after the last \
             read: the last partial batch waits max_batch_time, commits go out every \
             commit_interval)",
            self.ingest_rate(),
            self.ingest_time.saturating_sub(self.read_time)
        )?;
        write!(
            f,
            "end to end          {:>10.0} spans/s (→ every span out, {:.1?}, flush timeouts on \
             workload time)",
            self.throughput(),
            self.elapsed
        )
    }
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// The local Redis did not start.
    #[error(transparent)]
    Redis(#[from] LocalRedisError),
    /// Redis refused the connection or a command.
    #[error("redis failed")]
    RedisClient(#[from] redis::RedisError),
    /// Kafka (the mock cluster or a client) failed.
    #[error("kafka failed")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The consumer failed.
    #[error("the consumer failed")]
    Consumer(#[from] rill::processor::RunError),
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// Runs the demo; see the module docs.
///
/// # Errors
///
/// See [`DemoError`]. Losing spans is not an error here: the report says how many.
pub fn run(settings: &DemoSettings) -> Result<DemoReport, DemoError> {
    let local_redis = match &settings.redis_url {
        Some(_) => None,
        None => Some(LocalRedis::start()?),
    };
    let redis_url = settings
        .redis_url
        .clone()
        .or_else(|| local_redis.as_ref().map(LocalRedis::url))
        .ok_or_else(|| DemoError::Other("no redis".to_owned()))?;
    let mock = MockCluster::new(1)?;
    mock.create_topic(INPUT, settings.partitions, 1)?;
    mock.create_topic(OUTPUT, OUTPUT_PARTITIONS, 1)?;
    mock.create_topic(DLQ, 1, 1)?;
    let bootstrap = mock.bootstrap_servers();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| DemoError::Other(format!("cannot start tokio: {error}")))?;
    let connection = runtime.block_on(RedisConnection::connect(
        std::slice::from_ref(&redis_url),
        settings.cluster,
    ))?;

    let load = generate(&WorkloadShape {
        spans: settings.spans,
        seed: settings.seed,
        ..WorkloadShape::default()
    });
    let tick = clock_tick();
    let workload_time = Duration::from_secs_f64(
        load.last().map_or(0.0, |last| last.received)
            - load.first().map_or(0.0, |first| first.received),
    );
    let traces_in = load
        .iter()
        .map(|span| &span.trace_id)
        .collect::<std::collections::HashSet<_>>()
        .len();
    eprintln!(
        "demo: {} spans in {traces_in} traces ({workload_time:.1?} of traffic) at {:.0} spans/s; \
         kafka (mock) {bootstrap}; redis {redis_url}",
        load.len(),
        settings.rate
    );

    let (processor_handle, processor_thread) =
        start_consumer(&bootstrap, connection.clone(), settings, &runtime)?;
    let reader = OutputReader::start(&bootstrap, OUTPUT, OUTPUT_PARTITIONS)?;
    // The feed's clock starts once the consumer has its partitions: the group's first join
    // waits out the broker's initial rebalance delay (3 s on the mock), which is no part of
    // the consumer's speed.
    let joining = Instant::now();
    while processor_handle.stats().rebalances == 0 {
        if processor_thread.is_finished() {
            processor_thread
                .join()
                .map_err(|_| DemoError::Other("consumer thread panicked".to_owned()))??;
            return Err(DemoError::Other(
                "the consumer stopped before it started".to_owned(),
            ));
        }
        if joining.elapsed() > JOIN_TIMEOUT {
            return Err(DemoError::Other(format!(
                "the consumer got no partitions within {JOIN_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "demo: the consumer joined its group in {:.1?}",
        joining.elapsed()
    );

    let mut display = settings
        .progress
        .then(|| Progress::stderr("demo", "spans out", Some(load.len() as u64)));
    let mut feeder = Feeder::new(&bootstrap, INPUT, settings.partitions, GROUP)?;
    let read = || processor_handle.stats().messages_polled;
    let fed = feeder.feed(&load, settings.rate, read, |produced| {
        progress(
            &mut display,
            &format!("produced {produced}/{}", load.len()),
            &reader,
        );
    })?;
    feeder.wait_until_read(read)?;
    let read_time = fed.started.elapsed();
    progress(
        &mut display,
        "waiting for every offset to be committed",
        &reader,
    );
    feeder.wait_until_committed()?;
    let ingest_time = fed.started.elapsed();
    feeder.tick(&load, &tick, TICK_AFTER)?;

    let deadline = Instant::now() + OUTPUT_TIMEOUT;
    while reader.distinct() < load.len() && Instant::now() < deadline {
        progress(
            &mut display,
            "clock tick sent: flushing the last segments",
            &reader,
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = fed.started.elapsed();
    progress(
        &mut display,
        "every span out; waiting for Redis to empty",
        &reader,
    );

    // Let the flushers finish their cleanup, and flush the tick's own segment and the empty
    // queue entries a late deadline update can leave (docs/decisions.md), before counting the
    // keys left.
    let store = runtime.block_on(SpansBufferStore::new(connection, BufferOptions::default()));
    let store = store.map_err(|error| DemoError::Other(error.to_string()))?;
    let keys_left = || {
        runtime.block_on(async {
            let mut count = 0;
            for reply in store
                .connection()
                .on_each_master(redis::cmd("DBSIZE"))
                .await?
            {
                count += redis::from_redis_value::<u64>(reply).map_err(redis::RedisError::from)?;
            }
            Ok::<_, redis::RedisError>(count)
        })
    };
    let settle_deadline = Instant::now() + SETTLE_TIMEOUT;
    while keys_left()? > 0 && Instant::now() < settle_deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some(display) = &mut display {
        display.finish();
    }

    processor_handle.signal_shutdown();
    let processor = processor_thread
        .join()
        .map_err(|_| DemoError::Other("consumer thread panicked".to_owned()))??;
    let redis_keys_left = keys_left()?;
    let tally = reader.finish(&load, &tick.trace_id);
    Ok(report(
        &tally,
        fed.malformed,
        processor.dead_lettered,
        redis_keys_left,
        [workload_time, read_time, ingest_time, elapsed],
    ))
}

type ProcessorThread =
    std::thread::JoinHandle<Result<rill::processor::ProcessorStats, rill::processor::RunError>>;

fn start_consumer(
    bootstrap: &str,
    connection: RedisConnection,
    settings: &DemoSettings,
    runtime: &tokio::runtime::Runtime,
) -> Result<(rill::processor::ProcessorHandle, ProcessorThread), DemoError> {
    let producer = Arc::new(
        KafkaProducer::new(
            &KafkaProducerConfig::new(bootstrap)
                .with_override("linger.ms", "2")
                // Segments are keyless; spread each message instead of sending a whole flush to
                // one partition, which would overflow the mock broker's small per-partition log.
                .with_override("sticky.partitioning.linger.ms", "0"),
        )
        .map_err(|error| DemoError::Other(error.to_string()))?,
    );
    // Production's flush timeouts (the buffer's defaults: 60 s, 10 s for a segment whose root
    // arrived) on workload time, and flush locks on, as `run` has them by default: a
    // subsegment that targets a segment being flushed then detaches into a segment of its own
    // instead of being orphaned by the flush's cleanup (docs/decisions.md).
    // Batches close sooner than production's second, so that a demo of a few seconds shows
    // its progress smoothly; the flusher looks for due segments ten times a second.
    let mut config = Config::default();
    config.kafka.output_topic = OUTPUT.to_owned();
    config.kafka.outcomes_topic = String::new();
    config.buffer.flush_lock_ttl = Duration::from_secs(30);
    config.consumer.max_batch_time = Duration::from_millis(100);
    config.consumer.commit_interval = Duration::from_millis(100);
    config.flusher.idle_sleep = Duration::from_millis(100);
    config.flusher.workers = settings.flusher_workers;
    let factory = SpansStrategyFactory::from_config(
        &config,
        connection,
        Arc::clone(&producer) as Arc<dyn rill::Producer<KafkaPayload>>,
        runtime.handle().clone(),
    );
    let consumer = KafkaConsumer::subscribe(&KafkaConsumerConfig::new(bootstrap, GROUP), &[INPUT])
        .map_err(|error| DemoError::Other(error.to_string()))?;
    let mut processor = StreamProcessor::new(consumer, factory)
        .with_config(ProcessorConfig::default().with_join_timeout(Duration::from_secs(30)))
        .with_dlq(DlqPolicy::new(KafkaDlqProducer::new(
            producer,
            Topic::new(DLQ),
        )));
    let handle = processor.handle();
    let thread = std::thread::spawn(move || {
        processor.run()?;
        Ok(processor.stats())
    });
    Ok((handle, thread))
}

/// Shows the spans out so far, with what the demo is doing beside them.
fn progress(display: &mut Option<Progress>, doing: &str, reader: &OutputReader) {
    if let Some(display) = display {
        display.set_message(format!("{doing}, segments out {}", reader.segments()));
        display.set_position(reader.distinct() as u64);
    }
}

fn report(
    tally: &Tally,
    malformed: usize,
    dead_lettered: u64,
    redis_keys_left: u64,
    [workload_time, read_time, ingest_time, elapsed]: [Duration; 4],
) -> DemoReport {
    DemoReport {
        spans_in: tally.spans + tally.lost,
        traces_in: tally.traces,
        malformed_in: malformed,
        dead_lettered,
        segments_out: tally.segments,
        whole_traces: tally.whole_traces,
        spans_out: tally.spans,
        duplicate_spans: tally.duplicates,
        lost_spans: tally.lost,
        redis_keys_left,
        workload_time,
        read_time,
        ingest_time,
        elapsed,
    }
}
