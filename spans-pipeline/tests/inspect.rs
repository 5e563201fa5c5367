//! `spans-pipeline inspect` against what the test wrote into a real Redis, standalone and a
//! 3-node cluster: the counts of the report are those of the spans, queues and leftovers
//! written, and the scan of every master adds up to every key Redis holds.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;
#[path = "support/process.rs"]
mod process;

use buffer_support::{SpanSpec, buffer, connect, for_each_mode, id, spans};
use integration_tests::redis_server::TestRedis;
use spans_pipeline::buffer::keys::{self, KeyFamily};
use spans_pipeline::buffer::{
    BufferInspector, InspectLimits, InspectProgress, InspectReport, SegmentKey,
};

/// The batch clock of the writes, and the inspection's `now`.
const NOW: i64 = 1_700_000_000;

fn trace(digit: char) -> String {
    digit.to_string().repeat(32)
}

/// Writes two segments and three leftovers:
/// - project 1, trace `1…`, partition 0: children `b`, `c` of `a` in one batch (one
///   subsegment, 2 spans);
/// - project 2, trace `2…`, partition 1: children `d`, `e`, `f` of `r`, each in its own batch
///   (3 subsegments, 3 spans);
/// - a queue entry of `span-buf:q:0` with no data behind it, due 100 s before `NOW`;
/// - a redirect field of trace `1…` pointing at a root that has no segment;
/// - a key of the buffer's prefix without a TTL.
async fn write(redis: &TestRedis) {
    let buffer = buffer(redis, buffer_support::default_options(), vec![0, 1]).await;
    let first = [
        SpanSpec::child('b', 'a').trace(&trace('1')),
        SpanSpec::child('c', 'a').trace(&trace('1')),
    ];
    buffer.process_spans(&spans(&first), NOW).await.unwrap();
    for span in ['d', 'e', 'f'] {
        let spec = SpanSpec::child(span, 'r')
            .trace(&trace('2'))
            .project(2)
            .partition(1);
        buffer.process_spans(&spans(&[spec]), NOW).await.unwrap();
    }
    let orphan = SegmentKey::new(&keys::project_and_trace(9, &trace('9')), &id('z'));
    let _: () = redis.query(
        redis::cmd("ZADD")
            .arg(keys::queue(None, 0))
            .arg(NOW - 100)
            .arg(orphan.as_str()),
    );
    let redirects = keys::redirect_map(&keys::project_and_trace(1, &trace('1')));
    let _: () = redis.query(redis::cmd("HSET").arg(&redirects).arg(id('x')).arg(id('y')));
    let _: () = redis.query(redis::cmd("SET").arg("span-buf:stray").arg("1"));
}

async fn inspect(redis: &TestRedis, limits: InspectLimits) -> InspectReport {
    let inspector = BufferInspector::new(connect(redis).await, limits, "test".to_owned());
    let mut scanned = 0;
    let report = inspector
        .inspect(NOW, &mut |step| {
            if let InspectProgress::Scanning { scanned: n, .. } = step {
                scanned = n;
            }
        })
        .await
        .unwrap();
    assert_eq!(
        scanned,
        report
            .nodes
            .iter()
            .map(|node| node.buffer_keys)
            .sum::<u64>()
    );
    report
}

fn family(report: &InspectReport, family: KeyFamily) -> (u64, u64) {
    let found = report
        .families
        .iter()
        .find(|found| found.family == family)
        .unwrap();
    (found.keys, found.without_ttl)
}

