//! `run --check`: the effective configuration (defaults, file, environment and flags merged)
//! as TOML, so an operator can see what a consumer will run with and save it as its file.
//!
//! The output is the configuration itself, serialized, not a description of it: loading it
//! back gives the same [`Config`] (a test holds this). Secrets are the one exception. They
//! are left out rather than replaced by a placeholder, because a placeholder loaded back
//! would be used as a password without a word; a comment at the top names every key left out,
//! so the saved file says what it lacks. Secrets are `redis.password`, the credentials inside
//! a Redis URL, and the librdkafka overrides [`is_secret_setting`] recognizes.

use super::{Config, ConfigError, is_secret_setting};

/// The first lines of the output.
const HEADER: &str =
    "# spans-pipeline run: the effective configuration (defaults, file, environment, flags).\n";

/// The sections in the order `docs/configuration.md` describes them.
const SECTIONS: [&str; 7] = [
    "kafka",
    "redis",
    "consumer",
    "flusher",
    "buffer",
    "kill_switch",
    "observability",
];

impl Config {
    /// The configuration as TOML that [`Config::load`] reads back to the same value, with
    /// secrets left out and named in a comment at the top.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Print`] when a value has no TOML form (none of the current ones).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let (shown, hidden) = self.without_secrets();
        let mut table = toml::Table::try_from(&shown)?;
        sort_kill_switch(&mut table);
        let mut text = HEADER.to_owned();
        if !hidden.is_empty() {
            text.push_str("# Left out, set them again to use this file: ");
            text.push_str(&hidden.join(", "));
            text.push('\n');
        }
        // One section at a time, so they come in the documented order (a table's keys are
        // sorted).
        for name in SECTIONS {
            if let Some(section) = table.remove(name) {
                let mut single = toml::Table::new();
                single.insert(name.to_owned(), section);
                text.push('\n');
                text.push_str(&toml::to_string(&single)?);
            }
        }
        Ok(text)
    }

    /// A copy without its secrets, and the keys left out as TOML paths.
    fn without_secrets(&self) -> (Self, Vec<String>) {
        let mut shown = self.clone();
        let mut hidden = Vec::new();
        if shown.redis.password.take().is_some() {
            hidden.push("redis.password".to_owned());
        }
        for (index, url) in shown.redis.urls.iter_mut().enumerate() {
            if let Some(stripped) = without_credentials(url) {
                *url = stripped;
                hidden.push(format!("the credentials of redis.urls[{index}]"));
            }
        }
        for (name, overrides) in [
            ("consumer_overrides", &mut shown.kafka.consumer_overrides),
            ("producer_overrides", &mut shown.kafka.producer_overrides),
        ] {
            overrides.retain(|key, _| {
                let secret = is_secret_setting(key);
                if secret {
                    hidden.push(format!("kafka.{name}.\"{key}\""));
                }
                !secret
            });
        }
        (shown, hidden)
    }
}

/// The kill-switch lists are sets: written sorted so the same configuration prints the same.
fn sort_kill_switch(table: &mut toml::Table) {
    let Some(kill_switch) = table
        .get_mut("kill_switch")
        .and_then(toml::Value::as_table_mut)
    else {
        return;
    };
    for (_, value) in kill_switch.iter_mut() {
        if let toml::Value::Array(items) = value {
            items.sort_by(|a, b| match (a.as_integer(), b.as_integer()) {
                (Some(a), Some(b)) => a.cmp(&b),
                _ => a.as_str().cmp(&b.as_str()),
            });
        }
    }
}

