//! The spans buffer end to end on real Redis (Sentry's `test_buffer.py` checklist): every
//! scenario runs on a standalone server and on a 3-node cluster, with and without
//! `max-spans-per-evalsha = 1`, and checks that every key has a TTL and nothing is left
//! after done.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use std::time::Duration;

use buffer_support::{
    SegmentView, SpanSpec, assert_clean, assert_ttls, buffer, expected, flush_and_done, id,
    permutations, segment_key, spans, start, view,
};
use integration_tests::redis_server::{RedisMode, TestRedis};
use sonic_rs::JsonValueTrait;
use spans_pipeline::buffer::{
    BufferOptions, Flush, INVALID_PAYLOAD, SegmentKey, SpansBuffer, keys,
};

/// One input item: a span, or a marker that ends the current `process_spans` batch.
#[derive(Clone, Debug)]
enum Item {
    Span(SpanSpec),
    Split,
}

/// Sentry's buffer fixture: both Redis modes × `max-spans-per-evalsha` 0 and 1.
fn configurations() -> Vec<(RedisMode, BufferOptions)> {
    let mut out = Vec::new();
    for mode in TestRedis::MODES {
        for per_call in [0, 1] {
            out.push((
                mode,
                BufferOptions {
                    max_spans_per_evalsha: per_call,
                    ..BufferOptions::default()
                },
            ));
        }
    }
    out
}

async fn process_items(buffer: &mut SpansBuffer, items: &[Item], now: i64) {
    for batch in items.split(|item| matches!(item, Item::Split)) {
        let specs: Vec<SpanSpec> = batch
            .iter()
            .filter_map(|item| match item {
                Item::Span(spec) => Some(spec.clone()),
                Item::Split => None,
            })
            .collect();
        if specs.is_empty() {
            continue;
        }
        buffer.process_spans(&spans(&specs), now).await.unwrap();
    }
}

async fn process(buffer: &mut SpansBuffer, specs: &[SpanSpec], now: i64) {
    buffer.process_spans(&spans(specs), now).await.unwrap();
}

fn items(specs: Vec<SpanSpec>) -> Vec<Item> {
    specs.into_iter().map(Item::Span).collect()
}

/// `[original, reversed, every span in its own batch]`.
fn shallow_permutations(specs: Vec<SpanSpec>) -> Vec<Vec<Item>> {
    let original = items(specs.clone());
    let reversed = items(specs.iter().rev().cloned().collect());
    let separate = specs
        .into_iter()
        .flat_map(|spec| [Item::Span(spec), Item::Split])
        .collect();
    vec![original, reversed, separate]
}

fn single(key: String, spans: Vec<(String, bool, String)>) -> SegmentView {
    SegmentView::from([(key, spans)])
}

#[tokio::test]
async fn basic_flushes_one_segment_for_every_order() {
    let input = vec![
        SpanSpec::child('a', 'b'),
        SpanSpec::child('d', 'b'),
        SpanSpec::child('c', 'b'),
        SpanSpec::root('b'),
    ];
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        for order in permutations(&input) {
            process(&mut buffer, &order, 0).await;
            assert_ttls(&redis);
            assert_eq!(flush_and_done(&buffer, 5).await, SegmentView::new());
            let flushed = flush_and_done(&buffer, 11).await;
            let b = id('b');
            assert_eq!(
                flushed,
                single(
                    segment_key(1, &b),
                    expected(&[('a', false), ('b', true), ('c', false), ('d', false)], &b)
                )
            );
            assert_eq!(flush_and_done(&buffer, 30).await, SegmentView::new());
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn payload_members_that_are_not_spans_are_dropped_and_counted_as_lost() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let mut buffer = buffer(&redis, BufferOptions::default(), vec![0]).await;
        process(
            &mut buffer,
            &[SpanSpec::child('b', 'a'), SpanSpec::root('a')],
            5,
        )
        .await;
        // Next to the real subsegment, members that are not zstd frames of spans: text, a JSON
        // array, a truncated object, a frame that does not decompress.
        let root = SegmentKey::parse(segment_key(1, &id('a'))).unwrap();
        let salts: Vec<String> = redis.query(redis::cmd("SMEMBERS").arg(keys::member_keys(&root)));
        let payload_key = keys::payload(root.project_and_trace(), &salts[0]);
        let garbage: [&[u8]; 4] = [
            b"not json",
            b"[1,2]",
            br#"{"span_id":"cccccccccccccccc""#,
            &[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3],
        ];
        for member in garbage {
            let _: () = redis.query(redis::cmd("SADD").arg(&payload_key).arg(member));
        }

        let flush = buffer.load_due_segments(100).await.unwrap();
        assert_eq!(
            view(&flush.segments),
            SegmentView::from([(
                segment_key(1, &id('a')),
                expected(&[('a', true), ('b', false)], &id('a'))
            )]),
            "{mode:?}"
        );
        for span in flush.segments.iter().flat_map(|segment| &segment.spans) {
            let value: sonic_rs::Value = sonic_rs::from_slice(&span.payload).unwrap();
            assert!(value.is_object(), "{mode:?}");
        }
        let lost: Vec<(u64, &str)> = flush.lost.iter().map(|l| (l.quantity, l.reason)).collect();
        assert_eq!(lost, [(4, INVALID_PAYLOAD)], "{mode:?}");
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert_clean(&redis);
    }
}

