//! Several consumers of one group over the same Redis: a second consumer joining mid-stream
//! and leaving again (two rebalances), and a consumer stopped and replaced by a new one. The
//! spans of a revoked partition stay in its Redis queue for the next owner, so every span is
//! flushed at least once and none is lost.

#![allow(clippy::unwrap_used)]

#[path = "support/consumer.rs"]
mod support;

use integration_tests::redis_server::{RedisMode, TestRedis};
use support::{
    ConsumerSetup, Traces, assert_all_flushed, committed, output_span_counts, runtime, wait_until,
    wait_until_drained,
};

const PARTITIONS: i32 = 4;

/// Sums of the per-partition message counts of `phases`.
fn offsets(phases: &[&Traces]) -> Vec<i64> {
    phases.iter().fold(
        vec![0; PARTITIONS.unsigned_abs() as usize],
        |sums, phase| {
            sums.iter()
                .zip(phase.per_partition(PARTITIONS))
                .map(|(sum, count)| sum + count)
                .collect()
        },
    )
}

fn none_lost_when_a_second_consumer_joins_and_leaves(mode: RedisMode) {
    let kafka = support::kafka(PARTITIONS);
    let redis = TestRedis::start(mode);
    redis.flush_all();
    let runtime = runtime();
    // Two flush workers per consumer: the partitions are spread over them.
    let mut setup = ConsumerSetup::default();
    setup.config.flusher.workers = 2;
    let before = Traces::new(0, 40, 4, PARTITIONS);
    let during = Traces::new(40, 40, 4, PARTITIONS);
    let after = Traces::new(80, 40, 4, PARTITIONS);

    before.produce(&kafka);
    let first = setup.start(&kafka, &redis, &runtime);
    wait_until("the first consumer commits", || {
        committed(&kafka, PARTITIONS).iter().any(Option::is_some)
    });
    let second = setup.start(&kafka, &redis, &runtime);
    wait_until("both consumers share the partitions", || {
        let (one, two) = (first.assignment().len(), second.assignment().len());
        one > 0 && two > 0 && one + two == 4
    });
    during.produce(&kafka);
    wait_until("the spans produced during the split are committed", || {
        committed(&kafka, PARTITIONS)
            == offsets(&[&before, &during])
                .into_iter()
                .map(Some)
                .collect::<Vec<_>>()
    });
    let second_stats = second.stop();
    after.produce(&kafka);
    wait_until_drained(&kafka, &redis, &offsets(&[&before, &during, &after]));
    assert_eq!(
        first.assignment().len(),
        4,
        "the first consumer took everything back"
    );
    let first_stats = first.stop();

    assert!(
        second_stats.messages_polled > 0,
        "the second consumer took part"
    );
    assert!(first_stats.rebalances >= 3, "{first_stats:?}");
    let mut expected = before.span_ids;
    expected.extend(during.span_ids);
    expected.extend(after.span_ids);
    assert_all_flushed(&output_span_counts(&kafka), &expected);
}

#[test]
fn none_lost_when_a_second_consumer_joins_and_leaves_on_standalone_redis() {
    none_lost_when_a_second_consumer_joins_and_leaves(RedisMode::Standalone);
}

#[test]
fn none_lost_when_a_second_consumer_joins_and_leaves_on_redis_cluster() {
    none_lost_when_a_second_consumer_joins_and_leaves(RedisMode::Cluster);
}

#[test]
fn none_lost_when_a_consumer_is_stopped_and_another_starts() {
    let kafka = support::kafka(PARTITIONS);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    let setup = ConsumerSetup::default();
    let before = Traces::new(0, 40, 4, PARTITIONS);
    let after = Traces::new(40, 40, 4, PARTITIONS);

    before.produce(&kafka);
    let first = setup.start(&kafka, &redis, &runtime);
    wait_until("the first consumer commits", || {
        committed(&kafka, PARTITIONS).iter().any(Option::is_some)
    });
    // Stopped mid-stream: whatever it wrote to Redis but did not flush yet stays queued.
    first.stop();
    after.produce(&kafka);
    let second = setup.start(&kafka, &redis, &runtime);
    wait_until_drained(&kafka, &redis, &offsets(&[&before, &after]));
    let stats = second.stop();

    assert!(stats.messages_polled > 0);
    let mut expected = before.span_ids;
    expected.extend(after.span_ids);
    assert_all_flushed(&output_span_counts(&kafka), &expected);
}
