//! Kafka for tests: librdkafka's built-in mock cluster, or tansu as a second broker.
//!
//! The mock cluster is real librdkafka broker code listening on loopback TCP ports, so clients
//! talk the real Kafka protocol to it: consumer groups, rebalances, commits, produce and fetch.
//! It has no Admin API, so topics are created through the mock handle. Two of its defaults make
//! group tests slow, and [`MockKafka`] changes both: the first join of a group waits for an
//! "initial rebalance delay" of 3 s (set to 0 here), and a member joining or leaving waits about
//! `session.timeout.ms - 1 s` (the client settings from [`MockKafka::consumer_config`] use a short
//! session timeout).
//!
//! The mock is librdkafka answering itself, so with [`BROKER_ENV`]` = tansu` the same tests run
//! against an independent broker instead: [`MockKafka::start`] then starts a tansu process of its
//! own (see [`crate::tansu`]) and creates topics through the Admin API. tansu has no fault
//! injection, so [`MockKafka::cluster`] and everything built on it fail there, and its groups
//! stall with the cooperative-sticky assignor, which [`Broker::rebalances_cooperatively`] tells
//! test consumers.

use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::util::Timeout;

use crate::tansu::{TansuBroker, TansuError};

/// How long [`MockKafka::read_all`] waits for another message on tansu before it takes the
/// topic as read to its end.
pub const TANSU_QUIET: Duration = Duration::from_secs(2);

/// Environment variable choosing the broker of the tests: `mock` (the default) or `tansu`.
pub const BROKER_ENV: &str = "RILL_TEST_KAFKA";

/// Session timeout for test consumers: rebalances in the mock take about this minus one second.
pub const TEST_SESSION_TIMEOUT_MS: u32 = 1500;

/// Errors from the Kafka test support.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MockKafkaError {
    /// librdkafka refused an operation.
    #[error("kafka operation failed")]
    Kafka(#[from] KafkaError),
    /// Fault injection was asked of a broker that is not the mock cluster.
    #[error("no mock cluster behind this broker: fault injection needs {BROKER_ENV}=mock")]
    NoMockCluster,
    /// The broker named by [`BROKER_ENV`] is not one the tests know.
    #[error("unknown {BROKER_ENV} value {0:?}: expected mock or tansu")]
    UnknownBroker(String),
    /// The tansu broker did not start.
    #[error("tansu did not start")]
    Tansu(#[from] TansuError),
    /// No runtime could be started for an Admin API call.
    #[error("cannot start a runtime for the admin client")]
    Runtime(#[source] std::io::Error),
    /// The Admin API refused to create a topic.
    #[error("creating topic {topic} failed: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// What the broker answered.
        reason: String,
    },
    /// A condition was not met in time.
    #[error("timed out after {0:?}: {1}")]
    Timeout(Duration, String),
}

/// A message read back from a topic by [`MockKafka::read_topic`].
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

/// The Kafka implementation behind a [`MockKafka`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broker {
    /// librdkafka's in-process mock cluster, with fault injection.
    Mock,
    /// A tansu process with memory storage.
    Tansu,
}

impl Broker {
    /// The broker named by [`BROKER_ENV`] (the mock cluster when unset).
    ///
    /// # Errors
    ///
    /// [`MockKafkaError::UnknownBroker`] for any other value than `mock` or `tansu`.
    pub fn from_env() -> Result<Self, MockKafkaError> {
        match std::env::var(BROKER_ENV).as_deref() {
            Err(_) | Ok("" | "mock") => Ok(Self::Mock),
            Ok("tansu") => Ok(Self::Tansu),
            Ok(other) => Err(MockKafkaError::UnknownBroker(other.to_owned())),
        }
    }

    /// Whether consumer groups keep delivering with the cooperative-sticky assignor; on tansu
    /// they stall after an incremental rebalance, so test consumers there use the eager one.
    pub fn rebalances_cooperatively(self) -> bool {
        self == Self::Mock
    }
}

