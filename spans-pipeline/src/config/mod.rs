//! Configuration of `spans-pipeline run`: a TOML file, then environment variables, then
//! command-line overrides, checked as a whole before anything connects.
//!
//! Every key has a default, so an empty file is a valid configuration (a local Kafka and
//! Redis). Durations are written the human way (`"10s"`, `"1h"`, `"250ms"`). Overrides name
//! a key by its path: `buffer.root_timeout` is `SPANS_PIPELINE__BUFFER__ROOT_TIMEOUT` in the
//! environment and `--set buffer.root_timeout=5s` on the command line; the value is read as a
//! TOML value when it parses as one (`5`, `true`, `["a"]`) and as a string otherwise.
//!
//! The `[buffer]` section holds Sentry's `spans.buffer.*` options with Sentry's defaults, with
//! one deliberate exception: `flush_lock_ttl` defaults to 30 s instead of 0 (see
//! `docs/decisions.md`, "Flush locks are on by default").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::buffer::BufferOptions;
use crate::buffer::options::CONSUMER_FLUSH_LOCK_TTL;
use crate::consumer::{ConsumerSettings, FlushSettings, KillSwitch};

/// The shortest flush lock TTL other than 0 (no locks). A flush extends its locks every third
/// of the TTL while it produces, so each extension has two thirds of the TTL to reach Redis,
/// and after one failed extension the next one still has a third: at 3 s, one second for a
/// round trip on a loaded Redis or a busy runtime. Shorter locks would be lost under ordinary
/// latency, and a lost lock costs a segment flushed twice. `docs/decisions.md` says why the
/// produce timeout is not the bound.
pub const MIN_FLUSH_LOCK_TTL: Duration = Duration::from_secs(3);
mod effective;
mod kafka;
mod redis;
pub mod size;

pub use kafka::{KafkaSection, PRODUCER_DEFAULTS, is_secret_setting};
pub use redis::{RedisSection, redact_url};

/// The environment variable prefix of overrides.
pub const ENV_PREFIX: &str = "SPANS_PIPELINE__";

/// Why a configuration is not usable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML (file plus overrides) does not fit the configuration.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// An override is not `path=value`.
    #[error("override {0:?} is not of the form section.key=value")]
    Override(String),
    /// A value is outside what works.
    #[error("{key}: {reason}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The configuration could not be written as TOML (`run --check`).
    #[error("cannot print the configuration as toml")]
    Print(#[from] toml::ser::Error),
}

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka: brokers, group, topics, client overrides.
    pub kafka: KafkaSection,
    /// Redis: where the buffer lives.
    pub redis: RedisSection,
    /// The consumer's batching and commits.
    pub consumer: ConsumerSettings,
    /// The flush workers.
    pub flusher: FlushSettings,
    /// Sentry's `spans.buffer.*` options.
    pub buffer: BufferOptions,
    /// `spans.drop-in-buffer`: spans dropped at the consumer.
    pub kill_switch: KillSwitch,
    /// Metrics, health and logs.
    pub observability: ObservabilitySection,
}

impl Default for Config {
    /// Every section's defaults; `[buffer]` is Sentry's but for flush locks, which are on
    /// (see `CONSUMER_FLUSH_LOCK_TTL`).
    fn default() -> Self {
        Self {
            kafka: KafkaSection::default(),
            redis: RedisSection::default(),
            consumer: ConsumerSettings::default(),
            flusher: FlushSettings::default(),
            buffer: BufferOptions {
                flush_lock_ttl: CONSUMER_FLUSH_LOCK_TTL,
                ..BufferOptions::default()
            },
            kill_switch: KillSwitch::default(),
            observability: ObservabilitySection::default(),
        }
    }
}

/// Whether `text` (a line of the file, or an error message) names a secret setting or holds a
/// URL with credentials.
fn mentions_secret(text: &str) -> bool {
    is_secret_setting(text) || (text.contains("://") && text.contains('@'))
}

