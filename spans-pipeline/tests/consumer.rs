//! The whole consumer end to end: spans produced to a Kafka topic (librdkafka's mock cluster)
//! go through decode → batch → ProcessSpans → FlushSegments → CommitOffsets on a real Redis
//! (standalone and cluster) and come out of the output topic as segments; an invalid message
//! lands on the dead-letter topic while the pipeline keeps going; Redis is empty afterwards.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::{RedisMode, TestRedis};
use rill::backends::kafka::{
    KafkaConsumer, KafkaConsumerConfig, KafkaDlqProducer, KafkaPayload, KafkaProducer,
    KafkaProducerConfig,
};
use rill::dlq::DlqPolicy;
use rill::processor::{ProcessorConfig, ProcessorHandle, RunError, StreamProcessor};
use rill::{Producer, Topic};
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use spans_pipeline::buffer::{BufferOptions, RedisConnection};
use spans_pipeline::consumer::{ConsumerSettings, KillSwitchHandle, SpansStrategyFactory};

const INPUT: &str = "ingest-spans";
const OUTPUT: &str = "buffered-segments";
const DLQ: &str = "ingest-spans-dlq";
const WAIT: Duration = Duration::from_secs(60);

/// A valid `ingest-spans` message.
fn span(trace: &str, span_id: &str, parent: Option<&str>, project: u64) -> String {
    let parent = parent.map_or("null".to_owned(), |p| format!("\"{p}\""));
    format!(
        r#"{{"organization_id":1,"project_id":{project},"trace_id":"{trace}","span_id":"{span_id}","parent_span_id":{parent},"start_timestamp":1700000000.0,"end_timestamp":1700000001.0,"received":1700000001.5,"retention_days":90,"status":"ok","name":"op","attributes":{{"custom":{{"type":"string","value":"kept"}}}}}}"#
    )
}

fn id(letter: char) -> String {
    letter.to_string().repeat(16)
}

struct Consumer {
    handle: ProcessorHandle,
    thread: std::thread::JoinHandle<Result<(), RunError>>,
}

impl Consumer {
    fn stop(self) {
        self.handle.signal_shutdown();
        self.thread.join().unwrap().unwrap();
    }
}

fn start_consumer(
    kafka: &MockKafka,
    redis: &TestRedis,
    runtime: &tokio::runtime::Runtime,
) -> Consumer {
    let connection = runtime
        .block_on(RedisConnection::connect(&redis.urls(), redis.is_cluster()))
        .unwrap();
    let options = BufferOptions {
        root_timeout_secs: 1,
        timeout_secs: 2,
        ..BufferOptions::default()
    };
    let producer = Arc::new(
        KafkaProducer::new(
            &KafkaProducerConfig::new(kafka.bootstrap_servers()).with_override("linger.ms", "1"),
        )
        .unwrap(),
    );
    let settings = ConsumerSettings {
        max_batch_size: 100,
        max_batch_time: Duration::from_millis(50),
        commit_interval: Duration::from_millis(50),
        idle_sleep: Duration::from_millis(50),
        ..ConsumerSettings::default()
    };
    let factory = SpansStrategyFactory::new(
        connection,
        options,
        None,
        Arc::clone(&producer) as Arc<dyn Producer<KafkaPayload>>,
        Topic::new(OUTPUT),
        settings,
        KillSwitchHandle::default(),
        runtime.handle().clone(),
    );
    let config = KafkaConsumerConfig::new(kafka.bootstrap_servers(), "process-spans")
        .with_override("session.timeout.ms", "1500")
        .with_override("heartbeat.interval.ms", "500");
    let consumer = KafkaConsumer::subscribe(&config, &[INPUT]).unwrap();
    let mut processor = StreamProcessor::new(consumer, factory)
        .with_config(ProcessorConfig::default().with_poll_timeout(Duration::from_millis(20)))
        .with_dlq(DlqPolicy::new(KafkaDlqProducer::new(
            producer,
            Topic::new(DLQ),
        )));
    let handle = processor.handle();
    let thread = std::thread::spawn(move || processor.run());
    Consumer { handle, thread }
}

