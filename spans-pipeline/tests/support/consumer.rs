//! Shared parts of the consumer's end-to-end tests: spans as `ingest-spans` messages, a whole
//! consumer (`SpansStrategyFactory` run by a `StreamProcessor` on its own thread) on the mock
//! Kafka cluster and a real Redis, and the checks every test ends with (offsets committed,
//! Redis empty, every span in the output topic).
//!
//! Included with `#[path = "support/consumer.rs"]` by the test files that need it.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::kafka::{MockKafka, RecordedMessage};
use integration_tests::redis_server::TestRedis;
use rill::backends::kafka::{
    KafkaConsumer, KafkaConsumerConfig, KafkaDlqProducer, KafkaPayload, KafkaProducer,
    KafkaProducerConfig, RebalanceProtocol,
};
use rill::dlq::DlqPolicy;
use rill::processor::{
    ProcessorConfig, ProcessorHandle, ProcessorStats, RunError, StreamProcessor,
};
use rill::{Partition, ProcessingStrategy, Producer, Topic, wrap_pipelines};
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use spans_pipeline::buffer::RedisConnection;
use spans_pipeline::config::Config;
use spans_pipeline::consumer::SpansStrategyFactory;

/// The pipeline as the processor keeps it.
type Pipeline = Box<dyn ProcessingStrategy<KafkaPayload> + Send>;

pub const INPUT: &str = "ingest-spans";
pub const OUTPUT: &str = "buffered-segments";
pub const DLQ: &str = "ingest-spans-dlq";
/// The topic of outcome records: every consumer of [`ConsumerSetup`] writes there, so a test
/// can check that what the consumer reports lost was really lost ([`reported_lost`]).
pub const OUTCOMES: &str = "outcomes";
pub const GROUP: &str = "process-spans";
/// Longest any condition of these tests is waited for.
pub const WAIT: Duration = Duration::from_secs(60);

/// A valid `ingest-spans` message.
pub fn span(trace: &str, span_id: &str, parent: Option<&str>, project: u64) -> String {
    let parent = parent.map_or("null".to_owned(), |p| format!("\"{p}\""));
    format!(
        r#"{{"organization_id":1,"project_id":{project},"trace_id":"{trace}","span_id":"{span_id}","parent_span_id":{parent},"start_timestamp":1700000000.0,"end_timestamp":1700000001.0,"received":1700000001.5,"retention_days":90,"status":"ok","name":"op","attributes":{{"custom":{{"type":"string","value":"kept"}}}}}}"#
    )
}

/// A 16-character span id made of one repeated letter.
pub fn id(letter: char) -> String {
    letter.to_string().repeat(16)
}

/// Spans to produce, each with the partition it goes to; a trace's spans share a partition,
/// as Sentry's producers key them by trace.
#[derive(Debug, Default)]
pub struct Traces {
    pub messages: Vec<(i32, String)>,
    pub span_ids: BTreeSet<String>,
}

impl Traces {
    /// Traces `first..first + count`, each a root and `children` direct children, trace `n` on
    /// partition `n % partitions`; children come before their root.
    pub fn new(first: u64, count: u64, children: u64, partitions: i32) -> Self {
        let mut traces = Self::default();
        for trace in first..first + count {
            let trace_id = format!("{trace:032x}");
            let root = format!("{:016x}", trace * 1000);
            let partition = i32::try_from(trace % u64::from(partitions.unsigned_abs())).unwrap();
            for child in 1..=children {
                let child = format!("{:016x}", trace * 1000 + child);
                traces.add(partition, span(&trace_id, &child, Some(&root), 1), child);
            }
            traces.add(partition, span(&trace_id, &root, None, 1), root);
        }
        traces
    }

    /// Adds the spans of `other`.
    pub fn extend(&mut self, other: Self) {
        self.messages.extend(other.messages);
        self.span_ids.extend(other.span_ids);
    }

    fn add(&mut self, partition: i32, message: String, span_id: String) {
        self.messages.push((partition, message));
        self.span_ids.insert(span_id);
    }

    /// Produces every span to the input topic.
    pub fn produce(&self, kafka: &MockKafka) {
        kafka
            .produce(
                INPUT,
                self.messages.iter().map(|(_, message)| message.as_bytes()),
                |index| self.messages[index].0,
            )
            .unwrap();
    }

    /// Messages per partition `0..partitions`.
    pub fn per_partition(&self, partitions: i32) -> Vec<i64> {
        (0..partitions)
            .map(|partition| {
                let count = self
                    .messages
                    .iter()
                    .filter(|(p, _)| *p == partition)
                    .count();
                i64::try_from(count).unwrap()
            })
            .collect()
    }
}

/// A mock cluster with the input topic (`partitions` partitions), the output, the DLQ and
/// the outcomes topic.
pub fn kafka(partitions: i32) -> MockKafka {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic(INPUT, partitions).unwrap();
    for topic in [OUTPUT, DLQ, OUTCOMES] {
        kafka.create_topic(topic, 1).unwrap();
    }
    kafka
}

