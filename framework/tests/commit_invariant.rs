//! Property: for random pipelines with random rejections, concurrency, filtering, invalid
//! messages, out-of-order completion, slow tasks and rebalances whose join deadline abandons
//! work in flight, every committed offset implies that every earlier offset of its partition
//! was fully processed or dead-lettered, commits never move backwards, and everything is
//! eventually committed.
//!
//! Rebalances are eager (the pipeline joined and rebuilt) or cooperative (the pipeline keeps
//! running: a revoked partition is handed over once its work is done or at the join deadline,
//! with batches open and tasks in flight, and partitions move both ways as the second member
//! joins and leaves).

// Test code: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use proptest::prelude::*;
use rill::backends::local::{LocalBroker, LocalConsumer};
use rill::backends::{InitialOffset, RebalanceProtocol};
use rill::dlq::{DeadLetter, DlqPolicy};
use rill::processor::{ProcessorConfig, StreamProcessor};
use rill::steps::{
    CommitOffsets, CommitPolicy, Filter, Reduce, RunTask, RunTaskInThreads, TaskError, Unfold,
};
use rill::testing::RejectWhen;
use rill::{
    CommitRequest, Consumer, ConsumerError, ConsumerEvent, Delivered, DeliveryFuture,
    InvalidMessage, Message, Partition, ProcessingStrategy, ProduceError, StrategyError,
    SubmitError, Topic,
};

/// Longest one case may run: far beyond what any case needs on an idle machine (well under a
/// second), so only a case that truly stops committing fails on a loaded one.
const CASE_DEADLINE: Duration = Duration::from_secs(60);

/// How long a case keeps running once every item is done but not everything is committed.
/// Dropped messages are released at least every second, those dropped behind parts still in
/// flight once the steps after them are idle (rill's `dropped` module): polling alone commits
/// everything well within this, which the case checks before shutting down.
const COMMIT_GRACE: Duration = Duration::from_secs(2);

/// Every payload remembers where it came from: (partition index, offset).
type Item = (u32, u64);

const GROUP: &str = "property";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Done(u32, u64),
    Commit(u32, u64),
}

type Log = Arc<Mutex<Vec<Event>>>;

#[derive(Debug, Clone)]
enum StepSpec {
    /// Identity, except offsets where `(offset * 7 + partition) % modulo == 0` are invalid.
    Validate { modulo: u64 },
    /// Rejects submissions at random.
    Flaky { percent: u64 },
    /// Drops items whose offset is a multiple of `modulo`.
    Filter { modulo: u64 },
    /// Repeats each item `offset % 3` times (zero drops it).
    Repeat,
    /// Batches then flattens again.
    Batch { size: u64 },
    /// Async tasks, at most `concurrency` in flight; each sleeps up to `max_delay_ms`, so a
    /// join with a short deadline abandons some of them.
    Threads {
        concurrency: usize,
        max_delay_ms: u64,
    },
    /// Completes messages out of order.
    Shuffle { window: usize },
}

fn step_spec() -> impl Strategy<Value = StepSpec> {
    prop_oneof![
        (2_u64..6).prop_map(|modulo| StepSpec::Validate { modulo }),
        (10_u64..60).prop_map(|percent| StepSpec::Flaky { percent }),
        (2_u64..5).prop_map(|modulo| StepSpec::Filter { modulo }),
        Just(StepSpec::Repeat),
        (1_u64..8).prop_map(|size| StepSpec::Batch { size }),
        (1_usize..4, 0_u64..8).prop_map(|(concurrency, max_delay_ms)| StepSpec::Threads {
            concurrency,
            max_delay_ms
        }),
        (2_usize..5).prop_map(|window| StepSpec::Shuffle { window }),
    ]
}

