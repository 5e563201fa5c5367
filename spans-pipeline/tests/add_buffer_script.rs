//! `lua/add-buffer.lua` called directly (Sentry's `test_add_buffer_lua.py`), on a standalone
//! server and on a cluster.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use buffer_support::{connect, for_each_mode};
use integration_tests::redis_server::TestRedis;
use redis::{AsyncCommands, Value};
use spans_pipeline::buffer::RedisConnection;
use spans_pipeline::buffer::script::add_buffer;

const PT: &str = "1:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn segment(id: &str) -> String {
    format!("span-buf:s:{{{PT}}}:{id}")
}

fn member_keys(id: &str) -> String {
    format!("span-buf:mk:{{{PT}}}:{id}")
}

struct Call<'a> {
    parent: &'a str,
    spans: &'a [&'a str],
    has_root: bool,
    bytes: u64,
    max_bytes: u64,
    salt: &'a str,
    check_lock: bool,
}

impl<'a> Call<'a> {
    fn new(parent: &'a str, spans: &'a [&'a str], bytes: u64, salt: &'a str) -> Self {
        Self {
            parent,
            spans,
            has_root: false,
            bytes,
            max_bytes: 0,
            salt,
            check_lock: false,
        }
    }
}

/// Runs the script; returns `(segment key, has_root, metrics, merged ids)`.
async fn call(
    conn: &RedisConnection,
    call: Call<'_>,
) -> (String, bool, Vec<(String, i64)>, Vec<String>) {
    let mut invocation = add_buffer().key(PT);
    invocation
        .arg(call.spans.len())
        .arg(call.parent)
        .arg(if call.has_root { "true" } else { "false" })
        .arg(3600)
        .arg(call.bytes)
        .arg(call.max_bytes)
        .arg(call.salt)
        .arg(if call.check_lock { "true" } else { "false" })
        .arg(1);
    for span in call.spans {
        invocation.arg(*span);
    }
    let reply: Value = invocation.invoke_async(&mut conn.clone()).await.unwrap();
    let Value::Array(items) = reply else {
        panic!("unexpected reply {reply:?}")
    };
    let key: String = redis::from_redis_value(items[0].clone()).unwrap();
    let has_root = matches!(items[1], Value::Int(1));
    assert!(
        matches!(items[2], Value::Int(n) if n >= 0),
        "sampled latency"
    );
    let metrics: Vec<Value> = redis::from_redis_value(items[4].clone()).unwrap();
    let metrics = metrics
        .chunks(2)
        .map(|pair| {
            (
                redis::from_redis_value::<String>(pair[0].clone()).unwrap(),
                redis::from_redis_value::<i64>(pair[1].clone()).unwrap(),
            )
        })
        .collect();
    let merged: Vec<String> = redis::from_redis_value(items[5].clone()).unwrap();
    (key, has_root, metrics, merged)
}

fn metric(metrics: &[(String, i64)], name: &str) -> i64 {
    metrics
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

async fn get(conn: &RedisConnection, key: &str) -> Option<String> {
    conn.clone().get(key).await.unwrap()
}

async fn members(conn: &RedisConnection, key: &str) -> Vec<String> {
    let mut members: Vec<String> = conn.clone().smembers(key).await.unwrap();
    members.sort();
    members
}

async fn ttl(conn: &RedisConnection, key: &str) -> i64 {
    conn.clone().ttl(key).await.unwrap()
}

#[tokio::test]
async fn creates_segment_metadata() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        let mut first = Call::new("b", &["b", "a"], 23, "salt-root");
        first.has_root = true;
        let (key, has_root, metrics, merged) = call(&conn, first).await;
        assert_eq!(key, segment("b"));
        assert!(has_root);
        assert!(merged.is_empty());
        assert_eq!(metric(&metrics, "detached_segment_too_large"), 0);
        assert_eq!(metric(&metrics, "detached_segment_locked"), 0);

        let redirects: std::collections::BTreeMap<String, String> = conn
            .clone()
            .hgetall(format!("span-buf:ssr:{{{PT}}}"))
            .await
            .unwrap();
        assert_eq!(
            redirects.into_iter().collect::<Vec<_>>(),
            [("a".into(), "b".into()), ("b".into(), "b".into())]
        );
        assert_eq!(members(&conn, &member_keys("b")).await, ["salt-root"]);
        let b = segment("b");
        assert_eq!(
            get(&conn, &format!("span-buf:ic:{b}")).await.as_deref(),
            Some("2")
        );
        assert_eq!(
            get(&conn, &format!("span-buf:ibc:{b}")).await.as_deref(),
            Some("23")
        );
        assert_eq!(
            get(&conn, &format!("span-buf:hrs:{b}")).await.as_deref(),
            Some("1")
        );
        for key in [
            format!("span-buf:ssr:{{{PT}}}"),
            member_keys("b"),
            format!("span-buf:ic:{b}"),
            format!("span-buf:ibc:{b}"),
            format!("span-buf:hrs:{b}"),
        ] {
            assert!(ttl(&conn, &key).await > 0, "{key}");
        }
        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn merges_existing_child_segment() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        let (key, ..) = call(&conn, Call::new("b", &["c"], 11, "salt-leaf")).await;
        assert_eq!(key, segment("b"));
        let (key, has_root, _, merged) =
            call(&conn, Call::new("a", &["b"], 13, "salt-child")).await;
        assert_eq!(key, segment("a"));
        assert!(!has_root);
        assert_eq!(merged, ["b"]);
        assert_eq!(
            members(&conn, &member_keys("a")).await,
            ["salt-child", "salt-leaf"]
        );
        let (a, b) = (segment("a"), segment("b"));
        assert!(members(&conn, &member_keys("b")).await.is_empty());
        assert_eq!(get(&conn, &format!("span-buf:ic:{b}")).await, None);
        assert_eq!(get(&conn, &format!("span-buf:ibc:{b}")).await, None);
        assert_eq!(
            get(&conn, &format!("span-buf:ic:{a}")).await.as_deref(),
            Some("2")
        );
        assert_eq!(
            get(&conn, &format!("span-buf:ibc:{a}")).await.as_deref(),
            Some("24")
        );
        let redirects: std::collections::BTreeMap<String, String> = conn
            .clone()
            .hgetall(format!("span-buf:ssr:{{{PT}}}"))
            .await
            .unwrap();
        assert_eq!(
            redirects.into_iter().collect::<Vec<_>>(),
            [("b".into(), "a".into()), ("c".into(), "b".into())]
        );
        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn merges_large_child_member_key_set() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        let b = segment("b");
        let salts: Vec<String> = (0..9000).map(|i| format!("salt-{i}")).collect();
        for chunk in salts.chunks(1000) {
            let _: () = conn.clone().sadd(member_keys("b"), chunk).await.unwrap();
        }
        let _: () = conn
            .clone()
            .set(format!("span-buf:ic:{b}"), 9000)
            .await
            .unwrap();
        let _: () = conn
            .clone()
            .set(format!("span-buf:ibc:{b}"), 123)
            .await
            .unwrap();

        let (key, _, _, merged) = call(&conn, Call::new("a", &["b"], 7, "salt-parent")).await;
        assert_eq!(key, segment("a"));
        assert_eq!(merged, ["b"]);
        let a = segment("a");
        assert!(members(&conn, &member_keys("b")).await.is_empty());
        assert_eq!(members(&conn, &member_keys("a")).await.len(), 9001);
        assert_eq!(
            get(&conn, &format!("span-buf:ic:{a}")).await.as_deref(),
            Some("9001")
        );
        assert_eq!(
            get(&conn, &format!("span-buf:ibc:{a}")).await.as_deref(),
            Some("130")
        );
    })
    .await;
}

