//! The Kafka dead-letter producer: the raw message, unchanged, with its origin in headers.
//!
//! Whoever reads the dead-letter topic must be able to find the original message again and
//! replay it: the original key, value and headers are kept as they were, and four headers are
//! added — `original_topic`, `original_partition`, `original_offset` and `invalid_reason`.
//! The processor commits the original offset only once the returned delivery future confirms
//! the write.

use super::payload::KafkaPayload;
use super::producer::KafkaProducer;
use crate::backends::{DeliveryFuture, Destination, ProduceError, Producer};
use crate::dlq::{DeadLetter, DlqProducer};
use crate::message::Topic;

/// Header naming the topic an invalid message was consumed from.
pub const ORIGINAL_TOPIC_HEADER: &str = "original_topic";
/// Header with the partition index it was consumed from (decimal).
pub const ORIGINAL_PARTITION_HEADER: &str = "original_partition";
/// Header with its offset in that partition (decimal).
pub const ORIGINAL_OFFSET_HEADER: &str = "original_offset";
/// Header with the reason it was found invalid.
pub const INVALID_REASON_HEADER: &str = "invalid_reason";

/// Writes dead letters to a Kafka topic with a [`KafkaProducer`].
///
/// The producer may be shared (`Arc<KafkaProducer>`) with other steps.
#[derive(Debug)]
pub struct KafkaDlqProducer<P = KafkaProducer> {
    producer: P,
    topic: Topic,
}

impl<P> KafkaDlqProducer<P> {
    /// Dead letters go to `topic` through `producer`.
    pub fn new(producer: P, topic: Topic) -> Self {
        Self { producer, topic }
    }
}

impl<P: Producer<KafkaPayload>> DlqProducer<KafkaPayload> for KafkaDlqProducer<P> {
    fn produce(
        &mut self,
        dead_letter: DeadLetter<KafkaPayload>,
    ) -> Result<DeliveryFuture, ProduceError<DeadLetter<KafkaPayload>>> {
        tracing::info!(
            partition = %dead_letter.partition,
            offset = dead_letter.offset,
            reason = %dead_letter.reason,
            "Dead-lettering invalid message."
        );
        let labelled = dead_letter
            .payload
            .clone()
            .with_header(
                ORIGINAL_TOPIC_HEADER,
                dead_letter.partition.topic().as_str().as_bytes().to_vec(),
            )
            .with_header(
                ORIGINAL_PARTITION_HEADER,
                dead_letter.partition.index().to_string().into_bytes(),
            )
            .with_header(
                ORIGINAL_OFFSET_HEADER,
                dead_letter.offset.to_string().into_bytes(),
            )
            .with_header(
                INVALID_REASON_HEADER,
                dead_letter.reason.as_bytes().to_vec(),
            );
        let destination = Destination::Topic(self.topic.clone());
        // The labelled copy is dropped on failure; the dead letter (still holding the original
        // payload) is what goes back to be retried.
        self.producer
            .produce(&destination, labelled)
            .map_err(|error| match error {
                ProduceError::QueueFull(_) => ProduceError::QueueFull(dead_letter),
                ProduceError::Failed { source, .. } => ProduceError::Failed {
                    payload: dead_letter,
                    source,
                },
            })
    }
}