/// Replaces out-of-order steps placed after a step that splits messages.
///
/// A split message's offset rides on its last part (`Unfold`'s documented contract), which is
/// exact only when the parts finish in order; every built-in step keeps order, the test's
/// `Shuffle` does not.
fn in_order_after_splits(specs: Vec<StepSpec>) -> Vec<StepSpec> {
    let mut split = false;
    specs
        .into_iter()
        .map(|spec| match spec {
            StepSpec::Repeat | StepSpec::Batch { .. } => {
                split = true;
                spec
            }
            StepSpec::Shuffle { .. } if split => StepSpec::Flaky { percent: 30 },
            other => other,
        })
        .collect()
}

/// A tiny deterministic random source, so failures replay.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn percent(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Holds up to `window` messages and releases them in random order.
#[derive(Debug)]
struct Shuffle<N> {
    window: usize,
    held: Vec<Message<Item>>,
    rng: Rng,
    next_step: N,
    pending_commit: Option<CommitRequest>,
}

impl<N: ProcessingStrategy<Item>> Shuffle<N> {
    fn release_one(&mut self) -> Result<bool, InvalidMessage> {
        if self.held.is_empty() {
            return Ok(false);
        }
        let index = (self.rng.next() % self.held.len() as u64) as usize;
        let message = self.held.swap_remove(index);
        match self.next_step.submit(message) {
            Ok(()) => Ok(true),
            Err(SubmitError::MessageRejected(message)) => {
                self.held.push(message);
                Ok(false)
            }
            Err(SubmitError::InvalidMessage(invalid)) => Err(invalid),
        }
    }
}

impl<N: ProcessingStrategy<Item>> ProcessingStrategy<Item> for Shuffle<N> {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        let committed = self.next_step.poll()?;
        self.pending_commit = rill::merge(self.pending_commit.take(), committed);
        if self.rng.percent(50) {
            self.release_one()?;
        }
        Ok(self.pending_commit.take())
    }

    fn submit(&mut self, message: Message<Item>) -> Result<(), SubmitError<Item>> {
        if self.held.len() >= self.window {
            match self.release_one() {
                Ok(true) => {}
                Ok(false) => return Err(SubmitError::MessageRejected(message)),
                // The released message was invalid; this one is accepted all the same.
                Err(invalid) => {
                    self.held.push(message);
                    return Err(invalid.into());
                }
            }
        }
        self.held.push(message);
        Ok(())
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        while !self.held.is_empty() && deadline.is_none_or(|d| Instant::now() < d) {
            let committed = self.next_step.poll()?;
            self.pending_commit = rill::merge(self.pending_commit.take(), committed);
            self.release_one()?;
        }
        let committed = self.next_step.join(deadline)?;
        Ok(rill::merge(self.pending_commit.take(), committed))
    }

    fn close(&mut self) {
        self.next_step.close();
    }

    fn terminate(&mut self) {
        self.held.clear();
        self.next_step.terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.next_step.next_deadline()
    }
}

/// Records the item `message` carries (its origin, whatever step made the message) as done.
fn record_done(log: &Log, message: &Message<Item>) {
    let (partition, offset) = *message.payload();
    log.lock().push(Event::Done(partition, offset));
}

