//! A real Kafka for tests, in process: librdkafka's mock cluster, with clients to fill topics,
//! read them back and look at committed offsets.
//!
//! The mock cluster is librdkafka's own broker code listening on loopback TCP ports, so the
//! clients under test speak the real Kafka protocol to it (consumer groups, rebalances,
//! commits, produce and fetch) and a test needs no broker installed. Fault injection (request
//! errors, a broker down and up) comes through [`MockKafka::cluster`].
//!
//! Two defaults of the mock make group tests slow, and this harness changes both: the first
//! join of a group waits out an "initial rebalance delay" of 3 s, set to 0 by
//! [`MockKafka::start`], and a member joining or leaving waits about `session.timeout.ms` minus
//! a second, which the settings of [`TestClients::consumer_config`] keep short
//! ([`TEST_SESSION_TIMEOUT_MS`]).
//!
//! The mock has no setting and rdkafka no safe call for that delay, so it is set through
//! librdkafka's C function on the raw handle: the one `unsafe` block of the crate, compiled
//! only with the `test-utils` feature.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

/// Session timeout of [`TestClients::consumer_config`]: a rebalance in the mock takes about
/// this minus one second.
pub const TEST_SESSION_TIMEOUT_MS: u32 = 1500;

/// How long metadata, watermark and committed-offset requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`TestClients::produce`] waits for its deliveries.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// The pause between two reads of [`TestClients::wait_until_committed`].
const COMMIT_CHECK_INTERVAL: Duration = Duration::from_millis(5);

/// Why a harness operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaTestError {
    /// librdkafka refused an operation.
    #[error("kafka operation failed")]
    Kafka(#[from] KafkaError),
    /// The client created to host the cluster has none (librdkafka without mock support).
    #[error("the host client has no mock cluster")]
    NoMockCluster,
    /// Fewer messages than expected arrived in time.
    #[error("timed out after {timeout:?}: read {read} of {expected} messages from {topic}")]
    Timeout {
        /// How long the read waited.
        timeout: Duration,
        /// The topic read.
        topic: String,
        /// Messages read.
        read: usize,
        /// Messages expected.
        expected: usize,
    },
    /// A group did not commit the expected offsets in time.
    #[error("{group} committed {committed:?} on {topic} within {timeout:?}, expected {expected:?}")]
    NotCommitted {
        /// How long the wait lasted.
        timeout: Duration,
        /// The group.
        group: String,
        /// The topic.
        topic: String,
        /// What the group had committed at the end, partition by partition.
        committed: Vec<Option<i64>>,
        /// What was expected.
        expected: Vec<i64>,
    },
}

/// A message read back by [`TestClients::read_topic`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedMessage {
    /// Partition the message was read from.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// Message key, if any.
    pub key: Option<Vec<u8>>,
    /// Message value, if any.
    pub payload: Option<Vec<u8>>,
    /// Headers as (name, value) pairs, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Clients of a test's Kafka, whichever broker it is: settings, filling a topic, reading it
/// back, committed offsets. Only the `bootstrap.servers` to reach it is needed.
#[derive(Debug, Clone)]
pub struct TestClients {
    bootstrap_servers: String,
}

