//! `spans-pipeline demo`: the whole consumer on an embedded default, with a readable summary.
//!
//! It starts librdkafka's mock Kafka cluster in this process and a local `redis-server` on a
//! free port (or uses `--redis-url`), produces a synthetic trace load at a steady rate, runs the
//! full pipeline (decode → batch → ProcessSpans → FlushSegments → CommitOffsets) with short
//! flush timeouts, reads the output topic back, and reports: spans in, segments and spans out,
//! spans lost (must be 0), duplicates, dead letters, end-to-end latency percentiles and
//! throughput. A few malformed messages are mixed in to show the dead-letter queue at work.

mod local_redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use rill::Topic;
use rill::backends::kafka::{
    KafkaConsumer, KafkaConsumerConfig, KafkaDlqProducer, KafkaPayload, KafkaProducer,
    KafkaProducerConfig,
};
use rill::dlq::DlqPolicy;
use rill::processor::{ProcessorConfig, StreamProcessor};

pub use local_redis::{LocalRedis, LocalRedisError};

use crate::buffer::{BufferOptions, RedisConnection, SpansBufferStore};
use crate::consumer::{ConsumerSettings, FlushSettings, KillSwitchHandle, SpansStrategyFactory};
use crate::progress::Progress;
use crate::workload::{GeneratedSpan, WorkloadShape, generate};

const INPUT: &str = "ingest-spans";
const OUTPUT: &str = "buffered-segments";
const DLQ: &str = "ingest-spans-dlq";
/// Every this many spans, one malformed message is produced too.
const MALFORMED_EVERY: usize = 10_000;
/// Most messages produced but not yet committed, per partition. librdkafka's mock broker keeps
/// only about 5 MB (or 100 000 messages) of each partition's log and drops older data, so a
/// producer running far ahead of the consumer would make the broker, not the pipeline, lose
/// spans. The producer waits while the consumer is this far behind.
const MAX_LAG_PER_PARTITION: u64 = 2_500;
/// Partitions of the output topic. The same 5 MB cap applies there, and a flush writes up to
/// `max-flush-segments` segments at once: spread over this many partitions a burst stays far
/// below the cap, so the reader never finds data already dropped.
const OUTPUT_PARTITIONS: i32 = 32;

/// Longest wait, once every span is out, for Redis to empty: the demo's flush timeouts (3 s)
/// plus a flush iteration and its cleanup, with room to spare.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoSettings {
    /// Spans to produce.
    pub spans: usize,
    /// Spans produced per second.
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
    /// Malformed messages produced.
    pub malformed_in: usize,
    /// Messages the consumer dead-lettered.
    pub dead_lettered: u64,
    /// Segment messages read from the output topic.
    pub segments_out: usize,
    /// Distinct spans read from the output topic.
    pub spans_out: usize,
    /// Spans read more than once.
    pub duplicate_spans: usize,
    /// Spans produced but never seen in the output.
    pub lost_spans: usize,
    /// Keys left in Redis after the last flush.
    pub redis_keys_left: u64,
    /// End-to-end latency percentiles (produce → read back): p50, p90, p99, max.
    pub latency: [Duration; 4],
    /// From the first span produced to the last span read back.
    pub elapsed: Duration,
}

impl DemoReport {
    /// Spans per second through the whole pipeline.
    pub fn throughput(&self) -> f64 {
        self.spans_in as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

impl std::fmt::Display for DemoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [p50, p90, p99, max] = self.latency;
        writeln!(f, "spans in            {:>10}", self.spans_in)?;
        writeln!(
            f,
            "malformed in        {:>10}  (dead-lettered: {})",
            self.malformed_in, self.dead_lettered
        )?;
        writeln!(f, "segments out        {:>10}", self.segments_out)?;
        writeln!(
            f,
            "spans out           {:>10}  (duplicates: {})",
            self.spans_out, self.duplicate_spans
        )?;
        writeln!(f, "spans lost          {:>10}", self.lost_spans)?;
        writeln!(f, "redis keys left     {:>10}", self.redis_keys_left)?;
        writeln!(
            f,
            "latency end to end  p50 {p50:.2?}  p90 {p90:.2?}  p99 {p99:.2?}  max {max:.2?}"
        )?;
        write!(
            f,
            "throughput          {:>10.0} spans/s over {:.1?}",
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
        rate: settings.rate,
        seed: settings.seed,
        ..WorkloadShape::default()
    });
    eprintln!(
        "demo: {} spans in {} traces at {:.0} spans/s; kafka (mock) {bootstrap}; redis {redis_url}",
        load.len(),
        load.iter()
            .map(|span| &span.trace_id)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        settings.rate
    );

    let (processor_handle, processor_thread) =
        start_consumer(&bootstrap, connection.clone(), settings, &runtime)?;
    let reader = OutputReader::start(&bootstrap, OUTPUT_PARTITIONS)?;

