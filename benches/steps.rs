//! Throughput of rill's steps on the consumer thread, each beside the same step of
//! `sentry_arroyo` 2.49 in the same run (the `arroyo` feature), and the whole processor loop.
//!
//! Each iteration feeds `MESSAGES` pre-built messages (spread over four partitions) through a
//! step, the way the stream processor does: one `submit` then one `poll` per message, then a
//! final `join`. Setup and teardown of the messages stay outside the timed part. Both libraries
//! are driven by the one [`drive_polling`] loop, through [`Driven`]; the groups named `vs::*`
//! hold a `rill` and a `sentry_arroyo` function each, measured one after the other.
//!
//! `sentry_arroyo` reads time through coarsetime's cached instant; without its `Updater`
//! thread that instant never moves, which only makes arroyo's `CommitOffsets` and `Reduce`
//! cheaper (they never reach their interval). rill reads the real clock (through a sampler).
//! arroyo's `StreamProcessor` starts that thread, so its whole-loop figures include it; it
//! keeps running after that group, so the whole-loop groups run last.
//!
//! Steps of rill without an arroyo counterpart (`Filter`, `Unfold`; arroyo filters and splits
//! inside a `RunTask` or its `stream` module) are measured on rill alone.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main,
};
use rill::backends::local::{LocalBroker, LocalProducer};
use rill::processor::{EVENTS_PER_ITERATION, ProcessorConfig, StreamProcessor};
use rill::steps::{
    CommitOffsets, Filter, HealthCheck, Noop, Produce, Reduce, RunTask, RunTaskInThreads,
    TaskError, Unfold,
};
use rill::{Message, Partition, ProcessingStrategy, SubmitError, Topic};

#[cfg(feature = "arroyo")]
#[path = "steps/arroyo.rs"]
mod arroyo;

const MESSAGES: u64 = 10_000;
const PARTITIONS: u32 = 4;
const PAYLOAD_BYTES: usize = 128;
/// Tasks in flight in the `RunTaskInThreads` and `Produce` groups.
const IN_FLIGHT: usize = 16;

/// The loop at its ceiling: `CEILING_CONCURRENCY` tasks of `CEILING_TASK` each at a time can
/// finish at most `CEILING_CONCURRENCY / CEILING_TASK` messages per second (2 000).
const CEILING_MESSAGES: u64 = 4_000;
const CEILING_CONCURRENCY: usize = 4;
const CEILING_TASK: Duration = Duration::from_millis(2);

type Payload = Arc<[u8]>;

/// The input of every group: `(partition, offset)` of each message, round-robin over
/// `PARTITIONS`.
fn input(count: u64) -> impl Iterator<Item = (u32, u64)> {
    let partitions = u64::from(PARTITIONS);
    (0..count).map(move |n| ((n % partitions) as u32, n / partitions))
}

fn payload() -> Payload {
    Arc::from(vec![7_u8; PAYLOAD_BYTES])
}

fn messages_of(count: u64) -> Vec<Message<Payload>> {
    let topic = Topic::new("bench");
    let partitions: Vec<Partition> = (0..PARTITIONS)
        .map(|i| Partition::new(topic.clone(), i))
        .collect();
    let payload = payload();
    input(count)
        .map(|(partition, offset)| {
            let partition = partitions[partition as usize].clone();
            Message::broker(Arc::clone(&payload), partition, offset, None)
        })
        .collect()
}

fn messages() -> Vec<Message<Payload>> {
    messages_of(MESSAGES)
}

fn identity<T>(message: Message<T>) -> Result<Message<T>, SubmitError<T>> {
    Ok(message)
}

/// A step as the driver sees it, whichever library it comes from.
trait Driven {
    type Message;

    /// Submits `message`; gives it back if the step rejected it (an invalid one is dropped).
    fn offer(&mut self, message: Self::Message) -> Option<Self::Message>;

    fn poll(&mut self);

    fn join(&mut self);
}

