//! `spans-pipeline` command line: one subcommand per way of running the buffer.

use clap::{Parser, Subcommand};

/// The spans buffer consumer and its tools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Feed a JSONL span workload through the buffer on a Redis, flush everything, and print
    /// a JSON report (counts, Redis CPU, throughput).
    Replay(spans_pipeline::replay::ReplayArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Replay(args) => {
            let report = spans_pipeline::replay::run(&args).await?;
            println!("{}", sonic_rs::to_string_pretty(&report)?);
        }
    }
    Ok(())
}
