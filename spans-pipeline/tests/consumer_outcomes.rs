//! Output that cannot be produced: the flusher retries, then gives the segment up with an
//! outcome record on the outcomes topic, cleans it out of Redis, and keeps running.

#![allow(clippy::unwrap_used)]

#[path = "support/consumer.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use integration_tests::redis_server::{RedisMode, TestRedis};
use rill::backends::kafka::{KafkaPayload, KafkaProducer, KafkaProducerConfig};
use rill::{DeliveryError, DeliveryFuture, Destination, ProduceError, Producer};
use support::{ConsumerSetup, OUTPUT, Traces, kafka, runtime, wait_until_drained};

use support::OUTCOMES;

/// Fails every delivery to the output topic; everything else goes to Kafka.
struct BrokenOutput {
    kafka: KafkaProducer,
    attempts: Arc<AtomicUsize>,
}

impl Producer<KafkaPayload> for BrokenOutput {
    fn produce(
        &self,
        destination: &Destination,
        payload: KafkaPayload,
    ) -> Result<DeliveryFuture, ProduceError<KafkaPayload>> {
        if destination.topic().as_str() == OUTPUT {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            return Ok(Box::pin(async {
                Err(DeliveryError::Failed("broker refused the segment".into()))
            }));
        }
        self.kafka.produce(destination, payload)
    }
}

#[test]
fn segments_that_cannot_be_produced_become_outcomes_and_the_consumer_goes_on() {
    let kafka = kafka(1);
    let redis = TestRedis::start(RedisMode::Standalone);
    let runtime = runtime();
    let attempts = Arc::new(AtomicUsize::new(0));
    let producer = BrokenOutput {
        kafka: KafkaProducer::new(&KafkaProducerConfig::new(kafka.bootstrap_servers())).unwrap(),
        attempts: Arc::clone(&attempts),
    };
    let mut setup = ConsumerSetup {
        producer: Some(Arc::new(producer)),
        ..ConsumerSetup::default()
    };
    setup.config.flusher.produce_attempts = 2;
    setup.config.flusher.produce_backoff = Duration::from_millis(10);
    // Two traces of a root and three children each: two segments of four spans.
    let traces = Traces::new(1, 2, 3, 1);
    traces.produce(&kafka);

    let consumer = setup.start(&kafka, &redis, &runtime);
    wait_until_drained(&kafka, &redis, &traces.per_partition(1));
    let records = kafka.read_topic(OUTCOMES, 2, support::WAIT).unwrap();
    // `stop` fails the test if the consumer had stopped with an error.
    consumer.stop();

    // Each segment was sent `attempts` times, then given up with one record for its spans.
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    for record in &records {
        let text = String::from_utf8(record.payload.clone().unwrap()).unwrap();
        assert!(text.contains(r#""reason":"produce_failed""#), "{text}");
        assert!(text.contains(r#""quantity":4"#), "{text}");
        assert!(text.contains(r#""project_id":1"#), "{text}");
        assert!(text.contains(r#""outcome":3"#), "{text}");
    }
    assert!(kafka.read_all(OUTPUT, support::WAIT).unwrap().is_empty());
    // What the fault tests read to tell a reported loss: here the real one, 2 × 4 spans.
    assert_eq!(
        support::reported_lost(&kafka),
        std::collections::BTreeMap::from([("produce_failed".to_owned(), 8)])
    );
}
