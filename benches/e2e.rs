//! `make bench-e2e`: the consumer end to end on the reference workload, against the buffer's
//! own speed measured in the same run.
//!
//! Why this bench: the buffer alone (`spans-pipeline replay`) ingests several times faster
//! than the consumer users run, and only a run of the whole consumer shows where the
//! difference goes (batching, waiting, pausing, Redis work per span). So each run:
//!
//! - starts librdkafka's mock cluster in a child process (this binary with `--broker`), so the
//!   broker, the feeder and the output reader do not share the consumer's process; the child
//!   produces the workload (`spans_pipeline::workload`, 200k spans by default) to 16
//!   partitions keyed by trace id, each message's Kafka timestamp set to the span's `received`
//!   time, so the consumer's clock follows workload time. The mock broker keeps only about
//!   5 MB per partition, less than the workload: the child preloads as much as fits (messages
//!   are lz4-compressed, as a producer in front of the real topic compresses them) and tops
//!   each partition up while the consumer commits, far enough ahead that the consumer never
//!   waits for input;
//! - runs the consumer (decode → batch → ProcessSpans → FlushSegments → CommitOffsets) as
//!   `spans-pipeline run` does, with production flush timeouts (60 s / 10 s), on a real
//!   `redis-server`;
//! - ends the workload clock with a tick: once every offset is committed, the child produces
//!   one more span stamped 70 s after the last one, alone in its batch, so every segment comes
//!   due without waiting 60 s of wall time (the tick's own segment is flushed 10 s later and
//!   is not counted);
//! - reads the output topic back (in the child) and checks every span came out once;
//! - replays the same workload with `spans_pipeline::replay` on a fresh Redis.
//!
//! Printed per run and as medians: ingest spans/s (first message submitted → every offset
//! committed), end-to-end spans/s (→ every span out), Redis CPU seconds per 100k spans,
//! segments out against traces, the share of traces out as one complete segment, pauses,
//! lost and duplicate spans, p50/p99 latency (span committed → its segment read back) and the
//! replay's ingest and the ratio.
//!
//! Usage: `cargo bench -p benches --bench e2e -- [--spans N] [--runs N] [--batch-time-ms N]`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use rill::backends::kafka::{
    KafkaConsumer, KafkaConsumerConfig, KafkaPayload, KafkaProducer, KafkaProducerConfig,
};
use rill::processor::{ProcessorConfig, StreamProcessor};
use rill::{
    CommitRequest, Message, Partition, ProcessingStrategy, Producer, StrategyError, SubmitError,
    wrap_pipelines,
};
use spans_pipeline::buffer::RedisConnection;
use spans_pipeline::config::Config;
use spans_pipeline::consumer::SpansStrategyFactory;
use spans_pipeline::replay::{CommandStat, ReplayArgs, command_stats, keys_left, redis_cpu_secs};
use spans_pipeline::workload::{
    GeneratedSpan, WorkloadShape, clock_tick, generate, partition_of, write_jsonl,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PARTITIONS: i32 = 16;
const OUTPUT_PARTITIONS: i32 = 32;
const INPUT: &str = "ingest-spans";
const OUTPUT: &str = "buffered-segments";
const GROUP: &str = "bench-e2e";
/// Uncompressed bytes produced but not committed, per partition. lz4 shrinks these payloads
/// more than twice, so this stays well under the mock broker's 5 MB per partition.
const AHEAD_BYTES: usize = 8 << 20;
/// The tick that ends the workload clock: this long after the last span, past the 60 s
/// timeout.
const TICK_AFTER_SECS: f64 = 70.0;
/// After the tick, how long the output may stay silent before the spans not out are lost.
const STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a run may take before the bench gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Args {
    spans: usize,
    runs: usize,
    batch_time: Duration,
}

fn parse_args() -> Result<(bool, Args), BoxError> {
    let mut args = Args {
        spans: WorkloadShape::default().spans,
        runs: 3,
        batch_time: Duration::from_millis(100),
    };
    let mut broker = false;
    let mut iter = std::env::args().skip(1);
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--broker" => broker = true,
            "--spans" => args.spans = iter.next().ok_or("--spans N")?.parse()?,
            "--runs" => args.runs = iter.next().ok_or("--runs N")?.parse()?,
            "--batch-time-ms" => {
                args.batch_time =
                    Duration::from_millis(iter.next().ok_or("--batch-time-ms N")?.parse()?);
            }
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok((broker, args))
}

fn workload(spans: usize) -> Vec<GeneratedSpan> {
    generate(&WorkloadShape {
        spans,
        ..WorkloadShape::default()
    })
}

fn unix_nanos(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

fn main() -> Result<(), BoxError> {
    let (broker, args) = parse_args()?;
    if broker {
        return broker_main(&args);
    }
    let load = workload(args.spans);
    let traces = load
        .iter()
        .map(|span| span.trace_id.as_str())
        .collect::<HashSet<_>>()
        .len();
    eprintln!(
        "bench-e2e: {} spans in {traces} traces, {PARTITIONS} partitions, {} runs, batch time {:?}",
        load.len(),
        args.runs,
        args.batch_time
    );
    let file = std::env::temp_dir().join(format!("bench-e2e-{}.jsonl", std::process::id()));
    write_jsonl(
        &load,
        std::io::BufWriter::new(std::fs::File::create(&file)?),
    )?;
    let mut consumer_runs = Vec::new();
    let mut replay_runs = Vec::new();
    // Alternating, so both see the same state of a noisy machine.
    for run in 0..args.runs {
        let replay = replay_once(&file)?;
        eprintln!(
            "run {}: replay ingest {:.0} spans/s, redis {:.2} s/100k (ingest {:.2})",
            run + 1,
            replay.ingest_rate,
            replay.redis_per_100k,
            replay.ingest_redis_per_100k
        );
        let consumer = consumer_once(&args, traces)?;
        eprintln!("run {}: consumer {consumer}", run + 1);
        replay_runs.push(replay);
        consumer_runs.push(consumer);
    }
    let _ = std::fs::remove_file(&file);
    print_summary(&consumer_runs, &replay_runs, load.len());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The consumer side.

#[derive(Debug, Clone, Default)]
struct ConsumerRun {
    ingest_rate: f64,
    e2e_rate: f64,
    redis_per_100k: f64,
    segments: usize,
    traces: usize,
    whole_share: f64,
    pauses: u64,
    lost: usize,
    duplicates: usize,
    p50: Duration,
    p99: Duration,
    keys_left: u64,
    commands: Vec<CommandStat>,
}

impl std::fmt::Display for ConsumerRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ingest {:.0} spans/s, end to end {:.0} spans/s, redis {:.2} s/100k, {} segments for {} traces ({:.2} % whole), {} pauses, lost {}, duplicates {}, latency p50 {:.2?} p99 {:.2?}, keys left {}",
            self.ingest_rate,
            self.e2e_rate,
            self.redis_per_100k,
            self.segments,
            self.traces,
            self.whole_share * 100.0,
            self.pauses,
            self.lost,
            self.duplicates,
            self.p50,
            self.p99,
            self.keys_left
        )
    }
}

