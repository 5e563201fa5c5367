//! The flush workers' health and backpressure, end to end on the mock Kafka cluster and a real
//! Redis: a worker that dies or hangs is replaced and its segment still flushed, exactly once;
//! a worker that keeps dying fails the consumer; a flusher at its limit and a Redis above its
//! memory limit pause consumption, which resumes once they recover, and nothing is lost.
//!
//! The producer of flushed segments is a test double around the real Kafka producer that
//! panics, hangs or slows down; Redis is always real. The tests read process-wide metrics
//! through a debugging recorder, so they run one at a time.

#![allow(clippy::unwrap_used)]

#[path = "support/consumer.rs"]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::{RedisMode, TestRedis};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use rill::backends::kafka::{KafkaPayload, KafkaProducer, KafkaProducerConfig};
use rill::processor::RunError;
use rill::{DeliveryError, DeliveryFuture, Destination, ProduceError, Producer};
use spans_pipeline::consumer::FlushError;
use spans_pipeline::metrics as names;
use support::{
    ConsumerSetup, Traces, assert_all_flushed, committed, output_span_counts, runtime, wait_until,
    wait_until_drained,
};

/// What [`FaultyProducer`] does to its faulty sends.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Panics, as a bug in the produce path would.
    Panic,
    /// Returns a delivery that hangs for this long, then produces the message for real.
    WakeLate(Duration),
    /// Produces for real, but reports the delivery this much later.
    Slow(Duration),
    /// Blocks the calling thread this long (where an abort cannot reach it), then refuses the
    /// message.
    Block(Duration),
}

/// The real Kafka producer, except for the first `faulty_sends` sends.
struct FaultyProducer {
    inner: Arc<KafkaProducer>,
    fault: Fault,
    faulty_sends: usize,
    sends: AtomicUsize,
    first_send: Mutex<Option<Instant>>,
    woke: Arc<AtomicBool>,
}

impl FaultyProducer {
    fn new(kafka: &MockKafka, fault: Fault, faulty_sends: usize) -> Arc<Self> {
        let config =
            KafkaProducerConfig::new(kafka.bootstrap_servers()).with_override("linger.ms", "1");
        Arc::new(Self {
            inner: Arc::new(KafkaProducer::new(&config).unwrap()),
            fault,
            faulty_sends,
            sends: AtomicUsize::new(0),
            first_send: Mutex::new(None),
            woke: Arc::new(AtomicBool::new(false)),
        })
    }

    fn sends(&self) -> usize {
        self.sends.load(Ordering::SeqCst)
    }

    fn first_send(&self) -> Option<Instant> {
        *self.first_send.lock().unwrap()
    }

    /// Whether a late delivery woke up (its worker was not stopped).
    fn woke(&self) -> bool {
        self.woke.load(Ordering::SeqCst)
    }
}

impl Producer<KafkaPayload> for FaultyProducer {
    fn produce(
        &self,
        destination: &Destination,
        payload: KafkaPayload,
    ) -> Result<DeliveryFuture, ProduceError<KafkaPayload>> {
        let send = self.sends.fetch_add(1, Ordering::SeqCst);
        self.first_send
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
        if send >= self.faulty_sends {
            return self.inner.produce(destination, payload);
        }
        match self.fault {
            Fault::Panic => panic!("injected failure in produce"),
            Fault::WakeLate(after) => {
                let inner = Arc::clone(&self.inner);
                let destination = destination.clone();
                let woke = Arc::clone(&self.woke);
                Ok(Box::pin(async move {
                    tokio::time::sleep(after).await;
                    woke.store(true, Ordering::SeqCst);
                    match inner.produce(&destination, payload) {
                        Ok(delivery) => delivery.await,
                        Err(_) => Err(DeliveryError::Canceled),
                    }
                }))
            }
            Fault::Block(by) => {
                std::thread::sleep(by);
                Err(ProduceError::Failed {
                    payload,
                    source: "blocked, then refused".into(),
                })
            }
            Fault::Slow(by) => {
                let delivery = self.inner.produce(destination, payload)?;
                Ok(Box::pin(async move {
                    tokio::time::sleep(by).await;
                    delivery.await
                }))
            }
        }
    }
}

