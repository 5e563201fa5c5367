//! A synthetic span load with the shape of the shared benchmark workload
//! (`shared/bench/gen_workload.py`), generated in process so the demo needs nothing else.
//!
//! Each trace is one segment of 1 to 50 spans in one project: span 0 is the root, every other
//! span picks its parent among the spans before it (a random recursive tree), and children are
//! nested in time inside their parent. A span arrives when it ends plus a small delay, so
//! children usually arrive before their parents and a trace straddles several batches; arrival
//! order is then shuffled within small windows, as Kafka and Relay reorder. Payloads are valid
//! `ingest-spans` messages of 600 to 1500 bytes. Everything derives from the seed.

/// One generated span message.
#[derive(Clone, Debug, PartialEq)]
pub struct GeneratedSpan {
    /// Its trace: all spans of a trace go to one partition, as Relay routes them.
    pub trace_id: String,
    /// Its span id.
    pub span_id: String,
    /// Seconds after the start of the load at which it arrives.
    pub arrival: f64,
    /// The message value.
    pub payload: Vec<u8>,
}

/// How the load looks.
#[derive(Clone, Debug)]
pub struct WorkloadShape {
    /// Spans in all.
    pub spans: usize,
    /// Spans arriving per second (spreads the traces' start times).
    pub rate: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

const WORDS: &[&str] = &[
    "SELECT",
    "id",
    "project_id",
    "status",
    "FROM",
    "sentry_groupedmessage",
    "WHERE",
    "organization_id",
    "=",
    "%s",
    "ORDER",
    "BY",
    "last_seen",
    "DESC",
    "LIMIT",
    "100",
    "GET",
    "https://api.example.com/v2/users/%s/permissions",
    "redis",
    "cache:project-config:v3",
    "INSERT",
    "INTO",
    "sentry_eventattachment",
    "UPDATE",
    "sentry_release",
    "SET",
];
const OPS: &[(&str, &str)] = &[
    (
        "http.server",
        "GET /api/0/organizations/{organization_id_or_slug}/issues/",
    ),
    ("http.server", "POST /api/{project_id}/envelope/"),
    ("db", "SELECT"),
    ("db", "INSERT"),
    ("cache.get", "get"),
    ("http.client", "GET"),
    ("function", "sentry.tasks.process"),
    ("queue.publish", "publish"),
];

/// A small deterministic generator (splitmix64), enough for a demo load.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1_u64 << 53) as f64
    }

    /// Uniform in `[low, high]`.
    fn between(&mut self, low: usize, high: usize) -> usize {
        low + (self.next() % (high - low + 1) as u64) as usize
    }

    fn hex(&mut self, bytes: usize) -> String {
        let mut out = String::with_capacity(bytes * 2);
        while out.len() < bytes * 2 {
            out.push_str(&format!("{:016x}", self.next()));
        }
        out.truncate(bytes * 2);
        out
    }
}

/// Generates the load, in arrival order.
pub fn generate(shape: &WorkloadShape) -> Vec<GeneratedSpan> {
    let mut random = Random(shape.seed);
    let mut spans = Vec::with_capacity(shape.spans);
    let mut trace_start = 0.0;
    while spans.len() < shape.spans {
        let count = random.between(1, 50).min(shape.spans - spans.len());
        spans.extend(trace(&mut random, trace_start, count));
        trace_start += count as f64 / shape.rate.max(1.0);
    }
    spans.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    // Reorder within windows of 50 messages.
    for window in spans.chunks_mut(50) {
        for index in (1..window.len()).rev() {
            let other = random.between(0, index);
            window.swap(index, other);
        }
    }
    spans
}

fn trace(random: &mut Random, start: f64, count: usize) -> Vec<GeneratedSpan> {
    let trace_id = random.hex(16);
    let organization_id = random.between(1, 20) as u64;
    let project_id = organization_id * 100 + random.between(1, 5) as u64;
    let ids: Vec<String> = (0..count).map(|_| random.hex(8)).collect();
    let root_duration = 0.005 + random.unit() * random.unit() * 3.0;
    let mut starts = vec![start];
    let mut ends = vec![start + root_duration];
    let mut parents = vec![None];
    for index in 1..count {
        let parent = random.between(0, index - 1);
        let (parent_start, parent_end) = (starts[parent], ends[parent]);
        let span_start = parent_start + random.unit() * (parent_end - parent_start) * 0.7;
        let span_end = span_start + (random.unit() * (parent_end - span_start)).max(0.0001);
        starts.push(span_start);
        ends.push(span_end);
        parents.push(Some(parent));
    }
    (0..count)
        .map(|index| {
            let (op, name) = OPS[random.between(0, OPS.len() - 1)];
            let parent = parents[index].map_or("null".to_owned(), |p| format!("\"{}\"", ids[p]));
            let head = format!(
                r#"{{"organization_id":{organization_id},"project_id":{project_id},"key_id":{key},"trace_id":"{trace_id}","span_id":"{span_id}","parent_span_id":{parent},"is_segment":{is_segment},"start_timestamp":{start:.6},"end_timestamp":{end:.6},"received":{end:.6},"retention_days":90,"name":"{name}","status":"ok","attributes":{{"sentry.op":{{"type":"string","value":"{op}"}},"sentry.environment":{{"type":"string","value":"production"}},"sentry.description":{{"type":"string","value":""#,
                key = project_id * 10 + 1,
                span_id = ids[index],
                is_segment = index == 0,
                start = 1_700_000_000.0 + starts[index],
                end = 1_700_000_000.0 + ends[index],
            );
            let tail = r#""}}}"#;
            let target = random.between(600, 1500);
            let head_len = head.len();
            let mut payload = head;
            let mut first = true;
            while payload.len() + tail.len() < target {
                if !first {
                    payload.push(' ');
                }
                first = false;
                payload.push_str(WORDS[random.between(0, WORDS.len() - 1)]);
            }
            // Exactly the drawn size, unless the fixed fields alone are longer.
            payload.truncate(target.saturating_sub(tail.len()).max(head_len));
            payload.push_str(tail);
            GeneratedSpan {
                trace_id: trace_id.clone(),
                span_id: ids[index].clone(),
                arrival: ends[index] + random.unit() * 0.5,
                payload: payload.into_bytes(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Span;

    fn shape(spans: usize) -> WorkloadShape {
        WorkloadShape {
            spans,
            rate: 1000.0,
            seed: 42,
        }
    }

    #[test]
    fn every_span_is_a_valid_ingest_message_of_the_drawn_size() {
        let spans = generate(&shape(2000));

        assert_eq!(spans.len(), 2000);
        for generated in &spans {
            let span = Span::decode(&generated.payload, 0).unwrap();
            assert_eq!(span.span_id, generated.span_id.as_str());
            assert!(
                (600..=1500).contains(&generated.payload.len()),
                "{}",
                generated.payload.len()
            );
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_load() {
        assert_eq!(generate(&shape(500)), generate(&shape(500)));
    }

    #[test]
    fn every_trace_has_exactly_one_root() {
        let spans = generate(&shape(3000));
        let mut roots = std::collections::HashMap::<&str, usize>::new();
        for generated in &spans {
            let span = Span::decode(&generated.payload, 0).unwrap();
            *roots.entry(&generated.trace_id).or_default() += usize::from(span.is_segment_span);
        }
        assert!(roots.values().all(|count| *count == 1));
    }
}
