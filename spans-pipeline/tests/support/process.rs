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

    /// `SIGTERM`, then waits for the exit (bounded); returns how it ended.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait().unwrap() {
            return status;
        }
        self.signal("TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the consumer did not stop within {STOP_TIMEOUT:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
