//! The `spans-pipeline run` binary as operators run it: a separate process configured by a
//! TOML file and flags, talking to a mock Kafka cluster (real TCP listeners in this test
//! process) and a real redis-server. SIGHUP reloads the kill-switch without a restart;
//! SIGTERM stops it gracefully with everything committed.

#![allow(clippy::unwrap_used)]

#[path = "support/process.rs"]
mod process;

use std::io::Write as _;
use std::time::Duration;

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;

const WAIT: Duration = Duration::from_secs(60);

fn span(trace: &str, span_id: &str, parent: Option<&str>, project: u64) -> String {
    let parent = parent.map_or("null".to_owned(), |p| format!("\"{p}\""));
    format!(
        r#"{{"organization_id":1,"project_id":{project},"trace_id":"{trace}","span_id":"{span_id}","parent_span_id":{parent},"start_timestamp":1.0,"end_timestamp":2.0,"received":2.0,"retention_days":90,"status":"ok"}}"#
    )
}

#[test]
fn run_consumes_reloads_on_sighup_and_stops_gracefully_on_sigterm() {
    let kafka = MockKafka::start(1).unwrap();
    for (topic, partitions) in [
        ("ingest-spans", 1),
        ("buffered-segments", 1),
        ("ingest-spans-dlq", 1),
    ] {
        kafka.create_topic(topic, partitions).unwrap();
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("spans.toml");
    let health = dir.path().join("alive");
    let write_config = |killed_projects: &str| {
        let mut file = std::fs::File::create(&config_path).unwrap();
        write!(
            file,
            r#"
[kafka]
consumer_overrides = {{ "session.timeout.ms" = "1500", "heartbeat.interval.ms" = "500" }}

[consumer]
max_batch_time = "50ms"
commit_interval = "50ms"

[flusher]
idle_sleep = "50ms"

[buffer]
root_timeout = "1s"
timeout = "2s"

[kill_switch]
projects = [{killed_projects}]

[observability]
health_file = "{}"
"#,
            health.display()
        )
        .unwrap();
    };
    write_config("");
    let log = dir.path().join("stderr.log");
    let mut child = process::RunProcess::start(
        process::run_command(&config_path, kafka.bootstrap_servers())
            .args(["--redis-url", &redis.url()])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap()),
    );

    let trace = "3".repeat(32);
    let first = [span(&trace, &"a".repeat(16), None, 7)];
    kafka
        .produce("ingest-spans", first.iter().map(String::as_bytes), |_| 0)
        .unwrap();
    let output = kafka.read_topic("buffered-segments", 1, WAIT).unwrap();
    assert!(
        String::from_utf8_lossy(output[0].payload.as_deref().unwrap()).contains(&"a".repeat(16))
    );
    assert!(
        health.exists(),
        "the health file is touched while the consumer runs"
    );

    // Project 7 is now killed: its next span is consumed (and committed) but never flushed.
    write_config("7");
    child.signal("HUP");
    process::wait_for_log(&log, "Kill-switch reloaded.");
    let second = [
        span(&"4".repeat(32), &"b".repeat(16), None, 7),
        span(&"5".repeat(32), &"c".repeat(16), None, 8),
    ];
    kafka
        .produce("ingest-spans", second.iter().map(String::as_bytes), |_| 0)
        .unwrap();
    let output = kafka.read_topic("buffered-segments", 2, WAIT).unwrap();
    let last = String::from_utf8_lossy(output[1].payload.as_deref().unwrap()).into_owned();
    assert!(last.contains(&"c".repeat(16)), "{last}");

    let status = child.stop();
    assert!(status.success(), "{status}");
    assert_eq!(
        kafka
            .committed_offsets("process-spans", "ingest-spans", 1)
            .unwrap(),
        [Some(3)]
    );
    assert_eq!(
        kafka.read_all("buffered-segments", WAIT).unwrap().len(),
        2,
        "the killed span was flushed"
    );
}

/// `run --check` with `args`; its stdout.
fn check(config: &std::path::Path, args: &[&str]) -> String {
    process::succeed(
        process::run_command(config, "broker:9092")
            .arg("--check")
            .args(args),
    )
    .0
}

#[test]
fn check_prints_toml_that_saved_as_the_file_checks_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.toml");
    std::fs::write(
        &first,
        "[buffer]\nmax_segment_bytes = \"8MiB\"\nroot_timeout = \"5s\"\n[kill_switch]\nprojects = [9, 2]\n",
    )
    .unwrap();
    let printed = check(
        &first,
        &[
            "--set",
            "flusher.workers=3",
            "--set",
            "redis.password=hunter2",
        ],
    );
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(
        printed.contains("max_segment_bytes = \"8MiB\""),
        "{printed}"
    );
    let saved = dir.path().join("saved.toml");
    std::fs::write(&saved, &printed).unwrap();

    // The saved file alone gives the same configuration; only the password must be given again.
    let again = check(&saved, &["--set", "redis.password=hunter2"]);

    assert_eq!(again, printed);
}
