//! The reference workload: a deterministic stream of `ingest-spans` messages with the shape
//! of production span traffic, used by the tests, the benches, the demo and the replay tool,
//! and written to a JSONL file by `spans-pipeline gen-workload`.
//!
//! Why this shape: the buffer's cost depends on how spans of a trace arrive, not on what they
//! say. So the load has what makes assembly hard in production:
//!
//! - every trace is one segment (one project) of 1 to 50 spans; span 0 is the root, every other
//!   span picks its parent uniformly among the spans before it (a random recursive tree, depth
//!   about `ln n`), and each child is nested in time inside its parent;
//! - a span arrives when it ends plus a random delay of up to 2 s, so children usually arrive
//!   before their parents and a trace straddles several consumer batches;
//! - arrivals are sorted, then shuffled inside windows of 500 messages, as Relay and Kafka
//!   reorder; `received` is the arrival time, at about 2,000 spans/s on average;
//! - 50 organizations with 4 projects each, payloads of 600 to 1,500 bytes hit exactly by
//!   sizing the `sentry.description` attribute.
//!
//! Everything derives from the seed through ChaCha8, whose output is fixed by its
//! specification: the same shape gives the same bytes on every machine and build.

use std::io::Write;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use blake2::Digest;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde::ser::SerializeMap;

/// How the load looks. [`Default`] is the reference shape (200,000 spans, seed 42).
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadShape {
    /// Spans in all; the last trace is trimmed to hit it exactly.
    pub spans: usize,
    /// Spans per trace (one segment each), drawn uniformly.
    pub spans_per_trace: RangeInclusive<usize>,
    /// Bytes per message, drawn uniformly and hit exactly.
    pub payload_bytes: RangeInclusive<usize>,
    /// Average arrival rate in spans per second: spreads the traces' start times.
    pub rate: f64,
    /// Longest delay between a span's end and its arrival, in seconds.
    pub max_delay: f64,
    /// Arrivals are shuffled inside consecutive windows of this many messages.
    pub shuffle_window: usize,
    /// Organizations the traces are spread over.
    pub organizations: u64,
    /// Projects of each organization.
    pub projects_per_organization: u64,
    /// Share of traces whose spans carry `sentry.segment.id` (as for spans extracted from
    /// transactions); the others are assembled from `parent_span_id` alone.
    pub segment_id_fraction: f64,
    /// Unix time, in seconds, at which the first trace may start (2026-01-01 by default).
    pub start: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for WorkloadShape {
    fn default() -> Self {
        Self {
            spans: 200_000,
            spans_per_trace: 1..=50,
            payload_bytes: 600..=1500,
            rate: 2000.0,
            max_delay: 2.0,
            shuffle_window: 500,
            organizations: 50,
            projects_per_organization: 4,
            segment_id_fraction: 0.0,
            start: 1_767_225_600.0,
            seed: 42,
        }
    }
}

/// One generated span message.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedSpan {
    /// Its trace: all spans of a trace go to one partition, as Relay routes them.
    pub trace_id: String,
    /// Its span id.
    pub span_id: String,
    /// Its `received` field: Unix seconds at which it arrives.
    pub received: f64,
    /// The message value.
    pub payload: Vec<u8>,
}

/// What a generated load holds, as `gen-workload` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSummary {
    /// Messages.
    pub spans: usize,
    /// Distinct traces.
    pub traces: usize,
    /// Payload bytes, newlines not counted.
    pub bytes: usize,
    /// BLAKE2b-256 of the file's bytes, in hex: equal files, equal digests.
    pub digest: String,
}