/// A TOML error as [`ConfigError::Invalid`]. TOML's messages quote the offending line of the
/// file, or the offending value; when that line or message is about a secret, only where the
/// problem is survives.
fn invalid(error: &toml::de::Error, text: &str) -> ConfigError {
    let full = error.to_string();
    // Parse errors point into the file; errors of values (from overrides too) name a path.
    let line = error.span().map(|span| {
        let start = span.start.min(text.len());
        let number = text[..start].matches('\n').count() + 1;
        let before = text[..start].rsplit('\n').next().unwrap_or_default();
        let after = text[start..].lines().next().unwrap_or_default();
        (number, format!("{before}{after}"))
    });
    let secret = mentions_secret(&full)
        || line
            .as_ref()
            .is_some_and(|(_, content)| mentions_secret(content));
    if !secret {
        return ConfigError::Invalid(full);
    }
    let place = match (&line, full.lines().find(|l| l.starts_with("in `"))) {
        (Some((number, _)), _) => format!("at line {number}"),
        (None, Some(path)) => path.to_owned(),
        (None, None) => "somewhere".to_owned(),
    };
    ConfigError::Invalid(format!(
        "a secret setting or a url with credentials is invalid {place} (value hidden)"
    ))
}

/// `[observability]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilitySection {
    /// Address of the Prometheus endpoint (`GET /metrics`); off when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// A file touched every second while the consumer loop runs (a liveness probe).
    pub health_file: Option<PathBuf>,
    /// Logs as JSON lines instead of text.
    pub json_logs: bool,
}

