//! Traces built to hurt: parent cycles, self-parents, one enormous trace, a very deep chain,
//! duplicate span ids, a span larger than a whole segment may be, bytes that are not UTF-8 and
//! fields nobody knows. Each goes through the decoder and the real buffer on a standalone
//! server and on a cluster, and each has one defined outcome (listed in
//! `docs/reliability.md`): the script calls succeed (no Lua `unpack` limit, no endless
//! redirect loop), every span comes out or is counted as lost, and nothing but the expiring
//! root flags is left in Redis after the final flush.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use std::collections::BTreeMap;

use buffer_support::{
    Drained, SpanSpec, assert_clean, assert_ttls, buffer, flush_until_empty, for_each_mode, spans,
};
use integration_tests::redis_server::TestRedis;
use spans_pipeline::buffer::{BufferOptions, FlushedSegment, SpansBuffer};
use spans_pipeline::span::{Span, SpanError};

/// Late enough for every segment to be due, early enough for nothing to have expired.
const FLUSH_AT: i64 = 1000;

const TRACE: &str = "0123456789abcdef0123456789abcdef";

/// A complete `ingest-spans` message; `extra` is spliced in as more top-level fields.
fn message(span_id: &str, parent: Option<&str>, extra: &str) -> Vec<u8> {
    let parent = parent.map_or("null".to_owned(), |p| format!("\"{p}\""));
    format!(
        r#"{{"organization_id":1,"project_id":42,"trace_id":"{TRACE}","span_id":"{span_id}","parent_span_id":{parent},"start_timestamp":1.0,"end_timestamp":2.0,"received":2.0,"retention_days":90,"status":"ok"{extra}}}"#
    )
    .into_bytes()
}

fn decode_all(messages: &[Vec<u8>]) -> Vec<Span<'_>> {
    messages
        .iter()
        .map(|message| Span::decode(message, 0).unwrap())
        .collect()
}

/// Span ids per flushed segment, in a stable order.
fn segments_by_key(segments: &[FlushedSegment]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for segment in segments {
        let ids = out.entry(segment.segment_key.to_string()).or_default();
        ids.extend(segment.spans.iter().map(|span| span.span_id.clone()));
        ids.sort();
    }
    out
}