/// A counter's name and labels.
type Series = (String, Vec<(String, String)>);

/// Counter totals of the whole binary; the debugging recorder hands each increment out once.
static RECORDER: OnceLock<Snapshotter> = OnceLock::new();
static TOTALS: Mutex<BTreeMap<Series, u64>> = Mutex::new(BTreeMap::new());
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs the calling test alone, with the counters at zero.
fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    RECORDER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().unwrap();
        snapshotter
    });
    counter("", &[]);
    TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clear();
    guard
}

/// The total of counter `name` over the series carrying all of `labels`.
fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (key, _, _, value) in RECORDER.get().unwrap().snapshot().into_vec() {
        if let DebugValue::Counter(increment) = value {
            let series = key
                .key()
                .labels()
                .map(|label| (label.key().to_owned(), label.value().to_owned()))
                .collect();
            *totals
                .entry((key.key().name().to_owned(), series))
                .or_default() += increment;
        }
    }
    totals
        .iter()
        .filter(|((total_name, series), _)| {
            total_name == name
                && labels
                    .iter()
                    .all(|(key, value)| series.contains(&((*key).to_owned(), (*value).to_owned())))
        })
        .map(|(_, total)| total)
        .sum()
}

/// What every test here runs on: one input partition, a Redis, and the producer double in
/// front of the real producer.
struct Fixture {
    kafka: MockKafka,
    redis: TestRedis,
    runtime: tokio::runtime::Runtime,
    producer: Arc<FaultyProducer>,
}

impl Fixture {
    fn new(mode: RedisMode, fault: Fault, faulty_sends: usize) -> Self {
        let kafka = support::kafka(1);
        let producer = FaultyProducer::new(&kafka, fault, faulty_sends);
        Self {
            kafka,
            redis: TestRedis::start(mode),
            runtime: runtime(),
            producer,
        }
    }

    fn start(&self, setup: &ConsumerSetup) -> support::Consumer {
        setup.start(&self.kafka, &self.redis, &self.runtime)
    }

    /// Starts a consumer on one trace (a root and two children) and waits until it is
    /// committed and flushed out of Redis.
    fn one_trace_drained(&self) -> (support::Consumer, Traces) {
        let traces = Traces::new(0, 1, 2, 1);
        traces.produce(&self.kafka);
        let consumer = self.start(&setup(&self.producer));
        wait_until_drained(&self.kafka, &self.redis, &traces.per_partition(1));
        (consumer, traces)
    }
}

/// A fast consumer whose workers are replaced after 1 s of silence, producing with `producer`.
fn setup(producer: &Arc<FaultyProducer>) -> ConsumerSetup {
    let mut setup = ConsumerSetup::default();
    setup.config.buffer.flusher_max_unhealthy = Duration::from_secs(1);
    setup.config.flusher.max_restarts = 3;
    setup.processor = setup
        .processor
        .with_backpressure_grace(Duration::from_millis(100));
    setup.producer = Some(Arc::clone(producer) as Arc<dyn Producer<KafkaPayload>>);
    setup
}

/// Produces root spans (added to `traces`) until the consumer pauses its partitions.
fn keep_producing_until_paused(kafka: &MockKafka, traces: &mut Traces) {
    let mut next = 1_000_000;
    wait_until("the consumer pauses", || {
        if counter(rill::metrics::PAUSES, &[]) > 0 {
            return true;
        }
        let more = Traces::new(next, 5, 0, 1);
        more.produce(kafka);
        traces.extend(more);
        next += 5;
        false
    });
}

/// Asserts that the worker of shard 0 was replaced as hung at least once.
fn assert_replaced_as_hung() {
    assert!(
        counter(
            names::FLUSHER_UNHEALTHY,
            &[("cause", "hang"), ("shard", "0")]
        ) >= 1
    );
}

/// Waits until half a second after `at`, when a delayed fault has surely played out.
fn wait_until_past(what: &str, at: Instant) {
    wait_until(what, || Instant::now() > at + Duration::from_millis(500));
}

