//! The cleanup of flushed segments: queue entries and payload keys removed, then each
//! segment's own keys deleted and its lock released by one script, lock last.

use redis::{Cmd, Value};

use super::reply::{check_replies, check_spread_replies};
use super::{CLEANUP_KEYS_PER_UNLINK, SpansBufferStore};
use crate::buffer::connection::CommandBatch;
use crate::buffer::error::BufferError;
use crate::buffer::keys;
use crate::buffer::script;
use crate::buffer::segment::FlushedSegment;

/// Span ids per `HDEL` and members per `ZREM` in cleanup.
const CLEANUP_CHUNK: usize = 100;

impl SpansBufferStore {
    /// Removes everything of flushed segments: metadata, redirects of their spans, member-keys
    /// index and payload keys (when payload keys were found), the lock, and queue entries.
    ///
    /// With locks on, only segments whose lock still holds their flush's token are touched,
    /// and in an order that keeps the lock until the end: the locks are checked (and
    /// extended), then the queue entries and payload keys go, then one script per segment
    /// deletes its own keys and releases the lock, again only if it still holds the token. A
    /// segment whose lock expired may have taken in spans this flush did not produce (a
    /// subsegment merges into an unlocked segment): it is left for the next flush, which
    /// produces its spans again (duplicates, not losses). Returns how many segments were left.
    pub async fn cleanup_flushed_segments(
        &self,
        segments: &[FlushedSegment],
    ) -> Result<usize, BufferError> {
        let held = self.extend_flush_locks(segments).await?;
        let mut owned: Vec<&FlushedSegment> = Vec::with_capacity(segments.len());
        for (segment, held) in segments.iter().zip(held) {
            if held {
                owned.push(segment);
            } else {
                tracing::warn!(
                    segment_key = %segment.segment_key,
                    "The flush lock expired or was taken over before cleanup; leaving the \
                     segment for the next flush."
                );
            }
        }
        let mut left = segments.len() - owned.len();
        let mut batch = CommandBatch::new();
        let mut queue_removals: Vec<(String, Vec<&str>)> = Vec::new();
        let mut payload_keys = Vec::new();
        for segment in &owned {
            payload_keys.extend(segment.payload_keys.iter().cloned());
            for queue in &segment.queue_keys {
                let key = segment.segment_key.as_str();
                match queue_removals.iter_mut().find(|(q, _)| q == queue) {
                    Some((_, members)) => members.push(key),
                    None => queue_removals.push((queue.clone(), vec![key])),
                }
            }
        }
        for (queue, members) in queue_removals {
            for chunk in members.chunks(CLEANUP_CHUNK) {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&queue).arg(chunk);
                batch.add(queue.clone(), zrem);
            }
        }
        if !payload_keys.is_empty() {
            batch.add_spread("UNLINK", payload_keys, CLEANUP_KEYS_PER_UNLINK);
        }
        let mut releases = if self.locks_on() {
            // The lock must outlive the queue entry: released first, a subsegment could
            // re-create the segment and queue it, and the `ZREM` would then take that away.
            let replies = self.conn.execute(batch).await?;
            check_replies("cleanup", &replies)?;
            check_spread_replies("cleanup", &replies)?;
            CommandBatch::new()
        } else {
            batch
        };
        let first_release = releases.len();
        for segment in &owned {
            let key = &segment.segment_key;
            releases.add(key.as_str(), release_call(segment));
        }
        let replies = self.conn.execute(releases).await?;
        check_replies("cleanup", &replies)?;
        check_spread_replies("cleanup", &replies)?;
        for (segment, reply) in owned.iter().zip(&replies[first_release..]) {
            if !matches!(reply, Value::Int(1)) {
                tracing::warn!(
                    segment_key = %segment.segment_key,
                    "The flush lock was lost during cleanup; the segment's metadata is left \
                     until its TTL."
                );
                left += 1;
            }
        }
        Ok(left)
    }
}

/// The [`script::RELEASE_FLUSHED_SEGMENT`] call of one flushed segment. Every key it touches
/// shares the segment's `{pt}` hash tag; the segment key is the legacy merged payload set.
fn release_call(segment: &FlushedSegment) -> Cmd {
    let key = &segment.segment_key;
    let mut cmd = redis::cmd("EVAL");
    let mut own_keys = vec![
        keys::flush_lock(key),
        keys::redirect_map(key.project_and_trace()),
        keys::has_root_span(key),
        keys::ingested_count(key),
        keys::ingested_bytes(key),
        key.as_str().to_owned(),
    ];
    if !segment.payload_keys.is_empty() {
        own_keys.push(keys::member_keys(key));
    }
    cmd.arg(script::RELEASE_FLUSHED_SEGMENT)
        .arg(own_keys.len())
        .arg(own_keys)
        .arg(segment.lock_token.as_deref().unwrap_or_default());
    for span in &segment.spans {
        if !span.span_id.is_empty() {
            cmd.arg(&span.span_id);
        }
    }
    cmd
}
