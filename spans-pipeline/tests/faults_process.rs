//! Consumer process faults: the `spans-pipeline run` binary killed with `SIGKILL` in the middle
//! of a stream and started again, and a rebalance (a second consumer joining, then leaving)
//! while flushes are in progress.
//!
//! Delivery is at least once, so a crash may duplicate spans, but only inside a known window:
//! spans past the group's last committed offset (read again after the restart) and spans of
//! segments that were produced but not yet cleaned out of Redis (flushed again). The kill test
//! computes that window at the moment of the kill and checks every duplicate against it. A
//! graceful rebalance may duplicate only what was produced while it was under way (a commit
//! the group refused meanwhile), and never splits a segment: each comes out whole in one
//! message.

#![allow(clippy::unwrap_used)]

#[path = "support/process.rs"]
mod process;
#[path = "support/consumer.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::{RedisMode, RedisServer, TestRedis};
use process::{RunProcess, run_command};
use rill::backends::kafka::{KafkaPayload, KafkaProducer, KafkaProducerConfig};
use rill::{DeliveryFuture, Destination, ProduceError, Producer};
use sonic_rs::JsonValueTrait;
use spans_pipeline::buffer::keys;
use support::{
    ConsumerSetup, INPUT, OUTPUT, Traces, assert_all_flushed, assert_none_reported_lost,
    output_span_counts, output_spans, runtime, wait_until, wait_until_drained,
};

const PARTITIONS: i32 = 2;

/// Spans per trace in these tests: a root and four children.
const CHILDREN: u64 = 4;

/// The root span id of the trace a span of [`Traces::new`] belongs to (span ids are
/// `trace * 1000 + n` in hex).
fn root_of(span_id: &str) -> String {
    let span = u64::from_str_radix(span_id, 16).unwrap();
    format!("{:016x}", span / 1000 * 1000)
}

/// Starts `spans-pipeline run` on `kafka` and `redis` with the configuration at `config`.
fn start_binary(config: &Path, kafka: &MockKafka, redis: &RedisServer) -> RunProcess {
    RunProcess::start(
        run_command(config, kafka.bootstrap_servers())
            .args(["--redis-url", &redis.url()])
            .env("RUST_LOG", "error"),
    )
}

/// A fast consumer: small batches, commits every 200 ms, short segment timeouts, and flush
/// locks that a killed worker leaves behind for 3 s only.
fn write_config(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    write!(
        file,
        r#"
[kafka]
consumer_overrides = {{ "session.timeout.ms" = "1500", "heartbeat.interval.ms" = "500" }}

[consumer]
max_batch_size = 100
max_batch_time = "50ms"
commit_interval = "200ms"

[flusher]
idle_sleep = "50ms"

[buffer]
root_timeout = "1s"
timeout = "2s"
flush_lock_ttl = "3s"
"#
    )
    .unwrap();
}

/// Produces traces `next..next + count` and adds them to `all`.
fn produce_wave(kafka: &MockKafka, all: &mut Traces, next: &mut u64, count: u64) {
    let wave = Traces::new(*next, count, CHILDREN, PARTITIONS);
    wave.produce(kafka);
    all.extend(wave);
    *next += count;
}

/// Root span ids of the segments queued for flushing in `redis` (including those produced
/// but not yet cleaned up).
fn queued_roots(redis: &RedisServer) -> BTreeSet<String> {
    let mut conn = redis.connection();
    let mut roots = BTreeSet::new();
    for shard in 0..u16::try_from(PARTITIONS).unwrap() {
        let segments: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys::queue(None, shard))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .unwrap();
        roots.extend(
            segments
                .iter()
                .filter_map(|key| key.rsplit(':').next().map(str::to_owned)),
        );
    }
    roots
}

