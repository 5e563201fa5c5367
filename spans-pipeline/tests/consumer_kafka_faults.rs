//! Kafka failing under the whole consumer: commits and produces refused with retriable errors,
//! then the only broker down for seconds while segments are due to flush. librdkafka's mock
//! cluster injects both. The consumer rides it out: commits and segment produces are retried,
//! nothing is given up (the outcomes topic stays empty), every span comes out, and Redis ends
//! empty.
//!
//! A commit that falls due while the broker is away is held by librdkafka for one session
//! timeout and then refused with its local "waiting for coordinator" error; the consumer retries
//! it instead of stopping (it used to stop with `CommitFailed`).
//!
//! Both faults make the member miss its group session (1.5 s in these tests), so the group
//! rebalances and the spans after the last successful commit are read again: at least once, the
//! duplicates counted. Spans that were committed and flushed before the first fault come out
//! exactly once.

#![allow(clippy::unwrap_used)]

#[path = "support/consumer.rs"]
mod support;

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::{RedisMode, TestRedis};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use support::{
    Consumer, ConsumerSetup, Traces, assert_all_flushed, committed, output_span_counts, runtime,
    wait_until, wait_until_drained,
};

const PARTITIONS: i32 = 2;
/// How long the broker stays down: longer than the consumer's session timeout and than the
/// buffer's timeouts, so commits, fetches and segment produces all fail meanwhile.
const BROKER_DOWN: Duration = Duration::from_secs(4);

/// Sums of the per-partition message counts of `phases`.
fn offsets(phases: &[&Traces]) -> Vec<i64> {
    let mut sums = vec![0; PARTITIONS.unsigned_abs() as usize];
    for phase in phases {
        for (sum, count) in sums.iter_mut().zip(phase.per_partition(PARTITIONS)) {
            *sum += count;
        }
    }
    sums
}

/// Waits until everything up to `offsets` is committed and flushed; if that never happens, fails
/// saying whether the consumer ended, and with which error, or is still running but stuck.
fn drained_or_say_why(
    consumer: Consumer,
    kafka: &MockKafka,
    redis: &TestRedis,
    offsets: &[i64],
) -> Consumer {
    let drained = std::panic::catch_unwind(AssertUnwindSafe(|| {
        wait_until_drained(kafka, redis, offsets);
    }));
    if drained.is_err() {
        let (result, stats) = consumer.wait_for_exit();
        panic!("not drained after the outage; the consumer ended with {result:?}, {stats:?}");
    }
    consumer
}

#[test]
fn request_errors_and_a_broker_down_and_back_lose_no_span() {
    let kafka = support::kafka(PARTITIONS);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    let setup = ConsumerSetup::default();
    let before = Traces::new(0, 20, 4, PARTITIONS);
    let during_errors = Traces::new(20, 20, 4, PARTITIONS);
    let while_down = Traces::new(40, 20, 4, PARTITIONS);

    before.produce(&kafka);
    let consumer = setup.start(&kafka, &redis, &runtime);
    wait_until_drained(&kafka, &redis, &offsets(&[&before]));

    // Retriable errors on the next commits and produces (the segments' and the test's own).
    kafka
        .inject_request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            ],
        )
        .unwrap();
    kafka
        .inject_request_errors(
            RDKafkaApiKey::Produce,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            ],
        )
        .unwrap();
    during_errors.produce(&kafka);
    wait_until("the spans produced during the errors are committed", || {
        committed(&kafka, PARTITIONS)
            == offsets(&[&before, &during_errors])
                .into_iter()
                .map(Some)
                .collect::<Vec<_>>()
    });

    // These spans are read before the broker goes away, and their segments come due while it
    // is away: the flusher's produces and the consumer's commits fail until it is back.
    while_down.produce(&kafka);
    wait_until("the new spans are in redis", || {
        !redis.keys_with_ttls().is_empty()
    });
    kafka.broker_down(1).unwrap();
    std::thread::sleep(BROKER_DOWN);
    kafka.broker_up(1).unwrap();

    let consumer = drained_or_say_why(
        consumer,
        &kafka,
        &redis,
        &offsets(&[&before, &during_errors, &while_down]),
    );
    // `stop` fails the test if the consumer had stopped with an error.
    let stats = consumer.stop();

    let counts = output_span_counts(&kafka);
    let duplicates: usize = counts.values().map(|count| count - 1).sum();
    println!(
        "{} spans out, {duplicates} of them more than once; {} rebalances, {} messages polled",
        counts.len(),
        stats.rebalances,
        stats.messages_polled
    );
    let duplicated_early: Vec<&String> = before
        .span_ids
        .iter()
        .filter(|span| counts.get(*span).is_some_and(|count| *count > 1))
        .collect();
    assert!(
        duplicated_early.is_empty(),
        "spans done before the faults came out again: {duplicated_early:?}"
    );
    let mut expected = before.span_ids;
    expected.extend(during_errors.span_ids);
    expected.extend(while_down.span_ids);
    assert_all_flushed(&counts, &expected);
    support::assert_none_reported_lost(&kafka);
}

#[test]
fn a_commit_due_while_the_broker_is_down_does_not_stop_the_consumer() {
    let kafka = support::kafka(PARTITIONS);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    let mut setup = ConsumerSetup::default();
    // The first commit comes due about 2 s after the spans are read: in the outage.
    setup.config.consumer.commit_interval = Duration::from_secs(2);
    let traces = Traces::new(0, 20, 4, PARTITIONS);
    traces.produce(&kafka);

    let consumer = setup.start(&kafka, &redis, &runtime);
    wait_until("the spans are in redis", || {
        !redis.keys_with_ttls().is_empty()
    });
    kafka.broker_down(1).unwrap();
    std::thread::sleep(BROKER_DOWN);
    kafka.broker_up(1).unwrap();

    let consumer = drained_or_say_why(consumer, &kafka, &redis, &offsets(&[&traces]));
    consumer.stop();
    assert_all_flushed(&output_span_counts(&kafka), &traces.span_ids);
}
