//! Segments bigger than a megabyte through the `spans-pipeline run` binary, in its own
//! process, against the mock Kafka cluster and a real redis-server.
//!
//! librdkafka refuses messages over its `message.max.bytes` (1,000,000 unless set), while the
//! buffer builds segments of up to `max_segment_bytes` (10 MiB): with librdkafka's default every
//! bigger segment was given up and deleted. These tests show that the defaults carry such
//! segments whole, that a message the broker still refuses for its size is split instead of
//! given up, and that what cannot be produced at all is reported, never silently dropped.

#![allow(clippy::unwrap_used)]

#[path = "support/process.rs"]
mod process;
#[path = "support/consumer.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;
use process::{RunProcess, read_log, run_command, test_config};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use sonic_rs::{JsonContainerTrait, JsonValueTrait};
use support::{INPUT, OUTPUT, WAIT, output_span_counts, span, wait_until};

const OUTCOMES: &str = "outcomes";

/// A trace of `spans` spans of about 1 KB on project 7: a root (`…0000`) and its children,
/// children first.
fn trace_spans(trace: &str, spans: u64) -> (Vec<String>, BTreeSet<String>) {
    let root = format!("{:016x}", 0);
    let mut messages = Vec::new();
    let mut ids = BTreeSet::new();
    for n in 1..spans {
        let id = format!("{n:016x}");
        messages.push(padded(span(trace, &id, Some(&root), 7), 700));
        ids.insert(id);
    }
    messages.push(padded(span(trace, &root, None, 7), 700));
    ids.insert(root);
    (messages, ids)
}

/// A root span of its own trace with a `description` of `bytes` bytes.
fn big_span(trace: &str, span_id: &str, bytes: usize) -> String {
    padded(span(trace, span_id, None, 7), bytes)
}

