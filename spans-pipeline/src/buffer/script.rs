//! The embedded `add-buffer.lua` and its SHA, and the small flush-lock scripts.
//!
//! The script is compiled into the binary, so the code and the script it calls can never
//! disagree. Pipelined `EVALSHA` gets no automatic `NOSCRIPT` fallback from the redis crate,
//! so the store loads the script on every master up front and again when a call reports
//! `NOSCRIPT` (a restarted or flushed server). The lock scripts are a few lines each and are
//! sent with `EVAL`, so no server can have forgotten them.

use std::sync::LazyLock;

/// The source of `lua/add-buffer.lua`.
pub const ADD_BUFFER_SOURCE: &str = include_str!("../../../lua/add-buffer.lua");

static ADD_BUFFER: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(ADD_BUFFER_SOURCE));

/// The add-buffer script (source and SHA1).
pub fn add_buffer() -> &'static redis::Script {
    &ADD_BUFFER
}

/// Takes a segment's flush lock for one flush: `SET <lock> <token> PX <ttl ms> NX`.
///
/// A script rather than the command itself only for its `allow-oom` flag: at `maxmemory`
/// (`noeviction`) Redis refuses `SET`, and a flusher that cannot lock cannot flush, so the
/// memory that flushing would free is never freed and the buffer wedges. The lock is one small
/// key that the same flush deletes with everything else, so letting it through is what lets
/// memory fall. Flags need Redis 7.0 or later.
pub const ACQUIRE_FLUSH_LOCK: &str = "#!lua flags=allow-oom
return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
";

/// Extends a flush lock only while it still holds this flush's token: `1` if it did.
pub const EXTEND_FLUSH_LOCK: &str = "#!lua flags=allow-oom
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
pub const RELEASE_FLUSHED_SEGMENT: &str = "#!lua flags=allow-oom
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
for first = 2, #ARGV, 100 do
    redis.call('HDEL', KEYS[2], unpack(ARGV, first, math.min(first + 99, #ARGV)))
end
redis.call('UNLINK', KEYS[1], unpack(KEYS, 3))
return 1
";
