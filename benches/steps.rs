//! Throughput of rill's steps on the consumer thread, and the same `RunTask → CommitOffsets`
//! chain on `sentry_arroyo` for a side-by-side ratio.
//!
//! Each iteration feeds `MESSAGES` pre-built messages (spread over four partitions) through a
//! step, the way the stream processor does: one `submit` then one `poll` per message, then a
//! final `join`. Setup and teardown of the messages stay outside the timed part.
//!
//! `sentry_arroyo` reads time through coarsetime's cached instant; without its `Updater`
//! thread that instant never moves, which only makes arroyo's `CommitOffsets` cheaper (it never
//! reaches its commit interval). rill's `CommitOffsets` reads the real clock on every poll.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rill::backends::local::{LocalBroker, LocalProducer};
use rill::processor::{EVENTS_PER_ITERATION, ProcessorConfig, StreamProcessor};
use rill::steps::{
    CommitOffsets, Filter, HealthCheck, Noop, Produce, Reduce, RunTask, RunTaskInThreads,
    TaskError, Unfold,
};
use rill::{Message, Partition, ProcessingStrategy, SubmitError, Topic};

const MESSAGES: u64 = 10_000;
const PARTITIONS: u32 = 4;

type Payload = Arc<[u8]>;

fn messages() -> Vec<Message<Payload>> {
    let topic = Topic::new("bench");
    let partitions: Vec<Partition> = (0..PARTITIONS)
        .map(|i| Partition::new(topic.clone(), i))
        .collect();
    let payload: Payload = Arc::from(vec![7_u8; 128]);
    (0..MESSAGES)
        .map(|n| {
            let partition = partitions[(n % u64::from(PARTITIONS)) as usize].clone();
            Message::broker(
                Arc::clone(&payload),
                partition,
                n / u64::from(PARTITIONS),
                None,
            )
        })
        .collect()
}

fn identity<T>(message: Message<T>) -> Result<Message<T>, SubmitError<T>> {
    Ok(message)
}

/// Submits every message and polls after each `poll_every` of them, then joins.
///
/// `poll_every = 1` is the loop of rust-arroyo's processor (one message, one poll);
/// rill's processor takes up to `EVENTS_PER_ITERATION` ready messages per poll.
fn drive_polling<S: ProcessingStrategy<Payload>>(
    step: &mut S,
    messages: Vec<Message<Payload>>,
    poll_every: usize,
) {
    for (index, message) in messages.into_iter().enumerate() {
        let mut message = message;
        loop {
            match step.submit(black_box(message)) {
                Ok(()) => break,
                Err(SubmitError::MessageRejected(back)) => {
                    message = back;
                    black_box(step.poll().ok());
                }
                Err(SubmitError::InvalidMessage(_)) => break,
            }
        }
        if (index + 1) % poll_every == 0 {
            black_box(step.poll().ok());
        }
    }
    black_box(step.join(None).ok());
}

/// One message, one poll: the pattern every step group uses.
fn drive<S: ProcessingStrategy<Payload>>(step: &mut S, messages: Vec<Message<Payload>>) {
    drive_polling(step, messages, 1);
}

