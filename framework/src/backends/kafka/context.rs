//! The librdkafka client context: turns rebalance callbacks into requests for the run loop,
//! and librdkafka's logs and errors into `tracing` events.
//!
//! librdkafka reports a rebalance by calling back into the application from inside `poll`.
//! Building or joining a pipeline there would run user code inside a C callback (and would have
//! to be `Send + Sync` for no other reason), so the callback only records what happened. The
//! consumer hands the record to the stream processor as an event, and performs the actual
//! assign or unassign when the processor is ready: at once for an assignment, and only after the
//! pipeline was joined and its offsets committed for a revocation. librdkafka's group protocol
//! waits for that call, so deferring it is allowed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;

/// A rebalance librdkafka asked for and the run loop has not handled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RebalanceRequest {
    /// Add these (topic, partition) pairs to the assignment.
    Assign(Vec<(String, i32)>),
    /// Take these away (for the eager protocol: the whole assignment).
    Revoke(Vec<(String, i32)>),
    /// The rebalance failed; librdkafka retries it by itself.
    Failed(String),
}

/// Context of the framework's Kafka consumers.
#[derive(Debug, Default)]
pub(super) struct RebalanceContext {
    pending: Mutex<VecDeque<RebalanceRequest>>,
    closing: AtomicBool,
}

impl RebalanceContext {
    /// The oldest rebalance not handled yet.
    pub(super) fn next_request(&self) -> Option<RebalanceRequest> {
        self.pending.lock().pop_front()
    }

    /// From now on, rebalances are carried out inside the callback, as librdkafka does by
    /// default: the consumer is closing and nobody handles events any more.
    pub(super) fn start_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }
}

impl ClientContext for RebalanceContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_to_tracing(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, reason, "Kafka client error.");
    }
}

/// Context of the framework's Kafka producers: logs only.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LoggingContext;

impl ClientContext for LoggingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_to_tracing(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, reason, "Kafka client error.");
    }
}

fn log_to_tracing(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

impl ConsumerContext for RebalanceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        let pairs = partitions
            .elements()
            .iter()
            .map(|element| (element.topic().to_owned(), element.partition()))
            .collect();
        let request = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => RebalanceRequest::Assign(pairs),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => RebalanceRequest::Revoke(pairs),
            other => RebalanceRequest::Failed(format!("{other:?}")),
        };
        if self.closing.load(Ordering::SeqCst) {
            close_time_rebalance(consumer, &request, partitions);
            return;
        }
        self.pending.lock().push_back(request);
    }
}

/// While closing, give up revoked partitions at once (there is no pipeline left to drain) and
/// take no new ones.
fn close_time_rebalance(
    consumer: &BaseConsumer<RebalanceContext>,
    request: &RebalanceRequest,
    partitions: &TopicPartitionList,
) {
    let result = match (request, consumer.rebalance_protocol()) {
        (RebalanceRequest::Revoke(_), rdkafka::consumer::RebalanceProtocol::Cooperative) => {
            consumer.incremental_unassign(partitions)
        }
        (RebalanceRequest::Revoke(_), _) => consumer.unassign(),
        (RebalanceRequest::Assign(_) | RebalanceRequest::Failed(_), _) => Ok(()),
    };
    if let Err(error) = result {
        tracing::warn!(%error, "Giving up partitions while closing failed.");
    }
}
