//! One connection type for standalone Redis and Redis Cluster, so the store has one code path.
//!
//! The store builds its commands into a [`CommandBatch`], each command tagged with the key that
//! decides its cluster slot. Against a standalone server the batch is one pipeline, in order.
//! Against a cluster the redis crate only pipelines commands of one slot, so the batch is split
//! by slot (keys that share a hash tag share a slot) and the groups are sent concurrently;
//! results come back in the batch's order either way. Server errors are returned in place as
//! [`Value::ServerError`], so one failed command (for example `NOSCRIPT`) can be retried alone.
//!
//! Access control is the URL's: `redis://user:password@host:port` authenticates as an ACL
//! user, on every cluster node alike, and `rediss://` speaks TLS (rustls with the ring
//! provider), checked against the system's trust store or a CA given with the connection.

use std::collections::HashMap;

use futures::future::try_join_all;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo,
};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, TlsCertificates, Value};

use crate::buffer::keys;

/// A connection to a standalone server (reconnecting) or to a cluster.
#[derive(Clone)]
pub enum RedisConnection {
    /// A standalone server through a reconnecting connection manager.
    Standalone(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Standalone(_) => "RedisConnection::Standalone",
            Self::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

/// How long one request (often a pipeline of thousands of commands) may wait for its reply.
///
/// The client's default of 500 ms is shorter than a large batch takes on a busy server: the
/// client then reports a failure while Redis still runs the commands, and the retry writes the
/// batch a second time. A stalled Redis is detected by the flush workers' health checks and
/// the consumer's backpressure instead, on a scale of seconds.
pub(crate) const RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl RedisConnection {
    /// Connects to the server at `urls[0]`, or to the cluster seeded by `urls`.
    ///
    /// `rediss://` URLs are verified against the system's trust store; see
    /// [`RedisConnection::connect_with_tls`] for a private CA or a client certificate.
    /// Credentials go in the URLs (`redis://user:password@host:port`).
    pub async fn connect(urls: &[String], cluster: bool) -> RedisResult<Self> {
        Self::connect_with_tls(urls, cluster, None).await
    }

    /// As [`RedisConnection::connect`], with TLS material for `rediss://` URLs: the CA that
    /// signed the server certificates (instead of the system's trust store) and optionally a
    /// client certificate and key for mutual TLS.
    pub async fn connect_with_tls(
        urls: &[String],
        cluster: bool,
        certificates: Option<TlsCertificates>,
    ) -> RedisResult<Self> {
        if urls.iter().any(|url| url.starts_with("rediss://")) {
            install_crypto_provider();
        }
        if cluster {
            let mut builder = redis::cluster::ClusterClient::builder(urls.to_vec())
                .response_timeout(RESPONSE_TIMEOUT);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            Ok(Self::Cluster(
                builder.build()?.get_async_connection().await?,
            ))
        } else {
            let url = urls.first().ok_or_else(|| {
                redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "no redis url"))
            })?;
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(url.as_str(), certificates)?,
                None => redis::Client::open(url.as_str())?,
            };
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let mut manager = ConnectionManager::new_with_config(client, config).await?;
            // A server that wants credentials the URL lacks accepts the connection and refuses
            // every command; ask once, so that shows here (NOAUTH) and not at the first write.
            redis::cmd("PING").query_async::<()>(&mut manager).await?;
            Ok(Self::Standalone(manager))
        }
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs `cmd` on every master (one server when standalone); fails if any fails.
    pub async fn on_all_masters(&self, cmd: Cmd) -> RedisResult<Value> {
        match self {
            Self::Standalone(conn) => cmd.query_async(&mut conn.clone()).await,
            Self::Cluster(conn) => {
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::AllSucceeded),
                ));
                conn.clone().route_command(cmd, routing).await
            }
        }
    }

    /// Runs `cmd` on every master and returns each one's reply (a single reply when
    /// standalone), for per-server figures such as `INFO`.
    pub async fn on_each_master(&self, cmd: Cmd) -> RedisResult<Vec<Value>> {
        let replies = self.on_each_master_by_address(cmd).await?;
        Ok(replies.into_iter().map(|(_, reply)| reply).collect())
    }

    /// As [`RedisConnection::on_each_master`], each reply with the `host:port` of its master
    /// (`None` for the standalone server), so the master can be asked again with
    /// [`RedisConnection::on_master`] (a `SCAN` cursor is only valid on its server).
    pub async fn on_each_master_by_address(
        &self,
        cmd: Cmd,
    ) -> RedisResult<Vec<(Option<String>, Value)>> {
        match self {
            Self::Standalone(conn) => Ok(vec![(None, cmd.query_async(&mut conn.clone()).await?)]),
            Self::Cluster(conn) => {
                // Without a response policy the cluster client maps each node to its reply.
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match conn.clone().route_command(cmd, routing).await? {
                    Value::Map(replies) => replies
                        .into_iter()
                        .map(|(address, reply)| {
                            let address: String = redis::from_redis_value(address)
                                .map_err(redis::RedisError::from)?;
                            match reply {
                                Value::ServerError(error) => Err(error.into()),
                                reply => Ok((Some(address), reply)),
                            }
                        })
                        .collect(),
                    reply => Ok(vec![(None, reply)]),
                }
            }
        }
    }

    /// Runs `cmd` on the master at `address` (`host:port`, from
    /// [`RedisConnection::on_each_master_by_address`]); the standalone server when `None`.
    pub async fn on_master(&self, address: Option<&str>, cmd: Cmd) -> RedisResult<Value> {
        let reply = match (self, address) {
            (Self::Standalone(conn), _) => cmd.query_async(&mut conn.clone()).await?,
            (Self::Cluster(conn), None) => conn.clone().req_packed_command(&cmd).await?,
            (Self::Cluster(conn), Some(address)) => {
                let (host, port) = address.rsplit_once(':').ok_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "a cluster node address without a port",
                    ))
                })?;
                let port = port.parse().map_err(|_| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "a cluster node address with a bad port",
                    ))
                })?;
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                });
                conn.clone().route_command(cmd, routing).await?
            }
        };
        match reply {
            Value::ServerError(error) => Err(error.into()),
            reply => Ok(reply),
        }
    }

    /// Runs a batch; see the module docs. The result has one value per entry, in order: the
    /// reply of a command, or for [`CommandBatch::add_spread`] an array of the replies of the
    /// commands it became.
    pub(crate) async fn execute(&self, batch: CommandBatch) -> RedisResult<Vec<Value>> {
        if batch.entries.is_empty() {
            return Ok(Vec::new());
        }
        self.send(&self.pipelines(batch)).await
    }

    /// Lays `batch` out as the pipelines this connection sends, for [`RedisConnection::send`].
    pub(crate) fn pipelines(&self, batch: CommandBatch) -> Pipelines {
        let cluster = self.is_cluster();
        let (commands, shapes) = batch.expand(cluster);
        let len = commands.len();
        let layout = if cluster {
            let mut groups: HashMap<Vec<u8>, (Vec<usize>, Pipeline)> = HashMap::new();
            for (index, (slot_key, cmd)) in commands.into_iter().enumerate() {
                let (indices, pipe) = groups
                    .entry(keys::hash_slot_input(&slot_key).to_vec())
                    .or_insert_with(|| {
                        let mut pipe = Pipeline::new();
                        pipe.ignore_errors();
                        (Vec::new(), pipe)
                    });
                indices.push(index);
                pipe.add_command(cmd);
            }
            Layout::BySlot(groups.into_values().collect())
        } else {
            let mut pipe = Pipeline::with_capacity(len);
            pipe.ignore_errors();
            for (_, cmd) in commands {
                pipe.add_command(cmd);
            }
            Layout::One(pipe)
        };
        Pipelines {
            layout,
            len,
            shapes,
        }
    }

    /// Sends pipelines built by [`RedisConnection::pipelines`] and returns one value per entry
    /// of their batch, as [`RedisConnection::execute`] does. They are sent by reference, so
    /// sending them again after a failure copies none of their arguments.
    pub(crate) async fn send(&self, pipelines: &Pipelines) -> RedisResult<Vec<Value>> {
        if pipelines.len == 0 {
            return Ok(pipelines.shapes.iter().map(Shape::empty_reply).collect());
        }
        let values = match (self, &pipelines.layout) {
            (Self::Standalone(conn), Layout::One(pipe)) => {
                pipe.query_async::<Vec<Value>>(&mut conn.clone()).await?
            }
            (Self::Cluster(conn), Layout::BySlot(groups)) => {
                let requests = groups.iter().map(|(indices, pipe)| {
                    let mut conn = conn.clone();
                    async move {
                        let values: Vec<Value> = pipe.query_async(&mut conn).await?;
                        Ok::<_, redis::RedisError>((indices, values))
                    }
                });
                let mut results = vec![Value::Nil; pipelines.len];
                for (indices, values) in try_join_all(requests).await? {
                    for (&index, value) in indices.iter().zip(values) {
                        results[index] = value;
                    }
                }
                results
            }
            _ => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "pipelines laid out for another kind of connection",
                )));
            }
        };
        let mut values = values.into_iter();
        Ok(pipelines
            .shapes
            .iter()
            .map(|shape| match shape {
                Shape::Single => values.next().unwrap_or(Value::Nil),
                Shape::Spread(count) => Value::Array(values.by_ref().take(*count).collect()),
            })
            .collect())
    }
}