/// Generates the load, in arrival order.
pub fn generate(shape: &WorkloadShape) -> Vec<GeneratedSpan> {
    let mut random = ChaCha8Rng::seed_from_u64(shape.seed);
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < shape.spans {
        let size = random
            .random_range(shape.spans_per_trace.clone())
            .max(1)
            .min(shape.spans - total);
        sizes.push(size);
        total += size;
    }
    let duration = total as f64 / shape.rate.max(f64::MIN_POSITIVE);
    let mut spans = Vec::with_capacity(total);
    for size in sizes {
        let trace_start = shape.start + random.random::<f64>() * duration;
        let organization = random.random_range(0..shape.organizations.max(1));
        let project = random.random_range(0..shape.projects_per_organization.max(1));
        let owner = Owner {
            organization_id: 1_000_000 + organization,
            project_id: 4_500_000 + organization * shape.projects_per_organization + project,
        };
        let with_segment_id = random.random::<f64>() < shape.segment_id_fraction;
        spans.extend(trace(
            &mut random,
            shape,
            &owner,
            trace_start,
            size,
            with_segment_id,
        ));
    }
    // A stable sort keeps generation order between equal arrival times.
    spans.sort_by(|a, b| a.received.total_cmp(&b.received));
    for window in spans.chunks_mut(shape.shuffle_window.max(1)) {
        window.shuffle(&mut random);
    }
    spans
}

/// The partition of `partitions` that a trace's spans go to: all spans of a trace on one
/// partition, as Relay routes them (any fixed hash does; this is FNV-1a of the trace id).
pub fn partition_of(trace_id: &str, partitions: i32) -> i32 {
    let hash = trace_id
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
    i32::try_from(hash % u64::from(partitions.unsigned_abs().max(1))).unwrap_or(0)
}

/// A span of a trace of its own, for a feeder to send after a load, stamped past the flush
/// timeouts, so the consumer's clock (which follows the messages' timestamps) moves on and
/// every segment of the load comes due, as later traffic would make it. Its trace is not
/// part of any load generated from another seed.
pub fn clock_tick() -> GeneratedSpan {
    let mut tick = generate(&WorkloadShape {
        spans: 1,
        seed: 0x7_1C4,
        ..WorkloadShape::default()
    });
    tick.remove(0)
}

/// Writes the load as JSONL, one message value a line, and says what it wrote.
pub fn write_jsonl(spans: &[GeneratedSpan], out: impl Write) -> std::io::Result<WorkloadSummary> {
    write_jsonl_reporting(spans, out, &mut |_| {})
}

