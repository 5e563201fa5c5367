//! The flush queues: each segment's deadline set after a write, entries of segments merged
//! away dropped, and the queue reads behind the gauges and `inspect`.

use std::collections::HashMap;

use redis::Value;

use super::reply::{as_f64, as_optional_u64, check_replies, check_spread_replies, first_score};
use super::{CLEANUP_KEYS_PER_UNLINK, SpansBufferStore, expire};
use crate::buffer::connection::{CommandBatch, RedisConnection};
use crate::buffer::error::BufferError;
use crate::buffer::keys::{self, SegmentKey};
use crate::buffer::segment::InsertedSubsegment;

/// The queue changes of one batch for one queue.
struct QueueUpdate {
    queue: String,
    /// Deadline per segment, in first-seen order.
    adds: Vec<(SegmentKey, i64)>,
    /// Entries of segments merged away.
    removes: Vec<SegmentKey>,
}

impl SpansBufferStore {
    /// Sets each segment's queue deadline and drops queue entries of segments merged away.
    ///
    /// Outside the merged layout, a segment merged away may still own a legacy merged payload
    /// set from before the migration (already copied into the distributed layout); it is
    /// unlinked here so it does not linger until its TTL.
    pub async fn update_queue(
        &self,
        inserted: &[InsertedSubsegment],
        now: i64,
        slice_id: Option<u32>,
    ) -> Result<(), BufferError> {
        // Per queue, in first-seen order: deadline per segment (last write wins, as in a
        // Python dict) and the stale entries to remove.
        let mut queues: Vec<QueueUpdate> = Vec::new();
        let mut queue_index: HashMap<String, usize> = HashMap::new();
        for result in inserted {
            let queue = keys::queue(slice_id, result.queue_shard());
            let index = *queue_index.entry(queue.clone()).or_insert_with(|| {
                queues.push(QueueUpdate {
                    queue,
                    adds: Vec::new(),
                    removes: Vec::new(),
                });
                queues.len() - 1
            });
            let QueueUpdate { adds, removes, .. } = &mut queues[index];
            let timeout = if result.has_root_span {
                self.options.root_timeout
            } else {
                self.options.timeout
            };
            let deadline = now + i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX / 2);
            match adds.iter_mut().find(|(key, _)| *key == result.segment_key) {
                Some(entry) => entry.1 = deadline,
                None => adds.push((result.segment_key.clone(), deadline)),
            }
            if !result.is_detached() {
                let pt = result.segment_key.project_and_trace();
                removes.extend(
                    result
                        .merged_segment_span_ids
                        .iter()
                        .map(|span_id| SegmentKey::new(pt, span_id)),
                );
            }
            // A segment never removes itself; a segment added by an earlier subsegment and
            // merged away by a later one is removed (ZREM runs after ZADD).
            removes.retain(|stale| *stale != result.segment_key);
        }
        let mut batch = CommandBatch::new();
        let mut debug_deadlines = Vec::new();
        if !self.options.write_merged_payloads {
            let stale: Vec<String> = queues
                .iter()
                .flat_map(|q| &q.removes)
                .map(|segment| segment.as_str().to_owned())
                .collect();
            if !stale.is_empty() {
                batch.add_spread("UNLINK", stale, CLEANUP_KEYS_PER_UNLINK);
            }
        }
        for QueueUpdate {
            queue,
            adds,
            removes,
        } in queues
        {
            for (segment, deadline) in &adds {
                if self.is_debug_trace(segment) {
                    let mut score = redis::cmd("ZSCORE");
                    score.arg(&queue).arg(segment.as_str());
                    let index = batch.add(queue.clone(), score);
                    debug_deadlines.push((index, queue.clone(), segment.clone(), *deadline));
                }
            }
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&queue);
            for (segment, deadline) in &adds {
                zadd.arg(*deadline).arg(segment.as_str());
            }
            batch.add(queue.clone(), zadd);
            batch.add(queue.clone(), expire(&queue, self.options.redis_ttl));
            if !removes.is_empty() {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&queue);
                for stale in &removes {
                    zrem.arg(stale.as_str());
                }
                batch.add(queue.clone(), zrem);
            }
        }
        let replies = self.conn.execute(batch).await?;
        check_spread_replies("UNLINK", &replies)?;
        for (index, queue, segment, deadline) in debug_deadlines {
            let old_deadline = replies.get(index).and_then(|reply| as_f64(reply).ok());
            tracing::debug!(
                segment_key = %segment,
                queue_key = %queue,
                old_deadline = ?old_deadline.map(|d| d as i64),
                new_deadline = deadline,
                "Updated the queue deadline of a debug trace."
            );
        }
        check_replies("ZADD", &replies)
    }

    fn is_debug_trace(&self, segment: &SegmentKey) -> bool {
        !self.options.debug_traces.is_empty()
            && segment
                .project_and_trace()
                .split_once(':')
                .is_some_and(|(_, trace)| self.options.debug_traces.iter().any(|t| t == trace))
    }

    /// The queue deadline of a segment (`ZSCORE`), if queued.
    pub async fn queue_deadline(
        &self,
        queue_key: &str,
        segment: &SegmentKey,
    ) -> Result<Option<i64>, BufferError> {
        let mut batch = CommandBatch::new();
        let mut score = redis::cmd("ZSCORE");
        score.arg(queue_key).arg(segment.as_str());
        batch.add(queue_key, score);
        match self.conn.execute(batch).await?.pop() {
            None | Some(Value::Nil) => Ok(None),
            Some(value) => Ok(Some(as_f64(&value)? as i64)),
        }
    }

    /// Size, due segments and oldest deadline of each queue at `now`, in one round trip: the
    /// stored-segments and flush-lag gauges, and `inspect`.
    pub async fn queue_stats(
        &self,
        queues: &[String],
        now: i64,
    ) -> Result<Vec<QueueStats>, BufferError> {
        queue_stats(&self.conn, queues.iter().map(String::as_str), now).await
    }
}

