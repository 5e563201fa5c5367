//! Every `spans.buffer.*` option of Sentry's buffer that changes what the buffer does, plus the
//! three payload-layout migration switches: the one definition of the configuration file's
//! `[buffer]` section and of what the buffer runs with.
//!
//! Field names are Sentry's option names without the prefix, `-` and `.` as `_`; durations are
//! [`Duration`]s, written the human way in the file (`timeout = "10s"`). The values Redis keeps
//! in whole seconds (`timeout`, `root_timeout`, `redis_ttl`, `flush_lock_ttl`) are checked to be
//! whole seconds where the configuration is loaded (`config.rs`), which names the key.
//!
//! [`BufferOptions::default`] is Sentry's defaults, flush locks off included. The file's
//! `[buffer]` differs in one deliberate place: a missing `flush_lock_ttl` is 30 s
//! ([`CONSUMER_FLUSH_LOCK_TTL`], see `docs/decisions.md`, "Flush locks are on by default").

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The flush lock TTL of the consumer's configuration when the file does not set one.
pub(crate) const CONSUMER_FLUSH_LOCK_TTL: Duration = Duration::from_secs(30);

/// Runtime options of the spans buffer, and the `[buffer]` section of the configuration.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferOptions {
    /// `spans.buffer.timeout`: how long a segment without its root waits for more spans.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `spans.buffer.root-timeout`: how long a segment that has seen its root waits.
    #[serde(with = "humantime_serde")]
    pub root_timeout: Duration,
    /// `spans.buffer.redis-ttl`: TTL of every buffer key, refreshed on write.
    #[serde(with = "humantime_serde")]
    pub redis_ttl: Duration,
    /// `spans.buffer.max-segment-bytes`: ingest-time detach threshold (uncompressed bytes,
    /// 0 = unlimited) and flush-time chunk size of output messages; bytes, or a size with a
    /// unit (`"10MiB"`).
    #[serde(with = "crate::config::size")]
    pub max_segment_bytes: u64,
    /// `spans.buffer.max-flush-segments`: segments per flush call, divided across shards.
    pub max_flush_segments: usize,
    /// `spans.buffer.segment-page-size`: `SSCAN COUNT` when loading payloads.
    pub segment_page_size: usize,
    /// `spans.buffer.max-memory-percentage`: Redis used/available ratio that pauses the
    /// consumer (1.0 = off).
    pub max_memory_percentage: f64,
    /// `spans.buffer.flusher.backpressure-seconds`: how long a flusher may stay at its limit
    /// before the consumer rejects messages.
    #[serde(with = "humantime_serde")]
    pub flusher_backpressure: Duration,
    /// `spans.buffer.flusher.max-unhealthy-seconds`: a flush worker silent for longer is
    /// replaced.
    #[serde(with = "humantime_serde")]
    pub flusher_max_unhealthy: Duration,
    /// `spans.buffer.flusher.flush-lock-ttl`: per-segment flush lock TTL (0 = locks off; above
    /// 0 also detaches subsegments that target a locked segment).
    #[serde(with = "humantime_serde", default = "consumer_flush_lock_ttl")]
    pub flush_lock_ttl: Duration,
    /// `spans.buffer.flusher.log-flushed-segments`: log every flushed segment.
    pub log_flushed_segments: bool,
    /// `spans.buffer.compression.level`: zstd level, 0 = zstd default, -1 = off.
    pub compression_level: i32,
    /// `spans.buffer.pipeline-batch-size`: subsegments per Redis pipeline (0 = one pipeline).
    pub pipeline_batch_size: usize,
    /// `spans.buffer.max-spans-per-evalsha`: span ids per script call (0 = no split).
    pub max_spans_per_evalsha: usize,
    /// `spans.buffer.evalsha-latency-threshold`: script calls slower than this (when sampled)
    /// are logged.
    #[serde(with = "humantime_serde")]
    pub evalsha_latency_threshold: Duration,
    /// `spans.buffer.debug-traces`: trace ids that get verbose debug logs.
    pub debug_traces: Vec<String>,
    /// The script's `metrics_sample_rate`: script metrics are gathered for 1 call in N.
    pub metrics_sample_rate: u32,
    /// `spans.buffer.write-distributed-payloads`: write each subsegment's payloads to its own
    /// salted key `span-buf:s:{pt:salt}:salt` (the current layout).
    pub write_distributed_payloads: bool,
    /// `spans.buffer.read-distributed-payloads`: the flusher reads the salted keys listed in
    /// `span-buf:mk`; otherwise it reads the merged per-segment set.
    pub read_distributed_payloads: bool,
    /// `spans.buffer.write-merged-payloads`: also write payloads to the legacy merged set
    /// `span-buf:s:{pt}:<segment>` (migration phases 1 and 2).
    pub write_merged_payloads: bool,
}

