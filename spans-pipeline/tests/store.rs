//! `SpansBufferStore` alone against real Redis (Sentry's `test_buffer_store.py`), in both
//! Redis modes.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use std::time::Duration;

use buffer_support::{connect, for_each_mode};
use integration_tests::redis_server::TestRedis;
use spans_pipeline::buffer::{
    BufferOptions, FlushCandidate, FlushedSegment, InsertedSubsegment, OutputSpan, PayloadEncoder,
    QueueStats, SegmentKey, SpansBufferStore, keys,
};

const PT: &str = "999001:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const QUEUE: &str = "span-buf:q:999001-0";

async fn store(redis: &TestRedis, options: BufferOptions) -> SpansBufferStore {
    SpansBufferStore::new(connect(redis).await, options)
        .await
        .unwrap()
}

fn zadd(redis: &TestRedis, queue: &str, score: i64, member: &str) {
    let _: () = redis.query(redis::cmd("ZADD").arg(queue).arg(score).arg(member));
}

fn queue_contents(redis: &TestRedis, queue: &str) -> Vec<(String, i64)> {
    redis.query(
        redis::cmd("ZRANGE")
            .arg(queue)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES"),
    )
}

fn candidate(id: &str, deadline: i64) -> FlushCandidate {
    FlushCandidate {
        queue_key: QUEUE.to_owned(),
        segment_key: SegmentKey::new(PT, id),
        deadline,
    }
}

fn inserted(segment: &str, salt: &str, has_root: bool, merged: &[&str]) -> InsertedSubsegment {
    InsertedSubsegment {
        segment_key: SegmentKey::new(PT, segment),
        has_root_span: has_root,
        salt: salt.to_owned(),
        partition: 0,
        merged_segment_span_ids: merged.iter().map(|s| (*s).to_owned()).collect(),
        sampled: None,
    }
}

#[tokio::test]
async fn load_flush_candidates_reads_ready_segments() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        zadd(&redis, QUEUE, 5, SegmentKey::new(PT, "ready").as_str());
        zadd(&redis, QUEUE, 15, SegmentKey::new(PT, "later").as_str());
        let candidates = store
            .load_flush_candidates(&[QUEUE.to_owned()], 10, 100)
            .await
            .unwrap();
        assert_eq!(candidates, [vec![candidate("ready", 5)]]);
    })
    .await;
}

#[tokio::test]
async fn load_flush_candidates_respects_the_limit_oldest_first() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        for (score, id) in [(3, "c"), (1, "a"), (2, "b")] {
            zadd(&redis, QUEUE, score, SegmentKey::new(PT, id).as_str());
        }
        let candidates = store
            .load_flush_candidates(&[QUEUE.to_owned()], 10, 2)
            .await
            .unwrap();
        assert_eq!(candidates, [vec![candidate("a", 1), candidate("b", 2)]]);
    })
    .await;
}

#[tokio::test]
async fn load_flush_candidates_sets_bad_queue_entries_aside_and_returns_the_others() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        // A member that is not UTF-8 and one that is not a segment key, around a good one.
        let _: () = redis.query(
            redis::cmd("ZADD")
                .arg(QUEUE)
                .arg(1)
                .arg(&[0xff_u8, 0xfe, b'x'][..]),
        );
        zadd(&redis, QUEUE, 2, "not-a-segment-key");
        zadd(&redis, QUEUE, 3, SegmentKey::new(PT, "ready").as_str());
        let candidates = store
            .load_flush_candidates(&[QUEUE.to_owned()], 10, 100)
            .await
            .unwrap();
        assert_eq!(candidates, [vec![candidate("ready", 3)]]);
        // Both bad entries left the queue; the good one is still there until its cleanup.
        let left: Vec<Vec<u8>> = redis.query(redis::cmd("ZRANGE").arg(QUEUE).arg(0).arg(-1));
        assert_eq!(left, [SegmentKey::new(PT, "ready").as_str().as_bytes()]);
    })
    .await;
}

#[tokio::test]
async fn acquire_flush_locks_keeps_unlocked_candidates() {
    for_each_mode(|redis: TestRedis| async move {
        let options = BufferOptions {
            flush_lock_ttl: Duration::from_secs(30),
            ..BufferOptions::default()
        };
        let store = store(&redis, options).await;
        let first = candidate("first", 1);
        let lock = keys::flush_lock(&first.segment_key);
        let _: () = redis.query(redis::cmd("SET").arg(&lock).arg(1).arg("EX").arg(30));
        let (acquired, contended) = store
            .acquire_flush_locks(vec![first, candidate("second", 1)], "token")
            .await
            .unwrap();
        assert_eq!(acquired, [candidate("second", 1)]);
        assert_eq!(contended, 1);
        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn acquire_flush_locks_returns_all_candidates_when_disabled() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        let all = vec![candidate("a", 1), candidate("b", 1)];
        let (acquired, contended) = store.acquire_flush_locks(all.clone(), "").await.unwrap();
        assert_eq!(acquired, all);
        assert_eq!(contended, 0);
        assert!(redis.keys_with_ttls().is_empty());
    })
    .await;
}