impl Config {
    /// Reads `path` (if any), applies environment overrides from `environment` (pairs of name
    /// and value, usually `std::env::vars()`), then `overrides` (`path=value`), and checks
    /// the result.
    ///
    /// # Errors
    ///
    /// See [`ConfigError`].
    pub fn load(
        path: Option<&Path>,
        environment: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|error| invalid(&error, &text))?;
        for (name, value) in environment {
            if let Some(path) = name.strip_prefix(ENV_PREFIX) {
                let path = path.to_ascii_lowercase().replace("__", ".");
                apply(&mut table, &path, &value)?;
            }
        }
        for entry in overrides {
            let (path, value) = entry.split_once('=').ok_or_else(|| bad_override(entry))?;
            apply(&mut table, path.trim(), value.trim())?;
        }
        let config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|error: toml::de::Error| invalid(&error, &text))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    ///
    /// The first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key, reason: &str| {
            Err(ConfigError::Value {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.kafka.input_topics.is_empty() {
            return fail("kafka.input_topics", "at least one topic is needed");
        }
        // Queue keys are `span-buf:q:<partition>`, without the topic (Sentry's layout): partition
        // 0 of two topics would be one queue, flushed by whichever member owns either.
        if self.kafka.input_topics.len() > 1 {
            return fail(
                "kafka.input_topics",
                "one topic only: flush queues (span-buf:q:<partition>) are keyed by partition, not \
                 by topic, so two topics would share them; run one consumer per topic, each with \
                 its own kafka.slice_id",
            );
        }
        if self.kafka.output_topic.is_empty() {
            return fail("kafka.output_topic", "must not be empty");
        }
        if self.kafka.dlq_required && self.kafka.dlq_topic.is_empty() {
            return fail(
                "kafka.dlq_required",
                "needs a `kafka.dlq_topic`: without one, invalid messages are logged and skipped",
            );
        }
        if self.redis.urls.is_empty() {
            return fail("redis.urls", "at least one URL is needed");
        }
        self.redis.connection_urls()?;
        self.redis.tls_certificates()?;
        if self.consumer.max_batch_size == 0 {
            return fail("consumer.max_batch_size", "must be at least 1");
        }
        if self.flusher.workers == 0 {
            return fail("flusher.workers", "must be at least 1");
        }
        if self.flusher.produce_attempts == 0 {
            return fail("flusher.produce_attempts", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.buffer.max_memory_percentage) {
            return fail(
                "buffer.max_memory_percentage",
                "must be between 0.0 and 1.0",
            );
        }
        // Redis keeps these in whole seconds: queue scores are Unix seconds (Sentry's layout),
        // the script's `EXPIRE` and the lock's `SET EX` take seconds. A fraction would be cut
        // off silently (`500ms` became 0 s), so it is refused instead.
        for (key, value, may_be_zero) in [
            ("buffer.timeout", self.buffer.timeout, false),
            ("buffer.root_timeout", self.buffer.root_timeout, false),
            ("buffer.redis_ttl", self.buffer.redis_ttl, false),
            ("buffer.flush_lock_ttl", self.buffer.flush_lock_ttl, true),
        ] {
            whole_seconds(key, value, may_be_zero)?;
        }
        let lock_ttl = self.buffer.flush_lock_ttl;
        if !lock_ttl.is_zero() && lock_ttl < MIN_FLUSH_LOCK_TTL {
            return fail(
                "buffer.flush_lock_ttl",
                &format!(
                    "must be 0 (no locks) or at least {} (got {}): a flush extends its locks \
                     every third of the TTL while it produces, and a shorter lock would expire \
                     under an extension delayed by ordinary Redis latency",
                    humantime::format_duration(MIN_FLUSH_LOCK_TTL),
                    humantime::format_duration(lock_ttl)
                ),
            );
        }
        self.validate_message_size()?;
        if self.buffer.metrics_sample_rate == 0 {
            return fail("buffer.metrics_sample_rate", "must be at least 1");
        }
        self.buffer.validate().map_err(|error| ConfigError::Value {
            key: "buffer",
            reason: error.to_string(),
        })
    }

    /// What changed from `self` to `next` that only takes effect after a restart; a reload
    /// applies everything else (the kill-switch at once, the rest by rebuilding the pipeline).
    pub fn restart_only_changes(&self, next: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.kafka != next.kafka {
            changed.push("kafka");
        }
        if self.redis != next.redis {
            changed.push("redis");
        }
        if self.observability != next.observability {
            changed.push("observability");
        }
        changed
    }
}

/// Refuses `value` with `key` named when it has a fraction of a second, or is zero where zero
/// does not work.
fn whole_seconds(key: &'static str, value: Duration, may_be_zero: bool) -> Result<(), ConfigError> {
    let shown = humantime::format_duration(value);
    if value.subsec_nanos() != 0 {
        return Err(ConfigError::Value {
            key,
            reason: format!(
                "must be a whole number of seconds (got {shown}): redis keeps it in seconds"
            ),
        });
    }
    if value.is_zero() && !may_be_zero {
        return Err(ConfigError::Value {
            key,
            reason: "must be at least one second".to_owned(),
        });
    }
    Ok(())
}

/// [`ConfigError::Override`] for `entry`, shown up to its key when it is about a secret.
fn bad_override(entry: &str) -> ConfigError {
    if !mentions_secret(entry) {
        return ConfigError::Override(entry.to_owned());
    }
    let key = entry.split(['=', ':', ' ']).next().unwrap_or_default();
    ConfigError::Override(format!("{key}=(value hidden)"))
}

/// Sets the value at dotted `path` in `table`, creating sections on the way.
fn apply(table: &mut toml::Table, path: &str, value: &str) -> Result<(), ConfigError> {
    let mut keys: Vec<&str> = path.split('.').collect();
    let Some(last) = keys.pop().filter(|key| !key.is_empty()) else {
        return Err(bad_override(&format!("{path}={value}")));
    };
    let mut current = table;
    for key in keys {
        let entry = current
            .entry(key.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| bad_override(&format!("{path}={value}")))?;
    }
    current.insert(last.to_owned(), parse_value(value));
    Ok(())
}

/// A TOML value when `text` is one (`5`, `true`, `[1, 2]`), else the string itself.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {text}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rill::backends::kafka::{InitialOffset, RebalanceProtocol};

    fn load(text: &str, env: &[(&str, &str)], overrides: &[&str]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            &overrides
                .iter()
                .map(|o| (*o).to_owned())
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn an_empty_file_gives_sentrys_defaults_with_locks_on() {
        let config = load("", &[], &[]).unwrap();

        let options = &config.buffer;
        assert_eq!(options.timeout, Duration::from_secs(60));
        assert_eq!(options.root_timeout, Duration::from_secs(10));
        assert_eq!(options.redis_ttl, Duration::from_secs(3600));
        assert_eq!(options.max_segment_bytes, 10 * 1024 * 1024);
        assert_eq!(options.max_flush_segments, 500);
        assert_eq!(options.flush_lock_ttl, Duration::from_secs(30));
        assert_eq!(config, Config::default());
        assert_eq!(config.consumer.max_batch_size, 2000);
        assert_eq!(config.kafka.output_topic, "buffered-segments");
    }

    #[test]
    fn durations_are_human() {
        let config = load(
            "[buffer]\nroot_timeout = \"2s\"\nredis_ttl = \"1h 30m\"\n",
            &[],
            &[],
        )
        .unwrap();

        assert_eq!(config.buffer.root_timeout, Duration::from_secs(2));
        assert_eq!(config.buffer.redis_ttl, Duration::from_secs(5400));
    }

    #[test]
    fn durations_redis_keeps_in_seconds_must_be_whole_seconds() {
        for key in ["timeout", "root_timeout", "redis_ttl", "flush_lock_ttl"] {
            for value in ["500ms", "1500ms", "2s 1ms"] {
                let error = load("", &[], &[&format!("buffer.{key}={value}")]).unwrap_err();

                let named = format!("buffer.{key}:");
                assert!(
                    error.to_string().starts_with(&named),
                    "{key}={value}: {error}"
                );
                assert!(
                    error.to_string().contains("whole"),
                    "{key}={value}: {error}"
                );
            }
        }
        for key in ["timeout", "root_timeout", "redis_ttl"] {
            let error = load("", &[], &[&format!("buffer.{key}=0s")]).unwrap_err();
            assert!(
                error.to_string().starts_with(&format!("buffer.{key}:")),
                "{error}"
            );
        }
        let config = load(
            "",
            &[],
            &[
                "buffer.timeout=2s",
                "buffer.redis_ttl=90s",
                "buffer.flush_lock_ttl=0s",
            ],
        )
        .unwrap();
        let options = &config.buffer;
        assert_eq!(
            (
                options.timeout.as_secs(),
                options.redis_ttl.as_secs(),
                options.flush_lock_ttl.as_secs()
            ),
            (2, 90, 0)
        );
    }

    #[test]
    fn closed_sets_are_refused_naming_their_key_and_their_values() {
        let error = load("", &[], &["kafka.rebalance_protocol=sticky"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("kafka.rebalance_protocol"), "{error}");
        assert!(error.contains("`eager` or `cooperative`"), "{error}");
        let config = load(
            "[kafka]\ninitial_offset = \"latest\"\nrebalance_protocol = \"eager\"\n",
            &[],
            &[],
        )
        .unwrap();
        assert_eq!(config.kafka.initial_offset, InitialOffset::Latest);
        assert_eq!(config.kafka.rebalance_protocol, RebalanceProtocol::Eager);
    }

    #[test]
    fn a_required_dead_letter_topic_must_be_named() {
        let error = load("[kafka]\ndlq_required = true\ndlq_topic = \"\"\n", &[], &[]).unwrap_err();

        assert!(
            error.to_string().starts_with("kafka.dlq_required:"),
            "{error}"
        );
        assert!(!load("", &[], &[]).unwrap().kafka.dlq_required);
        assert!(
            load("", &[], &["kafka.dlq_required=true"])
                .unwrap()
                .kafka
                .dlq_required
        );
    }

    #[test]
    fn a_flush_lock_too_short_for_its_extensions_is_refused() {
        for value in ["1s", "2s"] {
            let error = load("", &[], &[&format!("buffer.flush_lock_ttl={value}")]).unwrap_err();

            let error = error.to_string();
            assert!(error.starts_with("buffer.flush_lock_ttl:"), "{error}");
            assert!(error.contains("at least 3s"), "{error}");
            assert!(error.contains("extends its locks"), "{error}");
        }
        for (value, secs) in [("0s", 0), ("3s", 3), ("30s", 30)] {
            let config = load("", &[], &[&format!("buffer.flush_lock_ttl={value}")]).unwrap();
            assert_eq!(config.buffer.flush_lock_ttl.as_secs(), secs, "{value}");
        }
    }

    #[test]
    fn sub_second_durations_kept_as_durations_work() {
        let config = load(
            "[buffer]\nflusher_backpressure = \"1500ms\"\nflusher_max_unhealthy = \"2500ms\"\n",
            &[],
            &[],
        )
        .unwrap();

        assert_eq!(
            config.buffer.flusher_backpressure,
            Duration::from_millis(1500)
        );
        assert_eq!(
            config.buffer.flusher_max_unhealthy,
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn two_input_topics_are_refused_because_they_would_share_flush_queues() {
        let error = load(
            "[kafka]\ninput_topics = [\"ingest-spans\", \"ingest-spans-2\"]\n",
            &[],
            &[],
        )
        .unwrap_err()
        .to_string();

        assert!(error.starts_with("kafka.input_topics:"), "{error}");
        assert!(error.contains("span-buf:q:"), "{error}");
    }

    #[test]
    fn outcomes_are_produced_by_default_to_a_configurable_topic() {
        assert_eq!(load("", &[], &[]).unwrap().kafka.outcomes_topic, "outcomes");
        let config = load("", &[], &["kafka.outcomes_topic=billing-outcomes"]).unwrap();
        assert_eq!(config.kafka.outcomes_topic, "billing-outcomes");
    }

    #[test]
    fn environment_overrides_the_file_and_flags_override_the_environment() {
        let config = load(
            "[consumer]\nmax_batch_size = 10\n[flusher]\nworkers = 2\n",
            &[
                ("SPANS_PIPELINE__CONSUMER__MAX_BATCH_SIZE", "20"),
                ("SPANS_PIPELINE__FLUSHER__WORKERS", "3"),
                ("UNRELATED", "x"),
            ],
            &["flusher.workers=4", "kafka.bootstrap_servers=broker:9092"],
        )
        .unwrap();

        assert_eq!(config.consumer.max_batch_size, 20);
        assert_eq!(config.flusher.workers, 4);
        assert_eq!(config.kafka.bootstrap_servers, "broker:9092");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let error = load("[buffer]\nroot_timout = \"2s\"\n", &[], &[]).unwrap_err();

        assert!(error.to_string().contains("root_timout"), "{error}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let error = load("[kafka]\nrebalance_protocol = \"sticky\"\n", &[], &[]).unwrap_err();
        assert!(
            error.to_string().contains("kafka.rebalance_protocol"),
            "{error}"
        );

        let error = load("", &[], &["buffer.compression_level=40"]).unwrap_err();
        assert!(error.to_string().contains("compression"), "{error}");

        let error = load("", &[], &["nonsense"]).unwrap_err();
        assert!(matches!(error, ConfigError::Override(_)));
    }

    #[test]
    fn credentials_go_into_the_urls_but_never_into_debug_output() {
        let config = load(
            "[redis]\nurls = [\"rediss://cache:6380/0\"]\nusername = \"spans\"\npassword = \"hunter2\"\n",
            &[],
            &[],
        )
        .unwrap();

        assert_eq!(
            config.redis.connection_urls().unwrap(),
            ["rediss://spans:hunter2@cache:6380/0"]
        );
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert_eq!(
            redact_url("redis://u:secret@host:1/"),
            "redis://***@host:1/"
        );
    }

    const KAFKA_SECURITY: &str = r#"
[kafka]
consumer_overrides = { "security.protocol" = "SASL_SSL", "sasl.mechanism" = "SCRAM-SHA-512", "sasl.username" = "spans", "sasl.password" = "kafka-pa55", "ssl.ca.location" = "/etc/ca.pem" }
producer_overrides = { "security.protocol" = "SSL", "ssl.key.password" = "key-pa55", "ssl.key.pem" = "PRIVATE-KEY-BYTES", "ssl.certificate.location" = "/etc/client.pem" }
"#;

    #[test]
    fn kafka_security_settings_reach_the_librdkafka_configs() {
        let config = load(KAFKA_SECURITY, &[], &[]).unwrap();

        let consumer = config.kafka_consumer_config().client_config().unwrap();
        for (key, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "spans"),
            ("sasl.password", "kafka-pa55"),
            ("ssl.ca.location", "/etc/ca.pem"),
            ("group.id", "process-spans"),
        ] {
            assert_eq!(consumer.get(key), Some(value), "{key}");
        }
        let producer = config.kafka_producer_config().client_config().unwrap();
        for (key, value) in [
            ("security.protocol", "SSL"),
            ("ssl.key.password", "key-pa55"),
            ("ssl.key.pem", "PRIVATE-KEY-BYTES"),
            ("client.id", "spans-pipeline.flusher"),
        ] {
            assert_eq!(producer.get(key), Some(value), "{key}");
        }
        assert_eq!(producer.get("sasl.password"), None);
    }

    #[test]
    fn the_producer_takes_a_whole_default_segment_compressed_with_lz4() {
        let producer = load("", &[], &[])
            .unwrap()
            .kafka_producer_config()
            .client_config()
            .unwrap();

        assert_eq!(producer.get("message.max.bytes"), Some("50000000"));
        assert_eq!(producer.get("compression.type"), Some("lz4"));
        let overridden = load(
            "[kafka]\nproducer_overrides = { \"compression.type\" = \"zstd\", \"message.max.bytes\" = \"20000000\" }\n",
            &[],
            &[],
        )
        .unwrap()
        .kafka_producer_config()
        .client_config()
        .unwrap();
        assert_eq!(overridden.get("compression.type"), Some("zstd"));
        assert_eq!(overridden.get("message.max.bytes"), Some("20000000"));
    }

    #[test]
    fn a_producer_limit_below_the_largest_segment_is_refused_naming_both_settings() {
        let small = "[kafka]\nproducer_overrides = { \"message.max.bytes\" = \"1000000\" }\n";

        let error = load(small, &[], &[]).unwrap_err().to_string();

        assert!(error.contains("message.max.bytes"), "{error}");
        assert!(error.contains("buffer.max_segment_bytes"), "{error}");
        assert!(load(small, &[], &["buffer.max_segment_bytes=900000"]).is_ok());
        assert!(load(small, &[], &["buffer.max_segment_bytes=0"]).is_ok());
        let garbage = "[kafka]\nproducer_overrides = { \"message.max.bytes\" = \"lots\" }\n";
        let error = load(garbage, &[], &[]).unwrap_err().to_string();
        assert!(error.contains("message.max.bytes"), "{error}");
    }

    #[test]
    fn kafka_secrets_never_appear_in_debug_output() {
        let config = load(KAFKA_SECURITY, &[], &[]).unwrap();

        for printed in [format!("{config:?}"), format!("{config:#?}")] {
            for secret in ["kafka-pa55", "key-pa55", "PRIVATE-KEY-BYTES"] {
                assert!(!printed.contains(secret), "{secret} in {printed}");
            }
            assert!(printed.contains("SCRAM-SHA-512"), "{printed}");
            assert!(printed.contains("/etc/ca.pem"), "{printed}");
        }
        for key in [
            "sasl.password",
            "ssl.keystore.password",
            "SSL.KEY.PASSWORD",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "ssl.key.pem",
        ] {
            assert!(is_secret_setting(key), "{key}");
        }
        for key in ["sasl.username", "ssl.ca.location", "ssl.certificate.pem"] {
            assert!(!is_secret_setting(key), "{key}");
        }
    }

    #[test]
    fn errors_about_urls_never_show_their_password() {
        for url in ["http://spans:hunter2@cache:6379", "cache:hunter2@6379"] {
            let error = load("", &[], &[&format!("redis.urls=[\"{url}\"]")]).unwrap_err();

            let printed = format!("{error} {error:?}");
            assert!(printed.contains("redis.urls"), "{printed}");
            assert!(!printed.contains("hunter2"), "{printed}");
        }
    }

    #[test]
    fn invalid_secrets_are_located_but_never_quoted() {
        let cases = [
            ("[redis]\npassword = hunter2\n", "at line 2"),
            ("[redis]\npassword = 12345\n", "in `redis.password`"),
            (
                "[kafka]\nconsumer_overrides = { \"sasl.password\" = 12345 }\n",
                "in `kafka.consumer_overrides.sasl.password`",
            ),
            (
                "[kafka]\nconsumer_overrides = { \"sasl.password\" = \"hunter2 }\n",
                "at line 2",
            ),
            (
                "[redis]\nurls = \"redis://spans:hunter2@cache:6379\"\n",
                "in `redis.urls`",
            ),
        ];
        for (text, place) in cases {
            let error = load(text, &[], &[]).unwrap_err().to_string();

            assert!(
                !error.contains("hunter2") && !error.contains("12345"),
                "{error}"
            );
            assert!(error.contains(place), "{place}: {error}");
        }
        let error = load("", &[("SPANS_PIPELINE__REDIS__PASSWORD", "[1234]")], &[])
            .unwrap_err()
            .to_string();
        assert!(!error.contains("1234"), "{error}");
        let error = load("", &[], &["redis.password:hunter2"]).unwrap_err();
        assert!(matches!(error, ConfigError::Override(_)));
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let error = load("[consumer]\nmax_batch_size = \"many\"\n", &[], &[]).unwrap_err();
        assert!(
            error.to_string().contains("many"),
            "others keep their detail: {error}"
        );
    }

    #[test]
    fn tls_files_are_read_for_rediss_urls() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [("ca.pem", "CA"), ("client.pem", "CERT"), ("key.pem", "KEY")] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let file = |name: &str| dir.path().join(name).display().to_string();
        let section = format!(
            "[redis]\nurls = [\"rediss://cache:6380\"]\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            file("ca.pem"),
            file("client.pem"),
            file("key.pem"),
        );

        let certificates = load(&section, &[], &[])
            .unwrap()
            .redis
            .tls_certificates()
            .unwrap()
            .unwrap();

        assert_eq!(certificates.root_cert.as_deref(), Some(&b"CA"[..]));
        let client = certificates.client_tls.unwrap();
        assert_eq!(client.client_cert, b"CERT");
        assert_eq!(client.client_key, b"KEY");
        assert!(
            load("", &[], &[])
                .unwrap()
                .redis
                .tls_certificates()
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn tls_files_that_cannot_work_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "CA").unwrap();
        let cases = [
            (
                format!(
                    "urls = [\"redis://cache:6379\"]\nca_file = \"{}\"",
                    ca.display()
                ),
                "redis.ca_file",
            ),
            (
                format!(
                    "urls = [\"rediss://cache:6380\"]\nclient_cert_file = \"{}\"",
                    ca.display()
                ),
                "redis.client_cert_file",
            ),
            (
                "urls = [\"rediss://cache:6380\"]\nca_file = \"/nonexistent/ca.pem\"".to_owned(),
                "/nonexistent/ca.pem",
            ),
        ];
        for (section, named) in cases {
            let error = load(&format!("[redis]\n{section}\n"), &[], &[]).unwrap_err();

            assert!(error.to_string().contains(named), "{named}: {error}");
        }
    }

    #[test]
    fn a_reload_names_what_needs_a_restart() {
        let before = load("", &[], &[]).unwrap();
        let after = load(
            "[buffer]\nroot_timeout = \"5s\"\n[kafka]\ngroup_id = \"other\"\n",
            &[],
            &[],
        )
        .unwrap();

        assert_eq!(before.restart_only_changes(&after), ["kafka"]);
    }
}
