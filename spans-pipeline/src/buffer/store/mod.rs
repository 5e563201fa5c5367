//! `SpansBufferStore`: the one place that talks to Redis.
//!
//! It owns every command and key of the buffer, one file per phase of a segment's life:
//!
//! - `store/write.rs`: a batch's subsegments encoded (compressed payloads, `add-buffer.lua`
//!   calls) and written, in the order the script needs;
//! - `store/queue.rs`: the flush queues, their deadlines and their gauges;
//! - `store/flush.rs`: reading what is due: candidates, flush locks, payloads;
//! - `store/cleanup.rs`: deleting what a flushed segment left, lock last;
//! - `store/reply.rs`: Redis replies turned back into values.
//!
//! Each phase is one round trip across all subsegments or segments (split per slot and sent
//! concurrently on a cluster), because round trips, not Redis CPU, bound a serial consumer.
//!
//! [`SpansBuffer`](crate::buffer::SpansBuffer) decides what to write and what to flush. The store
//! makes three decisions of its own, each from the options it was built with, because each is
//! about how commands are laid out rather than what the buffer does:
//!
//! - the **flush deadline** of a segment: the time of the write plus `root_timeout` once the
//!   segment has its root span, else `timeout` ([`SpansBufferStore::update_queue`]);
//! - the **packing of script calls**: which subsegments share one `add-buffer.lua` call (per
//!   trace, or across traces on a standalone server, bounded in spans; one each with
//!   `max_spans_per_evalsha`);
//! - the **payload layout** of the migration: which of the distributed and merged layouts are
//!   written and read, and the merging of legacy sets that the merged layout needs
//!   (`write_distributed_payloads`, `read_distributed_payloads`, `write_merged_payloads`).

mod cleanup;
mod flush;
mod queue;
mod reply;
mod write;

use std::sync::Mutex;
use std::time::Duration;

use redis::Cmd;

use crate::buffer::codec::PayloadEncoder;
use crate::buffer::connection::RedisConnection;
use crate::buffer::error::BufferError;
use crate::buffer::options::BufferOptions;
use crate::buffer::script;

pub use queue::QueueStats;
pub(crate) use queue::queue_stats;
pub(crate) use reply::{as_optional_u64, as_string, info_field, into_array};
pub(crate) use write::PreparedWrite;

/// Payload keys per `UNLINK` in cleanup (standalone; a cluster needs one per key).
const CLEANUP_KEYS_PER_UNLINK: usize = 1000;

/// Redis access of the spans buffer.
#[derive(Debug)]
pub struct SpansBufferStore {
    conn: RedisConnection,
    options: BufferOptions,
    /// Compressors for concurrent [`SpansBufferStore::prepare_write`] calls, reused.
    encoders: Mutex<Vec<PayloadEncoder>>,
}

impl SpansBufferStore {
    /// A store on `conn`; loads the add-buffer script on every master.
    pub async fn new(conn: RedisConnection, options: BufferOptions) -> Result<Self, BufferError> {
        options.validate()?;
        let encoder =
            PayloadEncoder::new(options.compression_level).map_err(BufferError::Compress)?;
        let store = Self {
            conn,
            options,
            encoders: Mutex::new(vec![encoder]),
        };
        store.load_script().await?;
        Ok(store)
    }

    /// The connection (for callers that inspect Redis, such as the replay tool).
    pub fn connection(&self) -> &RedisConnection {
        &self.conn
    }

    /// The options the store writes with.
    pub fn options(&self) -> &BufferOptions {
        &self.options
    }

    /// `SCRIPT LOAD` of add-buffer.lua on every master.
    pub async fn load_script(&self) -> Result<(), BufferError> {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(script::ADD_BUFFER_SOURCE);
        self.conn.on_all_masters(cmd).await?;
        Ok(())
    }

    /// Memory of the buffer's Redis, summed over every master (`INFO memory`): what is used,
    /// and what is available — each server's `maxmemory`, or its machine's memory where no
    /// limit is set.
    pub async fn memory_usage(&self) -> Result<MemoryUsage, BufferError> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let mut usage = MemoryUsage::default();
        for reply in self.conn.on_each_master(info).await? {
            let text: String = redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
            let field = |name: &str| reply::info_field(&text, name);
            usage.used_bytes += field("used_memory");
            usage.available_bytes += match field("maxmemory") {
                0 => field("total_system_memory"),
                limit => limit,
            };
        }
        Ok(usage)
    }

    /// Whether flush locks are on (a TTL above 0).
    fn locks_on(&self) -> bool {
        !self.options.flush_lock_ttl.is_zero()
    }
}

/// `EXPIRE key <ttl in whole seconds>`.
fn expire(key: &str, ttl: Duration) -> Cmd {
    let mut cmd = redis::cmd("EXPIRE");
    cmd.arg(key).arg(ttl.as_secs());
    cmd
}

/// Memory of the buffer's Redis servers, summed, from [`SpansBufferStore::memory_usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Bytes in use (`used_memory`).
    pub used_bytes: u64,
    /// Bytes the servers may use.
    pub available_bytes: u64,
}

impl MemoryUsage {
    /// Used over available; 0 when nothing is known to be available.
    pub fn ratio(&self) -> f64 {
        if self.available_bytes == 0 {
            0.0
        } else {
            self.used_bytes as f64 / self.available_bytes as f64
        }
    }
}

#[cfg(test)]
mod fixtures {
    //! Spans and subsegments for the unit tests of the phases.

    use crate::buffer::subsegment::Subsegment;
    use crate::span::Span;

    pub(super) fn span(trace: &'static str, id: &'static str) -> Span<'static> {
        Span {
            trace_id: trace.into(),
            span_id: id.into(),
            parent_span_id: Some("p".into()),
            segment_id: None,
            project_id: 1,
            organization_id: 1,
            is_segment_span: false,
            partition: 3,
            payload: b"{}",
        }
    }

    pub(super) fn subsegment<'a>(spans: &'a [Span<'a>], salt: &str) -> Subsegment<'a> {
        Subsegment {
            project_and_trace: spans[0].project_and_trace(),
            parent_span_id: "p".to_owned(),
            spans: spans.iter().collect(),
            salt: salt.to_owned(),
        }
    }
}
