//! The Grafana dashboard (`dashboards/spans-pipeline.json`) cannot rot: the `run` binary, in
//! its own process, consumes a few spans and a dead letter, and its `/metrics` must hold every
//! metric each panel queries, with every label the query groups or filters by (and the label
//! values it filters on) and every label its legend names.

#![allow(clippy::unwrap_used)]

#[path = "support/process.rs"]
mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use integration_tests::kafka::MockKafka;
use integration_tests::redis_server::RedisServer;

const WAIT: Duration = Duration::from_secs(60);

const DASHBOARD: &str = include_str!("../../dashboards/spans-pipeline.json");

/// What one panel target asks of the metrics.
#[derive(Debug, Default)]
struct Query {
    expr: String,
    metrics: BTreeSet<String>,
    /// `(metric, label, value)` of each `label="value"` matcher.
    matchers: Vec<(String, String, String)>,
    /// Labels of `by (...)` and `without (...)`.
    grouped_by: BTreeSet<String>,
    /// Labels named in the legend (`{{shard}}`).
    legend: BTreeSet<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Reads the metric names, matchers and grouping labels of a PromQL expression; enough of
/// PromQL for the dashboard's queries (functions, aggregations, selectors, ranges).
fn parse(expr: &str, legend: &str) -> Query {
    let chars: Vec<char> = expr.chars().collect();
    let mut query = Query {
        expr: expr.to_owned(),
        ..Query::default()
    };
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        i
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
            continue;
        }
        if !(c.is_ascii_alphabetic() || c == '_') {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let ident: String = chars[start..i].iter().collect();
        let next = skip_space(i);
        let metric = ident.starts_with("spans_") || ident.starts_with("rill_");
        if metric {
            query.metrics.insert(ident.clone());
        }
        match chars.get(next) {
            Some('{') if metric => {
                let end = next + chars[next..].iter().position(|&c| c == '}').unwrap();
                let body: String = chars[next + 1..end].iter().collect();
                for matcher in body.split(',').filter(|m| !m.trim().is_empty()) {
                    let (label, value) = matcher.split_once('=').unwrap();
                    assert!(!label.ends_with('!'), "only = matchers are checked: {expr}");
                    let value = value.trim().trim_start_matches('~').trim_matches('"');
                    query
                        .matchers
                        .push((ident.clone(), label.trim().to_owned(), value.to_owned()));
                }
                i = end + 1;
            }
            Some('(') if ident == "by" || ident == "without" => {
                let end = next + chars[next..].iter().position(|&c| c == ')').unwrap();
                let body: String = chars[next + 1..end].iter().collect();
                query
                    .grouped_by
                    .extend(body.split(',').map(|l| l.trim().to_owned()));
                i = end + 1;
            }
            _ => {}
        }
    }
    let mut rest = legend;
    while let Some(open) = rest.find("{{") {
        let close = rest[open..].find("}}").unwrap() + open;
        query.legend.insert(rest[open + 2..close].trim().to_owned());
        rest = &rest[close + 2..];
    }
    query
}

/// Every panel's queries, with the panel's title.
fn dashboard_queries() -> Vec<(String, Query)> {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(!panels.is_empty());
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap().to_owned();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title} queries nothing");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            let query = parse(expr, legend);
            assert!(!query.metrics.is_empty(), "{title}: no metric in {expr}");
            queries.push((title.clone(), query));
        }
    }
    queries
}

/// Series of a Prometheus text exposition: metric name → the label sets of its series.
fn series(exposition: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    let body = exposition.split("\r\n\r\n").nth(1).unwrap_or(exposition);
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let mut labels = BTreeMap::new();
        if line[name_end..].starts_with('{') {
            let close = line.rfind('}').unwrap();
            for pair in line[name_end + 1..close].split("\",") {
                if let Some((key, value)) = pair.split_once('=') {
                    labels.insert(key.to_owned(), value.trim_matches('"').to_owned());
                }
            }
        }
        out.entry(line[..name_end].to_owned())
            .or_default()
            .push(labels);
    }
    out
}