/// [`write_jsonl`], telling `written` how many spans are written every 10,000 spans (for a
/// progress display).
pub fn write_jsonl_reporting(
    spans: &[GeneratedSpan],
    mut out: impl Write,
    written: &mut dyn FnMut(u64),
) -> std::io::Result<WorkloadSummary> {
    let mut digest = blake2::Blake2b::<blake2::digest::consts::U32>::new();
    let mut bytes = 0;
    for (index, span) in spans.iter().enumerate() {
        if index % 10_000 == 0 {
            written(index as u64);
        }
        out.write_all(&span.payload)?;
        out.write_all(b"\n")?;
        digest.update(&span.payload);
        digest.update(b"\n");
        bytes += span.payload.len();
    }
    out.flush()?;
    written(spans.len() as u64);
    Ok(WorkloadSummary {
        spans: spans.len(),
        traces: spans
            .iter()
            .map(|span| span.trace_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len(),
        bytes,
        digest: hex::encode(digest.finalize()),
    })
}

/// Options of `spans-pipeline gen-workload`; the defaults are the reference shape.
#[derive(Clone, Debug, clap::Args)]
pub struct GenWorkloadArgs {
    /// Where to write the JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// Spans in all.
    #[arg(long, default_value_t = 200_000)]
    pub spans: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fewest spans per trace.
    #[arg(long, default_value_t = 1)]
    pub min_spans: usize,
    /// Most spans per trace.
    #[arg(long, default_value_t = 50)]
    pub max_spans: usize,
    /// Smallest message in bytes.
    #[arg(long, default_value_t = 600)]
    pub min_bytes: usize,
    /// Largest message in bytes.
    #[arg(long, default_value_t = 1500)]
    pub max_bytes: usize,
    /// Average arrival rate, spans per second.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Longest delay between a span's end and its arrival, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub max_delay: f64,
    /// Shuffle window, in messages.
    #[arg(long, default_value_t = 500)]
    pub window: usize,
    /// Organizations.
    #[arg(long, default_value_t = 50)]
    pub orgs: u64,
    /// Projects per organization.
    #[arg(long, default_value_t = 4)]
    pub projects_per_org: u64,
    /// Share of traces whose spans carry `sentry.segment.id`.
    #[arg(long, default_value_t = 0.0)]
    pub segment_id_fraction: f64,
}

impl GenWorkloadArgs {
    /// The shape these options describe, or why they describe none.
    pub fn shape(&self) -> Result<WorkloadShape, String> {
        if self.min_spans == 0 || self.min_spans > self.max_spans {
            return Err(format!(
                "--min-spans {} and --max-spans {}: need 1 <= min <= max",
                self.min_spans, self.max_spans
            ));
        }
        if self.min_bytes > self.max_bytes {
            return Err(format!(
                "--min-bytes {} is above --max-bytes {}",
                self.min_bytes, self.max_bytes
            ));
        }
        if self.rate.is_nan() || self.rate <= 0.0 || self.max_delay.is_nan() || self.max_delay < 0.0
        {
            return Err("--rate must be positive and --max-delay not negative".to_owned());
        }
        Ok(WorkloadShape {
            spans: self.spans,
            spans_per_trace: self.min_spans..=self.max_spans,
            payload_bytes: self.min_bytes..=self.max_bytes,
            rate: self.rate,
            max_delay: self.max_delay,
            shuffle_window: self.window,
            organizations: self.orgs,
            projects_per_organization: self.projects_per_org,
            segment_id_fraction: self.segment_id_fraction,
            seed: self.seed,
            ..WorkloadShape::default()
        })
    }
}

/// The operation, name and origin a span may have; traces' roots take one of the first two.
const OPERATIONS: &[(&str, &str, &str)] = &[
    (
        "http.server",
        "GET /api/0/organizations/{organization_id_or_slug}/issues/",
        "auto.http.django",
    ),
    (
        "http.server",
        "POST /api/{project_id}/envelope/",
        "auto.http.django",
    ),
    ("db", "SELECT", "auto.db.django"),
    ("db", "INSERT", "auto.db.django"),
    ("cache.get", "get", "auto.cache.redis"),
    ("http.client", "GET", "auto.http.urllib3"),
    ("function", "sentry.tasks.process", "manual"),
    ("template.render", "render", "auto.template.django"),
    ("queue.publish", "publish", "auto.queue.celery"),
    ("ui.react.render", "render", "auto.ui.react"),
];

/// Words of the SQL- and HTTP-like descriptions.
const WORDS: &[&str] = &[
    "SELECT",
    "id",
    "project_id",
    "status",
    "first_seen",
    "last_seen",
    "times_seen",
    "FROM",
    "sentry_groupedmessage",
    "WHERE",
    "organization_id",
    "=",
    "%s",
    "AND",
    "IN",
    "(%s,",
    "%s)",
    "ORDER",
    "BY",
    "DESC",
    "LIMIT",
    "100",
    "JOIN",
    "sentry_project",
    "ON",
    "sentry_project.id",
    "sentry_groupedmessage.project_id",
    "GET",
    "https://api.example.com/v2/users/%s/permissions?include=roles&page=2",
    "redis",
    "cache:project-config:v3",
    "INSERT",
    "INTO",
    "sentry_eventattachment",
    "VALUES",
    "UPDATE",
    "sentry_release",
    "SET",
    "date_released",
    "now()",
    "version",
];

/// SDKs: name, version, platform.
const SDKS: &[(&str, &str, &str)] = &[
    ("sentry.python.django", "2.20.0", "python"),
    ("sentry.javascript.react", "8.47.0", "javascript"),
    ("sentry.java.spring-boot", "7.20.0", "java"),
];

/// Statuses of the spans that fail: one in ten does.
const FAILURES: &[&str] = &["internal_error", "cancelled"];

const ENVIRONMENTS: &[&str] = &["production", "production", "production", "staging"];

/// Who a trace belongs to.
struct Owner {
    organization_id: u64,
    project_id: u64,
}

/// A typed attribute value, serialised as `{"type": ..., "value": ...}`.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
enum Attribute {
    String(String),
    Double(f64),
    Integer(i64),
}

/// Attributes in the order they are written.
struct Attributes(Vec<(&'static str, Attribute)>);

impl Serialize for Attributes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in &self.0 {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

/// One `ingest-spans` message (Span V2, as Relay produces it).
#[derive(Serialize)]
struct Message<'a> {
    organization_id: u64,
    project_id: u64,
    key_id: u64,
    trace_id: &'a str,
    span_id: &'a str,
    parent_span_id: Option<&'a str>,
    is_segment: bool,
    start_timestamp: f64,
    end_timestamp: f64,
    received: f64,
    retention_days: u32,
    downsampled_retention_days: u32,
    name: &'a str,
    status: &'a str,
    attributes: Attributes,
}

const DESCRIPTION: &str = "sentry.description";

/// Room left for the description when deciding whether one more optional attribute fits.
const DESCRIPTION_ROOM: usize = 40;

fn json_len(value: &impl Serialize) -> usize {
    serde_json::to_vec(value).map_or(0, |bytes| bytes.len())
}

fn hex_id(random: &mut ChaCha8Rng, bytes: usize) -> String {
    let mut raw = vec![0_u8; bytes];
    random.fill(raw.as_mut_slice());
    hex::encode(raw)
}

fn pick<T: Copy>(random: &mut ChaCha8Rng, items: &[T]) -> T {
    items[random.random_range(0..items.len())]
}

/// Log-normal by Box–Muller: `exp(mu + sigma * z)` with `z` standard normal.
fn log_normal(random: &mut ChaCha8Rng, mu: f64, sigma: f64) -> f64 {
    let u1 = 1.0 - random.random::<f64>();
    let u2 = random.random::<f64>();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (mu + sigma * z).exp()
}

fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10_f64.powi(decimals);
    (value * scale).round() / scale
}

fn text_of_length(random: &mut ChaCha8Rng, length: usize) -> String {
    let mut text = String::with_capacity(length + 80);
    while text.len() < length {
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(pick(random, WORDS));
    }
    text.truncate(length);
    text
}

fn trace(
    random: &mut ChaCha8Rng,
    shape: &WorkloadShape,
    owner: &Owner,
    trace_start: f64,
    size: usize,
    with_segment_id: bool,
) -> Vec<GeneratedSpan> {
    let trace_id = hex_id(random, 16);
    let (sdk_name, sdk_version, platform) = pick(random, SDKS);
    let environment = pick(random, ENVIRONMENTS);
    let release = format!(
        "backend@25.{}.{}+{}",
        random.random_range(1..=12),
        random.random_range(0..=9),
        hex_id(random, 6)
    );
    // Root duration: log-normal with a median of about 0.4 s, within 5 ms and 30 s.
    let root_duration = log_normal(random, -0.9, 1.2).clamp(0.005, 30.0);
    let span_ids: Vec<String> = (0..size).map(|_| hex_id(random, 8)).collect();
    let mut parents = vec![None];
    let mut starts = vec![trace_start];
    let mut ends = vec![trace_start + root_duration];
    for index in 1..size {
        let parent = random.random_range(0..index);
        let (parent_start, parent_end) = (starts[parent], ends[parent]);
        let start = parent_start + random.random::<f64>() * (parent_end - parent_start) * 0.7;
        let end = start + (random.random::<f64>() * (parent_end - start)).max(0.0001);
        parents.push(Some(parent));
        starts.push(start);
        ends.push(end);
    }
    let &(root_operation, root_name, root_origin) = &OPERATIONS[random.random_range(0..2)];

    let mut spans = Vec::with_capacity(size);
    for index in 0..size {
        let (operation, name, origin) = if index == 0 {
            (root_operation, root_name, root_origin)
        } else {
            pick(random, OPERATIONS)
        };
        let received = ends[index] + random.random::<f64>() * shape.max_delay;
        let target = random.random_range(shape.payload_bytes.clone());
        let text = |value: &str| Attribute::String(value.to_owned());
        let mut attributes = vec![
            ("sentry.op", text(operation)),
            ("sentry.origin", text(origin)),
            ("sentry.environment", text(environment)),
        ];
        if with_segment_id {
            attributes.push(("sentry.segment.id", text(&span_ids[0])));
        }
        let mut optional = Vec::with_capacity(11);
        if operation.starts_with("http") {
            optional.push(("http.response.status_code", Attribute::Integer(200)));
            optional.push(("server.address", text("api.example.com")));
        }
        if operation == "db" {
            optional.push(("db.system", text("postgresql")));
        }
        let exclusive_time = (ends[index] - starts[index]) * 1000.0 * random.random::<f64>();
        optional.extend([
            ("sentry.release", text(&release)),
            ("sentry.sdk.name", text(sdk_name)),
            ("sentry.platform", text(platform)),
            (
                "sentry.exclusive_time",
                Attribute::Double(round_to(exclusive_time, 3)),
            ),
            ("sentry.sdk.version", text(sdk_version)),
            (
                "thread.id",
                Attribute::String(random.random_range(100_000..=999_999_u32).to_string()),
            ),
            ("sentry.segment.name", text(root_name)),
            (
                "thread.name",
                Attribute::String(format!(
                    "uWSGIWorker{}Core0",
                    random.random_range(1..=16_u32)
                )),
            ),
        ]);
        let mut message = Message {
            organization_id: owner.organization_id,
            project_id: owner.project_id,
            key_id: owner.project_id * 10 + 1,
            trace_id: &trace_id,
            span_id: &span_ids[index],
            parent_span_id: parents[index].map(|parent: usize| span_ids[parent].as_str()),
            is_segment: index == 0,
            start_timestamp: round_to(starts[index], 6),
            end_timestamp: round_to(ends[index], 6),
            received: round_to(received, 6),
            retention_days: 90,
            downsampled_retention_days: 90,
            name,
            status: if random.random_range(0..10) == 0 {
                pick(random, FAILURES)
            } else {
                "ok"
            },
            attributes: Attributes(attributes),
        };
        // The message with an empty description, then optional attributes while they fit.
        let mut size = json_len(&message) + json_len(&DESCRIPTION) + json_len(&text("")) + 2;
        for (key, value) in optional {
            let extra = json_len(&key) + 1 + json_len(&value) + 1;
            if size + extra + DESCRIPTION_ROOM > target {
                break;
            }
            message.attributes.0.push((key, value));
            size += extra;
        }
        let description = text_of_length(random, target.saturating_sub(size));
        message
            .attributes
            .0
            .push((DESCRIPTION, Attribute::String(description)));
        let payload = serde_json::to_vec(&message).unwrap_or_default();
        spans.push(GeneratedSpan {
            trace_id: trace_id.clone(),
            span_id: span_ids[index].clone(),
            received: message.received,
            payload,
        });
    }
    spans
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::*;
    use crate::span::Span;

    fn shape(spans: usize) -> WorkloadShape {
        WorkloadShape {
            spans,
            ..WorkloadShape::default()
        }
    }

    #[test]
    fn every_span_is_a_valid_ingest_message_of_the_drawn_size() {
        let spans = generate(&shape(3000));

        assert_eq!(spans.len(), 3000);
        for generated in &spans {
            let span = Span::decode(&generated.payload, 0).unwrap();
            assert_eq!(span.span_id, generated.span_id);
            assert!(
                (600..=1500).contains(&generated.payload.len()),
                "{}",
                generated.payload.len()
            );
            let value: serde_json::Value = serde_json::from_slice(&generated.payload).unwrap();
            assert_eq!(value["received"].as_f64(), Some(generated.received));
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes() {
        let digest = |shape: &WorkloadShape| {
            write_jsonl(&generate(shape), std::io::sink())
                .unwrap()
                .digest
        };
        let reference = shape(2000);
        assert_eq!(digest(&reference), digest(&reference));
        assert_ne!(
            digest(&reference),
            digest(&WorkloadShape {
                seed: 7,
                ..reference
            })
        );
    }

    #[test]
    fn traces_are_trees_of_one_to_fifty_spans_with_one_root_in_one_project() {
        let spans = generate(&shape(20_000));
        let mut traces = HashMap::<String, Vec<Span<'_>>>::new();
        for generated in &spans {
            let span = Span::decode(&generated.payload, 0).unwrap();
            traces
                .entry(generated.trace_id.clone())
                .or_default()
                .push(span);
        }
        let mut projects = std::collections::HashSet::new();
        for spans in traces.values() {
            assert!((1..=50).contains(&spans.len()), "{}", spans.len());
            assert_eq!(spans.iter().filter(|span| span.is_segment_span).count(), 1);
            let ids: std::collections::HashSet<&str> =
                spans.iter().map(|span| span.span_id.as_ref()).collect();
            for span in spans {
                if let Some(parent) = &span.parent_span_id {
                    assert!(ids.contains(parent.as_ref()));
                }
                assert_eq!(span.project_id, spans[0].project_id);
            }
            projects.insert((spans[0].organization_id, spans[0].project_id));
        }
        // 50 organizations with 4 projects each; 400-odd traces reach nearly all of them.
        assert!(
            projects.len() > 150 && projects.len() <= 200,
            "{projects:?}"
        );
    }

    #[test]
    fn spans_arrive_at_the_rate_with_parents_often_after_their_children() {
        let spans = generate(&shape(20_000));
        let start = WorkloadShape::default().start;
        // Traces start over 10 s (20,000 spans at 2,000/s): count arrivals in the middle 8 s,
        // away from the ramps at both ends.
        let middle = spans
            .iter()
            .filter(|span| (start + 1.0..start + 9.0).contains(&span.received))
            .count() as f64
            / 8.0;
        assert!((1500.0..2500.0).contains(&middle), "{middle} spans/s");

        let position: HashMap<&str, usize> = spans
            .iter()
            .enumerate()
            .map(|(index, span)| (span.span_id.as_str(), index))
            .collect();
        let (mut children, mut late_parents) = (0, 0);
        for (index, generated) in spans.iter().enumerate() {
            let span = Span::decode(&generated.payload, 0).unwrap();
            if let Some(parent) = &span.parent_span_id {
                children += 1;
                late_parents += usize::from(position[parent.as_ref()] > index);
            }
        }
        let share = late_parents as f64 / children as f64;
        assert!(share > 0.3, "{share}");
    }

    #[test]
    fn a_fraction_of_traces_carry_the_segment_id() {
        let spans = generate(&WorkloadShape {
            segment_id_fraction: 0.5,
            ..shape(5000)
        });
        let with_id = spans
            .iter()
            .filter(|span| {
                std::str::from_utf8(&span.payload)
                    .unwrap()
                    .contains("sentry.segment.id")
            })
            .count() as f64
            / spans.len() as f64;
        assert!((0.3..0.7).contains(&with_id), "{with_id}");
    }

    #[test]
    fn the_file_holds_one_message_a_line() {
        let spans = generate(&shape(500));
        let mut file = Vec::new();
        let summary = write_jsonl(&spans, &mut file).unwrap();
        assert_eq!(summary.spans, 500);
        assert_eq!(file.iter().filter(|&&byte| byte == b'\n').count(), 500);
        assert_eq!(summary.bytes + 500, file.len());
        assert!(summary.traces > 0 && summary.traces <= 500);
    }
}
