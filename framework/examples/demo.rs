//! A real pipeline on the in-memory broker: JSON events in, batches out, bad input to a DLQ.
//!
//! Produces `--messages` JSON events (a few malformed) to a 4-partition topic, then runs two
//! consumer-group members, each a `StreamProcessor` with
//! `parse JSON → batch (500 / 50 ms) → encode → produce → commit`, on threads of their own.
//! The second member joins while the first is busy, so partitions are rebalanced mid-stream.
//! Invalid messages are dead-lettered to `events-dlq`; offsets are committed only once the
//! batch holding them was delivered (or the DLQ delivery confirmed). When everything is
//! committed, both stop gracefully and a summary is printed.
//!
//! Run with `cargo run --release -p rill --example demo [-- --messages 200000]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rill::backends::local::{LocalBroker, LocalProducer};
use rill::dlq::{DlqPolicy, DlqTopic};
use rill::processor::{ProcessorStats, StreamProcessor};
use rill::steps::{CommitOffsets, Produce, Reduce, RunTask};
use rill::{
    InvalidMessage, Message, Partition, ProcessingStrategy, ProcessingStrategyFactory, SubmitError,
    Topic,
};
use serde::Deserialize;

/// Payloads are shared bytes: cloning one (for the DLQ copy, for a produce) is a pointer copy.
type Bytes = Arc<[u8]>;

const GROUP: &str = "demo";
const INPUT_PARTITIONS: u32 = 4;

#[derive(Debug, Deserialize)]
struct Event {
    user: u64,
    amount_cents: u64,
}

#[derive(Debug, Default)]
struct Totals {
    events: u64,
    amount_cents: u64,
    max_user: u64,
}

fn parse(message: Message<Bytes>) -> Result<Message<Event>, SubmitError<Bytes>> {
    match sonic_rs::from_slice::<Event>(message.payload()) {
        Ok(event) => Ok(message.map(|_| event)),
        Err(error) => Err(InvalidMessage::of(&message, error.to_string()).into()),
    }
}

fn add(totals: &mut Totals, event: Event) -> Result<(), Event> {
    totals.events += 1;
    totals.amount_cents += event.amount_cents;
    totals.max_user = totals.max_user.max(event.user);
    Ok(())
}

fn encode(batch: Message<Totals>) -> Result<Message<Bytes>, SubmitError<Totals>> {
    Ok(batch.map(|t| {
        let json = format!(
            r#"{{"events":{},"amount_cents":{},"max_user":{}}}"#,
            t.events, t.amount_cents, t.max_user
        );
        Bytes::from(json.into_bytes())
    }))
}