/// `span` with a `description` of `bytes` bytes.
fn padded(span: String, bytes: usize) -> String {
    let padding = "x".repeat(bytes);
    span.replace(
        r#""name":"op""#,
        &format!(r#""name":"op","description":"{padding}""#),
    )
}

/// Produces `values` to partition 0 of `topic` with a producer that takes messages of up to
/// 50 MB (the test's own producer of input, not the one under test).
fn produce_large(kafka: &MockKafka, topic: &str, values: &[String]) {
    let mut config = kafka.producer_config();
    config.set("message.max.bytes", "50000000");
    let producer: BaseProducer = config.create().unwrap();
    for value in values {
        let mut record: BaseRecord<'_, (), str> =
            BaseRecord::to(topic).payload(value.as_str()).partition(0);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The default configuration except short timeouts, plus `extra` TOML sections.
fn write_config(path: &Path, root_timeout: &str, kafka_extra: &str, buffer_extra: &str) {
    let config = test_config(
        &format!("outcomes_topic = \"{OUTCOMES}\"\n{kafka_extra}"),
        &format!("[buffer]\nroot_timeout = \"{root_timeout}\"\ntimeout = \"10s\"\n{buffer_extra}"),
    );
    std::fs::write(path, config).unwrap();
}

/// A mock cluster with the topics of these tests, a redis-server, and the binary running on
/// them with [`write_config`]'s configuration; its stderr goes to a file.
struct Setup {
    kafka: MockKafka,
    child: RunProcess,
    stderr: std::path::PathBuf,
    _redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl Setup {
    fn start(root_timeout: &str, kafka_extra: &str, buffer_extra: &str) -> Self {
        let kafka = MockKafka::start(1).unwrap();
        for topic in [INPUT, OUTPUT, "ingest-spans-dlq", OUTCOMES] {
            kafka.create_topic(topic, 1).unwrap();
        }
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let (config, stderr) = (dir.path().join("spans.toml"), dir.path().join("stderr"));
        write_config(&config, root_timeout, kafka_extra, buffer_extra);
        let child =
            RunProcess::start_logged(&config, kafka.bootstrap_servers(), &redis.url(), &stderr);
        Self {
            kafka,
            child,
            stderr,
            _redis: redis,
            _dir: dir,
        }
    }
}

/// Waits until every span of `expected` was produced, and returns how often each came out.
fn wait_for_spans(kafka: &MockKafka, expected: &BTreeSet<String>, stderr: &Path) {
    wait_until("every span is produced", || {
        let counts = output_span_counts(kafka);
        let seen = expected
            .iter()
            .filter(|id| counts.contains_key(*id))
            .count();
        if seen < expected.len() {
            let log = read_log(stderr);
            assert!(
                !log.contains("Giving up"),
                "{seen} of {} spans out, and the consumer gave some up: {log}",
                expected.len()
            );
        }
        seen == expected.len()
    });
}

#[test]
fn segments_over_a_megabyte_come_out_whole_with_the_default_producer_settings() {
    let Setup {
        kafka,
        mut child,
        stderr,
        _redis,
        _dir,
    } = Setup::start("1s", "", "");

    // A single 2 MB span, then a trace of 3,000 spans of about 1 KB (3 MB) in one segment.
    let big = big_span(&"1".repeat(32), &"b".repeat(16), 2_000_000);
    produce_large(&kafka, INPUT, &[big]);
    let (trace, mut expected) = trace_spans(&"2".repeat(32), 3_000);
    produce_large(&kafka, INPUT, &trace);
    expected.insert("b".repeat(16));

    wait_for_spans(&kafka, &expected, &stderr);
    let counts = output_span_counts(&kafka);
    assert!(counts.values().all(|&count| count == 1), "a span twice");
    let messages = kafka.read_all(OUTPUT, WAIT).unwrap();
    let big_out = messages
        .iter()
        .map(|m| m.payload.as_deref().unwrap())
        .find(|payload| payload.len() > 2_000_000)
        .expect("the big span in one message");
    let value: sonic_rs::Value = sonic_rs::from_slice(big_out).unwrap();
    let description = value["spans"][0]["description"].as_str().unwrap();
    assert_eq!(description.len(), 2_000_000, "the big span is whole");
    assert!(
        kafka.read_all(OUTCOMES, WAIT).unwrap().is_empty(),
        "nothing given up"
    );
    assert!(child.stop().success());
}

#[test]
fn a_segment_the_broker_refuses_for_its_size_is_split_into_smaller_messages() {
    // The root's deadline leaves time to arm the broker's refusal once the trace is in Redis.
    let Setup {
        kafka,
        mut child,
        stderr,
        _redis,
        _dir,
    } = Setup::start("4s", "", "");
    let (trace, expected) = trace_spans(&"3".repeat(32), 3_000);
    produce_large(&kafka, INPUT, &trace);
    wait_until("the trace is committed (in redis)", || {
        kafka.committed_offsets("process-spans", INPUT, 1).unwrap() == [Some(3_000)]
    });

    // The next three produce requests are refused as a real broker refuses a message over its
    // `message.max.bytes` (the mock has no limit of its own); as many as the attempts per
    // message, so resending the same message would give the segment up.
    kafka
        .inject_request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 3],
        )
        .unwrap();

    wait_for_spans(&kafka, &expected, &stderr);
    let counts = output_span_counts(&kafka);
    assert!(counts.values().all(|&count| count == 1), "a span twice");
    let messages = kafka.read_all(OUTPUT, WAIT).unwrap();
    assert!(messages.len() > 1, "split into {} messages", messages.len());
    for message in &messages {
        let value: sonic_rs::Value =
            sonic_rs::from_slice(message.payload.as_deref().unwrap()).unwrap();
        assert_eq!(
            value["skip_enrichment"].as_bool(),
            Some(true),
            "every part of a split segment skips enrichment"
        );
        assert!(!value["spans"].as_array().unwrap().is_empty());
    }
    assert!(kafka.read_all(OUTCOMES, WAIT).unwrap().is_empty());
    let log = read_log(&stderr);
    assert!(log.contains("refused for its size"), "{log}");
    assert!(child.stop().success());
}

#[test]
fn a_span_too_large_for_any_message_is_given_up_with_an_outcome_and_a_log_naming_it() {
    let Setup {
        kafka,
        mut child,
        stderr,
        _redis,
        _dir,
    } = Setup::start(
        "1s",
        r#"producer_overrides = { "message.max.bytes" = "1000000" }"#,
        "max_segment_bytes = 900000",
    );
    let trace = "4".repeat(32);
    produce_large(
        &kafka,
        INPUT,
        &[
            big_span(&trace, &"c".repeat(16), 1_500_000),
            span(&"5".repeat(32), &"d".repeat(16), None, 8),
        ],
    );

    let outcomes = kafka.read_topic(OUTCOMES, 1, WAIT).unwrap();
    let outcome: sonic_rs::Value =
        sonic_rs::from_slice(outcomes[0].payload.as_deref().unwrap()).unwrap();
    assert_eq!(outcome["reason"].as_str(), Some("produce_failed"));
    assert_eq!(outcome["project_id"].as_u64(), Some(7));
    assert_eq!(outcome["quantity"].as_u64(), Some(1));
    let log = read_log(&stderr);
    let line = log
        .lines()
        .find(|line| line.contains("Giving up"))
        .unwrap_or_else(|| panic!("no error log: {log}"));
    for named in [&format!("trace_id={trace}"), "project_id=7", "spans=1"] {
        assert!(line.contains(named), "{named} in {line}");
    }
    // The consumer goes on: the next span comes out.
    wait_until("the small span is produced", || {
        output_span_counts(&kafka).contains_key(&"d".repeat(16))
    });
    assert!(child.stop().success());
}

#[test]
fn a_producer_limit_below_the_largest_segment_stops_the_binary_at_start_naming_both_settings() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spans.toml");
    write_config(
        &config,
        "1s",
        r#"producer_overrides = { "message.max.bytes" = "1000000" }"#,
        "",
    );

    let output = run_command(&config, "127.0.0.1:9")
        .arg("--check")
        .output()
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("message.max.bytes"), "{stderr}");
    assert!(stderr.contains("buffer.max_segment_bytes"), "{stderr}");
}
