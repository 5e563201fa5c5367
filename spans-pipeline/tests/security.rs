//! Who may talk to the buffer's Redis, over what, and what the buffer may touch there.
//!
//! - Password and ACL user: the buffer runs end to end as an ACL user on a standalone server
//!   and on a cluster whose default user is switched off; a wrong password fails at connect
//!   with the server's reason and without the password.
//! - TLS: the buffer runs end to end over `rediss://` against a server whose certificate is
//!   signed by a CA generated for the test, with and without a client certificate, and against
//!   a cluster whose nodes send clients to their TLS ports; a client that does not trust that
//!   CA is refused at the handshake.
//! - Key discipline: every command `add-buffer.lua` issues, as `MONITOR` reports it, touches
//!   only keys carrying the hash tag of one of the call's declared keys. (On a cluster any
//!   other key would fail the script outright; every buffer test runs on a cluster too.)
//! - Secrets: with a Kafka SASL password and a Redis password in the configuration, neither
//!   appears in `--check` output, debug logs, the metrics endpoint or a refused start's error.
//! - The binary: `spans-pipeline run` reads its CA, client certificate and key from the
//!   configuration and consumes over mutual TLS.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;
#[path = "support/process.rs"]
mod process;

use std::process::Command;
use std::time::{Duration, Instant};

use buffer_support::{SpanSpec, flush_until_empty, spans};
use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;
use integration_tests::secure_redis::{AclRedis, TlsRedis, USER};
use process::{RunProcess, wait_for_log};
use redis::{ClientTlsConfig, TlsCertificates};
use spans_pipeline::buffer::{BufferOptions, RedisConnection, SpansBuffer};

/// Spans of three traces in batches: subtrees that merge when their root arrives later, a
/// segment that detaches for size, and one that is written while a flush holds its lock.
struct Workload {
    batches: Vec<Vec<SpanSpec>>,
}

impl Workload {
    fn new() -> Self {
        let trace = |n: char| n.to_string().repeat(32);
        let a = |spec: SpanSpec| spec.trace(&trace('1'));
        let x = |spec: SpanSpec| spec.trace(&trace('2'));
        let p = |spec: SpanSpec| spec.trace(&trace('3')).project(7);
        Self {
            batches: vec![
                vec![
                    a(SpanSpec::child('b', 'a')),
                    a(SpanSpec::child('c', 'b')),
                    x(SpanSpec::root('x')),
                    x(SpanSpec::child('y', 'x')),
                    p(SpanSpec::child('q', 'p')),
                ],
                vec![a(SpanSpec::root('a')), p(SpanSpec::child('r', 'q'))],
                // 90 more bytes on a segment of 90, over the 150-byte limit: detaches.
                vec![
                    a(SpanSpec::child('d', 'a')),
                    a(SpanSpec::child('e', 'a')),
                    a(SpanSpec::child('f', 'a')),
                ],
            ],
        }
    }

    fn options() -> BufferOptions {
        BufferOptions {
            max_segment_bytes: 150,
            flush_lock_ttl: Duration::from_secs(30),
            ..BufferOptions::default()
        }
    }

    fn span_count(&self) -> usize {
        self.batches.iter().map(Vec::len).sum::<usize>() + 1
    }

    /// Writes the batches, flushes the root segments (locking them), writes one more span
    /// into a locked segment, then drains the buffer; returns the spans that came out.
    async fn run(&self, buffer: &SpansBuffer) -> usize {
        for batch in &self.batches {
            buffer.process_spans(&spans(batch), 0).await.unwrap();
        }
        let first = buffer.load_due_segments(20).await.unwrap();
        assert!(!first.segments.is_empty(), "root segments are due at 20");
        let late = [SpanSpec::child('z', 'x').trace(&"2".repeat(32))];
        buffer.process_spans(&spans(&late), 20).await.unwrap();
        buffer.done_flush_segments(&first.segments).await.unwrap();
        let rest = flush_until_empty(buffer, 1000, 20).await;
        assert_eq!(rest.lost_spans, 0);
        first.segments.iter().map(|s| s.spans.len()).sum::<usize>() + rest.span_count()
    }
}

async fn buffer_on(connection: RedisConnection) -> SpansBuffer {
    SpansBuffer::new(connection, Workload::options(), vec![0], None)
        .await
        .unwrap()
}