impl TestClients {
    /// Clients of the broker at `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
        }
    }

    /// The `bootstrap.servers` value that reaches the broker.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// Settings for a consumer in `group`: manual commits, from the earliest offset, and a
    /// short session timeout so rebalances are quick.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", TEST_SESSION_TIMEOUT_MS.to_string())
            .set("heartbeat.interval.ms", "500")
            .set("log_level", "3");
        config
    }

    /// Settings for a producer.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("linger.ms", "1")
            .set("log_level", "3");
        config
    }

    /// Produces `values` to `topic` (the partition of the n-th value is `partition_of(n)`) and
    /// waits for every delivery.
    ///
    /// # Errors
    ///
    /// A message that cannot be queued, or deliveries not done within 30 s.
    pub fn produce<'a>(
        &self,
        topic: &str,
        values: impl IntoIterator<Item = &'a [u8]>,
        partition_of: impl Fn(usize) -> i32,
    ) -> Result<(), KafkaTestError> {
        let producer: BaseProducer = self.producer_config().create()?;
        for (index, value) in values.into_iter().enumerate() {
            let mut record: BaseRecord<'_, (), [u8]> = BaseRecord::to(topic)
                .payload(value)
                .partition(partition_of(index));
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((error, _)) => return Err(error.into()),
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Timeout::After(PRODUCE_TIMEOUT))?;
        Ok(())
    }

    /// Reads `topic` from the beginning of every partition, without a group, until `expected`
    /// messages arrived or `timeout` passed.
    ///
    /// # Errors
    ///
    /// A consumer error, or [`KafkaTestError::Timeout`] when fewer messages arrive in time.
    pub fn read_topic(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedMessage>, KafkaTestError> {
        let consumer = self.reader_from_beginning(topic)?;
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::with_capacity(expected);
        while messages.len() < expected {
            let now = Instant::now();
            if now >= deadline {
                return Err(KafkaTestError::Timeout {
                    timeout,
                    topic: topic.to_owned(),
                    read: messages.len(),
                    expected,
                });
            }
            if let Some(result) = consumer.poll(deadline - now) {
                messages.push(recorded(&result?));
            }
        }
        Ok(messages)
    }

    /// Reads every message of `topic` up to the partitions' high watermarks as they are now
    /// (duplicates included, nothing missed), without a group.
    ///
    /// # Errors
    ///
    /// As [`read_topic`](Self::read_topic), and a metadata or watermark request that fails.
    pub fn read_all(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<RecordedMessage>, KafkaTestError> {
        let consumer: BaseConsumer = self.consumer_config("read-all").create()?;
        let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        let mut total = 0_i64;
        for topic_metadata in metadata.topics() {
            for partition in topic_metadata.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(topic, partition.id(), REQUEST_TIMEOUT)?;
                total += high;
            }
        }
        self.read_topic(topic, usize::try_from(total).unwrap_or_default(), timeout)
    }

    /// A consumer without a group, assigned every partition of `topic` from the beginning.
    ///
    /// # Errors
    ///
    /// The consumer cannot be created, or the topic's metadata not fetched.
    pub fn reader_from_beginning(&self, topic: &str) -> Result<BaseConsumer, KafkaTestError> {
        let consumer: BaseConsumer = self.consumer_config("read-topic").create()?;
        let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
        let mut assignment = TopicPartitionList::new();
        for topic_metadata in metadata.topics() {
            for partition in topic_metadata.partitions() {
                assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
            }
        }
        consumer.assign(&assignment)?;
        Ok(consumer)
    }

    /// The offsets `group` committed on partitions `0..partitions` of `topic`, as a fresh
    /// client reads them: `None` where nothing was committed.
    ///
    /// # Errors
    ///
    /// The offsets cannot be fetched within 10 s.
    pub fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<Vec<Option<i64>>, KafkaTestError> {
        let consumer: BaseConsumer = self.consumer_config(group).create()?;
        read_committed(&consumer, topic, partitions)
    }

    /// Waits until `group` committed `expected[n]` on partition `n` of `topic`, for every `n`,
    /// reading the offsets every few milliseconds.
    ///
    /// # Errors
    ///
    /// [`KafkaTestError::NotCommitted`] when `timeout` passes first, or a failed read.
    pub fn wait_until_committed(
        &self,
        group: &str,
        topic: &str,
        expected: &[i64],
        timeout: Duration,
    ) -> Result<(), KafkaTestError> {
        let partitions = i32::try_from(expected.len()).unwrap_or(i32::MAX);
        let deadline = Instant::now() + timeout;
        // One client for every look: each asks the group coordinator afresh.
        let consumer: BaseConsumer = self.consumer_config(group).create()?;
        loop {
            let committed = read_committed(&consumer, topic, partitions)?;
            if committed.iter().zip(expected).all(|(c, e)| *c == Some(*e)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(KafkaTestError::NotCommitted {
                    timeout,
                    group: group.to_owned(),
                    topic: topic.to_owned(),
                    committed,
                    expected: expected.to_vec(),
                });
            }
            std::thread::sleep(COMMIT_CHECK_INTERVAL);
        }
    }
}

