//! The flush phase's reads: segments due in each queue, their flush locks taken (and
//! extended while they are produced), their payloads and ingest counters loaded.

use redis::{Cmd, Value};

use super::SpansBufferStore;
use super::reply::{as_bytes, as_f64, as_optional_u64, as_string, check_replies, into_array};
use crate::buffer::codec;
use crate::buffer::connection::CommandBatch;
use crate::buffer::error::BufferError;
use crate::buffer::keys::{self, SegmentKey};
use crate::buffer::parallel;
use crate::buffer::script;
use crate::buffer::segment::{FlushCandidate, FlushedSegment, IngestMetadata, LoadedSegment};
use crate::metrics as names;

/// Compressed bytes per thread below which a load decompresses on the calling thread alone.
const COMPRESSED_BYTES_PER_DECODE_THREAD: usize = 256 * 1024;

impl SpansBufferStore {
    /// Segments whose deadline is at or before `now`, oldest first, at most `limit` per queue.
    /// Returns one list per queue, in the order of `queues` (queue keys).
    pub async fn load_flush_candidates(
        &self,
        queues: &[String],
        now: i64,
        limit: usize,
    ) -> Result<Vec<Vec<FlushCandidate>>, BufferError> {
        let mut batch = CommandBatch::new();
        for queue in queues {
            let mut range = redis::cmd("ZRANGEBYSCORE");
            range
                .arg(queue)
                .arg(0)
                .arg(now)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
            batch.add(queue.clone(), range);
        }
        let replies = self.conn.execute(batch).await?;
        let mut per_queue = Vec::with_capacity(queues.len());
        let mut bad_entries: Vec<(&str, Vec<u8>)> = Vec::new();
        for (queue, reply) in queues.iter().zip(replies) {
            let mut candidates = Vec::new();
            for pair in into_array("ZRANGEBYSCORE", reply)?.chunks(2) {
                let member = as_bytes("ZRANGEBYSCORE", pair[0].clone())?;
                let score = pair.get(1).map_or(Ok(0.0), as_f64)?;
                match std::str::from_utf8(&member)
                    .ok()
                    .and_then(SegmentKey::parse)
                {
                    Some(segment_key) => candidates.push(FlushCandidate {
                        queue_key: queue.clone(),
                        segment_key,
                        deadline: score as i64,
                    }),
                    None => bad_entries.push((queue, member)),
                }
            }
            per_queue.push(candidates);
        }
        self.set_aside_bad_queue_entries(bad_entries).await?;
        Ok(per_queue)
    }

