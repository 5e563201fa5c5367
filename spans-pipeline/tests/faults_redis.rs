//! Redis faults under a running consumer: a server that stalls every client for twenty
//! seconds, a server that crashes and comes back on the same port, a server that refuses every
//! write for ten seconds, a script cache flushed while spans are written, and a server with a
//! real `maxmemory`. In each the consumer must
//! keep running, commit no offset past spans that are not in Redis, recover by itself, and
//! flush every span.
//!
//! Redis is a real `redis-server` and Kafka librdkafka's mock cluster; the faults are the
//! server's own (`CLIENT PAUSE`, `SIGKILL`, `SCRIPT FLUSH`, `maxmemory`), and the evidence is
//! what the server reports (`INFO errorstats`, `INFO memory`) and what reached the output.

#![allow(clippy::unwrap_used)]

#[path = "support/consumer.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::{RedisMode, RedisServer, TestRedis};
use support::{
    ConsumerSetup, Traces, assert_all_flushed, assert_none_reported_lost, committed,
    output_span_counts, runtime, wait_until, wait_until_drained,
};

/// A consumer that pauses its partitions after 100 ms of rejected input.
fn setup() -> ConsumerSetup {
    let mut setup = ConsumerSetup::default();
    setup.processor = setup
        .processor
        .with_backpressure_grace(Duration::from_millis(100));
    setup
}

fn server(redis: &TestRedis) -> &RedisServer {
    match redis {
        TestRedis::Standalone(server) => server,
        TestRedis::Cluster(_) => panic!("a standalone server was expected"),
    }
}

/// Span ids flushed more than once, with their counts.
fn duplicates(counts: &BTreeMap<String, usize>) -> BTreeMap<&String, &usize> {
    counts.iter().filter(|(_, count)| **count > 1).collect()
}

