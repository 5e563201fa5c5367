//! A consumer-group member on librdkafka, implementing the framework's [`Consumer`] trait.
//!
//! Rebalances arrive as requests recorded by the client context (see `context.rs`) and leave
//! `poll` as [`ConsumerEvent`]s. An assignment is carried out at once, with each partition's
//! starting offset resolved here (the committed offset, or the [`InitialOffset`] policy); a
//! revocation pauses the partitions, drops any message of theirs that was already fetched, and
//! waits for [`Consumer::complete_revocation`] before librdkafka is told to give them up. Until
//! then this member still owns them, so the processor's final commit for them is accepted.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::config::{KafkaConfigError, KafkaConsumerConfig};
use super::context::{RebalanceContext, RebalanceRequest};
use super::payload::KafkaPayload;
use crate::backends::{Consumer, ConsumerError, ConsumerEvent};
use crate::backends::{InitialOffset, RebalanceProtocol};
use crate::message::{Message, Partition, Topic};

/// Longest wait, when closing, for librdkafka to finish giving the partitions up.
const CLOSE_SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a blocking broker request (committed offsets, watermarks) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a commit keeps being retried on retriable errors (a coordinator moving, a broker
/// restarting) before it is reported as failed, and the first pause between tries (doubling up
/// to a second). Heartbeats run on librdkafka's own thread meanwhile, so the member stays in
/// its group.
const COMMIT_RETRY_BUDGET: Duration = Duration::from_secs(30);
const COMMIT_FIRST_BACKOFF: Duration = Duration::from_millis(50);

/// Errors creating a [`KafkaConsumer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaConsumerError {
    /// The settings are invalid.
    #[error("invalid consumer settings")]
    Config(#[from] KafkaConfigError),
    /// librdkafka refused to create the client or to subscribe.
    #[error("cannot create the kafka consumer")]
    Client(#[from] KafkaError),
    /// No topic to subscribe to.
    #[error("a consumer needs at least one topic")]
    NoTopics,
}

/// A member of a Kafka consumer group, subscribed to one or more topics.
///
/// Offsets are committed only through [`Consumer::commit`] (auto-commit is off), synchronously,
/// with retries on coordinator and transport errors.
pub struct KafkaConsumer {
    client: BaseConsumer<RebalanceContext>,
    protocol: RebalanceProtocol,
    initial_offset: InitialOffset,
    topics: Vec<Topic>,
    assigned: HashSet<Partition>,
    revoking: HashSet<Partition>,
    working: HashMap<Partition, u64>,
    closed: bool,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("topics", &self.topics)
            .field("assigned", &self.assigned.len())
            .field("revoking", &self.revoking.len())
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Joins the group of `config` and subscribes to `topics`.
    ///
    /// Nothing is assigned until the processor polls: the assignment arrives as an event.
    ///
    /// # Errors
    ///
    /// Invalid settings, no topics, or a client librdkafka refuses to create.
    pub fn subscribe(
        config: &KafkaConsumerConfig,
        topics: &[&str],
    ) -> Result<Self, KafkaConsumerError> {
        if topics.is_empty() {
            return Err(KafkaConsumerError::NoTopics);
        }
        let client: BaseConsumer<RebalanceContext> = config
            .client_config()?
            .create_with_context(RebalanceContext::default())?;
        client.subscribe(topics)?;
        Ok(Self {
            client,
            protocol: config.rebalance_protocol(),
            initial_offset: config.initial_offset(),
            topics: topics.iter().map(|name| Topic::new(name)).collect(),
            assigned: HashSet::new(),
            revoking: HashSet::new(),
            working: HashMap::new(),
            closed: false,
        })
    }

    /// The partitions currently assigned (including those being revoked).
    pub fn assignment(&self) -> impl Iterator<Item = &Partition> {
        self.assigned.iter()
    }

    fn topic(&self, name: &str) -> Topic {
        self.topics
            .iter()
            .find(|topic| topic.as_str() == name)
            .cloned()
            .unwrap_or_else(|| Topic::new(name))
    }

    fn partition(&self, topic: &str, index: i32) -> Partition {
        Partition::new(self.topic(topic), index_of(index))
    }

    fn handle(
        &mut self,
        request: RebalanceRequest,
    ) -> Result<Option<ConsumerEvent<KafkaPayload>>, ConsumerError> {
        match request {
            RebalanceRequest::Assign(pairs) => self.assign(&pairs).map(Some),
            RebalanceRequest::Revoke(pairs) => self.start_revocation(&pairs).map(Some),
            RebalanceRequest::Failed(reason) => {
                tracing::warn!(reason, "Rebalance failed; the group will retry.");
                Ok(None)
            }
        }
    }

    fn assign(
        &mut self,
        pairs: &[(String, i32)],
    ) -> Result<ConsumerEvent<KafkaPayload>, ConsumerError> {
        let starts = self.resolve_start_offsets(pairs)?;
        let mut list = TopicPartitionList::with_capacity(pairs.len());
        for (topic, index) in pairs {
            let start = starts[&self.partition(topic, *index)];
            list.add_partition_offset(topic, *index, Offset::Offset(offset_to_kafka(start)))
                .map_err(broker_error)?;
        }
        match self.protocol {
            RebalanceProtocol::Cooperative => self.client.incremental_assign(&list),
            RebalanceProtocol::Eager => self.client.assign(&list),
        }
        .map_err(broker_error)?;
        // A partition paused while it was last revoked stays paused in librdkafka when it comes
        // back; a fresh assignment always starts flowing.
        self.client.resume(&list).map_err(broker_error)?;
        for (partition, start) in &starts {
            self.assigned.insert(partition.clone());
            self.revoking.remove(partition);
            self.working.insert(partition.clone(), *start);
        }
        tracing::info!(partitions = starts.len(), "Partitions assigned.");
        Ok(ConsumerEvent::Assigned(starts))
    }

    /// The committed offset of each partition, or where the initial-offset policy says to start.
    fn resolve_start_offsets(
        &self,
        pairs: &[(String, i32)],
    ) -> Result<HashMap<Partition, u64>, ConsumerError> {
        let mut query = TopicPartitionList::with_capacity(pairs.len());
        for (topic, index) in pairs {
            query.add_partition(topic, *index);
        }
        // The list librdkafka returns holds partition references; it is dropped inside this
        // block, long before the client, which would otherwise wait for it forever on drop.
        let committed: Vec<(String, i32, Option<i64>)> = {
            let list = self
                .client
                .committed_offsets(query, REQUEST_TIMEOUT)
                .map_err(classify)?;
            list.elements()
                .iter()
                .map(|element| {
                    let offset = element.offset().to_raw().filter(|offset| *offset >= 0);
                    (element.topic().to_owned(), element.partition(), offset)
                })
                .collect()
        };
        let mut starts = HashMap::with_capacity(committed.len());
        for (topic, index, offset) in committed {
            let start = match offset {
                Some(offset) => offset,
                None => self.initial_position(&topic, index)?,
            };
            starts.insert(self.partition(&topic, index), offset_from_kafka(start));
        }
        Ok(starts)
    }

    fn initial_position(&self, topic: &str, index: i32) -> Result<i64, ConsumerError> {
        let (low, high) = match self.initial_offset {
            InitialOffset::Error => {
                return Err(ConsumerError::Broker(
                    format!(
                        "no committed offset for {topic}/{index} and the initial offset policy is \
                         'error'"
                    )
                    .into(),
                ));
            }
            InitialOffset::Earliest | InitialOffset::Latest => self
                .client
                .fetch_watermarks(topic, index, REQUEST_TIMEOUT)
                .map_err(classify)?,
        };
        Ok(match self.initial_offset {
            InitialOffset::Latest => high,
            _ => low,
        })
    }

    fn start_revocation(
        &mut self,
        pairs: &[(String, i32)],
    ) -> Result<ConsumerEvent<KafkaPayload>, ConsumerError> {
        let partitions: Vec<Partition> = pairs
            .iter()
            .map(|(topic, index)| self.partition(topic, *index))
            .collect();
        // Stop fetching at once; messages already fetched are dropped in `poll`.
        if let Err(error) = self.client.pause(&list_of(pairs)) {
            tracing::warn!(%error, "Pausing revoked partitions failed.");
        }
        self.revoking.extend(partitions.iter().cloned());
        tracing::info!(partitions = partitions.len(), "Partitions being revoked.");
        Ok(ConsumerEvent::Revoked(partitions))
    }

    /// Copies a fetched message out of librdkafka; `None` for a partition no longer ours.
    fn convert(&self, message: &BorrowedMessage<'_>) -> Option<Message<KafkaPayload>> {
        let partition = self.partition(message.topic(), message.partition());
        if !self.assigned.contains(&partition) || self.revoking.contains(&partition) {
            return None;
        }
        let offset = offset_from_kafka(message.offset());
        let mut payload = KafkaPayload::new(
            message.key().map(<[u8]>::to_vec),
            message.payload().map(<[u8]>::to_vec),
        );
        if let Some(headers) = message.headers() {
            for header in headers.iter() {
                payload =
                    payload.with_header(header.key, header.value.unwrap_or_default().to_vec());
            }
        }
        let timestamp = message
            .timestamp()
            .to_millis()
            .and_then(|millis| u64::try_from(millis).ok())
            .map(|millis| SystemTime::UNIX_EPOCH + Duration::from_millis(millis));
        Some(Message::broker(payload, partition, offset, timestamp))
    }

    fn partition_list(
        &self,
        partitions: &[Partition],
    ) -> Result<TopicPartitionList, ConsumerError> {
        let mut list = TopicPartitionList::with_capacity(partitions.len());
        for partition in partitions {
            if !self.assigned.contains(partition) {
                return Err(ConsumerError::UnassignedPartition(partition.clone()));
            }
            list.add_partition(partition.topic().as_str(), kafka_index(partition));
        }
        Ok(list)
    }
}

impl KafkaConsumer {
    /// Polls (discarding messages) until librdkafka reports nothing assigned, for at most
    /// [`CLOSE_SETTLE_TIMEOUT`], so the revocation that leaving the group triggers runs here.
    ///
    /// If it were left in the queue, it would run inside librdkafka's close (from `Drop`), where
    /// giving the partitions up waits for a reply that only the closing thread itself could
    /// deliver: a deadlock (test `closing_with_a_revocation_pending_does_not_hang`).
    fn settle_after_unsubscribe(&mut self) {
        let deadline = std::time::Instant::now() + CLOSE_SETTLE_TIMEOUT;
        while std::time::Instant::now() < deadline {
            let _ = self.client.poll(Duration::from_millis(50));
            // The list holds partition references: it is dropped at once, never kept past
            // the client.
            let empty = self
                .client
                .assignment()
                .map(|assignment| assignment.count() == 0)
                .unwrap_or(true);
            if empty && self.client.context().next_request().is_none() {
                return;
            }
        }
        tracing::warn!("The consumer still held partitions when it closed.");
    }
}

impl Consumer<KafkaPayload> for KafkaConsumer {
    fn poll(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ConsumerEvent<KafkaPayload>>, ConsumerError> {
        if self.closed {
            return Err(ConsumerError::Closed);
        }
        if let Some(request) = self.client.context().next_request() {
            return self.handle(request);
        }
        match self.client.poll(timeout) {
            Some(Ok(fetched)) => {
                let converted = self.convert(&fetched);
                drop(fetched);
                if let Some(message) = &converted
                    && let (Some(partition), Some(offset)) = (message.partition(), message.offset())
                {
                    self.working.insert(partition.clone(), offset + 1);
                }
                Ok(converted.map(ConsumerEvent::Message))
            }
            Some(Err(KafkaError::PartitionEOF(_))) => Ok(None),
            Some(Err(error)) => Err(classify(error)),
            // A rebalance was recorded during this poll; hand it over right away.
            None => match self.client.context().next_request() {
                Some(request) => self.handle(request),
                None => Ok(None),
            },
        }
    }

    fn pause(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        let list = self.partition_list(partitions)?;
        self.client.pause(&list).map_err(broker_error)
    }

    fn resume(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        // A partition being revoked stays paused: nothing of it may be processed any more.
        let resumable: Vec<Partition> = partitions
            .iter()
            .filter(|partition| !self.revoking.contains(*partition))
            .cloned()
            .collect();
        let list = self.partition_list(&resumable)?;
        self.client.resume(&list).map_err(broker_error)
    }

    fn tell(&self) -> HashMap<Partition, u64> {
        self.working.clone()
    }

    fn seek(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
        let mut list = TopicPartitionList::with_capacity(positions.len());
        for (partition, offset) in positions {
            if !self.assigned.contains(partition) {
                return Err(ConsumerError::UnassignedPartition(partition.clone()));
            }
            list.add_partition_offset(
                partition.topic().as_str(),
                kafka_index(partition),
                Offset::Offset(offset_to_kafka(*offset)),
            )
            .map_err(broker_error)?;
        }
        let result = self
            .client
            .seek_partitions(list, REQUEST_TIMEOUT)
            .map_err(broker_error)?;
        let failed = result.elements().iter().find_map(|element| {
            element
                .error()
                .err()
                .map(|error| (element.partition(), error))
        });
        drop(result);
        if let Some((index, error)) = failed {
            return Err(ConsumerError::Broker(
                format!("seek of partition {index} failed: {error}").into(),
            ));
        }
        for (partition, offset) in positions {
            self.working.insert(partition.clone(), *offset);
        }
        Ok(())
    }

    fn commit(&mut self, positions: &HashMap<Partition, u64>) -> Result<(), ConsumerError> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::with_capacity(positions.len());
        for (partition, offset) in positions {
            list.add_partition_offset(
                partition.topic().as_str(),
                kafka_index(partition),
                Offset::Offset(offset_to_kafka(*offset)),
            )
            .map_err(|error| ConsumerError::CommitFailed(error.into()))?;
        }
        let give_up_at = std::time::Instant::now() + COMMIT_RETRY_BUDGET;
        let mut backoff = COMMIT_FIRST_BACKOFF;
        let mut attempt = 1_u32;
        loop {
            match self.client.commit(&list, CommitMode::Sync) {
                Ok(()) => return Ok(()),
                Err(error)
                    if is_retriable(&error) && std::time::Instant::now() + backoff < give_up_at =>
                {
                    tracing::warn!(%error, attempt, "Offset commit failed; retrying.");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    attempt += 1;
                }
                Err(error) if is_retriable(&error) || is_stale_membership(&error) => {
                    return Err(ConsumerError::Transient(error.into()));
                }
                Err(error) => return Err(ConsumerError::CommitFailed(error.into())),
            }
        }
    }

    fn complete_revocation(&mut self, partitions: &[Partition]) -> Result<(), ConsumerError> {
        let pairs: Vec<(String, i32)> = partitions
            .iter()
            .map(|partition| {
                (
                    partition.topic().as_str().to_owned(),
                    kafka_index(partition),
                )
            })
            .collect();
        match self.protocol {
            RebalanceProtocol::Cooperative => self.client.incremental_unassign(&list_of(&pairs)),
            // An eager revocation always covers the whole assignment.
            RebalanceProtocol::Eager => self.client.unassign(),
        }
        .map_err(broker_error)?;
        for partition in partitions {
            self.assigned.remove(partition);
            self.revoking.remove(partition);
            self.working.remove(partition);
        }
        Ok(())
    }

    fn rebalance_protocol(&self) -> RebalanceProtocol {
        self.protocol
    }

    fn close(&mut self) -> Result<(), ConsumerError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // Leaving the group makes librdkafka revoke everything; from here on that revocation is
        // carried out in the callback (the processor has already joined and committed), while
        // `settle_after_unsubscribe` polls for it.
        self.client.context().start_closing();
        self.assigned.clear();
        self.revoking.clear();
        self.working.clear();
        self.client.unsubscribe();
        self.settle_after_unsubscribe();
        Ok(())
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        // Never leave a pending revocation to the callback-less path: librdkafka's close waits
        // for it, and nobody would answer.
        self.client.context().start_closing();
    }
}

fn list_of(pairs: &[(String, i32)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::with_capacity(pairs.len());
    for (topic, index) in pairs {
        list.add_partition(topic, *index);
    }
    list
}

fn index_of(index: i32) -> u32 {
    u32::try_from(index).unwrap_or_default()
}

fn kafka_index(partition: &Partition) -> i32 {
    i32::try_from(partition.index()).unwrap_or(i32::MAX)
}

fn offset_from_kafka(offset: i64) -> u64 {
    u64::try_from(offset).unwrap_or_default()
}

fn offset_to_kafka(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

fn broker_error(error: KafkaError) -> ConsumerError {
    ConsumerError::Broker(error.into())
}

/// Transport hiccups and coordinator moves are retried by polling again; anything else stops
/// the processor.
fn classify(error: KafkaError) -> ConsumerError {
    if is_retriable(&error) {
        ConsumerError::Transient(error.into())
    } else {
        ConsumerError::Broker(error.into())
    }
}

/// The group moved on while this member was busy (a rebalance started or completed without
/// it): a commit with the old generation is refused now, and after the rebalance either
/// succeeds (the partitions stayed here) or is moot (their new owner reads them again).
fn is_stale_membership(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::AssignmentLost
        )
    )
}

fn is_retriable(error: &KafkaError) -> bool {
    if matches!(error, KafkaError::MessageConsumptionFatal(_)) {
        return false;
    }
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
                | RDKafkaErrorCode::TimedOutQueue
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
                // librdkafka holds a commit made while no coordinator is known for one session
                // timeout, then fails it with this local error: a broker outage, not a bug.
                | RDKafkaErrorCode::WaitingForCoordinator
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::UnknownTopicOrPartition
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_that_outlived_a_broker_outage_is_retried_not_fatal() {
        let waiting = KafkaError::ConsumerCommit(RDKafkaErrorCode::WaitingForCoordinator);
        let lost = KafkaError::ConsumerCommit(RDKafkaErrorCode::AssignmentLost);

        assert!(is_retriable(&waiting));
        assert!(is_stale_membership(&lost));
        assert!(!is_retriable(&KafkaError::ConsumerCommit(
            RDKafkaErrorCode::InvalidCommitOffsetSize
        )));
    }
}