    /// Removes queue members that no flush can read (not UTF-8, or not a segment key): left
    /// in place they would come back at every flush and, read as an error, stop every shard
    /// of the worker. Each is logged with its queue and counted; nothing else refers to them.
    async fn set_aside_bad_queue_entries(
        &self,
        entries: Vec<(&str, Vec<u8>)>,
    ) -> Result<(), BufferError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = CommandBatch::new();
        for (queue, member) in &entries {
            tracing::error!(
                queue_key = queue,
                member = %member.escape_ascii(),
                "Removing a flush queue entry that is not a segment key."
            );
            metrics::counter!(names::BAD_QUEUE_ENTRIES, "queue" => queue.to_string()).increment(1);
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(*queue).arg(member.as_slice());
            batch.add(*queue, zrem);
        }
        check_replies("ZREM", &self.conn.execute(batch).await?)
    }

    /// Takes the flush lock of each candidate for the flush named by `token`
    /// (`ACQUIRE_FLUSH_LOCK`, which Redis runs even at `maxmemory`); returns the
    /// candidates whose lock was taken and how many were already locked. Locks off (ttl 0):
    /// everything.
    pub async fn acquire_flush_locks(
        &self,
        candidates: Vec<FlushCandidate>,
        token: &str,
    ) -> Result<(Vec<FlushCandidate>, usize), BufferError> {
        if !self.locks_on() || candidates.is_empty() {
            return Ok((candidates, 0));
        }
        let mut batch = CommandBatch::new();
        for candidate in &candidates {
            let lock = keys::flush_lock(&candidate.segment_key);
            batch.add(
                lock.clone(),
                self.lock_call(script::ACQUIRE_FLUSH_LOCK, lock, token),
            );
        }
        let replies = self.conn.execute(batch).await?;
        let mut acquired = Vec::with_capacity(candidates.len());
        let mut contended = 0;
        for (candidate, reply) in candidates.into_iter().zip(replies) {
            match reply {
                Value::Okay | Value::SimpleString(_) => acquired.push(candidate),
                Value::Nil => contended += 1,
                other => return Err(BufferError::unexpected("SET NX", &other)),
            }
        }
        Ok((acquired, contended))
    }

    /// Extends the flush lock of each segment by the lock TTL, where it still holds the
    /// segment's token (`EXTEND_FLUSH_LOCK`); returns, per segment, whether it does.
    /// A segment flushed without a lock always does.
    pub async fn extend_flush_locks(
        &self,
        segments: &[FlushedSegment],
    ) -> Result<Vec<bool>, BufferError> {
        let mut batch = CommandBatch::new();
        let mut locked = Vec::new();
        for (index, segment) in segments.iter().enumerate() {
            if let Some(token) = segment.lock_token.as_deref() {
                let lock = keys::flush_lock(&segment.segment_key);
                batch.add(
                    lock.clone(),
                    self.lock_call(script::EXTEND_FLUSH_LOCK, lock, token),
                );
                locked.push(index);
            }
        }
        let mut held = vec![true; segments.len()];
        if locked.is_empty() {
            return Ok(held);
        }
        for (index, reply) in locked.into_iter().zip(self.conn.execute(batch).await?) {
            held[index] = match reply {
                Value::Int(n) => n == 1,
                other => return Err(BufferError::unexpected("PEXPIRE", &other)),
            };
        }
        Ok(held)
    }

    /// `EVAL <script> 1 <lock> <token> <ttl ms>`.
    fn lock_call(&self, script: &str, lock: String, token: &str) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(1)
            .arg(lock)
            .arg(token)
            .arg(u64::try_from(self.options.flush_lock_ttl.as_millis()).unwrap_or(u64::MAX));
        cmd
    }

    /// Loads payloads and ingest counters of each candidate.
    pub async fn load_segments(
        &self,
        candidates: Vec<FlushCandidate>,
    ) -> Result<Vec<LoadedSegment>, BufferError> {
        // The member-keys index is read in every layout: it names the payload keys to read
        // (distributed layout) or at least to clean up (while migrating).
        let read_distributed = self.options.read_distributed_payloads;
        let mut batch = CommandBatch::new();
        for candidate in &candidates {
            let segment = &candidate.segment_key;
            let member_keys = keys::member_keys(segment);
            let mut smembers = redis::cmd("SMEMBERS");
            smembers.arg(&member_keys);
            batch.add(member_keys, smembers);
            for key in [keys::ingested_count(segment), keys::ingested_bytes(segment)] {
                let mut get = redis::cmd("GET");
                get.arg(&key);
                batch.add(key, get);
            }
        }
        let mut replies = self.conn.execute(batch).await?.into_iter();
        let mut segments = Vec::with_capacity(candidates.len());
        let mut scans: Vec<(usize, String)> = Vec::new();
        // Compressed members are whole subsegments, distinct per payload key, so each
        // segment's payload keys can be read by a few `SUNION`s instead of one `SSCAN` each.
        // Raw members are single spans, and a span delivered twice would be merged by a union.
        let union = read_distributed && self.options.compression_level != -1;
        let mut unions = CommandBatch::new();
        let mut union_segments = Vec::new();
        for candidate in candidates {
            let index = segments.len();
            let segment = &candidate.segment_key;
            let mut payload_keys = Vec::new();
            let salts = into_array("SMEMBERS", replies.next().unwrap_or(Value::Nil))?;
            for salt in &salts {
                let key = keys::payload(segment.project_and_trace(), &as_string("SMEMBERS", salt)?);
                if read_distributed && !union {
                    scans.push((index, key.clone()));
                }
                payload_keys.push(key);
            }
            if !read_distributed {
                scans.push((index, segment.as_str().to_owned()));
            }
            if union && !payload_keys.is_empty() {
                unions.add_spread(
                    "SUNION",
                    payload_keys.clone(),
                    self.options.segment_page_size,
                );
                union_segments.push(index);
            }
            let span_count = as_optional_u64(replies.next().unwrap_or(Value::Nil))?;
            let byte_count = as_optional_u64(replies.next().unwrap_or(Value::Nil))?;
            segments.push(LoadedSegment {
                candidate,
                payloads: Vec::new(),
                payload_keys,
                ingested: IngestMetadata {
                    span_count,
                    byte_count,
                },
                corrupt_members: 0,
            });
        }
        let mut members: Vec<(usize, SegmentKey, Vec<Vec<u8>>)> =
            Vec::with_capacity(union_segments.len());
        for (index, reply) in union_segments
            .into_iter()
            .zip(self.conn.execute(unions).await?)
        {
            let mut segment_members = Vec::new();
            for part in into_array("SUNION", reply)? {
                for member in into_array("SUNION", part)? {
                    segment_members.push(as_bytes("SUNION", member)?);
                }
            }
            members.push((
                index,
                segments[index].candidate.segment_key.clone(),
                segment_members,
            ));
        }
        // Decompressing is most of a load's CPU: shared across threads for a large flush.
        let decoded = parallel::map_ordered(
            members,
            |(_, _, members)| members.iter().map(Vec::len).sum(),
            COMPRESSED_BYTES_PER_DECODE_THREAD,
            |(index, key, members)| {
                let mut payloads = Vec::with_capacity(members.len());
                let mut corrupt = 0;
                for member in members {
                    corrupt += u64::from(!decode_member_of(&key, member, &mut payloads));
                }
                (index, payloads, corrupt)
            },
        );
        for (index, payloads, corrupt) in decoded {
            segments[index].payloads = payloads;
            segments[index].corrupt_members += corrupt;
        }
        self.scan_payloads(scans, &mut segments).await?;
        Ok(segments)
    }

    /// Reads every member of each `(segment index, key)` with paged `SSCAN`, pipelined across
    /// keys, until every cursor is back at 0.
    async fn scan_payloads(
        &self,
        mut scans: Vec<(usize, String)>,
        segments: &mut [LoadedSegment],
    ) -> Result<(), BufferError> {
        let page = self.options.segment_page_size.max(1);
        let mut cursors: Vec<u64> = vec![0; scans.len()];
        while !scans.is_empty() {
            let mut batch = CommandBatch::new();
            for ((_, key), cursor) in scans.iter().zip(&cursors) {
                let mut sscan = redis::cmd("SSCAN");
                sscan.arg(key).arg(*cursor).arg("COUNT").arg(page);
                batch.add(key.clone(), sscan);
            }
            let replies = self.conn.execute(batch).await?;
            let mut next_scans = Vec::new();
            let mut next_cursors = Vec::new();
            for ((index, key), reply) in scans.into_iter().zip(replies) {
                let mut parts = into_array("SSCAN", reply)?.into_iter();
                let cursor: u64 = as_string("SSCAN", &parts.next().unwrap_or(Value::Nil))?
                    .parse()
                    .map_err(|_| BufferError::UnexpectedReply {
                        command: "SSCAN",
                        reply: "cursor".to_owned(),
                    })?;
                for member in into_array("SSCAN", parts.next().unwrap_or(Value::Nil))? {
                    let segment = &mut segments[index];
                    let decoded = decode_member_of(
                        &segment.candidate.segment_key,
                        as_bytes("SSCAN", member)?,
                        &mut segment.payloads,
                    );
                    segment.corrupt_members += u64::from(!decoded);
                }
                if cursor != 0 {
                    next_scans.push((index, key));
                    next_cursors.push(cursor);
                }
            }
            scans = next_scans;
            cursors = next_cursors;
        }
        Ok(())
    }
}

/// Appends the payloads of one stored member of `segment` to `out`. A member that looks like a
/// zstd frame but does not decompress is logged with its segment and counted, and adds
/// nothing: failing the whole flush instead would stop every segment of the worker's shards
/// at every retry. Returns whether the member decoded.
fn decode_member_of(segment: &SegmentKey, member: Vec<u8>, out: &mut Vec<Vec<u8>>) -> bool {
    let bytes = member.len();
    match codec::decode_member_into(member, out) {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(
                segment_key = %segment,
                bytes,
                error = ?error,
                "Dropping a stored payload member that does not decompress."
            );
            metrics::counter!(names::INVALID_PAYLOADS).increment(1);
            false
        }
    }
}
