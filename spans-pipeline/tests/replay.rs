//! The replay tool on a generated workload, on both Redis modes: every span comes out exactly
//! once, nothing is left in Redis, and `--no-flush` followed by an empty file hands a buffer
//! over intact.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use std::path::{Path, PathBuf};

use buffer_support::start;
use integration_tests::redis_server::TestRedis;
use spans_pipeline::replay::{ReplayArgs, run};
use spans_pipeline::workload::{self, WorkloadShape};

/// Writes the reference workload of `spans` spans (seed 7) as the JSONL file replay reads.
fn generate(dir: &Path, spans: usize) -> PathBuf {
    let out = dir.join("workload.jsonl");
    let load = workload::generate(&WorkloadShape {
        spans,
        seed: 7,
        ..WorkloadShape::default()
    });
    let file = std::fs::File::create(&out).unwrap();
    workload::write_jsonl(&load, std::io::BufWriter::new(file)).unwrap();
    out
}

fn args(redis: &TestRedis, file: PathBuf) -> ReplayArgs {
    ReplayArgs {
        file,
        redis_url: redis.urls()[0].clone(),
        cluster: redis.is_cluster(),
        batch_size: 500,
        output: None,
        no_flush: false,
        compression_level: 0,
        max_spans_per_evalsha: 0,
    }
}

#[tokio::test]
async fn replays_a_workload_with_every_span_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = generate(dir.path(), 3000);
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let output = dir.path().join("out.jsonl");
        let report = run(&ReplayArgs {
            output: Some(output.clone()),
            ..args(&redis, file.clone())
        })
        .await
        .unwrap();
        assert_eq!(report.spans_in, 3000);
        assert_eq!(report.invalid_lines, 0);
        assert_eq!(report.spans_out, 3000);
        assert_eq!(report.duplicate_spans, 0);
        assert_eq!(report.missing_spans, 0);
        assert_eq!(report.lost_spans, 0);
        assert_eq!(report.keys_left, 0);
        assert!(report.subsegments > 0 && report.subsegments < 3000);
        let lines = std::fs::read_to_string(&output).unwrap();
        assert_eq!(lines.lines().count(), report.messages);
        assert!(report.segments_flushed > 0);
    }
}

#[tokio::test]
async fn no_flush_leaves_the_buffer_and_an_empty_file_flushes_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = generate(dir.path(), 1000);
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, b"").unwrap();
    let compressed = dir.path().join("workload.jsonl.zst");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&compressed, zstd::encode_all(bytes.as_slice(), 3).unwrap()).unwrap();
    for mode in TestRedis::MODES {
        let redis = start(mode);
        let ingest = run(&ReplayArgs {
            no_flush: true,
            ..args(&redis, compressed.clone())
        })
        .await
        .unwrap();
        assert_eq!(ingest.spans_in, 1000);
        assert_eq!(ingest.spans_out, 0);
        assert!(ingest.keys_left > 0);
        buffer_support::assert_ttls(&redis);

        let flush = run(&args(&redis, empty.clone())).await.unwrap();
        assert_eq!(flush.spans_in, 0);
        assert_eq!(flush.spans_out, 1000);
        assert_eq!(flush.keys_left, 0);
    }
}