/// The broker child, spoken to by lines on its stdin and stdout.
struct BrokerProcess {
    child: Child,
    stdin: ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl BrokerProcess {
    fn start(args: &Args) -> Result<Self, BoxError> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--broker", "--spans", &args.spans.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take().ok_or("child stdin")?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        Ok(Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next line starting with `word`, without the word.
    fn expect(&mut self, word: &str) -> Result<String, BoxError> {
        for line in self.lines.by_ref() {
            let line = line?;
            if let Some(rest) = line.strip_prefix(word) {
                return Ok(rest.trim().to_owned());
            }
            eprintln!("broker: {line}");
        }
        Err(format!("the broker process ended before saying {word}").into())
    }

    fn send(&mut self, command: &str) -> Result<(), BoxError> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        Ok(())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        // Closing stdin ends the child; wait so no broker outlives its run.
        let _ = self.send("quit");
        let _ = self.child.wait();
    }
}

/// Records when the first message reached the pipeline.
#[derive(Clone, Default)]
struct FirstSubmit(Arc<OnceLock<SystemTime>>);

struct Timed {
    inner: Box<dyn ProcessingStrategy<KafkaPayload> + Send>,
    first: FirstSubmit,
}

impl ProcessingStrategy<KafkaPayload> for Timed {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        self.inner.poll()
    }
    fn submit(&mut self, message: Message<KafkaPayload>) -> Result<(), SubmitError<KafkaPayload>> {
        self.first.0.get_or_init(SystemTime::now);
        self.inner.submit(message)
    }
    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        self.inner.join(deadline)
    }
    fn close(&mut self) {
        self.inner.close();
    }
    fn terminate(&mut self) {
        self.inner.terminate();
    }
    fn next_deadline(&self) -> Option<Instant> {
        self.inner.next_deadline()
    }
}