fn build(
    specs: &[StepSpec],
    seed: u64,
    log: &Log,
    runtime: &tokio::runtime::Handle,
) -> Box<dyn ProcessingStrategy<Item> + Send> {
    let sink_log = Arc::clone(log);
    // Every 3 messages, and every 5 ms for the last few, so polling alone commits everything.
    let commit = CommitOffsets::with_policy(
        CommitPolicy::every(Duration::from_millis(5)).or_every_messages(3),
    );
    // The sink: every item reaching it is fully processed. Done-ness is tracked by payload,
    // independently of the offsets the framework attaches to messages.
    let mut pipeline: Box<dyn ProcessingStrategy<Item> + Send> = Box::new(RunTask::new(
        move |message: Message<Item>| {
            record_done(&sink_log, &message);
            Ok(message)
        },
        commit,
    ));
    for (index, spec) in specs.iter().enumerate().rev() {
        let rng = Rng(seed.wrapping_mul(31).wrapping_add(index as u64) | 1);
        pipeline = match *spec {
            StepSpec::Validate { modulo } => {
                let invalid_log = Arc::clone(log);
                Box::new(RunTask::new(
                    move |message: Message<Item>| {
                        let (partition, offset) = *message.payload();
                        if (offset * 7 + u64::from(partition)).is_multiple_of(modulo) {
                            // A part with no offsets of its own is dropped, its work done; the
                            // dead-letter queue records the others.
                            if !message.carries_offsets() {
                                record_done(&invalid_log, &message);
                            }
                            return Err(InvalidMessage::of(&message, "property says so").into());
                        }
                        Ok(message)
                    },
                    pipeline,
                ))
            }
            StepSpec::Flaky { percent } => {
                let mut rng = rng;
                Box::new(RejectWhen::new(move || rng.percent(percent), pipeline))
            }
            StepSpec::Filter { modulo } => {
                let filter_log = Arc::clone(log);
                Box::new(Filter::new(
                    move |message: &Message<Item>| {
                        let keep = !message.payload().1.is_multiple_of(modulo);
                        if !keep {
                            record_done(&filter_log, message);
                        }
                        keep
                    },
                    pipeline,
                ))
            }
            StepSpec::Repeat => {
                let repeat_log = Arc::clone(log);
                Box::new(Unfold::new(
                    move |item: Item| {
                        let copies = (item.1 % 3) as usize;
                        if copies == 0 {
                            repeat_log.lock().push(Event::Done(item.0, item.1));
                        }
                        vec![item; copies]
                    },
                    pipeline,
                ))
            }
            StepSpec::Batch { size } => Box::new(Reduce::vec(
                size,
                Duration::from_millis(5),
                Unfold::new(|batch: Vec<Item>| batch, pipeline),
            )),
            StepSpec::Threads {
                concurrency,
                max_delay_ms,
            } => Box::new(RunTaskInThreads::new(
                move |message: Message<Item>| async move {
                    let (partition, offset) = *message.payload();
                    let delay = (offset * 13 + u64::from(partition)) % (max_delay_ms + 1);
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    Ok::<_, TaskError>(message)
                },
                concurrency,
                runtime.clone(),
                pipeline,
            )),
            StepSpec::Shuffle { window } => Box::new(Shuffle {
                window,
                held: Vec::new(),
                rng,
                next_step: pipeline,
                pending_commit: None,
            }),
        };
    }
    pipeline
}

/// A local consumer that logs its commits, in order with processing events.
#[derive(Debug)]
struct LoggingConsumer {
    inner: LocalConsumer<Item>,
    log: Log,
}

impl Consumer<Item> for LoggingConsumer {
    fn poll(&mut self, timeout: Duration) -> Result<Option<ConsumerEvent<Item>>, ConsumerError> {
        self.inner.poll(timeout)
    }
    fn pause(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        self.inner.pause(partitions)
    }
    fn resume(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        self.inner.resume(partitions)
    }
    fn tell(&self) -> HashMap<Partition, u64> {
        self.inner.tell()
    }
    fn seek(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
        self.inner.seek(positions)
    }
    fn commit(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
        self.inner.commit(positions)?;
        let mut log = self.log.lock();
        for (partition, &offset) in positions {
            log.push(Event::Commit(partition.index(), offset));
        }
        Ok(())
    }
    fn complete_revocation(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        self.inner.complete_revocation(partitions)
    }
    fn rebalance_protocol(&self) -> RebalanceProtocol {
        self.inner.rebalance_protocol()
    }
    fn close(&mut self) -> Result<(), ConsumerError> {
        self.inner.close()
    }
}

type Processor = StreamProcessor<Item, LoggingConsumer>;

struct World {
    broker: LocalBroker<Item>,
    topic: Topic,
    log: Log,
    specs: Vec<StepSpec>,
    seed: u64,
    join_timeout: Duration,
    runtime: tokio::runtime::Runtime,
}