fn assert_flushed_exactly_once(kafka: &MockKafka, traces: &Traces) {
    let counts = output_span_counts(kafka);
    assert_all_flushed(&counts, &traces.span_ids);
    let duplicates: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(duplicates.is_empty(), "flushed twice: {duplicates:?}");
}

#[test]
fn a_flush_worker_that_dies_is_replaced_and_its_segment_still_flushed() {
    let _serial = serial();
    let fixture = Fixture::new(RedisMode::Standalone, Fault::Panic, 1);
    let (kafka, producer) = (&fixture.kafka, &fixture.producer);

    let (consumer, traces) = fixture.one_trace_drained();
    consumer.stop();

    assert!(
        counter(
            names::FLUSHER_UNHEALTHY,
            &[("cause", "no_process"), ("shard", "0")]
        ) >= 1
    );
    assert!(producer.sends() >= 2, "the replacement produced");
    assert_flushed_exactly_once(kafka, &traces);
}

#[test]
fn healthy_flush_workers_are_left_alone_under_a_limit_below_a_second() {
    let _serial = serial();
    // No faulty sends: the real producer.
    let fixture = Fixture::new(RedisMode::Standalone, Fault::Panic, 0);
    let mut setup = setup(&fixture.producer);
    // A worker with nothing to flush reports every 400 ms, never silent for the 500 ms limit;
    // its reports are whole seconds, which must not make it look silent when the second
    // changes.
    setup.config.flusher.idle_sleep = Duration::from_millis(400);
    setup.config.buffer.flusher_max_unhealthy = Duration::from_millis(500);
    let traces = Traces::new(0, 1, 2, 1);
    traces.produce(&fixture.kafka);

    let consumer = fixture.start(&setup);
    wait_until_drained(&fixture.kafka, &fixture.redis, &traces.per_partition(1));
    let started = Instant::now();
    wait_until("the workers were checked a few times", || {
        started.elapsed() > Duration::from_secs(1)
    });
    consumer.stop();

    assert_eq!(counter(names::FLUSHER_UNHEALTHY, &[]), 0);
    assert_flushed_exactly_once(&fixture.kafka, &traces);
}

#[test]
fn a_hung_flush_worker_is_replaced_and_never_produces_beside_its_replacement() {
    let _serial = serial();
    let wake_after = Duration::from_secs(6);
    let fixture = Fixture::new(RedisMode::Standalone, Fault::WakeLate(wake_after), 1);
    let (kafka, producer) = (&fixture.kafka, &fixture.producer);

    let (consumer, traces) = fixture.one_trace_drained();
    assert_replaced_as_hung();
    // The hung delivery would wake up now and produce the segment a second time, had its
    // worker been left running.
    wait_until_past(
        "the hung delivery would have woken",
        producer.first_send().unwrap() + wake_after,
    );
    consumer.stop();

    assert!(!producer.woke(), "the hung worker kept running");
    assert_flushed_exactly_once(kafka, &traces);
}

#[test]
fn a_flush_worker_blocked_inside_produce_sends_nothing_more_once_it_wakes_up_replaced() {
    let _serial = serial();
    let block = Duration::from_secs(5);
    let fixture = Fixture::new(RedisMode::Standalone, Fault::Block(block), 1);
    let (kafka, producer) = (&fixture.kafka, &fixture.producer);
    // Ten segments come due in one iteration; the worker blocks on the first message. On
    // waking it is not aborted before it yields, and the same poll goes on to the other nine
    // messages, which its replacement has flushed meanwhile.
    let traces = Traces::new(0, 10, 2, 1);
    traces.produce(kafka);

    let consumer = fixture.start(&setup(producer));
    wait_until_drained(kafka, &fixture.redis, &traces.per_partition(1));
    assert_replaced_as_hung();
    wait_until_past(
        "the blocked worker woke up",
        producer.first_send().unwrap() + block,
    );
    consumer.stop();

    assert_flushed_exactly_once(kafka, &traces);
}

