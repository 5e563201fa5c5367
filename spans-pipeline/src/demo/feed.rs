//! Feeds the demo's load to the input topic on workload time.
//!
//! Each message's Kafka timestamp is its span's `received` time, so the consumer's flush clock
//! follows the workload (as in production, where the broker stamps each message when it
//! arrives), while the feeder paces the messages at the demo's rate, faster than they
//! happened. The producer stays within reach of what the consumer has read, because
//! librdkafka's mock broker keeps only about 5 MB of each partition and would drop what the
//! consumer has not read yet. (Bounding it by the group's commits instead would pace the feed
//! at one lag window per commit interval, not at the consumer's speed.) Once everything is
//! committed, one more span stamped past the longest flush timeout
//! (the clock tick) moves workload time on, as later traffic would, so every segment comes due.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

use super::DemoError;
use crate::workload::{GeneratedSpan, partition_of};

/// Every this many spans, one malformed message is produced too.
const MALFORMED_EVERY: usize = 10_000;
/// Most messages produced but not yet read by the consumer, per partition: about 2.5 MB of
/// payload, half of what the mock broker keeps of a partition.
const MAX_LAG_PER_PARTITION: u64 = 2_500;
/// The feeder sleeps when it is this far ahead of its schedule, not before.
const PACING_GRAIN: Duration = Duration::from_millis(1);
/// The longest the consumer may take to read or commit more, before the demo gives up.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Produces to the demo's input topic.
pub(super) struct Feeder {
    producer: BaseProducer,
    commits: CommitWatcher,
    topic: &'static str,
    partitions: i32,
    produced: u64,
}

/// What [`Feeder::feed`] produced.
pub(super) struct Fed {
    /// Malformed messages mixed in.
    pub(super) malformed: usize,
    /// When the first message was produced.
    pub(super) started: Instant,
}

impl Feeder {
    /// A feeder of `topic` (with `partitions`) whose consumer group is `group`.
    pub(super) fn new(
        bootstrap: &str,
        topic: &'static str,
        partitions: i32,
        group: &str,
    ) -> Result<Self, DemoError> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "5")
            .create()?;
        Ok(Self {
            producer,
            commits: CommitWatcher::new(bootstrap, topic, partitions, group)?,
            topic,
            partitions: partitions.max(1),
            produced: 0,
        })
    }

    /// Produces `load` at `rate` messages a second (each stamped with its `received` time),
    /// with a malformed message every [`MALFORMED_EVERY`] spans, never more than the lag
    /// window ahead of `read`: the messages the consumer has read so far.
    pub(super) fn feed(
        &mut self,
        load: &[GeneratedSpan],
        rate: f64,
        read: impl Fn() -> u64,
        mut on_progress: impl FnMut(usize),
    ) -> Result<Fed, DemoError> {
        let started = Instant::now();
        let mut schedule = started;
        let mut malformed = 0;
        let mut last_progress = Instant::now();
        let max_lag = MAX_LAG_PER_PARTITION * u64::from(self.partitions.unsigned_abs());
        for (index, span) in load.iter().enumerate() {
            if index % 1000 == 999 {
                // Time spent waiting for the consumer shifts the schedule, not the rate.
                schedule += wait_until_within(self.produced, max_lag, "read", || Ok(read()))?;
            }
            // Sleep only when a millisecond or more ahead of the schedule: a sleep per message
            // would take longer than the gap between two messages at tens of thousands a
            // second, and the rate would fall to what the sleeps allow.
            let due = schedule + Duration::from_secs_f64(index as f64 / rate.max(1.0));
            if let Some(wait) = due.checked_duration_since(Instant::now())
                && wait >= PACING_GRAIN
            {
                self.producer.poll(Duration::ZERO);
                std::thread::sleep(wait);
            }
            self.send(span)?;
            if index % MALFORMED_EVERY == MALFORMED_EVERY - 1 {
                let broken = b"{\"span_id\": null, \"note\": \"malformed on purpose\"}";
                self.send_raw(broken, partition_of(&span.trace_id, self.partitions), None)?;
                malformed += 1;
            }
            if last_progress.elapsed() > Duration::from_millis(200) {
                on_progress(index + 1);
                last_progress = Instant::now();
            }
        }
        self.producer.flush(Duration::from_secs(30))?;
        on_progress(load.len());
        Ok(Fed { malformed, started })
    }

    /// Waits until the consumer has read every message produced so far.
    pub(super) fn wait_until_read(&self, read: impl Fn() -> u64) -> Result<(), DemoError> {
        wait_until_within(self.produced, 0, "read", || Ok(read())).map(drop)
    }

    /// Waits until the consumer group committed every message produced so far.
    pub(super) fn wait_until_committed(&self) -> Result<(), DemoError> {
        wait_until_within(self.produced, 0, "committed", || self.commits.committed()).map(drop)
    }

    /// Produces `tick` stamped `after` past the latest `received` of `load`: workload time
    /// moves on, so the segments still open come due.
    pub(super) fn tick(
        &mut self,
        load: &[GeneratedSpan],
        tick: &GeneratedSpan,
        after: Duration,
    ) -> Result<(), DemoError> {
        let last = load.iter().map(|span| span.received).fold(0.0, f64::max);
        let stamp = (last + after.as_secs_f64()) * 1000.0;
        self.send_raw(
            &tick.payload,
            partition_of(&tick.trace_id, self.partitions),
            Some(stamp as i64),
        )?;
        self.producer.flush(Duration::from_secs(30))?;
        Ok(())
    }

    fn send(&mut self, span: &GeneratedSpan) -> Result<(), DemoError> {
        let stamp = (span.received * 1000.0) as i64;
        self.send_raw(
            &span.payload,
            partition_of(&span.trace_id, self.partitions),
            Some(stamp),
        )
    }

    fn send_raw(
        &mut self,
        payload: &[u8],
        partition: i32,
        timestamp: Option<i64>,
    ) -> Result<(), DemoError> {
        let mut record = BaseRecord::<(), [u8]>::to(self.topic)
            .payload(payload)
            .partition(partition);
        if let Some(timestamp) = timestamp {
            record = record.timestamp(timestamp);
        }
        let deadline = Instant::now() + STALL_TIMEOUT;
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.produced += 1;
                    return Ok(());
                }
                // The local queue is full: let deliveries drain it, then try again.
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    back,
                )) if Instant::now() < deadline => {
                    record = back;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
}

