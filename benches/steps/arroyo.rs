//! The `sentry_arroyo` 2.49 side of the step benches: the same steps, messages and work as
//! the `rill` functions of each group, driven by the same loop.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hint::black_box;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup};
use parking_lot::Mutex;
use sentry_arroyo::backends::kafka::types::KafkaPayload;
use sentry_arroyo::backends::local::broker::LocalBroker;
use sentry_arroyo::backends::local::{LocalConsumer, LocalProducer};
use sentry_arroyo::backends::storages::memory::MemoryMessageStorage;
use sentry_arroyo::processing::strategies::commit_offsets::CommitOffsets;
use sentry_arroyo::processing::strategies::noop::Noop;
use sentry_arroyo::processing::strategies::produce::Produce;
use sentry_arroyo::processing::strategies::reduce::Reduce;
use sentry_arroyo::processing::strategies::run_task::RunTask;
use sentry_arroyo::processing::strategies::run_task_in_threads::{
    ConcurrencyConfig, RunTaskFunc, RunTaskInThreads,
};
use sentry_arroyo::processing::strategies::{
    ProcessingStrategy, ProcessingStrategyFactory, SubmitError,
};
use sentry_arroyo::processing::{Callbacks, ConsumerState, StreamProcessor};
use sentry_arroyo::types::{Message, Partition, Topic, TopicOrPartition};
use sentry_arroyo::utils::clock::SystemClock;
use tokio::runtime::Handle;
use uuid::Uuid;

use super::{
    CEILING_CONCURRENCY, CEILING_MESSAGES, CEILING_TASK, Driven, IN_FLIGHT, MESSAGES, PARTITIONS,
    Payload, bench_driven, input, payload,
};

/// An arroyo step taking messages of `T`.
struct Arroyo<S, T>(S, PhantomData<T>);

impl<S: ProcessingStrategy<T>, T> Driven for Arroyo<S, T> {
    type Message = Message<T>;

    fn offer(&mut self, message: Self::Message) -> Option<Self::Message> {
        match self.0.submit(message) {
            Ok(()) | Err(SubmitError::InvalidMessage(_)) => None,
            Err(SubmitError::MessageRejected(rejected)) => Some(rejected.message),
        }
    }

    fn poll(&mut self) {
        black_box(self.0.poll().ok());
    }

    fn join(&mut self) {
        black_box(self.0.join(None).ok());
    }
}

/// The input of [`super::input`] as arroyo messages of `payload`.
fn messages_with<T: Clone>(count: u64, payload: &T) -> Vec<Message<T>> {
    let topic = Topic::new("bench");
    input(count)
        .map(|(partition, offset)| {
            let partition = Partition::new(topic, partition as u16);
            Message::new_broker_message(payload.clone(), partition, offset, Default::default())
        })
        .collect()
}

fn messages() -> Vec<Message<Payload>> {
    messages_with(MESSAGES, &payload())
}

/// The `sentry_arroyo` function of a `vs::*` group.
fn bench_arroyo<S: ProcessingStrategy<Payload>>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    build: impl Fn() -> S,
) {
    bench_driven(
        group,
        "sentry_arroyo",
        || Arroyo(build(), PhantomData),
        messages,
        1,
    );
}

fn identity(message: Message<Payload>) -> Result<Message<Payload>, SubmitError<Payload>> {
    Ok(message)
}

const fn noop() -> Noop {
    Noop {}
}

pub(super) fn run_task(group: &mut BenchmarkGroup<'_, WallTime>) {
    bench_arroyo(group, || RunTask::new(identity, noop()));
}

pub(super) fn commit_offsets(group: &mut BenchmarkGroup<'_, WallTime>) {
    bench_arroyo(group, || CommitOffsets::new(Duration::from_secs(1)));
}

pub(super) fn reduce(group: &mut BenchmarkGroup<'_, WallTime>) {
    bench_arroyo(group, || {
        Reduce::new(
            noop(),
            Arc::new(|mut batch: Vec<Payload>, message: Message<Payload>| {
                batch.push(message.into_payload());
                Ok(batch)
            }),
            Arc::new(Vec::new),
            100,
            Duration::from_secs(1),
            |_| 1,
        )
    });
}

pub(super) fn run_task_in_threads(group: &mut BenchmarkGroup<'_, WallTime>, runtime: &Handle) {
    bench_arroyo(group, || {
        let identity = |message: Message<Payload>| -> RunTaskFunc<Payload, Infallible> {
            Box::pin(async move { Ok(message) })
        };
        let concurrency = ConcurrencyConfig::with_runtime(IN_FLIGHT, runtime.clone());
        RunTaskInThreads::new(noop(), identity, &concurrency, None)
    });
}