#[test]
fn a_consumer_killed_mid_stream_and_restarted_flushes_every_span_duplicating_only_its_window() {
    let kafka = support::kafka(PARTITIONS);
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spans.toml");
    write_config(&config);
    let mut all = Traces::default();
    let mut next = 0;

    let mut child = start_binary(&config, &kafka, &redis);
    // Stream until spans have been committed and segments flushed, then kill it right after
    // a wave, while that wave is being ingested.
    let streaming = Instant::now();
    while streaming.elapsed() < Duration::from_secs(3)
        || support::committed(&kafka, PARTITIONS)
            .iter()
            .any(Option::is_none)
    {
        produce_wave(&kafka, &mut all, &mut next, 10);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            streaming.elapsed() < support::WAIT,
            "the consumer never committed"
        );
    }
    produce_wave(&kafka, &mut all, &mut next, 10);
    child.kill();
    let produced_at_kill = all.per_partition(PARTITIONS);
    let committed_at_kill: Vec<i64> = support::committed(&kafka, PARTITIONS)
        .into_iter()
        .map(Option::unwrap_or_default)
        .collect();
    let queued_at_kill = queued_roots(&redis);
    let flushed_before_kill = kafka.read_all(OUTPUT, support::WAIT).unwrap().len();

    // The stream goes on while the consumer is down and after it is back.
    for _ in 0..10 {
        produce_wave(&kafka, &mut all, &mut next, 10);
    }
    let mut child = start_binary(&config, &kafka, &redis);
    for _ in 0..10 {
        produce_wave(&kafka, &mut all, &mut next, 10);
        std::thread::sleep(Duration::from_millis(50));
    }
    let drained = TestRedis::Standalone(redis);
    wait_until_drained(&kafka, &drained, &all.per_partition(PARTITIONS));
    let status = child.stop();
    assert!(status.success(), "{status}");

    // The at-least-once window at the kill: spans produced by then but at or past the
    // committed offset of their partition, and spans of segments still queued in Redis.
    let mut window = BTreeSet::new();
    for message in kafka.read_all(INPUT, support::WAIT).unwrap() {
        let partition = usize::try_from(message.partition).unwrap();
        let span: sonic_rs::Value =
            sonic_rs::from_slice(message.payload.as_deref().unwrap()).unwrap();
        let span_id = span.get("span_id").and_then(|id| id.as_str()).unwrap();
        let uncommitted =
            (committed_at_kill[partition]..produced_at_kill[partition]).contains(&message.offset);
        if uncommitted || queued_at_kill.contains(&root_of(span_id)) {
            window.insert(span_id.to_owned());
        }
    }
    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &all.span_ids);
    assert_none_reported_lost(&kafka);
    let duplicated: BTreeMap<&String, &usize> =
        counts.iter().filter(|(_, count)| **count > 1).collect();
    let outside: Vec<&&String> = duplicated
        .keys()
        .filter(|span_id| !window.contains(**span_id))
        .collect();
    assert!(
        outside.is_empty(),
        "duplicated outside the at-least-once window: {outside:?}"
    );
    println!(
        "{} spans in, {} output messages before the kill; at-least-once window {} spans \
         (committed {committed_at_kill:?}, {} segments queued); {} spans flushed twice or more",
        all.span_ids.len(),
        flushed_before_kill,
        window.len(),
        queued_at_kill.len(),
        duplicated.len()
    );
}

/// The real Kafka producer, with every delivery reported `delay` late: flush workers spend
/// most of their time between produce and cleanup.
struct SlowProducer {
    inner: KafkaProducer,
    delay: Duration,
    sends: AtomicUsize,
}

impl Producer<KafkaPayload> for SlowProducer {
    fn produce(
        &self,
        destination: &Destination,
        payload: KafkaPayload,
    ) -> Result<DeliveryFuture, ProduceError<KafkaPayload>> {
        self.sends.fetch_add(1, Ordering::SeqCst);
        let delivery = self.inner.produce(destination, payload)?;
        let delay = self.delay;
        Ok(Box::pin(async move {
            tokio::time::sleep(delay).await;
            delivery.await
        }))
    }
}

