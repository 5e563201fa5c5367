//! Throwaway `redis-server` processes on free loopback ports, for tests and benches.
//!
//! Tests talk to real Redis, never to a mock: the buffer's correctness lives as much in
//! `add-buffer.lua` and in Redis Cluster's slot rules as in Rust. A [`RedisServer`] is one
//! standalone server per test (cheap, about 10 ms to start), so tests never see each other's
//! keys. A [`RedisCluster`] is three masters wired by hand with `CLUSTER ADDSLOTSRANGE` and
//! `CLUSTER MEET` (about 2 s to converge), so one cluster is shared per test binary through
//! [`RedisCluster::shared`], which serialises its users and flushes every node between them.
//! Every process is killed and waited for on drop.
//!
//! Fault tests need more than a healthy server: [`RedisServer::stop`] and
//! [`RedisServer::restart`] take a server down and bring it back on the same port and data
//! directory (so with `--appendonly yes` its data survives), and [`RedisServer::pause_clients`]
//! freezes every client for a while, as a stalled server would.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to answer `PING`, or a cluster to report `cluster_state:ok`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Slot ranges of the three cluster masters.
const CLUSTER_SLOT_RANGES: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

/// Why a test Redis could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisServerError {
    /// `redis-server` could not be spawned (not installed?).
    #[error("failed to spawn redis-server")]
    Spawn(#[source] std::io::Error),
    /// The temporary directory or a free port could not be obtained.
    #[error("failed to prepare redis-server")]
    Prepare(#[source] std::io::Error),
    /// The server did not become ready in time.
    #[error("redis-server on port {port} did not become ready: {reason}")]
    NotReady {
        /// Port of the server.
        port: u16,
        /// What was last observed.
        reason: String,
    },
    /// A command used to set the server up failed.
    #[error("redis setup command failed")]
    Redis(#[from] redis::RedisError),
}

/// One key left in Redis, with its remaining time to live (`-1` when it has none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyTtl {
    /// The key's bytes.
    pub key: Vec<u8>,
    /// `TTL` of the key in seconds; `-1` means no expiry.
    pub ttl_secs: i64,
}

impl KeyTtl {
    /// The key as text, lossily, for assertions and messages.
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(&self.key).into_owned()
    }
}