/// Checks, every 200 ms until `until`, that the committed offset of the single input
/// partition stays at `offset`.
fn assert_committed_stays(kafka: &MockKafka, offset: i64, until: Instant, why: &str) {
    while Instant::now() < until {
        assert_eq!(committed(kafka, 1), [Some(offset)], "{why}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_redis_paused_for_twenty_seconds_holds_commits_back_and_the_consumer_recovers_by_itself() {
    let kafka = support::kafka(1);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    let before = Traces::new(0, 20, 4, 1);
    before.produce(&kafka);
    let consumer = setup().start(&kafka, &redis, &runtime);
    wait_until_drained(&kafka, &redis, &before.per_partition(1));

    let pause = Duration::from_secs(20);
    let paused_until = Instant::now() + pause;
    server(&redis).pause_clients(pause);
    let during = Traces::new(20, 20, 4, 1);
    during.produce(&kafka);
    // Nothing produced during the pause can reach Redis, so nothing of it may be committed.
    assert_committed_stays(
        &kafka,
        before.per_partition(1)[0],
        paused_until - Duration::from_millis(500),
        "committed past spans that are not in redis",
    );
    let mut all = before;
    all.extend(during);
    wait_until_drained(&kafka, &redis, &all.per_partition(1));
    let recovered_after = paused_until.elapsed();
    let stats = consumer.stop();

    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &all.span_ids);
    assert_none_reported_lost(&kafka);
    assert!(duplicates(&counts).is_empty(), "{:?}", duplicates(&counts));
    println!("drained {recovered_after:?} after the pause ended; {stats:?}");
}

#[test]
fn a_redis_blip_of_a_few_seconds_does_not_use_up_the_flush_worker_restarts() {
    let kafka = support::kafka(1);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    // A worker silent for 1 s is replaced, and three replacements in a row fail the consumer.
    let mut setup = setup();
    setup.config.buffer.flusher_max_unhealthy = Duration::from_secs(1);
    setup.config.flusher.max_restarts = 3;
    let before = Traces::new(0, 5, 2, 1);
    before.produce(&kafka);
    let consumer = setup.start(&kafka, &redis, &runtime);
    wait_until_drained(&kafka, &redis, &before.per_partition(1));

    // Every replacement started during the pause hangs on Redis too: started back to back
    // they would be four by the end of it.
    let pause = Duration::from_secs(9);
    server(&redis).pause_clients(pause);
    let during = Traces::new(5, 5, 2, 1);
    during.produce(&kafka);
    let mut all = before;
    all.extend(during);
    wait_until_drained(&kafka, &redis, &all.per_partition(1));
    // `stop` fails the test if the flusher had failed the consumer.
    consumer.stop();

    assert_all_flushed(&output_span_counts(&kafka), &all.span_ids);
    assert_none_reported_lost(&kafka);
}

#[test]
fn a_redis_down_for_fifteen_seconds_holds_commits_back_and_the_consumer_resumes_when_it_is_back() {
    let kafka = support::kafka(1);
    // Every write is on disk before Redis acknowledges it, so the spans committed before the
    // crash survive it.
    let redis = TestRedis::Standalone(
        RedisServer::try_start_with_args(&["--appendonly", "yes", "--appendfsync", "always"])
            .unwrap(),
    );
    let runtime = runtime();
    let before = Traces::new(0, 40, 4, 1);
    before.produce(&kafka);
    // Segments wait 5 s for flushing, so the crash finds committed spans in Redis.
    let mut setup = setup();
    setup.config.buffer.root_timeout = Duration::from_secs(5);
    setup.config.buffer.timeout = Duration::from_secs(10);
    let consumer = setup.start(&kafka, &redis, &runtime);
    let written = before.per_partition(1)[0];
    wait_until("the spans before the crash are committed", || {
        committed(&kafka, 1) == [Some(written)]
    });
    let left_in_redis = redis.keys_with_ttls().len();
    assert!(
        left_in_redis > 0,
        "nothing left in redis to survive the crash"
    );

    server(&redis).stop();
    let during = Traces::new(40, 20, 4, 1);
    during.produce(&kafka);
    assert_committed_stays(
        &kafka,
        written,
        Instant::now() + Duration::from_secs(15),
        "committed while redis was down",
    );
    server(&redis).restart().unwrap();
    let restarted = Instant::now();
    let produced_while_down = during.span_ids.clone();
    let mut all = before;
    all.extend(during);
    wait_until_drained(&kafka, &redis, &all.per_partition(1));
    let recovered_after = restarted.elapsed();
    let stats = consumer.stop();

    // The restarted server came back without the script (the cache is not persisted).
    let reloads = server(&redis).error_count("NOSCRIPT");
    assert!(
        reloads > 0,
        "the script was never refused after the restart"
    );
    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &all.span_ids);
    assert_none_reported_lost(&kafka);
    // A flush cut off by the crash after producing is flushed again: only spans that were in
    // Redis at the crash can be duplicated.
    let duplicated = duplicates(&counts);
    assert!(
        duplicated
            .keys()
            .all(|span_id| !produced_while_down.contains(*span_id)),
        "{duplicated:?}"
    );
    println!(
        "{left_in_redis} keys in redis at the crash, {} spans flushed twice, {reloads} script \
         calls refused after the restart, drained {recovered_after:?} after it; {stats:?}",
        duplicated.len()
    );
}

#[test]
fn a_redis_cluster_node_down_for_fifteen_seconds_holds_commits_back_and_the_consumer_resumes_when_it_is_back()
 {
    let kafka = support::kafka(1);
    let redis = TestRedis::start(RedisMode::Cluster);
    let runtime = runtime();
    let before = Traces::new(0, 20, 4, 1);
    before.produce(&kafka);
    let consumer = setup().start(&kafka, &redis, &runtime);
    // The node has no persistence: it goes once everything is flushed, so that it loses
    // nothing by coming back empty.
    wait_until_drained(&kafka, &redis, &before.per_partition(1));
    let written = before.per_partition(1)[0];

    let node = redis.servers()[0];
    node.stop();
    let during = Traces::new(20, 20, 4, 1);
    during.produce(&kafka);
    // Past the cluster's node timeout (5 s) the other masters mark the node failed and the
    // whole cluster refuses commands.
    assert_committed_stays(
        &kafka,
        written,
        Instant::now() + Duration::from_secs(15),
        "committed while a cluster node was down",
    );
    node.restart().unwrap();
    let restarted = Instant::now();
    let mut all = before;
    all.extend(during);
    wait_until_drained(&kafka, &redis, &all.per_partition(1));
    let recovered_after = restarted.elapsed();
    let stats = consumer.stop();

    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &all.span_ids);
    assert_none_reported_lost(&kafka);
    assert!(duplicates(&counts).is_empty(), "{:?}", duplicates(&counts));
    println!("drained {recovered_after:?} after the node came back; {stats:?}");
}

