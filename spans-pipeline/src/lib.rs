//! The spans buffer: assembles tracing spans into segments in Redis and flushes finished
//! segments, compatible byte for byte with the Redis layout of Sentry's process-spans
//! consumer, so either consumer can take over a live buffer from the other.
//!
//! - [`span`]: decoding and validating `ingest-spans` messages;
//! - [`buffer`]: [`buffer::SpansBuffer`] (the logic) and [`buffer::SpansBufferStore`] (Redis);
//! - [`consumer`]: the process-spans pipeline on `rill` (decode, batch, write, flush, commit);
//! - [`config`]: the configuration of `spans-pipeline run` (TOML, environment, flags);
//! - [`run`]: the consumer as a service (metrics, health, signals, reload);
//! - [`demo`]: the whole pipeline on an embedded mock Kafka and a local Redis;
//! - [`replay`]: feeds a recorded workload through the buffer and reports throughput;
//! - [`workload`]: the reference workload, deterministic from a seed;
//! - [`inspect`]: a read-only report of what is inside a live buffer;
//! - [`progress`]: progress of the long commands, a bar on a terminal, lines elsewhere.

pub mod buffer;
pub mod config;
pub mod consumer;
pub mod demo;
mod error_chain;
pub mod inspect;
pub mod metrics;
pub mod progress;
pub mod replay;
pub mod run;
pub mod span;
pub mod workload;
