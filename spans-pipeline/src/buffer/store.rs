//! `SpansBufferStore`: the one place that talks to Redis.
//!
//! It owns every command and key of the buffer: payload writes, the add-buffer script, queue
//! deadlines, flush candidates, flush locks, loading segments and cleanup. Each phase is one
//! round trip across all subsegments or segments (split per slot and sent concurrently on a
//! cluster), because round trips, not Redis CPU, bound a serial consumer. The buffer above it
//! holds the decisions; the store only maps them to commands and replies back to values.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use redis::{Cmd, Value};

use crate::buffer::codec::{self, PayloadEncoder};
use crate::buffer::connection::{CommandBatch, RedisConnection};
use crate::buffer::error::BufferError;
use crate::buffer::keys::{self, SegmentKey};
use crate::buffer::options::BufferOptions;
use crate::buffer::parallel;
use crate::buffer::script;
use crate::buffer::segment::{
    FlushCandidate, FlushedSegment, IngestMetadata, InsertedSubsegment, LoadedSegment, ScriptSample,
};
use crate::buffer::subsegment::Subsegment;
use crate::metrics as names;

/// The queue changes of one batch for one queue.
struct QueueUpdate {
    queue: String,
    /// Deadline per segment, in first-seen order.
    adds: Vec<(SegmentKey, i64)>,
    /// Entries of segments merged away.
    removes: Vec<SegmentKey>,
}

/// Values per record in the script's reply.
const REPLY_FIELDS: usize = 6;

/// Most span ids in one script call when records (of one trace, or of several) share it.
const MAX_SPANS_PER_CALL: usize = 1000;

/// Compressed bytes per thread below which a load decompresses on the calling thread alone.
const COMPRESSED_BYTES_PER_DECODE_THREAD: usize = 256 * 1024;

/// Payload keys per `UNLINK` in cleanup (standalone; a cluster needs one per key).
const CLEANUP_KEYS_PER_UNLINK: usize = 1000;

/// Span ids per `HDEL` and members per `ZREM` in cleanup.
const CLEANUP_CHUNK: usize = 100;

/// Redis access of the spans buffer.
#[derive(Debug)]
pub struct SpansBufferStore {
    conn: RedisConnection,
    options: BufferOptions,
    /// Compressors for concurrent [`SpansBufferStore::prepare_write`] calls, reused.
    encoders: Mutex<Vec<PayloadEncoder>>,
}

/// A batch's subsegments turned into commands (payload writes, then script calls) with what
/// is needed to read the replies.
///
/// It owns everything, so the next batch can be prepared while this one is written, and it
/// can be written again after a failure: the payload keys are named by the salts, so a second
/// write adds nothing new.
#[derive(Clone, Debug)]
pub struct PreparedWrite {
    subsegments: Vec<PreparedSubsegment>,
    chunks: Vec<PreparedChunk>,
}

impl PreparedWrite {
    /// Subsegments in the batch.
    pub fn len(&self) -> usize {
        self.subsegments.len()
    }

    /// Whether the batch had no spans.
    pub fn is_empty(&self) -> bool {
        self.subsegments.is_empty()
    }
}

/// What the replies of one subsegment are read against.
#[derive(Clone, Debug)]
struct PreparedSubsegment {
    salt: String,
    partition: u16,
    /// The segment it would join without redirects (legacy merged layout only).
    parent_segment_key: SegmentKey,
}

impl PreparedSubsegment {
    fn of(subsegment: &Subsegment<'_>) -> Self {
        Self {
            salt: subsegment.salt.clone(),
            partition: subsegment.partition(),
            parent_segment_key: subsegment.parent_segment_key(),
        }
    }
}

/// Up to `pipeline-batch-size` subsegments: sent as one round trip.
#[derive(Clone, Debug)]
struct PreparedChunk {
    payloads: Vec<(String, Cmd)>,
    /// One command per script call, with the subsegments (indices) it carries.
    scripts: Vec<(String, Cmd, Vec<usize>)>,
}

impl SpansBufferStore {
    /// A store on `conn`; loads the add-buffer script on every master.
    pub async fn new(conn: RedisConnection, options: BufferOptions) -> Result<Self, BufferError> {
        options.validate()?;
        let encoder =
            PayloadEncoder::new(options.compression_level).map_err(BufferError::Compress)?;
        let store = Self {
            conn,
            options,
            encoders: Mutex::new(vec![encoder]),
        };
        store.load_script().await?;
        Ok(store)
    }