#[test]
fn a_redis_refusing_writes_is_retried_with_backoff_and_the_consumer_resumes_once_it_accepts_them() {
    let kafka = support::kafka(1);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    let before = Traces::new(0, 10, 4, 1);
    before.produce(&kafka);
    // No hard backpressure (the default): the writes themselves fail.
    let consumer = setup().start(&kafka, &redis, &runtime);
    wait_until_drained(&kafka, &redis, &before.per_partition(1));

    // Every write is refused with OOM from now on.
    server(&redis).config_set("maxmemory", 1);
    // Six batches: more than the pipeline holds (two batches being written, one being
    // gathered), so that the rest backs up to the consumer and it pauses.
    let during = Traces::new(10, 120, 4, 1);
    during.produce(&kafka);
    let refusing = Duration::from_secs(10);
    assert_committed_stays(
        &kafka,
        before.per_partition(1)[0],
        Instant::now() + refusing,
        "committed spans that redis refused",
    );
    let refused = server(&redis).error_count("OOM");
    server(&redis).config_set("maxmemory", 0);
    let mut all = before;
    all.extend(during);
    wait_until_drained(&kafka, &redis, &all.per_partition(1));
    let stats = consumer.stop();

    assert!(refused > 0, "redis never refused a write");
    // Retried back to back, a batch of 100 spans (a few hundred commands, each refused) would
    // be refused hundreds of thousands of times in 10 s; backing off from 100 ms to 5 s, a
    // handful of times.
    assert!(
        refused < 20 * 500,
        "retried without backing off: {refused} refusals"
    );
    assert!(stats.rejections > 0, "{stats:?}");
    assert!(stats.pauses >= 1, "{stats:?}");
    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &all.span_ids);
    assert_none_reported_lost(&kafka);
    assert!(duplicates(&counts).is_empty(), "{:?}", duplicates(&counts));
    println!("{refused} commands refused with OOM in {refusing:?}; {stats:?}");
}

fn a_script_cache_flushed_while_spans_are_written_is_reloaded_and_nothing_is_lost(mode: RedisMode) {
    let kafka = support::kafka(1);
    let redis = TestRedis::start(mode);
    let runtime = runtime();
    let refused_before = redis.error_count("NOSCRIPT");
    let consumer = setup().start(&kafka, &redis, &runtime);

    let mut traces = Traces::default();
    for wave in 0..30 {
        let more = Traces::new(wave * 10, 10, 4, 1);
        more.produce(&kafka);
        traces.extend(more);
        for mut node in redis.node_connections() {
            let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut node).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until_drained(&kafka, &redis, &traces.per_partition(1));
    let stats = consumer.stop();

    let refused = redis.error_count("NOSCRIPT") - refused_before;
    assert!(refused > 0, "no script call met a flushed cache");
    // Reloaded and re-run in place: the batch was never handed back.
    assert_eq!(stats.rejections, 0, "{stats:?}");
    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &traces.span_ids);
    assert_none_reported_lost(&kafka);
    assert!(duplicates(&counts).is_empty(), "{:?}", duplicates(&counts));
    println!("{refused} script calls answered NOSCRIPT and were re-run; {stats:?}");
}

#[test]
fn a_script_cache_flushed_while_spans_are_written_is_reloaded_and_nothing_is_lost_on_standalone_redis()
 {
    a_script_cache_flushed_while_spans_are_written_is_reloaded_and_nothing_is_lost(
        RedisMode::Standalone,
    );
}