#[tokio::test]
async fn update_queue_writes_deadlines_and_removes_merged_segments() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        let seg = SegmentKey::new(PT, "seg");
        zadd(&redis, QUEUE, 80, seg.as_str());
        zadd(&redis, QUEUE, 90, SegmentKey::new(PT, "span1").as_str());
        zadd(&redis, QUEUE, 95, SegmentKey::new(PT, "span2").as_str());
        store
            .update_queue(
                &[inserted("seg", "salt", true, &["span1", "span2"])],
                100,
                Some(999_001),
            )
            .await
            .unwrap();
        assert_eq!(queue_contents(&redis, QUEUE), [(seg.to_string(), 110)]);
        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn update_queue_removes_a_segment_merged_later_in_the_same_batch() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        // The first subsegment still lands in segment "two"; the second merges "two" away.
        let batch = [
            inserted("two", "s1", false, &[]),
            inserted("root", "s2", true, &["two"]),
        ];
        store
            .update_queue(&batch, 100, Some(999_001))
            .await
            .unwrap();
        assert_eq!(
            queue_contents(&redis, QUEUE),
            [(SegmentKey::new(PT, "root").to_string(), 110)]
        );
    })
    .await;
}

#[tokio::test]
async fn update_queue_uses_timeout_for_non_root_segments() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        store
            .update_queue(&[inserted("seg", "salt", false, &[])], 100, Some(999_001))
            .await
            .unwrap();
        assert_eq!(
            queue_contents(&redis, QUEUE),
            [(SegmentKey::new(PT, "seg").to_string(), 160)]
        );
    })
    .await;
}

#[tokio::test]
async fn update_queue_keeps_child_entries_for_detached_segments() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        let child = SegmentKey::new(PT, "child");
        zadd(&redis, QUEUE, 90, child.as_str());
        store
            .update_queue(
                &[inserted("salt", "salt", false, &["child"])],
                100,
                Some(999_001),
            )
            .await
            .unwrap();
        assert_eq!(
            queue_contents(&redis, QUEUE),
            [
                (child.to_string(), 90),
                (SegmentKey::new(PT, "salt").to_string(), 160)
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn load_segments_reads_payloads_from_distributed_keys() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        let seg = SegmentKey::new(PT, "root");
        let mk = keys::member_keys(&seg);
        let payloads: [&[u8]; 3] = [
            b"{\"span_id\":\"a\"}",
            b"{\"span_id\":\"b\"}",
            b"{\"span_id\":\"c\"}",
        ];
        let mut encoder = PayloadEncoder::new(0).unwrap();
        for (salt, batch) in [("s1", &payloads[..2]), ("s2", &payloads[2..])] {
            let _: () = redis.query(redis::cmd("SADD").arg(&mk).arg(salt));
            let members = encoder.encode(batch.iter().copied()).unwrap();
            let _: () = redis.query(redis::cmd("SADD").arg(keys::payload(PT, salt)).arg(members));
        }
        let bytes: usize = payloads.iter().map(|p| p.len()).sum();
        let _: () = redis.query(redis::cmd("SET").arg(keys::ingested_count(&seg)).arg(3));
        let _: () = redis.query(redis::cmd("SET").arg(keys::ingested_bytes(&seg)).arg(bytes));

        let loaded = store
            .load_segments(vec![candidate("root", 1)])
            .await
            .unwrap();
        assert_eq!(loaded.len(), 1);
        let segment = &loaded[0];
        let mut got = segment.payloads.clone();
        got.sort();
        assert_eq!(got, payloads.map(<[u8]>::to_vec));
        let mut payload_keys = segment.payload_keys.clone();
        payload_keys.sort();
        assert_eq!(
            payload_keys,
            [keys::payload(PT, "s1"), keys::payload(PT, "s2")]
        );
        assert_eq!(segment.ingested.span_count, Some(3));
        assert_eq!(segment.ingested.byte_count, Some(bytes as u64));
        assert_eq!(segment.missing_spans(), 0);
    })
    .await;
}