/// librdkafka's mock cluster on loopback ports, alive as long as this value.
///
/// The cluster is hosted by a producer client; dropping it destroys the brokers. Clients of
/// other threads or processes reach it through [`bootstrap_servers`](Self::bootstrap_servers).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::testing::kafka::MockKafka;
///
/// let kafka = MockKafka::start(1).unwrap();
/// kafka.create_topic("in", 2).unwrap();
/// kafka.clients().produce("in", [&b"a"[..], b"b"], |n| n as i32 % 2).unwrap();
///
/// let messages = kafka.clients().read_all("in", Duration::from_secs(20)).unwrap();
/// assert_eq!(messages.len(), 2);
/// ```
pub struct MockKafka {
    host: BaseProducer,
    clients: TestClients,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("bootstrap_servers", &self.clients.bootstrap_servers)
            .finish_non_exhaustive()
    }
}

impl MockKafka {
    /// Starts a mock cluster of `brokers` brokers whose groups form without the initial
    /// rebalance delay.
    ///
    /// # Errors
    ///
    /// The host client cannot be created or has no mock cluster.
    pub fn start(brokers: u32) -> Result<Self, KafkaTestError> {
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("log_level", "3")
            .create()?;
        let bootstrap_servers = host
            .client()
            .mock_cluster()
            .ok_or(KafkaTestError::NoMockCluster)?
            .bootstrap_servers();
        disable_initial_rebalance_delay(&host);
        Ok(Self {
            host,
            clients: TestClients::new(bootstrap_servers),
        })
    }

    /// The `bootstrap.servers` value that reaches the cluster.
    pub fn bootstrap_servers(&self) -> &str {
        self.clients.bootstrap_servers()
    }

    /// Clients of the cluster: settings, produce, read back, committed offsets.
    pub const fn clients(&self) -> &TestClients {
        &self.clients
    }

    /// The mock handle, for fault injection beyond the calls here.
    ///
    /// # Errors
    ///
    /// Never in practice: [`start`](Self::start) checked the host has a cluster.
    pub fn cluster(&self) -> Result<MockCluster<'_, DefaultProducerContext>, KafkaTestError> {
        self.host
            .client()
            .mock_cluster()
            .ok_or(KafkaTestError::NoMockCluster)
    }

    /// Creates `topic` with `partitions` partitions (replication factor 1).
    ///
    /// # Errors
    ///
    /// The cluster refuses (the topic exists, say).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), KafkaTestError> {
        self.cluster()?.create_topic(topic, partitions, 1)?;
        Ok(())
    }

    /// Makes the following requests of `api` fail with `errors`, one error per request.
    ///
    /// # Errors
    ///
    /// As [`cluster`](Self::cluster).
    pub fn inject_request_errors(
        &self,
        api: RDKafkaApiKey,
        errors: &[RDKafkaRespErr],
    ) -> Result<(), KafkaTestError> {
        self.cluster()?.request_errors(api, errors);
        Ok(())
    }

    /// Takes broker `id` (1-based) down: its connections close and it refuses new ones.
    ///
    /// # Errors
    ///
    /// The broker does not exist.
    pub fn broker_down(&self, id: i32) -> Result<(), KafkaTestError> {
        self.cluster()?.broker_down(id)?;
        Ok(())
    }

    /// Brings broker `id` back up.
    ///
    /// # Errors
    ///
    /// The broker does not exist.
    pub fn broker_up(&self, id: i32) -> Result<(), KafkaTestError> {
        self.cluster()?.broker_up(id)?;
        Ok(())
    }
}

/// The offsets `consumer`'s group committed on partitions `0..partitions` of `topic`: `None`
/// where nothing was committed.
fn read_committed(
    consumer: &BaseConsumer,
    topic: &str,
    partitions: i32,
) -> Result<Vec<Option<i64>>, KafkaTestError> {
    let mut query = TopicPartitionList::new();
    for partition in 0..partitions {
        query.add_partition(topic, partition);
    }
    // The list is dropped before the consumer: it holds references to partitions that make
    // the consumer's destructor wait forever otherwise.
    let committed = consumer.committed_offsets(query, REQUEST_TIMEOUT)?;
    Ok((0..partitions)
        .map(|partition| {
            committed
                .find_partition(topic, partition)
                .and_then(|entry| entry.offset().to_raw())
                .filter(|offset| *offset >= 0)
        })
        .collect())
}