/// A rill step.
struct Rill<S>(S);

impl<S: ProcessingStrategy<Payload>> Driven for Rill<S> {
    type Message = Message<Payload>;

    fn offer(&mut self, message: Self::Message) -> Option<Self::Message> {
        match self.0.submit(message) {
            Ok(()) | Err(SubmitError::InvalidMessage(_)) => None,
            Err(SubmitError::MessageRejected(back)) => Some(back),
        }
    }

    fn poll(&mut self) {
        black_box(self.0.poll().ok());
    }

    fn join(&mut self) {
        black_box(self.0.join(None).ok());
    }
}

/// Submits every message and polls after each `poll_every` of them, then joins.
///
/// `poll_every = 1` is the loop of rust-arroyo's processor (one message, one poll);
/// rill's processor takes up to `EVENTS_PER_ITERATION` ready messages per poll.
fn drive_polling<D: Driven>(step: &mut D, messages: Vec<D::Message>, poll_every: usize) {
    for (index, message) in messages.into_iter().enumerate() {
        let mut message = message;
        while let Some(back) = step.offer(black_box(message)) {
            message = back;
            step.poll();
        }
        if (index + 1) % poll_every == 0 {
            step.poll();
        }
    }
    step.join();
}

/// Measures `name` in `group`: a step from `build` fed `messages()`, one poll per message (or
/// per `poll_every`).
fn bench_driven<D: Driven>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    build: impl Fn() -> D,
    messages: impl Fn() -> Vec<D::Message>,
    poll_every: usize,
) {
    group.bench_function(name, |b| {
        b.iter_batched(
            || (build(), messages()),
            |(mut step, messages)| drive_polling(&mut step, messages, poll_every),
            BatchSize::LargeInput,
        );
    });
}

/// A group of `MESSAGES` elements per iteration.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(MESSAGES));
    group
}

/// The `rill` function of a `vs::*` group; the `arroyo` feature adds `sentry_arroyo` after it.
fn bench_rill<S: ProcessingStrategy<Payload>>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    build: impl Fn() -> S,
) {
    bench_driven(group, "rill", || Rill(build()), messages, 1);
}

/// A rill-only group of one function.
fn bench_step<S: ProcessingStrategy<Payload>>(
    c: &mut Criterion,
    name: &str,
    function: &str,
    build: impl Fn() -> S,
) {
    let mut group = group(c, name);
    bench_driven(&mut group, function, || Rill(build()), messages, 1);
    group.finish();
}