#[tokio::test]
async fn detaches_when_segment_exceeds_byte_limit() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        let (key, ..) = call(&conn, Call::new("a", &["b"], 40, "salt-first")).await;
        assert_eq!(key, segment("a"));
        let mut second = Call::new("a", &["c"], 30, "salt-second");
        second.max_bytes = 60;
        let (key, _, metrics, _) = call(&conn, second).await;
        assert_eq!(key, segment("salt-second"));
        assert_eq!(metric(&metrics, "detached_segment_too_large"), 1);
        assert_eq!(metric(&metrics, "detached_segment_locked"), 0);
        assert_eq!(members(&conn, &member_keys("a")).await, ["salt-first"]);
        assert_eq!(
            members(&conn, &member_keys("salt-second")).await,
            ["salt-second"]
        );
        let a = segment("a");
        let detached = segment("salt-second");
        assert_eq!(
            get(&conn, &format!("span-buf:ibc:{a}")).await.as_deref(),
            Some("40")
        );
        assert_eq!(
            get(&conn, &format!("span-buf:ibc:{detached}"))
                .await
                .as_deref(),
            Some("30")
        );
        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn detaches_when_segment_is_flush_locked() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        call(&conn, Call::new("a", &["b"], 10, "salt-first")).await;
        let lock = format!("span-buf:fl:{}", segment("a"));
        let _: () = conn.clone().set_ex(&lock, 1, 60).await.unwrap();
        let mut locked = Call::new("a", &["c"], 10, "salt-locked");
        locked.check_lock = true;
        let (key, _, metrics, _) = call(&conn, locked).await;
        assert_eq!(key, segment("salt-locked"));
        assert_eq!(metric(&metrics, "detached_segment_locked"), 1);
        assert_eq!(metric(&metrics, "detached_segment_too_large"), 0);
        assert_eq!(members(&conn, &member_keys("a")).await, ["salt-first"]);
        assert_eq!(
            members(&conn, &member_keys("salt-locked")).await,
            ["salt-locked"]
        );
        // Without the lock check the same call merges normally.
        let (key, ..) = call(&conn, Call::new("a", &["d"], 10, "salt-unchecked")).await;
        assert_eq!(key, segment("a"));
    })
    .await;
}

