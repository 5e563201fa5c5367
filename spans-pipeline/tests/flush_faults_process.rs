//! What the flusher meets in Redis, through the `spans-pipeline run` binary in its own process,
//! against the mock Kafka cluster and a real redis-server, with the default flush locks.
//!
//! The library's tests show each fix in process (`store`, `buffer` tests); these show that the
//! binary as operators run it holds too: a queue entry that is not a segment key stops no
//! other segment, a payload member that is not a span is never produced, and a Redis at
//! `maxmemory` with `noeviction` drains.

#![allow(clippy::unwrap_used)]

#[path = "support/process.rs"]
mod process;
#[path = "support/consumer.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;
use process::{RunProcess, read_log, test_config};
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use support::{DLQ, GROUP, INPUT, OUTPUT, WAIT, output_span_counts, span, wait_until};

/// The queue of partition 0.
const QUEUE: &str = "span-buf:q:0";

/// The binary on a mock cluster and `redis`, with the default configuration except short
/// cadences and a `root_timeout` of `root_timeout`.
struct Setup {
    kafka: MockKafka,
    redis: RedisServer,
    child: RunProcess,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn start(redis: RedisServer, root_timeout: &str) -> Self {
        let kafka = MockKafka::start(1).unwrap();
        for topic in [INPUT, OUTPUT, DLQ, "outcomes"] {
            kafka.create_topic(topic, 1).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let (config, stderr) = (dir.path().join("spans.toml"), dir.path().join("stderr"));
        let rest = format!("[buffer]\nroot_timeout = \"{root_timeout}\"\ntimeout = \"10s\"\n");
        std::fs::write(&config, test_config("", &rest)).unwrap();
        let child =
            RunProcess::start_logged(&config, kafka.bootstrap_servers(), &redis.url(), &stderr);
        Self {
            kafka,
            redis,
            child,
            stderr,
            _dir: dir,
        }
    }

    /// Produces `count` root spans of traces of their own, starting at trace `first`, and
    /// returns their ids.
    fn produce_roots(&self, first: u32, count: u32) -> BTreeSet<String> {
        let mut messages = Vec::new();
        let mut ids = BTreeSet::new();
        for n in first..first + count {
            let id = format!("{n:016x}");
            messages.push(span(&format!("{n:032x}"), &id, None, 7));
            ids.insert(id);
        }
        self.kafka
            .produce(INPUT, messages.iter().map(String::as_bytes), |_| 0)
            .unwrap();
        ids
    }

    /// Waits until every span of `expected` is out, the consumer running all along.
    fn wait_for_spans(&mut self, expected: &BTreeSet<String>) {
        wait_until("every span is out", || {
            assert!(
                self.child.is_running(),
                "the consumer stopped:\n{}",
                read_log(&self.stderr)
            );
            let counts = output_span_counts(&self.kafka);
            expected.iter().all(|id| counts.contains_key(id))
        });
    }

    fn wait_until_committed(&self, offset: i64) {
        wait_until("the spans are committed (in redis)", || {
            self.kafka.committed_offsets(GROUP, INPUT, 1).unwrap() == [Some(offset)]
        });
    }

    fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> T {
        command.query(&mut self.redis.connection()).unwrap()
    }

    fn stop(mut self) {
        let status = self.child.stop();
        assert!(status.success(), "{status}: {}", read_log(&self.stderr));
    }
}

#[test]
fn a_bad_queue_entry_is_removed_and_every_other_segment_flows() {
    let mut setup = Setup::start(RedisServer::start(), "1s");
    let not_utf8: &[u8] = b"span-buf:s:\xff\xfe";
    let not_a_key: &[u8] = b"not-a-segment-key";
    for member in [not_utf8, not_a_key] {
        let _: i64 = setup.query(redis::cmd("ZADD").arg(QUEUE).arg(0).arg(member));
    }

    let mut expected = setup.produce_roots(0, 5);
    setup.wait_for_spans(&expected);
    // Flushing goes on after the bad entries were met, not only once.
    expected.extend(setup.produce_roots(5, 5));
    setup.wait_for_spans(&expected);

    wait_until("the bad entries are removed", || {
        [not_utf8, not_a_key].iter().all(|member| {
            setup
                .query::<Option<f64>>(redis::cmd("ZSCORE").arg(QUEUE).arg(*member))
                .is_none()
        })
    });
    let counts = output_span_counts(&setup.kafka);
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
    setup.stop();
}

#[test]
fn a_garbage_payload_member_is_never_produced() {
    // The root's deadline leaves time to spoil its payload key once it is in Redis.
    let mut setup = Setup::start(RedisServer::start(), "4s");
    let expected = setup.produce_roots(0, 1);
    setup.wait_until_committed(1);
    let keys: Vec<String> = setup.query(redis::cmd("KEYS").arg("span-buf:s:*"));
    let payload_key = keys
        .iter()
        .find(|key| setup.query::<String>(redis::cmd("TYPE").arg(key.as_str())) == "set")
        .unwrap_or_else(|| panic!("no payload key among {keys:?}"));
    for garbage in ["not json", "[1,2]", r#"{"span_id":"#] {
        let _: i64 = setup.query(redis::cmd("SADD").arg(payload_key).arg(garbage));
    }

    setup.wait_for_spans(&expected);
    for message in setup.kafka.read_all(OUTPUT, WAIT).unwrap() {
        let payload = message.payload.as_deref().unwrap();
        let value: sonic_rs::Value = sonic_rs::from_slice(payload)
            .unwrap_or_else(|error| panic!("{error}: {}", String::from_utf8_lossy(payload)));
        let spans = value["spans"].as_array().unwrap();
        assert_eq!(spans.len(), 1, "{}", String::from_utf8_lossy(payload));
        for span in spans.iter() {
            assert!(span.is_object(), "{}", String::from_utf8_lossy(payload));
        }
    }
    let log = read_log(&setup.stderr);
    let dropped = log
        .matches("Dropping a stored payload that is not a JSON object.")
        .count();
    assert_eq!(dropped, 3, "{log}");
    setup.stop();
}

#[test]
fn a_full_redis_with_the_default_flush_locks_drains_and_every_span_comes_out() {
    let redis = RedisServer::try_start_with_args(&["--maxmemory-policy", "noeviction"]).unwrap();
    // The roots' deadline leaves time to fill Redis once they are in it.
    let mut setup = Setup::start(redis, "3s");
    let expected = setup.produce_roots(0, 50);
    setup.wait_until_committed(50);

    // Full: every write is refused from now on, as at `maxmemory` with `noeviction`.
    setup.redis.config_set("maxmemory", 1);
    let refused = redis::cmd("SET")
        .arg("probe")
        .arg(1)
        .query::<()>(&mut setup.redis.connection())
        .unwrap_err();
    assert_eq!(refused.code(), Some("OOM"), "{refused}");
    setup.wait_for_spans(&expected);
    wait_until("redis drained", || {
        setup
            .redis
            .keys_with_ttls()
            .iter()
            .all(|key| key.key_str().contains(":hrs:"))
    });
    let counts = output_span_counts(&setup.kafka);
    assert!(counts.values().all(|&count| count == 1), "{counts:?}");
    setup.redis.config_set("maxmemory", 0);
    setup.stop();
}