/// On an emptied Redis, processes each batch at time 0, then flushes the buffer dry and
/// checks it left nothing.
async fn through_buffer(
    redis: &TestRedis,
    options: BufferOptions,
    batches: &[&[Span<'_>]],
) -> Drained {
    redis.flush_all();
    let buffer: SpansBuffer = buffer(redis, options, vec![0]).await;
    for batch in batches {
        buffer.process_spans(batch, 0).await.unwrap();
    }
    assert_ttls(redis);
    let drained = flush_until_empty(&buffer, FLUSH_AT, 50).await;
    assert_clean(redis);
    drained
}

fn id(n: usize) -> String {
    format!("{n:016x}")
}

#[tokio::test]
async fn parent_cycles_come_out_as_one_segment() {
    for_each_mode(|redis| async move {
        // a → b → a, in one batch and across two; a → b → c → a across three.
        let a_b = [
            message(&id(1), Some(&id(2)), ""),
            message(&id(2), Some(&id(1)), ""),
        ];
        let a_b_c = [
            message(&id(1), Some(&id(2)), ""),
            message(&id(2), Some(&id(3)), ""),
            message(&id(3), Some(&id(1)), ""),
        ];
        let two = decode_all(&a_b);
        let three = decode_all(&a_b_c);
        let cases: [(&[&[Span<'_>]], usize); 3] = [
            (&[&two], 2),
            (&[&two[..1], &two[1..]], 2),
            (&[&three[..1], &three[1..2], &three[2..]], 3),
        ];
        for (batches, count) in cases {
            let drained = through_buffer(&redis, BufferOptions::default(), batches).await;

            let segments = segments_by_key(&drained.segments);
            assert_eq!(segments.len(), 1, "{segments:?}");
            let ids: Vec<String> = (1..=count).map(id).collect();
            assert_eq!(segments.values().next().unwrap(), &ids);
            assert_eq!(drained.lost_spans, 0);
        }
    })
    .await;
}

#[tokio::test]
async fn a_span_that_is_its_own_parent_roots_its_segment() {
    for_each_mode(|redis| async move {
        let messages = [
            message(&id(1), Some(&id(1)), ""),
            message(&id(2), Some(&id(1)), ""),
        ];
        let spans = decode_all(&messages);
        assert!(!spans[0].is_segment_span);

        for batches in [vec![&spans[..]], vec![&spans[..1], &spans[1..]]] {
            let drained = through_buffer(&redis, BufferOptions::default(), &batches).await;

            let segments = segments_by_key(&drained.segments);
            let key = format!("span-buf:s:{{42:{TRACE}}}:{}", id(1));
            assert_eq!(segments, BTreeMap::from([(key, vec![id(1), id(2)])]));
            let own = drained.segments[0]
                .spans
                .iter()
                .find(|span| span.span_id == id(1))
                .unwrap();
            assert!(
                own.is_segment,
                "the self-parented span is its segment's root"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_trace_of_100k_spans_in_batches_comes_out_whole() {
    const SPANS: usize = 100_000;
    const BATCH: usize = 2_000;
    for_each_mode(|redis| async move {
        let root = id(0);
        let specs: Vec<SpanSpec> = (0..SPANS)
            .map(|n| match n {
                0 => SpanSpec::new(&root, None, true),
                // Half the spans hang off the root, half off the span before them.
                n if n % 2 == 0 => SpanSpec::new(&id(n), Some(&root), false),
                n => SpanSpec::new(&id(n), Some(&id(n - 1)), false),
            })
            .collect();
        let all = spans(&specs);
        let batches: Vec<&[Span<'_>]> = all.chunks(BATCH).collect();

        let drained = through_buffer(&redis, BufferOptions::default(), &batches).await;

        assert_eq!(drained.segments.len(), 1);
        assert_eq!(drained.span_count(), SPANS);
        assert_eq!(drained.lost_spans, 0);
    })
    .await;
}

#[tokio::test]
async fn a_chain_10k_deep_comes_out_as_one_segment_in_any_order() {
    const DEPTH: usize = 10_000;
    for_each_mode(|redis| async move {
        let specs: Vec<SpanSpec> = (0..DEPTH)
            .map(|n| match n {
                0 => SpanSpec::new(&id(0), None, true),
                n => SpanSpec::new(&id(n), Some(&id(n - 1)), false),
            })
            .collect();
        let root_first = spans(&specs);
        let leaf_first: Vec<Span<'_>> = root_first.iter().rev().cloned().collect();
        for (order, all, batch) in [
            ("root first", &root_first, 1_000),
            ("leaf first", &leaf_first, 1_000),
            ("leaf first, one batch", &leaf_first, DEPTH),
            ("leaf first, small batches", &leaf_first, 50),
        ] {
            let batches: Vec<&[Span<'_>]> = all.chunks(batch).collect();

            let drained = through_buffer(&redis, BufferOptions::default(), &batches).await;

            assert_eq!(drained.segments.len(), 1, "{order}");
            assert_eq!(drained.span_count(), DEPTH, "{order}");
            assert_eq!(drained.lost_spans, 0, "{order}");
        }
    })
    .await;
}

#[tokio::test]
async fn duplicate_span_ids_come_out_or_are_counted() {
    for_each_mode(|redis| async move {
        let root = message(&id(1), None, "");
        let child = message(&id(2), Some(&id(1)), "");
        let retried = message(&id(2), Some(&id(1)), r#","name":"retried""#);
        let messages = [root, child.clone(), child, retried];
        let spans = decode_all(&messages);
        // (case, batches, spans out, spans counted as lost, spans written again)
        type Case<'a, 'b> = (&'a str, Vec<&'a [Span<'b>]>, usize, u64, u64);
        let cases: [Case<'_, '_>; 4] = [
            // Every copy of a batch goes out; consumers of the output dedupe.
            ("identical, one batch", vec![&spans[..3]], 3, 0, 0),
            // A redelivered subsegment rewrites the same payload key (same span ids, same
            // salt): it is stored once and, since its salt is already listed, counted once,
            // so nothing is reported lost (docs/decisions.md, "A subsegment written again
            // is counted once").
            (
                "identical, redelivered",
                vec![&spans[1..2], &spans[2..3], &spans[..1]],
                2,
                0,
                1,
            ),
            (
                "different payloads",
                vec![&spans[..2], &spans[3..]],
                3,
                0,
                0,
            ),
            (
                "all, children first",
                vec![&spans[3..], &spans[1..3], &spans[..1]],
                4,
                0,
                0,
            ),
        ];
        for (case, batches, out, lost, again) in cases {
            let ingested: usize = batches.iter().map(|b| b.len()).sum();

            let drained = through_buffer(&redis, BufferOptions::default(), &batches).await;

            assert_eq!(drained.segments.len(), 1, "{case}");
            assert_eq!(drained.span_count(), out, "{case}");
            assert_eq!(drained.lost_spans, lost, "{case}");
            assert_eq!(out as u64 + lost + again, ingested as u64, "{case}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_span_over_the_segment_byte_limit_detaches_into_its_own_segment() {
    for_each_mode(|redis| async move {
        let padding = format!(r#","data":{{"blob":"{}"}}"#, "x".repeat(4_000));
        let messages = [
            message(&id(1), None, ""),
            message(&id(2), Some(&id(1)), &padding),
            message(&id(3), Some(&id(1)), ""),
        ];
        let spans = decode_all(&messages);
        let options = BufferOptions {
            max_segment_bytes: 1_000,
            ..BufferOptions::default()
        };
        let ids = |ids: &[usize]| ids.iter().copied().map(id).collect::<Vec<_>>();
        let cases = [
            // The batch's one subsegment is too large: all of it detaches together.
            (vec![&spans[..]], vec![(true, ids(&[1, 2, 3]))]),
            // Only the large span's subsegment detaches; the root keeps the rest.
            (
                vec![&spans[..1], &spans[1..2], &spans[2..]],
                vec![(false, ids(&[1, 3])), (true, ids(&[2]))],
            ),
        ];
        for (batches, expected) in cases {
            let drained = through_buffer(&redis, options.clone(), &batches).await;

            // `true` marks a detached segment: keyed by its subsegment's 32-hex-digit salt.
            let segments: Vec<(bool, Vec<String>)> = segments_by_key(&drained.segments)
                .into_iter()
                .map(|(key, ids)| (key.rsplit(':').next().unwrap().len() == 32, ids))
                .collect();
            let mut expected = expected;
            expected.sort();
            let mut segments = segments;
            segments.sort();
            assert_eq!(segments, expected);
            assert_eq!(drained.lost_spans, 0);
        }
    })
    .await;
}

#[test]
fn bytes_that_are_not_utf8_are_refused_with_their_offset() {
    // Inside an id the buffer reads, inside a field it only carries, and between tokens.
    let valid = message(&id(1), None, r#","data":{"raw":"ab"}"#);
    let offset_of = |needle: &[u8]| {
        valid
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    };
    let cases = [
        offset_of(id(1).as_bytes()) + 3,
        offset_of(b"\"ab\"") + 1,
        offset_of(b"\"ok\"") + 1,
        1,
    ];
    for at in cases {
        let mut bytes = valid.clone();
        bytes[at] = 0xff;

        let error = Span::decode(&bytes, 0).unwrap_err();

        assert_eq!(
            error,
            SpanError::Malformed(format!("invalid utf-8 at byte {at}"))
        );
    }
}

#[tokio::test]
async fn unknown_fields_are_kept_byte_for_byte() {
    for_each_mode(|redis| async move {
        let unknown = r#","zz_unknown":{"nested":[1,"two",{"k":null}],"n":1.50e300},"ünïcode \"key\"":"\u00e9\ud83d\ude00""#;
        let messages = [message(&id(1), None, unknown)];
        let spans = decode_all(&messages);

        let drained = through_buffer(&redis, BufferOptions::default(), &[&spans]).await;

        let out = String::from_utf8(drained.segments[0].spans[0].payload.clone()).unwrap();
        assert!(out.contains(&unknown[1..]), "{out}");
        assert!(out.contains(r#""is_segment":true"#), "{out}");
    })
    .await;
}