/// Reads the consumer group's committed offsets.
struct CommitWatcher {
    client: BaseConsumer,
    topic: &'static str,
    partitions: i32,
}

impl CommitWatcher {
    fn new(
        bootstrap: &str,
        topic: &'static str,
        partitions: i32,
        group: &str,
    ) -> Result<Self, DemoError> {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .create()?;
        Ok(Self {
            client,
            topic,
            partitions,
        })
    }

    /// Messages the group committed, over all partitions.
    fn committed(&self) -> Result<u64, DemoError> {
        let mut query = TopicPartitionList::new();
        for partition in 0..self.partitions {
            query.add_partition(self.topic, partition);
        }
        // The returned list is dropped here, before the client (librdkafka's destructor
        // would otherwise wait for it forever).
        let committed = self
            .client
            .committed_offsets(query, Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|element| element.offset().to_raw())
            .filter_map(|offset| u64::try_from(offset).ok())
            .sum())
    }
}

/// Waits while more than `max_lag` of `produced` messages are not yet `what` (read, committed)
/// by the consumer as `progress` counts them, giving up once it moved no further for
/// [`STALL_TIMEOUT`]; returns how long it waited.
fn wait_until_within(
    produced: u64,
    max_lag: u64,
    what: &str,
    mut progress: impl FnMut() -> Result<u64, DemoError>,
) -> Result<Duration, DemoError> {
    let started = Instant::now();
    let mut done = progress()?;
    let mut progressed = Instant::now();
    while produced.saturating_sub(done) > max_lag {
        if progressed.elapsed() > STALL_TIMEOUT {
            return Err(DemoError::Other(format!(
                "the consumer {what} nothing more for {STALL_TIMEOUT:?} ({done} of {produced} \
                 messages {what})"
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
        let now = progress()?;
        if now > done {
            progressed = Instant::now();
        }
        done = now;
    }
    Ok(started.elapsed())
}
