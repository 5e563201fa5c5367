//! `BufferInspector`: a read-only look inside a live buffer, for `spans-pipeline inspect`.
//!
//! An operator whose Redis fills up or whose flush falls behind needs to see the queues, the
//! big segments and what is left behind, on a production server that the consumers keep
//! busy. So the inspector only reads (it never loads a script, never writes, never takes a
//! lock), and everything it does is bounded: keys are enumerated with `SCAN` and a `COUNT`
//! hint, never `KEYS`, on every master of a cluster in turn; each page is one pipelined round
//! trip of constant-time reads (`PTTL`, `GET`, `SCARD`); `MEMORY USAGE` runs on a sample of
//! each key family; queue entries and redirect fields are checked up to a limit; only the top
//! entries are kept in memory; and the whole run stops at a time limit. Whatever it had to
//! cut short is flagged in the report (`complete: false`) rather than silently extrapolated.
//!
//! It is a type of its own beside [`crate::buffer::SpansBufferStore`] rather than more
//! methods on it because the store loads the add-buffer script when it is built and is made
//! for the consumer's writes; the key shapes it reads come from [`crate::buffer::keys`], like
//! the store's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use redis::Value;
use serde::Serialize;

use crate::buffer::connection::{CommandBatch, RedisConnection};
use crate::buffer::error::BufferError;
use crate::buffer::keys::{self, KeyFamily, SegmentKey};
use crate::buffer::store::{as_optional_u64, as_string, info_field, into_array, queue_stats};

/// Steps of a redirect chain followed before giving up (the script's own limit).
const MAX_REDIRECT_STEPS: usize = 100;

/// How far an inspection may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectLimits {
    /// `COUNT` of each `SCAN`, `ZSCAN` and `HSCAN`: keys Redis looks at per call.
    pub scan_count: usize,
    /// Keys scanned per master at most.
    pub max_keys_per_node: u64,
    /// Keys per family measured with `MEMORY USAGE`, and redirect maps checked.
    pub samples: usize,
    /// Entries checked per queue, and fields per redirect map.
    pub max_entries: usize,
    /// Traces whose subsegments are counted (the rest are not ranked).
    pub max_traces: usize,
    /// Length of the top lists.
    pub top: usize,
    /// The whole inspection stops after this long.
    pub time_limit: Duration,
}

impl Default for InspectLimits {
    fn default() -> Self {
        Self {
            scan_count: 1000,
            max_keys_per_node: 10_000_000,
            samples: 100,
            max_entries: 10_000,
            max_traces: 100_000,
            top: 10,
            time_limit: Duration::from_secs(120),
        }
    }
}

/// Where an inspection is, for progress displays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InspectProgress {
    /// Keys scanned so far on all masters, and the keys the masters hold (`DBSIZE`, summed).
    Scanning {
        /// Keys scanned so far.
        scanned: u64,
        /// Keys on the masters.
        total: u64,
    },
    /// A later phase started: `"queues"` or `"redirects"`.
    Phase(&'static str),
}

/// What an inspection found. Counts are exact where `complete` is true; estimates
/// (`estimated_bytes`) are named as such.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InspectReport {
    /// The clock queues were read against (Unix seconds).
    pub now: i64,
    /// Whether every master was scanned to the end and every check ran within the limits.
    pub complete: bool,
    /// How long the inspection took.
    pub elapsed_ms: u64,
    /// Per master.
    pub nodes: Vec<NodeReport>,
    /// Per flush queue, by key.
    pub queues: Vec<QueueReport>,
    /// Per key family.
    pub families: Vec<FamilyReport>,
    /// Segments with an ingested count (`ic`), their spans and uncompressed bytes, summed.
    pub segments: SegmentTotals,
    /// The segments with the most spans.
    pub largest_by_spans: Vec<SegmentReport>,
    /// The segments with the most bytes.
    pub largest_by_bytes: Vec<SegmentReport>,
    /// The traces with the most subsegments (payload keys).
    pub hottest_traces: Vec<TraceReport>,
    /// Keys and entries that nothing will clean up as expected.
    pub leftovers: Leftovers,
}