/// Asserts that no consumer reported a loss on the outcomes topic: for a test in which every
/// span came out, any reported loss is a false one.
pub fn assert_none_reported_lost(kafka: &MockKafka) {
    let lost = reported_lost(kafka);
    assert!(
        lost.is_empty(),
        "spans reported lost although every span came out: {lost:?}"
    );
}

/// Spans the consumers reported lost on the outcomes topic, by reason. Outcome records are
/// delivered on a task of their own after the flush that found the loss, so this reads until
/// the topic's end once the caller saw Redis drained, which is after every flush.
pub fn reported_lost(kafka: &MockKafka) -> BTreeMap<String, u64> {
    #[derive(serde::Deserialize)]
    struct Outcome {
        reason: String,
        quantity: u64,
    }
    let mut lost = BTreeMap::new();
    for record in kafka.read_all(OUTCOMES, WAIT).unwrap() {
        let outcome: Outcome = serde_json::from_slice(record.payload.as_deref().unwrap()).unwrap();
        *lost.entry(outcome.reason).or_default() += outcome.quantity;
    }
    lost
}

/// The runtime for Redis I/O and flush workers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// How to build one consumer; [`ConsumerSetup::default`] is a fast one (short timeouts,
/// small batches, flush locks off) with the real Kafka producer. The consumer is wired from
/// `config` by [`SpansStrategyFactory::from_config`], as `spans-pipeline run` wires it.
#[derive(Clone)]
pub struct ConsumerSetup {
    pub config: Config,
    pub processor: ProcessorConfig,
    /// The producer of flushed segments; the real Kafka producer when `None`.
    pub producer: Option<Arc<dyn Producer<KafkaPayload>>>,
}

impl Default for ConsumerSetup {
    fn default() -> Self {
        let mut config = Config::default();
        config.kafka.output_topic = OUTPUT.to_owned();
        // Outcome records on, as `run` has them, to a topic the tests read.
        config.kafka.outcomes_topic = OUTCOMES.to_owned();
        config.buffer.root_timeout = Duration::from_secs(1);
        config.buffer.timeout = Duration::from_secs(2);
        config.buffer.flush_lock_ttl = Duration::ZERO;
        config.consumer.max_batch_size = 100;
        config.consumer.max_batch_time = Duration::from_millis(50);
        config.consumer.commit_interval = Duration::from_millis(50);
        config.flusher.idle_sleep = Duration::from_millis(50);
        Self {
            config,
            processor: ProcessorConfig::default()
                .with_poll_timeout(Duration::from_millis(20))
                .with_join_timeout(Duration::from_secs(10)),
            producer: None,
        }
    }
}

impl ConsumerSetup {
    /// Starts a consumer of the input topic in [`GROUP`] on its own thread.
    pub fn start(
        &self,
        kafka: &MockKafka,
        redis: &TestRedis,
        runtime: &tokio::runtime::Runtime,
    ) -> Consumer {
        let connection = runtime
            .block_on(RedisConnection::connect(&redis.urls(), redis.is_cluster()))
            .unwrap();
        let kafka_producer = Arc::new(
            KafkaProducer::new(
                &KafkaProducerConfig::new(kafka.bootstrap_servers())
                    .with_override("linger.ms", "1"),
            )
            .unwrap(),
        );
        let producer = self
            .producer
            .clone()
            .unwrap_or_else(|| Arc::clone(&kafka_producer) as Arc<dyn Producer<KafkaPayload>>);
        let factory = SpansStrategyFactory::from_config(
            &self.config,
            connection,
            producer,
            runtime.handle().clone(),
        );
        let assignments = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&assignments);
        let factory = wrap_pipelines(
            factory,
            move |partitions: &[Partition], pipeline: Pipeline| {
                recorded.lock().unwrap().push(partitions.to_vec());
                pipeline
            },
        );
        // Members leave the group cleanly when stopped, so the session timeout only matters
        // for a member that misses heartbeats: on a loaded test machine a short one expels a
        // live consumer, whose redelivered batches then show up as duplicates.
        let mut config = KafkaConsumerConfig::new(kafka.bootstrap_servers(), GROUP)
            .with_override("session.timeout.ms", "4000")
            .with_override("heartbeat.interval.ms", "500");
        if !kafka.broker().rebalances_cooperatively() {
            config = config.with_rebalance_protocol(RebalanceProtocol::Eager);
        }
        let consumer = KafkaConsumer::subscribe(&config, &[INPUT]).unwrap();
        let mut processor = StreamProcessor::new(consumer, factory)
            .with_config(self.processor.clone())
            .with_dlq(DlqPolicy::new(KafkaDlqProducer::new(
                kafka_producer,
                Topic::new(DLQ),
            )));
        let handle = processor.handle();
        let thread = std::thread::spawn(move || {
            let result = processor.run();
            (result, processor.stats())
        });
        Consumer {
            handle,
            thread: Some(thread),
            assignments,
        }
    }
}