    let started = Instant::now();
    let mut display = settings
        .progress
        .then(|| Progress::stderr("demo", "spans out", Some(load.len() as u64)));
    let (produced_at, malformed) = produce(&bootstrap, &load, settings, &reader, &mut display)?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while reader.distinct() < load.len() && Instant::now() < deadline {
        progress(&mut display, load.len(), load.len(), &reader);
        std::thread::sleep(Duration::from_millis(200));
    }
    progress(&mut display, load.len(), load.len(), &reader);
    if let Some(display) = &mut display {
        display.finish();
    }
    let elapsed = started.elapsed();

    // Every span is out; let the flushers finish their cleanup, and flush the empty queue
    // entries a late deadline update can leave (docs/decisions.md), before looking at Redis.
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

    processor_handle.signal_shutdown();
    let processor = processor_thread
        .join()
        .map_err(|_| DemoError::Other("consumer thread panicked".to_owned()))??;
    let output = reader.stop();

    let redis_keys_left = keys_left()?;
    Ok(report(
        &load,
        malformed,
        processor.dead_lettered,
        &produced_at,
        &output,
        redis_keys_left,
        elapsed,
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
    // Short flush timeouts so segments come out within seconds, and flush locks on: a
    // subsegment that targets a segment being flushed then detaches into a segment of its own
    // instead of being orphaned by the flush's cleanup (docs/decisions.md).
    let options = BufferOptions {
        root_timeout_secs: 1,
        timeout_secs: 3,
        flush_lock_ttl_secs: 30,
        ..BufferOptions::default()
    };
    let consumer_settings = ConsumerSettings {
        max_batch_size: 2000,
        max_batch_time: Duration::from_millis(100),
        commit_interval: Duration::from_millis(500),
        idle_sleep: Duration::from_millis(100),
        flush: FlushSettings {
            workers: settings.flusher_workers,
            ..FlushSettings::default()
        },
        ..ConsumerSettings::default()
    };
    let factory = SpansStrategyFactory::new(
        connection,
        options,
        None,
        Arc::clone(&producer) as Arc<dyn rill::Producer<KafkaPayload>>,
        Topic::new(OUTPUT),
        consumer_settings,
        KillSwitchHandle::default(),
        runtime.handle().clone(),
    );
    let consumer = KafkaConsumer::subscribe(
        &KafkaConsumerConfig::new(bootstrap, "process-spans"),
        &[INPUT],
    )
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

/// Produces the load paced by arrival times; returns when each span was produced and how many
/// malformed messages were mixed in.
fn produce(
    bootstrap: &str,
    load: &[GeneratedSpan],
    settings: &DemoSettings,
    reader: &OutputReader,
    display: &mut Option<Progress>,
) -> Result<(HashMap<String, Instant>, usize), DemoError> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()?;
    let lag = LagMonitor::new(bootstrap, settings.partitions)?;
    let mut produced_at = HashMap::with_capacity(load.len());
    let mut malformed = 0;
    let mut start = Instant::now();
    let mut last_progress = Instant::now();
    for (index, span) in load.iter().enumerate() {
        if index % 1000 == 999 {
            let waited = lag.wait_until_below(
                (index + malformed) as u64,
                MAX_LAG_PER_PARTITION * u64::try_from(settings.partitions.max(1)).unwrap_or(1),
            )?;
            // Time spent waiting for the consumer shifts the schedule, not the rate.
            start += waited;
        }
        let due = start + Duration::from_secs_f64(index as f64 / settings.rate.max(1.0));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            producer.poll(Duration::ZERO);
            std::thread::sleep(wait);
        }
        let partition = partition_of(&span.trace_id, settings.partitions);
        send(
            &producer,
            BaseRecord::to(INPUT)
                .payload(&span.payload)
                .partition(partition),
        );
        produced_at.insert(span.span_id.clone(), Instant::now());
        if index % MALFORMED_EVERY == MALFORMED_EVERY - 1 {
            let broken = b"{\"span_id\": null, \"note\": \"malformed on purpose\"}".to_vec();
            send(
                &producer,
                BaseRecord::to(INPUT).payload(&broken).partition(partition),
            );
            malformed += 1;
        }
        if last_progress.elapsed() > Duration::from_millis(200) {
            progress(display, index + 1, load.len(), reader);
            last_progress = Instant::now();
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok((produced_at, malformed))
}

/// Reads the consumer group's committed offsets, to keep the producer within reach of it.
struct LagMonitor {
    client: BaseConsumer,
    partitions: i32,
}

impl LagMonitor {
    fn new(bootstrap: &str, partitions: i32) -> Result<Self, DemoError> {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "process-spans")
            .create()?;
        Ok(Self { client, partitions })
    }

    /// Messages the group committed, over all partitions.
    fn committed(&self) -> Result<u64, DemoError> {
        let mut query = TopicPartitionList::new();
        for partition in 0..self.partitions {
            query.add_partition(INPUT, partition);
        }
        // The returned list is dropped here, before the client (librdkafka's destructor
        // would otherwise wait for it forever).
        let committed = self
            .client
            .committed_offsets(query, Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|element| element.offset().to_raw())
            .filter_map(|offset| u64::try_from(offset).ok())
            .sum())
    }

    /// Waits while more than `max_lag` of `produced` messages are uncommitted; returns how
    /// long it waited.
    fn wait_until_below(&self, produced: u64, max_lag: u64) -> Result<Duration, DemoError> {
        let started = Instant::now();
        while produced.saturating_sub(self.committed()?) > max_lag {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(DemoError::Other(
                    "the consumer made no progress for a minute".to_owned(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(started.elapsed())
    }
}

fn send(producer: &BaseProducer, mut record: BaseRecord<'_, (), Vec<u8>>) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((_, back)) => {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
        }
    }
}

/// All spans of a trace on one partition, as Relay routes them.
fn partition_of(trace_id: &str, partitions: i32) -> i32 {
    let hash = trace_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    i32::try_from(hash % u64::try_from(partitions.max(1)).unwrap_or(1)).unwrap_or(0)
}

/// Shows the spans out so far, with what was produced and the segments out beside them.
fn progress(display: &mut Option<Progress>, produced: usize, total: usize, reader: &OutputReader) {
    if let Some(display) = display {
        display.set_message(format!(
            "produced {produced}/{total}, segments out {}",
            reader.segments.load(Ordering::Relaxed)
        ));
        display.set_position(reader.distinct() as u64);
    }
}

/// What the output reader collected.
struct Output {
    first_seen: HashMap<String, Instant>,
    duplicates: usize,
    segments: usize,
}

/// Reads the output topic on a thread of its own, noting when each span is first seen.
struct OutputReader {
    stop: Arc<AtomicBool>,
    segments: Arc<AtomicUsize>,
    distinct: Arc<AtomicUsize>,
    thread: std::thread::JoinHandle<Output>,
}

impl OutputReader {
    fn start(bootstrap: &str, partitions: i32) -> Result<Self, DemoError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "demo-output-reader")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(OUTPUT, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let stop = Arc::new(AtomicBool::new(false));
        let segments = Arc::new(AtomicUsize::new(0));
        let distinct = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, segments, distinct) = (
                Arc::clone(&stop),
                Arc::clone(&segments),
                Arc::clone(&distinct),
            );
            std::thread::spawn(move || {
                let mut output = Output {
                    first_seen: HashMap::new(),
                    duplicates: 0,
                    segments: 0,
                };
                while !stop.load(Ordering::Relaxed) {
                    let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else {
                        continue;
                    };
                    let now = Instant::now();
                    output.segments += 1;
                    segments.store(output.segments, Ordering::Relaxed);
                    for span_id in span_ids(message.payload().unwrap_or_default()) {
                        if output.first_seen.insert(span_id, now).is_some() {
                            output.duplicates += 1;
                        }
                    }
                    distinct.store(output.first_seen.len(), Ordering::Relaxed);
                }
                output
            })
        };
        Ok(Self {
            stop,
            segments,
            distinct,
            thread,
        })
    }

