//! The Kafka backend against librdkafka's mock cluster: assignments and revocations as events
//! (eager and cooperative), confirmed commits, pause and resume, and delivery-confirmed
//! producing. Every wait is bounded and waits on a condition, never a fixed sleep.

// Helpers shared by the tests below fail the test the same way the tests do.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use integration_tests::kafka::MockKafka;
use rill::backends::kafka::{
    InitialOffset, KafkaConsumer, KafkaConsumerConfig, KafkaPayload, KafkaProducer,
    KafkaProducerConfig, RebalanceProtocol, TopicCheckError,
};
use rill::{
    Consumer, ConsumerError, ConsumerEvent, Destination, Partition, ProduceError, Producer, Topic,
};

const WAIT: Duration = Duration::from_secs(30);

/// What one consumer saw while being polled.
#[derive(Debug, Default)]
struct Seen {
    assigned: BTreeSet<u32>,
    revocations: Vec<Vec<u32>>,
    messages: Vec<(u32, u64, Vec<u8>)>,
}

/// Polls `consumer` once, completing revocations at once, and records what happened.
fn poll_once(consumer: &mut KafkaConsumer, seen: &mut Seen) -> Result<(), ConsumerError> {
    match consumer.poll(Duration::from_millis(20))? {
        Some(ConsumerEvent::Message(message)) => {
            let partition = message.partition().unwrap().index();
            let offset = message.offset().unwrap();
            let value = message.payload().value().unwrap_or_default().to_vec();
            seen.messages.push((partition, offset, value));
        }
        Some(ConsumerEvent::Assigned(starts)) => {
            seen.assigned.extend(starts.keys().map(Partition::index));
        }
        Some(ConsumerEvent::Revoked(partitions)) => {
            let mut indexes: Vec<u32> = partitions.iter().map(Partition::index).collect();
            indexes.sort_unstable();
            for index in &indexes {
                seen.assigned.remove(index);
            }
            seen.revocations.push(indexes);
            consumer.complete_revocation(&partitions)?;
        }
        None => {}
    }
    Ok(())
}

fn config(kafka: &MockKafka, group: &str) -> KafkaConsumerConfig {
    KafkaConsumerConfig::new(kafka.bootstrap_servers(), group)
        .with_override("session.timeout.ms", "1500")
        .with_override("heartbeat.interval.ms", "500")
        .with_override("log_level", "3")
}

fn produce_numbers(kafka: &MockKafka, topic: &str, count: usize, partitions: i32) {
    let values: Vec<Vec<u8>> = (0..count).map(|n| n.to_string().into_bytes()).collect();
    kafka
        .produce(topic, values.iter().map(Vec::as_slice), |index| {
            (index % partitions as usize) as i32
        })
        .unwrap();
}

fn partition(topic: &str, index: u32) -> Partition {
    Partition::new(Topic::new(topic), index)
}

#[test]
fn assignment_comes_before_messages_and_commits_are_confirmed() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("numbers", 2).unwrap();
    produce_numbers(&kafka, "numbers", 10, 2);
    let mut consumer = KafkaConsumer::subscribe(&config(&kafka, "g"), &["numbers"]).unwrap();
    let mut seen = Seen::default();

    let deadline = Instant::now() + WAIT;
    while seen.messages.len() < 10 {
        assert!(
            Instant::now() < deadline,
            "only {} messages",
            seen.messages.len()
        );
        let before = seen.assigned.len();
        poll_once(&mut consumer, &mut seen).unwrap();
        if seen.messages.is_empty() {
            assert_eq!(
                before,
                seen.assigned.len().min(before),
                "assignment changed oddly"
            );
        }
    }
    let commit = HashMap::from([(partition("numbers", 0), 5), (partition("numbers", 1), 3)]);
    consumer.commit(&commit).unwrap();
    consumer.close().unwrap();
    drop(consumer);

    assert_eq!(seen.assigned, BTreeSet::from([0, 1]));
    assert_eq!(
        kafka.committed_offsets("g", "numbers", 2).unwrap(),
        [Some(5), Some(3)]
    );
}

#[test]
fn a_restarted_member_resumes_from_the_committed_offset() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("numbers", 1).unwrap();
    produce_numbers(&kafka, "numbers", 6, 1);
    let mut first = KafkaConsumer::subscribe(&config(&kafka, "g"), &["numbers"]).unwrap();
    let mut seen = Seen::default();
    let deadline = Instant::now() + WAIT;
    while seen.messages.len() < 6 {
        assert!(Instant::now() < deadline);
        poll_once(&mut first, &mut seen).unwrap();
    }
    first
        .commit(&HashMap::from([(partition("numbers", 0), 4)]))
        .unwrap();
    first.close().unwrap();
    drop(first);

    let mut second = KafkaConsumer::subscribe(&config(&kafka, "g"), &["numbers"]).unwrap();
    let mut again = Seen::default();
    let deadline = Instant::now() + WAIT;
    while again.messages.len() < 2 {
        assert!(Instant::now() < deadline);
        poll_once(&mut second, &mut again).unwrap();
    }

    let offsets: Vec<u64> = again
        .messages
        .iter()
        .map(|(_, offset, _)| *offset)
        .collect();
    assert_eq!(offsets, [4, 5]);
}