fn consumer_once(args: &Args, traces: usize) -> Result<ConsumerRun, BoxError> {
    let mut broker = BrokerProcess::start(args)?;
    let bootstrap = broker.expect("bootstrap")?;
    let preloaded = broker.expect("ready")?;
    eprintln!("broker: {preloaded} spans preloaded");
    let redis = RedisServer::start();
    let nodes = [redis.url()];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let connection = runtime.block_on(RedisConnection::connect(&nodes, false))?;
    let producer: Arc<dyn Producer<KafkaPayload>> = Arc::new(KafkaProducer::new(
        &KafkaProducerConfig::new(&bootstrap)
            .with_override("linger.ms", "2")
            // Segments are keyless: spread them, so no output partition overflows the mock.
            .with_override("sticky.partitioning.linger.ms", "0"),
    )?);
    let mut config = Config::default();
    config.kafka.outcomes_topic = String::new();
    // Sentry's buffer options as they are, flush locks off included.
    config.buffer.flush_lock_ttl = Duration::ZERO;
    config.consumer.max_batch_time = args.batch_time;
    config.consumer.commit_interval = Duration::from_millis(100);
    let factory =
        SpansStrategyFactory::from_config(&config, connection, producer, runtime.handle().clone());
    let first = FirstSubmit::default();
    let timed = {
        let first = first.clone();
        wrap_pipelines(
            factory,
            move |_: &[Partition], inner: Box<dyn ProcessingStrategy<KafkaPayload> + Send>| {
                Box::new(Timed {
                    inner,
                    first: first.clone(),
                }) as Box<dyn ProcessingStrategy<KafkaPayload> + Send>
            },
        )
    };
    let consumer = KafkaConsumer::subscribe(
        &KafkaConsumerConfig::new(&bootstrap, GROUP).with_override("log_level", "3"),
        &[INPUT],
    )?;
    let mut processor = StreamProcessor::new(consumer, timed)
        .with_config(ProcessorConfig::default().with_join_timeout(Duration::from_secs(30)));
    let handle = processor.handle();
    let cpu_before = redis_cpu_secs(&nodes)?;
    let thread = std::thread::spawn(move || {
        let result = processor.run();
        (result, processor.stats())
    });

    let committed: u128 = broker.expect("committed")?.parse()?;
    broker.send("tick")?;
    let all_out: u128 = broker.expect("all-out")?.parse()?;
    let cpu = redis_cpu_secs(&nodes)? - cpu_before;
    let commands = command_stats(&nodes)?;
    // The tick's own segment comes due 10 s after it; untimed.
    let deadline = Instant::now() + Duration::from_secs(30);
    while keys_left(&nodes)? > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let keys_left = keys_left(&nodes)?;
    handle.signal_shutdown();
    let (result, stats) = thread.join().map_err(|_| "consumer thread panicked")?;
    if let Err(error) = result {
        eprintln!("the consumer stopped with an error: {error:?}");
    }
    broker.send("report")?;
    let report: OutputReport = serde_json::from_str(&broker.expect("report")?)?;
    let first = unix_nanos(*first.0.get().ok_or("nothing was submitted")?);
    let secs = |end: u128| end.saturating_sub(first) as f64 / 1e9;
    let spans = args.spans as f64;
    Ok(ConsumerRun {
        ingest_rate: spans / secs(committed),
        e2e_rate: spans / secs(all_out),
        redis_per_100k: cpu * 100_000.0 / spans,
        segments: report.segments,
        traces,
        whole_share: report.whole_traces as f64 / traces.max(1) as f64,
        pauses: stats.pauses,
        lost: report.lost,
        duplicates: report.duplicates,
        p50: Duration::from_micros(report.p50_us),
        p99: Duration::from_micros(report.p99_us),
        keys_left,
        commands,
    })
}

