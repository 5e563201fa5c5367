//! Losses the flusher reports must be real (issue 11, item 6). Outcomes bill and alert users,
//! so every test here drains the buffer and checks that each span came out (at least once)
//! while the reported loss is 0: a batch written twice (a retry after an error, or the same
//! batch read again after a rebalance), written again while its segment is being flushed, and
//! a child segment merged into its parent while the child is being flushed. Each runs on a
//! standalone server and on a 3-node cluster.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use std::time::Duration;

use std::collections::BTreeMap;

use buffer_support::{
    Drained, SpanSpec, assert_clean, buffer, flush_until_empty, id, spans, start,
};
use integration_tests::redis_server::{RedisMode, TestRedis};
use spans_pipeline::buffer::{BufferOptions, FlushedSegment, SpansBuffer};

/// Both Redis modes × one script call per subsegment or per trace × flush locks off and on.
fn configurations() -> Vec<(RedisMode, BufferOptions)> {
    let mut out = Vec::new();
    for mode in TestRedis::MODES {
        for per_call in [0, 1] {
            for lock_ttl in [0, 30] {
                out.push((
                    mode,
                    BufferOptions {
                        max_spans_per_evalsha: per_call,
                        flush_lock_ttl: Duration::from_secs(lock_ttl),
                        ..BufferOptions::default()
                    },
                ));
            }
        }
    }
    out
}

fn with_locks(mode: RedisMode) -> (RedisMode, BufferOptions) {
    (
        mode,
        BufferOptions {
            flush_lock_ttl: Duration::from_secs(30),
            ..BufferOptions::default()
        },
    )
}

async fn process(buffer: &mut SpansBuffer, specs: &[SpanSpec], now: i64) {
    buffer.process_spans(&spans(specs), now).await.unwrap();
}

/// How many times each span id came out.
fn copies<'a>(segments: impl IntoIterator<Item = &'a FlushedSegment>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for segment in segments {
        for span in &segment.spans {
            *out.entry(span.span_id.clone()).or_insert(0) += 1;
        }
    }
    out
}

fn once(letters: &[char]) -> BTreeMap<String, usize> {
    letters.iter().map(|&letter| (id(letter), 1)).collect()
}

fn lost(flush: &spans_pipeline::buffer::Flush) -> u64 {
    flush.lost.iter().map(|l| l.quantity).sum()
}

/// A fresh Redis of `mode` with a buffer owning shard 0, and the configuration for messages.
async fn start_buffer(mode: RedisMode, options: BufferOptions) -> (TestRedis, SpansBuffer, String) {
    let context = format!(
        "{mode:?}, one call per subsegment: {}, lock ttl: {}",
        options.max_spans_per_evalsha,
        options.flush_lock_ttl.as_secs()
    );
    let redis = start(mode);
    let buffer = buffer(&redis, options, vec![0]).await;
    (redis, buffer, context)
}

/// Each of `letters` came out once in `segments`, `lost` is 0, and Redis is clean.
fn assert_once_and_none_lost<'a>(
    redis: &TestRedis,
    segments: impl IntoIterator<Item = &'a FlushedSegment>,
    lost: u64,
    letters: &[char],
    context: &str,
) {
    assert_eq!(copies(segments), once(letters), "{context}");
    assert_eq!(lost, 0, "{context}");
    assert_clean(redis);
}

#[tokio::test]
async fn a_batch_written_twice_then_flushed_reports_no_loss() {
    for (mode, options) in configurations() {
        let (redis, mut buffer, context) = start_buffer(mode, options).await;
        let batch = [SpanSpec::child('a', 'b'), SpanSpec::root('b')];
        process(&mut buffer, &batch, 0).await;
        process(&mut buffer, &batch, 0).await;

        let drained = flush_until_empty(&buffer, 11, 5).await;
        assert_once_and_none_lost(
            &redis,
            &drained.segments,
            drained.lost_spans,
            &['a', 'b'],
            &context,
        );
    }
}

