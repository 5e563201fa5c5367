//! Consume → RunTask → Produce → commit on librdkafka's mock cluster, messages per second,
//! for rill and for `sentry_arroyo` 2.49 in the same run (compare the ratio, not the figures).
//!
//! Both pipelines run in a thread of their own against the same kind of cluster, holding the
//! same pre-produced input; the time measured runs from the first message the transform sees
//! to the moment an outside client reads every input offset as committed. The difference in
//! guarantees matters: rill's `Produce` forwards a message (and so lets its offset be
//! committed) only once the broker confirmed its delivery; arroyo's `Produce` with its
//! `KafkaProducer` forwards as soon as librdkafka has queued the message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use integration_tests::kafka::MockKafka;
use rill::backends::kafka::{
    KafkaConsumer, KafkaConsumerConfig, KafkaPayload, KafkaProducer, KafkaProducerConfig,
};
use rill::processor::{ProcessorConfig, StreamProcessor};
use rill::steps::{CommitOffsets, Produce, RunTask};
use rill::{Partition, ProcessingStrategy, Topic};

const MESSAGES: usize = 50_000;
const PARTITIONS: i32 = 4;
const INPUT: &str = "in";
const OUTPUT: &str = "out";
const COMMIT_INTERVAL: Duration = Duration::from_millis(20);

/// Nanoseconds since `origin` when the first message was transformed (0: not yet).
#[derive(Clone)]
struct FirstSeen {
    origin: Instant,
    at: Arc<AtomicU64>,
}

