//! Whole pipelines on the in-memory broker: a rebalance in the middle of a batch, a storm of
//! rejections, and a shutdown with work in flight.

// Test code: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rill::backends::local::{LocalBroker, LocalConsumer, LocalProducer};
use rill::processor::{ProcessorConfig, StreamProcessor};
use rill::steps::{CommitOffsets, Produce, Reduce, RunTask, RunTaskInThreads, TaskError, Unfold};
use rill::testing::{RejectWhen, numbered_broker};
use rill::{Message, Partition, ProcessingStrategy, SubmitError, Topic};

const GROUP: &str = "scenario";

/// (partition, offset) of every message that reached the end of a pipeline.
type Seen = Arc<Mutex<Vec<(u32, u64)>>>;

fn broker_with(partitions: u32, per_partition: u64) -> (LocalBroker<u64>, Topic) {
    numbered_broker("in", partitions, per_partition)
}

fn committed(broker: &LocalBroker<u64>, topic: &Topic, index: u32) -> Option<u64> {
    broker.committed(GROUP, &Partition::new(topic.clone(), index))
}

/// Records the origin of each item of a batch, then lets it be committed.
fn recording_sink(seen: &Seen) -> impl ProcessingStrategy<Vec<(u32, u64)>> + use<> {
    let seen = Arc::clone(seen);
    RunTask::new(
        move |batch: Message<Vec<(u32, u64)>>| {
            seen.lock().extend(batch.payload().iter().copied());
            Ok(batch)
        },
        CommitOffsets::new(Duration::ZERO),
    )
}

/// Tags each payload with its origin so the end of the pipeline can tell who it saw.
fn tag(message: Message<u64>) -> Result<Message<(u32, u64)>, SubmitError<u64>> {
    let partition = message.partition().map_or(u32::MAX, Partition::index);
    let offset = message.offset().unwrap_or(u64::MAX);
    Ok(message.map(|_| (partition, offset)))
}

#[test]
fn a_rebalance_in_the_middle_of_a_batch_loses_nothing_and_commits_the_partial_batch() {
    let (broker, topic) = broker_with(2, 50);
    let seen: Seen = Arc::default();
    let factory = {
        let seen = Arc::clone(&seen);
        move |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
            // A batch of 1000 in an hour: only a join flushes it.
            let batch = Reduce::vec(1000, Duration::from_secs(3600), recording_sink(&seen));
            Box::new(RunTask::new(tag, batch))
        }
    };
    let config = ProcessorConfig::default().with_poll_timeout(Duration::ZERO);
    let mut first = StreamProcessor::new(
        broker.subscribe(GROUP, std::slice::from_ref(&topic)),
        factory.clone(),
    )
    .with_config(config.clone());
    while first.stats().messages_submitted < 30 {
        first.run_once().unwrap();
    }
    assert!(seen.lock().is_empty(), "the batch should still be open");

    // A second member joins: partition 1 moves, the open batch is flushed and committed.
    let mut second = StreamProcessor::new(
        broker.subscribe(GROUP, std::slice::from_ref(&topic)),
        factory,
    )
    .with_config(config);
    for _ in 0..1000 {
        first.run_once().unwrap();
        second.run_once().unwrap();
    }
    first.shutdown().unwrap();
    second.shutdown().unwrap();

    assert_eq!(committed(&broker, &topic, 0), Some(50));
    assert_eq!(committed(&broker, &topic, 1), Some(50));
    let mut per_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (partition, offset) in seen.lock().iter() {
        per_partition.entry(*partition).or_default().push(*offset);
    }
    for offsets in per_partition.values_mut() {
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(
            *offsets,
            (0..50).collect::<Vec<_>>(),
            "every offset processed at least once"
        );
    }
}

#[test]
fn a_rejection_storm_keeps_order_pauses_and_resumes_and_loses_nothing() {
    let (broker, topic) = broker_with(3, 40);
    let seen: Seen = Arc::default();
    let factory = {
        let seen = Arc::clone(&seen);
        move |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
            let batch = Reduce::vec(7, Duration::from_millis(1), recording_sink(&seen));
            // Rejects every submission for a while, then every other one: a storm.
            let mut calls = 0_u64;
            let storm = move || {
                calls += 1;
                calls < 200 || calls.is_multiple_of(2)
            };
            Box::new(RejectWhen::new(storm, RunTask::new(tag, batch)))
        }
    };
    let mut processor = StreamProcessor::new(
        broker.subscribe(GROUP, std::slice::from_ref(&topic)),
        factory,
    )
    .with_config(
        ProcessorConfig::default()
            .with_poll_timeout(Duration::ZERO)
            .with_retry_interval(Duration::ZERO)
            .with_backpressure_grace(Duration::ZERO),
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|i| committed(&broker, &topic, i) != Some(40)) {
        assert!(Instant::now() < deadline, "storm never drained");
        processor.run_once().unwrap();
    }

    assert!(processor.stats().pauses >= 1);
    assert!(
        processor.consumer().paused().is_empty(),
        "resumed once accepted"
    );
    let seen = seen.lock();
    for partition in 0..3 {
        let offsets: Vec<u64> = seen
            .iter()
            .filter(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
            .collect();
        assert_eq!(
            offsets,
            (0..40).collect::<Vec<_>>(),
            "exactly once, in order"
        );
    }
}

#[test]
fn shutdown_with_tasks_and_deliveries_in_flight_finishes_them_and_commits() {
    let (broker, topic) = broker_with(2, 100);
    let out = Topic::new("out");
    broker.create_topic(&out, 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let producer = LocalProducer::new(broker.clone());
    let factory = {
        let (handle, producer, out) = (runtime.handle().clone(), producer.clone(), out.clone());
        move |_: &[Partition]| -> Box<dyn ProcessingStrategy<u64> + Send> {
            let produce = Produce::new(
                producer.clone(),
                out.clone(),
                CommitOffsets::new(Duration::from_secs(3600)),
            );
            let slow = RunTaskInThreads::new(
                |message: Message<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok::<_, TaskError>(message.map(|n| n * 10))
                },
                8,
                handle.clone(),
                produce,
            );
            Box::new(Unfold::new(|n: u64| [n], slow))
        }
    };
    let consumer: LocalConsumer<u64> = broker.subscribe(GROUP, std::slice::from_ref(&topic));
    let mut processor = StreamProcessor::new(consumer, factory);
    let handle = processor.handle();
    let runner = std::thread::spawn(move || {
        let result = processor.run();
        (result, processor.stats())
    });

    // Stop while deliveries are held back and tasks are running.
    let deadline = Instant::now() + Duration::from_secs(30);
    while broker.payloads(&Partition::new(out.clone(), 0)).len() < 50 {
        assert!(Instant::now() < deadline, "nothing produced");
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.hold_deliveries();
    while producer.held() == 0 {
        assert!(Instant::now() < deadline, "no delivery held back");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The stop is signalled while deliveries are held back; whether the processor sees it
    // before or after their release, what it accepted must end finished and committed.
    handle.signal_shutdown();
    producer.release_deliveries();
    let (result, stats) = runner.join().unwrap();
    result.unwrap();

    // Whatever the pipeline accepted was finished and committed (messages still waiting in
    // front of it were not: the next owner reads them again); nothing committed is unproduced.
    let produced = broker.payloads(&Partition::new(out, 0)).len() as u64;
    let committed: u64 = (0..2)
        .map(|i| committed(&broker, &topic, i).unwrap_or(0))
        .sum();
    assert_eq!(committed, stats.messages_submitted);
    assert!(produced >= committed);
}