/// One master.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    /// `host:port`, or the URL's host for a standalone server.
    pub address: String,
    /// `used_memory`.
    pub used_memory: u64,
    /// `maxmemory` (0: none).
    pub maxmemory: u64,
    /// `total_system_memory`.
    pub total_system_memory: u64,
    /// Keys on the server (`DBSIZE`), the buffer's and any other.
    pub keys: u64,
    /// Keys of the buffer scanned.
    pub buffer_keys: u64,
    /// Whether the scan reached its end.
    pub complete: bool,
}

/// One flush queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueReport {
    /// `span-buf:q:<partition>` or `span-buf:q:<slice>-<partition>`.
    pub key: String,
    /// Segments in it (`ZCARD`).
    pub depth: u64,
    /// Segments whose deadline is `now` or earlier.
    pub due: u64,
    /// The earliest deadline (Unix seconds).
    pub oldest_deadline: Option<i64>,
    /// How far `now` is past the earliest deadline (0 when it is not due yet): the flush lag.
    pub behind_secs: u64,
    /// Entries checked for data behind them.
    pub entries_checked: u64,
    /// Entries with no data behind them (no `ic`, `mk` or legacy set).
    pub entries_without_data: u64,
}

/// One key family.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FamilyReport {
    /// The family.
    pub family: KeyFamily,
    /// Keys found.
    pub keys: u64,
    /// Keys without a TTL.
    pub without_ttl: u64,
    /// Keys measured with `MEMORY USAGE`.
    pub sampled: u64,
    /// Their bytes, summed.
    pub sampled_bytes: u64,
    /// `keys` × the sample's mean: an estimate.
    pub estimated_bytes: u64,
}

impl FamilyReport {
    fn empty(family: KeyFamily) -> Self {
        Self {
            family,
            keys: 0,
            without_ttl: 0,
            sampled: 0,
            sampled_bytes: 0,
            estimated_bytes: 0,
        }
    }
}

/// Segment counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SegmentTotals {
    /// Segments with an `ic` key.
    pub segments: u64,
    /// Spans ingested (`ic`), summed.
    pub spans: u64,
    /// Uncompressed bytes ingested (`ibc`), summed.
    pub bytes: u64,
}

/// One segment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SegmentReport {
    /// The segment key.
    pub key: String,
    /// Spans ingested.
    pub spans: u64,
    /// Uncompressed bytes ingested.
    pub bytes: u64,
    /// Payload keys in its member-keys index.
    pub subsegments: u64,
}

/// One trace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TraceReport {
    /// Project id.
    pub project_id: String,
    /// Trace id.
    pub trace_id: String,
    /// Payload keys (subsegments) of the trace.
    pub subsegments: u64,
}

/// What is left behind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Leftovers {
    /// Keys without a TTL (they would never expire), all families.
    pub keys_without_ttl: u64,
    /// Some of them.
    pub keys_without_ttl_examples: Vec<String>,
    /// Queue entries checked, over every queue.
    pub queue_entries_checked: u64,
    /// Queue entries with no data behind them.
    pub queue_entries_without_data: u64,
    /// Some of them.
    pub queue_entries_examples: Vec<String>,
    /// Redirect maps checked (a sample).
    pub redirect_maps_checked: u64,
    /// Their fields checked.
    pub redirect_fields_checked: u64,
    /// Fields whose segment root has no data (no `ic`, `mk` or legacy set).
    pub redirect_fields_without_segment: u64,
    /// Some of them, as `map field`.
    pub redirect_fields_examples: Vec<String>,
    /// Traces not ranked because `max_traces` were counted already.
    pub traces_not_ranked: u64,
}

/// A read-only inspector of the buffer on one Redis (standalone or cluster).
#[derive(Debug)]
pub struct BufferInspector {
    conn: RedisConnection,
    limits: InspectLimits,
    standalone_address: String,
}