/// What the dashboard asks for and the exposition lacks.
fn missing(
    queries: &[(String, Query)],
    exported: &BTreeMap<String, Vec<BTreeMap<String, String>>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (title, query) in queries {
        let expr = &query.expr;
        for metric in &query.metrics {
            let Some(found) = exported.get(metric) else {
                problems.push(format!("{title}: no metric {metric} ({expr})"));
                continue;
            };
            for label in &query.grouped_by {
                if !found.iter().any(|labels| labels.contains_key(label)) {
                    problems.push(format!("{title}: {metric} has no label {label} ({expr})"));
                }
            }
        }
        for (metric, label, value) in &query.matchers {
            let has = exported.get(metric).is_some_and(|found| {
                found
                    .iter()
                    .any(|labels| labels.get(label).is_some_and(|v| v == value))
            });
            if !has {
                problems.push(format!(
                    "{title}: no {metric}{{{label}=\"{value}\"}} ({expr})"
                ));
            }
        }
        for label in &query.legend {
            if !query.grouped_by.contains(label) {
                problems.push(format!(
                    "{title}: the legend names {label}, which the query drops ({expr})"
                ));
            }
        }
    }
    problems
}

#[test]
fn the_query_parser_finds_metrics_matchers_and_groupings() {
    let query = parse(
        r#"sum by (reason, shard) (rate(spans_buffer_outcomes{reason="x"}[$__rate_interval])) / max(rill_a)"#,
        "{{reason}} on {{shard}}",
    );

    assert_eq!(
        query.metrics,
        BTreeSet::from(["spans_buffer_outcomes".to_owned(), "rill_a".to_owned()])
    );
    assert_eq!(
        query.matchers,
        [(
            "spans_buffer_outcomes".to_owned(),
            "reason".to_owned(),
            "x".to_owned()
        )]
    );
    assert_eq!(
        query.grouped_by,
        BTreeSet::from(["reason".to_owned(), "shard".to_owned()])
    );
    assert_eq!(query.legend, query.grouped_by);
}

fn span(trace: &str, span_id: &str) -> String {
    format!(
        r#"{{"organization_id":1,"project_id":7,"trace_id":"{trace}","span_id":"{span_id}","parent_span_id":null,"is_segment":true,"start_timestamp":1.0,"end_timestamp":2.0,"received":2.0,"retention_days":90,"status":"ok"}}"#
    )
}

#[test]
fn every_metric_and_label_the_dashboard_queries_is_exported() {
    let queries = dashboard_queries();
    let kafka = MockKafka::start(1).unwrap();
    for topic in [
        "ingest-spans",
        "buffered-segments",
        "ingest-spans-dlq",
        "outcomes",
    ] {
        kafka.create_topic(topic, 1).unwrap();
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spans.toml");
    let port = process::free_port();
    std::fs::write(
        &config,
        format!("[observability]\nmetrics_listen = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = process::RunProcess::start(
        process::run_command(&config, kafka.bootstrap_servers())
            .args(["--redis-url", &redis.url()])
            .args(process::QUICK.iter().flat_map(|setting| ["--set", setting]))
            // Every script call sampled; the memory watch (and its gauge) runs only with a
            // limit below 1.0.
            .args(["--set", "buffer.metrics_sample_rate=1"])
            .args(["--set", "buffer.max_memory_percentage=0.99"])
            .env("RUST_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    process::wait_for_log(&log, "Consuming.");
    let spans = [
        span(&"3".repeat(32), &"a".repeat(16)),
        span(&"4".repeat(32), &"b".repeat(16)),
    ];
    let mut messages: Vec<&[u8]> = spans.iter().map(String::as_bytes).collect();
    messages.push(b"not a span");
    kafka.produce("ingest-spans", messages, |_| 0).unwrap();
    kafka.read_topic("buffered-segments", 2, WAIT).unwrap();

    // Summaries and gauges appear with their first sample; wait for them under a deadline.
    let deadline = Instant::now() + WAIT;
    let problems = loop {
        let problems = missing(&queries, &series(&process::scrape(port)));
        if problems.is_empty() || Instant::now() >= deadline {
            break problems;
        }
        assert!(child.is_running(), "the consumer stopped");
        std::thread::sleep(Duration::from_millis(100));
    };

    assert!(
        problems.is_empty(),
        "the dashboard queries what is not exported:\n{}",
        problems.join("\n")
    );
    assert!(child.stop().success());
}