#[test]
fn a_flush_worker_stuck_on_redis_is_replaced_and_flushing_goes_on() {
    let _serial = serial();
    // No faulty sends: the real producer.
    let fixture = Fixture::new(RedisMode::Standalone, Fault::Panic, 0);
    let (consumer, mut traces) = fixture.one_trace_drained();

    // Every client of Redis waits, the flush worker in the middle of an iteration.
    let mut conn = fixture.redis.node_connections().remove(0);
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(5000)
        .arg("ALL")
        .query(&mut conn)
        .unwrap();
    wait_until("the stuck worker is replaced", || {
        counter(
            names::FLUSHER_UNHEALTHY,
            &[("cause", "hang"), ("shard", "0")],
        ) >= 1
    });
    let more = Traces::new(1, 1, 2, 1);
    more.produce(&fixture.kafka);
    traces.extend(more);
    wait_until_drained(&fixture.kafka, &fixture.redis, &traces.per_partition(1));
    consumer.stop();

    assert_flushed_exactly_once(&fixture.kafka, &traces);
}

#[test]
fn a_flush_worker_that_keeps_dying_fails_the_consumer() {
    let _serial = serial();
    let fixture = Fixture::new(RedisMode::Standalone, Fault::Panic, usize::MAX);
    let mut setup = setup(&fixture.producer);
    setup.config.flusher.max_restarts = 1;
    Traces::new(0, 1, 2, 1).produce(&fixture.kafka);

    let (result, _) = fixture.start(&setup).wait_for_exit();

    let Err(RunError::Strategy(error)) = result else {
        panic!("expected the flusher to fail the consumer, got {result:?}");
    };
    assert!(
        matches!(
            error.downcast_ref::<FlushError>(),
            Some(FlushError::TooManyRestarts { restarts: 1, .. })
        ),
        "{error}"
    );
    assert!(
        counter(
            names::FLUSHER_UNHEALTHY,
            &[("cause", "no_process"), ("shard", "0")]
        ) >= 2
    );
}

#[test]
fn a_flush_worker_whose_flushes_keep_failing_is_replaced_then_fails_the_consumer() {
    let _serial = serial();
    // No faulty sends: the flushes themselves fail.
    let fixture = Fixture::new(RedisMode::Standalone, Fault::Panic, 0);
    let mut setup = setup(&fixture.producer);
    setup.config.flusher.max_restarts = 2;
    let traces = Traces::new(0, 1, 2, 1);
    traces.produce(&fixture.kafka);
    let consumer = fixture.start(&setup);
    wait_until_drained(&fixture.kafka, &fixture.redis, &traces.per_partition(1));

    // The shard's queue becomes a string: every read of it is refused with WRONGTYPE, the
    // same way at every retry.
    let _: () = fixture
        .redis
        .query(redis::cmd("SET").arg("span-buf:q:0").arg("not a queue"));
    let (result, _) = consumer.wait_for_exit();

    let Err(RunError::Strategy(error)) = result else {
        panic!("expected the flusher to fail the consumer, got {result:?}");
    };
    assert!(
        matches!(
            error.downcast_ref::<FlushError>(),
            Some(FlushError::TooManyRestarts { restarts: 2, .. })
        ),
        "{error}"
    );
    assert!(counter(names::FLUSHER_ERRORS, &[("phase", "flush")]) >= 3);
}

#[test]
fn a_flush_lock_is_kept_while_a_produce_outlasts_its_ttl() {
    let _serial = serial();
    // The first delivery is reported 3 s late, three times the lock's TTL.
    let fixture = Fixture::new(
        RedisMode::Standalone,
        Fault::Slow(Duration::from_secs(3)),
        1,
    );
    let (kafka, producer) = (&fixture.kafka, &fixture.producer);
    let mut setup = setup(producer);
    setup.config.buffer.flush_lock_ttl = Duration::from_secs(1);
    // The produce is slow, not hung: the worker must not be replaced meanwhile.
    setup.config.buffer.flusher_max_unhealthy = Duration::from_secs(10);
    let mut traces = Traces::new(0, 1, 2, 1);
    traces.produce(kafka);
    let consumer = fixture.start(&setup);

    wait_until("the first segment is being produced", || {
        producer.first_send().is_some()
    });
    // Past the TTL, a late child of the same root: with the lock kept it detaches into a
    // segment of its own; with the lock expired it would merge into the segment being flushed.
    wait_until_past(
        "the lock ttl",
        producer.first_send().unwrap() + Duration::from_secs(1),
    );
    let late = Traces {
        messages: vec![(
            0,
            support::span(
                &format!("{:032x}", 0),
                "00000000000003e7",
                Some(&format!("{:016x}", 0)),
                1,
            ),
        )],
        span_ids: ["00000000000003e7".to_owned()].into(),
    };
    late.produce(kafka);
    traces.extend(late);
    wait_until_drained(kafka, &fixture.redis, &traces.per_partition(1));
    consumer.stop();

    assert_flushed_exactly_once(kafka, &traces);
    assert_eq!(counter(names::FLUSH_LOCKS_LOST, &[]), 0);
}