/// Keys left that are not the (expiring) root flags `done` keeps on purpose.
fn data_keys(keys: Vec<String>) -> Vec<String> {
    keys.into_iter().filter(|k| !k.contains(":hrs:")).collect()
}

#[tokio::test]
async fn the_buffer_runs_as_an_acl_user_on_a_standalone_server_and_a_cluster() {
    for redis in [
        AclRedis::standalone("acl-pa55word").unwrap(),
        AclRedis::cluster("acl-pa55word").unwrap(),
    ] {
        let urls = redis.urls_as(USER, redis.password());
        let connection = RedisConnection::connect(&urls, redis.is_cluster())
            .await
            .unwrap();
        let workload = Workload::new();

        let flushed = workload.run(&buffer_on(connection).await).await;

        assert_eq!(
            flushed,
            workload.span_count(),
            "cluster: {}",
            redis.is_cluster()
        );
        assert_eq!(data_keys(redis.keys()), Vec::<String>::new());
    }
}

#[tokio::test]
async fn a_wrong_password_is_refused_at_connect_without_showing_it() {
    let servers = [
        AclRedis::standalone("right-pa55word").unwrap(),
        AclRedis::cluster("right-pa55word").unwrap(),
    ];
    // All at once: the cluster client retries its first connections for some seconds.
    let attempts = servers.iter().flat_map(|redis| {
        [redis.urls_as(USER, "wrong-pa55word"), redis.urls()].map(|urls| async move {
            let connect = RedisConnection::connect(&urls, redis.is_cluster());
            tokio::time::timeout(Duration::from_secs(30), connect).await
        })
    });
    for outcome in futures::future::join_all(attempts).await {
        let error = outcome
            .expect("a refused login fails within the retries")
            .unwrap_err();

        let printed = format!("{error} / {error:?}");
        let lowercase = printed.to_lowercase();
        assert!(
            lowercase.contains("authentication") || lowercase.contains("noauth"),
            "{printed}"
        );
        assert!(!printed.contains("pa55word"), "{printed}");
    }
}

fn certificates(redis: &TlsRedis, with_client_certificate: bool) -> TlsCertificates {
    let read = |path: std::path::PathBuf| std::fs::read(path).unwrap();
    let (cert, key) = redis.certificates().client_files();
    TlsCertificates {
        client_tls: with_client_certificate.then(|| ClientTlsConfig {
            client_cert: read(cert),
            client_key: read(key),
        }),
        root_cert: Some(read(redis.certificates().ca_file())),
    }
}

#[tokio::test]
async fn the_buffer_runs_over_tls_with_and_without_a_client_certificate() {
    for (redis, mutual) in [
        (TlsRedis::start(false).unwrap(), false),
        (TlsRedis::start(true).unwrap(), true),
        (TlsRedis::cluster().unwrap(), false),
    ] {
        let case = format!("cluster: {}, mutual: {mutual}", redis.is_cluster());
        let connection = RedisConnection::connect_with_tls(
            &redis.tls_urls(),
            redis.is_cluster(),
            Some(certificates(&redis, mutual)),
        )
        .await
        .unwrap();
        let workload = Workload::new();

        let flushed = workload.run(&buffer_on(connection).await).await;

        assert_eq!(flushed, workload.span_count(), "{case}");
        let tls_clients: usize = redis.servers().into_iter().map(tls_clients).sum();
        assert!(
            tls_clients > 0,
            "{case}: the buffer's connections are tls clients"
        );
        assert_eq!(data_keys(redis.keys()), Vec::<String>::new(), "{case}");
    }
}

/// Clients of `server` connected through its TLS port (their `laddr` is not the plain port;
/// cluster bus links are not clients).
fn tls_clients(server: &RedisServer) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut server.connection())
        .unwrap();
    let plain = format!("laddr=127.0.0.1:{} ", server.port());
    list.lines().filter(|line| !line.contains(&plain)).count()
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_is_refused() {
    let redis = TlsRedis::start(false).unwrap();
    let stranger = TlsRedis::start(false).unwrap();
    let strangers_ca = TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(stranger.certificates().ca_file()).unwrap()),
    };

    // Both at once: a failed handshake is retried by the connection manager for some seconds.
    let attempts = [Some(strangers_ca), None].map(|certificates| {
        let urls = redis.tls_urls();
        async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                RedisConnection::connect_with_tls(&urls, false, certificates),
            )
            .await
        }
    });
    for outcome in futures::future::join_all(attempts).await {
        let error = outcome
            .expect("a refused handshake fails within the retries")
            .unwrap_err();

        let printed = format!("{error:?}").to_lowercase();
        assert!(
            printed.contains("certificate") || printed.contains("unknownissuer"),
            "{printed}"
        );
    }
}