/// A standalone `redis-server` on a free loopback port, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// Behind a lock so that a node of the shared cluster can be stopped and restarted too.
    process: Mutex<Child>,
    port: u16,
    dir: TempDir,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a standalone server without persistence and waits until it answers `PING`.
    ///
    /// # Panics
    ///
    /// Panics when the server cannot be started; use [`RedisServer::try_start`] to handle it.
    pub fn start() -> Self {
        match Self::try_start() {
            Ok(server) => server,
            Err(error) => panic!("cannot start redis-server: {error}"),
        }
    }

    /// Starts a standalone server, retrying a few times if the chosen port was taken meanwhile.
    pub fn try_start() -> Result<Self, RedisServerError> {
        retry_on_port_race(|| Self::spawn(&[]))
    }

    /// Starts a standalone server with extra `redis-server` arguments (for example
    /// `["--maxmemory", "10mb"]`), retrying a few times if the chosen port was taken meanwhile.
    ///
    /// The plain port stays open on 127.0.0.1 and the default user stays passwordless, so the
    /// readiness check and [`RedisServer::connection`] keep working; arguments that add a TLS
    /// port or ACL users come on top of that.
    pub fn try_start_with_args(extra_args: &[&str]) -> Result<Self, RedisServerError> {
        retry_on_port_race(|| Self::spawn(extra_args))
    }

    fn spawn(extra_args: &[&str]) -> Result<Self, RedisServerError> {
        let dir = TempDir::new().map_err(RedisServerError::Prepare)?;
        let port = free_port()?;
        let process = spawn_redis(port, dir.path(), extra_args)?;
        let server = Self {
            process: Mutex::new(process),
            port,
            dir,
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
        };
        server.wait_for_ping()?;
        Ok(server)
    }

    /// Kills the server (`SIGKILL`, as a crash would) and waits until it is gone; its port and
    /// data directory are kept for [`RedisServer::restart`]. Does nothing if it is stopped.
    ///
    /// A node of a cluster keeps its `nodes.conf` there, so it rejoins with its slots when
    /// restarted.
    pub fn stop(&self) {
        let mut process = self.process();
        if matches!(process.try_wait(), Ok(None)) {
            let _ = process.kill();
        }
        let _ = process.wait();
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        matches!(self.process().try_wait(), Ok(None))
    }

    /// Starts the server again on the same port and data directory, with the same arguments,
    /// stopping it first if it still runs; waits until it answers.
    ///
    /// # Errors
    ///
    /// The server could not be spawned, or did not answer in time (for example because another
    /// process took the port while it was down).
    pub fn restart(&self) -> Result<(), RedisServerError> {
        self.stop();
        let args: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        *self.process() = spawn_redis(self.port, self.dir.path(), &args)?;
        self.wait_for_ping()
    }

    fn process(&self) -> MutexGuard<'_, Child> {
        self.process
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `CLIENT PAUSE <duration> ALL`: every client's commands wait until `duration` passed.
    ///
    /// # Panics
    ///
    /// Panics when the server does not accept the command.
    pub fn pause_clients(&self, duration: Duration) {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
            .arg("ALL")
            .query(&mut self.connection())
            .unwrap_or_else(|error| panic!("CLIENT PAUSE failed: {error}"));
    }

    /// `CONFIG SET <name> <value>`, for limits changed while a test runs.
    ///
    /// # Panics
    ///
    /// Panics when the server refuses the setting.
    pub fn config_set(&self, name: &str, value: impl redis::ToRedisArgs) {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query(&mut self.connection())
            .unwrap_or_else(|error| panic!("CONFIG SET {name} failed: {error}"));
    }

    /// The value of `field` in the `INFO <section>` reply, if the server reports it.
    ///
    /// # Panics
    ///
    /// Panics when the server does not answer.
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query(&mut self.connection())
            .unwrap_or_else(|error| panic!("INFO {section} failed: {error}"));
        info.lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .map(|value| value.trim().to_owned())
    }

    /// How many commands the server refused with error `code` (`OOM`, `NOSCRIPT`, ...) since
    /// it started, from `INFO errorstats`.
    ///
    /// # Panics
    ///
    /// Panics when the server does not answer.
    pub fn error_count(&self, code: &str) -> u64 {
        self.info_field("errorstats", &format!("errorstat_{code}"))
            .and_then(|stat| stat.strip_prefix("count=")?.parse().ok())
            .unwrap_or(0)
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A blocking connection, for setup and assertions.
    pub fn connection(&self) -> redis::Connection {
        connect_sync(&self.url())
    }

    /// Every key of the server with its TTL.
    pub fn keys_with_ttls(&self) -> Vec<KeyTtl> {
        keys_with_ttls_of(&mut self.connection())
    }

    fn wait_for_ping(&self) -> Result<(), RedisServerError> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut last_error = String::from("no answer");
        while Instant::now() < deadline {
            let (exited, pid) = {
                let mut process = self.process();
                (process.try_wait(), process.id())
            };
            if let Ok(Some(status)) = exited {
                return Err(RedisServerError::NotReady {
                    port: self.port,
                    reason: format!("exited with {status}"),
                });
            }
            // Ask for the server's pid: another test's server may have taken the port first,
            // and answering it must not count as ours being ready. A server still loading its
            // append-only file answers INFO but refuses data commands: not ready yet either.
            match redis::Client::open(self.url()).and_then(|client| {
                let mut conn = client.get_connection_with_timeout(Duration::from_millis(200))?;
                let server = redis::cmd("INFO")
                    .arg("server")
                    .query::<String>(&mut conn)?;
                let persistence = redis::cmd("INFO")
                    .arg("persistence")
                    .query::<String>(&mut conn)?;
                Ok((server, persistence))
            }) {
                Ok((_, persistence)) if persistence.contains("loading:1") => {
                    last_error = "loading its data".to_owned();
                }
                Ok((info, _)) if server_pid(&info) == Some(pid) => return Ok(()),
                Ok(_) => {
                    return Err(RedisServerError::NotReady {
                        port: self.port,
                        reason: "port taken by another server".to_owned(),
                    });
                }
                Err(error) => last_error = error.to_string(),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(RedisServerError::NotReady {
            port: self.port,
            reason: last_error,
        })
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let process = self
            .process
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = process.kill();
        let _ = process.wait();
    }
}

/// A 3-master Redis Cluster on free loopback ports, killed when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// Exclusive use of the per-binary shared cluster; see [`RedisCluster::shared`].
#[derive(Debug)]
pub struct SharedCluster {
    cluster: Arc<RedisCluster>,
    _exclusive: MutexGuard<'static, ()>,
}

impl std::ops::Deref for SharedCluster {
    type Target = RedisCluster;

    fn deref(&self) -> &RedisCluster {
        &self.cluster
    }
}

static SHARED_CLUSTER: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());
static SHARED_CLUSTER_USER: Mutex<()> = Mutex::new(());

