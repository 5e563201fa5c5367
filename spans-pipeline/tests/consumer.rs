//! The whole consumer end to end: spans produced to a Kafka topic (librdkafka's mock cluster)
//! go through decode → batch → ProcessSpans → FlushSegments → CommitOffsets on a real Redis
//! (standalone and cluster) and come out of the output topic as segments; an invalid message
//! lands on the dead-letter topic while the pipeline keeps going; Redis is empty afterwards.

#![allow(clippy::unwrap_used)]

#[path = "support/consumer.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use integration_tests::redis_server::{RedisMode, TestRedis};
use support::{
    ConsumerSetup, DLQ, INPUT, OUTPUT, WAIT, id, runtime, segments, span, wait_until,
    wait_until_drained,
};

fn spans_in_segments_out(mode: RedisMode) {
    let kafka = support::kafka(2);
    let redis = TestRedis::start(mode);
    redis.flush_all();
    let runtime = runtime();
    let trace_one = "1".repeat(32);
    let trace_two = "2".repeat(32);
    // Trace one on partition 0, children before their root; trace two on partition 1 with a
    // garbage message between its spans.
    let partition_zero = [
        span(&trace_one, &id('c'), Some(&id('b')), 1),
        span(&trace_one, &id('b'), Some(&id('a')), 1),
        span(&trace_one, &id('a'), None, 1),
    ];
    let partition_one = [
        span(&trace_two, &id('y'), Some(&id('x')), 2),
        "this is not a span".to_owned(),
        span(&trace_two, &id('x'), None, 2),
    ];
    kafka
        .produce(INPUT, partition_zero.iter().map(String::as_bytes), |_| 0)
        .unwrap();
    kafka
        .produce(INPUT, partition_one.iter().map(String::as_bytes), |_| 1)
        .unwrap();

    let consumer = ConsumerSetup::default().start(&kafka, &redis, &runtime);
    let output = kafka.read_topic(OUTPUT, 2, WAIT).unwrap();
    wait_until_drained(&kafka, &redis, &[3, 3]);
    consumer.stop();

    let segments = segments(&output);
    assert_eq!(
        segments.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([id('a'), id('x')])
    );
    assert_eq!(
        segments[&id('a')],
        BTreeMap::from([(id('a'), true), (id('b'), false), (id('c'), false)])
    );
    assert_eq!(
        segments[&id('x')],
        BTreeMap::from([(id('x'), true), (id('y'), false)])
    );
    let dead = kafka.read_all(DLQ, WAIT).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload.as_deref(), Some(&b"this is not a span"[..]));
}

#[test]
fn spans_in_segments_out_on_standalone_redis() {
    spans_in_segments_out(RedisMode::Standalone);
}

#[test]
fn spans_in_segments_out_on_redis_cluster() {
    spans_in_segments_out(RedisMode::Cluster);
}

/// A write Redis refuses the same way at every retry (here `WRONGTYPE`: the trace's redirect
/// map is a string) stops the consumer with the error instead of retrying forever, and the
/// batch is not committed.
#[test]
fn a_write_refused_for_good_stops_the_consumer_without_committing_it() {
    let kafka = support::kafka(1);
    let redis = TestRedis::start(RedisMode::Standalone);
    redis.flush_all();
    let runtime = runtime();
    let trace = "3".repeat(32);
    let _: () = redis::cmd("SET")
        .arg(format!("span-buf:ssr:{{1:{trace}}}"))
        .arg("not a hash")
        .query(&mut redis.node_connections()[0])
        .unwrap();
    kafka
        .produce(
            INPUT,
            [span(&trace, &id('a'), None, 1)]
                .iter()
                .map(String::as_bytes),
            |_| 0,
        )
        .unwrap();

    let consumer = ConsumerSetup::default().start(&kafka, &redis, &runtime);
    let (result, _) = consumer.wait_for_exit();

    let error = format!("{:?}", result.unwrap_err());
    assert!(error.contains("WRONGTYPE"), "{error}");
    assert_eq!(support::committed(&kafka, 1), [None]);
}

/// How long the test below keeps Redis refusing new clients: a fault's duration, long
/// enough for the consumer's connections to retry and be refused several times.
const REFUSING_CLIENTS_FOR: Duration = Duration::from_secs(3);

/// A Redis that refuses new clients for a while (`ERR max number of clients reached`, a
/// condition that passes) holds the consumer back but does not stop it: once Redis takes
/// clients again, the spans written meanwhile come out and are committed.
#[test]
fn a_redis_refusing_new_clients_for_a_while_does_not_stop_the_consumer() {
    let kafka = support::kafka(1);
    let redis = TestRedis::start(RedisMode::Standalone);
    redis.flush_all();
    let runtime = runtime();
    let consumer = ConsumerSetup::default().start(&kafka, &redis, &runtime);
    let first = "4".repeat(32);
    kafka
        .produce(
            INPUT,
            [span(&first, &id('a'), None, 1)]
                .iter()
                .map(String::as_bytes),
            |_| 0,
        )
        .unwrap();
    wait_until_drained(&kafka, &redis, &[1]);

    // Only this test's own connection may stay; every connection of the consumer is cut and
    // each reconnect is refused until the limit is raised again.
    let server = &redis.servers()[0];
    let mut admin = server.connection();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(1)
        .query(&mut admin)
        .unwrap();
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query(&mut admin)
        .unwrap();
    let second = "5".repeat(32);
    kafka
        .produce(
            INPUT,
            [
                span(&second, &id('c'), Some(&id('b')), 1),
                span(&second, &id('b'), None, 1),
            ]
            .iter()
            .map(String::as_bytes),
            |_| 0,
        )
        .unwrap();
    let refusing_until = Instant::now() + REFUSING_CLIENTS_FOR;
    wait_until("Redis refused a client", || {
        let stats: String = redis::cmd("INFO").arg("stats").query(&mut admin).unwrap();
        !stats.contains("rejected_connections:0\r\n")
    });
    while Instant::now() < refusing_until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(10_000)
        .query(&mut admin)
        .unwrap();

    wait_until_drained(&kafka, &redis, &[3]);
    let output = kafka.read_topic(OUTPUT, 2, WAIT).unwrap();
    let segments = segments(&output);
    assert_eq!(
        segments.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([id('a'), id('b')])
    );
    // Still running: `stop` panics if the consumer had stopped with an error.
    consumer.stop();
}