/// The running state of one inspection.
#[derive(Debug, Default)]
struct Gathered {
    families: BTreeMap<KeyFamily, FamilyReport>,
    queues: BTreeSet<String>,
    redirect_maps: Vec<String>,
    segments: SegmentTotals,
    by_spans: Vec<(u64, SegmentKey)>,
    by_bytes: Vec<(u64, SegmentKey)>,
    traces: HashMap<String, u64>,
    leftovers: Leftovers,
    scanned: u64,
    total_keys: u64,
}

impl BufferInspector {
    /// An inspector on `conn`; `standalone_address` names a standalone server in the report
    /// (a URL without credentials).
    pub fn new(conn: RedisConnection, limits: InspectLimits, standalone_address: String) -> Self {
        Self {
            conn,
            limits,
            standalone_address,
        }
    }

    /// Inspects the buffer, queues read against `now` (Unix seconds); `progress` is told how
    /// far it got after every page.
    ///
    /// # Errors
    ///
    /// A Redis failure, or a reply that is not what a read command answers.
    pub async fn inspect(
        &self,
        now: i64,
        progress: &mut dyn FnMut(InspectProgress),
    ) -> Result<InspectReport, BufferError> {
        let started = Instant::now();
        let deadline = started + self.limits.time_limit;
        let mut gathered = Gathered::default();
        let mut nodes = self.nodes().await?;
        gathered.total_keys = nodes.iter().map(|(_, node)| node.keys).sum();
        let mut complete = true;
        for (address, node) in &mut nodes {
            node.complete = self
                .scan_node(address.as_deref(), node, &mut gathered, deadline, progress)
                .await?;
            complete &= node.complete;
        }
        progress(InspectProgress::Phase("queues"));
        let (queues, queues_complete) = self
            .queues(&gathered.queues, now, deadline, &mut gathered.leftovers)
            .await?;
        progress(InspectProgress::Phase("redirects"));
        let redirects_complete = self.check_redirects(&mut gathered, deadline).await?;
        let mut leftovers = std::mem::take(&mut gathered.leftovers);
        for queue in &queues {
            leftovers.queue_entries_checked += queue.entries_checked;
            leftovers.queue_entries_without_data += queue.entries_without_data;
        }
        let largest_by_spans = self
            .describe(top(gathered.by_spans, self.limits.top))
            .await?;
        let largest_by_bytes = self
            .describe(top(gathered.by_bytes, self.limits.top))
            .await?;
        let mut hottest: Vec<(u64, String)> = gathered
            .traces
            .into_iter()
            .map(|(pt, count)| (count, pt))
            .collect();
        hottest.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        hottest.truncate(self.limits.top);
        Ok(InspectReport {
            now,
            complete: complete && queues_complete && redirects_complete,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            nodes: nodes.into_iter().map(|(_, node)| node).collect(),
            queues,
            families: finish_families(gathered.families),
            segments: gathered.segments,
            largest_by_spans,
            largest_by_bytes,
            hottest_traces: hottest
                .into_iter()
                .map(|(subsegments, pt)| {
                    let (project_id, trace_id) = pt.split_once(':').unwrap_or((&pt, ""));
                    TraceReport {
                        project_id: project_id.to_owned(),
                        trace_id: trace_id.to_owned(),
                        subsegments,
                    }
                })
                .collect(),
            leftovers,
        })
    }

    /// Every master with its memory and key count.
    async fn nodes(&self) -> Result<Vec<(Option<String>, NodeReport)>, BufferError> {
        let mut info = redis::cmd("INFO");
        info.arg("memory");
        let mut nodes = Vec::new();
        for (address, reply) in self.conn.on_each_master_by_address(info).await? {
            let text = as_string("INFO", &reply)?;
            let dbsize = self
                .conn
                .on_master(address.as_deref(), redis::cmd("DBSIZE"))
                .await?;
            let node = NodeReport {
                address: address
                    .clone()
                    .unwrap_or_else(|| self.standalone_address.clone()),
                used_memory: info_field(&text, "used_memory"),
                maxmemory: info_field(&text, "maxmemory"),
                total_system_memory: info_field(&text, "total_system_memory"),
                keys: as_optional_u64(dbsize)?.unwrap_or(0),
                buffer_keys: 0,
                complete: false,
            };
            nodes.push((address, node));
        }
        nodes.sort_by(|a, b| a.1.address.cmp(&b.1.address));
        Ok(nodes)
    }