impl RedisCluster {
    /// Starts three masters, assigns the slots and waits until every node reports
    /// `cluster_state:ok` and sees the other two.
    ///
    /// # Panics
    ///
    /// Panics when the cluster cannot be brought up.
    pub fn start() -> Self {
        match Self::try_start() {
            Ok(cluster) => cluster,
            Err(error) => panic!("cannot start redis cluster: {error}"),
        }
    }

    /// Starts a cluster; see [`RedisCluster::start`].
    pub fn try_start() -> Result<Self, RedisServerError> {
        Self::try_start_with_node_args(Vec::new)
    }

    /// Starts a cluster whose nodes get extra `redis-server` arguments, asked for once per
    /// node so that each can have its own (a TLS port, for example); see
    /// [`RedisCluster::start`].
    pub fn try_start_with_node_args(
        mut node_args: impl FnMut() -> Vec<String>,
    ) -> Result<Self, RedisServerError> {
        let mut nodes = Vec::with_capacity(CLUSTER_SLOT_RANGES.len());
        for _ in CLUSTER_SLOT_RANGES {
            let extra_args = node_args();
            nodes.push(retry_on_port_race(|| {
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ];
                args.extend(extra_args.iter().map(String::as_str));
                RedisServer::spawn(&args)
            })?);
        }
        let cluster = Self { nodes };
        cluster.form()?;
        Ok(cluster)
    }

    /// The cluster shared by the tests of this binary, flushed and reserved for the caller.
    ///
    /// Queue keys (`span-buf:q:<shard>`) are global, so tests cannot share a cluster at the same
    /// time; the returned guard serialises them. The cluster lives while any test holds or waits
    /// for it and is killed when the last one lets go.
    ///
    /// # Panics
    ///
    /// Panics when the cluster cannot be started or flushed.
    pub fn shared() -> SharedCluster {
        let cluster = {
            let mut slot = SHARED_CLUSTER
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match slot.upgrade() {
                Some(cluster) => cluster,
                None => {
                    let cluster = Arc::new(Self::start());
                    *slot = Arc::downgrade(&cluster);
                    cluster
                }
            }
        };
        let exclusive = SHARED_CLUSTER_USER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        cluster.flush_all();
        SharedCluster {
            cluster,
            _exclusive: exclusive,
        }
    }

    /// Seed URLs of the three masters.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The cluster's nodes, for per-node inspection.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// `FLUSHALL` and `SCRIPT FLUSH` on every node.
    ///
    /// # Panics
    ///
    /// Panics when a node does not answer.
    pub fn flush_all(&self) {
        for node in &self.nodes {
            let mut conn = node.connection();
            let _: () = redis::cmd("FLUSHALL")
                .query(&mut conn)
                .unwrap_or_else(|error| panic!("FLUSHALL failed: {error}"));
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query(&mut conn)
                .unwrap_or_else(|error| panic!("SCRIPT FLUSH failed: {error}"));
        }
    }

    /// Every key on every node with its TTL.
    pub fn keys_with_ttls(&self) -> Vec<KeyTtl> {
        self.nodes
            .iter()
            .flat_map(RedisServer::keys_with_ttls)
            .collect()
    }

    fn form(&self) -> Result<(), RedisServerError> {
        for (node, (first, last)) in self.nodes.iter().zip(CLUSTER_SLOT_RANGES) {
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query(&mut node.connection())?;
        }
        let mut first = self.nodes[0].connection();
        for other in &self.nodes[1..] {
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(other.port)
                .query(&mut first)?;
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for node in &self.nodes {
            let mut conn = node.connection();
            loop {
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut conn)?;
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut conn)?;
                let connected = nodes.lines().filter(|l| l.contains("connected")).count();
                if info.contains("cluster_state:ok") && connected == self.nodes.len() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(RedisServerError::NotReady {
                        port: node.port,
                        reason: format!("cluster did not converge: {}", first_line(&info)),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }
}

/// A Redis to run one test against: its own standalone server, or the shared cluster.
#[derive(Debug)]
pub enum TestRedis {
    /// A standalone server owned by the test.
    Standalone(RedisServer),
    /// The shared 3-node cluster, reserved for the test.
    Cluster(SharedCluster),
}

impl TestRedis {
    /// Both modes, for tests that loop over them.
    pub const MODES: [RedisMode; 2] = [RedisMode::Standalone, RedisMode::Cluster];

    /// Starts (or reserves) a Redis of the given mode.
    pub fn start(mode: RedisMode) -> Self {
        match mode {
            RedisMode::Standalone => Self::Standalone(RedisServer::start()),
            RedisMode::Cluster => Self::Cluster(RedisCluster::shared()),
        }
    }

    /// Runs `test` once per mode, each with a fresh Redis.
    pub async fn for_each_mode<F, Fut>(test: F)
    where
        F: Fn(Self) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        for mode in Self::MODES {
            test(Self::start(mode)).await;
        }
    }

    /// Asserts that every key has a TTL.
    ///
    /// # Panics
    ///
    /// Panics naming the first key without one.
    pub fn assert_ttls(&self) {
        for key in self.keys_with_ttls() {
            assert!(
                key.ttl_secs > 0,
                "key without ttl: {} ({})",
                key.key_str(),
                key.ttl_secs
            );
        }
    }

    /// The mode of this Redis.
    pub fn mode(&self) -> RedisMode {
        match self {
            Self::Standalone(_) => RedisMode::Standalone,
            Self::Cluster(_) => RedisMode::Cluster,
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// The server URL, or the seed URLs of the cluster.
    pub fn urls(&self) -> Vec<String> {
        match self {
            Self::Standalone(server) => vec![server.url()],
            Self::Cluster(cluster) => cluster.urls(),
        }
    }

    /// `FLUSHALL` on every node, for tests that reuse one Redis across cases.
    ///
    /// # Panics
    ///
    /// Panics when a node does not answer.
    pub fn flush_all(&self) {
        for mut conn in self.node_connections() {
            let _: () = redis::cmd("FLUSHALL")
                .query(&mut conn)
                .unwrap_or_else(|error| panic!("FLUSHALL failed: {error}"));
        }
    }

    /// Every key on every node with its TTL.
    pub fn keys_with_ttls(&self) -> Vec<KeyTtl> {
        match self {
            Self::Standalone(server) => server.keys_with_ttls(),
            Self::Cluster(cluster) => cluster.keys_with_ttls(),
        }
    }

    /// Every server: the standalone one, or the cluster's masters.
    pub fn servers(&self) -> Vec<&RedisServer> {
        match self {
            Self::Standalone(server) => vec![server],
            Self::Cluster(cluster) => cluster.nodes().iter().collect(),
        }
    }

    /// Commands refused with error `code`, summed over [`TestRedis::servers`].
    pub fn error_count(&self, code: &str) -> u64 {
        self.servers()
            .iter()
            .map(|server| server.error_count(code))
            .sum()
    }

    /// Blocking connections to every node (one for a standalone server).
    pub fn node_connections(&self) -> Vec<redis::Connection> {
        match self {
            Self::Standalone(server) => vec![server.connection()],
            Self::Cluster(cluster) => cluster
                .nodes()
                .iter()
                .map(RedisServer::connection)
                .collect(),
        }
    }

    /// Runs one single-key command on whichever node owns the key (the others answer `MOVED`).
    ///
    /// # Panics
    ///
    /// Panics when no node accepts the command.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let mut last_error = None;
        for mut conn in self.node_connections() {
            match cmd.query::<T>(&mut conn) {
                Ok(value) => return value,
                Err(error) => last_error = Some(error),
            }
        }
        panic!("no node accepted the command: {last_error:?}")
    }
}

/// Standalone server or cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisMode {
    /// One standalone server.
    Standalone,
    /// A 3-master cluster.
    Cluster,
}

fn spawn_redis(port: u16, dir: &Path, extra_args: &[&str]) -> Result<Child, RedisServerError> {
    Command::new("redis-server")
        .arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra_args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RedisServerError::Spawn)
}