/// The Kafka of a test on loopback ports, alive as long as this value: librdkafka's
/// in-process mock cluster, or a tansu process when [`BROKER_ENV`] says so.
///
/// The mock cluster is hosted by a producer client; dropping it destroys the brokers. Clients of
/// other threads (or processes) connect through [`bootstrap_servers`](Self::bootstrap_servers).
pub struct MockKafka {
    backend: Backend,
    bootstrap_servers: String,
}

enum Backend {
    Mock(BaseProducer),
    Tansu(TansuBroker),
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("broker", &self.broker())
            .field("bootstrap_servers", &self.bootstrap_servers)
            .finish_non_exhaustive()
    }
}

impl MockKafka {
    /// Starts the broker [`BROKER_ENV`] names: a mock cluster with `brokers` brokers and no
    /// group rebalance delay, or one tansu broker (whatever `brokers` says).
    ///
    /// # Errors
    ///
    /// Fails if the cluster cannot be created or tansu does not start.
    pub fn start(brokers: u32) -> Result<Self, MockKafkaError> {
        match Broker::from_env()? {
            Broker::Mock => Self::start_mock(brokers),
            Broker::Tansu => {
                let tansu = TansuBroker::start()?;
                Ok(Self {
                    bootstrap_servers: tansu.bootstrap_servers(),
                    backend: Backend::Tansu(tansu),
                })
            }
        }
    }

    fn start_mock(brokers: u32) -> Result<Self, MockKafkaError> {
        let host: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .set("log_level", "3")
            .create()?;
        let bootstrap_servers = host
            .client()
            .mock_cluster()
            .ok_or(MockKafkaError::NoMockCluster)?
            .bootstrap_servers();
        disable_initial_rebalance_delay(&host);
        Ok(Self {
            backend: Backend::Mock(host),
            bootstrap_servers,
        })
    }

    /// What the broker logged, for failure messages: tansu's warnings and errors (the mock
    /// cluster logs through the host client, so `None` there).
    pub fn broker_log(&self) -> Option<String> {
        match &self.backend {
            Backend::Mock(_) => None,
            Backend::Tansu(tansu) => Some(tansu.log()),
        }
    }

    /// Which broker this is.
    pub fn broker(&self) -> Broker {
        match self.backend {
            Backend::Mock(_) => Broker::Mock,
            Backend::Tansu(_) => Broker::Tansu,
        }
    }