/// The file's default of `flush_lock_ttl`; see the module docs.
fn consumer_flush_lock_ttl() -> Duration {
    CONSUMER_FLUSH_LOCK_TTL
}

impl Default for BufferOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            root_timeout: Duration::from_secs(10),
            redis_ttl: Duration::from_secs(3600),
            max_segment_bytes: 10 * 1024 * 1024,
            max_flush_segments: 500,
            segment_page_size: 100,
            max_memory_percentage: 1.0,
            flusher_backpressure: Duration::from_secs(10),
            flusher_max_unhealthy: Duration::from_secs(60),
            flush_lock_ttl: Duration::ZERO,
            log_flushed_segments: false,
            compression_level: 0,
            pipeline_batch_size: 0,
            max_spans_per_evalsha: 0,
            evalsha_latency_threshold: Duration::from_millis(100),
            debug_traces: Vec::new(),
            metrics_sample_rate: 100,
            write_distributed_payloads: true,
            read_distributed_payloads: true,
            write_merged_payloads: false,
        }
    }
}

/// Why a set of options cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OptionsError {
    /// Nothing would be written where the flusher reads.
    #[error("payloads must be written in the layout they are read from")]
    UnreadableLayout,
    /// A zstd level outside -1..=22.
    #[error("compression level {0} is outside -1..=22")]
    CompressionLevel(i32),
}

impl BufferOptions {
    /// Checks that the options can work together.
    pub fn validate(&self) -> Result<(), OptionsError> {
        let reads_written_layout = if self.read_distributed_payloads {
            self.write_distributed_payloads
        } else {
            self.write_merged_payloads
        };
        if !reads_written_layout {
            return Err(OptionsError::UnreadableLayout);
        }
        if !(-1..=22).contains(&self.compression_level) {
            return Err(OptionsError::CompressionLevel(self.compression_level));
        }
        Ok(())
    }

    /// Options of migration phase 0: the legacy merged layout only.
    #[must_use]
    pub fn with_merged_layout(mut self) -> Self {
        self.write_distributed_payloads = false;
        self.read_distributed_payloads = false;
        self.write_merged_payloads = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_sentry() {
        let options = BufferOptions::default();
        assert_eq!(options.timeout, Duration::from_secs(60));
        assert_eq!(options.root_timeout, Duration::from_secs(10));
        assert_eq!(options.redis_ttl, Duration::from_secs(3600));
        assert_eq!(options.max_segment_bytes, 10_485_760);
        assert_eq!(options.max_flush_segments, 500);
        assert_eq!(options.segment_page_size, 100);
        assert_eq!(options.flush_lock_ttl, Duration::ZERO);
        assert_eq!(options.compression_level, 0);
        assert!(options.validate().is_ok());
        assert!(
            BufferOptions::default()
                .with_merged_layout()
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn rejects_reading_a_layout_nobody_writes() {
        let options = BufferOptions {
            write_distributed_payloads: false,
            write_merged_payloads: true,
            ..BufferOptions::default()
        };
        assert_eq!(options.validate(), Err(OptionsError::UnreadableLayout));
        let level = BufferOptions {
            compression_level: 23,
            ..BufferOptions::default()
        };
        assert_eq!(level.validate(), Err(OptionsError::CompressionLevel(23)));
    }

    #[test]
    fn a_section_without_a_flush_lock_ttl_has_the_consumers_locks_on() {
        let options: BufferOptions = toml::from_str("timeout = \"5s\"").unwrap();
        assert_eq!(options.timeout, Duration::from_secs(5));
        assert_eq!(options.root_timeout, Duration::from_secs(10));
        assert_eq!(options.flush_lock_ttl, CONSUMER_FLUSH_LOCK_TTL);
        let off: BufferOptions = toml::from_str("flush_lock_ttl = \"0s\"").unwrap();
        assert_eq!(off.flush_lock_ttl, Duration::ZERO);
    }
}