/// [`SpansBufferStore::queue_stats`] on any connection (`inspect` has one of its own), in the
/// order of `queues`; shorter if a reply is missing.
pub(crate) async fn queue_stats<'a>(
    conn: &RedisConnection,
    queues: impl IntoIterator<Item = &'a str>,
    now: i64,
) -> Result<Vec<QueueStats>, BufferError> {
    let mut batch = CommandBatch::new();
    for queue in queues {
        add_queue_stats(&mut batch, queue, now);
    }
    let mut replies = conn.execute(batch).await?.into_iter();
    let mut stats = Vec::new();
    while let Some(queue) = read_queue_stats(&mut replies)? {
        stats.push(queue);
    }
    Ok(stats)
}

/// What [`SpansBufferStore::queue_stats`] reads of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Segments queued (`ZCARD`).
    pub size: u64,
    /// Segments due at the time asked for (`ZCOUNT -inf <now>`).
    pub due: u64,
    /// The earliest deadline (`ZRANGE 0 0 WITHSCORES`), `None` for an empty queue.
    pub oldest_deadline: Option<i64>,
}

/// Adds the three commands of one queue's [`QueueStats`] to `batch`.
fn add_queue_stats(batch: &mut CommandBatch, queue: &str, now: i64) {
    let mut zcard = redis::cmd("ZCARD");
    zcard.arg(queue);
    batch.add(queue, zcard);
    let mut zcount = redis::cmd("ZCOUNT");
    zcount.arg(queue).arg("-inf").arg(now);
    batch.add(queue, zcount);
    let mut oldest = redis::cmd("ZRANGE");
    oldest.arg(queue).arg(0).arg(0).arg("WITHSCORES");
    batch.add(queue, oldest);
}

/// Reads the next queue's [`QueueStats`] from the replies of [`add_queue_stats`]' commands;
/// `None` once they are used up.
fn read_queue_stats(
    replies: &mut impl Iterator<Item = Value>,
) -> Result<Option<QueueStats>, BufferError> {
    let (Some(size), Some(due), Some(oldest)) = (replies.next(), replies.next(), replies.next())
    else {
        return Ok(None);
    };
    Ok(Some(QueueStats {
        size: as_optional_u64(size)?.unwrap_or(0),
        due: as_optional_u64(due)?.unwrap_or(0),
        oldest_deadline: first_score(oldest)?,
    }))
}