    /// The `bootstrap.servers` value that reaches this cluster.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The mock handle, for fault injection (brokers down and up, request errors).
    ///
    /// # Errors
    ///
    /// [`MockKafkaError::NoMockCluster`] on tansu.
    pub fn cluster(&self) -> Result<MockCluster<'_, DefaultProducerContext>, MockKafkaError> {
        match &self.backend {
            Backend::Mock(host) => host.client().mock_cluster(),
            Backend::Tansu(_) => None,
        }
        .ok_or(MockKafkaError::NoMockCluster)
    }

    /// Creates `topic` with `partitions` partitions (replication factor 1): through the mock
    /// handle, or through the Admin API on tansu.
    ///
    /// # Errors
    ///
    /// Fails if the broker refuses (for example, the topic exists).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), MockKafkaError> {
        if self.broker() == Broker::Mock {
            self.cluster()?.create_topic(topic, partitions, 1)?;
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> = self.producer_config().create()?;
        let request = [NewTopic::new(topic, partitions, TopicReplication::Fixed(1))];
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = block_on(admin.create_topics(&request, &options))??;
        for result in results {
            result.map_err(|(topic, code)| MockKafkaError::CreateTopic {
                topic,
                reason: code.to_string(),
            })?;
        }
        Ok(())
    }

    /// Makes every following request of `api` fail with `errors`, one error per request.
    ///
    /// # Errors
    ///
    /// Never in practice: the host client always has a mock cluster.
    pub fn inject_request_errors(
        &self,
        api: RDKafkaApiKey,
        errors: &[RDKafkaRespErr],
    ) -> Result<(), MockKafkaError> {
        self.cluster()?.request_errors(api, errors);
        Ok(())
    }

    /// Takes broker `id` (1-based) down: its connections are closed and it refuses new ones.
    ///
    /// # Errors
    ///
    /// Fails if the broker does not exist.
    pub fn broker_down(&self, id: i32) -> Result<(), MockKafkaError> {
        self.cluster()?.broker_down(id)?;
        Ok(())
    }

    /// Brings broker `id` back up.
    ///
    /// # Errors
    ///
    /// Fails if the broker does not exist.
    pub fn broker_up(&self, id: i32) -> Result<(), MockKafkaError> {
        self.cluster()?.broker_up(id)?;
        Ok(())
    }

    /// Client settings for a consumer in `group` with fast rebalances and manual commits.
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

    /// Client settings for a producer.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("linger.ms", "1")
            .set("log_level", "3");
        config
    }

    /// Produces `values` to `topic` (partition chosen by `partition_of`) and waits for delivery.
    ///
    /// # Errors
    ///
    /// Fails if a message cannot be enqueued or the queue does not drain within 30 s.
    pub fn produce<'a>(
        &self,
        topic: &str,
        values: impl IntoIterator<Item = &'a [u8]>,
        partition_of: impl Fn(usize) -> i32,
    ) -> Result<(), MockKafkaError> {
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
        producer.flush(Timeout::After(Duration::from_secs(30)))?;
        Ok(())
    }

    /// Reads every message of `topic` until `expected` messages were seen or `timeout` passed,
    /// without a consumer group (partitions assigned directly, from the beginning).
    ///
    /// # Errors
    ///
    /// Fails on a consumer error, or with [`MockKafkaError::Timeout`] if fewer than `expected`
    /// messages arrive in time.
    pub fn read_topic(
        &self,
        topic: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedMessage>, MockKafkaError> {
        let consumer = self.reader_from_beginning(topic)?;
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::with_capacity(expected);
        while messages.len() < expected {
            let now = Instant::now();
            if now >= deadline {
                return Err(MockKafkaError::Timeout(
                    timeout,
                    format!(
                        "read {} of {expected} messages from {topic}",
                        messages.len()
                    ),
                ));
            }
            if let Some(result) = consumer.poll(deadline - now) {
                messages.push(recorded(&result?));
            }
        }
        Ok(messages)
    }

    /// Reads every message of `topic` up to the partitions' current ends (so duplicates
    /// included, nothing missed), without a consumer group.
    ///
    /// On the mock cluster the ends are the high watermarks. tansu 0.6 answers a high watermark
    /// of one past the last record batch's base offset (1 for 50 messages produced in one
    /// batch), so there the topic is read until nothing more arrives for [`TANSU_QUIET`].
    ///
    /// # Errors
    ///
    /// Fails on a consumer error, or with [`MockKafkaError::Timeout`] if the end is not reached
    /// within `timeout`.
    pub fn read_all(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<RecordedMessage>, MockKafkaError> {
        if self.broker() == Broker::Tansu {
            return self.read_until_quiet(topic, timeout);
        }
        let consumer: BaseConsumer = self.consumer_config("read-all").create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut ends = std::collections::HashMap::new();
        for topic_metadata in metadata.topics() {
            for partition in topic_metadata.partitions() {
                let (_, high) =
                    consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10))?;
                ends.insert(partition.id(), high);
            }
        }
        let total: i64 = ends.values().sum();
        self.read_topic(topic, usize::try_from(total).unwrap_or_default(), timeout)
    }

    fn read_until_quiet(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<RecordedMessage>, MockKafkaError> {
        let consumer = self.reader_from_beginning(topic)?;
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        let mut last_arrival = Instant::now();
        while last_arrival.elapsed() < TANSU_QUIET {
            if Instant::now() >= deadline {
                return Err(MockKafkaError::Timeout(
                    timeout,
                    format!("{topic} kept delivering after {} messages", messages.len()),
                ));
            }
            if let Some(result) = consumer.poll(Duration::from_millis(50)) {
                messages.push(recorded(&result?));
                last_arrival = Instant::now();
            }
        }
        Ok(messages)
    }

    /// A consumer without a group, assigned every partition of `topic` from the beginning.
    fn reader_from_beginning(&self, topic: &str) -> Result<BaseConsumer, MockKafkaError> {
        let consumer: BaseConsumer = self.consumer_config("read-topic").create()?;
        let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let mut assignment = rdkafka::TopicPartitionList::new();
        for topic_metadata in metadata.topics() {
            for partition in topic_metadata.partitions() {
                assignment.add_partition_offset(
                    topic,
                    partition.id(),
                    rdkafka::Offset::Beginning,
                )?;
            }
        }
        consumer.assign(&assignment)?;
        Ok(consumer)
    }

    /// Reads the committed offsets of `group` for `topic` partitions `0..partitions`, as a fresh
    /// client sees them: `None` where nothing was committed.
    ///
    /// # Errors
    ///
    /// Fails if the offsets cannot be fetched within 10 s.
    pub fn committed_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: i32,
    ) -> Result<Vec<Option<i64>>, MockKafkaError> {
        let consumer: BaseConsumer = self.consumer_config(group).create()?;
        let mut query = rdkafka::TopicPartitionList::new();
        for partition in 0..partitions {
            query.add_partition(topic, partition);
        }
        let offsets = {
            // The returned list must be dropped before the consumer: it holds partition
            // references that make the consumer's destructor wait forever otherwise.
            let committed = consumer.committed_offsets(query, Duration::from_secs(10))?;
            (0..partitions)
                .map(|partition| {
                    committed
                        .find_partition(topic, partition)
                        .and_then(|entry| entry.offset().to_raw())
                        .filter(|offset| *offset >= 0)
                })
                .collect()
        };
        Ok(offsets)
    }
}