async fn counters(conn: &RedisConnection, id: &str) -> (Option<String>, Option<String>) {
    let key = segment(id);
    (
        get(conn, &format!("span-buf:ic:{key}")).await,
        get(conn, &format!("span-buf:ibc:{key}")).await,
    )
}

fn counted(spans: u64, bytes: u64) -> (Option<String>, Option<String>) {
    (Some(spans.to_string()), Some(bytes.to_string()))
}

#[tokio::test]
async fn a_subsegment_written_again_is_counted_once() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        // Merged into its segment: the salt is listed in the segment's member keys.
        let (key, _, metrics, _) = call(&conn, Call::new("a", &["b", "c"], 20, "salt-1")).await;
        assert_eq!(metric(&metrics, "already_counted"), 0);
        let (again, _, metrics, merged) =
            call(&conn, Call::new("a", &["b", "c"], 20, "salt-1")).await;
        assert_eq!((again, merged.len()), (key, 0));
        assert_eq!(metric(&metrics, "already_counted"), 1);
        assert_eq!(counters(&conn, "a").await, counted(2, 20));

        // Detached while the segment was locked: the salt names a segment of its own. Written
        // again once the lock is gone, it stays counted there, not in `a` as well.
        let lock = format!("span-buf:fl:{}", segment("a"));
        let _: () = conn.clone().set_ex(&lock, 1, 60).await.unwrap();
        let mut detached = Call::new("a", &["d"], 10, "salt-2");
        detached.check_lock = true;
        let (key, ..) = call(&conn, detached).await;
        assert_eq!(key, segment("salt-2"));
        let _: () = conn.clone().del(&lock).await.unwrap();
        let mut again = Call::new("a", &["d"], 10, "salt-2");
        again.check_lock = true;
        let (key, _, metrics, _) = call(&conn, again).await;
        assert_eq!(key, segment("salt-2"));
        assert_eq!(metric(&metrics, "already_counted"), 1);
        assert_eq!(counters(&conn, "a").await, counted(2, 20));
        assert_eq!(counters(&conn, "salt-2").await, counted(1, 10));

        // Written again while its segment is locked, or over the byte limit now that its own
        // bytes are counted: it is already in the segment and does not detach.
        let _: () = conn.clone().set_ex(&lock, 1, 60).await.unwrap();
        let mut locked = Call::new("a", &["b", "c"], 20, "salt-1");
        locked.check_lock = true;
        locked.max_bytes = 30;
        let (key, _, metrics, _) = call(&conn, locked).await;
        assert_eq!(key, segment("a"));
        assert_eq!(metric(&metrics, "detached_segment_locked"), 0);
        assert_eq!(metric(&metrics, "detached_segment_too_large"), 0);
        assert_eq!(counters(&conn, "a").await, counted(2, 20));
        assert_eq!(members(&conn, &member_keys("a")).await, ["salt-1"]);
        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn a_subsegment_written_by_sentrys_script_and_written_again_is_counted_once() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        // The keys Sentry's script leaves for subsegment `salt-1` (spans `b`, `c` under `a`).
        let a = segment("a");
        let mut pipe = redis::pipe();
        pipe.hset_multiple(format!("span-buf:ssr:{{{PT}}}"), &[("b", "a"), ("c", "a")])
            .sadd(member_keys("a"), "salt-1")
            .set_ex(format!("span-buf:ic:{a}"), 2, 3600)
            .set_ex(format!("span-buf:ibc:{a}"), 20, 3600);
        let _: () = pipe.query_async(&mut conn.clone()).await.unwrap();

        let (key, ..) = call(&conn, Call::new("a", &["b", "c"], 20, "salt-1")).await;
        assert_eq!(key, a);
        assert_eq!(counters(&conn, "a").await, counted(2, 20));
        call(&conn, Call::new("a", &["e"], 5, "salt-3")).await;
        assert_eq!(counters(&conn, "a").await, counted(3, 25));
        assert_eq!(
            members(&conn, &member_keys("a")).await,
            ["salt-1", "salt-3"]
        );
    })
    .await;
}