impl FirstSeen {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            at: Arc::new(AtomicU64::new(0)),
        }
    }

    fn mark(&self) {
        if self.at.load(Ordering::Relaxed) == 0 {
            let nanos = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let _ = self
                .at
                .compare_exchange(0, nanos.max(1), Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn instant(&self) -> Instant {
        self.origin + Duration::from_nanos(self.at.load(Ordering::Relaxed))
    }
}

/// A mock cluster holding `MESSAGES` small messages spread over the input partitions.
fn prepared_cluster() -> MockKafka {
    let kafka = MockKafka::start(1).expect("mock cluster");
    kafka.create_topic(INPUT, PARTITIONS).expect("input topic");
    kafka
        .create_topic(OUTPUT, PARTITIONS)
        .expect("output topic");
    let values: Vec<Vec<u8>> = (0..MESSAGES)
        .map(|n| format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(64)).into_bytes())
        .collect();
    kafka
        .produce(INPUT, values.iter().map(Vec::as_slice), |index| {
            (index % PARTITIONS as usize) as i32
        })
        .expect("input produced");
    kafka
}

/// Waits until `group` committed every input message; returns when that was first seen.
fn wait_until_all_committed(kafka: &MockKafka, group: &str) -> Instant {
    let per_partition = (MESSAGES / PARTITIONS as usize) as i64;
    kafka
        .wait_until_committed(
            group,
            INPUT,
            &[per_partition; PARTITIONS as usize],
            Duration::from_secs(120),
        )
        .expect("every input offset committed");
    Instant::now()
}

fn consumer_overrides() -> [(&'static str, &'static str); 3] {
    [
        ("session.timeout.ms", "1500"),
        ("heartbeat.interval.ms", "500"),
        ("log_level", "3"),
    ]
}

/// One run of the rill pipeline; returns the measured time.
fn run_rill() -> Duration {
    let kafka = prepared_cluster();
    let first = FirstSeen::new();
    let mut config = KafkaConsumerConfig::new(kafka.bootstrap_servers(), "rill");
    for (key, value) in consumer_overrides() {
        config = config.with_override(key, value);
    }
    let consumer = KafkaConsumer::subscribe(&config, &[INPUT]).expect("consumer");
    let producer = Arc::new(
        KafkaProducer::new(
            &KafkaProducerConfig::new(kafka.bootstrap_servers())
                .with_override("linger.ms", "5")
                .with_override("log_level", "3"),
        )
        .expect("producer"),
    );
    let transform_first = first.clone();
    let factory = move |_: &[Partition]| -> Box<dyn ProcessingStrategy<KafkaPayload> + Send> {
        let seen = transform_first.clone();
        Box::new(RunTask::new(
            move |message: rill::Message<KafkaPayload>| {
                seen.mark();
                let upper = message
                    .payload()
                    .value()
                    .unwrap_or_default()
                    .to_ascii_uppercase();
                Ok(message.map(|_| KafkaPayload::new(None, Some(upper))))
            },
            Produce::new(
                Arc::clone(&producer),
                Topic::new(OUTPUT),
                CommitOffsets::new(COMMIT_INTERVAL),
            ),
        ))
    };
    let mut processor = StreamProcessor::new(consumer, factory)
        .with_config(ProcessorConfig::default().with_poll_timeout(Duration::from_millis(10)));
    let handle = processor.handle();
    let thread = std::thread::spawn(move || processor.run());
    let done = wait_until_all_committed(&kafka, "rill");
    handle.signal_shutdown();
    thread.join().expect("rill thread").expect("rill run");
    done - first.instant()
}

/// One run of the same pipeline on sentry_arroyo; returns the measured time.
#[cfg(feature = "arroyo")]
fn run_arroyo() -> Duration {
    use sentry_arroyo::backends::kafka::InitialOffset;
    use sentry_arroyo::backends::kafka::config::KafkaConfig;
    use sentry_arroyo::backends::kafka::producer::KafkaProducer as ArroyoProducer;
    use sentry_arroyo::backends::kafka::types::KafkaPayload as ArroyoPayload;
    use sentry_arroyo::processing::StreamProcessor as ArroyoProcessor;
    use sentry_arroyo::processing::strategies::commit_offsets::CommitOffsets as ArroyoCommit;
    use sentry_arroyo::processing::strategies::produce::Produce as ArroyoProduce;
    use sentry_arroyo::processing::strategies::run_task::RunTask as ArroyoRunTask;
    use sentry_arroyo::processing::strategies::run_task_in_threads::ConcurrencyConfig;
    use sentry_arroyo::processing::strategies::{
        ProcessingStrategy as ArroyoStrategy, ProcessingStrategyFactory, SubmitError,
    };
    use sentry_arroyo::types::{Message, Topic as ArroyoTopic, TopicOrPartition};

    struct Factory {
        config: KafkaConfig,
        concurrency: ConcurrencyConfig,
        first: FirstSeen,
    }

    impl ProcessingStrategyFactory<ArroyoPayload> for Factory {
        fn create(&self) -> Box<dyn ArroyoStrategy<ArroyoPayload>> {
            let producer = ArroyoProducer::new(self.config.clone()).expect("arroyo producer");
            let seen = self.first.clone();
            Box::new(ArroyoRunTask::new(
                move |message: Message<ArroyoPayload>| -> Result<
                    Message<ArroyoPayload>,
                    SubmitError<ArroyoPayload>,
                > {
                    seen.mark();
                    let upper = message
                        .payload()
                        .payload()
                        .map(|bytes| bytes.to_ascii_uppercase());
                    Ok(message.replace(ArroyoPayload::new(None, None, upper)))
                },
                ArroyoProduce::new(
                    ArroyoCommit::new(COMMIT_INTERVAL),
                    producer,
                    &self.concurrency,
                    TopicOrPartition::Topic(ArroyoTopic::new(OUTPUT)),
                ),
            ))
        }
    }

    let kafka = prepared_cluster();
    let first = FirstSeen::new();
    let overrides = consumer_overrides()
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect();
    let consumer_config = KafkaConfig::new_consumer_config(
        vec![kafka.bootstrap_servers().to_owned()],
        "arroyo".to_owned(),
        InitialOffset::Earliest,
        false,
        30_000,
        Some(overrides),
    );
    let producer_config = KafkaConfig::new_producer_config(
        vec![kafka.bootstrap_servers().to_owned()],
        Some(
            [("linger.ms", "5"), ("log_level", "3")]
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
        ),
    );
    let factory = Factory {
        config: producer_config,
        concurrency: ConcurrencyConfig::new(4),
        first: first.clone(),
    };
    let processor =
        ArroyoProcessor::with_kafka(consumer_config, factory, ArroyoTopic::new(INPUT), None);
    let handle = processor.get_handle();
    // arroyo's run error is not `Send`: bring back its message only.
    let thread = std::thread::spawn(move || processor.run().map_err(|error| error.to_string()));
    let done = wait_until_all_committed(&kafka, "arroyo");
    let mut handle = handle;
    handle.signal_shutdown();
    thread.join().expect("arroyo thread").expect("arroyo run");
    done - first.instant()
}

fn consume_produce_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("kafka::consume_transform_produce_commit");
    group.throughput(Throughput::Elements(MESSAGES as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("rill", |b| {
        b.iter_custom(|iterations| (0..iterations).map(|_| run_rill()).sum())
    });
    #[cfg(feature = "arroyo")]
    group.bench_function("sentry_arroyo", |b| {
        b.iter_custom(|iterations| (0..iterations).map(|_| run_arroyo()).sum())
    });
    group.finish();
}

criterion_group!(benches, consume_produce_commit);
criterion_main!(benches);