#[tokio::test]
async fn the_report_counts_what_was_written_on_every_master() {
    for_each_mode(|redis| async move {
        write(&redis).await;

        let report = inspect(&redis, InspectLimits::default()).await;

        let mode = redis.mode();
        assert!(report.complete, "{mode:?}");
        assert_eq!(report.nodes.len(), if redis.is_cluster() { 3 } else { 1 });
        assert!(
            report
                .nodes
                .iter()
                .all(|node| node.used_memory > 0 && node.complete)
        );
        let scanned: u64 = report.nodes.iter().map(|node| node.buffer_keys).sum();
        assert_eq!(scanned as usize, redis.keys_with_ttls().len(), "{mode:?}");

        let queues: Vec<_> = report
            .queues
            .iter()
            .map(|q| {
                let seen = (
                    q.key.as_str(),
                    q.depth,
                    q.due,
                    q.oldest_deadline,
                    q.behind_secs,
                );
                (seen, q.entries_checked, q.entries_without_data)
            })
            .collect();
        assert_eq!(
            queues,
            [
                (("span-buf:q:0", 2, 1, Some(NOW - 100), 100), 2, 1),
                (("span-buf:q:1", 1, 0, Some(NOW + 60), 0), 1, 0),
            ],
            "{mode:?}"
        );

        for (name, expected) in [
            (KeyFamily::Payload, (4, 0)),
            (KeyFamily::MemberKeys, (2, 0)),
            (KeyFamily::Redirect, (2, 0)),
            (KeyFamily::IngestedCount, (2, 0)),
            (KeyFamily::IngestedBytes, (2, 0)),
            (KeyFamily::Queue, (2, 0)),
            (KeyFamily::Other, (1, 1)),
            (KeyFamily::FlushLock, (0, 0)),
        ] {
            assert_eq!(family(&report, name), expected, "{name:?} {mode:?}");
        }
        let payloads = report
            .families
            .iter()
            .find(|found| found.family == KeyFamily::Payload)
            .unwrap();
        assert_eq!(payloads.sampled, 4);
        assert!(payloads.estimated_bytes > 0);

        // Payloads are `{"span_id":"<16 characters>"}`: 30 bytes a span.
        assert_eq!(
            (
                report.segments.segments,
                report.segments.spans,
                report.segments.bytes
            ),
            (2, 5, 150)
        );
        let largest: Vec<_> = report
            .largest_by_spans
            .iter()
            .map(|s| (s.key.clone(), s.spans, s.bytes, s.subsegments))
            .collect();
        let second = SegmentKey::new(&keys::project_and_trace(2, &trace('2')), &id('r'));
        let first = SegmentKey::new(&keys::project_and_trace(1, &trace('1')), &id('a'));
        assert_eq!(
            largest,
            [
                (second.to_string(), 3, 90, 3),
                (first.to_string(), 2, 60, 1)
            ]
        );
        assert_eq!(report.largest_by_bytes, report.largest_by_spans);
        let hottest: Vec<_> = report
            .hottest_traces
            .iter()
            .map(|t| (t.project_id.as_str(), t.trace_id.clone(), t.subsegments))
            .collect();
        assert_eq!(hottest, [("2", trace('2'), 3), ("1", trace('1'), 1)]);

        let left = &report.leftovers;
        assert_eq!(left.keys_without_ttl, 1);
        assert_eq!(left.keys_without_ttl_examples, ["span-buf:stray"]);
        assert_eq!(
            (left.queue_entries_checked, left.queue_entries_without_data),
            (3, 1)
        );
        assert!(left.queue_entries_examples[0].contains(&id('z')));
        assert_eq!(
            (
                left.redirect_maps_checked,
                left.redirect_fields_checked,
                left.redirect_fields_without_segment
            ),
            (2, 6, 1)
        );
        assert!(left.redirect_fields_examples[0].ends_with(&id('x')));
    })
    .await;
}

#[tokio::test]
async fn a_limit_reached_is_reported_as_incomplete() {
    let redis = buffer_support::start(integration_tests::redis_server::RedisMode::Standalone);
    write(&redis).await;

    let report = inspect(
        &redis,
        InspectLimits {
            scan_count: 2,
            max_keys_per_node: 3,
            ..InspectLimits::default()
        },
    )
    .await;

    assert!(!report.complete);
    assert!(!report.nodes[0].complete);
    assert!(report.nodes[0].buffer_keys < 15);
}

#[tokio::test]
async fn the_binary_prints_json_for_scripts_and_text_for_people() {
    let redis = buffer_support::start(integration_tests::redis_server::RedisMode::Standalone);
    write(&redis).await;
    let command = |format: &[&str]| {
        process::succeed(
            std::process::Command::new(env!("CARGO_BIN_EXE_spans-pipeline"))
                .args(["inspect", "--redis-url", &redis.urls()[0]])
                .args(["--now", &NOW.to_string()])
                .args(format),
        )
    };

    let (json, progress) = command(&["--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["complete"], true);
    assert_eq!(report["segments"]["spans"], 5);
    assert_eq!(report["queues"][0]["behind_secs"], 100);
    assert_eq!(report["leftovers"]["keys_without_ttl"], 1);
    // Not a terminal: progress is plain lines on stderr, no bar.
    assert!(progress.contains("inspect: 15/"), "{progress}");
    assert!(!progress.contains('\u{1b}'), "{progress:?}");

    let (text, _) = command(&[]);
    for line in [
        "span-buf:q:0",
        "behind 1m 40s",
        "keys without a ttl: 1",
        "queue entries with no data: 1 of 3 checked",
        "redirect fields with no segment: 1 of 6 checked in 2 maps",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}