    /// The connection (for callers that inspect Redis, such as the replay tool).
    pub fn connection(&self) -> &RedisConnection {
        &self.conn
    }

    /// The options the store writes with.
    pub fn options(&self) -> &BufferOptions {
        &self.options
    }

    /// `SCRIPT LOAD` of add-buffer.lua on every master.
    pub async fn load_script(&self) -> Result<(), BufferError> {
        let mut cmd = redis::cmd("SCRIPT");
        cmd.arg("LOAD").arg(script::ADD_BUFFER_SOURCE);
        self.conn.on_all_masters(cmd).await?;
        Ok(())
    }

    /// Encodes subsegments into their commands: compression, payload writes and script calls,
    /// cut into round trips of `chunk_len` subsegments. Pure CPU work, no Redis.
    pub fn prepare_write(
        &self,
        subsegments: &[Subsegment<'_>],
        chunk_len: usize,
    ) -> Result<PreparedWrite, BufferError> {
        let mut encoder = self.take_encoder()?;
        let result = self.encode_chunks(subsegments, chunk_len.max(1), &mut encoder);
        self.encoders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(encoder);
        let chunks = result?;
        Ok(PreparedWrite {
            subsegments: subsegments.iter().map(PreparedSubsegment::of).collect(),
            chunks,
        })
    }

    fn take_encoder(&self) -> Result<PayloadEncoder, BufferError> {
        let reused = self
            .encoders
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match reused {
            Some(encoder) => Ok(encoder),
            None => {
                PayloadEncoder::new(self.options.compression_level).map_err(BufferError::Compress)
            }
        }
    }

    fn encode_chunks(
        &self,
        subsegments: &[Subsegment<'_>],
        chunk_len: usize,
        encoder: &mut PayloadEncoder,
    ) -> Result<Vec<PreparedChunk>, BufferError> {
        let mut chunks = Vec::new();
        let mut first = 0;
        for chunk in subsegments.chunks(chunk_len) {
            let mut prepared = PreparedChunk {
                payloads: Vec::with_capacity(chunk.len() * 2),
                scripts: Vec::new(),
            };
            let calls = script_calls(
                chunk,
                self.options.max_spans_per_evalsha,
                !self.conn.is_cluster(),
            );
            for call in calls {
                for &index in call.iter().flatten() {
                    self.add_payload_writes(&chunk[index], encoder, &mut prepared.payloads)?;
                }
                let cmd = self.add_buffer_call(chunk, &call);
                let indices = call.iter().flatten().map(|index| first + index).collect();
                prepared
                    .scripts
                    .push((chunk[call[0][0]].project_and_trace.clone(), cmd, indices));
            }
            first += chunk.len();
            chunks.push(prepared);
        }
        Ok(chunks)
    }

    /// The payload writes of a prepared batch (`SADD` + `EXPIRE` per subsegment).
    ///
    /// They touch only keys named by the batch's own salts, so they need no order with other
    /// batches' writes; only this batch's scripts must wait for them.
    pub async fn write_payloads(&self, prepared: &PreparedWrite) -> Result<(), BufferError> {
        for chunk in &prepared.chunks {
            let mut payloads = CommandBatch::new();
            for (key, cmd) in &chunk.payloads {
                payloads.add(key.as_str(), cmd.clone());
            }
            let replies = self.conn.execute(payloads).await?;
            if let Some(error) = replies.iter().find(|v| is_error(v)) {
                return Err(BufferError::unexpected("SADD", error));
            }
        }
        Ok(())
    }

    /// The script calls of a prepared batch whose payloads are written; returns where each
    /// subsegment went, in order.
    pub async fn write_scripts(
        &self,
        prepared: &PreparedWrite,
    ) -> Result<Vec<InsertedSubsegment>, BufferError> {
        let mut inserted: Vec<Option<InsertedSubsegment>> = vec![None; prepared.len()];
        for chunk in &prepared.chunks {
            let mut scripts = CommandBatch::new();
            for (key, cmd, _) in &chunk.scripts {
                scripts.add(key.as_str(), cmd.clone());
            }
            let mut replies = self.conn.execute(scripts).await?;
            self.retry_noscript(chunk, &mut replies).await?;
            for ((_, _, call), reply) in chunk.scripts.iter().zip(&replies) {
                let Value::Array(items) = reply else {
                    return Err(BufferError::unexpected("EVALSHA", reply));
                };
                if items.len() != call.len() * REPLY_FIELDS {
                    return Err(BufferError::unexpected("EVALSHA", reply));
                }
                for (&index, fields) in call.iter().zip(items.chunks(REPLY_FIELDS)) {
                    inserted[index] = Some(parse_inserted(&prepared.subsegments[index], fields)?);
                }
            }
        }
        let inserted: Vec<InsertedSubsegment> = inserted.into_iter().flatten().collect();
        if self.options.write_merged_payloads {
            self.merge_legacy_sets(prepared, &inserted).await?;
        }
        Ok(inserted)
    }

    /// `SADD` + `EXPIRE` of a subsegment's payloads, in every layout being written.
    fn add_payload_writes(
        &self,
        subsegment: &Subsegment<'_>,
        encoder: &mut PayloadEncoder,
        commands: &mut Vec<(String, Cmd)>,
    ) -> Result<(), BufferError> {
        let members = encoder
            .encode(subsegment.spans.iter().map(|span| span.payload))
            .map_err(BufferError::Compress)?;
        let ttl = self.options.redis_ttl_secs;
        let mut targets = Vec::with_capacity(2);
        if self.options.write_distributed_payloads {
            targets.push(subsegment.payload_key());
        }
        if self.options.write_merged_payloads {
            targets.push(subsegment.parent_segment_key().as_str().to_owned());
        }
        for key in targets {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(&key).arg(&members);
            let expire = expire(&key, ttl);
            commands.push((key.clone(), sadd));
            commands.push((key, expire));
        }
        Ok(())
    }

    /// `EVALSHA add-buffer.lua <traces> <pt>...`, then (for several traces) each trace's
    /// record count, then one 9-field record (plus span ids) per subsegment, grouped by trace.
    fn add_buffer_call(&self, subsegments: &[Subsegment<'_>], call: &ScriptCall) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script::add_buffer().get_hash()).arg(call.len());
        for group in call {
            cmd.arg(&subsegments[group[0]].project_and_trace);
        }
        if call.len() > 1 {
            for group in call {
                cmd.arg(group.len());
            }
        }
        for &index in call.iter().flatten() {
            let subsegment = &subsegments[index];
            cmd.arg(subsegment.spans.len())
                .arg(&subsegment.parent_span_id)
                .arg(bool_arg(subsegment.has_segment_span()))
                .arg(self.options.redis_ttl_secs)
                .arg(subsegment.byte_count())
                .arg(self.options.max_segment_bytes)
                .arg(&subsegment.salt)
                .arg(bool_arg(self.options.flush_lock_ttl_secs > 0))
                .arg(self.options.metrics_sample_rate);
            for span_id in subsegment.span_ids() {
                cmd.arg(span_id);
            }
        }
        cmd
    }

    /// Re-runs the script calls that failed with `NOSCRIPT` (they did not run) after loading
    /// the script again.
    async fn retry_noscript(
        &self,
        chunk: &PreparedChunk,
        replies: &mut [Value],
    ) -> Result<(), BufferError> {
        let failed: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, reply)| is_noscript(reply))
            .map(|(index, _)| index)
            .collect();
        if failed.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            calls = failed.len(),
            "Reloading add-buffer.lua after NOSCRIPT."
        );
        self.load_script().await?;
        let mut retry = CommandBatch::new();
        for &index in &failed {
            let (key, cmd, _) = &chunk.scripts[index];
            retry.add(key.as_str(), cmd.clone());
        }
        for (index, reply) in failed.into_iter().zip(self.conn.execute(retry).await?) {
            replies[index] = reply;
        }
        Ok(())
    }

