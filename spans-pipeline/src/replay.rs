//! The replay tool: feed a recorded span workload through the buffer on a real Redis, flush
//! everything, and report what came out and how fast.
//!
//! Operators use it to size a deployment and to check a migration (replay into a buffer left
//! by another consumer with `--no-flush`, or flush one with an empty file); we use it as the
//! reference throughput benchmark. Ingest is serial, batch after batch, like one consumer.
//! Each batch's clock is the floor of its smallest `received`, as a consumer would use the
//! batch's smallest Kafka timestamp. The flush then runs with a clock far in the future until
//! the queue is empty.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::buffer::{
    BufferError, BufferOptions, ProcessStats, RedisConnection, SpansBuffer, WriteOrder, WriteRetry,
};
use crate::progress::Progress;
use crate::span::Span;

/// Clock used to flush everything: far beyond any deadline in the workload.
const FAR_FUTURE: i64 = i64::MAX / 4;

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The input could not be read or the output written.
    #[error("failed to access {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to or querying Redis failed.
    #[error("redis failed")]
    Redis(#[from] redis::RedisError),
    /// The buffer failed.
    #[error(transparent)]
    Buffer(#[from] BufferError),
}

/// What to replay and where.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// JSONL file of span messages, one message value per line, plain or zstd-compressed.
    pub file: PathBuf,
    /// Redis URL (a seed node when `--cluster`).
    #[arg(long)]
    pub redis_url: String,
    /// Treat `--redis-url` as a seed of a Redis Cluster.
    #[arg(long)]
    pub cluster: bool,
    /// Lines per `process_spans` batch.
    #[arg(long, default_value_t = 2000)]
    pub batch_size: usize,
    /// Write the flushed messages here, one JSON message per line.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Ingest only; leave the buffer in Redis.
    #[arg(long)]
    pub no_flush: bool,
    /// zstd level of stored payloads (-1 = off).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub compression_level: i32,
    /// `max-spans-per-evalsha`: span ids per script call; 0 groups the subsegments of a trace
    /// into one call, any other value gives every subsegment its own call (Sentry's pattern).
    #[arg(long, default_value_t = 0)]
    pub max_spans_per_evalsha: usize,
}

/// Throughput of one phase.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PhaseReport {
    /// Wall time in seconds.
    pub wall_secs: f64,
    /// Spans per second of wall time.
    pub spans_per_sec: f64,
    /// Redis CPU seconds (user + sys, summed over nodes) spent in the phase.
    pub redis_cpu_secs: f64,
    /// Redis CPU seconds per 100k spans.
    pub redis_cpu_secs_per_100k_spans: f64,
}

impl PhaseReport {
    fn new(spans: usize, wall: Duration, redis_cpu_secs: f64) -> Self {
        let wall_secs = wall.as_secs_f64();
        Self {
            wall_secs,
            spans_per_sec: if wall_secs > 0.0 {
                spans as f64 / wall_secs
            } else {
                0.0
            },
            redis_cpu_secs,
            redis_cpu_secs_per_100k_spans: if spans > 0 {
                redis_cpu_secs * 100_000.0 / spans as f64
            } else {
                0.0
            },
        }
    }
}

/// The JSON report printed by `spans-pipeline replay`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Valid spans read.
    pub spans_in: usize,
    /// Lines that did not decode as spans.
    pub invalid_lines: usize,
    /// Subsegments written (script calls).
    pub subsegments: usize,
    /// Segments flushed with at least one span.
    pub segments_flushed: usize,
    /// Output messages (more than segments when oversized segments are chunked).
    pub messages: usize,
    /// Spans in the flushed segments.
    pub spans_out: usize,
    /// Spans that came out more than once (extra copies).
    pub duplicate_spans: usize,
    /// Spans read but not flushed (only meaningful with a flush).
    pub missing_spans: usize,
    /// Spans reported lost by the buffer's loss accounting.
    pub lost_spans: u64,
    /// Keys left in Redis at the end.
    pub keys_left: u64,
    /// Ingest phase.
    pub ingest: PhaseReport,
    /// Flush phase (flush, build messages, done).
    pub flush: PhaseReport,
}

impl ReplayReport {
    fn add_ingested(&mut self, stats: &ProcessStats) {
        self.spans_in += stats.spans;
        self.subsegments += stats.subsegments;
    }
}