#[tokio::test]
async fn mutual_tls_refuses_a_client_without_a_certificate() {
    let redis = TlsRedis::start(true).unwrap();

    let result = tokio::time::timeout(
        Duration::from_secs(30),
        RedisConnection::connect_with_tls(
            &redis.tls_urls(),
            false,
            Some(certificates(&redis, false)),
        ),
    )
    .await
    .expect("a refused handshake fails within the retries");

    let error = result.unwrap_err();
    assert!(
        error.is_connection_dropped()
            || error.is_io_error()
            || format!("{error:?}").contains("certificate"),
        "{error:?}"
    );
}

/// One command as `MONITOR` prints it: who issued it (`lua` for a script) and its arguments.
#[derive(Debug)]
struct Monitored {
    from_lua: bool,
    args: Vec<Vec<u8>>,
}

/// Parses `<time> [<db> <client>] "ARG" "ARG" ...`, whose arguments are C-escaped.
fn parse_monitor_line(line: &str) -> Option<Monitored> {
    let client_start = line.find('[')?;
    let client_end = client_start + line[client_start..].find(']')?;
    let from_lua = line[client_start..client_end].ends_with(" lua");
    let mut args = Vec::new();
    let mut bytes = line[client_end + 1..].bytes();
    while let Some(byte) = bytes.next() {
        if byte != b'"' {
            continue;
        }
        let mut arg = Vec::new();
        loop {
            match bytes.next()? {
                b'"' => break,
                b'\\' => match bytes.next()? {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(7),
                    b'b' => arg.push(8),
                    b'x' => {
                        let high = bytes.next()?;
                        let low = bytes.next()?;
                        let hex = [high, low];
                        arg.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
                    }
                    other => arg.push(other),
                },
                other => arg.push(other),
            }
        }
        args.push(arg);
    }
    Some(Monitored { from_lua, args })
}

/// The argument of the `ECHO` that ends a [`monitor`]: MONITOR reports commands in the order
/// the server ran them, so once it shows this one it has shown every command before it.
const END_OF_MONITOR: &str = "end-of-monitor";

/// Collects `MONITOR` output of `server` on a thread until it sees [`end_monitor`]'s command
/// (bounded by a deadline).
fn monitor(server: &RedisServer) -> std::thread::JoinHandle<Vec<String>> {
    let mut conn = server.connection();
    let _: () = redis::cmd("MONITOR").query(&mut conn).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        loop {
            match conn.recv_response() {
                Ok(redis::Value::SimpleString(line)) if line.contains(END_OF_MONITOR) => {
                    return lines;
                }
                Ok(redis::Value::SimpleString(line)) => lines.push(line),
                Ok(other) => panic!("unexpected monitor reply {other:?}"),
                Err(error) if error.is_timeout() => {
                    assert!(Instant::now() < deadline, "the monitor never saw its end");
                }
                Err(error) => panic!("monitor failed: {error}"),
            }
        }
    })
}

/// Ends a [`monitor`] of `server` after every command sent so far.
fn end_monitor(server: &RedisServer) {
    let _: String = redis::cmd("ECHO")
        .arg(END_OF_MONITOR)
        .query(&mut server.connection())
        .unwrap();
}

/// The keys of a command, as the server itself reads them (`COMMAND GETKEYS`).
fn keys_of(conn: &mut redis::Connection, args: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut cmd = redis::cmd("COMMAND");
    cmd.arg("GETKEYS");
    for arg in args {
        cmd.arg(arg.as_slice());
    }
    // Commands without keys (TIME) are refused by GETKEYS.
    cmd.query(conn).unwrap_or_default()
}