#[test]
fn a_script_cache_flushed_while_spans_are_written_is_reloaded_and_nothing_is_lost_on_redis_cluster()
{
    a_script_cache_flushed_while_spans_are_written_is_reloaded_and_nothing_is_lost(
        RedisMode::Cluster,
    );
}

/// Traces like [`Traces::new`] on one partition, each span carrying `padding` bytes of
/// description, so that a few thousand spans fill megabytes of Redis.
fn padded_traces(first: u64, count: u64, children: u64, padding: usize) -> Traces {
    let description = format!(r#""name":"op","description":"{}""#, "x".repeat(padding));
    let mut traces = Traces::default();
    for trace in first..first + count {
        let trace_id = format!("{trace:032x}");
        let root = format!("{:016x}", trace * 1000);
        let mut add = |span_id: String, parent: Option<&str>| {
            let message = support::span(&trace_id, &span_id, parent, 1).replacen(
                r#""name":"op""#,
                &description,
                1,
            );
            traces.messages.push((0, message));
            traces.span_ids.insert(span_id);
        };
        for child in 1..=children {
            add(format!("{:016x}", trace * 1000 + child), Some(&root));
        }
        add(root.clone(), None);
    }
    traces
}

#[test]
fn a_redis_with_a_real_maxmemory_pauses_consumption_before_it_refuses_a_write_and_resumes() {
    const MAX_RATIO: f64 = 0.1;
    let kafka = support::kafka(1);
    let redis = TestRedis::Standalone(
        RedisServer::try_start_with_args(&["--maxmemory-policy", "noeviction"]).unwrap(),
    );
    let server = server(&redis);
    // The limit is 1 MiB above what the empty server uses, and `maxmemory` ten times that: the
    // headroom above the limit is many seconds of the input below, far more than the second
    // between two memory samples.
    let idle: u64 = server
        .info_field("memory", "used_memory")
        .unwrap()
        .parse()
        .unwrap();
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let maxmemory = ((idle + (1 << 20)) as f64 / MAX_RATIO) as u64;
    server.config_set("maxmemory", maxmemory);
    let runtime = runtime();
    let mut setup = setup();
    // Uncompressed and held for five seconds before flushing, so memory builds up well past
    // the limit even on a slow machine.
    setup.config.buffer.compression_level = -1;
    setup.config.buffer.root_timeout = Duration::from_secs(5);
    setup.config.buffer.timeout = Duration::from_secs(10);
    setup.config.buffer.max_memory_percentage = MAX_RATIO;
    let consumer = setup.start(&kafka, &redis, &runtime);

    // About 0.5 MB of spans a second for five seconds: 2.6 MB in all, as the mock cluster keeps
    // only the last 5 MB of a partition.
    let mut traces = Traces::default();
    for wave in 0..50 {
        let more = padded_traces(wave * 8, 8, 4, 1000);
        more.produce(&kafka);
        traces.extend(more);
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_until_drained(&kafka, &redis, &traces.per_partition(1));
    let stats = consumer.stop();

    let peak: u64 = server
        .info_field("memory", "used_memory_peak")
        .unwrap()
        .parse()
        .unwrap();
    #[allow(clippy::cast_precision_loss)]
    let peak_ratio = peak as f64 / maxmemory as f64;
    assert!(
        peak_ratio > MAX_RATIO,
        "the limit was never reached: {peak_ratio}"
    );
    assert_eq!(server.error_count("OOM"), 0, "redis refused a write");
    assert!(stats.rejections > 0, "{stats:?}");
    assert!(stats.pauses >= 1, "{stats:?}");
    let counts = output_span_counts(&kafka);
    assert_all_flushed(&counts, &traces.span_ids);
    assert_none_reported_lost(&kafka);
    assert!(duplicates(&counts).is_empty(), "{:?}", duplicates(&counts));
    println!(
        "idle {idle} bytes, maxmemory {maxmemory}, peak {peak} ({peak_ratio:.3} of maxmemory, \
         limit {MAX_RATIO}); {stats:?}"
    );
}
