//! Shared helpers of the Redis-backed tests: spans built like Sentry's test fixtures, a buffer
//! on a real Redis of either mode, and the `assert_ttls` / `assert_clean` checks.
//!
//! Included as `buffer_support` with `#[path = "support/buffer.rs"]`; the consumer tests have
//! their own `support` (`support/consumer.rs`).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;

use integration_tests::redis_server::{RedisMode, TestRedis};
use spans_pipeline::buffer::{BufferOptions, FlushedSegment, RedisConnection, SpansBuffer};
use spans_pipeline::span::Span;

/// A 16-character span id made of one repeated letter (Sentry's tests use `"a" * 16`).
pub fn id(letter: char) -> String {
    letter.to_string().repeat(16)
}

/// The trace of most tests.
pub fn trace() -> String {
    "a".repeat(32)
}

/// The owned parts of a test span; [`SpanSpec::span`] borrows a [`Span`] from it.
#[derive(Clone, Debug)]
pub struct SpanSpec {
    pub payload: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub segment_id: Option<String>,
    pub project_id: u64,
    pub is_segment_span: bool,
    pub partition: u16,
}

impl SpanSpec {
    /// A non-root span `span` under `parent` (project 1, trace `a…`, partition 0), with the
    /// 30-byte payload `{"span_id":"…"}` of Sentry's fixtures.
    pub fn child(span: char, parent: char) -> Self {
        Self::new(&id(span), Some(&id(parent)), false)
    }

    /// A segment root.
    pub fn root(span: char) -> Self {
        Self::new(&id(span), None, true)
    }

    pub fn new(span_id: &str, parent: Option<&str>, is_segment_span: bool) -> Self {
        Self {
            payload: format!(r#"{{"span_id":"{span_id}"}}"#),
            trace_id: trace(),
            span_id: span_id.to_owned(),
            parent_span_id: parent.map(str::to_owned),
            segment_id: None,
            project_id: 1,
            is_segment_span,
            partition: 0,
        }
    }

    pub fn project(mut self, project_id: u64) -> Self {
        self.project_id = project_id;
        self
    }

    pub fn partition(mut self, partition: u16) -> Self {
        self.partition = partition;
        self
    }

    pub fn segment_id(mut self, segment: char) -> Self {
        self.segment_id = Some(id(segment));
        self
    }

    pub fn trace(mut self, trace_id: &str) -> Self {
        self.trace_id = trace_id.to_owned();
        self
    }

    pub fn flagged_segment(mut self) -> Self {
        self.is_segment_span = true;
        self
    }

    pub fn payload(mut self, payload: String) -> Self {
        self.payload = payload;
        self
    }

    pub fn span(&self) -> Span<'_> {
        Span {
            trace_id: self.trace_id.as_str().into(),
            span_id: self.span_id.as_str().into(),
            parent_span_id: self.parent_span_id.as_deref().map(Into::into),
            segment_id: self.segment_id.as_deref().map(Into::into),
            project_id: self.project_id,
            organization_id: 1,
            is_segment_span: self.is_segment_span,
            partition: self.partition,
            payload: self.payload.as_bytes(),
        }
    }
}

/// Borrowed spans of a batch.
pub fn spans(specs: &[SpanSpec]) -> Vec<Span<'_>> {
    specs.iter().map(SpanSpec::span).collect()
}

/// Sentry's `DEFAULT_OPTIONS` (which are also our defaults).
pub fn default_options() -> BufferOptions {
    BufferOptions::default()
}

pub async fn connect(redis: &TestRedis) -> RedisConnection {
    RedisConnection::connect(&redis.urls(), redis.is_cluster())
        .await
        .unwrap()
}

pub async fn buffer(redis: &TestRedis, options: BufferOptions, shards: Vec<u16>) -> SpansBuffer {
    SpansBuffer::new(connect(redis).await, options, shards, None)
        .await
        .unwrap()
}