#[tokio::test]
async fn the_script_touches_only_keys_of_its_declared_hash_tag() {
    let server = RedisServer::start();
    let monitoring = monitor(&server);
    let connection = RedisConnection::connect(&[server.url()], false)
        .await
        .unwrap();
    let workload = Workload::new();
    let flushed = workload.run(&buffer_on(connection).await).await;
    assert_eq!(flushed, workload.span_count());
    end_monitor(&server);
    let lines = monitoring.join().unwrap();

    // MONITOR shows a script call, then the commands it ran.
    let mut conn = server.connection();
    // The hash tags `{<key>}` of the running call's declared keys.
    let mut tags: Option<Vec<Vec<u8>>> = None;
    let (mut calls, mut checked) = (0, 0);
    for line in &lines {
        let command = parse_monitor_line(line).unwrap_or_else(|| panic!("{line}"));
        if command.from_lua {
            let tags = tags
                .as_deref()
                .unwrap_or_else(|| panic!("script command before any call: {line}"));
            for key in keys_of(&mut conn, &command.args) {
                checked += 1;
                let inside = |tag: &Vec<u8>| key.windows(tag.len()).any(|w| w == tag.as_slice());
                assert!(
                    tags.iter().any(inside),
                    "{line}: {} is outside the declared keys",
                    String::from_utf8_lossy(&key),
                );
            }
            continue;
        }
        let name = String::from_utf8_lossy(&command.args[0]).to_ascii_uppercase();
        if name == "EVALSHA" || name == "EVAL" {
            let declared: usize = String::from_utf8_lossy(&command.args[2]).parse().unwrap();
            assert!(declared >= 1, "a call declares its keys: {line}");
            let keys = &command.args[3..3 + declared];
            // add-buffer's calls (the lock scripts' declared keys are whole `span-buf:` keys).
            calls += usize::from(!keys[0].starts_with(b"span-buf:"));
            // add-buffer declares hash tags (`project:trace`) and touches keys inside them; the
            // flush lock scripts declare whole keys and touch those only.
            tags = Some(
                keys.iter()
                    .flat_map(|key| [[b"{".as_slice(), key, b"}"].concat(), key.clone()])
                    .collect(),
            );
        }
    }
    // At least one call per batch: three batches and the late span.
    assert!(calls >= 4, "{calls} script calls");
    assert!(
        checked >= 10 * calls,
        "{checked} keys checked in {calls} calls"
    );
}