/// Segments read from the output topic: segment span id → (span id → is_segment).
fn segments(
    messages: &[integration_tests::kafka::RecordedMessage],
) -> BTreeMap<String, BTreeMap<String, bool>> {
    let mut segments = BTreeMap::new();
    for message in messages {
        let value: sonic_rs::Value =
            sonic_rs::from_slice(message.payload.as_deref().unwrap()).unwrap();
        let spans = value
            .get("spans")
            .and_then(|spans| spans.as_array())
            .unwrap();
        for span in spans.iter() {
            let segment = span
                .pointer(["attributes", "sentry.segment.id", "value"])
                .and_then(|v| v.as_str())
                .unwrap()
                .to_owned();
            assert_eq!(
                span.pointer(["attributes", "custom", "value"])
                    .and_then(|v| v.as_str()),
                Some("kept"),
                "other attributes are preserved"
            );
            segments
                .entry(segment)
                .or_insert_with(BTreeMap::new)
                .insert(
                    span.get("span_id")
                        .and_then(|v| v.as_str())
                        .unwrap()
                        .to_owned(),
                    span.get("is_segment").and_then(|v| v.as_bool()).unwrap(),
                );
        }
    }
    segments
}

fn spans_in_segments_out(mode: RedisMode) {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic(INPUT, 2).unwrap();
    kafka.create_topic(OUTPUT, 1).unwrap();
    kafka.create_topic(DLQ, 1).unwrap();
    let redis = TestRedis::start(mode);
    redis.flush_all();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let trace_one = "1".repeat(32);
    let trace_two = "2".repeat(32);
    // Trace one on partition 0, children before their root; trace two on partition 1 with a
    // garbage message between its spans.
    let partition_zero = [
        span(&trace_one, &id('c'), Some(&id('b')), 1),
        span(&trace_one, &id('b'), Some(&id('a')), 1),
        span(&trace_one, &id('a'), None, 1),
    ];
    let partition_one = [
        span(&trace_two, &id('y'), Some(&id('x')), 2),
        "this is not a span".to_owned(),
        span(&trace_two, &id('x'), None, 2),
    ];
    kafka
        .produce(INPUT, partition_zero.iter().map(String::as_bytes), |_| 0)
        .unwrap();
    kafka
        .produce(INPUT, partition_one.iter().map(String::as_bytes), |_| 1)
        .unwrap();

    let consumer = start_consumer(&kafka, &redis, &runtime);
    let output = kafka.read_topic(OUTPUT, 2, WAIT).unwrap();
    let deadline = Instant::now() + WAIT;
    while kafka.committed_offsets("process-spans", INPUT, 2).unwrap() != [Some(3), Some(3)] {
        assert!(Instant::now() < deadline, "offsets not committed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Cleanup runs right after the produce; give the worker its iteration.
    let deadline = Instant::now() + WAIT;
    while !redis.keys_with_ttls().is_empty() {
        assert!(
            Instant::now() < deadline,
            "left in redis: {:?}",
            redis.keys_with_ttls()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    consumer.stop();

    let segments = segments(&output);
    assert_eq!(
        segments.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([id('a'), id('x')])
    );
    assert_eq!(
        segments[&id('a')],
        BTreeMap::from([(id('a'), true), (id('b'), false), (id('c'), false)])
    );
    assert_eq!(
        segments[&id('x')],
        BTreeMap::from([(id('x'), true), (id('y'), false)])
    );
    let dead = kafka.read_all(DLQ, WAIT).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload.as_deref(), Some(&b"this is not a span"[..]));
}

#[test]
fn spans_in_segments_out_on_standalone_redis() {
    spans_in_segments_out(RedisMode::Standalone);
}

#[test]
fn spans_in_segments_out_on_redis_cluster() {
    spans_in_segments_out(RedisMode::Cluster);
}
