//! Reads the output topic back while the demo runs, and tallies what came out.
//!
//! The reader runs on a thread of its own so that the feeder and the consumer never wait for
//! it; it keeps, per segment message, the trace and the span ids, which is all the tally needs
//! to say whether each trace came out as one complete segment.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};

use super::DemoError;
use crate::workload::GeneratedSpan;

/// One `buffered-segments` message, as far as the tally reads it.
#[derive(serde::Deserialize)]
struct SegmentMessage {
    spans: Vec<SpanIds>,
}

#[derive(serde::Deserialize)]
struct SpanIds {
    trace_id: String,
    span_id: String,
}

/// One segment read back: its trace and its spans.
struct Segment {
    trace_id: String,
    span_ids: Vec<String>,
}

/// What the reader shares with its thread.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    segments: Mutex<Vec<Segment>>,
    distinct: Mutex<HashSet<String>>,
    distinct_count: AtomicUsize,
    segment_count: AtomicUsize,
}

/// Reads the output topic from the beginning on a thread of its own.
pub(super) struct OutputReader {
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

impl OutputReader {
    /// Starts reading `topic`'s `partitions` from their beginning.
    pub(super) fn start(bootstrap: &str, topic: &str, partitions: i32) -> Result<Self, DemoError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "demo-output-reader")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..partitions {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || read(&consumer, &shared))
        };
        Ok(Self { shared, thread })
    }

    /// Distinct spans read so far.
    pub(super) fn distinct(&self) -> usize {
        self.shared.distinct_count.load(Ordering::Relaxed)
    }

    /// Segment messages read so far.
    pub(super) fn segments(&self) -> usize {
        self.shared.segment_count.load(Ordering::Relaxed)
    }

    /// Stops the reader and tallies what it read against the load.
    pub(super) fn finish(self, load: &[GeneratedSpan], ignored_trace: &str) -> Tally {
        self.shared.stop.store(true, Ordering::Relaxed);
        // The thread only polls and records; a panic there leaves what it recorded.
        let _ = self.thread.join();
        let segments = std::mem::take(&mut *lock(&self.shared.segments));
        Tally::of(load, &segments, ignored_trace)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read(consumer: &BaseConsumer, shared: &Shared) {
    while !shared.stop.load(Ordering::Relaxed) {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let Ok(segment) =
            serde_json::from_slice::<SegmentMessage>(message.payload().unwrap_or_default())
        else {
            // Not a segment message: counted, as a reader downstream would see it, but empty.
            shared.segment_count.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let trace_id = segment
            .spans
            .first()
            .map(|span| span.trace_id.clone())
            .unwrap_or_default();
        let span_ids: Vec<String> = segment.spans.into_iter().map(|span| span.span_id).collect();
        {
            let mut distinct = lock(&shared.distinct);
            distinct.extend(span_ids.iter().cloned());
            shared
                .distinct_count
                .store(distinct.len(), Ordering::Relaxed);
        }
        lock(&shared.segments).push(Segment { trace_id, span_ids });
        shared.segment_count.fetch_add(1, Ordering::Relaxed);
    }
}

/// What came out, against what went in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Tally {
    /// Segment messages of the load's traces.
    pub(super) segments: usize,
    /// Distinct spans of the load read back.
    pub(super) spans: usize,
    /// Spans read more than once.
    pub(super) duplicates: usize,
    /// Spans of the load never read.
    pub(super) lost: usize,
    /// Traces of the load.
    pub(super) traces: usize,
    /// Traces that came out as exactly one segment holding every span of the trace.
    pub(super) whole_traces: usize,
}

impl Tally {
    fn of(load: &[GeneratedSpan], segments: &[Segment], ignored_trace: &str) -> Self {
        let mut trace_sizes: HashMap<&str, usize> = HashMap::new();
        for span in load {
            *trace_sizes.entry(span.trace_id.as_str()).or_default() += 1;
        }
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(load.len());
        let mut segments_of: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut tally = Self {
            traces: trace_sizes.len(),
            ..Self::default()
        };
        for segment in segments.iter().filter(|s| s.trace_id != ignored_trace) {
            tally.segments += 1;
            segments_of
                .entry(segment.trace_id.as_str())
                .or_default()
                .push(segment.span_ids.len());
            for span_id in &segment.span_ids {
                let count = seen.entry(span_id.as_str()).or_default();
                *count += 1;
                if *count > 1 {
                    tally.duplicates += 1;
                }
            }
        }
        tally.lost = load
            .iter()
            .filter(|span| !seen.contains_key(span.span_id.as_str()))
            .count();
        tally.spans = load.len() - tally.lost;
        tally.whole_traces = segments_of
            .iter()
            .filter(|(trace, sizes)| {
                matches!(sizes.as_slice(), [size] if trace_sizes.get(*trace) == Some(size))
            })
            .count();
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(trace: &str, id: &str) -> GeneratedSpan {
        GeneratedSpan {
            payload: Vec::new(),
            span_id: id.to_owned(),
            trace_id: trace.to_owned(),
            received: 0.0,
        }
    }

    fn segment(trace: &str, ids: &[&str]) -> Segment {
        Segment {
            trace_id: trace.to_owned(),
            span_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
        }
    }

    #[test]
    fn a_trace_is_whole_only_as_one_segment_with_every_span() {
        let load = [
            span("t1", "a"),
            span("t1", "b"),
            span("t2", "c"),
            span("t2", "d"),
            span("t3", "e"),
            span("t3", "f"),
        ];
        let segments = [
            segment("t1", &["a", "b"]),
            segment("t2", &["c"]),
            segment("t2", &["d"]),
            segment("t3", &["e"]),
            segment("t3", &["e"]),
            segment("tick", &["x"]),
        ];
        let tally = Tally::of(&load, &segments, "tick");
        assert_eq!(
            tally,
            Tally {
                segments: 5,
                spans: 5,
                duplicates: 1,
                lost: 1,
                traces: 3,
                whole_traces: 1,
            }
        );
    }
}