#[test]
fn initial_offset_error_names_the_partition_without_a_commit() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("numbers", 1).unwrap();
    let config = config(&kafka, "strict").with_initial_offset(InitialOffset::Error);
    let mut consumer = KafkaConsumer::subscribe(&config, &["numbers"]).unwrap();

    let deadline = Instant::now() + WAIT;
    let error = loop {
        assert!(Instant::now() < deadline, "no assignment");
        if let Err(error) = consumer.poll(Duration::from_millis(20)) {
            break error;
        }
    };

    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    assert!(message.contains("numbers/0"), "{message}");
}

/// Two members, `protocol`: the second joins, then leaves. Returns the first member (holding
/// every partition again) and what each saw.
fn join_and_leave(kafka: &MockKafka, protocol: RebalanceProtocol) -> (KafkaConsumer, Seen, Seen) {
    kafka.create_topic("numbers", 4).unwrap();
    produce_numbers(kafka, "numbers", 400, 4);
    let config = config(kafka, "pair").with_rebalance_protocol(protocol);
    let mut a = KafkaConsumer::subscribe(&config, &["numbers"]).unwrap();
    let mut seen_a = Seen::default();
    let deadline = Instant::now() + WAIT;
    while seen_a.assigned.len() < 4 {
        assert!(Instant::now() < deadline, "a never got all partitions");
        poll_once(&mut a, &mut seen_a).unwrap();
    }

    let mut b = KafkaConsumer::subscribe(&config, &["numbers"]).unwrap();
    let mut seen_b = Seen::default();
    let deadline = Instant::now() + WAIT;
    while seen_b.assigned.is_empty() || seen_a.assigned.len() + seen_b.assigned.len() != 4 {
        assert!(Instant::now() < deadline, "no split: {seen_a:?} {seen_b:?}");
        poll_once(&mut a, &mut seen_a).unwrap();
        poll_once(&mut b, &mut seen_b).unwrap();
    }
    assert!(seen_a.assigned.is_disjoint(&seen_b.assigned));

    b.close().unwrap();
    drop(b);
    let deadline = Instant::now() + WAIT;
    while seen_a.assigned.len() < 4 {
        assert!(Instant::now() < deadline, "a never got the partitions back");
        poll_once(&mut a, &mut seen_a).unwrap();
    }
    (a, seen_a, seen_b)
}

#[test]
fn eager_rebalance_revokes_everything_then_splits() {
    let kafka = MockKafka::start(1).unwrap();

    let (_a, a, b) = join_and_leave(&kafka, RebalanceProtocol::Eager);

    // Once when b joins and once when it leaves, `a` gives up everything; b's own partitions
    // are given up by `close`, which needs no revocation event.
    assert_eq!(a.revocations.first(), Some(&vec![0, 1, 2, 3]));
    assert!(a.revocations.len() >= 2, "{:?}", a.revocations);
    assert!(b.revocations.is_empty());
}

#[test]
fn cooperative_rebalance_revokes_only_what_moves() {
    let kafka = MockKafka::start(1).unwrap();

    let (_a, a, _b) = join_and_leave(&kafka, RebalanceProtocol::Cooperative);

    let first = a.revocations.first().unwrap();
    assert!(!first.is_empty() && first.len() < 4, "revoked {first:?}");
}

#[test]
fn every_message_is_seen_by_the_group_across_a_rebalance() {
    let kafka = MockKafka::start(1).unwrap();
    let (mut consumer, mut a, b) = join_and_leave(&kafka, RebalanceProtocol::Cooperative);

    // Nothing was committed, so `a` reads from the start again after the rebalance; together
    // the two members must see every message, whatever moved when.
    let mut values: BTreeSet<Vec<u8>> = BTreeSet::new();
    values.extend(b.messages.iter().map(|(_, _, value)| value.clone()));
    let deadline = Instant::now() + WAIT;
    loop {
        values.extend(a.messages.drain(..).map(|(_, _, value)| value));
        if values.len() == 400 {
            break;
        }
        assert!(Instant::now() < deadline, "saw {} of 400", values.len());
        poll_once(&mut consumer, &mut a).unwrap();
    }

    let expected: BTreeSet<Vec<u8>> = (0..400).map(|n: u32| n.to_string().into_bytes()).collect();
    assert_eq!(values, expected);
}