    /// Scans one master; returns whether the scan reached its end.
    async fn scan_node(
        &self,
        address: Option<&str>,
        node: &mut NodeReport,
        gathered: &mut Gathered,
        deadline: Instant,
        progress: &mut dyn FnMut(InspectProgress),
    ) -> Result<bool, BufferError> {
        let mut cursor = 0_u64;
        loop {
            if Instant::now() >= deadline || node.buffer_keys >= self.limits.max_keys_per_node {
                return Ok(false);
            }
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", keys::PREFIX))
                .arg("COUNT")
                .arg(self.limits.scan_count);
            let mut reply = into_array("SCAN", self.conn.on_master(address, scan).await?)?;
            let page = reply
                .pop()
                .map_or(Ok(Vec::new()), |keys| into_array("SCAN", keys))?;
            let next = reply.pop().ok_or_else(|| BufferError::UnexpectedReply {
                command: "SCAN",
                reply: "no cursor".to_owned(),
            })?;
            let names = page
                .iter()
                .map(|key| as_string("SCAN", key))
                .collect::<Result<Vec<_>, _>>()?;
            node.buffer_keys += names.len() as u64;
            gathered.scanned += names.len() as u64;
            self.read_page(names, gathered).await?;
            progress(InspectProgress::Scanning {
                scanned: gathered.scanned,
                total: gathered.total_keys,
            });
            cursor = as_string("SCAN", &next)?
                .parse()
                .map_err(|_| BufferError::unexpected("SCAN", &next))?;
            if cursor == 0 {
                return Ok(true);
            }
        }
    }