#[test]
fn a_lagging_flusher_pauses_consumption_until_it_catches_up() {
    let _serial = serial();
    let fixture = Fixture::new(
        RedisMode::Standalone,
        Fault::Slow(Duration::from_millis(20)),
        usize::MAX,
    );
    let Fixture {
        kafka,
        redis,
        producer,
        ..
    } = &fixture;
    let mut setup = setup(producer);
    // One segment per iteration and at least 20 ms per iteration: 150 due segments keep the
    // worker at its limit for seconds.
    setup.config.buffer.max_flush_segments = 1;
    setup.config.buffer.flusher_backpressure = Duration::from_secs(1);
    let mut traces = Traces::new(0, 150, 0, 1);
    traces.produce(kafka);

    let consumer = fixture.start(&setup);
    // Input keeps arriving while the worker works through the backlog.
    keep_producing_until_paused(kafka, &mut traces);
    assert!(
        counter(names::FLUSHER_BACKPRESSURE, &[]) > 0,
        "paused by the flusher lag"
    );
    wait_until_drained(kafka, redis, &traces.per_partition(1));
    let stats = consumer.stop();

    assert!(stats.pauses >= 1, "{stats:?}");
    assert!(stats.rejections > 0, "{stats:?}");
    assert_all_flushed(&output_span_counts(kafka), &traces.span_ids);
}

/// Sets every node's `maxmemory` to `limit(used_memory)`.
fn set_maxmemory(redis: &TestRedis, limit: impl Fn(u64) -> u64) {
    for mut conn in redis.node_connections() {
        let info: String = redis::cmd("INFO").arg("memory").query(&mut conn).unwrap();
        let used: u64 = info
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(limit(used))
            .query(&mut conn)
            .unwrap();
    }
}

/// Starts a consumer (set up by `adjust`) on a Redis whose memory is over the hard
/// backpressure limit, and feeds it until it pauses; nothing is committed by then.
fn start_on_a_full_redis(
    fixture: &Fixture,
    adjust: impl FnOnce(&mut ConsumerSetup),
) -> (support::Consumer, Traces) {
    let Fixture {
        kafka,
        redis,
        producer,
        ..
    } = fixture;
    // Used is about a third of the limit on every node: writes still succeed, but the ratio
    // summed over the nodes is over 0.1.
    set_maxmemory(redis, |used| used * 3);
    let mut setup = setup(producer);
    setup.config.buffer.max_memory_percentage = 0.1;
    adjust(&mut setup);
    let mut traces = Traces::new(0, 10, 4, 1);
    traces.produce(kafka);

    let consumer = fixture.start(&setup);
    keep_producing_until_paused(kafka, &mut traces);
    assert!(
        counter(names::FLUSHER_HARD_BACKPRESSURE, &[]) > 0,
        "paused by redis memory"
    );
    assert_eq!(committed(kafka, 1), [None], "nothing is committed");
    (consumer, traces)
}

fn a_full_redis_pauses_consumption_until_memory_falls(mode: RedisMode) {
    let _serial = serial();
    // No faulty sends: the real producer.
    let fixture = Fixture::new(mode, Fault::Panic, 0);
    let (kafka, redis) = (&fixture.kafka, &fixture.redis);
    let (consumer, traces) = start_on_a_full_redis(&fixture, |_| {});
    set_maxmemory(redis, |_| 0);
    wait_until_drained(kafka, redis, &traces.per_partition(1));
    let stats = consumer.stop();

    assert!(stats.pauses >= 1, "{stats:?}");
    assert!(stats.rejections > 0, "{stats:?}");
    assert_all_flushed(&output_span_counts(kafka), &traces.span_ids);
}

