//! A producer on librdkafka whose deliveries resolve on the broker's delivery report.
//!
//! `produce` only enqueues into librdkafka; the returned future completes when librdkafka's
//! background thread receives the delivery report, so work is durable exactly when the future
//! says so. A full local queue hands the payload back as [`ProduceError::QueueFull`]
//! (backpressure), never as a failure.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::util::Timeout;

use super::config::{KafkaConfigError, KafkaProducerConfig};
use super::context::LoggingContext;
use super::payload::KafkaPayload;
use crate::backends::{
    Delivered, DeliveryError, DeliveryFuture, Destination, ProduceError, Producer,
};
use crate::message::{Partition, Topic};

/// Errors creating a [`KafkaProducer`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaProducerError {
    /// The settings are invalid.
    #[error("invalid producer settings")]
    Config(#[from] KafkaConfigError),
    /// librdkafka refused to create the client.
    #[error("cannot create the kafka producer")]
    Client(#[from] KafkaError),
}

/// Why [`KafkaProducer::check_topic`] found a topic unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopicCheckError {
    /// No broker answered the metadata request in time.
    #[error("cannot fetch the metadata of topic {topic}")]
    Metadata {
        /// The topic.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The brokers do not know the topic (and did not create it).
    #[error("topic {topic} does not exist")]
    Unknown {
        /// The topic.
        topic: String,
    },
    /// The brokers answered with another error for the topic (an authorization failure, a
    /// topic being deleted).
    #[error("the brokers refuse topic {topic}: {code}")]
    Refused {
        /// The topic.
        topic: String,
        /// The broker's error.
        code: RDKafkaErrorCode,
    },
    /// The topic has no partitions to write to.
    #[error("topic {topic} has no partitions")]
    NoPartitions {
        /// The topic.
        topic: String,
    },
}

/// A Kafka producer for [`KafkaPayload`]s.
///
/// Cheap to share: wrap it in an `Arc` to use it from several steps.
pub struct KafkaProducer {
    client: FutureProducer<LoggingContext>,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("in_flight", &self.client.in_flight_count())
            .finish()
    }
}

impl KafkaProducer {
    /// Creates a producer with `config`.
    ///
    /// # Errors
    ///
    /// Invalid settings, or a client librdkafka refuses to create.
    pub fn new(config: &KafkaProducerConfig) -> Result<Self, KafkaProducerError> {
        let client = config
            .client_config()?
            .create_with_context(LoggingContext)?;
        Ok(Self { client })
    }

    /// Messages enqueued whose delivery is not reported yet.
    pub fn in_flight(&self) -> i32 {
        self.client.in_flight_count()
    }

    /// Waits up to `timeout` for every enqueued message to be delivered or fail.
    ///
    /// # Errors
    ///
    /// If messages are still in flight when `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.client.flush(Timeout::After(timeout))
    }

    /// Asks the brokers for `topic`'s metadata, waiting up to `timeout`, and returns its
    /// partition count: a start-time check that a topic this producer writes to exists, so a
    /// missing one is reported at once instead of at the first message sent to it.
    ///
    /// It reads metadata and writes nothing, so write permissions are not proven. A producer
    /// with `allow.auto.create.topics` on (librdkafka's default for producers) lets a broker
    /// that auto-creates topics create it, as its first message would.
    ///
    /// # Errors
    ///
    /// See [`TopicCheckError`].
    pub fn check_topic(&self, topic: &Topic, timeout: Duration) -> Result<usize, TopicCheckError> {
        let name = topic.as_str();
        let metadata = self
            .client
            .client()
            .fetch_metadata(Some(name), Timeout::After(timeout))
            .map_err(|source| TopicCheckError::Metadata {
                topic: name.to_owned(),
                source,
            })?;
        let Some(found) = metadata.topics().iter().find(|t| t.name() == name) else {
            return Err(TopicCheckError::Unknown {
                topic: name.to_owned(),
            });
        };
        match found.error() {
            None => {}
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => {
                return Err(TopicCheckError::Unknown {
                    topic: name.to_owned(),
                });
            }
            Some(code) => {
                return Err(TopicCheckError::Refused {
                    topic: name.to_owned(),
                    code: code.into(),
                });
            }
        }
        match found.partitions().len() {
            0 => Err(TopicCheckError::NoPartitions {
                topic: name.to_owned(),
            }),
            partitions => Ok(partitions),
        }
    }
}

/// Whether `error` (or any error in its source chain) is librdkafka or the broker refusing a
/// message for its size (`MSG_SIZE_TOO_LARGE`, against `message.max.bytes` on either side).
/// Sending such a message again cannot succeed; a caller that can split it should.
pub fn is_message_too_large(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(kafka) = error.downcast_ref::<KafkaError>()
            && kafka.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
        {
            return true;
        }
        current = error.source();
    }
    false
}

impl Producer<KafkaPayload> for KafkaProducer {
    fn produce(
        &self,
        destination: &Destination,
        payload: KafkaPayload,
    ) -> Result<DeliveryFuture, ProduceError<KafkaPayload>> {
        let topic = destination.topic().clone();
        let sent = {
            let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic.as_str());
            if let Some(key) = payload.key() {
                record = record.key(key);
            }
            if let Some(value) = payload.value() {
                record = record.payload(value);
            }
            if let Destination::Partition(partition) = destination {
                record = record.partition(i32::try_from(partition.index()).unwrap_or(i32::MAX));
            }
            let mut headers = payload.headers().peekable();
            if headers.peek().is_some() {
                record = record.headers(headers.fold(OwnedHeaders::new(), |all, (key, value)| {
                    all.insert(Header {
                        key,
                        value: Some(value),
                    })
                }));
            }
            // The record borrows the payload; keep only the error so the payload can be
            // handed back.
            self.client.send_result(record).map_err(|(error, _)| error)
        };
        match sent {
            Ok(delivery) => Ok(Box::pin(async move {
                match delivery.await {
                    Ok(Ok(delivered)) => Ok(Delivered {
                        partition: Partition::new(
                            topic,
                            u32::try_from(delivered.partition).unwrap_or_default(),
                        ),
                        offset: u64::try_from(delivered.offset).unwrap_or_default(),
                    }),
                    Ok(Err((error, _))) => Err(DeliveryError::Failed(error.into())),
                    Err(_) => Err(DeliveryError::Canceled),
                }
            })),
            Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                Err(ProduceError::QueueFull(payload))
            }
            Err(error) => Err(ProduceError::Failed {
                payload,
                source: error.into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    #[test]
    fn a_size_refusal_is_recognised_through_the_source_chain() {
        let too_large: BoxError =
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge).into();
        assert!(is_message_too_large(too_large.as_ref()));
        let delivery = DeliveryError::Failed(too_large);
        assert!(is_message_too_large(&delivery));

        let other: BoxError = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull).into();
        assert!(!is_message_too_large(other.as_ref()));
        assert!(!is_message_too_large(&DeliveryError::Canceled));
    }
}
