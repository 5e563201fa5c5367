//! `spans-pipeline` command line: one subcommand per way of running the buffer.
//!
//! `main` is synchronous: the stream processor and the demo block their thread and drive their
//! own tokio runtime, which must not be the thread they run on.

use clap::{Args, Parser, Subcommand};
use spans_pipeline::progress::Progress;

// The buffer allocates a buffer per payload, frame and command; mimalloc's thread-local free
// lists take about a fifth off the flush's CPU compared with the system allocator (see
// docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The spans buffer consumer and its tools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the process-spans consumer: Kafka in, Redis buffer, segments out.
    Run(RunArgs),
    /// Feed a JSONL span workload through the buffer on a Redis, flush everything, and print
    /// a JSON report (counts, Redis CPU, throughput).
    Replay(spans_pipeline::replay::ReplayArgs),
    /// Run the whole consumer on an embedded default (an in-process mock Kafka cluster, a local
    /// redis-server, a synthetic trace load) and print a summary.
    Demo(DemoArgs),
    /// Write the reference workload (deterministic from its seed) as a JSONL file of
    /// `ingest-spans` message values, for `replay` and the benches.
    GenWorkload(spans_pipeline::workload::GenWorkloadArgs),
    /// Report what is inside a live buffer (queues, due segments, flush lag, the largest
    /// segments and hottest traces, memory per node and key family, leftovers); read-only and
    /// bounded, safe on a production cluster.
    Inspect(spans_pipeline::inspect::InspectArgs),
}

/// Options of `spans-pipeline run`. Settings come from the TOML file, then
/// `SPANS_PIPELINE__SECTION__KEY` environment variables, then these flags.
#[derive(Debug, Args)]
struct RunArgs {
    /// The TOML configuration file (every key has a default).
    #[arg(long, short)]
    config: Option<std::path::PathBuf>,
    /// Override any key, e.g. `--set buffer.root_timeout=5s` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    overrides: Vec<String>,
    /// Shorthand for `--set kafka.bootstrap_servers=...`.
    #[arg(long)]
    bootstrap_servers: Option<String>,
    /// Shorthand for `--set kafka.group_id=...`.
    #[arg(long)]
    group_id: Option<String>,
    /// Shorthand for `--set redis.urls=[...]` with one URL.
    #[arg(long)]
    redis_url: Option<String>,
    /// Check the configuration, print it as TOML that can be saved as the file (secrets left
    /// out and named in a comment) and exit.
    #[arg(long)]
    check: bool,
}

impl RunArgs {
    fn source(&self) -> spans_pipeline::run::ConfigSource {
        let mut overrides = self.overrides.clone();
        if let Some(servers) = &self.bootstrap_servers {
            overrides.push(format!("kafka.bootstrap_servers={servers}"));
        }
        if let Some(group) = &self.group_id {
            overrides.push(format!("kafka.group_id={group}"));
        }
        if let Some(url) = &self.redis_url {
            overrides.push(format!("redis.urls=[\"{url}\"]"));
        }
        spans_pipeline::run::ConfigSource {
            path: self.config.clone(),
            overrides,
        }
    }
}

/// Options of `spans-pipeline demo`.
#[derive(Debug, Args)]
struct DemoArgs {
    /// Spans to produce. The embedded mock broker keeps only about 5 MB per partition, so
    /// keep `spans × 1 KB / partitions` well below that times the output's 32 partitions.
    #[arg(long, default_value_t = 50_000)]
    spans: usize,
    /// Spans produced per second.
    #[arg(long, default_value_t = 40_000.0)]
    rate: f64,
    /// Partitions of the input topic.
    #[arg(long, default_value_t = 8)]
    partitions: i32,
    /// Flush workers.
    #[arg(long, default_value_t = 2)]
    flusher_workers: usize,
    /// Use this Redis instead of starting a local redis-server.
    #[arg(long)]
    redis_url: Option<String>,
    /// `--redis-url` is a Redis Cluster node.
    #[arg(long)]
    cluster: bool,
    /// Seed of the synthetic load.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Logs to stderr, filtered by `RUST_LOG` (default: `default_level`).
fn init_logs(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json().init();
    } else {
        logs.init();
    }
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    if let Command::Run(args) = &command {
        let source = args.source();
        let config = source.load()?;
        if args.check {
            print!("{}", config.to_toml()?);
            return Ok(());
        }
        init_logs("info", config.observability.json_logs);
        spans_pipeline::run::run(source, config)?;
        return Ok(());
    }
    // The demo's output is its progress line and summary; warnings are shown with
    // RUST_LOG=warn.
    let level = if matches!(command, Command::Demo(_)) {
        "error"
    } else {
        "warn"
    };
    init_logs(level, false);
    match command {
        Command::Run(_) => {}
        Command::Inspect(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(spans_pipeline::inspect::run(&args))?;
            println!("{report}");
        }
        Command::Replay(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let report = runtime.block_on(spans_pipeline::replay::run(&args))?;
            println!("{}", sonic_rs::to_string_pretty(&report)?);
        }
        Command::GenWorkload(args) => {
            let shape = args.shape().map_err(anyhow::Error::msg)?;
            let mut progress = Progress::stderr("gen-workload", "spans", None);
            progress.set_message("generating");
            let spans = spans_pipeline::workload::generate(&shape);
            progress.set_total(spans.len() as u64);
            progress.set_message("writing");
            let file = std::fs::File::create(&args.out).map_err(|error| {
                anyhow::anyhow!("cannot create {}: {error}", args.out.display())
            })?;
            let summary = spans_pipeline::workload::write_jsonl_reporting(
                &spans,
                std::io::BufWriter::new(file),
                &mut |written| progress.set_position(written),
            )?;
            progress.finish();
            eprintln!(
                "wrote {} spans in {} traces to {} ({} payload bytes, mean {:.1}); blake2b-256 {}",
                summary.spans,
                summary.traces,
                args.out.display(),
                summary.bytes,
                summary.bytes as f64 / summary.spans.max(1) as f64,
                summary.digest
            );
        }
        Command::Demo(args) => {
            let report = spans_pipeline::demo::run(&spans_pipeline::demo::DemoSettings {
                spans: args.spans,
                rate: args.rate,
                partitions: args.partitions,
                flusher_workers: args.flusher_workers,
                redis_url: args.redis_url,
                cluster: args.cluster,
                seed: args.seed,
                progress: true,
            })?;
            println!("{report}");
            if report.lost_spans > 0 {
                anyhow::bail!("{} spans were lost", report.lost_spans);
            }
        }
    }
    Ok(())
}