// ---------------------------------------------------------------------------------------------
// The replay side.

#[derive(Debug, Clone, Default)]
struct ReplayRun {
    ingest_rate: f64,
    ingest_redis_per_100k: f64,
    redis_per_100k: f64,
    commands: Vec<CommandStat>,
}

fn replay_once(file: &std::path::Path) -> Result<ReplayRun, BoxError> {
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(spans_pipeline::replay::run(&ReplayArgs {
        file: file.to_owned(),
        redis_url: redis.url(),
        cluster: false,
        batch_size: 2000,
        output: None,
        no_flush: false,
        compression_level: 0,
        max_spans_per_evalsha: 0,
    }))?;
    let per_100k = |secs: f64| secs * 100_000.0 / report.spans_in.max(1) as f64;
    Ok(ReplayRun {
        ingest_rate: report.ingest.spans_per_sec,
        ingest_redis_per_100k: per_100k(report.ingest.redis_cpu_secs),
        redis_per_100k: per_100k(report.ingest.redis_cpu_secs + report.flush.redis_cpu_secs),
        commands: command_stats(&[redis.url()])?,
    })
}

// ---------------------------------------------------------------------------------------------
// Summary.

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn print_summary(consumer: &[ConsumerRun], replay: &[ReplayRun], spans: usize) {
    let of = |f: fn(&ConsumerRun) -> f64| median(consumer.iter().map(f).collect());
    let replay_of = |f: fn(&ReplayRun) -> f64| median(replay.iter().map(f).collect());
    let ratios: Vec<f64> = consumer
        .iter()
        .zip(replay)
        .map(|(c, r)| c.ingest_rate / r.ingest_rate)
        .collect();
    let redis_ratios: Vec<f64> = consumer
        .iter()
        .zip(replay)
        .map(|(c, r)| c.redis_per_100k / r.redis_per_100k)
        .collect();
    let Some(last) = consumer.last() else {
        return;
    };
    println!("bench-e2e summary (medians of {} runs)", consumer.len());
    println!(
        "  consumer ingest          {:>10.0} spans/s",
        of(|r| r.ingest_rate)
    );
    println!(
        "  consumer end to end      {:>10.0} spans/s",
        of(|r| r.e2e_rate)
    );
    println!(
        "  replay ingest            {:>10.0} spans/s",
        replay_of(|r| r.ingest_rate)
    );
    println!("  ingest ratio             {:>10.2}", median(ratios));
    println!(
        "  redis cpu / 100k spans   {:>10.2} s (replay {:.2} s, ratio {:.2})",
        of(|r| r.redis_per_100k),
        replay_of(|r| r.redis_per_100k),
        median(redis_ratios)
    );
    println!(
        "  segments out             {:>10.0} for {} traces",
        of(|r| r.segments as f64),
        last.traces
    );
    println!(
        "  traces as one segment    {:>10.2} %",
        of(|r| r.whole_share) * 100.0
    );
    println!(
        "  pauses                   {:>10.0}",
        of(|r| r.pauses as f64)
    );
    println!(
        "  lost / duplicates        {:>10} / {} (all runs)",
        consumer.iter().map(|r| r.lost).sum::<usize>(),
        consumer.iter().map(|r| r.duplicates).sum::<usize>()
    );
    println!(
        "  latency p50 / p99        {:>10.2?} / {:.2?} (committed → out)",
        Duration::from_secs_f64(of(|r| r.p50.as_secs_f64())),
        Duration::from_secs_f64(of(|r| r.p99.as_secs_f64()))
    );
    println!(
        "  redis keys left          {:>10} (all runs)",
        consumer.iter().map(|r| r.keys_left).sum::<u64>()
    );
    if let Some(replay) = replay.last() {
        print_commands(last, replay, 100_000.0 / spans as f64);
    }
}