/// Headers of (name, value) pairs, for producing test messages with headers.
pub fn headers(pairs: &[(&str, &[u8])]) -> OwnedHeaders {
    pairs.iter().fold(
        OwnedHeaders::new_with_capacity(pairs.len()),
        |all, (key, value)| {
            all.insert(Header {
                key,
                value: Some(*value),
            })
        },
    )
}

/// A consumed message as the tests keep it, for a reader of one's own
/// ([`TestClients::reader_from_beginning`]).
pub fn recorded(message: &BorrowedMessage<'_>) -> RecordedMessage {
    let headers = message.headers().map(|headers| {
        headers
            .iter()
            .map(|header| {
                let value = header.value.map(<[u8]>::to_vec).unwrap_or_default();
                (header.key.to_owned(), value)
            })
            .collect()
    });
    RecordedMessage {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers: headers.unwrap_or_default(),
    }
}

/// Sets the mock's initial group rebalance delay (3 s by default) to zero.
///
/// Neither a configuration property nor rdkafka's safe `MockCluster` reaches this setting
/// (librdkafka 2.12 has only `rd_kafka_mock_group_initial_rebalance_delay_ms`), hence the raw
/// call.
#[allow(unsafe_code)]
fn disable_initial_rebalance_delay(host: &BaseProducer) {
    // SAFETY: `host` was created with `test.mock.num.brokers`, so its handle owns a mock cluster
    // (checked by the caller through `mock_cluster()`, and for null here); the handle and the
    // cluster stay valid while `host` is borrowed, and the call only stores an integer.
    unsafe {
        let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(host.client().native_ptr());
        if !cluster.is_null() {
            rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn produced_messages_read_back_with_their_partition_and_headers() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("numbers", 2).unwrap();
        let values: Vec<Vec<u8>> = (0..10).map(|n: i32| n.to_string().into_bytes()).collect();

        kafka
            .clients()
            .produce("numbers", values.iter().map(Vec::as_slice), |n| {
                (n % 2) as i32
            })
            .unwrap();
        let mut messages = kafka
            .clients()
            .read_all("numbers", Duration::from_secs(20))
            .unwrap();

        messages.sort_by_key(|message| (message.partition, message.offset));
        let even: Vec<_> = messages
            .iter()
            .filter(|message| message.partition == 0)
            .map(|message| message.payload.clone().unwrap())
            .collect();
        assert_eq!(even, [b"0", b"2", b"4", b"6", b"8"].map(|v| v.to_vec()));
        assert!(messages.iter().all(|message| message.headers.is_empty()));
    }

    #[test]
    fn a_group_member_commits_and_a_fresh_client_reads_the_offset() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("in", 1).unwrap();
        kafka.clients().produce("in", [&b"x"[..]], |_| 0).unwrap();
        assert_eq!(
            kafka.clients().committed_offsets("g", "in", 1).unwrap(),
            [None]
        );

        let consumer: BaseConsumer = kafka.clients().consumer_config("g").create().unwrap();
        consumer.subscribe(&["in"]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let message = loop {
            assert!(Instant::now() < deadline, "no message within 20 s");
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                break message.unwrap();
            }
        };
        consumer
            .commit_message(&message, rdkafka::consumer::CommitMode::Sync)
            .unwrap();
        drop(message);

        assert_eq!(
            kafka.clients().committed_offsets("g", "in", 1).unwrap(),
            [Some(1)]
        );
        kafka
            .clients()
            .wait_until_committed("g", "in", &[1], Duration::from_secs(10))
            .unwrap();
        let short = kafka
            .clients()
            .wait_until_committed("g", "in", &[2], Duration::ZERO)
            .unwrap_err();
        assert!(matches!(short, KafkaTestError::NotCommitted { .. }));
    }

    #[test]
    fn a_read_short_of_its_count_times_out() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("empty", 1).unwrap();

        let error = kafka
            .clients()
            .read_topic("empty", 1, Duration::from_millis(300))
            .unwrap_err();

        assert!(matches!(error, KafkaTestError::Timeout { read: 0, .. }));
    }
}