/// A port that is free now, and whose cluster bus port (port + 10000) is free too.
fn free_port() -> Result<u16, RedisServerError> {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(RedisServerError::Prepare)?;
        let port = listener
            .local_addr()
            .map_err(RedisServerError::Prepare)?
            .port();
        if port <= u16::MAX - 10_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

fn server_pid(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}

fn retry_on_port_race<T>(
    mut start: impl FnMut() -> Result<T, RedisServerError>,
) -> Result<T, RedisServerError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match start() {
            Err(RedisServerError::NotReady { .. }) if attempt < 10 => continue,
            other => return other,
        }
    }
}

fn connect_sync(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .and_then(|client| client.get_connection())
        .unwrap_or_else(|error| panic!("cannot connect to {url}: {error}"))
}

fn keys_with_ttls_of(conn: &mut redis::Connection) -> Vec<KeyTtl> {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query(conn)
        .unwrap_or_else(|error| panic!("KEYS failed: {error}"));
    keys.into_iter()
        .map(|key| {
            let ttl_secs: i64 = redis::cmd("TTL")
                .arg(&key)
                .query(conn)
                .unwrap_or_else(|error| panic!("TTL failed: {error}"));
            KeyTtl { key, ttl_secs }
        })
        .filter(|key| key.ttl_secs != -2)
        .collect()
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_server_answers_and_is_killed_on_drop() {
        let server = RedisServer::start();
        let mut conn = server.connection();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .arg("EX")
            .arg(10)
            .query(&mut conn)
            .unwrap();
        let keys = server.keys_with_ttls();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key_str(), "k");
        assert!(keys[0].ttl_secs > 0);
        let url = server.url();
        drop(server);
        assert!(
            redis::Client::open(url)
                .unwrap()
                .get_connection_with_timeout(Duration::from_millis(200))
                .is_err()
        );
    }

    #[test]
    fn a_restarted_server_keeps_its_port_and_with_append_only_its_data() {
        let server =
            RedisServer::try_start_with_args(&["--appendonly", "yes", "--appendfsync", "always"])
                .unwrap();
        let url = server.url();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query(&mut server.connection())
            .unwrap();
        server.stop();
        assert!(!server.is_running());
        assert!(
            redis::Client::open(url.as_str())
                .unwrap()
                .get_connection_with_timeout(Duration::from_millis(200))
                .is_err(),
            "a stopped server refuses connections"
        );
        server.restart().unwrap();
        assert!(server.is_running());
        assert_eq!(server.url(), url);
        let value: String = redis::cmd("GET")
            .arg("k")
            .query(&mut server.connection())
            .unwrap();
        assert_eq!(value, "v");
    }

    #[test]
    fn paused_clients_wait_until_the_pause_ends() {
        let server = RedisServer::start();
        let mut conn = server.connection();
        server.pause_clients(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query(&mut conn)
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        let keyspace = server.info_field("keyspace", "db0").unwrap();
        assert!(keyspace.starts_with("keys=1,"), "{keyspace}");
        assert_eq!(server.info_field("server", "no_such_field"), None);
        server.config_set("maxmemory", 12_345_678);
        assert_eq!(
            server.info_field("memory", "maxmemory").as_deref(),
            Some("12345678")
        );
    }

    #[test]
    fn refused_commands_are_counted_by_error_code() {
        let server = RedisServer::start();
        let mut conn = server.connection();
        assert_eq!(server.error_count("NOSCRIPT"), 0);
        let refused: redis::RedisResult<()> = redis::cmd("EVALSHA")
            .arg("0".repeat(40))
            .arg(0)
            .query(&mut conn);
        assert!(refused.is_err());
        assert_eq!(server.error_count("NOSCRIPT"), 1);
    }

    #[test]
    fn cluster_routes_keys_across_three_masters() {
        let cluster = RedisCluster::shared();
        let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
        let mut conn = client.get_connection().unwrap();
        for i in 0..30 {
            let _: () = redis::cmd("SET")
                .arg(format!("key-{i}"))
                .arg(i)
                .query(&mut conn)
                .unwrap();
        }
        let per_node: Vec<usize> = cluster
            .nodes()
            .iter()
            .map(|node| node.keys_with_ttls().len())
            .collect();
        assert_eq!(per_node.iter().sum::<usize>(), 30);
        assert!(per_node.iter().all(|&n| n > 0), "{per_node:?}");
    }
}