#[tokio::test]
async fn a_child_segment_being_flushed_is_not_merged_into_its_parent() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        // `c` waits under `b`, which is a segment of its own; a flush holds its lock.
        call(&conn, Call::new("b", &["c"], 10, "salt-c")).await;
        let lock = format!("span-buf:fl:{}", segment("b"));
        let _: () = conn.clone().set_ex(&lock, 1, 60).await.unwrap();

        let mut parent = Call::new("a", &["a", "b"], 20, "salt-ab");
        parent.has_root = true;
        parent.check_lock = true;
        let (key, _, _, merged) = call(&conn, parent).await;
        assert_eq!(key, segment("a"));
        assert!(merged.is_empty(), "{merged:?}");
        assert_eq!(counters(&conn, "a").await, counted(2, 20));
        // The child keeps what its flush loads and its cleanup deletes.
        assert_eq!(counters(&conn, "b").await, counted(1, 10));
        assert_eq!(members(&conn, &member_keys("b")).await, ["salt-c"]);
        assert_eq!(members(&conn, &member_keys("a")).await, ["salt-ab"]);

        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn follows_redirect_chains_and_keeps_old_entries() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        call(&conn, Call::new("b", &["c"], 1, "s1")).await;
        call(&conn, Call::new("a", &["b"], 1, "s2")).await;
        // d's parent c resolves c → b → a.
        let (key, _, metrics, _) = call(&conn, Call::new("c", &["d"], 1, "s3")).await;
        assert_eq!(key, segment("a"));
        assert_eq!(metric(&metrics, "redirect_depth"), 2);
        assert_eq!(
            get(&conn, &format!("span-buf:ic:{}", segment("a")))
                .await
                .as_deref(),
            Some("3")
        );
    })
    .await;
}

#[tokio::test]
async fn unsampled_calls_report_no_metrics() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        let mut invocation = add_buffer().key(PT);
        // A hex salt whose first 8 digits are not a multiple of 1000 is not sampled.
        invocation
            .arg(1)
            .arg("a")
            .arg("true")
            .arg(3600)
            .arg(5)
            .arg(0)
            .arg("00000001aaaaaaaaaaaaaaaaaaaaaaaa")
            .arg("false")
            .arg(1000)
            .arg("a");
        let reply: Value = invocation.invoke_async(&mut conn.clone()).await.unwrap();
        let Value::Array(items) = reply else { panic!() };
        assert_eq!(items[2], Value::Int(-1));
        assert_eq!(items[3], Value::Array(vec![]));
        assert_eq!(items[4], Value::Array(vec![]));
    })
    .await;
}

#[tokio::test]
async fn applies_several_records_of_one_trace_in_order() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        // The two calls of `merges_existing_child_segment`, as two records of one call.
        let mut invocation = add_buffer().key(PT);
        for (parent, span, bytes, salt) in
            [("b", "c", 11, "salt-leaf"), ("a", "b", 13, "salt-child")]
        {
            invocation
                .arg(1)
                .arg(parent)
                .arg("false")
                .arg(3600)
                .arg(bytes)
                .arg(0)
                .arg(salt)
                .arg("false")
                .arg(1)
                .arg(span);
        }
        let reply: Value = invocation.invoke_async(&mut conn.clone()).await.unwrap();
        let Value::Array(items) = reply else {
            panic!("unexpected reply {reply:?}")
        };
        assert_eq!(items.len(), 12);
        let first: String = redis::from_redis_value(items[0].clone()).unwrap();
        let second: String = redis::from_redis_value(items[6].clone()).unwrap();
        assert_eq!(first, segment("b"));
        assert_eq!(second, segment("a"));
        let merged: Vec<String> = redis::from_redis_value(items[11].clone()).unwrap();
        assert_eq!(merged, ["b"]);
        assert_eq!(
            members(&conn, &member_keys("a")).await,
            ["salt-child", "salt-leaf"]
        );
        assert!(members(&conn, &member_keys("b")).await.is_empty());
        let (a, b) = (segment("a"), segment("b"));
        assert_eq!(
            get(&conn, &format!("span-buf:ic:{a}")).await.as_deref(),
            Some("2")
        );
        assert_eq!(
            get(&conn, &format!("span-buf:ibc:{a}")).await.as_deref(),
            Some("24")
        );
        assert_eq!(get(&conn, &format!("span-buf:ic:{b}")).await, None);
        buffer_support::assert_ttls(&redis);
    })
    .await;
}

#[tokio::test]
async fn rejects_a_malformed_record() {
    for_each_mode(|redis: TestRedis| async move {
        let conn = connect(&redis).await;
        let mut invocation = add_buffer().key(PT);
        // Says 3 span ids, carries 1.
        invocation
            .arg(3)
            .arg("a")
            .arg("false")
            .arg(3600)
            .arg(1)
            .arg(0)
            .arg("s")
            .arg("false")
            .arg(1)
            .arg("b");
        let result: redis::RedisResult<Value> = invocation.invoke_async(&mut conn.clone()).await;
        assert!(result.is_err());
        assert!(redis.keys_with_ttls().is_empty());
    })
    .await;
}
