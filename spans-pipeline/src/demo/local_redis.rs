//! A throwaway `redis-server` on a free loopback port, for the demo.
//!
//! Started without persistence in a directory of its own, killed (by its own PID) and removed
//! when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the local server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalRedisError {
    /// `redis-server` could not be run (not installed?).
    #[error("cannot run redis-server (install it with `apt-get install redis-server`)")]
    Spawn(#[source] std::io::Error),
    /// No free port or no temporary directory.
    #[error("cannot prepare the local redis-server")]
    Prepare(#[source] std::io::Error),
    /// It did not answer PING in time.
    #[error("redis-server on port {0} did not answer within 10 s")]
    NotReady(u16),
}

/// A running local `redis-server`.
#[derive(Debug)]
pub struct LocalRedis {
    process: Child,
    port: u16,
    dir: PathBuf,
}

impl LocalRedis {
    /// Starts a server on a free loopback port and waits until it answers.
    ///
    /// # Errors
    ///
    /// See [`LocalRedisError`].
    pub fn start() -> Result<Self, LocalRedisError> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(LocalRedisError::Prepare)?
            .port();
        let dir =
            std::env::temp_dir().join(format!("spans-pipeline-demo-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(LocalRedisError::Prepare)?;
        let process = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(LocalRedisError::Spawn)?;
        let server = Self { process, port, dir };
        server.wait_until_ready()?;
        Ok(server)
    }

    /// The URL to reach it.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn wait_until_ready(&self) -> Result<(), LocalRedisError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let answered = redis::Client::open(self.url())
                .and_then(|client| client.get_connection())
                .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn));
            if answered.is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(LocalRedisError::NotReady(self.port))
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