impl World {
    fn processor(&self, member: u64) -> Processor {
        let consumer = LoggingConsumer {
            inner: self
                .broker
                .subscribe(GROUP, std::slice::from_ref(&self.topic)),
            log: Arc::clone(&self.log),
        };
        let (specs, log, handle) = (
            self.specs.clone(),
            Arc::clone(&self.log),
            self.runtime.handle().clone(),
        );
        let seed = self.seed.wrapping_add(member);
        let factory = move |_: &[Partition]| build(&specs, seed, &log, &handle);
        let dlq_log = Arc::clone(&self.log);
        let dlq = move |dead: DeadLetter<Item>| -> Result<DeliveryFuture, ProduceError<DeadLetter<Item>>> {
            dlq_log.lock().push(Event::Done(dead.partition.index(), dead.offset));
            let delivered = Delivered { partition: dead.partition, offset: 0 };
            Ok(Box::pin(std::future::ready(Ok(delivered))))
        };
        StreamProcessor::new(consumer, factory)
            .with_config(
                ProcessorConfig::default()
                    .with_poll_timeout(Duration::ZERO)
                    .with_retry_interval(Duration::ZERO)
                    .with_max_pending_messages(16)
                    .with_join_timeout(self.join_timeout),
            )
            .with_dlq(DlqPolicy::new(dlq))
    }
}

/// Replays the log: each commit must cover only done offsets, and never move back.
fn check(log: &[Event]) -> Result<(), TestCaseError> {
    let mut done: HashMap<u32, BTreeSet<u64>> = HashMap::new();
    let mut last_commit: HashMap<u32, u64> = HashMap::new();
    for event in log {
        match *event {
            Event::Done(partition, offset) => {
                done.entry(partition).or_default().insert(offset);
            }
            Event::Commit(partition, position) => {
                let finished = done.entry(partition).or_default();
                for offset in 0..position {
                    prop_assert!(
                        finished.contains(&offset),
                        "commit {position} on {partition} before offset {offset} was done"
                    );
                }
                let previous = last_commit.insert(partition, position).unwrap_or(0);
                prop_assert!(
                    position >= previous,
                    "commit on {partition} went back from {previous} to {position}"
                );
            }
        }
    }
    Ok(())
}

