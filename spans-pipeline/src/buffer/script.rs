//! The embedded `add-buffer.lua` and its SHA, and the small flush-lock scripts.
//!
//! The script is compiled into the binary, so the code and the script it calls can never
//! disagree. Pipelined `EVALSHA` gets no automatic `NOSCRIPT` fallback from the redis crate,
//! so the store loads the script on every master up front and again when a call reports
//! `NOSCRIPT` (a restarted or flushed server). The lock scripts are a few lines each and are
//! sent with `EVAL`, so no server can have forgotten them.

use std::sync::LazyLock;

/// The source of `lua/add-buffer.lua`.
pub(crate) const ADD_BUFFER_SOURCE: &str = include_str!("../../../lua/add-buffer.lua");

static ADD_BUFFER: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(ADD_BUFFER_SOURCE));

/// The add-buffer script (source and SHA1).
pub(crate) fn add_buffer() -> &'static redis::Script {
    &ADD_BUFFER
}

/// Takes a segment's flush lock for one flush: `SET <lock> <token> PX <ttl ms> NX`.
///
/// A script rather than the command itself only for its `allow-oom` flag: at `maxmemory`
/// (`noeviction`) Redis refuses `SET`, and a flusher that cannot lock cannot flush, so the
/// memory that flushing would free is never freed and the buffer wedges. The lock is one small
/// key that the same flush deletes with everything else, so letting it through is what lets
/// memory fall. Flags need Redis 7.0 or later.
pub(crate) const ACQUIRE_FLUSH_LOCK: &str = "#!lua flags=allow-oom
return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
";

