//! Whole pipelines on the Kafka backend and librdkafka's mock cluster: consume → transform →
//! produce → commit, dead letters with their origin, consumer groups whose members join and
//! leave mid-stream (eager and cooperative), backpressure, and broker faults.
//!
//! Every input value is a decimal number; the transform writes `"<partition>:<offset>:<value>"`
//! to the output topic, keyed by the input partition (so each input partition's output keeps
//! its order in one output partition). Anything else is invalid and goes to the dead-letter
//! topic. Waits are bounded and wait on conditions (committed offsets), never fixed sleeps.

// Helpers shared by the tests below fail the test the same way the tests do.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration_tests::kafka::{MockKafka, RecordedMessage};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rill::backends::kafka::{
    INVALID_REASON_HEADER, KafkaConsumer, KafkaConsumerConfig, KafkaDlqProducer, KafkaPayload,
    KafkaProducer, KafkaProducerConfig, ORIGINAL_OFFSET_HEADER, ORIGINAL_PARTITION_HEADER,
    ORIGINAL_TOPIC_HEADER, RebalanceProtocol,
};
use rill::dlq::DlqPolicy;
use rill::processor::{ProcessorConfig, ProcessorHandle, RunError, StreamProcessor};
use rill::steps::{CommitOffsets, Produce, RunTask};
use rill::{
    InvalidMessage, Message, Partition, ProcessingStrategy, StrategyError, SubmitError, Topic,
};

const WAIT: Duration = Duration::from_secs(60);
const INPUT: &str = "numbers";
const OUTPUT: &str = "labelled";
const DLQ: &str = "dead-letters";
/// How long the broker-outage test keeps its broker down.
const BROKER_OUTAGE: Duration = Duration::from_secs(2);

/// Turns `value` at `partition`/`offset` into its labelled form; non-numbers are invalid.
fn label(
    message: Message<KafkaPayload>,
) -> Result<Message<KafkaPayload>, SubmitError<KafkaPayload>> {
    let partition = message.partition().map_or(0, Partition::index);
    let offset = message.offset().unwrap_or_default();
    let value = message.payload().value().unwrap_or_default();
    match std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
    {
        Some(number) => {
            let labelled = format!("{partition}:{offset}:{number}").into_bytes();
            Ok(message.map(|_| {
                KafkaPayload::new(Some(partition.to_string().into_bytes()), Some(labelled))
            }))
        }
        None => Err(InvalidMessage::of(&message, "value is not a decimal number").into()),
    }
}

/// A step in front of the pipeline that rejects everything while `blocked` is set.
struct Gate<N> {
    blocked: Arc<AtomicBool>,
    next_step: N,
}

impl<N: ProcessingStrategy<KafkaPayload>> ProcessingStrategy<KafkaPayload> for Gate<N> {
    fn poll(&mut self) -> Result<Option<rill::CommitRequest>, StrategyError> {
        self.next_step.poll()
    }

    fn submit(&mut self, message: Message<KafkaPayload>) -> Result<(), SubmitError<KafkaPayload>> {
        if self.blocked.load(Ordering::SeqCst) {
            return Err(SubmitError::MessageRejected(message));
        }
        self.next_step.submit(message)
    }

    fn join(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<rill::CommitRequest>, StrategyError> {
        self.next_step.join(deadline)
    }

    fn close(&mut self) {
        self.next_step.close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        self.next_step.partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        self.next_step.terminate();
    }
}

/// One member of the group, running on its own thread.
struct Member {
    handle: ProcessorHandle,
    thread: JoinHandle<Result<u64, RunError>>,
    /// Pipelines its factory built.
    builds: Arc<AtomicU64>,
}

impl Member {
    /// Asks for a graceful stop and returns the member's pause count.
    fn stop(self) -> u64 {
        self.handle.signal_shutdown();
        self.thread.join().unwrap().unwrap()
    }
}

struct Setup {
    kafka: MockKafka,
    producer: Arc<KafkaProducer>,
    gate: Arc<AtomicBool>,
}

impl Setup {
    fn new(brokers: u32, partitions: i32) -> Self {
        let kafka = MockKafka::start(brokers).unwrap();
        kafka.create_topic(INPUT, partitions).unwrap();
        kafka.create_topic(OUTPUT, partitions).unwrap();
        kafka.create_topic(DLQ, 1).unwrap();
        let producer = Arc::new(
            KafkaProducer::new(
                &KafkaProducerConfig::new(kafka.bootstrap_servers())
                    .with_override("linger.ms", "2")
                    .with_override("log_level", "3"),
            )
            .unwrap(),
        );
        Self {
            kafka,
            producer,
            gate: Arc::new(AtomicBool::new(false)),
        }
    }

