//! The `spans-pipeline run` binary as a child process of a test, the way operators run it:
//! configured by a TOML file and flags, against the test's Kafka and Redis on loopback,
//! signalled, stopped gracefully, and killed if a failing test leaves it running.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a consumer may take to stop after `SIGTERM`.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// `spans-pipeline run --config <config> --bootstrap-servers <servers>`, logging warnings;
/// callers add flags (`--redis-url`, `--set`), change `RUST_LOG`, and choose where stderr
/// goes (inherited by default) or capture everything with `output()`.
pub fn run_command(config: &Path, bootstrap_servers: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_spans-pipeline"));
    command
        .args(["run", "--config"])
        .arg(config)
        .args(["--bootstrap-servers", bootstrap_servers])
        .env("RUST_LOG", "warn");
    command
}

/// A configuration for tests: `[kafka]` with a short session timeout and `kafka` added,
/// batches, commits and idle flushers on a 50 ms cadence, then `rest` (more sections).
pub fn test_config(kafka: &str, rest: &str) -> String {
    format!(
        r#"
[kafka]
consumer_overrides = {{ "session.timeout.ms" = "1500", "heartbeat.interval.ms" = "500" }}
{kafka}

[consumer]
max_batch_time = "50ms"
commit_interval = "50ms"

[flusher]
idle_sleep = "50ms"

{rest}
"#
    )
}

/// Runs `command` to its end, asserting it succeeded; its stdout and stderr.
pub fn succeed(command: &mut Command) -> (String, String) {
    let output = command.output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{}: {stderr}", output.status);
    (String::from_utf8(output.stdout).unwrap(), stderr)
}

/// A loopback port nothing listens on now, for a child's metrics endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` of a child's Prometheus endpoint on `port`: the whole HTTP response.
pub fn scrape(port: u16) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// `--set` values of a consumer that batches, commits and flushes within a test's patience.
pub const QUICK: [&str; 5] = [
    "consumer.max_batch_time=50ms",
    "consumer.commit_interval=50ms",
    "flusher.idle_sleep=50ms",
    "buffer.root_timeout=1s",
    "buffer.timeout=2s",
];

/// How long [`wait_for_log`] waits for a line.
const LOG_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the log file at `path` (a child's stderr) contains `needle`, bounded by a
/// deadline; returns the log read then.
pub fn wait_for_log(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + LOG_TIMEOUT;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log within {LOG_TIMEOUT:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The consumer's log with terminal colour codes taken out.
pub fn read_log(path: &Path) -> String {
    let raw = std::fs::read_to_string(path).unwrap_or_default();
    let mut log = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            log.push(c);
        }
    }
    log
}

/// The value of the metric `name` (without labels) on a scraped page, if it is there.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == name).then(|| value.trim().parse().ok()).flatten()
        })
}

/// A running consumer process; killed when dropped while still running.
#[derive(Debug)]
pub struct RunProcess {
    child: Child,
}

impl RunProcess {
    /// Spawns `command` (see [`run_command`]) with its stdout discarded.
    pub fn start(command: &mut Command) -> Self {
        Self {
            child: command.stdout(Stdio::null()).spawn().unwrap(),
        }
    }

    /// `spans-pipeline run` with `config` on `bootstrap_servers` and `redis_url`, its stderr
    /// into a new file at `stderr` (read it with [`read_log`]).
    pub fn start_logged(
        config: &Path,
        bootstrap_servers: &str,
        redis_url: &str,
        stderr: &Path,
    ) -> Self {
        Self::start(
            run_command(config, bootstrap_servers)
                .args(["--redis-url", redis_url])
                .stderr(std::fs::File::create(stderr).unwrap()),
        )
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the signal `name` (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// `SIGKILL`, as a crash: nothing is drained or committed.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits (bounded by `timeout`) for it to exit by itself; returns how it ended.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the consumer did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `SIGTERM`, then waits for the exit (bounded); returns how it ended.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        self.signal("TERM");
        self.wait_for_exit(STOP_TIMEOUT)
    }
}

impl Drop for RunProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