/// Extends a flush lock only while it still holds this flush's token: `1` if it did.
pub(crate) const EXTEND_FLUSH_LOCK: &str = "#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Deletes a flushed segment's own keys and its spans' redirects, and releases its lock, in
/// one step and only while the lock still holds this flush's token (an empty token: locks
/// are off, delete unconditionally). `KEYS`: the lock, the trace's redirect map, then the keys
/// to unlink; `ARGV`: the token, then the span ids. `1` if it deleted, `0` if the lock was
/// gone or another flush's.
pub(crate) const RELEASE_FLUSHED_SEGMENT: &str = "#!lua flags=allow-oom
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
for first = 2, #ARGV, 100 do
    redis.call('HDEL', KEYS[2], unpack(ARGV, first, math.min(first + 99, #ARGV)))
end
redis.call('UNLINK', KEYS[1], unpack(KEYS, 3))
return 1
";

/// `lua/add-buffer.lua` called directly (Sentry's `test_add_buffer_lua.py`), on a standalone
/// server and on a cluster.
#[cfg(test)]
mod tests {
    use integration_tests::redis_server::TestRedis;
    use redis::{AsyncCommands, Value};

    use super::add_buffer;
    use crate::buffer::RedisConnection;

    async fn connect(redis: &TestRedis) -> RedisConnection {
        RedisConnection::connect(&redis.urls(), redis.is_cluster())
            .await
            .unwrap()
    }

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
        /// 1 samples every call; 1000 only salts whose first 8 hex digits are a multiple of it.
        sample_rate: u64,
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
                sample_rate: 1,
            }
        }

        /// Appends this call's record to `invocation`.
        fn add_to(&self, invocation: &mut redis::ScriptInvocation<'_>) {
            invocation
                .arg(self.spans.len())
                .arg(self.parent)
                .arg(if self.has_root { "true" } else { "false" })
                .arg(3600)
                .arg(self.bytes)
                .arg(self.max_bytes)
                .arg(self.salt)
                .arg(if self.check_lock { "true" } else { "false" })
                .arg(self.sample_rate);
            for span in self.spans {
                invocation.arg(*span);
            }
        }
    }

    /// Runs the script; returns `(segment key, has_root, metrics, merged ids)`.
    async fn call(
        conn: &RedisConnection,
        call: Call<'_>,
    ) -> (String, bool, Vec<(String, i64)>, Vec<String>) {
        let mut invocation = add_buffer().key(PT);
        call.add_to(&mut invocation);
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

    /// The redirect map of the test's partition, sorted by span.
    async fn redirects(conn: &RedisConnection) -> Vec<(String, String)> {
        let map: std::collections::BTreeMap<String, String> = conn
            .clone()
            .hgetall(format!("span-buf:ssr:{{{PT}}}"))
            .await
            .unwrap();
        map.into_iter().collect()
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
        TestRedis::for_each_mode(|redis: TestRedis| async move {
            let conn = connect(&redis).await;
            let mut first = Call::new("b", &["b", "a"], 23, "salt-root");
            first.has_root = true;
            let (key, has_root, metrics, merged) = call(&conn, first).await;
            assert_eq!(key, segment("b"));
            assert!(has_root);
            assert!(merged.is_empty());
            assert_eq!(metric(&metrics, "detached_segment_too_large"), 0);
            assert_eq!(metric(&metrics, "detached_segment_locked"), 0);

            assert_eq!(
                redirects(&conn).await,
                [("a".into(), "b".into()), ("b".into(), "b".into())]
            );
            assert_eq!(members(&conn, &member_keys("b")).await, ["salt-root"]);
            let b = segment("b");
            assert_eq!(counters(&conn, "b").await, counted(2, 23));
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
            redis.assert_ttls();
        })
        .await;
    }

    #[tokio::test]
    async fn merges_existing_child_segment() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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
            assert!(members(&conn, &member_keys("b")).await.is_empty());
            assert_eq!(counters(&conn, "b").await, (None, None));
            assert_eq!(counters(&conn, "a").await, counted(2, 24));
            assert_eq!(
                redirects(&conn).await,
                [("b".into(), "a".into()), ("c".into(), "b".into())]
            );
            redis.assert_ttls();
        })
        .await;
    }

    #[tokio::test]
    async fn merges_large_child_member_key_set() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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
            assert!(members(&conn, &member_keys("b")).await.is_empty());
            assert_eq!(members(&conn, &member_keys("a")).await.len(), 9001);
            assert_eq!(counters(&conn, "a").await, counted(9001, 130));
        })
        .await;
    }

    #[tokio::test]
    async fn detaches_when_segment_exceeds_byte_limit() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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
            redis.assert_ttls();
        })
        .await;
    }

    #[tokio::test]
    async fn detaches_when_segment_is_flush_locked() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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

    #[tokio::test]
    async fn a_subsegment_written_again_is_counted_once() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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
            redis.assert_ttls();
        })
        .await;
    }

    #[tokio::test]
    async fn a_subsegment_written_by_sentrys_script_and_written_again_is_counted_once() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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

            redis.assert_ttls();
        })
        .await;
    }

    #[tokio::test]
    async fn follows_redirect_chains_and_keeps_old_entries() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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
        TestRedis::for_each_mode(|redis: TestRedis| async move {
            let conn = connect(&redis).await;
            let mut invocation = add_buffer().key(PT);
            // A hex salt whose first 8 digits are not a multiple of 1000 is not sampled.
            let mut call = Call::new("a", &["a"], 5, "00000001aaaaaaaaaaaaaaaaaaaaaaaa");
            call.has_root = true;
            call.sample_rate = 1000;
            call.add_to(&mut invocation);
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
        TestRedis::for_each_mode(|redis: TestRedis| async move {
            let conn = connect(&redis).await;
            // The two calls of `merges_existing_child_segment`, as two records of one call.
            let mut invocation = add_buffer().key(PT);
            for (parent, span, bytes, salt) in
                [("b", "c", 11, "salt-leaf"), ("a", "b", 13, "salt-child")]
            {
                Call::new(parent, &[span], bytes, salt).add_to(&mut invocation);
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
            let b = segment("b");
            assert_eq!(counters(&conn, "a").await, counted(2, 24));
            assert_eq!(get(&conn, &format!("span-buf:ic:{b}")).await, None);
            redis.assert_ttls();
        })
        .await;
    }

    #[tokio::test]
    async fn rejects_a_malformed_record() {
        TestRedis::for_each_mode(|redis: TestRedis| async move {
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
            let result: redis::RedisResult<Value> =
                invocation.invoke_async(&mut conn.clone()).await;
            assert!(result.is_err());
            assert!(redis.keys_with_ttls().is_empty());
        })
        .await;
    }
}