fn bench_step<S, F>(c: &mut Criterion, group: &str, name: &str, build: F)
where
    S: ProcessingStrategy<Payload>,
    F: Fn() -> S,
{
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function(name, |b| {
        b.iter_batched(
            || (build(), messages()),
            |(mut step, messages)| drive(&mut step, messages),
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

fn run_task(c: &mut Criterion) {
    bench_step(c, "rill::steps::RunTask", "identity_into_noop", || {
        RunTask::new(identity, Noop)
    });
}

fn noop(c: &mut Criterion) {
    bench_step(c, "rill::steps::Noop", "drop", || Noop);
}

fn health_check(c: &mut Criterion) {
    let path = std::env::temp_dir().join(format!("rill-bench-health-{}", std::process::id()));
    bench_step(
        c,
        "rill::steps::HealthCheck",
        "touch_every_second_into_noop",
        || HealthCheck::new(path.clone(), Noop),
    );
    let _ = std::fs::remove_file(path);
}

fn commit_offsets(c: &mut Criterion) {
    bench_step(c, "rill::steps::CommitOffsets", "every_second", || {
        CommitOffsets::new(Duration::from_secs(1))
    });
}

fn reduce(c: &mut Criterion) {
    bench_step(c, "rill::steps::Reduce", "batches_of_100_into_noop", || {
        Reduce::vec(100, Duration::from_secs(1), Noop)
    });
}

fn filter(c: &mut Criterion) {
    bench_step(c, "rill::steps::Filter", "keep_half_into_noop", || {
        Filter::new(
            |m: &Message<Payload>| m.offset().is_some_and(|o| o % 2 == 0),
            Noop,
        )
    });
}

fn unfold(c: &mut Criterion) {
    bench_step(c, "rill::steps::Unfold", "one_into_two_into_noop", || {
        Unfold::new(|payload: Payload| [Arc::clone(&payload), payload], Noop)
    });
}

fn run_task_in_threads(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let handle = runtime.handle().clone();
    bench_step(
        c,
        "rill::steps::RunTaskInThreads",
        "async_identity_16_in_flight",
        || {
            RunTaskInThreads::new(
                |m: Message<Payload>| async move { Ok::<_, TaskError>(m) },
                16,
                handle.clone(),
                Noop,
            )
        },
    );
}

fn produce(c: &mut Criterion) {
    bench_step(
        c,
        "rill::steps::Produce",
        "local_producer_into_noop",
        || {
            let broker = LocalBroker::new();
            let topic = Topic::new("out");
            broker.create_topic(&topic, 4);
            Produce::new(LocalProducer::new(broker), topic, Noop)
        },
    );
}

/// The chain compared with sentry_arroyo: `RunTask(identity) → CommitOffsets(1 s)`.
///
/// `rill` and `sentry_arroyo` are driven the same way (a poll after every message);
/// `rill_processor_loop` polls as rill's processor does, once per batch of ready messages.
fn chain(c: &mut Criterion) {
    bench_step(c, "chain::RunTask_CommitOffsets", "rill", || {
        RunTask::new(identity, CommitOffsets::new(Duration::from_secs(1)))
    });
    let mut group = c.benchmark_group("chain::RunTask_CommitOffsets");
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function("rill_processor_loop", |b| {
        b.iter_batched(
            || {
                let step = RunTask::new(identity, CommitOffsets::new(Duration::from_secs(1)));
                (step, messages())
            },
            |(mut step, messages)| drive_polling(&mut step, messages, EVENTS_PER_ITERATION),
            BatchSize::LargeInput,
        );
    });
    group.finish();
    #[cfg(feature = "arroyo")]
    arroyo_chain(c);
}

/// The same chain on `sentry_arroyo` (the `arroyo` feature: `make bench` turns it on).
#[cfg(feature = "arroyo")]
fn arroyo_chain(c: &mut Criterion) {
    use sentry_arroyo::processing::strategies::ProcessingStrategy as _;
    use sentry_arroyo::processing::strategies::SubmitError as ArroyoSubmitError;
    use sentry_arroyo::processing::strategies::commit_offsets::CommitOffsets as ArroyoCommit;
    use sentry_arroyo::processing::strategies::run_task::RunTask as ArroyoRunTask;
    use sentry_arroyo::types::{
        Message as ArroyoMessage, Partition as ArroyoPartition, Topic as ArroyoTopic,
    };

    fn arroyo_messages() -> Vec<ArroyoMessage<Payload>> {
        let topic = ArroyoTopic::new("bench");
        let payload: Payload = Arc::from(vec![7_u8; 128]);
        (0..MESSAGES)
            .map(|n| {
                let partition = ArroyoPartition::new(topic, (n % u64::from(PARTITIONS)) as u16);
                ArroyoMessage::new_broker_message(
                    Arc::clone(&payload),
                    partition,
                    n / u64::from(PARTITIONS),
                    Default::default(),
                )
            })
            .collect()
    }

    fn arroyo_identity(
        message: ArroyoMessage<Payload>,
    ) -> Result<ArroyoMessage<Payload>, ArroyoSubmitError<Payload>> {
        Ok(message)
    }

    let mut group = c.benchmark_group("chain::RunTask_CommitOffsets");
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function("sentry_arroyo", |b| {
        b.iter_batched(
            || {
                let step =
                    ArroyoRunTask::new(arroyo_identity, ArroyoCommit::new(Duration::from_secs(1)));
                (step, arroyo_messages())
            },
            |(mut step, messages)| {
                for message in messages {
                    let mut message = message;
                    loop {
                        match step.submit(black_box(message)) {
                            Ok(()) => break,
                            Err(ArroyoSubmitError::MessageRejected(rejected)) => {
                                message = rejected.message;
                                black_box(step.poll().ok());
                            }
                            Err(ArroyoSubmitError::InvalidMessage(_)) => break,
                        }
                    }
                    black_box(step.poll().ok());
                }
                black_box(step.join(None).ok());
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

/// The whole loop: a stream processor consuming from the in-memory broker through
/// `RunTask → CommitOffsets` until every offset is committed.
fn processor(c: &mut Criterion) {
    let mut group = c.benchmark_group("rill::processor::StreamProcessor");
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function("local_broker_run_task_commit", |b| {
        b.iter_batched(
            || {
                let broker = LocalBroker::new();
                let topic = Topic::new("bench");
                broker.create_topic(&topic, PARTITIONS);
                for message in messages() {
                    let partition = message.partition().cloned().expect("a broker message");
                    broker
                        .produce_to(&partition, message.into_payload())
                        .expect("a topic");
                }
                (broker, topic)
            },
            |(broker, topic)| {
                let factory = |_: &[Partition]| -> Box<dyn ProcessingStrategy<Payload>> {
                    Box::new(RunTask::new(
                        identity,
                        CommitOffsets::new(Duration::from_millis(10)),
                    ))
                };
                let consumer = broker.subscribe("bench", std::slice::from_ref(&topic));
                let config = ProcessorConfig::default().with_poll_timeout(Duration::ZERO);
                let mut processor = StreamProcessor::new(consumer, factory).with_config(config);
                while processor.stats().messages_submitted < MESSAGES {
                    processor.run_once().expect("a healthy pipeline");
                }
                // The final join commits everything.
                processor.shutdown().expect("a clean shutdown");
                let last = Partition::new(topic, PARTITIONS - 1);
                assert_eq!(
                    processor.committed().get(&last),
                    Some(&(MESSAGES / u64::from(PARTITIONS)))
                );
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(
    benches,
    chain,
    processor,
    noop,
    health_check,
    run_task,
    commit_offsets,
    reduce,
    filter,
    unfold,
    run_task_in_threads,
    produce
);
criterion_main!(benches);