/// `RunTask(identity) → Noop`.
fn run_task(c: &mut Criterion) {
    let mut group = group(c, "vs::RunTask");
    bench_rill(&mut group, || RunTask::new(identity, Noop));
    #[cfg(feature = "arroyo")]
    arroyo::run_task(&mut group);
    group.finish();
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

/// `CommitOffsets` committing every second.
fn commit_offsets(c: &mut Criterion) {
    let mut group = group(c, "vs::CommitOffsets");
    bench_rill(&mut group, || CommitOffsets::new(Duration::from_secs(1)));
    #[cfg(feature = "arroyo")]
    arroyo::commit_offsets(&mut group);
    group.finish();
}

/// `Reduce` into a vector of payloads, batches of 100 (or a second), `→ Noop`.
fn reduce(c: &mut Criterion) {
    let mut group = group(c, "vs::Reduce");
    bench_rill(&mut group, || {
        Reduce::vec(100, Duration::from_secs(1), Noop)
    });
    #[cfg(feature = "arroyo")]
    arroyo::reduce(&mut group);
    group.finish();
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

/// The runtime of the threaded groups: two workers, as many as the machine's cores.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// An async identity task, `IN_FLIGHT` at most at once, `→ Noop`.
fn run_task_in_threads(c: &mut Criterion) {
    let runtime = runtime();
    let handle = runtime.handle().clone();
    let mut group = group(c, "vs::RunTaskInThreads");
    bench_rill(&mut group, || {
        RunTaskInThreads::new(
            |m: Message<Payload>| async move { Ok::<_, TaskError>(m) },
            IN_FLIGHT,
            handle.clone(),
            Noop,
        )
    });
    #[cfg(feature = "arroyo")]
    arroyo::run_task_in_threads(&mut group, &handle);
    group.finish();
}

/// Each message written to an in-memory broker's topic of four partitions, `→ Noop`.
///
/// rill's `Produce` forwards a message once its delivery is confirmed (the in-memory broker
/// confirms through a oneshot channel); arroyo's `Produce` is a `RunTaskInThreads` whose task
/// calls the producer (`IN_FLIGHT` at most at once), and forwards once that call returned.
fn produce(c: &mut Criterion) {
    let mut group = group(c, "vs::Produce");
    bench_rill(&mut group, || {
        let broker = LocalBroker::new();
        let topic = Topic::new("out");
        broker.create_topic(&topic, PARTITIONS);
        Produce::new(LocalProducer::new(broker), topic, Noop)
    });
    #[cfg(feature = "arroyo")]
    {
        let runtime = runtime();
        arroyo::produce(&mut group, runtime.handle());
    }
    group.finish();
}

/// The chain compared with sentry_arroyo: `RunTask(identity) → CommitOffsets(1 s)`.
///
/// `rill` and `sentry_arroyo` are driven the same way (a poll after every message);
/// `rill_processor_loop` polls as rill's processor does, once per batch of ready messages.
fn chain(c: &mut Criterion) {
    let build = || {
        Rill(RunTask::new(
            identity,
            CommitOffsets::new(Duration::from_secs(1)),
        ))
    };
    let mut group = group(c, "chain::RunTask_CommitOffsets");
    bench_driven(&mut group, "rill", build, messages, 1);
    bench_driven(
        &mut group,
        "rill_processor_loop",
        build,
        messages,
        EVENTS_PER_ITERATION,
    );
    #[cfg(feature = "arroyo")]
    arroyo::chain(&mut group);
    group.finish();
}

/// An in-memory broker holding `messages` on `PARTITIONS` partitions of `topic`.
fn filled_broker(topic: &Topic, messages: Vec<Message<Payload>>) -> LocalBroker<Payload> {
    let broker = LocalBroker::new();
    broker.create_topic(topic, PARTITIONS);
    for message in messages {
        let partition = message.partition().cloned().expect("a broker message");
        broker
            .produce_to(&partition, message.into_payload())
            .expect("a topic");
    }
    broker
}

/// Runs a stream processor with the pipelines of `factory` on `broker` until it submitted
/// `count` messages, then shuts it down (the final join commits everything) and checks that
/// every offset was committed.
fn run_processor<F>(
    broker: &LocalBroker<Payload>,
    topic: &Topic,
    count: u64,
    config: ProcessorConfig,
    factory: F,
) where
    F: FnMut(&[Partition]) -> Box<dyn ProcessingStrategy<Payload> + Send> + Send + 'static,
{
    let consumer = broker.subscribe("bench", std::slice::from_ref(topic));
    let mut processor = StreamProcessor::new(consumer, factory).with_config(config);
    while processor.stats().messages_submitted < count {
        processor.run_once().expect("a healthy pipeline");
    }
    processor.shutdown().expect("a clean shutdown");
    let last = Partition::new(topic.clone(), PARTITIONS - 1);
    assert_eq!(
        processor.committed().get(&last),
        Some(&(count / u64::from(PARTITIONS)))
    );
}

/// The whole loop: a stream processor consuming `MESSAGES` from its library's in-memory broker
/// through `RunTask(identity) → CommitOffsets(10 ms)` until every offset is committed.
///
/// rill's processor takes up to `EVENTS_PER_ITERATION` ready messages per iteration; arroyo's
/// takes one message per `run_once`.
fn processor(c: &mut Criterion) {
    let mut group = group(c, "vs::StreamProcessor");
    group.bench_function("rill", |b| {
        b.iter_batched(
            || {
                let topic = Topic::new("bench");
                (filled_broker(&topic, messages()), topic)
            },
            |(broker, topic)| {
                let factory = |_: &[Partition]| -> Box<dyn ProcessingStrategy<Payload> + Send> {
                    Box::new(RunTask::new(
                        identity,
                        CommitOffsets::new(Duration::from_millis(10)),
                    ))
                };
                let config = ProcessorConfig::default().with_poll_timeout(Duration::ZERO);
                run_processor(&broker, &topic, MESSAGES, config, factory);
            },
            BatchSize::LargeInput,
        );
    });
    #[cfg(feature = "arroyo")]
    arroyo::processor(&mut group);
    group.finish();
}

/// The loop at its ceiling: `RunTaskInThreads::blocking` with `CEILING_CONCURRENCY` threads
/// running tasks of `CEILING_TASK` (a sleep stands for the work) `→ CommitOffsets(10 ms)`, on
/// the in-memory broker with the processor's default settings. The ceiling is
/// `CEILING_CONCURRENCY / CEILING_TASK` = 2 000 messages per second; the figure to read is the
/// throughput against it, and against `work_alone`, the same sleeps on as many threads
/// without a loop.
///
/// arroyo's counterpart runs its `RunTaskInThreads` on a runtime of `CEILING_CONCURRENCY`
/// worker threads, each task blocking its worker for `CEILING_TASK`, as arroyo's docs have
/// `ConcurrencyConfig::new` do.
fn ceiling(c: &mut Criterion) {
    let mut group = c.benchmark_group("ceiling::RunTaskInThreads_4x2ms");
    group.throughput(Throughput::Elements(CEILING_MESSAGES));
    group.sample_size(10);
    // The work without a loop: `CEILING_CONCURRENCY` threads sleeping `CEILING_TASK` in turn,
    // the ceiling in practice (a sleep overshoots by tens of microseconds).
    group.bench_function("work_alone", |b| {
        b.iter(|| {
            std::thread::scope(|scope| {
                for _ in 0..CEILING_CONCURRENCY {
                    scope.spawn(|| {
                        for _ in 0..CEILING_MESSAGES / CEILING_CONCURRENCY as u64 {
                            std::thread::sleep(CEILING_TASK);
                        }
                    });
                }
            });
        });
    });
    group.bench_function("rill", |b| {
        b.iter_batched(
            || {
                let topic = Topic::new("bench");
                (filled_broker(&topic, messages_of(CEILING_MESSAGES)), topic)
            },
            |(broker, topic)| {
                let factory = |_: &[Partition]| -> Box<dyn ProcessingStrategy<Payload> + Send> {
                    let work = |m: Message<Payload>| {
                        std::thread::sleep(CEILING_TASK);
                        Ok(m)
                    };
                    let next = CommitOffsets::new(Duration::from_millis(10));
                    Box::new(
                        RunTaskInThreads::blocking(work, CEILING_CONCURRENCY, next)
                            .expect("worker threads"),
                    )
                };
                run_processor(
                    &broker,
                    &topic,
                    CEILING_MESSAGES,
                    ProcessorConfig::default(),
                    factory,
                );
            },
            BatchSize::LargeInput,
        );
    });
    #[cfg(feature = "arroyo")]
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(CEILING_CONCURRENCY)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        arroyo::ceiling(&mut group, runtime.handle());
    }
    group.finish();
}

// The whole-loop groups go last: arroyo's `StreamProcessor` starts coarsetime's `Updater`
// thread, which outlives it and made every tokio-based group after it about five times slower
// for both libraries (`RunTaskInThreads`: 120 against 730 k msgs/s for rill).
criterion_group!(
    benches,
    noop,
    health_check,
    run_task,
    commit_offsets,
    reduce,
    filter,
    unfold,
    run_task_in_threads,
    produce,
    chain,
    ceiling,
    processor
);
criterion_main!(benches);