#[tokio::test]
async fn load_segments_pages_through_payload_sets() {
    for_each_mode(|redis: TestRedis| async move {
        let options = BufferOptions {
            segment_page_size: 1,
            compression_level: -1,
            ..BufferOptions::default()
        };
        let store = store(&redis, options).await;
        let seg = SegmentKey::new(PT, "root");
        let _: () = redis.query(redis::cmd("SADD").arg(keys::member_keys(&seg)).arg("s"));
        let members: Vec<String> = (0..300).map(|i| format!("{{\"i\":{i}}}")).collect();
        let _: () = redis.query(redis::cmd("SADD").arg(keys::payload(PT, "s")).arg(&members));
        // A compressed batch mixed into the same set reads back as its payloads.
        let frame = PayloadEncoder::new(3)
            .unwrap()
            .encode([&b"{\"x\":1}"[..], b"{\"x\":2}"])
            .unwrap();
        let _: () = redis.query(redis::cmd("SADD").arg(keys::payload(PT, "s")).arg(frame));
        let loaded = store
            .load_segments(vec![candidate("root", 1)])
            .await
            .unwrap();
        assert_eq!(loaded[0].payloads.len(), 302);
        assert_eq!(loaded[0].ingested.span_count, None);
    })
    .await;
}

#[tokio::test]
async fn ingest_metadata_is_absent_when_counters_are_missing() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        let loaded = store
            .load_segments(vec![candidate("gone", 1)])
            .await
            .unwrap();
        assert_eq!(loaded[0].ingested.span_count, None);
        assert_eq!(loaded[0].ingested.byte_count, None);
        assert!(loaded[0].payloads.is_empty());
        assert!(loaded[0].payload_keys.is_empty());
    })
    .await;
}

#[tokio::test]
async fn cleanup_flushed_segments_removes_segment_data() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        let seg = SegmentKey::new(PT, "root");
        let payload_key = keys::payload(PT, "s");
        for key in [
            keys::has_root_span(&seg),
            keys::ingested_count(&seg),
            keys::ingested_bytes(&seg),
            keys::flush_lock(&seg),
        ] {
            let _: () = redis.query(redis::cmd("SET").arg(key).arg(1));
        }
        let _: () = redis.query(
            redis::cmd("HSET")
                .arg(keys::redirect_map(PT))
                .arg("root")
                .arg("root"),
        );
        let _: () = redis.query(redis::cmd("SADD").arg(keys::member_keys(&seg)).arg("s"));
        let _: () = redis.query(redis::cmd("SADD").arg(&payload_key).arg("{}"));
        zadd(&redis, QUEUE, 1, seg.as_str());
        let flushed = FlushedSegment {
            segment_key: seg,
            queue_keys: vec![QUEUE.to_owned()],
            project_id: 999_001,
            organization_id: None,
            spans: vec![OutputSpan {
                span_id: "root".to_owned(),
                organization_id: None,
                is_segment: true,
                payload: b"{}".to_vec(),
            }],
            payload_keys: vec![payload_key],
            lock_token: None,
        };
        store.cleanup_flushed_segments(&[flushed]).await.unwrap();
        assert!(
            redis.keys_with_ttls().is_empty(),
            "{:?}",
            redis.keys_with_ttls()
        );
    })
    .await;
}

#[tokio::test]
async fn reloads_the_script_after_the_server_forgets_it() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        let options = BufferOptions::default();
        let buffer = spans_pipeline::buffer::SpansBuffer::new(conn.clone(), options, vec![0], None)
            .await
            .unwrap();
        for mut node in redis.node_connections() {
            let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut node).unwrap();
        }
        let spec = buffer_support::SpanSpec::root('a');
        buffer.process_spans(&[spec.span()], 0).await.unwrap();
        assert_eq!(buffer_support::flush_and_done(&buffer, 11).await.len(), 1);
        buffer_support::assert_clean(&redis);
    })
    .await;
}

#[tokio::test]
async fn queue_stats_count_segments_due_segments_and_the_oldest_deadline_per_queue() {
    for_each_mode(|redis: TestRedis| async move {
        let store = store(&redis, BufferOptions::default()).await;
        zadd(&redis, QUEUE, 1, "x");
        zadd(&redis, QUEUE, 2, "y");
        let stats = store
            .queue_stats(&[QUEUE.to_owned(), "span-buf:q:empty".to_owned()], 1)
            .await
            .unwrap();
        assert_eq!(
            stats,
            [
                QueueStats {
                    size: 2,
                    due: 1,
                    oldest_deadline: Some(1)
                },
                QueueStats::default()
            ]
        );
    })
    .await;
}