#[test]
fn a_full_standalone_redis_pauses_consumption_until_memory_falls() {
    a_full_redis_pauses_consumption_until_memory_falls(RedisMode::Standalone);
}

#[test]
fn a_full_redis_cluster_pauses_consumption_until_memory_falls() {
    a_full_redis_pauses_consumption_until_memory_falls(RedisMode::Cluster);
}

/// Spans in the buffer: every span written has a field in its trace's redirect map.
fn spans_in_redis(redis: &TestRedis) -> u64 {
    redis
        .keys_with_ttls()
        .iter()
        .filter(|key| key.key.starts_with(b"span-buf:ssr:"))
        .map(|key| redis.query::<u64>(redis::cmd("HLEN").arg(&key.key)))
        .sum()
}

#[test]
fn a_stop_while_redis_is_full_commits_every_batch_already_written() {
    let _serial = serial();
    let fixture = Fixture::new(RedisMode::Standalone, Fault::Panic, 0);
    let (kafka, redis) = (&fixture.kafka, &fixture.redis);
    let (consumer, _) = start_on_a_full_redis(&fixture, |setup| {
        // Nothing comes due while the test runs, so what was written stays in Redis.
        setup.config.buffer.root_timeout = Duration::from_secs(600);
        setup.config.buffer.timeout = Duration::from_secs(600);
    });
    // The batch written but held back by the full Redis is the pipeline's last: closing the
    // pipeline lets it through, so the stop commits it instead of waiting out the join
    // deadline and leaving it to be read and written again.
    consumer.stop();

    let written = spans_in_redis(redis);
    assert!(written > 0);
    assert_eq!(
        committed(kafka, 1),
        [Some(i64::try_from(written).unwrap())],
        "every span written to redis is committed, and nothing more"
    );
}

#[test]
fn a_rebalance_lets_the_flush_in_progress_finish_and_nothing_is_flushed_twice() {
    let _serial = serial();
    let kafka = support::kafka(2);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    // Every delivery takes 300 ms, so the flush workers spend most of their time in the middle
    // of an iteration, between produce and cleanup.
    let producer = FaultyProducer::new(&kafka, Fault::Slow(Duration::from_millis(300)), usize::MAX);
    let setup = setup(&producer);
    let traces = Traces::new(0, 20, 2, 2);
    traces.produce(&kafka);

    let first = setup.start(&kafka, &redis, &runtime);
    wait_until("the first flush is under way", || producer.sends() > 0);
    let second = setup.start(&kafka, &redis, &runtime);
    // Input keeps coming, so flushes and commits keep running through the rebalance; a commit
    // refused while the group rebalances must be sent again before a partition is handed
    // over, or the next owner reads and flushes those spans again.
    let mut next = 1_000;
    let mut during = Traces::default();
    wait_until("both consumers share the partitions", || {
        let shared = first.assignment().len() == 1 && second.assignment().len() == 1;
        if !shared {
            let more = Traces::new(next, 2, 2, 2);
            more.produce(&kafka);
            during.extend(more);
            next += 2;
        }
        shared
    });
    let during_ids = during.span_ids.clone();
    let mut all = Traces::default();
    all.extend(traces);
    all.extend(during);
    wait_until_drained(&kafka, &redis, &all.per_partition(2));
    second.stop();
    first.stop();

    // What was in Redis when the rebalance began comes out exactly once: a flush in progress
    // finishes and is cleaned up before its partition moves. Spans read while the group
    // rebalances are at least once: a batch whose commit the group refused in the middle of
    // the rebalance is read and written again by the next owner (the at-least-once window).
    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &all.span_ids);
    let duplicates: Vec<_> = counts
        .iter()
        .filter(|(span, count)| **count > 1 && !during_ids.contains(*span))
        .collect();
    assert!(duplicates.is_empty(), "flushed twice: {duplicates:?}");
}