fn with_locks(ttl_secs: u64) -> BufferOptions {
    BufferOptions {
        flush_lock_ttl: Duration::from_secs(ttl_secs),
        ..BufferOptions::default()
    }
}

fn set_maxmemory(redis: &TestRedis, bytes: u64) {
    for mut conn in redis.node_connections() {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes)
            .query(&mut conn)
            .unwrap();
    }
}

#[tokio::test]
async fn a_full_redis_with_flush_locks_still_flushes_and_cleans_up() {
    // A server of its own: its memory limit must not reach other tests.
    let redis = start(RedisMode::Standalone);
    let mut buffer = buffer(&redis, with_locks(30), vec![0]).await;
    process(
        &mut buffer,
        &[SpanSpec::child('b', 'a'), SpanSpec::root('a')],
        5,
    )
    .await;
    // Every write that may grow memory is refused from here on (`noeviction`).
    set_maxmemory(&redis, 1);

    let flush = buffer.load_due_segments(100).await.unwrap();
    assert_eq!(flush.stats.lock_contention, 0);
    assert_eq!(
        view(&flush.segments),
        SegmentView::from([(
            segment_key(1, &id('a')),
            expected(&[('a', true), ('b', false)], &id('a'))
        )])
    );
    buffer.done_flush_segments(&flush.segments).await.unwrap();
    set_maxmemory(&redis, 0);
    assert_clean(&redis);
}

/// A buffer with flush locks of `ttl_secs` whose segment `a` (with child `b`) is being
/// flushed: the buffer, the flush, and the segment's lock key.
async fn flushing_with_locks(redis: &TestRedis, ttl_secs: u64) -> (SpansBuffer, Flush, String) {
    let mut buffer = buffer(redis, with_locks(ttl_secs), vec![0]).await;
    process(
        &mut buffer,
        &[SpanSpec::child('b', 'a'), SpanSpec::root('a')],
        5,
    )
    .await;
    let flush = buffer.load_due_segments(100).await.unwrap();
    let root = SegmentKey::parse(segment_key(1, &id('a'))).unwrap();
    (buffer, flush, keys::flush_lock(&root))
}

