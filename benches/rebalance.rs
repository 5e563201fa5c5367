//! `cargo bench -p benches --bench rebalance`: how long the partitions a member keeps stop
//! flowing while the group rebalances, with the pipeline rebuilt on every rebalance (eager
//! handling) against incremental rebalancing, in the same run.
//!
//! Why this bench: incremental rebalancing exists so that a rebalance costs the kept
//! partitions nothing, not even the join of work in flight on the partitions that move. Only
//! a pipeline with work in flight shows the difference, so each run:
//!
//! - feeds four partitions of the in-memory broker (cooperative group) at a steady rate, one
//!   message per partition every [`PRODUCE_EVERY`], below what the pipeline can take;
//! - runs `Reduce` (a batch closed by its [`BATCH_WINDOW`]) → `Unfold` → `RunTaskInThreads`
//!   (tasks waiting [`TASK`], as for a delivery or a store's reply, up to [`CONCURRENCY`] at a
//!   time) → a sink recording when each message of partition 0 is done → `CommitOffsets`, on a
//!   processor of its own thread with the default poll timeout;
//! - makes a second member with the same pipeline join (partitions 1 and 3 move to it, 0 and
//!   2 stay) and leave again by a graceful shutdown (they come back), [`CYCLES`] times,
//!   [`PAUSE`] apart;
//! - for each rebalance, takes the longest gap between two consecutive messages of partition 0
//!   done in the [`WINDOW`] after it, and, as the baseline, the same in the window before.
//!
//! Printed per mode, for the revocations (the second member joins) and the assignments (it
//! leaves) apart: the median and the largest gap, beside the baseline's median. The target for
//! incremental rebalancing: the kept partition's gap no longer than one poll timeout above its
//! baseline; the rebuilding path stops it for the join of the work in flight.
//!
//! Usage: `cargo bench -p benches --bench rebalance`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rill::backends::local::LocalBroker;
use rill::processor::{ProcessorConfig, StreamProcessor};
use rill::steps::{CommitOffsets, Reduce, RunTask, RunTaskInThreads, TaskError, Unfold};
use rill::{Message, Partition, ProcessingStrategy, Topic};

const PARTITIONS: u32 = 4;
const PRODUCE_EVERY: Duration = Duration::from_millis(5);
const BATCH_WINDOW: Duration = Duration::from_millis(20);
const TASK: Duration = Duration::from_millis(100);
const CONCURRENCY: usize = 256;
const CYCLES: usize = 10;
const PAUSE: Duration = Duration::from_millis(500);
const WINDOW: Duration = Duration::from_millis(250);
const GROUP: &str = "rebalance-bench";

/// When each message of partition 0 was done, in order.
type Done = Arc<Mutex<Vec<Instant>>>;

/// The payload is the partition the message was produced to: batches split again carry no
/// partition of their own.
fn pipeline(runtime: &tokio::runtime::Handle, done: &Done) -> impl ProcessingStrategy<u32> + use<> {
    let done = Arc::clone(done);
    let sink = RunTask::new(
        move |message: Message<u32>| {
            if *message.payload() == 0 {
                done.lock()
                    .expect("no panic while recording")
                    .push(Instant::now());
            }
            Ok(message)
        },
        CommitOffsets::new(Duration::ZERO),
    );
    let tasks = RunTaskInThreads::new(
        |message: Message<u32>| async move {
            tokio::time::sleep(TASK).await;
            Ok::<_, TaskError>(message)
        },
        CONCURRENCY,
        runtime.clone(),
        sink,
    );
    Reduce::vec(
        10_000,
        BATCH_WINDOW,
        Unfold::new(|batch: Vec<u32>| batch, tasks),
    )
}

/// Gaps of partition 0 after each rebalance of one kind, and before it.
struct Gaps {
    after: Vec<Duration>,
    before: Vec<Duration>,
}

/// The gaps of one run, by what the rebalance did to the first member.
struct Rebalances {
    /// The second member joined: partitions 1 and 3 revoked.
    revoked: Gaps,
    /// The second member left: partitions 1 and 3 assigned again.
    assigned: Gaps,
}