/// A broker of arroyo's in-memory storage with a topic of `PARTITIONS` partitions.
fn broker<T: Clone + Send + Sync + 'static>(topic: Topic) -> LocalBroker<T> {
    let storage: MemoryMessageStorage<T> = MemoryMessageStorage::default();
    let mut broker = LocalBroker::new(Box::new(storage), Box::new(SystemClock {}));
    broker
        .create_topic(topic, PARTITIONS as u16)
        .expect("a new topic");
    broker
}

pub(super) fn produce(group: &mut BenchmarkGroup<'_, WallTime>, runtime: &Handle) {
    let payload = KafkaPayload::new(None, None, Some(payload().to_vec()));
    bench_driven(
        group,
        "sentry_arroyo",
        || {
            let topic = Topic::new("out");
            let producer = LocalProducer::new(Arc::new(Mutex::new(broker(topic))));
            let concurrency = ConcurrencyConfig::with_runtime(IN_FLIGHT, runtime.clone());
            let step = Produce::new(
                noop(),
                producer,
                &concurrency,
                TopicOrPartition::Topic(topic),
            );
            Arroyo(step, PhantomData)
        },
        || messages_with(MESSAGES, &payload),
        1,
    );
}

pub(super) fn chain(group: &mut BenchmarkGroup<'_, WallTime>) {
    bench_arroyo(group, || {
        RunTask::new(identity, CommitOffsets::new(Duration::from_secs(1)))
    });
}

/// A factory of arroyo pipelines from a closure.
struct Factory<F>(F);

impl<F> ProcessingStrategyFactory<Payload> for Factory<F>
where
    F: Fn() -> Box<dyn ProcessingStrategy<Payload>> + Send + Sync,
{
    fn create(&self) -> Box<dyn ProcessingStrategy<Payload>> {
        (self.0)()
    }
}

/// arroyo's in-memory broker holding the input of `count` messages on topic `bench`.
fn filled_broker(count: u64) -> Arc<Mutex<LocalBroker<Payload>>> {
    let topic = Topic::new("bench");
    let mut broker = broker(topic);
    let payload = payload();
    for (partition, _) in input(count) {
        let partition = Partition::new(topic, partition as u16);
        broker
            .produce(&partition, Arc::clone(&payload))
            .expect("a topic");
    }
    Arc::new(Mutex::new(broker))
}

/// Runs arroyo's stream processor on `broker` (from [`filled_broker`] with `count` messages)
/// until its consumer read them all, then drops it: the consumer's revocation joins the
/// pipeline and commits. arroyo's broker has no reader of committed offsets; the consumer's
/// positions are checked instead.
fn run_processor<F>(broker: Arc<Mutex<LocalBroker<Payload>>>, count: u64, factory: F)
where
    F: Fn() -> Box<dyn ProcessingStrategy<Payload>> + Send + Sync + 'static,
{
    let topic = Topic::new("bench");
    let state = ConsumerState::new(Box::new(Factory(factory)), None);
    let consumer = LocalConsumer::new(
        Uuid::nil(),
        broker,
        "bench".to_owned(),
        false,
        &[topic],
        Callbacks(state.clone()),
    );
    let mut processor = StreamProcessor::new(Box::new(consumer), state);
    let end: HashMap<Partition, u64> = (0..PARTITIONS)
        .map(|index| {
            let partition = Partition::new(topic, index as u16);
            (partition, count / u64::from(PARTITIONS))
        })
        .collect();
    while processor.tell() != end {
        processor.run_once().expect("a healthy pipeline");
    }
    drop(processor);
}

pub(super) fn processor(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.bench_function("sentry_arroyo", |b| {
        b.iter_batched(
            || filled_broker(MESSAGES),
            |broker| {
                run_processor(broker, MESSAGES, || {
                    Box::new(RunTask::new(
                        identity,
                        CommitOffsets::new(Duration::from_millis(10)),
                    ))
                });
            },
            BatchSize::LargeInput,
        );
    });
}

/// `runtime` has `CEILING_CONCURRENCY` worker threads, which the tasks block in turn.
pub(super) fn ceiling(group: &mut BenchmarkGroup<'_, WallTime>, runtime: &Handle) {
    group.bench_function("sentry_arroyo", |b| {
        b.iter_batched(
            || filled_broker(CEILING_MESSAGES),
            |broker| {
                let runtime = runtime.clone();
                run_processor(broker, CEILING_MESSAGES, move || {
                    let work = |message: Message<Payload>| -> RunTaskFunc<Payload, Infallible> {
                        Box::pin(async move {
                            std::thread::sleep(CEILING_TASK);
                            Ok(message)
                        })
                    };
                    let concurrency =
                        ConcurrencyConfig::with_runtime(CEILING_CONCURRENCY, runtime.clone());
                    let next = CommitOffsets::new(Duration::from_millis(10));
                    Box::new(RunTaskInThreads::new(next, work, &concurrency, None))
                });
            },
            BatchSize::LargeInput,
        );
    });
}
