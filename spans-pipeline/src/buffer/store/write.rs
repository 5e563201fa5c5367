//! The write phase: a batch's subsegments encoded into payload writes and `add-buffer.lua`
//! calls ([`SpansBufferStore::prepare_write`], CPU only), then written: payloads first, scripts
//! once they are in, and in the legacy merged layout the sets merged after the scripts.

use std::collections::HashMap;
use std::sync::PoisonError;

use redis::{Cmd, Value};

use super::reply::{check_replies, is_error, is_noscript, parse_inserted};
use super::{SpansBufferStore, expire};
use crate::buffer::codec::PayloadEncoder;
use crate::buffer::connection::{CommandBatch, Pipelines};
use crate::buffer::error::BufferError;
use crate::buffer::keys::SegmentKey;
use crate::buffer::script;
use crate::buffer::segment::InsertedSubsegment;
use crate::buffer::subsegment::Subsegment;

/// Values per record in the script's reply.
const REPLY_FIELDS: usize = 6;

/// Most span ids in one script call when records (of one trace, or of several) share it.
const MAX_SPANS_PER_CALL: usize = 1000;

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
pub(super) struct PreparedSubsegment {
    pub(super) salt: String,
    pub(super) partition: u16,
    /// The segment it would join without redirects (legacy merged layout only).
    parent_segment_key: SegmentKey,
}

impl PreparedSubsegment {
    pub(super) fn of(subsegment: &Subsegment<'_>) -> Self {
        Self {
            salt: subsegment.salt.clone(),
            partition: subsegment.partition(),
            parent_segment_key: subsegment.parent_segment_key(),
        }
    }
}

/// Up to `pipeline-batch-size` subsegments: sent as one round trip.
///
/// Its commands are laid out as pipelines once, when the batch is prepared, and sent by
/// reference: a write retried after a failure copies none of the compressed payloads.
#[derive(Clone, Debug)]
struct PreparedChunk {
    /// `SADD` + `EXPIRE` per subsegment and layout.
    payloads: Pipelines,
    /// One `EVALSHA` per script call.
    scripts: Pipelines,
    /// Per script call (entry of `scripts`): the key that routes it, and the subsegments
    /// (indices) it carries.
    calls: Vec<(String, Vec<usize>)>,
}

impl SpansBufferStore {
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
            let mut payloads = CommandBatch::new();
            let mut scripts = CommandBatch::new();
            let calls = script_calls(
                chunk,
                self.options.max_spans_per_evalsha,
                !self.conn.is_cluster(),
            );
            let mut indices = Vec::with_capacity(calls.len());
            for call in calls {
                for &index in call.iter().flatten() {
                    self.add_payload_writes(&chunk[index], encoder, &mut payloads)?;
                }
                let key = chunk[call[0][0]].project_and_trace.clone();
                scripts.add(key.as_str(), self.add_buffer_call(chunk, &call));
                indices.push((
                    key,
                    call.iter().flatten().map(|index| first + index).collect(),
                ));
            }
            first += chunk.len();
            chunks.push(PreparedChunk {
                payloads: self.conn.pipelines(payloads),
                scripts: self.conn.pipelines(scripts),
                calls: indices,
            });
        }
        Ok(chunks)
    }

    /// The payload writes of a prepared batch (`SADD` + `EXPIRE` per subsegment).
    ///
    /// They touch only keys named by the batch's own salts, so they need no order with other
    /// batches' writes; only this batch's scripts must wait for them.
    pub async fn write_payloads(&self, prepared: &PreparedWrite) -> Result<(), BufferError> {
        for chunk in &prepared.chunks {
            let replies = self.conn.send(&chunk.payloads).await?;
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
            let mut replies = self.conn.send(&chunk.scripts).await?;
            self.retry_noscript(chunk, &mut replies).await?;
            for ((_, call), reply) in chunk.calls.iter().zip(&replies) {
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
        commands: &mut CommandBatch,
    ) -> Result<(), BufferError> {
        let members = encoder
            .encode(subsegment.spans.iter().map(|span| span.payload))
            .map_err(BufferError::Compress)?;
        let ttl = self.options.redis_ttl;
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
            commands.add(key.as_str(), sadd);
            commands.add(key, expire);
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
                .arg(self.options.redis_ttl.as_secs())
                .arg(subsegment.byte_count())
                .arg(self.options.max_segment_bytes)
                .arg(&subsegment.salt)
                .arg(bool_arg(self.locks_on()))
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
        // Rare, so the failed calls are copied into a batch of their own.
        let mut retry = CommandBatch::new();
        for &index in &failed {
            let cmd = chunk
                .scripts
                .command(index)
                .ok_or_else(|| BufferError::unexpected("EVALSHA", &replies[index]))?;
            retry.add(chunk.calls[index].0.as_str(), cmd.clone());
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
            batch.add(target, expire(target, self.options.redis_ttl));
        }
        check_replies("SUNIONSTORE", &self.conn.execute(batch).await?)
    }
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

#[cfg(test)]
mod tests {
    use super::super::fixtures::{span, subsegment};
    use super::*;
    use crate::span::Span;

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
}