/// Runs a replay.
pub async fn run(args: &ReplayArgs) -> Result<ReplayReport, ReplayError> {
    let input = read_input(&args.file)?;
    let lines: Vec<&[u8]> = input
        .split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .collect();

    let urls = vec![args.redis_url.clone()];
    let conn = RedisConnection::connect(&urls, args.cluster).await?;
    let nodes = node_urls(&args.redis_url, args.cluster)?;
    let options = BufferOptions {
        compression_level: args.compression_level,
        max_spans_per_evalsha: args.max_spans_per_evalsha,
        ..BufferOptions::default()
    };
    let buffer = Arc::new(SpansBuffer::new(conn, options, vec![0], None).await?);
    let mut report = ReplayReport::default();

    // The tool's own bookkeeping (which spans went in) is a pass of its own, outside the timed
    // ingest.
    let mut seen: HashMap<(u64, String, String), u32> = HashMap::new();
    for line in &lines {
        match Span::decode(line, 0) {
            Ok(span) => {
                seen.insert(
                    (
                        span.project_id,
                        span.trace_id.to_string(),
                        span.span_id.to_string(),
                    ),
                    0,
                );
            }
            Err(error) => {
                report.invalid_lines += 1;
                tracing::debug!(%error, "Skipping an invalid span.");
            }
        }
    }

    // Timed: decoding, preparing and writing. Each batch is prepared while the previous one
    // is being written, as the consumer does; writes stay in order (a ticket per batch), and
    // each starts the moment the one before it completes.
    let mut display = Progress::stderr("replay", "spans", Some(lines.len() as u64));
    display.set_message("ingesting");
    let mut read = 0;
    let cpu_before = redis_cpu_secs(&nodes)?;
    let started = Instant::now();
    let order = WriteOrder::new();
    let mut writing: VecDeque<JoinHandle<Result<ProcessStats, BufferError>>> = VecDeque::new();
    for batch in lines.chunks(args.batch_size.max(1)) {
        let mut spans = Vec::with_capacity(batch.len());
        let mut min_received = f64::INFINITY;
        for line in batch {
            if let Ok(span) = Span::decode(line, 0) {
                if let Some(received) = received(line) {
                    min_received = min_received.min(received);
                }
                spans.push(span);
            }
        }
        read += batch.len() as u64;
        display.set_position(read);
        if spans.is_empty() {
            continue;
        }
        let now = if min_received.is_finite() {
            min_received.floor() as i64
        } else {
            0
        };
        let prepared = buffer.prepare(&spans)?;
        // The place is taken here, in batch order, not in the task.
        let place = order.place();
        let buffer = Arc::clone(&buffer);
        let write = tokio::spawn(async move {
            buffer
                .write_in_order(place, Ok(prepared), now, WriteRetry::Never)
                .await
        });
        // At most two batches ahead of this one: the one writing its subsegments and the one
        // writing its queue deadlines.
        writing.push_back(write);
        if writing.len() > 2
            && let Some(oldest) = writing.pop_front()
        {
            report.add_ingested(&oldest.await.map_err(BufferError::Interrupted)??);
        }
    }
    for write in writing {
        report.add_ingested(&write.await.map_err(BufferError::Interrupted)??);
    }
    let ingest_wall = started.elapsed();
    let cpu_after_ingest = redis_cpu_secs(&nodes)?;
    report.ingest = PhaseReport::new(report.spans_in, ingest_wall, cpu_after_ingest - cpu_before);

    if !args.no_flush {
        let mut output = match &args.output {
            Some(path) => Some(std::io::BufWriter::new(
                std::fs::File::create(path).map_err(|source| ReplayError::Io {
                    path: path.clone(),
                    source,
                })?,
            )),
            None => None,
        };
        let max_segment_bytes = buffer.options().max_segment_bytes;
        // Only flush, message building and done are timed, not the tool's bookkeeping.
        let mut flush_wall = Duration::ZERO;
        loop {
            let started = Instant::now();
            let flush = buffer.load_due_segments(FAR_FUTURE).await?;
            if flush.segments.is_empty() {
                break;
            }
            display.set_message(format!("flushed {} spans", report.spans_out));
            let messages: Vec<Vec<Vec<u8>>> = flush
                .segments
                .iter()
                .filter(|s| !s.spans.is_empty())
                .map(|segment| segment.to_messages(max_segment_bytes))
                .collect();
            buffer.done_flush_segments(&flush.segments).await?;
            flush_wall += started.elapsed();

            report.lost_spans += flush.lost.iter().map(|l| l.quantity).sum::<u64>();
            for segment in flush.segments.iter().filter(|s| !s.spans.is_empty()) {
                report.segments_flushed += 1;
                report.spans_out += segment.spans.len();
                let pt = segment.segment_key.project_and_trace();
                let trace = pt.split_once(':').map_or("", |(_, trace)| trace);
                for span in &segment.spans {
                    let key = (segment.project_id, trace.to_owned(), span.span_id.clone());
                    let count = seen.entry(key).or_insert(0);
                    *count += 1;
                    if *count > 1 {
                        report.duplicate_spans += 1;
                    }
                }
            }
            for message in messages.iter().flatten() {
                report.messages += 1;
                if let (Some(out), Some(path)) = (output.as_mut(), args.output.as_ref()) {
                    out.write_all(message)
                        .and_then(|()| out.write_all(b"\n"))
                        .map_err(|source| ReplayError::Io {
                            path: path.clone(),
                            source,
                        })?;
                }
            }
        }
        let cpu_after_flush = redis_cpu_secs(&nodes)?;
        report.flush = PhaseReport::new(
            report.spans_out,
            flush_wall,
            cpu_after_flush - cpu_after_ingest,
        );
        report.missing_spans = seen.values().filter(|&&count| count == 0).count();
    }
    display.set_message(format!("done, {} spans out", report.spans_out));
    display.finish();
    report.keys_left = keys_left(&nodes)?;
    Ok(report)
}