    fn start_member(&self, protocol: RebalanceProtocol) -> Member {
        let config = KafkaConsumerConfig::new(self.kafka.bootstrap_servers(), "labellers")
            .with_rebalance_protocol(protocol)
            .with_override("session.timeout.ms", "1500")
            .with_override("heartbeat.interval.ms", "500")
            .with_override("log_level", "3");
        let consumer = KafkaConsumer::subscribe(&config, &[INPUT]).unwrap();
        let producer = Arc::clone(&self.producer);
        let gate = Arc::clone(&self.gate);
        let builds = Arc::new(AtomicU64::new(0));
        let built = Arc::clone(&builds);
        let factory = move |_: &[Partition]| -> Box<dyn ProcessingStrategy<KafkaPayload> + Send> {
            built.fetch_add(1, Ordering::SeqCst);
            Box::new(Gate {
                blocked: Arc::clone(&gate),
                next_step: RunTask::new(
                    label,
                    Produce::new(
                        Arc::clone(&producer),
                        Topic::new(OUTPUT),
                        CommitOffsets::new(Duration::from_millis(50)),
                    ),
                ),
            })
        };
        let dlq = DlqPolicy::new(KafkaDlqProducer::new(
            Arc::clone(&self.producer),
            Topic::new(DLQ),
        ));
        let mut processor = StreamProcessor::new(consumer, factory)
            .with_config(
                ProcessorConfig::default()
                    .with_poll_timeout(Duration::from_millis(20))
                    .with_backpressure_grace(Duration::from_millis(300))
                    .with_join_timeout(Duration::from_secs(10)),
            )
            .with_dlq(dlq);
        let handle = processor.handle();
        let thread = std::thread::spawn(move || {
            processor.run()?;
            Ok(processor.stats().pauses)
        });
        Member {
            handle,
            thread,
            builds,
        }
    }

    /// Produces `values` round-robin over `partitions` input partitions.
    fn produce(&self, values: &[String], partitions: i32) {
        self.kafka
            .produce(INPUT, values.iter().map(String::as_bytes), |index| {
                (index % partitions as usize) as i32
            })
            .unwrap();
    }

    /// Waits until the group committed everything produced to the input topic.
    fn wait_until_committed(&self, expected: &[i64]) {
        self.kafka
            .wait_until_committed("labellers", INPUT, expected, WAIT)
            .unwrap();
    }

    /// Everything in `topic` now, duplicates included.
    fn read_all(&self, topic: &str) -> Vec<RecordedMessage> {
        self.kafka.read_all(topic, WAIT).unwrap()
    }
}

/// Asserts every value in `expected` came out, naming the missing ones (not both whole sets).
fn assert_all_seen(labelled: &[(u32, u64, u64)], expected: impl IntoIterator<Item = u64>) {
    let seen: BTreeSet<u64> = labelled.iter().map(|(_, _, value)| *value).collect();
    let missing: Vec<u64> = expected
        .into_iter()
        .filter(|value| !seen.contains(value))
        .collect();
    assert!(
        missing.is_empty(),
        "{} values lost: {missing:?}",
        missing.len()
    );
}

fn numbers(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|n| n.to_string()).collect()
}

/// (input partition, input offset, value) of each labelled output message.
fn parse_output(messages: &[RecordedMessage]) -> Vec<(u32, u64, u64)> {
    messages
        .iter()
        .map(|message| {
            let text = String::from_utf8(message.payload.clone().unwrap()).unwrap();
            let mut parts = text.split(':').map(|part| part.parse::<u64>().unwrap());
            let (partition, offset, value) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap(),
            );
            (u32::try_from(partition).unwrap(), offset, value)
        })
        .collect()
}

/// Per input partition, output must follow input order: each message continues the previous
/// one (offset + 1, skipping dead-lettered offsets) or starts a replay from an earlier offset
/// (at-least-once after a rebalance).
fn assert_order_kept(
    outputs: &[(u32, u64, u64)],
    messages: &[RecordedMessage],
    dead_lettered: &BTreeSet<(u32, u64)>,
) {
    let mut by_output: BTreeMap<(i32, u32), Vec<(i64, u64)>> = BTreeMap::new();
    for (message, (partition, offset, _)) in messages.iter().zip(outputs) {
        by_output
            .entry((message.partition, *partition))
            .or_default()
            .push((message.offset, *offset));
    }
    for ((_, input), mut sequence) in by_output {
        sequence.sort_unstable();
        for pair in sequence.windows(2) {
            let (previous, next) = (pair[0].1, pair[1].1);
            let skipped_only_dead_letters =
                (previous + 1..next).all(|offset| dead_lettered.contains(&(input, offset)));
            assert!(
                next <= previous || skipped_only_dead_letters,
                "input partition {input}: offset {next} followed {previous} (a gap)"
            );
        }
    }
}