/// Runs `test` once per Redis mode, each with a fresh Redis.
pub async fn for_each_mode<F, Fut>(test: F)
where
    F: Fn(TestRedis) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    TestRedis::for_each_mode(test).await;
}

pub fn start(mode: RedisMode) -> TestRedis {
    TestRedis::start(mode)
}

/// Output spans of a flush, per segment key: `(span_id, is_segment, sentry.segment.id)`,
/// sorted by span id.
pub type SegmentView = BTreeMap<String, Vec<(String, bool, String)>>;

pub fn view(segments: &[FlushedSegment]) -> SegmentView {
    let mut out = SegmentView::new();
    for segment in segments {
        let mut spans: Vec<(String, bool, String)> = segment
            .spans
            .iter()
            .map(|span| {
                let json: sonic_rs::Value = sonic_rs::from_slice(&span.payload).unwrap();
                use sonic_rs::JsonValueTrait;
                let segment_id = json["attributes"]["sentry.segment.id"]["value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                (
                    json["span_id"].as_str().unwrap_or_default().to_owned(),
                    json["is_segment"].as_bool().unwrap(),
                    segment_id,
                )
            })
            .collect();
        spans.sort();
        out.entry(segment.segment_key.to_string())
            .or_default()
            .extend(spans);
    }
    out
}

/// The segment key of `root` in project `project`, trace `a…`.
pub fn segment_key(project: u64, root: &str) -> String {
    format!("span-buf:s:{{{project}:{}}}:{root}", trace())
}

/// Expected output spans: `(span letter, is_segment)` all with segment id `segment`.
pub fn expected(spans: &[(char, bool)], segment: &str) -> Vec<(String, bool, String)> {
    let mut out: Vec<_> = spans
        .iter()
        .map(|&(span, is_segment)| (id(span), is_segment, segment.to_owned()))
        .collect();
    out.sort();
    out
}

/// Every key in Redis has a TTL.
pub fn assert_ttls(redis: &TestRedis) {
    redis.assert_ttls();
}

/// Nothing but `:hrs:` flags is left.
pub fn assert_clean(redis: &TestRedis) {
    let left: Vec<String> = redis
        .keys_with_ttls()
        .iter()
        .map(|k| k.key_str())
        .filter(|k| !k.contains(":hrs:"))
        .collect();
    assert!(left.is_empty(), "keys left in redis: {left:?}");
}

/// Flushes at `now`, then runs done on what was flushed; returns the view.
pub async fn flush_and_done(buffer: &SpansBuffer, now: i64) -> SegmentView {
    let flush = buffer.load_due_segments(now).await.unwrap();
    buffer.done_flush_segments(&flush.segments).await.unwrap();
    view(&flush.segments)
}

/// Every ordering of `items`.
pub fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first.clone());
            out.push(tail);
        }
    }
    out
}

/// What flushing a buffer dry produced: every flushed segment, and the spans counted as lost.
#[derive(Debug, Default)]
pub struct Drained {
    pub segments: Vec<FlushedSegment>,
    pub lost_spans: u64,
}

impl Drained {
    /// Output spans over every segment.
    pub fn span_count(&self) -> usize {
        self.segments.iter().map(|s| s.spans.len()).sum()
    }
}

/// Flushes at `now` and runs done, again and again until a flush returns no segment (at most
/// `rounds` times, so a buffer that never drains fails the test instead of hanging it).
pub async fn flush_until_empty(buffer: &SpansBuffer, now: i64, rounds: usize) -> Drained {
    let mut drained = Drained::default();
    for _ in 0..rounds {
        let flush = buffer.load_due_segments(now).await.unwrap();
        if flush.segments.is_empty() {
            return drained;
        }
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        drained.lost_spans += flush.lost.iter().map(|l| l.quantity).sum::<u64>();
        drained.segments.extend(flush.segments);
    }
    panic!("the buffer did not drain in {rounds} flushes");
}