/// The file's bytes, decompressed when it is a zstd stream.
fn read_input(path: &PathBuf) -> Result<Vec<u8>, ReplayError> {
    let io = |source| ReplayError::Io {
        path: path.clone(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::decode_all(bytes.as_slice()).map_err(io)
    } else {
        Ok(bytes)
    }
}

fn received(line: &[u8]) -> Option<f64> {
    use sonic_rs::JsonValueTrait;
    sonic_rs::get(line, ["received"]).ok()?.as_f64()
}

/// Every node to measure: the server itself, or every master of the cluster.
fn node_urls(url: &str, cluster: bool) -> Result<Vec<String>, ReplayError> {
    if !cluster {
        return Ok(vec![url.to_owned()]);
    }
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query(&mut conn)?;
    Ok(nodes
        .lines()
        .filter(|line| line.contains("master"))
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter_map(|address| address.split('@').next())
        .map(|address| format!("redis://{address}/"))
        .collect())
}

/// CPU seconds (user + sys) the Redis servers at `nodes` have used so far, from `INFO cpu`;
/// take the difference of two readings to measure a piece of work.
///
/// # Errors
///
/// A server that cannot be reached or queried.
pub fn redis_cpu_secs(nodes: &[String]) -> Result<f64, ReplayError> {
    let mut total = 0.0;
    for url in nodes {
        let mut conn = redis::Client::open(url.as_str())?.get_connection()?;
        let info: String = redis::cmd("INFO").arg("cpu").query(&mut conn)?;
        for line in info.lines() {
            if let Some((name, value)) = line.split_once(':')
                && (name == "used_cpu_sys" || name == "used_cpu_user")
            {
                total += value.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(total)
}

/// One command's share of the work of Redis servers, from `INFO commandstats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandStat {
    /// The command, lower case as Redis names it (`evalsha`, `sadd`, `zadd`, ...).
    pub command: String,
    /// How many times it ran.
    pub calls: u64,
    /// Microseconds of server time it took.
    pub usec: u64,
}

/// What the servers at `nodes` ran since they started, summed over the nodes, most costly
/// first.
///
/// # Errors
///
/// A server that cannot be reached or queried.
pub fn command_stats(nodes: &[String]) -> Result<Vec<CommandStat>, ReplayError> {
    let mut stats: Vec<CommandStat> = Vec::new();
    for url in nodes {
        let mut conn = redis::Client::open(url.as_str())?.get_connection()?;
        let info: String = redis::cmd("INFO").arg("commandstats").query(&mut conn)?;
        for (command, fields) in info.lines().filter_map(|line| {
            line.strip_prefix("cmdstat_")
                .and_then(|line| line.split_once(':'))
        }) {
            let field = |name: &str| {
                fields
                    .split(',')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(key, _)| *key == name)
                    .and_then(|(_, value)| value.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let (calls, usec) = (field("calls"), field("usec"));
            match stats.iter_mut().find(|stat| stat.command == command) {
                Some(stat) => {
                    stat.calls += calls;
                    stat.usec += usec;
                }
                None => stats.push(CommandStat {
                    command: command.to_owned(),
                    calls,
                    usec,
                }),
            }
        }
    }
    stats.sort_by_key(|stat| std::cmp::Reverse(stat.usec));
    Ok(stats)
}

/// Keys stored on the Redis servers at `nodes`, summed (`DBSIZE`).
///
/// # Errors
///
/// A server that cannot be reached or queried.
pub fn keys_left(nodes: &[String]) -> Result<u64, ReplayError> {
    let mut total = 0;
    for url in nodes {
        let mut conn = redis::Client::open(url.as_str())?.get_connection()?;
        let size: u64 = redis::cmd("DBSIZE").query(&mut conn)?;
        total += size;
    }
    Ok(total)
}
