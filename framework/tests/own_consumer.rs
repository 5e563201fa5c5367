//! The consumer of the guide's "writing your own consumer" (docs/framework.md), compiled and
//! run here on the in-memory broker so the guide cannot drift from what works.
//!
//! Events arrive as JSON. Heartbeats are dropped, events with a negative amount go to the
//! dead-letter queue with a reason, every other one is enriched by a blocking call (2 ms, four
//! at a time), and batches of up to 100 are written to an output topic; an input offset is
//! committed only once the batch holding its event was delivered.

// Test code: a failed setup step should panic with its error.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use rill::backends::local::{LocalBroker, LocalConsumer, LocalDlq, LocalProducer};
use rill::dlq::DlqPolicy;
use rill::processor::{ProcessorConfig, StreamProcessor};
use rill::steps::{
    CommitOffsets, FilterMap, PoolError, Produce, Reduce, RunTask, RunTaskInThreads, TaskError,
};
use rill::{Message, Partition, Topic, fallible, json};
use serde::{Deserialize, Serialize};

// --- The consumer: from here to the tests is all a team writes. ---

#[derive(Deserialize)]
struct Event {
    kind: String,
    user: u64,
    amount: i64,
}

#[derive(Serialize, Deserialize)]
struct Enriched {
    user: u64,
    amount: i64,
    tier: String,
}

/// Parses once: a heartbeat is dropped (`None`), bad input is invalid (`Err`: the reason).
fn parse(message: &Message<Vec<u8>>) -> Result<Option<Event>, String> {
    let event: Event = serde_json::from_slice(message.payload()).map_err(|e| e.to_string())?;
    match event.kind.as_str() {
        "heartbeat" => Ok(None),
        _ if event.amount < 0 => Err(format!("negative amount {}", event.amount)),
        _ => Ok(Some(event)),
    }
}

/// A blocking call (a synchronous lookup, say): it runs on the step's own threads.
fn enrich(message: Message<Event>) -> Result<Message<Enriched>, TaskError> {
    std::thread::sleep(Duration::from_millis(2));
    Ok(message.map(|event| Enriched {
        user: event.user,
        amount: event.amount,
        tier: if event.amount > 100 { "gold" } else { "basic" }.to_owned(),
    }))
}

/// The consumer of `group`: reads `input`, writes batches to `output`, dead-letters to `dlq`.
fn consumer(
    broker: &LocalBroker<Vec<u8>>,
    group: &str,
    input: Topic,
    output: Topic,
    dlq: LocalDlq<Vec<u8>>,
) -> StreamProcessor<Vec<u8>, LocalConsumer<Vec<u8>>> {
    let producer = LocalProducer::new(broker.clone());
    // Builds the pipeline, from its last step back, for each assignment.
    let factory = fallible(move |_: &[Partition]| {
        let commit = CommitOffsets::new(Duration::from_millis(100));
        let produce = Produce::new(producer.clone(), output.clone(), commit);
        let encode = RunTask::new(json::encode, produce);
        let batch = Reduce::vec(100, Duration::from_millis(50), encode);
        let enrich = RunTaskInThreads::blocking(enrich, 4, batch)?;
        Ok::<_, PoolError>(FilterMap::new(parse, enrich))
    });
    StreamProcessor::new(broker.subscribe(group, &[input]), factory)
        .with_config(ProcessorConfig::default().with_poll_timeout(Duration::from_millis(5)))
        .with_dlq(DlqPolicy::new(dlq))
}

// --- Tests, on the in-memory broker. ---

const PER_PARTITION: u64 = 300;

/// Item `i`: a heartbeat every tenth, a negative amount every 37th, otherwise an event.
fn payload(i: u64) -> Vec<u8> {
    let (kind, amount) = match i {
        i if i % 10 == 0 => ("heartbeat", 0),
        i if i % 37 == 0 => ("event", -1),
        i => ("event", i.cast_signed()),
    };
    format!(r#"{{"kind":"{kind}","user":{i},"amount":{amount}}}"#).into_bytes()
}

struct World {
    broker: LocalBroker<Vec<u8>>,
    input: Topic,
    output: Topic,
    dlq: LocalDlq<Vec<u8>>,
}

impl World {
    fn new() -> Self {
        let broker = LocalBroker::new();
        let (input, output) = (Topic::new("events"), Topic::new("enriched"));
        broker.create_topic(&input, 2);
        broker.create_topic(&output, 1);
        for index in 0..2 {
            for offset in 0..PER_PARTITION {
                let user = u64::from(index) * PER_PARTITION + offset;
                let partition = Partition::new(input.clone(), index);
                broker.produce_to(&partition, payload(user)).unwrap();
            }
        }
        let dlq = LocalDlq::new();
        Self {
            broker,
            input,
            output,
            dlq,
        }
    }

    fn all_committed(&self, group: &str) -> bool {
        (0..2).all(|index| {
            let partition = Partition::new(self.input.clone(), index);
            self.broker.committed(group, &partition) == Some(PER_PARTITION)
        })
    }

    fn users_written(&self) -> Vec<u64> {
        let written = self
            .broker
            .payloads(&Partition::new(self.output.clone(), 0));
        let batches = written
            .iter()
            .map(|bytes| serde_json::from_slice(bytes).unwrap());
        let mut users: Vec<u64> = batches
            .flat_map(|batch: Vec<Enriched>| batch.into_iter().map(|e| e.user))
            .collect();
        users.sort_unstable();
        users
    }
}

#[test]
fn every_event_is_written_once_and_every_bad_one_dead_lettered_with_its_reason() {
    let world = World::new();
    let mut processor = consumer(
        &world.broker,
        "guide",
        world.input.clone(),
        world.output.clone(),
        world.dlq.clone(),
    );
    let handle = processor.handle();
    let runner = std::thread::spawn(move || processor.run());

    let deadline = Instant::now() + Duration::from_secs(30);
    while !world.all_committed("guide") {
        assert!(
            Instant::now() < deadline,
            "not everything committed in time"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.signal_shutdown();
    runner.join().unwrap().unwrap();

    let all = 0..2 * PER_PARTITION;
    let events: Vec<u64> = all.clone().filter(|i| i % 10 != 0 && i % 37 != 0).collect();
    assert_eq!(world.users_written(), events);
    let bad = all.filter(|i| i % 10 != 0 && i % 37 == 0).count();
    let letters = world.dlq.dead_letters();
    assert_eq!(letters.len(), bad);
    assert!(letters.iter().all(|l| l.reason == "negative amount -1"));
    assert_eq!(handle.stats().invalid_messages, bad as u64);
}