#[test]
fn consume_transform_produce_commit_with_dead_letters() {
    let setup = Setup::new(1, 4);
    let mut values = numbers(0..200);
    values[17] = "seventeen".to_owned();
    values[130] = "x".to_owned();
    setup.produce(&values, 4);
    let member = setup.start_member(RebalanceProtocol::Cooperative);

    setup.wait_until_committed(&[50, 50, 50, 50]);
    member.stop();

    let output = setup.read_all(OUTPUT);
    let labelled = parse_output(&output);
    assert_all_seen(&labelled, (0..200).filter(|n| *n != 17 && *n != 130));
    assert_eq!(
        labelled.len(),
        198,
        "one member, no rebalance: no duplicates"
    );
    assert_order_kept(&labelled, &output, &BTreeSet::from([(1, 4), (2, 32)]));

    let mut dead = setup.read_all(DLQ);
    assert_eq!(dead.len(), 2);
    dead.sort_by_key(|message| message.payload.clone());
    let header = |message: &RecordedMessage, name: &str| {
        message
            .headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| String::from_utf8(value.clone()).unwrap())
    };
    assert_eq!(dead[0].payload.as_deref(), Some(&b"seventeen"[..]));
    assert_eq!(
        header(&dead[0], ORIGINAL_TOPIC_HEADER).as_deref(),
        Some(INPUT)
    );
    assert_eq!(
        header(&dead[0], ORIGINAL_PARTITION_HEADER).as_deref(),
        Some("1")
    );
    assert_eq!(
        header(&dead[0], ORIGINAL_OFFSET_HEADER).as_deref(),
        Some("4")
    );
    assert!(
        header(&dead[0], INVALID_REASON_HEADER)
            .unwrap()
            .contains("decimal")
    );
    assert_eq!(dead[1].payload.as_deref(), Some(&b"x"[..]));
    assert_eq!(
        header(&dead[1], ORIGINAL_PARTITION_HEADER).as_deref(),
        Some("2")
    );
    assert_eq!(
        header(&dead[1], ORIGINAL_OFFSET_HEADER).as_deref(),
        Some("32")
    );
}

/// Three members join and leave while messages keep coming; every message comes out at least
/// once and each input partition's order is kept. With the cooperative protocol, no member
/// builds its pipeline more than once.
fn members_join_and_leave(protocol: RebalanceProtocol) {
    let setup = Setup::new(1, 6);
    setup.produce(&numbers(0..600), 6);
    let first = setup.start_member(protocol);
    let second = setup.start_member(protocol);
    setup.produce(&numbers(600..1200), 6);
    let third = setup.start_member(protocol);
    let mut builds = vec![first.builds.load(Ordering::SeqCst)];
    first.stop();
    setup.produce(&numbers(1200..1800), 6);

    setup.wait_until_committed(&[300; 6]);
    builds.extend([&second, &third].map(|member| member.builds.load(Ordering::SeqCst)));
    second.stop();
    third.stop();
    if protocol == RebalanceProtocol::Cooperative {
        // Incremental rebalancing: a member's pipeline runs through every rebalance.
        assert!(
            builds.iter().all(|&count| count <= 1),
            "pipelines rebuilt: {builds:?}"
        );
    }

    let output = setup.read_all(OUTPUT);
    let labelled = parse_output(&output);
    assert_all_seen(&labelled, 0..1800);
    assert_order_kept(&labelled, &output, &BTreeSet::new());
}

#[test]
fn cooperative_group_loses_nothing_as_members_come_and_go() {
    members_join_and_leave(RebalanceProtocol::Cooperative);
}

#[test]
fn eager_group_loses_nothing_as_members_come_and_go() {
    members_join_and_leave(RebalanceProtocol::Eager);
}

#[test]
fn sustained_backpressure_pauses_consumption_until_released() {
    let setup = Setup::new(1, 2);
    setup.gate.store(true, Ordering::SeqCst);
    setup.produce(&numbers(0..100), 2);
    let member = setup.start_member(RebalanceProtocol::Cooperative);

    // Nothing passes the closed gate, so nothing is committed; give the grace period time to
    // run out, then open the gate and everything must flow.
    let closed_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < closed_until {
        let committed = setup
            .kafka
            .committed_offsets("labellers", INPUT, 2)
            .unwrap();
        assert_eq!(committed, [None, None]);
        std::thread::sleep(Duration::from_millis(100));
    }
    setup.gate.store(false, Ordering::SeqCst);
    setup.wait_until_committed(&[50, 50]);
    let pauses = member.stop();

    assert!(pauses >= 1, "the member never paused");
    assert_eq!(setup.read_all(OUTPUT).len(), 100);
}

#[test]
fn broker_errors_and_a_broker_restart_are_survived() {
    let setup = Setup::new(1, 2);
    setup.produce(&numbers(0..100), 2);
    let member = setup.start_member(RebalanceProtocol::Cooperative);
    setup.wait_until_committed(&[50, 50]);

    // Commits and produces fail for a while with retriable errors, then the only broker goes
    // away and comes back; the member must ride it out and lose nothing.
    setup
        .kafka
        .inject_request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
        )
        .unwrap();
    setup
        .kafka
        .inject_request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
        )
        .unwrap();
    setup.produce(&numbers(100..200), 2);
    setup.wait_until_committed(&[100, 100]);

    setup.kafka.broker_down(1).unwrap();
    // The fault itself: the broker stays down this long.
    std::thread::sleep(BROKER_OUTAGE);
    setup.kafka.broker_up(1).unwrap();
    setup.produce(&numbers(200..300), 2);
    setup.wait_until_committed(&[150, 150]);
    member.stop();

    let labelled = parse_output(&setup.read_all(OUTPUT));
    assert_all_seen(&labelled, 0..300);
}
