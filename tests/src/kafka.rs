//! Kafka for tests: librdkafka's built-in mock cluster, or tansu as a second broker.
//!
//! The mock cluster and the clients that fill and read topics are rill's test harness
//! ([`rill::testing::kafka`], the `test-utils` feature), re-exported here. What this module
//! adds is the choice of broker: the mock is librdkafka answering itself, so with
//! [`BROKER_ENV`]` = tansu` the same tests run against an independent broker instead:
//! [`MockKafka::start`] then starts a tansu process of its own (see [`crate::tansu`]) and
//! creates topics through the Admin API. tansu has no fault injection, so
//! [`MockKafka::cluster`] and everything built on it fail there, and its groups stall with the
//! cooperative-sticky assignor, which [`Broker::rebalances_cooperatively`] tells test consumers.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
pub use rill::testing::kafka::{
    KafkaTestError, RecordedMessage, TEST_SESSION_TIMEOUT_MS, TestClients, headers,
};

use crate::tansu::{TansuBroker, TansuError};

/// How long [`MockKafka::read_all`] waits for another message on tansu before it takes the
/// topic as read to its end.
pub const TANSU_QUIET: Duration = Duration::from_secs(2);

/// Environment variable choosing the broker of the tests: `mock` (the default) or `tansu`.
pub const BROKER_ENV: &str = "RILL_TEST_KAFKA";

/// Errors from the Kafka test support.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MockKafkaError {
    /// rill's harness failed (the mock cluster, or a client of either broker).
    #[error(transparent)]
    Harness(#[from] KafkaTestError),
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

/// The Kafka of a test on loopback ports, alive as long as this value: rill's mock cluster, or
/// a tansu process when [`BROKER_ENV`] says so.
#[derive(Debug)]
pub struct MockKafka {
    backend: Backend,
    clients: TestClients,
}

#[derive(Debug)]
enum Backend {
    Mock(rill::testing::kafka::MockKafka),
    Tansu(TansuBroker),
}

impl MockKafka {
    /// Starts the broker [`BROKER_ENV`] names: a mock cluster with `brokers` brokers and no
    /// group rebalance delay, or one tansu broker (whatever `brokers` says).
    ///
    /// # Errors
    ///
    /// Fails if the cluster cannot be created or tansu does not start.
    pub fn start(brokers: u32) -> Result<Self, MockKafkaError> {
        let backend = match Broker::from_env()? {
            Broker::Mock => Backend::Mock(rill::testing::kafka::MockKafka::start(brokers)?),
            Broker::Tansu => Backend::Tansu(TansuBroker::start()?),
        };
        let clients = match &backend {
            Backend::Mock(mock) => mock.clients().clone(),
            Backend::Tansu(tansu) => TestClients::new(tansu.bootstrap_servers()),
        };
        Ok(Self { backend, clients })
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

    fn mock(&self) -> Result<&rill::testing::kafka::MockKafka, MockKafkaError> {
        match &self.backend {
            Backend::Mock(mock) => Ok(mock),
            Backend::Tansu(_) => Err(MockKafkaError::NoMockCluster),
        }
    }

    /// The mock handle, for fault injection (brokers down and up, request errors).
    ///
    /// # Errors
    ///
    /// [`MockKafkaError::NoMockCluster`] on tansu.
    pub fn cluster(&self) -> Result<MockCluster<'_, DefaultProducerContext>, MockKafkaError> {
        Ok(self.mock()?.cluster()?)
    }

    /// Creates `topic` with `partitions` partitions (replication factor 1): through the mock
    /// handle, or through the Admin API on tansu.
    ///
    /// # Errors
    ///
    /// Fails if the broker refuses (for example, the topic exists).
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<(), MockKafkaError> {
        if let Backend::Mock(mock) = &self.backend {
            return Ok(mock.create_topic(topic, partitions)?);
        }
        let admin: AdminClient<DefaultClientContext> = self.clients.producer_config().create()?;
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
    /// [`MockKafkaError::NoMockCluster`] on tansu.
    pub fn inject_request_errors(
        &self,
        api: RDKafkaApiKey,
        errors: &[RDKafkaRespErr],
    ) -> Result<(), MockKafkaError> {
        Ok(self.mock()?.inject_request_errors(api, errors)?)
    }

    /// Takes broker `id` (1-based) down: its connections are closed and it refuses new ones.
    ///
    /// # Errors
    ///
    /// Fails if the broker does not exist, or on tansu.
    pub fn broker_down(&self, id: i32) -> Result<(), MockKafkaError> {
        Ok(self.mock()?.broker_down(id)?)
    }

    /// Brings broker `id` back up.
    ///
    /// # Errors
    ///
    /// Fails if the broker does not exist, or on tansu.
    pub fn broker_up(&self, id: i32) -> Result<(), MockKafkaError> {
        Ok(self.mock()?.broker_up(id)?)
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
    /// Fails on a consumer error, or if the end is not reached within `timeout`.
    pub fn read_all(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<RecordedMessage>, MockKafkaError> {
        if self.broker() == Broker::Tansu {
            return self.read_until_quiet(topic, timeout);
        }
        Ok(self.clients.read_all(topic, timeout)?)
    }

    fn read_until_quiet(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<RecordedMessage>, MockKafkaError> {
        let consumer = self.clients.reader_from_beginning(topic)?;
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
                messages.push(rill::testing::kafka::recorded(&result?));
                last_arrival = Instant::now();
            }
        }
        Ok(messages)
    }
}

/// Everything of [`TestClients`] (settings, produce, read back, committed offsets) works on
/// either broker; [`MockKafka::read_all`] replaces its `read_all` for tansu.
impl std::ops::Deref for MockKafka {
    type Target = TestClients;

    fn deref(&self) -> &TestClients {
        &self.clients
    }
}

/// Runs an Admin API future to completion on a throwaway single-threaded runtime.
fn block_on<T>(future: impl std::future::Future<Output = T>) -> Result<T, MockKafkaError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MockKafkaError::Runtime)?;
    Ok(runtime.block_on(future))
}