/// The last run's Redis commands, consumer beside replay, per 100k spans: where Redis' time
/// goes, and how the consumer's calls differ from the buffer's own.
fn print_commands(consumer: &ConsumerRun, replay: &ReplayRun, per_100k: f64) {
    println!("  redis commands per 100k spans (last run): calls and server time");
    println!(
        "    {:<14} {:>10} {:>10}   {:>10} {:>10}",
        "command", "consumer", "ms", "replay", "ms"
    );
    let mut names: Vec<&str> = consumer
        .commands
        .iter()
        .chain(&replay.commands)
        .map(|stat| stat.command.as_str())
        .collect();
    let mut seen = HashSet::new();
    names.retain(|name| seen.insert(*name));
    let find = |stats: &[CommandStat], name: &str| {
        stats
            .iter()
            .find(|stat| stat.command == name)
            .map_or((0.0, 0.0), |stat| {
                (
                    stat.calls as f64 * per_100k,
                    stat.usec as f64 / 1000.0 * per_100k,
                )
            })
    };
    for name in names.into_iter().take(10) {
        let (calls, ms) = find(&consumer.commands, name);
        let (replay_calls, replay_ms) = find(&replay.commands, name);
        println!(
            "    {name:<14} {calls:>10.0} {ms:>10.1}   {replay_calls:>10.0} {replay_ms:>10.1}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The broker process: mock cluster, feeder, output reader.

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct OutputReport {
    segments: usize,
    whole_traces: usize,
    lost: usize,
    duplicates: usize,
    p50_us: u64,
    p99_us: u64,
}

/// Where each partition's feed stands.
struct Feed {
    /// Indices into the load, in produce order.
    spans: Vec<usize>,
    /// How many are produced.
    produced: usize,
    /// Bytes produced, cumulative, by offset (`bytes[n]` = bytes of offsets `0..n`).
    bytes: Vec<usize>,
    /// (when, committed offset) each time the commit moved.
    commits: Vec<(SystemTime, i64)>,
}

fn broker_main(args: &Args) -> Result<(), BoxError> {
    let kafka = MockKafka::start(1)?;
    kafka.create_topic(INPUT, PARTITIONS)?;
    kafka.create_topic(OUTPUT, OUTPUT_PARTITIONS)?;
    let bootstrap = kafka.bootstrap_servers().to_owned();
    println!("bootstrap {bootstrap}");
    let load = workload(args.spans);
    let mut feeds: Vec<Feed> = (0..PARTITIONS)
        .map(|_| Feed {
            spans: Vec::new(),
            produced: 0,
            bytes: vec![0],
            commits: Vec::new(),
        })
        .collect();
    for (index, span) in load.iter().enumerate() {
        let feed = &mut feeds[partition_of(&span.trace_id, PARTITIONS) as usize];
        feed.spans.push(index);
        let total = feed.bytes.last().copied().unwrap_or(0) + span.payload.len();
        feed.bytes.push(total);
    }
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("log_level", "3")
        .create()?;
    let committed_reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", GROUP)
        .set("log_level", "3")
        .create()?;
    let fill = |feeds: &mut [Feed], committed: &[i64]| -> Result<usize, BoxError> {
        let mut sent = 0;
        for (partition, feed) in feeds.iter_mut().enumerate() {
            let done = usize::try_from(committed[partition]).unwrap_or(0);
            let limit = feed.bytes[done.min(feed.spans.len())] + AHEAD_BYTES;
            while feed.produced < feed.spans.len() && feed.bytes[feed.produced + 1] <= limit {
                let span = &load[feed.spans[feed.produced]];
                send(&producer, &span.payload, partition as i32, span)?;
                feed.produced += 1;
                sent += 1;
            }
        }
        producer.poll(Duration::ZERO);
        Ok(sent)
    };
    let mut committed = vec![0_i64; PARTITIONS as usize];
    let preloaded = fill(&mut feeds, &committed)?;
    producer.flush(Duration::from_secs(60))?;
    let reader = OutputReader::start(&bootstrap)?;
    println!("ready {preloaded}");

    let (commands, received) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if commands.send(line).is_err() {
                break;
            }
        }
    });
    let total = i64::try_from(load.len())?;
    let mut reported_committed = false;
    let mut ticked = false;
    let mut reported_out = false;
    let (mut last_out, mut last_progress) = (0, Instant::now());
    let started = Instant::now();
    loop {
        match received.try_recv() {
            Ok(command) if command == "tick" && !ticked => {
                let tick = clock_tick();
                let last = load.iter().map(|s| s.received).fold(f64::MIN, f64::max);
                let mut record = BaseRecord::<str, [u8]>::to(INPUT)
                    .payload(&tick.payload)
                    .key(&tick.trace_id)
                    .partition(0);
                record = record.timestamp(((last + TICK_AFTER_SECS) * 1000.0) as i64);
                producer.send(record).map_err(|(error, _)| error)?;
                producer.flush(Duration::from_secs(10))?;
                ticked = true;
            }
            Ok(command) if command == "report" => {
                reader.stop();
                let report = output_report(&load, &feeds, &reader);
                println!("report {}", serde_json::to_string(&report)?);
                std::io::stdout().flush()?;
            }
            Ok(command) if command == "quit" => break,
            Ok(_) | Err(std::sync::mpsc::TryRecvError::Empty) => {}
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
        }
        if !reported_committed {
            let now = SystemTime::now();
            let offsets = committed_offsets(&committed_reader)?;
            for (partition, offset) in offsets.into_iter().enumerate() {
                if offset > committed[partition] {
                    committed[partition] = offset;
                    feeds[partition].commits.push((now, offset));
                }
            }
            fill(&mut feeds, &committed)?;
            if committed.iter().sum::<i64>() >= total {
                reported_committed = true;
                println!("committed {}", unix_nanos(now));
            }
        }
        let out = reader.spans.load(Ordering::Acquire);
        if out != last_out {
            last_out = out;
            last_progress = Instant::now();
        }
        // Spans the buffer lost never come out: once nothing came for a while after the tick,
        // the run ends there and the report counts them.
        let stalled = ticked && last_progress.elapsed() > STALL_TIMEOUT;
        if !reported_out && (out >= load.len() || stalled) {
            reported_out = true;
            if stalled {
                eprintln!(
                    "broker: {out} of {} spans out, nothing more for {STALL_TIMEOUT:?}",
                    load.len()
                );
            }
            let last = *reader.last_arrival.lock().map_err(|_| "poisoned")?;
            println!("all-out {}", unix_nanos(last));
        }
        std::io::stdout().flush()?;
        if started.elapsed() > RUN_TIMEOUT {
            println!("timeout");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    reader.stop();
    Ok(())
}

fn send(
    producer: &BaseProducer,
    payload: &[u8],
    partition: i32,
    span: &GeneratedSpan,
) -> Result<(), BoxError> {
    let mut record = BaseRecord::<str, [u8]>::to(INPUT)
        .payload(payload)
        .key(&span.trace_id)
        .partition(partition)
        .timestamp((span.received * 1000.0) as i64);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                back,
            )) => {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((error, _)) => return Err(error.into()),
        }
    }
}

