//! A dead-letter topic the brokers do not have, through the `spans-pipeline run` binary in its
//! own process, against the mock Kafka cluster and a real redis-server.
//!
//! A consumer that stopped on the first dead letter it could not deliver was restarted by its
//! supervisor, read again everything since its last commit, produced it again and stopped on
//! the same message: a crash loop that duplicated every valid span around the bad one. These
//! tests show that by default the binary warns at start, keeps running, counts and commits
//! past what it cannot dead-letter, and duplicates nothing; and that `kafka.dlq_required`
//! makes a missing topic a refusal to start that names it.
//!
//! librdkafka's producer lets a broker that auto-creates topics (the mock does) create a topic
//! it is asked about, so the consumer's producer is told not to
//! (`allow.auto.create.topics = false`), as a production cluster without auto-creation
//! behaves.

#![allow(clippy::unwrap_used)]

#[path = "support/process.rs"]
mod process;
#[path = "support/consumer.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;
use process::{
    RunProcess, free_port, metric, read_log, run_command, scrape, test_config, wait_for_log,
};
use support::{DLQ, GROUP, INPUT, OUTPUT, WAIT, output_span_counts, span, wait_until};

const OUTCOMES: &str = "outcomes";

/// The default configuration except short timeouts, a producer that creates no topic, and a
/// metrics endpoint on `metrics_port`.
fn write_config(path: &Path, metrics_port: u16) {
    let config = test_config(
        &format!(
            r#"outcomes_topic = "{OUTCOMES}"
producer_overrides = {{ "allow.auto.create.topics" = "false", "topic.metadata.propagation.max.ms" = "1000" }}"#
        ),
        &format!(
            r#"[buffer]
root_timeout = "1s"
timeout = "2s"

[observability]
metrics_listen = "127.0.0.1:{metrics_port}""#
        ),
    );
    std::fs::write(path, config).unwrap();
}

/// A mock cluster with every topic of the binary but the dead-letter topic.
fn kafka_without_dlq() -> MockKafka {
    let kafka = MockKafka::start(1).unwrap();
    for topic in [INPUT, OUTPUT, OUTCOMES] {
        kafka.create_topic(topic, 1).unwrap();
    }
    kafka
}

/// The binary on `kafka` and `redis` with [`write_config`] and `flags`; stderr into a file.
fn start(
    kafka: &MockKafka,
    redis: &RedisServer,
    dir: &Path,
    metrics_port: u16,
    flags: &[&str],
) -> (RunProcess, PathBuf) {
    let (config, stderr) = (dir.join("spans.toml"), dir.join("stderr"));
    write_config(&config, metrics_port);
    let child = RunProcess::start(
        run_command(&config, kafka.bootstrap_servers())
            .args(["--redis-url", &redis.url()])
            .args(flags)
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&stderr).unwrap()),
    );
    (child, stderr)
}

#[test]
fn a_missing_dead_letter_topic_neither_stops_nor_duplicates_and_its_dead_letters_are_counted() {
    let kafka = kafka_without_dlq();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let (mut child, stderr) = start(&kafka, &redis, dir.path(), metrics_port, &[]);

    // Warned at start, naming the topic.
    let log = wait_for_log(&stderr, "The dead-letter topic cannot be used");
    let warning = log
        .lines()
        .find(|line| line.contains("The dead-letter topic cannot be used"))
        .unwrap();
    assert!(warning.contains(DLQ), "{warning}");
    assert!(warning.contains("does not exist"), "{warning}");

    // Three rounds of five valid roots, each followed by two malformed messages.
    let mut messages = Vec::new();
    let mut expected = BTreeSet::new();
    let mut malformed = 0;
    for round in 0..3 {
        for n in 0..5 {
            let span_id = format!("{round:08x}{n:08x}");
            messages.push(span(&format!("{round:016x}{n:016x}"), &span_id, None, 7));
            expected.insert(span_id);
        }
        messages.push("not json".to_owned());
        messages.push(r#"{"span_id":"missing every other field"}"#.to_owned());
        malformed += 2;
    }
    kafka
        .produce(INPUT, messages.iter().map(String::as_bytes), |_| 0)
        .unwrap();
    let total = i64::try_from(messages.len()).unwrap();

    // The consumer keeps running throughout: exiting (and being restarted) is the crash loop.
    wait_until("every valid span is out and every offset committed", || {
        assert!(
            child.is_running(),
            "the consumer stopped:\n{}",
            read_log(&stderr)
        );
        let counts = output_span_counts(&kafka);
        expected.iter().all(|id| counts.contains_key(id))
            && kafka.committed_offsets(GROUP, INPUT, 1).unwrap() == [Some(total)]
    });
    let counts = output_span_counts(&kafka);
    let twice: Vec<_> = counts.iter().filter(|(_, count)| **count > 1).collect();
    assert!(twice.is_empty(), "spans out twice: {twice:?}");
    assert_eq!(counts.keys().cloned().collect::<BTreeSet<_>>(), expected);
    wait_until("every dead letter is counted as undeliverable", || {
        metric(&scrape(metrics_port), "rill_dlq_undeliverable") == Some(f64::from(malformed))
    });
    let log = read_log(&stderr);
    assert_eq!(
        log.matches("Giving up a dead letter that could not be delivered")
            .count(),
        usize::try_from(malformed).unwrap(),
        "{log}"
    );
    assert!(child.is_running());
    assert!(child.stop().success(), "{}", read_log(&stderr));
    assert!(kafka.read_all(OUTCOMES, WAIT).unwrap().is_empty());
}

#[test]
fn a_required_dead_letter_topic_that_is_missing_stops_the_binary_at_start_naming_it() {
    let kafka = kafka_without_dlq();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let strict = ["--set", "kafka.dlq_required=true"];

    let (mut child, stderr) = start(&kafka, &redis, dir.path(), free_port(), &strict);
    let status = child.wait_for_exit(Duration::from_secs(60));

    let log = read_log(&stderr);
    assert!(!status.success(), "{status}: {log}");
    for named in [
        &format!("the dead-letter topic {DLQ} is required (kafka.dlq_required)"),
        &format!("topic {DLQ} does not exist"),
    ] {
        assert!(log.contains(named.as_str()), "{named:?} in\n{log}");
    }
    assert!(!log.contains("Consuming."), "it started consuming:\n{log}");

    // With the topic there, the same configuration starts.
    kafka.create_topic(DLQ, 1).unwrap();
    let (mut child, stderr) = start(&kafka, &redis, dir.path(), free_port(), &strict);
    wait_for_log(&stderr, "Dead-letter topic found.");
    wait_for_log(&stderr, "Consuming.");
    assert!(child.stop().success(), "{}", read_log(&stderr));
}