/// A running consumer.
pub struct Consumer {
    handle: ProcessorHandle,
    /// Taken by `stop` or `wait_for_exit`; still here on drop when a test failed early.
    thread: Option<std::thread::JoinHandle<(Result<(), RunError>, ProcessorStats)>>,
    assignments: Arc<Mutex<Vec<Vec<Partition>>>>,
}

impl Consumer {
    /// Stops it gracefully; panics if it had failed.
    pub fn stop(mut self) -> ProcessorStats {
        self.handle.signal_shutdown();
        let (result, stats) = self.thread.take().unwrap().join().unwrap();
        result.unwrap();
        stats
    }

    /// Waits (bounded) until it stops by itself and returns how it ended.
    pub fn wait_for_exit(mut self) -> (Result<(), RunError>, ProcessorStats) {
        let thread = self.thread.take().unwrap();
        wait_until("the consumer stops by itself", || thread.is_finished());
        thread.join().unwrap()
    }

    /// The partitions of its current assignment (empty before the first).
    pub fn assignment(&self) -> Vec<Partition> {
        self.assignments
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Consumer {
    /// A test that failed before stopping its consumer still stops it (within the join
    /// timeout), so it does not outlive the servers it uses.
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.handle.signal_shutdown();
            let _ = thread.join();
        }
    }
}

/// Polls `condition` every 20 ms; panics naming `what` if it does not hold within [`WAIT`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The group's committed offsets of the input topic's partitions `0..partitions`.
pub fn committed(kafka: &MockKafka, partitions: i32) -> Vec<Option<i64>> {
    kafka.committed_offsets(GROUP, INPUT, partitions).unwrap()
}

/// Waits until the group committed `offsets` and every key left Redis (flushed and cleaned
/// up).
pub fn wait_until_drained(kafka: &MockKafka, redis: &TestRedis, offsets: &[i64]) {
    let partitions = i32::try_from(offsets.len()).unwrap();
    let expected: Vec<Option<i64>> = offsets
        .iter()
        .map(|offset| (*offset > 0).then_some(*offset))
        .collect();
    wait_until("every offset is committed", || {
        committed(kafka, partitions) == expected
    });
    wait_until("redis is empty", || redis.keys_with_ttls().is_empty());
}

/// How often each span id occurs in the output topic (a span flushed twice counts twice).
pub fn output_span_counts(kafka: &MockKafka) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in kafka.read_all(OUTPUT, WAIT).unwrap() {
        for span in output_spans(&message) {
            *counts.entry(span.span_id).or_default() += 1;
        }
    }
    counts
}

/// Asserts that every span of `expected` was flushed at least once and nothing else was.
pub fn assert_all_flushed(counts: &BTreeMap<String, usize>, expected: &BTreeSet<String>) {
    let out: BTreeSet<String> = counts.keys().cloned().collect();
    let lost: Vec<&String> = expected.difference(&out).collect();
    assert!(lost.is_empty(), "{} spans lost: {lost:?}", lost.len());
    let unexpected: Vec<&String> = out.difference(expected).collect();
    assert!(
        unexpected.is_empty(),
        "spans never produced: {unexpected:?}"
    );
}

/// Segments read from the output topic: segment span id → (span id → is_segment).
pub fn segments(messages: &[RecordedMessage]) -> BTreeMap<String, BTreeMap<String, bool>> {
    let mut segments = BTreeMap::new();
    for span in messages.iter().flat_map(output_spans) {
        segments
            .entry(span.segment_id)
            .or_insert_with(BTreeMap::new)
            .insert(span.span_id, span.is_segment);
    }
    segments
}

/// One span of an output message.
pub struct OutputSpan {
    pub segment_id: String,
    pub span_id: String,
    pub is_segment: bool,
}

/// The spans of one output message; asserts that their other attributes were kept.
pub fn output_spans(message: &RecordedMessage) -> Vec<OutputSpan> {
    let value: sonic_rs::Value = sonic_rs::from_slice(message.payload.as_deref().unwrap()).unwrap();
    let spans = value
        .get("spans")
        .and_then(|spans| spans.as_array())
        .unwrap();
    spans
        .iter()
        .map(|span| {
            assert_eq!(
                span.pointer(["attributes", "custom", "value"])
                    .and_then(|v| v.as_str()),
                Some("kept"),
                "other attributes are preserved"
            );
            OutputSpan {
                segment_id: span
                    .pointer(["attributes", "sentry.segment.id", "value"])
                    .and_then(|v| v.as_str())
                    .unwrap()
                    .to_owned(),
                span_id: span
                    .get("span_id")
                    .and_then(|v| v.as_str())
                    .unwrap()
                    .to_owned(),
                is_segment: span.get("is_segment").and_then(|v| v.as_bool()).unwrap(),
            }
        })
        .collect()
}