/// `url` without its `user:password@` part, or `None` when it has none.
fn without_credentials(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let at = rest[..authority_end].rfind('@')?;
    Some(format!("{scheme}://{}", &rest[at + 1..]))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn load_text(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spans.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), [], &[]).unwrap()
    }

    /// A configuration where every section differs from its defaults.
    fn changed_everywhere() -> Config {
        let mut config = Config::default();
        config.kafka.bootstrap_servers = "broker-1:9092,broker-2:9092".to_owned();
        config.kafka.slice_id = Some(3);
        config.kafka.rebalance_protocol = rill::backends::kafka::RebalanceProtocol::Eager;
        config.kafka.max_poll_interval = Duration::from_secs(90);
        config
            .kafka
            .consumer_overrides
            .insert("fetch.max.bytes".to_owned(), "1048576".to_owned());
        config.redis.urls = vec!["redis://a:7000".to_owned(), "redis://b:7001".to_owned()];
        config.redis.cluster = true;
        config.redis.username = Some("spans".to_owned());
        config.consumer.max_batch_time = Duration::from_millis(250);
        config.flusher.workers = 4;
        config.buffer.max_segment_bytes = 5 * 1024 * 1024;
        config.buffer.max_memory_percentage = 0.85;
        config.buffer.compression_level = -1;
        config.buffer.flush_lock_ttl = Duration::ZERO;
        config.buffer.debug_traces = vec!["a".repeat(32)];
        config.kill_switch.projects = [7, 3, 11].into();
        config.kill_switch.traces = ["b".repeat(32), "a".repeat(32)].into();
        config.observability.metrics_listen = Some(([127, 0, 0, 1], 9100).into());
        config.observability.health_file = Some("/run/spans/health".into());
        config.observability.json_logs = true;
        config
    }

    #[test]
    fn the_printed_configuration_loads_back_unchanged() {
        for config in [Config::default(), changed_everywhere()] {
            config.validate().unwrap();

            let printed = config.to_toml().unwrap();

            assert_eq!(load_text(&printed), config, "{printed}");
            assert_eq!(load_text(&printed).to_toml().unwrap(), printed);
        }
    }

    #[test]
    fn sizes_and_durations_are_printed_the_human_way() {
        let printed = changed_everywhere().to_toml().unwrap();

        assert!(
            printed.contains("max_segment_bytes = \"5MiB\""),
            "{printed}"
        );
        assert!(printed.contains("max_batch_time = \"250ms\""), "{printed}");
        assert!(
            printed.contains("max_poll_interval = \"1m 30s\""),
            "{printed}"
        );
        assert!(printed.contains("projects = [3, 7, 11]"), "{printed}");
    }

    #[test]
    fn secrets_are_left_out_and_named() {
        let mut config = changed_everywhere();
        config.redis.password = Some("hunter2".to_owned());
        config.redis.urls[1] = "redis://ops:url-pa55@b:7001/0".to_owned();
        for (key, value) in [
            ("sasl.password", "kafka-pa55"),
            ("sasl.username", "spans"),
            ("ssl.key.pem", "PRIVATE-KEY-BYTES"),
        ] {
            config
                .kafka
                .producer_overrides
                .insert(key.to_owned(), value.to_owned());
        }

        let printed = config.to_toml().unwrap();

        for secret in ["hunter2", "url-pa55", "kafka-pa55", "PRIVATE-KEY-BYTES"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        for named in [
            "redis.password",
            "redis.urls[1]",
            "kafka.producer_overrides.\"sasl.password\"",
            "kafka.producer_overrides.\"ssl.key.pem\"",
        ] {
            let header = printed.lines().nth(1).unwrap_or_default();
            assert!(header.contains(named), "{named} in {header}");
        }
        let mut expected = config.clone();
        expected.redis.password = None;
        expected.redis.urls[1] = "redis://b:7001/0".to_owned();
        expected
            .kafka
            .producer_overrides
            .retain(|key, _| !is_secret_setting(key));
        assert_eq!(load_text(&printed), expected, "{printed}");
    }

    #[test]
    fn only_the_authority_of_a_url_loses_its_credentials() {
        assert_eq!(
            without_credentials("rediss://u:p@host:6380/0").as_deref(),
            Some("rediss://host:6380/0")
        );
        assert_eq!(without_credentials("redis://host:6379/a@b"), None);
        assert_eq!(without_credentials("redis://host:6379"), None);
    }
}