#[test]
fn monitor_lines_are_unescaped() {
    let line = r#"1700000000.000001 [0 lua] "SADD" "span-buf:s:{1:t}:\xff" "a\"b\\c""#;

    let parsed = parse_monitor_line(line).unwrap();

    assert!(parsed.from_lua);
    assert_eq!(
        parsed.args,
        [
            b"SADD".to_vec(),
            b"span-buf:s:{1:t}:\xff".to_vec(),
            b"a\"b\\c".to_vec()
        ]
    );
    let client = parse_monitor_line(r#"1.0 [0 127.0.0.1:5000] "PING""#).unwrap();
    assert!(!client.from_lua);
}

const KAFKA_SECRET: &str = "kafka-secret-7f3a";
const REDIS_SECRET: &str = "redis-secret-9c1e";

/// A `spans-pipeline run` configuration with a SASL login for Kafka (used with
/// `SASL_PLAINTEXT`, carried but unused with `PLAINTEXT`) and an ACL login for Redis.
fn secret_config(redis: &AclRedis, metrics_port: u16, protocol: &str) -> String {
    let security = format!(
        r#""security.protocol" = "{protocol}", "sasl.mechanism" = "PLAIN", "sasl.username" = "spans", "sasl.password" = "{KAFKA_SECRET}""#
    );
    format!(
        r#"
[kafka]
consumer_overrides = {{ {security}, "session.timeout.ms" = "1500", "heartbeat.interval.ms" = "500" }}
producer_overrides = {{ {security} }}

[redis]
urls = ["{}"]
username = "{USER}"
password = "{}"

[consumer]
max_batch_time = "50ms"

[observability]
metrics_listen = "127.0.0.1:{metrics_port}"
"#,
        redis.urls()[0],
        redis.password(),
    )
}

/// `spans-pipeline run` on `kafka` with every log level on, so no secret can hide in a level
/// the test did not look at.
fn run_command(config: &std::path::Path, kafka: &MockKafka) -> Command {
    let mut command = process::run_command(config, kafka.bootstrap_servers());
    command.env("RUST_LOG", "trace");
    command
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [KAFKA_SECRET, REDIS_SECRET, "wrong-secret"] {
        assert!(!text.contains(secret), "{secret} in {what}:\n{text}");
    }
}

#[test]
fn secrets_stay_out_of_logs_errors_and_metrics() {
    let kafka = MockKafka::start(1).unwrap();
    for topic in ["ingest-spans", "buffered-segments", "ingest-spans-dlq"] {
        kafka.create_topic(topic, 1).unwrap();
    }
    let redis = AclRedis::standalone(REDIS_SECRET).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spans.toml");
    let metrics_port = process::free_port();
    std::fs::write(&config, secret_config(&redis, metrics_port, "PLAINTEXT")).unwrap();

    // The configuration as `--check` prints it.
    let check = run_command(&config, &kafka)
        .arg("--check")
        .output()
        .unwrap();
    assert!(check.status.success());
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(printed.contains("sasl.username"), "{printed}");
    assert_no_secret("--check output", &printed);

    // Start-up, a dead-lettered message and a graceful stop, with every log level on.
    let log_path = dir.path().join("stderr.log");
    let mut child = RunProcess::start(
        run_command(&config, &kafka).stderr(std::fs::File::create(&log_path).unwrap()),
    );
    let logs = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_for_log(&log_path, "Consuming.");
    kafka
        .produce("ingest-spans", [b"not a span".as_slice()], |_| 0)
        .unwrap();
    wait_for_log(&log_path, "Dead-lettering");
    assert!(child.is_running(), "the consumer stopped:\n{}", logs());
    let metrics = process::scrape(metrics_port);
    assert!(metrics.contains("200 OK"), "{metrics}");
    assert_no_secret("metrics", &metrics);
    assert!(child.stop().success());
    let logs = logs();
    assert!(logs.contains("Dead-lettering"), "{logs}");
    assert_no_secret("logs", &logs);

    // A broker that refuses the SASL login (the mock cluster has no SASL): the consumer stops
    // with the broker's reason, and neither the reason nor the logs carry the password.
    std::fs::write(
        &config,
        secret_config(&redis, process::free_port(), "SASL_PLAINTEXT"),
    )
    .unwrap();
    let refused = run_command(&config, &kafka).output().unwrap();
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("Authentication"), "{error}");
    assert_no_secret("the kafka error", &error);

    // A wrong Redis password: the error names the problem, not the password.
    let refused = run_command(&config, &kafka)
        .args(["--set", "redis.password=wrong-secret"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains("cannot connect to redis"), "{error}");
    assert!(error.to_lowercase().contains("authentication"), "{error}");
    assert_no_secret("the error", &error);
}

#[test]
fn the_consumer_reads_its_tls_files_from_the_configuration() {
    let kafka = MockKafka::start(1).unwrap();
    for topic in ["ingest-spans", "buffered-segments", "ingest-spans-dlq"] {
        kafka.create_topic(topic, 1).unwrap();
    }
    // Mutual TLS, so the connection needs all three files.
    let redis = TlsRedis::start(true).unwrap();
    let (cert, key) = redis.certificates().client_files();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spans.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[redis]
urls = ["{}"]
ca_file = "{}"
client_cert_file = "{}"
client_key_file = "{}"

[consumer]
max_batch_time = "50ms"

[flusher]
idle_sleep = "50ms"

[buffer]
root_timeout = "1s"
"#,
            redis.tls_urls()[0],
            redis.certificates().ca_file().display(),
            cert.display(),
            key.display(),
        ),
    )
    .unwrap();
    let mut child = RunProcess::start(run_command(&config, &kafka).env("RUST_LOG", "warn"));

    let root = format!(
        r#"{{"organization_id":1,"project_id":3,"trace_id":"{}","span_id":"{}","parent_span_id":null,"start_timestamp":1.0,"end_timestamp":2.0,"received":2.0,"retention_days":90,"status":"ok"}}"#,
        "7".repeat(32),
        "e".repeat(16),
    );
    kafka
        .produce("ingest-spans", [root.as_bytes()], |_| 0)
        .unwrap();
    let output = kafka
        .read_topic("buffered-segments", 1, Duration::from_secs(60))
        .unwrap();
    let tls_clients = tls_clients(redis.servers()[0]);
    let status = child.stop();

    let segment = String::from_utf8_lossy(output[0].payload.as_deref().unwrap()).into_owned();
    assert!(segment.contains(&"e".repeat(16)), "{segment}");
    assert!(tls_clients > 0, "the consumer talks to redis over tls");
    assert!(status.success(), "{status}");
}
