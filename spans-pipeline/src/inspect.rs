//! `spans-pipeline inspect`: what is inside a live buffer, for an operator at a terminal (text)
//! or a script (`--json`).
//!
//! The reading is [`crate::buffer::BufferInspector`], read-only and bounded so it is
//! safe on a production cluster; this module holds the command line, the progress display and
//! the text rendering.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytesize::ByteSize;
use clap::Args;

use crate::buffer::RedisConnection;
use crate::buffer::{BufferInspector, InspectLimits, InspectProgress, InspectReport};
use crate::progress::Progress;

/// Options of `spans-pipeline inspect`.
#[derive(Clone, Debug, Args)]
pub struct InspectArgs {
    /// The server, or a node of the cluster (repeatable); credentials go in the URL.
    #[arg(long = "redis-url", required = true)]
    pub redis_urls: Vec<String>,
    /// The URLs are Redis Cluster nodes: every master is scanned.
    #[arg(long)]
    pub cluster: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Read the queues against this Unix time instead of the wall clock (for example the
    /// consumer's broker clock).
    #[arg(long)]
    pub now: Option<i64>,
    /// `COUNT` of each SCAN, ZSCAN and HSCAN.
    #[arg(long, default_value_t = InspectLimits::default().scan_count)]
    pub scan_count: usize,
    /// Keys scanned per master at most.
    #[arg(long, default_value_t = InspectLimits::default().max_keys_per_node)]
    pub max_keys_per_node: u64,
    /// Keys per family measured with MEMORY USAGE, and redirect maps checked.
    #[arg(long, default_value_t = InspectLimits::default().samples)]
    pub samples: usize,
    /// Entries checked per queue, and fields per redirect map.
    #[arg(long, default_value_t = InspectLimits::default().max_entries)]
    pub max_entries: usize,
    /// Length of the top lists.
    #[arg(long, default_value_t = InspectLimits::default().top)]
    pub top: usize,
    /// Stop after this long, with what was seen so far (`complete: false`).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub time_limit: Duration,
}

impl InspectArgs {
    fn limits(&self) -> InspectLimits {
        InspectLimits {
            scan_count: self.scan_count.max(1),
            max_keys_per_node: self.max_keys_per_node,
            samples: self.samples,
            max_entries: self.max_entries,
            top: self.top,
            time_limit: self.time_limit,
            ..InspectLimits::default()
        }
    }
}

/// Why `inspect` failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// Redis could not be reached.
    #[error("cannot connect to redis")]
    Connect(#[source] redis::RedisError),
    /// A read failed.
    #[error("inspecting the buffer failed")]
    Buffer(#[from] crate::buffer::BufferError),
    /// The report could not be written as JSON.
    #[error("cannot write the report as json")]
    Json(#[from] sonic_rs::Error),
}

/// Inspects the buffer and returns the report as it is to be printed (text or JSON); progress
/// goes to stderr.
///
/// # Errors
///
/// See [`InspectError`].
pub async fn run(args: &InspectArgs) -> Result<String, InspectError> {
    let conn = RedisConnection::connect(&args.redis_urls, args.cluster)
        .await
        .map_err(InspectError::Connect)?;
    let address = args
        .redis_urls
        .first()
        .map(|url| host_and_port(url))
        .unwrap_or_default();
    let inspector = BufferInspector::new(conn, args.limits(), address);
    let now = args.now.unwrap_or_else(unix_now);
    let mut progress = Progress::stderr("inspect", "keys", None);
    let report = inspector
        .inspect(now, &mut |step| match step {
            InspectProgress::Scanning { scanned, total } => {
                progress.set_total(total.max(scanned));
                progress.set_position(scanned);
            }
            InspectProgress::Phase(phase) => progress.set_message(format!("checking {phase}")),
        })
        .await?;
    progress.finish();
    if args.json {
        Ok(sonic_rs::to_string_pretty(&report)?)
    } else {
        Ok(render_text(&report))
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

/// `host:port` of a Redis URL, without scheme, credentials or database.
fn host_and_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
        .to_owned()
}

fn size(bytes: u64) -> String {
    ByteSize::b(bytes).display().iec().to_string()
}

/// The report for people.
pub fn render_text(report: &InspectReport) -> String {
    let mut out = String::new();
    let state = if report.complete {
        "complete"
    } else {
        "INCOMPLETE (a limit was reached; counts are lower bounds)"
    };
    let _ = writeln!(
        out,
        "Spans buffer at now={} ({state}, {} ms)",
        report.now, report.elapsed_ms
    );
    let _ = writeln!(out, "\nNodes");
    for node in &report.nodes {
        let limit = if node.maxmemory == 0 {
            format!("no maxmemory, {} system", size(node.total_system_memory))
        } else {
            format!("maxmemory {}", size(node.maxmemory))
        };
        let _ = writeln!(
            out,
            "  {:<24} used {:>10} ({limit}), {} keys, {} of the buffer{}",
            node.address,
            size(node.used_memory),
            node.keys,
            node.buffer_keys,
            if node.complete {
                ""
            } else {
                " (scan cut short)"
            }
        );
    }
    let _ = writeln!(out, "\nFlush queues");
    if report.queues.is_empty() {
        let _ = writeln!(out, "  none");
    }
    for queue in &report.queues {
        let oldest = queue
            .oldest_deadline
            .map_or_else(|| "-".to_owned(), |deadline| deadline.to_string());
        let _ = writeln!(
            out,
            "  {:<24} depth {:>8}  due {:>8}  oldest deadline {oldest}  behind {}  without data {}/{}",
            queue.key,
            queue.depth,
            queue.due,
            humantime::format_duration(Duration::from_secs(queue.behind_secs)),
            queue.entries_without_data,
            queue.entries_checked
        );
    }
    let segments = &report.segments;
    let _ = writeln!(
        out,
        "\nSegments: {} with {} spans, {} uncompressed",
        segments.segments,
        segments.spans,
        size(segments.bytes)
    );
    for (title, list) in [
        ("Largest by spans", &report.largest_by_spans),
        ("Largest by bytes", &report.largest_by_bytes),
    ] {
        let _ = writeln!(out, "{title}");
        for segment in list {
            let _ = writeln!(
                out,
                "  {:>8} spans {:>10} {:>5} subsegments  {}",
                segment.spans,
                size(segment.bytes),
                segment.subsegments,
                segment.key
            );
        }
    }
    let _ = writeln!(out, "Hottest traces (subsegments)");
    for trace in &report.hottest_traces {
        let _ = writeln!(
            out,
            "  {:>8}  project {} trace {}",
            trace.subsegments, trace.project_id, trace.trace_id
        );
    }
    let _ = writeln!(out, "\nKey families (memory estimated from a sample)");
    for family in report.families.iter().filter(|family| family.keys > 0) {
        let _ = writeln!(
            out,
            "  {:<16} {:>10} keys  ~{:>10}  (sample of {})  without ttl {}",
            family.family.name(),
            family.keys,
            size(family.estimated_bytes),
            family.sampled,
            family.without_ttl
        );
    }
    let left = &report.leftovers;
    let _ = writeln!(out, "\nLeftovers");
    let _ = writeln!(out, "  keys without a ttl: {}", left.keys_without_ttl);
    for key in &left.keys_without_ttl_examples {
        let _ = writeln!(out, "    {key}");
    }
    let _ = writeln!(
        out,
        "  queue entries with no data: {} of {} checked",
        left.queue_entries_without_data, left.queue_entries_checked
    );
    for entry in &left.queue_entries_examples {
        let _ = writeln!(out, "    {entry}");
    }
    let _ = writeln!(
        out,
        "  redirect fields with no segment: {} of {} checked in {} maps",
        left.redirect_fields_without_segment,
        left.redirect_fields_checked,
        left.redirect_maps_checked
    );
    for field in &left.redirect_fields_examples {
        let _ = writeln!(out, "    {field}");
    }
    if left.traces_not_ranked > 0 {
        let _ = writeln!(
            out,
            "  ({} payload keys of traces past the ranking limit)",
            left.traces_not_ranked
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_of_a_url_has_no_credentials() {
        assert_eq!(host_and_port("redis://u:p@cache:6379/0"), "cache:6379");
        assert_eq!(host_and_port("rediss://cache:6380"), "cache:6380");
    }

    #[test]
    fn an_empty_report_renders() {
        let text = render_text(&InspectReport::default());

        assert!(text.contains("INCOMPLETE"), "{text}");
        assert!(text.contains("Flush queues\n  none"), "{text}");
    }
}