    /// Legacy merged layout: move payloads written under the batch-local parent, and the sets
    /// of merged child segments, into the set of the segment the script chose.
    async fn merge_legacy_sets(
        &self,
        prepared: &PreparedWrite,
        inserted: &[InsertedSubsegment],
    ) -> Result<(), BufferError> {
        let mut batch = CommandBatch::new();
        for (subsegment, result) in prepared.subsegments.iter().zip(inserted) {
            if result.is_detached() {
                continue;
            }
            let target = result.segment_key.as_str();
            let pt = result.segment_key.project_and_trace();
            let mut sources: Vec<String> = Vec::new();
            let parent = &subsegment.parent_segment_key;
            if *parent != result.segment_key {
                sources.push(parent.as_str().to_owned());
            }
            for child in &result.merged_segment_span_ids {
                sources.push(SegmentKey::new(pt, child).as_str().to_owned());
            }
            if sources.is_empty() {
                continue;
            }
            let mut union = redis::cmd("SUNIONSTORE");
            union.arg(target).arg(target).arg(&sources);
            batch.add(target, union);
            let mut del = redis::cmd("DEL");
            del.arg(&sources);
            batch.add(target, del);
            batch.add(target, expire(target, self.options.redis_ttl_secs));
        }
        check_replies("SUNIONSTORE", &self.conn.execute(batch).await?)
    }

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
                self.options.root_timeout_secs
            } else {
                self.options.timeout_secs
            };
            let deadline = now + i64::try_from(timeout).unwrap_or(i64::MAX / 2);
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
            batch.add(queue.clone(), expire(&queue, self.options.redis_ttl_secs));
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

    /// Segments whose deadline is at or before `now`, oldest first, at most `limit` per queue.
    /// Returns one list per queue, in the order of `queues` (`(shard, queue key)`).
    pub async fn load_flush_candidates(
        &self,
        queues: &[(u16, String)],
        now: i64,
        limit: usize,
    ) -> Result<Vec<Vec<FlushCandidate>>, BufferError> {
        let mut batch = CommandBatch::new();
        for (_, queue) in queues {
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
        for ((shard, queue), reply) in queues.iter().zip(replies) {
            let mut candidates = Vec::new();
            for pair in into_array("ZRANGEBYSCORE", reply)?.chunks(2) {
                let member = as_bytes("ZRANGEBYSCORE", pair[0].clone())?;
                let score = pair.get(1).map_or(Ok(0.0), as_f64)?;
                match std::str::from_utf8(&member)
                    .ok()
                    .and_then(SegmentKey::parse)
                {
                    Some(segment_key) => candidates.push(FlushCandidate {
                        shard: *shard,
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
    /// ([`script::ACQUIRE_FLUSH_LOCK`], which Redis runs even at `maxmemory`); returns the
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
    /// segment's token ([`script::EXTEND_FLUSH_LOCK`]); returns, per segment, whether it does.
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

    fn locks_on(&self) -> bool {
        self.options.flush_lock_ttl_secs > 0
    }

    /// `EVAL <script> 1 <lock> <token> <ttl ms>`.
    fn lock_call(&self, script: &str, lock: String, token: &str) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(script)
            .arg(1)
            .arg(lock)
            .arg(token)
            .arg(self.options.flush_lock_ttl_secs.saturating_mul(1000));
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

    /// Memory of the buffer's Redis, summed over every master (`INFO memory`): what is used,
    /// and what is available — each server's `maxmemory`, or its machine's memory where no
    /// limit is set.
    pub async fn memory_usage(&self) -> Result<MemoryUsage, BufferError> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let mut usage = MemoryUsage::default();
        for reply in self.conn.on_each_master(info).await? {
            let text: String = redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
            let field = |name: &str| info_field(&text, name);
            usage.used_bytes += field("used_memory");
            usage.available_bytes += match field("maxmemory") {
                0 => field("total_system_memory"),
                limit => limit,
            };
        }
        Ok(usage)
    }

    /// Number of segments in each queue (`ZCARD`), for the stored-segments gauge.
    pub async fn queue_sizes(&self, queues: &[String]) -> Result<Vec<u64>, BufferError> {
        let mut batch = CommandBatch::new();
        for queue in queues {
            let mut zcard = redis::cmd("ZCARD");
            zcard.arg(queue);
            batch.add(queue.clone(), zcard);
        }
        self.conn
            .execute(batch)
            .await?
            .into_iter()
            .map(|v| as_optional_u64(v).map(Option::unwrap_or_default))
            .collect()
    }
}

impl SpansBufferStore {
    /// The earliest deadline in each queue (`ZRANGE 0 0 WITHSCORES`), `None` for an empty one,
    /// for the flush-lag gauge.
    pub async fn oldest_deadlines(
        &self,
        queues: &[String],
    ) -> Result<Vec<Option<i64>>, BufferError> {
        let mut batch = CommandBatch::new();
        for queue in queues {
            let mut oldest = redis::cmd("ZRANGE");
            oldest.arg(queue).arg(0).arg(0).arg("WITHSCORES");
            batch.add(queue.clone(), oldest);
        }
        self.conn
            .execute(batch)
            .await?
            .into_iter()
            .map(first_score)
            .collect()
    }
}

/// The score of a `ZRANGE … WITHSCORES` reply's first entry; `None` when it is empty.
pub(crate) fn first_score(reply: Value) -> Result<Option<i64>, BufferError> {
    match into_array("ZRANGE", reply)?.get(1) {
        Some(score) => Ok(Some(as_f64(score)? as i64)),
        None => Ok(None),
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

/// One script call: the subsegment indices of each trace it carries (one group per key), in
/// batch order within a trace.
type ScriptCall = Vec<Vec<usize>>;

/// Cuts a batch's subsegments into script calls. With `max-spans-per-evalsha` set, every
/// subsegment gets its own call, as in Sentry, so no call holds a shard longer than that
/// option allows. Otherwise a trace's records share a call (at most [`MAX_SPANS_PER_CALL`]
/// spans), and with `several_traces` (a standalone server, where keys need not share a slot)
/// the traces of a batch share calls too, up to the same number of spans.
fn script_calls(
    subsegments: &[Subsegment<'_>],
    max_spans_per_evalsha: usize,
    several_traces: bool,
) -> Vec<ScriptCall> {
    if max_spans_per_evalsha > 0 {
        return (0..subsegments.len())
            .map(|index| vec![vec![index]])
            .collect();
    }
    // Per trace, in first-seen order: groups of records up to the span limit.
    let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
    let mut open_group: HashMap<&str, usize> = HashMap::new();
    for (index, subsegment) in subsegments.iter().enumerate() {
        let spans = subsegment.spans.len();
        let trace = subsegment.project_and_trace.as_str();
        match open_group.get(trace) {
            Some(&group) if groups[group].1 + spans <= MAX_SPANS_PER_CALL => {
                groups[group].0.push(index);
                groups[group].1 += spans;
            }
            _ => {
                open_group.insert(trace, groups.len());
                groups.push((vec![index], spans));
            }
        }
    }
    if !several_traces {
        return groups.into_iter().map(|(group, _)| vec![group]).collect();
    }
    // Groups packed into calls in order, so a trace's second group runs after its first.
    let mut calls: Vec<(ScriptCall, usize)> = Vec::new();
    for (group, spans) in groups {
        match calls.last_mut() {
            Some((call, call_spans)) if *call_spans + spans <= MAX_SPANS_PER_CALL => {
                call.push(group);
                *call_spans += spans;
            }
            _ => calls.push((vec![group], spans)),
        }
    }
    calls.into_iter().map(|(call, _)| call).collect()
}

fn bool_arg(value: bool) -> &'static str {
    if value { "true" } else { "false" }
}

fn expire(key: &str, ttl: u64) -> Cmd {
    let mut cmd = redis::cmd("EXPIRE");
    cmd.arg(key).arg(ttl);
    cmd
}

fn is_error(value: &Value) -> bool {
    matches!(value, Value::ServerError(_))
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.code() == "NOSCRIPT")
}

fn check_replies(command: &'static str, replies: &[Value]) -> Result<(), BufferError> {
    match replies.iter().find(|v| is_error(v)) {
        Some(error) => Err(BufferError::unexpected(command, error)),
        None => Ok(()),
    }
}

/// Errors inside the replies of spread commands (arrays of the replies of their parts).
fn check_spread_replies(command: &'static str, replies: &[Value]) -> Result<(), BufferError> {
    for reply in replies {
        if let Value::Array(parts) = reply {
            check_replies(command, parts)?;
        }
    }
    Ok(())
}

pub(crate) fn into_array(command: &'static str, value: Value) -> Result<Vec<Value>, BufferError> {
    match value {
        Value::Array(items) | Value::Set(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(BufferError::unexpected(command, &other)),
    }
}

fn as_bytes(command: &'static str, value: Value) -> Result<Vec<u8>, BufferError> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        other => Err(BufferError::unexpected(command, &other)),
    }
}

pub(crate) fn as_string(command: &'static str, value: &Value) -> Result<String, BufferError> {
    match value {
        Value::BulkString(bytes) => {
            String::from_utf8(bytes.clone()).map_err(|_| BufferError::unexpected(command, value))
        }
        Value::SimpleString(text) => Ok(text.clone()),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(BufferError::unexpected(command, other)),
    }
}

pub(crate) fn as_f64(value: &Value) -> Result<f64, BufferError> {
    match value {
        Value::Double(d) => Ok(*d),
        Value::Int(n) => Ok(*n as f64),
        other => as_string("score", other)?
            .parse()
            .map_err(|_| BufferError::unexpected("score", other)),
    }
}

pub(crate) fn as_optional_u64(value: Value) -> Result<Option<u64>, BufferError> {
    match value {
        Value::Nil => Ok(None),
        Value::Int(n) => Ok(Some(u64::try_from(n).unwrap_or(0))),
        other => as_string("GET", &other)?
            .parse::<i64>()
            .map(|n| Some(u64::try_from(n).unwrap_or(0)))
            .map_err(|_| BufferError::unexpected("GET", &other)),
    }
}

pub(crate) fn as_i64(value: &Value) -> Result<i64, BufferError> {
    match value {
        Value::Int(n) => Ok(*n),
        other => as_string("EVALSHA", other)?
            .parse()
            .map_err(|_| BufferError::unexpected("EVALSHA", other)),
    }
}

fn flat_pairs(value: Value) -> Result<Vec<(String, i64)>, BufferError> {
    into_array("EVALSHA", value)?
        .chunks(2)
        .map(|pair| {
            let name = as_string("EVALSHA", &pair[0])?;
            let value = pair.get(1).map_or(Ok(0), as_i64)?;
            Ok((name, value))
        })
        .collect()
}

/// Maps one record of the script's reply `{segment_key, has_root_span, latency_us,
/// latencies, metrics, merged_segment_span_ids}`.
fn parse_inserted(
    subsegment: &PreparedSubsegment,
    fields: &[Value],
) -> Result<InsertedSubsegment, BufferError> {
    let mut items = fields.iter().cloned();
    let mut next = || items.next().unwrap_or(Value::Nil);
    let key = as_string("EVALSHA", &next())?;
    let segment_key = SegmentKey::parse(key.clone()).ok_or(BufferError::UnexpectedReply {
        command: "EVALSHA",
        reply: key,
    })?;
    let has_root_span = matches!(next(), Value::Int(1));
    let latency_us = match next() {
        Value::Nil => -1,
        value => as_i64(&value)?,
    };
    let latencies = flat_pairs(next())?;
    let metrics = flat_pairs(next())?;
    let merged_segment_span_ids = into_array("EVALSHA", next())?
        .iter()
        .map(|id| as_string("EVALSHA", id))
        .collect::<Result<_, _>>()?;
    let sampled = (latency_us >= 0 || !metrics.is_empty()).then(|| ScriptSample {
        latency_us: u64::try_from(latency_us).unwrap_or(0),
        latencies,
        metrics,
    });
    Ok(InsertedSubsegment {
        segment_key,
        has_root_span,
        salt: subsegment.salt.clone(),
        partition: subsegment.partition,
        merged_segment_span_ids,
        sampled,
    })
}

/// The number `name` of an `INFO` reply's text; 0 when it is missing.
pub(crate) fn info_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().parse::<u64>().ok())
        .unwrap_or(0)
}

/// Memory of the buffer's Redis servers, summed, from [`SpansBufferStore::memory_usage`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Bytes in use (`used_memory`).
    pub used_bytes: u64,
    /// Bytes the servers may use.
    pub available_bytes: u64,
}

impl MemoryUsage {
    /// Used over available; 0 when nothing is known to be available.
    pub fn ratio(&self) -> f64 {
        if self.available_bytes == 0 {
            0.0
        } else {
            self.used_bytes as f64 / self.available_bytes as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Span;

    fn span(trace: &'static str, id: &'static str) -> Span<'static> {
        Span {
            trace_id: trace.into(),
            span_id: id.into(),
            parent_span_id: Some("p".into()),
            segment_id: None,
            project_id: 1,
            organization_id: 1,
            is_segment_span: false,
            partition: 3,
            payload: b"{}",
        }
    }

    fn subsegment<'a>(spans: &'a [Span<'a>], salt: &str) -> Subsegment<'a> {
        Subsegment {
            project_and_trace: spans[0].project_and_trace(),
            parent_span_id: "p".to_owned(),
            spans: spans.iter().collect(),
            salt: salt.to_owned(),
        }
    }

    #[test]
    fn groups_records_by_trace_into_calls_unless_calls_are_bounded() {
        let a = [span("t1", "a")];
        let b = [span("t2", "b")];
        let c = [span("t1", "c"), span("t1", "d")];
        let subsegments = [
            subsegment(&a, "s1"),
            subsegment(&b, "s2"),
            subsegment(&c, "s3"),
        ];
        // A cluster: one trace per call. A standalone server: traces share a call, each
        // trace's records one group, in batch order.
        assert_eq!(
            script_calls(&subsegments, 0, false),
            [vec![vec![0, 2]], vec![vec![1]]]
        );
        assert_eq!(
            script_calls(&subsegments, 0, true),
            [vec![vec![0, 2], vec![1]]]
        );
        for several_traces in [false, true] {
            assert_eq!(
                script_calls(&subsegments, 1, several_traces),
                [vec![vec![0]], vec![vec![1]], vec![vec![2]]]
            );
        }
    }

    #[test]
    fn a_call_holds_at_most_the_span_limit() {
        let many: Vec<Span<'static>> = (0..MAX_SPANS_PER_CALL).map(|_| span("t", "x")).collect();
        let one = [span("t", "y")];
        let subsegments = [subsegment(&many, "s1"), subsegment(&one, "s2")];
        for several_traces in [false, true] {
            assert_eq!(
                script_calls(&subsegments, 0, several_traces),
                [vec![vec![0]], vec![vec![1]]]
            );
        }
    }

    #[test]
    fn ingest_metadata_maps_counters_or_their_absence() {
        assert_eq!(
            as_optional_u64(Value::BulkString(b"3".to_vec())).unwrap(),
            Some(3)
        );
        assert_eq!(
            as_optional_u64(Value::BulkString(b"42".to_vec())).unwrap(),
            Some(42)
        );
        assert_eq!(as_optional_u64(Value::Nil).unwrap(), None);
        assert!(as_optional_u64(Value::BulkString(b"x".to_vec())).is_err());
    }

    #[test]
    fn maps_a_script_record_into_an_inserted_subsegment() {
        let spans = [span("t", "a")];
        let subsegment = subsegment(&spans, "salt");
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        let sampled = [
            bulk("span-buf:s:{1:t}:root"),
            Value::Int(1),
            Value::Int(12),
            Value::Array(vec![bulk("total_step_latency_us"), Value::Int(12)]),
            Value::Array(vec![bulk("redirect_depth"), Value::Int(2)]),
            Value::Array(vec![bulk("child")]),
        ];
        let inserted = parse_inserted(&PreparedSubsegment::of(&subsegment), &sampled).unwrap();
        assert_eq!(inserted.segment_key.as_str(), "span-buf:s:{1:t}:root");
        assert!(inserted.has_root_span);
        assert_eq!(inserted.partition, 3);
        assert_eq!(inserted.merged_segment_span_ids, ["child"]);
        let sample = inserted.sampled.unwrap();
        assert_eq!(sample.latency_us, 12);
        assert_eq!(sample.metric("redirect_depth"), Some(2));

        let unsampled = [
            bulk("span-buf:s:{1:t}:salt"),
            Value::Nil,
            Value::Int(-1),
            Value::Array(vec![]),
            Value::Array(vec![]),
            Value::Array(vec![]),
        ];
        let inserted = parse_inserted(&PreparedSubsegment::of(&subsegment), &unsampled).unwrap();
        assert!(!inserted.has_root_span);
        assert!(inserted.is_detached());
        assert!(inserted.sampled.is_none());
        assert!(
            parse_inserted(&PreparedSubsegment::of(&subsegment), &[bulk("not a key")]).is_err()
        );
    }
}
