//! A complete Kafka consumer: `numbers` → parse and square → batch → produce to `squares`,
//! with invalid messages dead-lettered to `dead-letters` and offsets committed once each batch
//! is delivered.
//!
//! ```sh
//! cargo run -p rill --example kafka_pipeline                      # in-process mock cluster
//! cargo run -p rill --example kafka_pipeline -- --bootstrap-servers 127.0.0.1:9092 --messages 50000
//! ```
//!
//! Against real brokers the three topics must exist (`numbers` with any number of partitions).
//! Without `--bootstrap-servers` the example starts librdkafka's mock cluster in this process
//! and creates them; the mock's first group join waits about three seconds.

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rill::backends::kafka::{
    KafkaConsumer, KafkaConsumerConfig, KafkaDlqProducer, KafkaPayload, KafkaProducer,
    KafkaProducerConfig,
};
use rill::dlq::DlqPolicy;
use rill::processor::{ProcessorConfig, StreamProcessor};
use rill::steps::{CommitOffsets, Produce, Reduce, RunTask};
use rill::{InvalidMessage, Message, Partition, ProcessingStrategy, SubmitError, Topic};

const INPUT: &str = "numbers";
const OUTPUT: &str = "squares";
const DEAD_LETTERS: &str = "dead-letters";
const PARTITIONS: i32 = 4;

struct Args {
    bootstrap_servers: Option<String>,
    messages: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        bootstrap_servers: None,
        messages: 10_000,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let value = words.next().ok_or(format!("{word} needs a value"))?;
        match word.as_str() {
            "--bootstrap-servers" => args.bootstrap_servers = Some(value),
            "--messages" => {
                args.messages = value.parse().map_err(|e| format!("--messages: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// `{"n": 12}` becomes the payload `144`; anything else is invalid.
fn square(message: Message<KafkaPayload>) -> Result<Message<u64>, SubmitError<KafkaPayload>> {
    #[derive(serde::Deserialize)]
    struct Number {
        n: u64,
    }
    let parsed = message
        .payload()
        .value()
        .ok_or_else(|| "empty message".to_owned())
        .and_then(|bytes| sonic_rs::from_slice::<Number>(bytes).map_err(|e| e.to_string()));
    match parsed {
        Ok(number) => Ok(message.map(|_| number.n.saturating_mul(number.n))),
        Err(reason) => Err(InvalidMessage::of(&message, reason).into()),
    }
}

/// One output message per batch: the squares, one per line.
fn join_batch(batch: Message<Vec<u64>>) -> Result<Message<KafkaPayload>, SubmitError<Vec<u64>>> {
    Ok(batch.map(|squares| {
        let lines: Vec<String> = squares.iter().map(u64::to_string).collect();
        KafkaPayload::new(None, Some(lines.join("\n").into_bytes()))
    }))
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    // Kept alive for the whole run when used.
    let mock;
    let bootstrap_servers = match &args.bootstrap_servers {
        Some(servers) => servers.clone(),
        None => {
            mock = MockCluster::new(1)?;
            for (topic, partitions) in [(INPUT, PARTITIONS), (OUTPUT, 1), (DEAD_LETTERS, 1)] {
                mock.create_topic(topic, partitions, 1)?;
            }
            mock.bootstrap_servers()
        }
    };

    let invalid = produce_input(&bootstrap_servers, args.messages)?;
    println!(
        "produced {} messages to {INPUT} ({invalid} invalid)",
        args.messages
    );

    let producer = Arc::new(KafkaProducer::new(&KafkaProducerConfig::new(
        &bootstrap_servers,
    ))?);
    let consumer = KafkaConsumer::subscribe(
        &KafkaConsumerConfig::new(&bootstrap_servers, "squarers"),
        &[INPUT],
    )?;
    let pipeline_producer = Arc::clone(&producer);
    let factory = move |_: &[Partition]| -> Box<dyn ProcessingStrategy<KafkaPayload> + Send> {
        // Built from the last step back: square → batch → join → produce → commit.
        let commit = CommitOffsets::new(Duration::from_millis(200));
        let produce = Produce::new(Arc::clone(&pipeline_producer), Topic::new(OUTPUT), commit);
        let join = RunTask::new(join_batch, produce);
        let batch = Reduce::vec(500, Duration::from_millis(100), join);
        Box::new(RunTask::new(square, batch))
    };
    let mut processor = StreamProcessor::new(consumer, factory)
        .with_config(ProcessorConfig::default().with_join_timeout(Duration::from_secs(10)))
        .with_dlq(DlqPolicy::new(KafkaDlqProducer::new(
            Arc::clone(&producer),
            Topic::new(DEAD_LETTERS),
        )));

    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    while processor.committed().values().sum::<u64>() < args.messages {
        if Instant::now() > deadline {
            return Err("not everything was committed within two minutes".into());
        }
        processor.run_once()?;
    }
    let elapsed = started.elapsed();
    processor.shutdown()?;

    let stats = processor.stats();
    println!(
        "consumed and committed {} messages in {:.2?} ({:.0} messages/s)",
        args.messages,
        elapsed,
        args.messages as f64 / elapsed.as_secs_f64()
    );
    println!(
        "dead-lettered {} invalid messages to {DEAD_LETTERS}; {} commits; {} rebalances",
        stats.dead_lettered, stats.commits, stats.rebalances
    );
    Ok(())
}

/// Produces `count` JSON numbers round robin over the input partitions; every 1000th message
/// is not JSON. Returns how many invalid messages were produced.
fn produce_input(bootstrap_servers: &str, count: u64) -> Result<u64, Box<dyn Error>> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap_servers)
        .set("linger.ms", "5")
        .create()?;
    let mut invalid = 0;
    for n in 0..count {
        let value = if n % 1000 == 999 {
            invalid += 1;
            "not a number".to_owned()
        } else {
            format!("{{\"n\":{n}}}")
        };
        let partition = i32::try_from(n % PARTITIONS as u64)?;
        let mut record: BaseRecord<'_, (), String> =
            BaseRecord::to(INPUT).payload(&value).partition(partition);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(invalid)
}
