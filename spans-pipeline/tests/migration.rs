//! The three-phase payload-layout migration (Sentry PR #110593): a live buffer rolls from the
//! legacy merged per-segment payload set to distributed salted payload keys, one option at a
//! time, without losing or duplicating a span, on both Redis modes.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use buffer_support::{
    SpanSpec, assert_clean, assert_ttls, buffer, expected, id, segment_key, spans, start, view,
};
use integration_tests::redis_server::TestRedis;
use spans_pipeline::buffer::{BufferOptions, SpansBuffer};

/// Options of migration phase 0 (legacy) to 3 (current).
fn phase(number: usize) -> BufferOptions {
    let base = BufferOptions::default();
    match number {
        0 => base.with_merged_layout(),
        1 => BufferOptions {
            write_distributed_payloads: true,
            read_distributed_payloads: false,
            write_merged_payloads: true,
            ..base
        },
        2 => BufferOptions {
            write_distributed_payloads: true,
            read_distributed_payloads: true,
            write_merged_payloads: true,
            ..base
        },
        _ => base,
    }
}

/// A segment built over two batches (the second merges the first's segment into the root),
/// each written by a buffer in its own phase, then flushed in the second phase.
async fn segment_across_phases(redis: &TestRedis, first: usize, second: usize) {
    let before: SpansBuffer = buffer(redis, phase(first), vec![0]).await;
    let batch = [SpanSpec::child('c', 'b'), SpanSpec::child('d', 'c')];
    before.process_spans(&spans(&batch), 0).await.unwrap();
    let after = buffer(redis, phase(second), vec![0]).await;
    let batch = [SpanSpec::child('b', 'a'), SpanSpec::root('a')];
    after.process_spans(&spans(&batch), 1).await.unwrap();
    assert_ttls(redis);

    let flush = after.load_due_segments(11).await.unwrap();
    let a = id('a');
    assert_eq!(
        view(&flush.segments),
        buffer_support::SegmentView::from([(
            segment_key(1, &a),
            expected(&[('a', true), ('b', false), ('c', false), ('d', false)], &a)
        )]),
        "phase {first} -> {second}"
    );
    assert!(
        flush.lost.is_empty(),
        "phase {first} -> {second}: {:?}",
        flush.lost
    );
    after.done_flush_segments(&flush.segments).await.unwrap();
    assert_clean(redis);
}

#[tokio::test]
async fn every_phase_and_transition_flushes_each_span_once() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        for (first, second) in [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3)] {
            segment_across_phases(&redis, first, second).await;
        }
    }
}

#[tokio::test]
async fn legacy_phase_writes_only_the_merged_set() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let buffer = buffer(&redis, phase(0), vec![0]).await;
        let batch = [SpanSpec::child('a', 'b'), SpanSpec::root('b')];
        buffer.process_spans(&spans(&batch), 0).await.unwrap();
        let keys: Vec<String> = redis.keys_with_ttls().iter().map(|k| k.key_str()).collect();
        let merged = segment_key(1, &id('b'));
        assert!(keys.contains(&merged), "{keys:?}");
        // no salted payload key: `span-buf:s:{1:<trace>:<salt>}:<salt>`
        let salted = format!("span-buf:s:{{1:{}:", buffer_support::trace());
        assert!(!keys.iter().any(|k| k.starts_with(&salted)), "{keys:?}");
        let members: u64 = redis.query(redis::cmd("SCARD").arg(&merged));
        assert_eq!(members, 1);
        assert_ttls(&redis);
    }
}

#[tokio::test]
async fn dual_write_phases_write_both_layouts() {
    for mode in TestRedis::MODES {
        for number in [1, 2] {
            let redis = start(mode);
            let buffer = buffer(&redis, phase(number), vec![0]).await;
            let batch = [SpanSpec::child('a', 'b'), SpanSpec::root('b')];
            buffer.process_spans(&spans(&batch), 0).await.unwrap();
            let keys: Vec<String> = redis.keys_with_ttls().iter().map(|k| k.key_str()).collect();
            let salted = format!("span-buf:s:{{1:{}:", buffer_support::trace());
            assert!(keys.contains(&segment_key(1, &id('b'))), "{keys:?}");
            assert!(keys.iter().any(|k| k.starts_with(&salted)), "{keys:?}");
        }
    }
}