/// Builds `parse → batch → encode → produce → commit` for each assignment.
fn pipeline(
    producer: LocalProducer<Bytes>,
    output: Topic,
) -> impl ProcessingStrategyFactory<Bytes> {
    move |_: &[Partition]| -> Box<dyn ProcessingStrategy<Bytes> + Send> {
        let commit = CommitOffsets::new(Duration::from_millis(200));
        let produce = Produce::new(producer.clone(), output.clone(), commit);
        let encode = RunTask::new(encode, produce);
        let batch = Reduce::new(Totals::default, add, 500, Duration::from_millis(50), encode);
        Box::new(RunTask::new(parse, batch))
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let messages = arg("--messages", 200_000);
    let broker = LocalBroker::<Bytes>::new();
    let (input, output, dlq) = (
        Topic::new("events"),
        Topic::new("events-batched"),
        Topic::new("events-dlq"),
    );
    broker.create_topic(&input, INPUT_PARTITIONS);
    broker.create_topic(&output, 2);
    broker.create_topic(&dlq, 1);

    let mut invalid_produced = 0;
    for n in 0..messages {
        let partition = Partition::new(input.clone(), (n % u64::from(INPUT_PARTITIONS)) as u32);
        let payload = if n % 997 == 0 {
            invalid_produced += 1;
            b"{\"user\": oops".to_vec()
        } else {
            format!(r#"{{"user":{},"amount_cents":{}}}"#, n % 10_000, n % 500).into_bytes()
        };
        broker.produce_to(&partition, Bytes::from(payload))?;
    }
    println!(
        "produced {messages} events ({invalid_produced} malformed) to {input} ({INPUT_PARTITIONS} partitions)"
    );

    let started = Instant::now();
    let spawn_member = |name: &'static str| {
        let consumer = broker.subscribe(GROUP, std::slice::from_ref(&input));
        let producer = LocalProducer::new(broker.clone());
        let dlq_policy = DlqPolicy::new(DlqTopic::new(producer.clone(), dlq.clone()));
        let mut processor =
            StreamProcessor::new(consumer, pipeline(producer, output.clone())).with_dlq(dlq_policy);
        let handle = processor.handle();
        let thread =
            std::thread::spawn(move || -> Result<(&'static str, ProcessorStats), String> {
                processor.run().map_err(|e| format!("{name}: {e}"))?;
                Ok((name, processor.stats()))
            });
        (handle, thread)
    };
    let first = spawn_member("member-1");
    // Let the first member get going, then join a second: a rebalance mid-stream.
    while broker
        .committed(GROUP, &Partition::new(input.clone(), 0))
        .is_none()
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let second = spawn_member("member-2");

    let partitions = broker.partitions(&input);
    let per_partition = |p: &Partition| {
        messages / u64::from(INPUT_PARTITIONS)
            + u64::from(u64::from(p.index()) < messages % u64::from(INPUT_PARTITIONS))
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while !partitions
        .iter()
        .all(|p| broker.committed(GROUP, p) == Some(per_partition(p)))
    {
        if Instant::now() > deadline {
            return Err("the pipeline did not commit everything within 5 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let elapsed = started.elapsed();
    for (handle, _) in [&first, &second] {
        handle.signal_shutdown();
    }
    let mut stats = Vec::new();
    for (_, thread) in [first, second] {
        stats.push(thread.join().map_err(|_| "a member panicked")??);
    }

    let batches: Vec<Bytes> = broker
        .partitions(&output)
        .iter()
        .flat_map(|p| broker.payloads(p))
        .collect();
    let events_out: u64 = batches
        .iter()
        .filter_map(|b| sonic_rs::from_slice::<sonic_rs::Value>(b).ok())
        .filter_map(|v| sonic_rs::JsonValueTrait::as_u64(&v["events"]))
        .sum();
    let dead_lettered = broker.payloads(&Partition::new(dlq.clone(), 0)).len();

    println!();
    println!("pipeline: parse JSON -> batch (500 / 50 ms) -> encode -> produce -> commit");
    println!(
        "{:<10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>11}",
        "member", "polled", "accepted", "invalid", "dlq", "commits", "rebalances"
    );
    for (name, s) in &stats {
        println!(
            "{name:<10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>11}",
            s.messages_polled,
            s.messages_submitted,
            s.invalid_messages,
            s.dead_lettered,
            s.commits,
            s.rebalances
        );
    }
    println!();
    println!("events in:            {messages}");
    println!(
        "events out (batched): {events_out} in {} batches on {output}",
        batches.len()
    );
    println!("dead-lettered:        {dead_lettered} on {dlq}");
    println!("committed offsets:");
    for partition in &partitions {
        println!(
            "  {partition}: {}",
            broker.committed(GROUP, partition).unwrap_or(0)
        );
    }
    let rate = messages as f64 / elapsed.as_secs_f64();
    println!(
        "throughput:           {rate:.0} messages/s ({:.2} s, two members)",
        elapsed.as_secs_f64()
    );

    let expected_out = messages - invalid_produced;
    if events_out < expected_out || dead_lettered < invalid_produced as usize {
        return Err(format!("lost data: {events_out} of {expected_out} events out, {dead_lettered} of {invalid_produced} dead-lettered").into());
    }
    println!("check: every valid event is in a delivered batch, every malformed one in the DLQ");
    Ok(())
}