fn committed_offsets(client: &BaseConsumer) -> Result<Vec<i64>, BoxError> {
    let mut query = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        query.add_partition(INPUT, partition);
    }
    let committed = client.committed_offsets(query, Duration::from_secs(10))?;
    Ok((0..PARTITIONS)
        .map(|partition| {
            committed
                .find_partition(INPUT, partition)
                .and_then(|entry| entry.offset().to_raw())
                .filter(|offset| *offset >= 0)
                .unwrap_or(0)
        })
        .collect())
}

/// An output message and when it was read.
type Arrival = (SystemTime, Vec<u8>);

/// Reads the output topic from its beginning while the run goes on; messages are kept raw and
/// parsed after the run, so the reader costs little while the consumer is measured.
struct OutputReader {
    stop: Arc<AtomicBool>,
    spans: Arc<AtomicUsize>,
    last_arrival: Arc<Mutex<SystemTime>>,
    messages: Arc<Mutex<Vec<Arrival>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl OutputReader {
    fn start(bootstrap: &str) -> Result<Self, BoxError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "bench-e2e-reader")
            .set("enable.auto.commit", "false")
            .set("log_level", "3")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for partition in 0..OUTPUT_PARTITIONS {
            assignment.add_partition_offset(OUTPUT, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let reader = Self {
            stop: Arc::new(AtomicBool::new(false)),
            spans: Arc::new(AtomicUsize::new(0)),
            last_arrival: Arc::new(Mutex::new(SystemTime::now())),
            messages: Arc::new(Mutex::new(Vec::new())),
            thread: Mutex::new(None),
        };
        let (stop, spans, last, messages) = (
            Arc::clone(&reader.stop),
            Arc::clone(&reader.spans),
            Arc::clone(&reader.last_arrival),
            Arc::clone(&reader.messages),
        );
        let tick = clock_tick().span_id;
        let thread = std::thread::spawn(move || {
            let finder = memchr::memmem::Finder::new(b"\"span_id\":");
            while !stop.load(Ordering::Acquire) {
                let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let now = SystemTime::now();
                let payload = message.payload().unwrap_or_default().to_vec();
                // The tick's segment is not part of the workload.
                if memchr::memmem::find(&payload, tick.as_bytes()).is_none() {
                    spans.fetch_add(finder.find_iter(&payload).count(), Ordering::AcqRel);
                    if let Ok(mut last) = last.lock() {
                        *last = now;
                    }
                }
                if let Ok(mut messages) = messages.lock() {
                    messages.push((now, payload));
                }
            }
        });
        *reader.thread.lock().map_err(|_| "poisoned")? = Some(thread);
        Ok(reader)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

#[derive(serde::Deserialize)]
struct OutSegment {
    spans: Vec<OutSpan>,
}

#[derive(serde::Deserialize)]
struct OutSpan {
    trace_id: String,
    span_id: String,
}

fn output_report(load: &[GeneratedSpan], feeds: &[Feed], reader: &OutputReader) -> OutputReport {
    // Where each span was produced, and when its offset was committed.
    let mut committed_at: HashMap<&str, SystemTime> = HashMap::with_capacity(load.len());
    for feed in feeds {
        for (offset, &index) in feed.spans.iter().enumerate() {
            let offset = i64::try_from(offset).unwrap_or(i64::MAX);
            let at = feed
                .commits
                .iter()
                .find(|(_, committed)| *committed > offset)
                .map_or(UNIX_EPOCH, |(at, _)| *at);
            committed_at.insert(load[index].span_id.as_str(), at);
        }
    }
    let trace_sizes = load.iter().fold(HashMap::new(), |mut sizes, span| {
        *sizes.entry(span.trace_id.as_str()).or_insert(0_usize) += 1;
        sizes
    });
    let tick = clock_tick();
    let mut seen: HashMap<String, usize> = HashMap::with_capacity(load.len());
    let mut segments_of: HashMap<String, Vec<usize>> = HashMap::new();
    let mut latencies = Vec::with_capacity(load.len());
    let mut report = OutputReport::default();
    let messages = reader
        .messages
        .lock()
        .map(|mut m| std::mem::take(&mut *m))
        .unwrap_or_default();
    for (arrival, payload) in &messages {
        let Ok(segment) = serde_json::from_slice::<OutSegment>(payload) else {
            continue;
        };
        let Some(first) = segment.spans.first() else {
            continue;
        };
        if first.trace_id == tick.trace_id {
            continue;
        }
        report.segments += 1;
        segments_of
            .entry(first.trace_id.clone())
            .or_default()
            .push(segment.spans.len());
        for span in &segment.spans {
            let count = seen.entry(span.span_id.clone()).or_insert(0);
            *count += 1;
            if *count > 1 {
                report.duplicates += 1;
            } else if let Some(at) = committed_at.get(span.span_id.as_str()) {
                latencies.push(arrival.duration_since(*at).unwrap_or_default());
            }
        }
    }
    report.lost = load
        .iter()
        .filter(|span| !seen.contains_key(&span.span_id))
        .count();
    report.whole_traces = segments_of
        .iter()
        .filter(|(trace, sizes)| {
            sizes.len() == 1 && trace_sizes.get(trace.as_str()) == Some(&sizes[0])
        })
        .count();
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    };
    report.p50_us = at(0.5);
    report.p99_us = at(0.99);
    report
}