/// Makes ring the process's TLS crypto provider, unless one is installed already.
///
/// The redis client builds its TLS configuration from the process-wide default provider;
/// installing it explicitly keeps `rediss://` working even if another dependency ever enables
/// a second provider, in which case none would be picked automatically.
fn install_crypto_provider() {
    // An error means a provider is installed already, which is all that is needed.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Commands to send together, each with the key that routes it.
#[derive(Debug, Default)]
pub(crate) struct CommandBatch {
    entries: Vec<Entry>,
}

#[derive(Debug)]
enum Entry {
    /// One command routed by its key.
    Single(Vec<u8>, Cmd),
    /// One multi-key command over keys that may lie in different slots.
    Spread {
        name: &'static str,
        keys: Vec<String>,
        keys_per_command: usize,
    },
}

/// How the replies of an entry are returned.
#[derive(Clone, Debug)]
enum Shape {
    Single,
    Spread(usize),
}

impl Shape {
    /// The reply of an entry that became no command.
    fn empty_reply(&self) -> Value {
        match self {
            Self::Single => Value::Nil,
            Self::Spread(_) => Value::Array(Vec::new()),
        }
    }
}

/// A [`CommandBatch`] laid out as the pipelines its connection sends, from
/// [`RedisConnection::pipelines`]: built once, then sent by reference as often as needed.
#[derive(Clone, Debug)]
pub(crate) struct Pipelines {
    layout: Layout,
    /// Commands in all pipelines.
    len: usize,
    shapes: Vec<Shape>,
}

#[derive(Clone, Debug)]
enum Layout {
    /// A standalone server: one pipeline, in batch order.
    One(Pipeline),
    /// A cluster: one pipeline per slot, each with the batch positions of its commands.
    BySlot(Vec<(Vec<usize>, Pipeline)>),
}

impl Pipelines {
    /// The command of entry `entry`, when the entry is one command (see
    /// [`CommandBatch::add`]), for sending it again alone.
    pub(crate) fn command(&self, entry: usize) -> Option<&Cmd> {
        let mut index = 0;
        for shape in self.shapes.get(..entry)? {
            index += match shape {
                Shape::Single => 1,
                Shape::Spread(count) => *count,
            };
        }
        if !matches!(self.shapes.get(entry)?, Shape::Single) {
            return None;
        }
        match &self.layout {
            Layout::One(pipe) => pipe.cmd_iter().nth(index),
            Layout::BySlot(groups) => groups.iter().find_map(|(indices, pipe)| {
                let position = indices.iter().position(|&i| i == index)?;
                pipe.cmd_iter().nth(position)
            }),
        }
    }
}

impl CommandBatch {
    /// An empty batch.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds `cmd`, routed by `key` (the command's first key). Returns its reply's index.
    pub(crate) fn add(&mut self, key: impl Into<Vec<u8>>, cmd: Cmd) -> usize {
        self.entries.push(Entry::Single(key.into(), cmd));
        self.entries.len() - 1
    }

    /// Adds the multi-key command `name` (such as `UNLINK` or `SUNION`) over `keys`, which
    /// may lie in different cluster slots: a standalone server gets it as few commands of up to
    /// `keys_per_command` keys; a cluster gets one such command per hash tag, as a multi-key
    /// command must stay within one slot. Its reply is an array of those commands' replies.
    pub(crate) fn add_spread(
        &mut self,
        name: &'static str,
        keys: Vec<String>,
        keys_per_command: usize,
    ) -> usize {
        self.entries.push(Entry::Spread {
            name,
            keys,
            keys_per_command: keys_per_command.max(1),
        });
        self.entries.len() - 1
    }

    /// Number of entries (replies).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The commands to send and how their replies fold back into one per entry.
    fn expand(self, cluster: bool) -> (Vec<(Vec<u8>, Cmd)>, Vec<Shape>) {
        let mut commands = Vec::with_capacity(self.entries.len());
        let mut shapes = Vec::with_capacity(self.entries.len());
        for entry in self.entries {
            match entry {
                Entry::Single(key, cmd) => {
                    commands.push((key, cmd));
                    shapes.push(Shape::Single);
                }
                Entry::Spread {
                    name,
                    keys,
                    keys_per_command,
                } => {
                    let groups: Vec<Vec<String>> = if cluster {
                        let mut by_tag: HashMap<Vec<u8>, Vec<String>> = HashMap::new();
                        for key in keys {
                            let tag = keys::hash_slot_input(key.as_bytes()).to_vec();
                            by_tag.entry(tag).or_default().push(key);
                        }
                        by_tag.into_values().collect()
                    } else {
                        vec![keys]
                    };
                    let before = commands.len();
                    for group in groups {
                        for chunk in group.chunks(keys_per_command) {
                            let mut cmd = redis::cmd(name);
                            cmd.arg(chunk);
                            commands.push((chunk[0].as_bytes().to_vec(), cmd));
                        }
                    }
                    shapes.push(Shape::Spread(commands.len() - before));
                }
            }
        }
        (commands, shapes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn urls_that_do_not_work_are_refused_without_their_password() {
        let cases = [
            ("redis://spans:hunter2@127.0.0.1:notaport/", false),
            ("redis://spans:hunter2@[::1/", false),
            ("rediss://spans:hunter2@127.0.0.1:1/", false),
            ("redis://spans:hunter2@127.0.0.1:1/", true),
            ("http://spans:hunter2@127.0.0.1:1/", false),
        ];
        // Side by side: a refused connection is retried for some seconds.
        let attempts = cases.map(|(url, cluster)| async move {
            let urls = [url.to_owned()];
            let connect = RedisConnection::connect(&urls, cluster);
            (
                url,
                tokio::time::timeout(std::time::Duration::from_secs(60), connect).await,
            )
        });
        for (url, outcome) in futures::future::join_all(attempts).await {
            let error = outcome.unwrap().unwrap_err();

            let printed = format!("{error} {error:?}");
            assert!(!printed.contains("hunter2"), "{url}: {printed}");
        }
    }
}