#[tokio::test]
async fn cleanup_leaves_a_segment_whose_lock_is_no_longer_its_own() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let (buffer, flush, lock) = flushing_with_locks(&redis, 30).await;
        // The lock expired during the produce and another flush took it.
        let _: () = redis.query(redis::cmd("SET").arg(&lock).arg("theirs").arg("EX").arg(30));

        buffer.done_flush_segments(&flush.segments).await.unwrap();

        let owner: Option<String> = redis.query(redis::cmd("GET").arg(&lock));
        assert_eq!(
            owner.as_deref(),
            Some("theirs"),
            "{mode:?}: released another's lock"
        );
        let _: () = redis.query(redis::cmd("DEL").arg(&lock));
        // Everything is still there for the lock's owner to flush.
        let again = buffer.load_due_segments(100).await.unwrap();
        assert_eq!(view(&again.segments), view(&flush.segments), "{mode:?}");
        buffer.done_flush_segments(&again.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn a_span_merged_after_the_flush_lock_expired_is_not_deleted_by_the_cleanup() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let (mut buffer, flush, lock) = flushing_with_locks(&redis, 1).await;
        // The produce outlasts the lock; a late child of the root then merges into the segment
        // being flushed, since nothing locks it any more.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while redis.query::<i64>(redis::cmd("EXISTS").arg(&lock)) == 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the lock never expired"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        process(&mut buffer, &[SpanSpec::child('c', 'a')], 6).await;

        buffer.done_flush_segments(&flush.segments).await.unwrap();

        let drained = buffer_support::flush_until_empty(&buffer, 200, 5).await;
        let out: Vec<String> = drained
            .segments
            .iter()
            .flat_map(|segment| segment.spans.iter().map(|span| span.span_id.clone()))
            .collect();
        assert!(
            out.contains(&id('c')),
            "{mode:?}: the late span was lost: {out:?}"
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn duplicate_batch_is_idempotent() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        let batch = [SpanSpec::child('a', 'b'), SpanSpec::root('b')];
        process(&mut buffer, &batch, 0).await;
        process(&mut buffer, &batch, 0).await;
        let flush = buffer.load_due_segments(11).await.unwrap();
        let b = id('b');
        assert_eq!(
            view(&flush.segments),
            single(
                segment_key(1, &b),
                expected(&[('a', false), ('b', true)], &b)
            )
        );
        // The replayed batch's salts are already listed, so its spans are counted once and
        // nothing is reported lost (Sentry counts them twice and reports 2).
        assert_eq!(flush.lost.iter().map(|l| l.quantity).sum::<u64>(), 0);
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn flush_segments_with_null_attributes() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        let b = id('b');
        let root = SpanSpec::root('b').payload(format!(r#"{{"span_id":"{b}","attributes":null}}"#));
        process(&mut buffer, &[root], 0).await;
        let flushed = flush_and_done(&buffer, 11).await;
        assert_eq!(
            flushed,
            single(segment_key(1, &b), expected(&[('b', true)], &b))
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn deep_trees_assemble_across_split_batches() {
    let input = vec![
        Item::Span(SpanSpec::child('d', 'b')),
        Item::Split,
        Item::Span(SpanSpec::child('b', 'a')),
        Item::Span(SpanSpec::root('a')),
        Item::Span(SpanSpec::child('c', 'a')),
    ];
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        for order in permutations(&input) {
            process_items(&mut buffer, &order, 0).await;
            assert_ttls(&redis);
            let a = id('a');
            assert_eq!(
                flush_and_done(&buffer, 10).await,
                single(
                    segment_key(1, &a),
                    expected(&[('a', true), ('b', false), ('c', false), ('d', false)], &a)
                ),
                "{order:?}"
            );
            assert_eq!(flush_and_done(&buffer, 60).await, SegmentView::new());
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn deep2_chains_resolve_to_the_root() {
    let input = vec![
        SpanSpec::child('e', 'd'),
        SpanSpec::child('d', 'b'),
        SpanSpec::child('b', 'c'),
        SpanSpec::child('c', 'a'),
        SpanSpec::root('a'),
    ];
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        for order in permutations(&input) {
            process(&mut buffer, &order, 0).await;
            let a = id('a');
            assert_eq!(
                flush_and_done(&buffer, 10).await,
                single(
                    segment_key(1, &a),
                    expected(
                        &[
                            ('a', true),
                            ('b', false),
                            ('c', false),
                            ('d', false),
                            ('e', false)
                        ],
                        &a
                    )
                )
            );
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn parent_in_other_project_flushes_children_after_the_timeout() {
    let input = vec![
        SpanSpec::child('c', 'b'),
        SpanSpec::child('d', 'b'),
        SpanSpec::child('e', 'b'),
        SpanSpec::root('b').project(2),
    ];
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        for order in permutations(&input) {
            process(&mut buffer, &order, 0).await;
            let b = id('b');
            assert_eq!(flush_and_done(&buffer, 5).await, SegmentView::new());
            assert_eq!(
                flush_and_done(&buffer, 11).await,
                single(segment_key(2, &b), expected(&[('b', true)], &b))
            );
            assert_eq!(flush_and_done(&buffer, 30).await, SegmentView::new());
            assert_eq!(
                flush_and_done(&buffer, 60).await,
                single(
                    segment_key(1, &b),
                    expected(&[('c', false), ('d', false), ('e', false)], &b)
                )
            );
            assert_eq!(flush_and_done(&buffer, 90).await, SegmentView::new());
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn parent_in_other_project_and_nested_is_segment_span() {
    let input = vec![
        SpanSpec::child('c', 'd').flagged_segment(),
        SpanSpec::child('d', 'b'),
        SpanSpec::child('e', 'b'),
        SpanSpec::root('b').project(2),
    ];
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        for order in shallow_permutations(input.clone()) {
            process_items(&mut buffer, &order, 0).await;
            let (b, c) = (id('b'), id('c'));
            let mut want = single(segment_key(2, &b), expected(&[('b', true)], &b));
            want.insert(segment_key(1, &c), expected(&[('c', true)], &c));
            assert_eq!(flush_and_done(&buffer, 11).await, want);
            assert_eq!(
                flush_and_done(&buffer, 60).await,
                single(
                    segment_key(1, &b),
                    expected(&[('d', false), ('e', false)], &b)
                )
            );
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn flush_rebalance_still_cleans_up_through_the_queue_key() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(&mut buffer, &[SpanSpec::root('a')], 0).await;
        let flush = buffer.load_due_segments(11).await.unwrap();
        assert_eq!(flush.segments.len(), 1);
        buffer.set_assigned_shards(Vec::new());
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert!(
            buffer
                .load_due_segments(20)
                .await
                .unwrap()
                .segments
                .is_empty()
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn compression_on_and_off_round_trips_payloads() {
    for (mode, options) in configurations() {
        for level in [-1, 0] {
            let redis = start(mode);
            let options = BufferOptions {
                compression_level: level,
                ..options.clone()
            };
            let mut buffer = buffer(&redis, options, vec![0]).await;
            let big = |spec: SpanSpec| {
                let filler = "x".repeat(1500);
                let payload = format!(r#"{{"span_id":"{}","data":"{filler}"}}"#, spec.span_id);
                spec.payload(payload)
            };
            let input = [
                big(SpanSpec::root('b')),
                big(SpanSpec::child('a', 'b')),
                big(SpanSpec::child('c', 'b')),
            ];
            process(&mut buffer, &input, 0).await;
            let b = id('b');
            let members = redis.query::<Vec<Vec<u8>>>(
                redis::cmd("SMEMBERS")
                    .arg(format!("span-buf:mk:{{1:{}}}:{b}", buffer_support::trace())),
            );
            assert!(!members.is_empty());
            let flush = buffer.load_due_segments(11).await.unwrap();
            assert_eq!(flush.segments.len(), 1);
            assert_eq!(flush.segments[0].spans.len(), 3);
            for span in &flush.segments[0].spans {
                let json: sonic_rs::Value = sonic_rs::from_slice(&span.payload).unwrap();
                use sonic_rs::JsonValueTrait;
                assert_eq!(json["data"].as_str().unwrap().len(), 1500);
            }
            buffer.done_flush_segments(&flush.segments).await.unwrap();
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn max_segment_bytes_detaches_over_limit() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let options = BufferOptions {
            max_segment_bytes: 70,
            ..options
        };
        let mut buffer = buffer(&redis, options, vec![0]).await;
        for span in ['b', 'c', 'd'] {
            process(&mut buffer, &[SpanSpec::child(span, 'a')], 0).await;
        }
        let flush = buffer.load_due_segments(61).await.unwrap();
        let flushed = view(&flush.segments);
        assert_eq!(flushed.len(), 2, "{flushed:?}");
        let a = id('a');
        assert_eq!(
            flushed[&segment_key(1, &a)],
            expected(&[('b', false), ('c', false)], &a)
        );
        let detached = flush
            .segments
            .iter()
            .find(|s| s.segment_key.as_str() != segment_key(1, &a))
            .unwrap();
        let salt = detached.segment_key.segment_span_id();
        assert_eq!(salt.len(), 32);
        assert_eq!(
            view(std::slice::from_ref(detached))[detached.segment_key.as_str()],
            expected(&[('d', false)], salt)
        );
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn max_segment_bytes_under_limit_merges_normally() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(&mut buffer, &[SpanSpec::child('b', 'a')], 0).await;
        process(&mut buffer, &[SpanSpec::child('c', 'a')], 0).await;
        let a = id('a');
        assert_eq!(
            flush_and_done(&buffer, 61).await,
            single(
                segment_key(1, &a),
                expected(&[('b', false), ('c', false)], &a)
            )
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn flush_oversized_segments_keeps_every_span_exactly_once() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let per_call = options.max_spans_per_evalsha;
        let options = BufferOptions {
            max_segment_bytes: 100,
            ..options
        };
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(
            &mut buffer,
            &[SpanSpec::child('c', 'b'), SpanSpec::child('b', 'a')],
            0,
        )
        .await;
        process(
            &mut buffer,
            &[
                SpanSpec::child('d', 'a'),
                SpanSpec::child('e', 'a'),
                SpanSpec::root('a'),
            ],
            0,
        )
        .await;
        let flush = buffer.load_due_segments(61).await.unwrap();
        let mut seen: Vec<String> = view(&flush.segments)
            .into_values()
            .flatten()
            .map(|(span, ..)| span)
            .collect();
        seen.sort();
        assert_eq!(seen, ['a', 'b', 'c', 'd', 'e'].map(id));
        assert_eq!(flush.segments.len(), if per_call == 0 { 2 } else { 3 });
        for segment in &flush.segments {
            let messages = segment.to_messages(100);
            assert!(!messages.is_empty());
        }
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn kafka_slice_id_prefixes_the_queue_key() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let conn = buffer_support::connect(&redis).await;
        let mut buffer = SpansBuffer::new(conn, BufferOptions::default(), vec![0], Some(2))
            .await
            .unwrap();
        process(&mut buffer, &[SpanSpec::root('a')], 0).await;
        let queues: Vec<String> = redis
            .keys_with_ttls()
            .iter()
            .map(|k| k.key_str())
            .filter(|k| k.starts_with("span-buf:q:"))
            .collect();
        assert_eq!(queues, ["span-buf:q:2-0"]);
        assert_eq!(flush_and_done(&buffer, 11).await.len(), 1);
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn preassigned_disconnected_segment_groups_by_segment_id() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(
            &mut buffer,
            &[
                SpanSpec::child('b', 'c').segment_id('a'),
                SpanSpec::root('a').segment_id('a'),
            ],
            0,
        )
        .await;
        assert_eq!(flush_and_done(&buffer, 5).await, SegmentView::new());
        let a = id('a');
        assert_eq!(
            flush_and_done(&buffer, 11).await,
            single(
                segment_key(1, &a),
                expected(&[('a', true), ('b', false)], &a)
            )
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn partition_routing_is_stable_across_rebalance() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut first = buffer(&redis, options.clone(), vec![0, 1, 2]).await;
        process(&mut first, &[SpanSpec::child('a', 'b').partition(1)], 0).await;
        let mut second = buffer(&redis, options, vec![1, 2, 3]).await;
        process(&mut second, &[SpanSpec::root('b').partition(1)], 1).await;
        let flush = second.load_due_segments(12).await.unwrap();
        assert_eq!(flush.segments.len(), 1);
        assert_eq!(flush.segments[0].spans.len(), 2);
        assert_eq!(flush.segments[0].queue_keys, ["span-buf:q:1"]);
        second.done_flush_segments(&flush.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn done_flush_cleans_up_everything() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(
            &mut buffer,
            &[SpanSpec::child('a', 'b'), SpanSpec::root('b')],
            0,
        )
        .await;
        assert!(!redis.keys_with_ttls().is_empty());
        assert_eq!(flush_and_done(&buffer, 11).await.len(), 1);
        assert!(
            redis.keys_with_ttls().is_empty(),
            "{:?}",
            redis.keys_with_ttls()
        );
    }
}

/// Root b from partition 0 and child a from partition 1: the segment is in queues 0 and 1.
async fn segment_in_two_queues(redis: &TestRedis, lock_ttl: u64) -> (SpansBuffer, SpansBuffer) {
    let options = BufferOptions {
        flush_lock_ttl: Duration::from_secs(lock_ttl),
        ..BufferOptions::default()
    };
    let mut a = buffer(redis, options.clone(), vec![0]).await;
    let mut b = buffer(redis, options, vec![1]).await;
    process(&mut a, &[SpanSpec::root('b')], 0).await;
    process(&mut b, &[SpanSpec::child('a', 'b').partition(1)], 0).await;
    (a, b)
}

/// Both buffers flush at 11 (first, then second), then both run done; returns how many
/// non-empty segments were flushed in total. Stale entries left in the second buffer's queue
/// by a held lock are flushed (empty) and cleaned afterwards.
async fn flush_both(first: &SpansBuffer, second: &SpansBuffer) -> usize {
    let one = first.load_due_segments(11).await.unwrap();
    let two = second.load_due_segments(11).await.unwrap();
    let flushed = [&one, &two]
        .iter()
        .flat_map(|f| &f.segments)
        .filter(|s| !s.spans.is_empty())
        .count();
    first.done_flush_segments(&one.segments).await.unwrap();
    second.done_flush_segments(&two.segments).await.unwrap();
    flush_and_done(second, 12).await;
    flushed
}

#[tokio::test]
async fn flush_lock_prevents_duplicate_flushes() {
    for mode in TestRedis::MODES {
        for (lock_ttl, total) in [(0, 2), (10, 1)] {
            let redis = start(mode);
            let (a, b) = segment_in_two_queues(&redis, lock_ttl).await;
            assert_eq!(flush_both(&a, &b).await, total, "lock ttl {lock_ttl}");
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn flush_lock_is_released_after_done() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let options = BufferOptions {
            flush_lock_ttl: Duration::from_secs(60),
            ..BufferOptions::default()
        };
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(&mut buffer, &[SpanSpec::root('b')], 0).await;
        let flush = buffer.load_due_segments(11).await.unwrap();
        let lock = format!("span-buf:fl:{}", segment_key(1, &id('b')));
        assert!(redis.keys_with_ttls().iter().any(|k| k.key_str() == lock));
        assert_ttls(&redis);
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert!(!redis.keys_with_ttls().iter().any(|k| k.key_str() == lock));
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn flush_lock_cleanup_releases_stale_queue_entry() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let (a, b) = segment_in_two_queues(&redis, 10).await;
        let first = a.load_due_segments(11).await.unwrap();
        assert_eq!(first.segments.len(), 1);
        assert_eq!(first.segments[0].spans.len(), 2);
        assert!(b.load_due_segments(11).await.unwrap().segments.is_empty());
        let key = spans_pipeline::buffer::SegmentKey::new(
            &format!("1:{}", buffer_support::trace()),
            &id('b'),
        );
        let store = a.store();
        assert!(
            store
                .queue_deadline("span-buf:q:0", &key)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .queue_deadline("span-buf:q:1", &key)
                .await
                .unwrap()
                .is_some()
        );
        a.done_flush_segments(&first.segments).await.unwrap();
        assert!(
            store
                .queue_deadline("span-buf:q:0", &key)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .queue_deadline("span-buf:q:1", &key)
                .await
                .unwrap()
                .is_some()
        );
        let stale = b.load_due_segments(12).await.unwrap();
        assert_eq!(stale.segments.len(), 1);
        assert!(stale.segments[0].spans.is_empty());
        b.done_flush_segments(&stale.segments).await.unwrap();
        assert!(
            store
                .queue_deadline("span-buf:q:1", &key)
                .await
                .unwrap()
                .is_none()
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn flush_lock_mixed_contention() {
    for mode in TestRedis::MODES {
        for (lock_ttl, total) in [(0, 8), (10, 6)] {
            let redis = start(mode);
            let options = BufferOptions {
                flush_lock_ttl: Duration::from_secs(lock_ttl),
                ..BufferOptions::default()
            };
            let mut zero = buffer(&redis, options.clone(), vec![0]).await;
            let mut one = buffer(&redis, options, vec![1]).await;
            let t = |c: char| c.to_string().repeat(32);
            process(&mut zero, &[SpanSpec::root('c').trace(&t('c'))], 0).await;
            for root in ['d', 'e', 'f'] {
                process(
                    &mut one,
                    &[SpanSpec::root(root).trace(&t(root)).partition(1)],
                    0,
                )
                .await;
            }
            for trace in ['a', 'b'] {
                process(&mut zero, &[SpanSpec::root('r').trace(&t(trace))], 0).await;
                process(
                    &mut one,
                    &[SpanSpec::child('s', 'r').trace(&t(trace)).partition(1)],
                    0,
                )
                .await;
            }
            assert_eq!(flush_both(&zero, &one).await, total, "lock ttl {lock_ttl}");
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn flush_lock_detaches_a_subsegment_arriving_during_the_flush() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let options = BufferOptions {
            flush_lock_ttl: Duration::from_secs(20),
            ..BufferOptions::default()
        };
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(&mut buffer, &[SpanSpec::root('b')], 0).await;
        let flush = buffer.load_due_segments(11).await.unwrap();
        process(&mut buffer, &[SpanSpec::child('c', 'b')], 12).await;
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        let later = buffer.load_due_segments(120).await.unwrap();
        let flushed = view(&later.segments);
        assert_eq!(flushed.len(), 1);
        let (key, spans) = flushed.into_iter().next().unwrap();
        assert_ne!(key, segment_key(1, &id('b')));
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].0, id('c'));
        buffer.done_flush_segments(&later.segments).await.unwrap();
        assert_clean(&redis);
    }
}

/// Sentry's `test_no_duplicate_flush_after_lock_expiry_and_new_spans` expects nothing more to
/// flush here: its cleanup deletes the segment, and `c`, merged after the lock expired, with
/// it. Ours leaves a segment whose lock is no longer its flush's, so `c` comes out, with the
/// two spans already produced (duplicates, not a loss); see `docs/decisions.md`.
#[tokio::test]
async fn a_lock_expired_before_cleanup_flushes_the_segment_again_with_its_new_spans() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let options = BufferOptions {
            flush_lock_ttl: Duration::from_secs(60),
            ..BufferOptions::default()
        };
        let mut buffer = buffer(&redis, options, vec![0]).await;
        process(
            &mut buffer,
            &[SpanSpec::root('b'), SpanSpec::child('a', 'b')],
            0,
        )
        .await;
        let flush = buffer.load_due_segments(11).await.unwrap();
        assert_eq!(flush.segments[0].spans.len(), 2);
        let lock = format!("span-buf:fl:{}", segment_key(1, &id('b')));
        let _: i64 = redis.query(redis::cmd("DEL").arg(&lock));
        process(&mut buffer, &[SpanSpec::child('c', 'b')], 50).await;
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert_eq!(
            flush_and_done(&buffer, 120).await,
            SegmentView::from([(
                segment_key(1, &id('b')),
                expected(&[('a', false), ('b', true), ('c', false)], &id('b'))
            )]),
            "{mode:?}"
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn distributed_layout_scenarios() {
    for (mode, options) in configurations() {
        let redis = start(mode);
        let mut buffer = buffer(&redis, options, vec![0]).await;
        let (a, b) = (id('a'), id('b'));

        // basic
        process(
            &mut buffer,
            &[SpanSpec::child('a', 'b'), SpanSpec::root('b')],
            0,
        )
        .await;
        let mk = format!("span-buf:mk:{{1:{}}}:{b}", buffer_support::trace());
        let salts: Vec<String> = redis.query(redis::cmd("SMEMBERS").arg(&mk));
        assert!(!salts.is_empty());
        for salt in &salts {
            let payload_key = format!("span-buf:s:{{1:{}:{salt}}}:{salt}", buffer_support::trace());
            let count: u64 = redis.query(redis::cmd("SCARD").arg(&payload_key));
            assert!(count > 0, "{payload_key}");
        }
        assert_eq!(
            flush_and_done(&buffer, 11).await[&segment_key(1, &b)].len(),
            2
        );
        assert_clean(&redis);

        // multi-batch merge
        process(&mut buffer, &[SpanSpec::child('a', 'b')], 0).await;
        process(&mut buffer, &[SpanSpec::root('b')], 1).await;
        assert_eq!(
            flush_and_done(&buffer, 12).await[&segment_key(1, &b)].len(),
            2
        );
        assert_clean(&redis);

        // deep tree, one batch per level
        for (now, spec) in [
            SpanSpec::child('d', 'c'),
            SpanSpec::child('c', 'b'),
            SpanSpec::child('b', 'a'),
            SpanSpec::root('a'),
        ]
        .into_iter()
        .enumerate()
        {
            process(&mut buffer, &[spec], now as i64).await;
        }
        assert_eq!(
            flush_and_done(&buffer, 14).await,
            single(
                segment_key(1, &a),
                expected(&[('a', true), ('b', false), ('c', false), ('d', false)], &a)
            )
        );
        assert_clean(&redis);

        // two roots in one trace
        process(&mut buffer, &[SpanSpec::root('a'), SpanSpec::root('b')], 0).await;
        assert_eq!(flush_and_done(&buffer, 11).await.len(), 2);
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn schema_examples_round_trip_through_decode_and_flush() {
    let examples = [
        // basic span
        r#"{"organization_id":1,"project_id":1,"key_id":2,"trace_id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","span_id":"bbbbbbbbbbbbbbbb","parent_span_id":null,"start_timestamp":1700000000.0,"end_timestamp":1700000001.5,"received":1700000002.0,"retention_days":90,"downsampled_retention_days":90,"name":"GET /","status":"ok","is_segment":true,"links":[],"attributes":{"sentry.op":{"type":"string","value":"http.server"}},"_meta":{}}"#,
        // missing optional fields
        r#"{"organization_id":1,"project_id":1,"trace_id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","span_id":"bbbbbbbbbbbbbbbb","start_timestamp":1700000000,"end_timestamp":1700000001,"received":1700000002,"retention_days":30,"status":"ok"}"#,
        // null optional fields
        r#"{"organization_id":1,"project_id":1,"trace_id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","span_id":"bbbbbbbbbbbbbbbb","parent_span_id":null,"is_segment":null,"name":null,"links":null,"attributes":null,"start_timestamp":1700000000,"end_timestamp":1700000001,"received":1700000002,"retention_days":30,"status":"ok"}"#,
    ];
    for mode in TestRedis::MODES {
        for example in examples {
            let redis = start(mode);
            let buffer = buffer(&redis, BufferOptions::default(), vec![0]).await;
            let span = spans_pipeline::span::Span::decode(example.as_bytes(), 0).unwrap();
            buffer.process_spans(&[span], 0).await.unwrap();
            let flush = buffer.load_due_segments(61).await.unwrap();
            assert_eq!(flush.segments.len(), 1);
            let messages = flush.segments[0].to_messages(10 * 1024 * 1024);
            assert_eq!(messages.len(), 1);
            let message: sonic_rs::Value = sonic_rs::from_slice(&messages[0]).unwrap();
            use sonic_rs::{JsonContainerTrait, JsonValueTrait};
            let spans = message["spans"].as_array().unwrap();
            assert_eq!(spans.len(), 1);
            let input: sonic_rs::Value = sonic_rs::from_str(example).unwrap();
            for (key, value) in input.as_object().unwrap().iter() {
                if key != "is_segment" && key != "attributes" {
                    assert_eq!(&spans[0][key], value, "{key}");
                }
            }
            assert_eq!(spans[0]["is_segment"].as_bool(), Some(true));
            assert_eq!(
                spans[0]["attributes"]["sentry.segment.id"]["value"].as_str(),
                Some("bbbbbbbbbbbbbbbb")
            );
            // the message re-decodes as input spans (same schema)
            let out = spans[0].to_string();
            spans_pipeline::span::Span::decode(out.as_bytes(), 0).unwrap();
            buffer.done_flush_segments(&flush.segments).await.unwrap();
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn loss_accounting_reports_spans_ingested_but_not_loaded() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let mut buffer = buffer(&redis, BufferOptions::default(), vec![0]).await;
        process(&mut buffer, &[SpanSpec::root('b')], 0).await;
        let ic = format!("span-buf:ic:{}", segment_key(1, &id('b')));
        let _: () = redis.query(redis::cmd("SET").arg(&ic).arg(3).arg("EX").arg(60));
        let flush = buffer.load_due_segments(11).await.unwrap();
        assert_eq!(flush.lost.len(), 1);
        assert_eq!(flush.lost[0].quantity, 2);
        assert_eq!(flush.lost[0].project_id, 1);
        assert_eq!(flush.lost[0].organization_id, None);
        assert_eq!(flush.lost[0].reason, "segment_too_large");
        assert_eq!(flush.stats.dropped_spans, 2);
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn empty_segments_count_as_expired_only_past_the_ttl() {
    for mode in TestRedis::MODES {
        let options = BufferOptions::default();
        let threshold = (options.redis_ttl - options.root_timeout).as_secs() as i64;
        for (now, expired) in [(threshold + 1, 1), (threshold, 0)] {
            let redis = start(mode);
            let buffer = buffer(&redis, options.clone(), vec![0]).await;
            let key = segment_key(1, &id('b'));
            let _: () = redis.query(redis::cmd("ZADD").arg("span-buf:q:0").arg(0).arg(&key));
            let flush = buffer.load_due_segments(now).await.unwrap();
            assert_eq!(flush.segments.len(), 1);
            assert_eq!(flush.stats.empty_segments, 1);
            assert_eq!(flush.stats.expired_before_flush, expired, "now {now}");
            buffer.done_flush_segments(&flush.segments).await.unwrap();
            assert_clean(&redis);
        }
    }
}

#[tokio::test]
async fn backpressure_flag_is_set_when_a_queue_fills_its_limit() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let options = BufferOptions {
            max_flush_segments: 2,
            ..BufferOptions::default()
        };
        let mut buffer = buffer(&redis, options, vec![0]).await;
        let t = |c: char| c.to_string().repeat(32);
        for trace in ['a', 'b', 'c'] {
            process(&mut buffer, &[SpanSpec::root('r').trace(&t(trace))], 0).await;
        }
        let flush = buffer.load_due_segments(11).await.unwrap();
        assert_eq!(flush.segments.len(), 2);
        assert!(flush.any_shard_at_limit);
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        let rest = buffer.load_due_segments(11).await.unwrap();
        assert_eq!(rest.segments.len(), 1);
        assert!(!rest.any_shard_at_limit);
        buffer.done_flush_segments(&rest.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn observability_counts_one_process_and_one_flush() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let buffer = buffer(&redis, BufferOptions::default(), vec![0]).await;
        let input = [SpanSpec::child('a', 'b'), SpanSpec::root('b')];
        let stats = buffer.process_spans(&spans(&input), 0).await.unwrap();
        assert_eq!(stats.spans, 2);
        assert_eq!(stats.root_spans, 1);
        assert_eq!(stats.subsegments, 1);
        assert_eq!(stats.detached, 0);
        let flush = buffer.load_due_segments(11).await.unwrap();
        assert_eq!(flush.stats.candidates, 1);
        assert_eq!(flush.stats.segments, 1);
        assert_eq!(flush.stats.spans, 2);
        assert!(flush.stats.bytes > 60);
        assert_eq!(flush.stats.empty_segments, 0);
        assert_eq!(flush.stats.lock_contention, 0);
        buffer.done_flush_segments(&flush.segments).await.unwrap();
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn pipeline_batch_size_and_debug_traces_do_not_change_results() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let options = BufferOptions {
            pipeline_batch_size: 1,
            debug_traces: vec![buffer_support::trace()],
            ..BufferOptions::default()
        };
        let buffer = buffer(&redis, options, vec![0]).await;
        let input = [
            SpanSpec::child('a', 'b'),
            SpanSpec::child('c', 'x'),
            SpanSpec::root('b'),
        ];
        let stats = buffer.process_spans(&spans(&input), 0).await.unwrap();
        assert_eq!(stats.subsegments, 2);
        let b = id('b');
        assert_eq!(
            flush_and_done(&buffer, 11).await,
            single(
                segment_key(1, &b),
                expected(&[('a', false), ('b', true)], &b)
            )
        );
        let x = id('x');
        assert_eq!(
            flush_and_done(&buffer, 61).await,
            single(segment_key(1, &x), expected(&[('c', false)], &x))
        );
        assert_clean(&redis);
    }
}

#[tokio::test]
async fn uncompressed_payloads_are_stored_as_raw_members() {
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let options = BufferOptions {
            compression_level: -1,
            ..BufferOptions::default()
        };
        let buffer = buffer(&redis, options, vec![0]).await;
        let input = [SpanSpec::child('a', 'b'), SpanSpec::child('c', 'b')];
        buffer.process_spans(&spans(&input), 0).await.unwrap();
        let payload_keys: Vec<String> = redis
            .keys_with_ttls()
            .iter()
            .map(|k| k.key_str())
            .filter(|k| k.starts_with(&format!("span-buf:s:{{1:{}:", buffer_support::trace())))
            .collect();
        assert_eq!(payload_keys.len(), 1);
        let mut members: Vec<String> = redis.query(redis::cmd("SMEMBERS").arg(&payload_keys[0]));
        members.sort();
        let mut want: Vec<String> = input.iter().map(|s| s.payload.clone()).collect();
        want.sort();
        assert_eq!(members, want);
        assert_ttls(&redis);
    }
}