/// The longest gap between consecutive instants of `done` ending in `from..from + WINDOW`.
fn longest_gap(done: &[Instant], from: Instant) -> Duration {
    done.windows(2)
        .filter(|pair| pair[1] > from && pair[1] <= from + WINDOW)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or(WINDOW)
}

/// A processor with the bench's pipeline on a thread of its own.
struct Member {
    handle: rill::processor::ProcessorHandle,
    thread: std::thread::JoinHandle<Result<(), rill::processor::RunError>>,
}

impl Member {
    fn start(
        broker: &LocalBroker<u32>,
        topic: &Topic,
        rebuild: bool,
        runtime: &tokio::runtime::Handle,
        done: &Done,
    ) -> Self {
        let factory = {
            let (runtime, done) = (runtime.clone(), Arc::clone(done));
            move |_: &[Partition]| pipeline(&runtime, &done)
        };
        let consumer = broker.subscribe(GROUP, std::slice::from_ref(topic));
        let config = ProcessorConfig::default().with_rebuild_on_rebalance(rebuild);
        let mut processor = StreamProcessor::new(consumer, factory).with_config(config);
        let handle = processor.handle();
        let thread = std::thread::spawn(move || processor.run());
        Self { handle, thread }
    }

    fn stop(self) {
        self.handle.signal_shutdown();
        self.thread
            .join()
            .expect("the processor thread ends")
            .expect("a healthy processor");
    }
}

fn run(rebuild: bool, runtime: &tokio::runtime::Handle) -> Rebalances {
    let broker = LocalBroker::new();
    let topic = Topic::new("in");
    broker.create_topic(&topic, PARTITIONS);
    let done: Done = Arc::default();
    // Only the first member records: partition 0 never moves.
    let first = Member::start(&broker, &topic, rebuild, runtime, &done);

    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (broker, topic, stop) = (broker.clone(), topic.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for index in 0..PARTITIONS {
                    broker
                        .produce_to(&Partition::new(topic.clone(), index), index)
                        .expect("the topic exists");
                }
                std::thread::sleep(PRODUCE_EVERY);
            }
        })
    };

    let (mut revoked, mut assigned) = (Vec::new(), Vec::new());
    std::thread::sleep(PAUSE);
    for _ in 0..CYCLES {
        let second = Member::start(&broker, &topic, rebuild, runtime, &Done::default());
        revoked.push(Instant::now());
        std::thread::sleep(PAUSE);
        // The first member hears of the assignment once the second has left, after its
        // graceful shutdown joined its own work in flight.
        second.stop();
        assigned.push(Instant::now());
        std::thread::sleep(PAUSE);
    }

    stop.store(true, Ordering::Relaxed);
    feeder.join().expect("the feeder ends");
    first.stop();
    let done = done.lock().expect("no panic while recording");
    let gaps = |at: &[Instant]| Gaps {
        after: at.iter().map(|&at| longest_gap(&done, at)).collect(),
        before: at
            .iter()
            .map(|&at| longest_gap(&done, at - WINDOW))
            .collect(),
    };
    Rebalances {
        revoked: gaps(&revoked),
        assigned: gaps(&assigned),
    }
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let poll = ProcessorConfig::default();
    eprintln!(
        "bench-rebalance: {PARTITIONS} partitions, one message each every {PRODUCE_EVERY:?}, \
         batches of {BATCH_WINDOW:?}, tasks of {TASK:?} x{CONCURRENCY}, {} rebalances per \
         mode; {poll:?}",
        CYCLES * 2
    );
    // Both modes one after the other, twice, so both see the same state of a noisy machine.
    for _ in 0..2 {
        for (name, rebuild) in [("rebuild (eager handling)", true), ("incremental", false)] {
            let run = run(rebuild, runtime.handle());
            for (kind, gaps) in [("revoked", &run.revoked), ("assigned", &run.assigned)] {
                let largest = gaps.after.iter().max().copied().unwrap_or_default();
                println!(
                    "{name:>24}, {kind:>8}: kept partition's longest gap after: median {:.1} ms, \
                     max {:.1} ms; before: median {:.1} ms",
                    millis(median(&gaps.after)),
                    millis(largest),
                    millis(median(&gaps.before)),
                );
            }
        }
    }
}