#[test]
fn paused_partitions_deliver_nothing_until_resumed() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("numbers", 1).unwrap();
    let mut consumer = KafkaConsumer::subscribe(&config(&kafka, "p"), &["numbers"]).unwrap();
    let mut seen = Seen::default();
    let deadline = Instant::now() + WAIT;
    while seen.assigned.is_empty() {
        assert!(Instant::now() < deadline);
        poll_once(&mut consumer, &mut seen).unwrap();
    }
    let numbers = partition("numbers", 0);
    consumer.pause(std::slice::from_ref(&numbers)).unwrap();
    produce_numbers(&kafka, "numbers", 20, 1);

    let quiet_until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < quiet_until {
        poll_once(&mut consumer, &mut seen).unwrap();
    }
    assert!(seen.messages.is_empty());

    consumer.resume(std::slice::from_ref(&numbers)).unwrap();
    let deadline = Instant::now() + WAIT;
    while seen.messages.len() < 20 {
        assert!(Instant::now() < deadline);
        poll_once(&mut consumer, &mut seen).unwrap();
    }
    assert_eq!(consumer.tell()[&numbers], 20);
}

#[test]
fn pausing_an_unassigned_partition_is_an_error() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("numbers", 1).unwrap();
    let mut consumer = KafkaConsumer::subscribe(&config(&kafka, "u"), &["numbers"]).unwrap();

    let result = consumer.pause(&[partition("numbers", 7)]);

    assert!(matches!(result, Err(ConsumerError::UnassignedPartition(_))));
}

#[test]
fn produced_messages_resolve_on_delivery_with_their_position() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("out", 3).unwrap();
    let producer = KafkaProducer::new(
        &KafkaProducerConfig::new(kafka.bootstrap_servers()).with_override("linger.ms", "1"),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let payload = KafkaPayload::new(Some(b"k".to_vec()), Some(b"v".to_vec()))
        .with_header("origin", b"test".to_vec());
    let delivery = producer
        .produce(&Destination::Partition(partition("out", 2)), payload)
        .unwrap();
    let delivered = runtime.block_on(delivery).unwrap();

    assert_eq!(delivered.partition, partition("out", 2));
    assert_eq!(delivered.offset, 0);
    let read = kafka.read_topic("out", 1, WAIT).unwrap();
    assert_eq!(read[0].payload.as_deref(), Some(&b"v"[..]));
    assert_eq!(read[0].headers, [("origin".to_owned(), b"test".to_vec())]);
}

#[test]
fn a_topic_check_counts_partitions_and_names_a_missing_topic() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("there", 3).unwrap();
    let strict = KafkaProducer::new(
        &KafkaProducerConfig::new(kafka.bootstrap_servers())
            .with_override("allow.auto.create.topics", "false"),
    )
    .unwrap();

    assert_eq!(strict.check_topic(&Topic::new("there"), WAIT).unwrap(), 3);
    let error = strict
        .check_topic(&Topic::new("missing"), WAIT)
        .unwrap_err();
    assert!(
        matches!(&error, TopicCheckError::Unknown { topic } if topic == "missing"),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "topic missing does not exist");

    // librdkafka's producer default lets a broker that auto-creates topics (the mock) create
    // it, as the first message to it would.
    let default = KafkaProducer::new(&KafkaProducerConfig::new(kafka.bootstrap_servers())).unwrap();
    let deadline = Instant::now() + WAIT;
    while default.check_topic(&Topic::new("created"), WAIT).is_err() {
        assert!(Instant::now() < deadline, "never auto-created");
    }
}

#[test]
fn a_full_queue_hands_the_payload_back() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("out", 1).unwrap();
    let producer = KafkaProducer::new(
        &KafkaProducerConfig::new(kafka.bootstrap_servers())
            .with_override("queue.buffering.max.messages", "1")
            .with_override("linger.ms", "10000"),
    )
    .unwrap();
    let destination = Destination::Topic(Topic::new("out"));

    let _first = producer
        .produce(&destination, KafkaPayload::new(None, Some(b"1".to_vec())))
        .unwrap();
    let second = producer.produce(&destination, KafkaPayload::new(None, Some(b"2".to_vec())));

    match second {
        Err(ProduceError::QueueFull(payload)) => assert_eq!(payload.value(), Some(&b"2"[..])),
        other => panic!("expected a full queue, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn closing_with_a_revocation_pending_does_not_hang() {
    let kafka = MockKafka::start(1).unwrap();
    kafka.create_topic("numbers", 4).unwrap();
    let config = config(&kafka, "pending").with_rebalance_protocol(RebalanceProtocol::Cooperative);
    let mut a = KafkaConsumer::subscribe(&config, &["numbers"]).unwrap();
    let mut seen = Seen::default();
    let deadline = Instant::now() + WAIT;
    while seen.assigned.len() < 4 {
        assert!(Instant::now() < deadline);
        poll_once(&mut a, &mut seen).unwrap();
    }
    // A second member makes the group take partitions away from `a`, which is not polled
    // again: the revocation is still pending inside librdkafka when `a` closes.
    let mut b = KafkaConsumer::subscribe(&config, &["numbers"]).unwrap();
    let mut seen_b = Seen::default();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        poll_once(&mut b, &mut seen_b).unwrap();
    }

    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        a.close().unwrap();
        drop(a);
        done.send(()).unwrap();
    });

    assert!(
        finished.recv_timeout(Duration::from_secs(30)).is_ok(),
        "closing and dropping the consumer hung"
    );
}