/// A consumed message as the tests keep it.
fn recorded(message: &BorrowedMessage<'_>) -> RecordedMessage {
    RecordedMessage {
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|header| {
                        (
                            header.key.to_owned(),
                            header.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Builds headers from (name, value) pairs, for producing test messages with headers.
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

/// Runs an Admin API future to completion on a throwaway single-threaded runtime.
fn block_on<T>(future: impl std::future::Future<Output = T>) -> Result<T, MockKafkaError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MockKafkaError::Runtime)?;
    Ok(runtime.block_on(future))
}

/// Sets the mock's initial group rebalance delay (3 s by default) to zero.
///
/// The safe mock API has no setter for it, so this goes through the raw handle.
#[allow(unsafe_code)]
fn disable_initial_rebalance_delay(host: &BaseProducer) {
    // SAFETY: `host` was created with `test.mock.num.brokers`, so its handle owns a mock cluster
    // (checked by the caller through `mock_cluster()`), and both pointers stay valid while `host`
    // is borrowed here.
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
    fn produced_messages_read_back_in_partition_order() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("numbers", 2).unwrap();
        let values: Vec<Vec<u8>> = (0..10).map(|n: i32| n.to_string().into_bytes()).collect();

        kafka
            .produce("numbers", values.iter().map(Vec::as_slice), |index| {
                (index % 2) as i32
            })
            .unwrap();
        let mut messages = kafka
            .read_topic("numbers", 10, Duration::from_secs(20))
            .unwrap();

        messages.sort_by_key(|message| (message.partition, message.offset));
        let even: Vec<_> = messages
            .iter()
            .filter(|message| message.partition == 0)
            .map(|message| message.payload.clone().unwrap())
            .collect();
        assert_eq!(even, [b"0", b"2", b"4", b"6", b"8"].map(|v| v.to_vec()));
    }

    #[test]
    fn read_all_returns_every_message_of_every_partition() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("spread", 4).unwrap();
        let values: Vec<Vec<u8>> = (0..200).map(|n: i32| n.to_string().into_bytes()).collect();

        kafka
            .produce("spread", values.iter().map(Vec::as_slice), |index| {
                (index % 4) as i32
            })
            .unwrap();
        let messages = kafka.read_all("spread", Duration::from_secs(20)).unwrap();

        let mut read: Vec<Vec<u8>> = messages
            .into_iter()
            .map(|message| message.payload.unwrap())
            .collect();
        read.sort();
        let mut expected = values;
        expected.sort();
        assert_eq!(read, expected);
    }

    #[test]
    fn committed_offsets_are_none_for_an_unknown_group() {
        let kafka = MockKafka::start(1).unwrap();
        kafka.create_topic("empty", 3).unwrap();

        let offsets = kafka.committed_offsets("nobody", "empty", 3).unwrap();

        assert_eq!(offsets, [None, None, None]);
    }
}