#[test]
fn a_consumer_joining_and_leaving_during_slow_flushes_loses_nothing_and_splits_no_segment() {
    let kafka = support::kafka(PARTITIONS);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    let producer = Arc::new(SlowProducer {
        inner: KafkaProducer::new(
            &KafkaProducerConfig::new(kafka.bootstrap_servers()).with_override("linger.ms", "1"),
        )
        .unwrap(),
        delay: Duration::from_millis(300),
        sends: AtomicUsize::new(0),
    });
    let mut setup = ConsumerSetup {
        producer: Some(Arc::clone(&producer) as Arc<dyn Producer<KafkaPayload>>),
        ..ConsumerSetup::default()
    };
    // A trace's spans all arrive long before a segment without its root would time out, so
    // every segment is one whole trace unless a flush is cut in two.
    setup.config.buffer.timeout = Duration::from_secs(10);
    let mut all = Traces::default();
    let mut next = 0;
    produce_wave(&kafka, &mut all, &mut next, 20);

    let first = setup.start(&kafka, &redis, &runtime);
    wait_until("the first flush is under way", || {
        producer.sends.load(Ordering::SeqCst) > 0
    });
    let rebalances_from = next;
    let second = setup.start(&kafka, &redis, &runtime);
    wait_until("both consumers share the partitions", || {
        let shared = first.assignment().len() == 1 && second.assignment().len() == 1;
        if !shared {
            produce_wave(&kafka, &mut all, &mut next, 2);
        }
        shared
    });
    // The second one leaves while the flushes of its partition are in progress.
    produce_wave(&kafka, &mut all, &mut next, 20);
    let sends = producer.sends.load(Ordering::SeqCst);
    wait_until("a flush of the shared period is under way", || {
        producer.sends.load(Ordering::SeqCst) > sends
    });
    second.stop();
    wait_until("the first consumer takes everything back", || {
        let whole = first.assignment().len() == 2;
        if !whole {
            produce_wave(&kafka, &mut all, &mut next, 2);
        }
        whole
    });
    let rebalances = rebalances_from..next;
    produce_wave(&kafka, &mut all, &mut next, 20);
    wait_until_drained(&kafka, &redis, &all.per_partition(PARTITIONS));
    first.stop();

    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &all.span_ids);
    assert_none_reported_lost(&kafka);
    // A commit refused while the group rebalances can leave spans that were already flushed
    // to be read again by the next owner: whole segments flushed twice, and only of traces
    // produced while the rebalances were under way.
    let duplicated: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    let outside: Vec<_> = duplicated
        .iter()
        .filter(|(span_id, _)| {
            !rebalances.contains(&(u64::from_str_radix(span_id, 16).unwrap() / 1000))
        })
        .collect();
    assert!(
        outside.is_empty(),
        "flushed twice outside the rebalances: {outside:?}"
    );
    println!(
        "{} spans in, {} flushed twice (traces {rebalances:?} produced during the rebalances)",
        all.span_ids.len(),
        duplicated.len()
    );
    // Every segment comes out whole. A read again after a refused commit may hold only part
    // of a trace (the batch with its children was read again, the one with its root was not):
    // such a part repeats spans that also came out in a whole segment, and only for a trace
    // produced during the rebalances.
    let mut whole_segments = BTreeSet::new();
    let mut parts = Vec::new();
    for message in kafka.read_all(OUTPUT, support::WAIT).unwrap() {
        let mut segments: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for span in output_spans(&message) {
            segments
                .entry(span.segment_id)
                .or_default()
                .insert(span.span_id);
        }
        for (segment, spans) in segments {
            let whole: BTreeSet<String> = (0..=CHILDREN)
                .map(|child| {
                    format!(
                        "{:016x}",
                        u64::from_str_radix(&segment, 16).unwrap() + child
                    )
                })
                .collect();
            if spans == whole {
                whole_segments.insert(segment);
            } else {
                parts.push((segment, spans));
            }
        }
    }
    for (segment, spans) in parts {
        let trace = u64::from_str_radix(&segment, 16).unwrap() / 1000;
        assert!(
            rebalances.contains(&trace) && whole_segments.contains(&segment),
            "segment {segment} flushed in parts: {spans:?}"
        );
    }
}
