//! Throwaway tansu brokers: a second, independent implementation of the Kafka protocol.
//!
//! librdkafka's mock cluster is librdkafka answering itself, so a protocol detail both sides get
//! wrong the same way would go unnoticed there. tansu is a Kafka-compatible broker written in
//! Rust; started here with memory storage on a free loopback port, one process per test (it is
//! listening in a few tens of milliseconds), so tests never share topics or groups, and it is
//! killed and waited for on drop. The binary is the `tansu` on `PATH`, or the one named by
//! [`TANSU_BIN_ENV`]; `make test-tansu` installs it when missing.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable naming the tansu binary (default: `tansu` on `PATH`).
pub const TANSU_BIN_ENV: &str = "RILL_TANSU_BIN";

/// How long a broker may take to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a broker that accepts connections must stay alive to count as ours: a broker that
/// lost the race for its port exits at once, and the connection came from someone else's.
const SETTLE_TIME: Duration = Duration::from_millis(100);

/// Why a tansu broker could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TansuError {
    /// The binary could not be spawned (not installed?).
    #[error("failed to spawn {binary} (install it with `make test-tansu`)")]
    Spawn {
        /// The binary that was run.
        binary: String,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },
    /// The temporary directory or a free port could not be obtained.
    #[error("failed to prepare tansu")]
    Prepare(#[source] std::io::Error),
    /// The broker did not accept connections in time.
    #[error("tansu on port {port} did not become ready: {reason}")]
    NotReady {
        /// Port of the broker.
        port: u16,
        /// What was last observed.
        reason: String,
    },
}

/// A tansu broker with memory storage on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct TansuBroker {
    process: Child,
    port: u16,
    dir: TempDir,
}

impl TansuBroker {
    /// Starts a broker and waits until it accepts connections, retrying a few times if the
    /// chosen port was taken meanwhile.
    ///
    /// # Errors
    ///
    /// Fails if the binary cannot be run or the broker never becomes ready.
    pub fn start() -> Result<Self, TansuError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::spawn() {
                Err(TansuError::NotReady { .. }) if attempt < 5 => continue,
                other => return other,
            }
        }
    }

    fn spawn() -> Result<Self, TansuError> {
        let dir = TempDir::new().map_err(TansuError::Prepare)?;
        let port = free_port()?;
        let listener = format!("tcp://127.0.0.1:{port}");
        let binary = binary();
        let log =
            std::fs::File::create(dir.path().join("tansu.log")).map_err(TansuError::Prepare)?;
        let process = Command::new(&binary)
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| TansuError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let mut broker = Self { process, port, dir };
        broker.wait_until_ready()?;
        Ok(broker)
    }

    /// `127.0.0.1:<port>`, the `bootstrap.servers` value that reaches this broker.
    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the broker logged (warnings and errors), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    fn wait_until_ready(&mut self) -> Result<(), TansuError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last_error = String::from("no answer");
        while Instant::now() < deadline {
            if let Some(status) = self.exit_status()? {
                return Err(self.not_ready(format!("exited with {status}: {}", self.log())));
            }
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(_) => {
                    std::thread::sleep(SETTLE_TIME);
                    return match self.exit_status()? {
                        None => Ok(()),
                        Some(status) => {
                            Err(self.not_ready(format!("exited with {status}: {}", self.log())))
                        }
                    };
                }
                Err(error) => last_error = error.to_string(),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(self.not_ready(last_error))
    }

    fn exit_status(&mut self) -> Result<Option<std::process::ExitStatus>, TansuError> {
        self.process.try_wait().map_err(TansuError::Prepare)
    }

    fn not_ready(&self, reason: String) -> TansuError {
        TansuError::NotReady {
            port: self.port,
            reason,
        }
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn binary() -> PathBuf {
    std::env::var_os(TANSU_BIN_ENV).map_or_else(|| PathBuf::from("tansu"), PathBuf::from)
}

fn free_port() -> Result<u16, TansuError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(TansuError::Prepare)?;
    Ok(listener.local_addr().map_err(TansuError::Prepare)?.port())
}