fn run_case(
    partitions: u32,
    per_partition: u64,
    specs: Vec<StepSpec>,
    rebalances: Vec<usize>,
    join_timeout: Duration,
    seed: u64,
    protocol: RebalanceProtocol,
) -> Result<(), TestCaseError> {
    let broker = LocalBroker::new();
    broker.configure_group(GROUP, protocol, InitialOffset::Earliest);
    let topic = Topic::new("in");
    broker.create_topic(&topic, partitions);
    for index in 0..partitions {
        for offset in 0..per_partition {
            broker
                .produce_to(&Partition::new(topic.clone(), index), (index, offset))
                .unwrap();
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let world = World {
        broker,
        topic,
        log: Arc::new(Mutex::new(Vec::new())),
        specs,
        seed,
        join_timeout,
        runtime,
    };

    let mut first = world.processor(0);
    let mut second: Option<Processor> = None;
    let all_committed = |broker: &LocalBroker<Item>| {
        (0..partitions).all(|index| {
            per_partition == 0
                || broker.committed(GROUP, &Partition::new(world.topic.clone(), index))
                    == Some(per_partition)
        })
    };
    // Rebalances happen at fixed loop iterations (the schedule is part of the case); the run
    // ends when everything is committed after the last one, or at the deadline on a machine
    // too loaded to get there, which fails the case below.
    let deadline = Instant::now() + CASE_DEADLINE;
    let last_rebalance = rebalances.iter().copied().max().unwrap_or(0);
    let everything_done = || {
        let done: BTreeSet<(u32, u64)> = world
            .log
            .lock()
            .iter()
            .filter_map(|event| match event {
                Event::Done(partition, offset) => Some((*partition, *offset)),
                Event::Commit(..) => None,
            })
            .collect();
        done.len() as u64 == u64::from(partitions) * per_partition
    };
    let mut done_since: Option<Instant> = None;
    for iteration in 0.. {
        if rebalances.contains(&iteration) {
            match second.take() {
                Some(mut member) => member.shutdown().unwrap(),
                None => second = Some(world.processor(1)),
            }
        }
        first.run_once().unwrap();
        if let Some(member) = &mut second {
            member.run_once().unwrap();
        }
        if iteration <= last_rebalance {
            continue;
        }
        if all_committed(&world.broker) || Instant::now() > deadline {
            break;
        }
        if everything_done() {
            let since = *done_since.get_or_insert_with(Instant::now);
            if since.elapsed() > COMMIT_GRACE {
                break;
            }
        }
    }
    let committed_by_polling = all_committed(&world.broker);
    first.shutdown().unwrap();
    if let Some(mut member) = second {
        member.shutdown().unwrap();
    }

    check(&world.log.lock())?;
    prop_assert!(all_committed(&world.broker), "not everything was committed");
    prop_assert!(
        committed_by_polling,
        "only the shutdown committed everything"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn commits_cover_only_finished_work_and_never_go_back(
        partitions in 1_u32..4,
        per_partition in 0_u64..40,
        specs in prop::collection::vec(step_spec(), 0..4).prop_map(in_order_after_splits),
        rebalances in prop::collection::vec(0_usize..400, 0..4),
        // Mostly short enough to abandon tasks in flight; sometimes long enough for all.
        join_timeout in prop_oneof![(0_u64..6).prop_map(Duration::from_millis), Just(Duration::from_secs(5))],
        seed in any::<u64>(),
        protocol in prop_oneof![Just(RebalanceProtocol::Eager), Just(RebalanceProtocol::Cooperative)],
    ) {
        run_case(partitions, per_partition, specs, rebalances, join_timeout, seed, protocol)?;
    }
}

/// The shape issue 13 reported: a batch split again, its last part filtered out, the parts
/// before it still in tasks when a rebalance's join deadline passes.
#[test]
fn a_join_deadline_never_commits_a_dropped_part_past_the_tasks_before_it() {
    let specs = vec![
        // One batch [0, 1, 2]: 0 and 2 (its last part, which carries its offsets) are dropped,
        // 1 sleeps in a task.
        StepSpec::Batch { size: 3 },
        StepSpec::Filter { modulo: 2 },
        StepSpec::Threads {
            concurrency: 1,
            max_delay_ms: 30,
        },
    ];
    // Rebalances every few iterations, so one lands while the task runs.
    let rebalances: Vec<usize> = (1..200).map(|i| i * 11).collect();
    for seed in 0..4 {
        let protocol = if seed % 2 == 0 {
            RebalanceProtocol::Eager
        } else {
            RebalanceProtocol::Cooperative
        };
        run_case(
            2,
            3,
            specs.clone(),
            rebalances.clone(),
            Duration::ZERO,
            seed,
            protocol,
        )
        .unwrap();
    }
}

/// Cooperative rebalances with batches open and tasks in flight on the partitions that move,
/// and a join deadline long enough to let the revoked ones finish: nothing is abandoned, the
/// hand-over waits for the work, the kept partitions flow on.
#[test]
fn cooperative_rebalances_in_the_middle_of_batches_and_tasks_commit_only_finished_work() {
    let specs = vec![
        StepSpec::Batch { size: 4 },
        StepSpec::Threads {
            concurrency: 2,
            max_delay_ms: 6,
        },
        StepSpec::Shuffle { window: 3 },
    ];
    let specs = in_order_after_splits(specs);
    // The second member joins and leaves every few iterations: partitions move both ways.
    let rebalances: Vec<usize> = (1..60).map(|i| i * 7).collect();
    for seed in 0..4 {
        for join_timeout in [Duration::from_millis(2), Duration::from_secs(5)] {
            run_case(
                3,
                30,
                specs.clone(),
                rebalances.clone(),
                join_timeout,
                seed,
                RebalanceProtocol::Cooperative,
            )
            .unwrap();
        }
    }
}