    fn distinct(&self) -> usize {
        self.distinct.load(Ordering::Relaxed)
    }

    fn stop(self) -> Output {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(Output {
            first_seen: HashMap::new(),
            duplicates: 0,
            segments: 0,
        })
    }
}

/// The span ids of one `buffered-segments` message.
fn span_ids(message: &[u8]) -> Vec<String> {
    use sonic_rs::{JsonContainerTrait, JsonValueTrait};
    let Ok(value) = sonic_rs::from_slice::<sonic_rs::Value>(message) else {
        return Vec::new();
    };
    value
        .get("spans")
        .and_then(|spans| spans.as_array())
        .map(|spans| {
            spans
                .iter()
                .filter_map(|span| {
                    span.get("span_id")
                        .and_then(|id| id.as_str())
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn report(
    load: &[GeneratedSpan],
    malformed: usize,
    dead_lettered: u64,
    produced_at: &HashMap<String, Instant>,
    output: &Output,
    redis_keys_left: u64,
    elapsed: Duration,
) -> DemoReport {
    let mut latencies: Vec<Duration> = load
        .iter()
        .filter_map(|span| {
            let seen = output.first_seen.get(&span.span_id)?;
            Some(seen.saturating_duration_since(*produced_at.get(&span.span_id)?))
        })
        .collect();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    DemoReport {
        spans_in: load.len(),
        malformed_in: malformed,
        dead_lettered,
        segments_out: output.segments,
        spans_out: output.first_seen.len(),
        duplicate_spans: output.duplicates,
        lost_spans: load.len() - latencies.len(),
        redis_keys_left,
        latency: [
            percentile(0.5),
            percentile(0.9),
            percentile(0.99),
            percentile(1.0),
        ],
        elapsed,
    }
}