#[tokio::test]
async fn batches_that_merged_a_child_segment_written_twice_report_no_loss() {
    for (mode, options) in configurations() {
        let (redis, mut buffer, context) = start_buffer(mode, options).await;
        // `c` waits under `b`, a segment of its own until `b` arrives and is merged into `a`.
        let first = [SpanSpec::child('c', 'b')];
        let second = [SpanSpec::child('b', 'a'), SpanSpec::root('a')];
        for batch in [&first[..], &second, &first, &second] {
            process(&mut buffer, batch, 0).await;
        }

        let drained = flush_until_empty(&buffer, 100, 5).await;
        let letters = ['a', 'b', 'c'];
        assert_once_and_none_lost(
            &redis,
            &drained.segments,
            drained.lost_spans,
            &letters,
            &context,
        );
    }
}

#[tokio::test]
async fn a_batch_written_again_while_its_segment_is_flushed_reports_no_loss() {
    for (mode, options) in TestRedis::MODES.into_iter().map(with_locks) {
        let (redis, mut buffer, context) = start_buffer(mode, options).await;
        let batch = [SpanSpec::child('a', 'b'), SpanSpec::root('b')];
        process(&mut buffer, &batch, 0).await;
        let flush = buffer.load_due_segments(11).await.unwrap();
        // A retry (or a replay of the same batch) lands while the segment is locked.
        process(&mut buffer, &batch, 12).await;
        buffer.done_flush_segments(&flush.segments).await.unwrap();

        let rest = flush_until_empty(&buffer, 200, 5).await;
        assert_once_and_none_lost(
            &redis,
            flush.segments.iter().chain(&rest.segments),
            lost(&flush) + rest.lost_spans,
            &['a', 'b'],
            &context,
        );
    }
}

#[tokio::test]
async fn a_batch_written_again_after_its_segment_was_flushed_comes_out_again_and_reports_no_loss() {
    for (mode, options) in configurations() {
        let (redis, mut buffer, context) = start_buffer(mode, options).await;
        let batch = [SpanSpec::child('a', 'b'), SpanSpec::root('b')];
        process(&mut buffer, &batch, 0).await;
        let first = flush_until_empty(&buffer, 11, 5).await;
        process(&mut buffer, &batch, 12).await;
        let again: Drained = flush_until_empty(&buffer, 200, 5).await;

        // At least once: the second write is a new segment with the same spans.
        assert_eq!(copies(&first.segments), once(&['a', 'b']), "{context}");
        assert_eq!(copies(&again.segments), once(&['a', 'b']), "{context}");
        assert_eq!(first.lost_spans + again.lost_spans, 0, "{context}");
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn a_child_segment_merged_into_its_parent_while_it_is_flushed_reports_no_loss() {
    for (mode, options) in TestRedis::MODES.into_iter().map(with_locks) {
        let (redis, mut buffer, context) = start_buffer(mode, options).await;
        // `c` waits under `b`: a segment keyed by `b`, due after `timeout` (60 s).
        process(&mut buffer, &[SpanSpec::child('c', 'b')], 0).await;
        let flush = buffer.load_due_segments(61).await.unwrap();
        assert_eq!(copies(&flush.segments), once(&['c']), "{context}");
        // While `b`'s segment is being flushed, `b` arrives under the root `a`.
        process(
            &mut buffer,
            &[SpanSpec::child('b', 'a'), SpanSpec::root('a')],
            62,
        )
        .await;
        buffer.done_flush_segments(&flush.segments).await.unwrap();

        let rest = flush_until_empty(&buffer, 200, 5).await;
        assert_once_and_none_lost(
            &redis,
            flush.segments.iter().chain(&rest.segments),
            lost(&flush) + rest.lost_spans,
            &['a', 'b', 'c'],
            &context,
        );
    }
}