    /// One round trip of reads for the keys of a scanned page.
    async fn read_page(
        &self,
        names: Vec<String>,
        gathered: &mut Gathered,
    ) -> Result<(), BufferError> {
        /// What a reply of the page's batch is about.
        enum Read {
            Ttl(KeyFamily, usize),
            Memory(KeyFamily),
            Count(SegmentKey),
            Bytes(SegmentKey),
        }
        let mut batch = CommandBatch::new();
        let mut reads = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let Some(family) = KeyFamily::of(name) else {
                continue;
            };
            let report = gathered
                .families
                .entry(family)
                .or_insert_with(|| FamilyReport::empty(family));
            report.keys += 1;
            let mut pttl = redis::cmd("PTTL");
            pttl.arg(name);
            batch.add(name.as_str(), pttl);
            reads.push(Read::Ttl(family, index));
            if report.sampled < self.limits.samples as u64 {
                report.sampled += 1;
                let mut usage = redis::cmd("MEMORY");
                usage.arg("USAGE").arg(name);
                batch.add(name.as_str(), usage);
                reads.push(Read::Memory(family));
            }
            match family {
                KeyFamily::IngestedCount | KeyFamily::IngestedBytes => {
                    if let Some(segment) = keys::segment_of_metadata(name) {
                        let mut get = redis::cmd("GET");
                        get.arg(name);
                        batch.add(name.as_str(), get);
                        reads.push(if family == KeyFamily::IngestedCount {
                            Read::Count(segment)
                        } else {
                            Read::Bytes(segment)
                        });
                    }
                }
                KeyFamily::Queue => {
                    gathered.queues.insert(name.clone());
                }
                KeyFamily::Redirect if gathered.redirect_maps.len() < self.limits.samples => {
                    gathered.redirect_maps.push(name.clone());
                }
                KeyFamily::Payload => {
                    if let Some(pt) = keys::trace_of(name) {
                        if let Some(count) = gathered.traces.get_mut(pt) {
                            *count += 1;
                        } else if gathered.traces.len() < self.limits.max_traces {
                            gathered.traces.insert(pt.to_owned(), 1);
                        } else {
                            gathered.leftovers.traces_not_ranked += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        let replies = self.conn.execute(batch).await?;
        let keep = self.limits.top.max(1) * 4;
        for (read, reply) in reads.into_iter().zip(replies) {
            match read {
                Read::Ttl(family, index) => {
                    if matches!(reply, Value::Int(-1)) {
                        if let Some(report) = gathered.families.get_mut(&family) {
                            report.without_ttl += 1;
                        }
                        let leftovers = &mut gathered.leftovers;
                        leftovers.keys_without_ttl += 1;
                        if leftovers.keys_without_ttl_examples.len() < self.limits.top {
                            leftovers
                                .keys_without_ttl_examples
                                .push(names[index].clone());
                        }
                    }
                }
                Read::Memory(family) => {
                    let bytes = as_optional_u64(reply)?.unwrap_or(0);
                    if let Some(report) = gathered.families.get_mut(&family) {
                        report.sampled_bytes += bytes;
                    }
                }
                Read::Count(segment) => {
                    let spans = as_optional_u64(reply)?.unwrap_or(0);
                    gathered.segments.segments += 1;
                    gathered.segments.spans += spans;
                    push_top(&mut gathered.by_spans, spans, segment, keep);
                }
                Read::Bytes(segment) => {
                    let bytes = as_optional_u64(reply)?.unwrap_or(0);
                    gathered.segments.bytes += bytes;
                    push_top(&mut gathered.by_bytes, bytes, segment, keep);
                }
            }
        }
        Ok(())
    }

    /// Depth, due segments, oldest deadline and entries without data of every queue; whether
    /// every entry was checked.
    async fn queues(
        &self,
        names: &BTreeSet<String>,
        now: i64,
        deadline: Instant,
        leftovers: &mut Leftovers,
    ) -> Result<(Vec<QueueReport>, bool), BufferError> {
        let stats = queue_stats(&self.conn, names.iter().map(String::as_str), now).await?;
        let mut queues = Vec::new();
        let mut complete = true;
        for (name, stats) in names.iter().zip(stats) {
            let oldest_deadline = stats.oldest_deadline;
            let mut queue = QueueReport {
                key: name.clone(),
                depth: stats.size,
                due: stats.due,
                oldest_deadline,
                behind_secs: oldest_deadline
                    .map_or(0, |oldest| u64::try_from(now - oldest).unwrap_or(0)),
                ..QueueReport::default()
            };
            let examples = &mut leftovers.queue_entries_examples;
            let mut found = |member: &str| {
                if examples.len() < self.limits.top {
                    examples.push(format!("{name} {member}"));
                }
            };
            complete &= self.check_queue(&mut queue, deadline, &mut found).await?;
            queues.push(queue);
        }
        Ok((queues, complete))
    }

    /// Checks the entries of `queue` for data behind them (`ZSCAN`, up to `max_entries`);
    /// `found` sees each entry without data. Returns whether every entry was checked.
    async fn check_queue(
        &self,
        queue: &mut QueueReport,
        deadline: Instant,
        found: &mut dyn FnMut(&str),
    ) -> Result<bool, BufferError> {
        let mut cursor = 0_u64;
        loop {
            if Instant::now() >= deadline || queue.entries_checked >= self.limits.max_entries as u64
            {
                return Ok(false);
            }
            let mut zscan = redis::cmd("ZSCAN");
            zscan
                .arg(&queue.key)
                .arg(cursor)
                .arg("COUNT")
                .arg(self.limits.scan_count);
            let (next, items) = self.scan_reply("ZSCAN", &queue.key, zscan).await?;
            let members: Vec<String> = items.iter().step_by(2).cloned().collect();
            queue.entries_checked += members.len() as u64;
            let segments: Vec<Option<SegmentKey>> = members
                .iter()
                .map(|m| SegmentKey::parse(m.as_str()))
                .collect();
            let present = self
                .have_data(segments.iter().flatten().cloned().collect())
                .await?;
            let mut present = present.into_iter();
            for (member, segment) in members.iter().zip(&segments) {
                let has_data = segment.is_some() && present.next().unwrap_or(true);
                if !has_data {
                    queue.entries_without_data += 1;
                    found(member);
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(true);
            }
        }
    }

    /// Whether each segment has data: an `ic`, an `mk` or a legacy payload set.
    async fn have_data(&self, segments: Vec<SegmentKey>) -> Result<Vec<bool>, BufferError> {
        let mut batch = CommandBatch::new();
        for segment in &segments {
            let mut exists = redis::cmd("EXISTS");
            exists
                .arg(keys::ingested_count(segment))
                .arg(keys::member_keys(segment))
                .arg(segment.as_str());
            batch.add(segment.as_str(), exists);
        }
        self.conn
            .execute(batch)
            .await?
            .into_iter()
            .map(|reply| Ok(as_optional_u64(reply)?.unwrap_or(0) > 0))
            .collect()
    }

    /// Checks the fields of the sampled redirect maps; returns whether every field of them
    /// was checked.
    async fn check_redirects(
        &self,
        gathered: &mut Gathered,
        deadline: Instant,
    ) -> Result<bool, BufferError> {
        let mut complete = true;
        for map in std::mem::take(&mut gathered.redirect_maps) {
            if Instant::now() >= deadline {
                return Ok(false);
            }
            let Some(pt) = keys::trace_of(&map).map(str::to_owned) else {
                continue;
            };
            let mut fields = HashMap::new();
            let mut cursor = 0_u64;
            loop {
                let mut hscan = redis::cmd("HSCAN");
                hscan
                    .arg(&map)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(self.limits.scan_count);
                let (next, items) = self.scan_reply("HSCAN", &map, hscan).await?;
                for pair in items.chunks(2) {
                    if let [field, root] = pair {
                        fields.insert(field.clone(), root.clone());
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
                if fields.len() >= self.limits.max_entries || Instant::now() >= deadline {
                    complete = false;
                    break;
                }
            }
            let roots: BTreeMap<&String, String> = fields
                .iter()
                .map(|(field, root)| (field, resolve(&fields, root)))
                .collect();
            let distinct: Vec<String> = roots
                .values()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let segments: Vec<SegmentKey> = distinct
                .iter()
                .map(|root| SegmentKey::new(&pt, root))
                .collect();
            let present: HashMap<&String, bool> = distinct
                .iter()
                .zip(self.have_data(segments).await?)
                .collect();
            let leftovers = &mut gathered.leftovers;
            leftovers.redirect_maps_checked += 1;
            leftovers.redirect_fields_checked += fields.len() as u64;
            for (field, root) in roots {
                if !present.get(&root).copied().unwrap_or(true) {
                    leftovers.redirect_fields_without_segment += 1;
                    if leftovers.redirect_fields_examples.len() < self.limits.top {
                        leftovers
                            .redirect_fields_examples
                            .push(format!("{map} {field}"));
                    }
                }
            }
        }
        Ok(complete)
    }

    /// Sends a `ZSCAN` or `HSCAN` of `key`; the next cursor and the flat items.
    async fn scan_reply(
        &self,
        command: &'static str,
        key: &str,
        cmd: redis::Cmd,
    ) -> Result<(u64, Vec<String>), BufferError> {
        let mut batch = CommandBatch::new();
        batch.add(key, cmd);
        let reply = self.conn.execute(batch).await?.pop().unwrap_or(Value::Nil);
        let mut parts = into_array(command, reply)?.into_iter();
        let (Some(next), Some(items)) = (parts.next(), parts.next()) else {
            return Err(BufferError::UnexpectedReply {
                command,
                reply: "no cursor and items".to_owned(),
            });
        };
        let next = as_string(command, &next)?
            .parse()
            .map_err(|_| BufferError::unexpected(command, &next))?;
        let items = into_array(command, items)?
            .iter()
            .map(|item| as_string(command, item))
            .collect::<Result<_, _>>()?;
        Ok((next, items))
    }

    /// Spans, bytes and subsegments of each of `segments`.
    async fn describe(&self, segments: Vec<SegmentKey>) -> Result<Vec<SegmentReport>, BufferError> {
        let mut batch = CommandBatch::new();
        for segment in &segments {
            let mut spans = redis::cmd("GET");
            spans.arg(keys::ingested_count(segment));
            batch.add(segment.as_str(), spans);
            let mut bytes = redis::cmd("GET");
            bytes.arg(keys::ingested_bytes(segment));
            batch.add(segment.as_str(), bytes);
            let mut subsegments = redis::cmd("SCARD");
            subsegments.arg(keys::member_keys(segment));
            batch.add(segment.as_str(), subsegments);
        }
        let mut replies = self.conn.execute(batch).await?.into_iter();
        let mut reports = Vec::new();
        for segment in segments {
            let mut next = || as_optional_u64(replies.next().unwrap_or(Value::Nil));
            reports.push(SegmentReport {
                key: segment.to_string(),
                spans: next()?.unwrap_or(0),
                bytes: next()?.unwrap_or(0),
                subsegments: next()?.unwrap_or(0),
            });
        }
        Ok(reports)
    }
}

/// Follows `root` through the redirect fields read (a root that was merged into a parent has
/// a field pointing on), as the script does.
fn resolve(fields: &HashMap<String, String>, root: &str) -> String {
    let mut current = root;
    for _ in 0..MAX_REDIRECT_STEPS {
        match fields.get(current) {
            Some(next) if next != current => current = next,
            _ => break,
        }
    }
    current.to_owned()
}

/// Keeps `candidates` short: the largest `keep` once it doubles.
fn push_top(candidates: &mut Vec<(u64, SegmentKey)>, value: u64, segment: SegmentKey, keep: usize) {
    candidates.push((value, segment));
    if candidates.len() >= keep * 2 {
        sort_top(candidates);
        candidates.truncate(keep);
    }
}

fn sort_top(candidates: &mut [(u64, SegmentKey)]) {
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
}

/// The `n` largest segments, largest first.
fn top(mut candidates: Vec<(u64, SegmentKey)>, n: usize) -> Vec<SegmentKey> {
    sort_top(&mut candidates);
    candidates
        .into_iter()
        .take(n)
        .map(|(_, segment)| segment)
        .collect()
}

/// Every family, with its estimate.
fn finish_families(mut found: BTreeMap<KeyFamily, FamilyReport>) -> Vec<FamilyReport> {
    KeyFamily::ALL
        .iter()
        .map(|family| {
            let mut report = found
                .remove(family)
                .unwrap_or_else(|| FamilyReport::empty(*family));
            report.estimated_bytes = if report.sampled == 0 {
                0
            } else {
                let mean = report.sampled_bytes as f64 / report.sampled as f64;
                (mean * report.keys as f64).round() as u64
            };
            report
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_chains_are_followed_to_their_root() {
        let fields: HashMap<String, String> = [("c", "b"), ("b", "a"), ("a", "a"), ("x", "y")]
            .into_iter()
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .collect();

        assert_eq!(resolve(&fields, "b"), "a");
        assert_eq!(resolve(&fields, "a"), "a");
        assert_eq!(resolve(&fields, "y"), "y");
    }

    #[test]
    fn the_top_list_keeps_the_largest() {
        let mut candidates = Vec::new();
        for value in 0..100 {
            push_top(
                &mut candidates,
                value,
                SegmentKey::new("1:a", &value.to_string()),
                3,
            );
        }

        let largest = top(candidates, 3);

        let ids: Vec<&str> = largest.iter().map(SegmentKey::segment_span_id).collect();
        assert_eq!(ids, ["99", "98", "97"]);
    }
}
