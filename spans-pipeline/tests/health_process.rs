//! The health file of the `spans-pipeline run` binary, in its own process, against the mock
//! Kafka cluster and a real redis-server.
//!
//! A liveness probe restarts a consumer whose health file goes stale, so the file must mean
//! "the processor loop runs", not "a pipeline is being polled": a member of a group with more
//! members than partitions has no pipeline at all, and was restarted again and again by a probe
//! while it was fine. (That a stuck loop lets the file go stale is shown in rill, where a step
//! can be made to block: `processor::tests::liveness_lapses_when_the_loop_is_stuck_and_holds_through_a_bounded_join`.)

#![allow(clippy::unwrap_used)]

#[path = "support/process.rs"]
mod process;
#[path = "support/consumer.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;
use process::{RunProcess, read_log, run_command, test_config};
use support::{DLQ, INPUT, OUTPUT, output_span_counts, span, wait_until};

/// The binary on `kafka` and `redis`, touching `<dir>/<name>.alive`; stderr in
/// `<dir>/<name>.log`. Returns the process, the health file and the log.
fn member(
    kafka: &MockKafka,
    redis: &RedisServer,
    dir: &Path,
    name: &str,
) -> (RunProcess, PathBuf, PathBuf) {
    let health = dir.join(format!("{name}.alive"));
    let (config, log) = (
        dir.join(format!("{name}.toml")),
        dir.join(format!("{name}.log")),
    );
    let rest = format!(
        "[buffer]\nroot_timeout = \"1s\"\ntimeout = \"2s\"\n\n[observability]\nhealth_file = \"{}\"\n",
        health.display()
    );
    std::fs::write(&config, test_config("outcomes_topic = \"\"", &rest)).unwrap();
    let child = RunProcess::start(
        run_command(&config, kafka.bootstrap_servers())
            .args(["--redis-url", &redis.url()])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    (child, health, log)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Waits until `path` is touched after now: fresh, not just there.
fn wait_until_touched(path: &Path, what: &str) {
    let since = SystemTime::now();
    wait_until(what, || modified(path).is_some_and(|at| at > since));
}

#[test]
fn a_member_without_partitions_keeps_its_health_file_fresh() {
    let kafka = MockKafka::start(1).unwrap();
    for topic in [INPUT, OUTPUT, DLQ] {
        kafka.create_topic(topic, 1).unwrap();
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();

    // The first member takes the only partition: its first span comes out.
    let (mut first, first_health, first_log) = member(&kafka, &redis, dir.path(), "first");
    let trace = "1".repeat(32);
    let spans = [span(&trace, &"a".repeat(16), None, 7)];
    kafka
        .produce(INPUT, spans.iter().map(String::as_bytes), |_| 0)
        .unwrap();
    wait_until("the first span is out", || {
        output_span_counts(&kafka).contains_key(&"a".repeat(16))
    });

    // The second member joins the group and gets nothing (cooperative-sticky keeps the
    // partition where it is); its loop runs all the same.
    let (mut second, second_health, second_log) = member(&kafka, &redis, dir.path(), "second");
    process::wait_for_log(&second_log, "Consuming.");
    wait_until_touched(
        &second_health,
        "the member without partitions touches its file",
    );
    wait_until_touched(&second_health, "... and touches it again");
    wait_until_touched(
        &first_health,
        "the member with the partition touches its file",
    );
    let log = read_log(&second_log);
    assert!(
        !log.lines()
            .any(|line| line.contains("Partitions assigned.") && line.contains(INPUT)),
        "the second member got a partition:\n{log}"
    );

    assert!(second.stop().success(), "{}", read_log(&second_log));
    assert!(first.stop().success(), "{}", read_log(&first_log));
}
