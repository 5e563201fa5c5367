//! The spans buffer's hot paths on the reference workload (`spans_pipeline::workload`, seed 42): decode,
//! grouping, compression, `process_spans` of a 2000-span batch and a flush of 500 segments on
//! a real local `redis-server`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use integration_tests::redis_server::{RedisServer, TestRedis};
use spans_pipeline::buffer::{
    BufferOptions, PayloadEncoder, RedisConnection, SpansBuffer, build_subsegments,
};
use spans_pipeline::span::Span;
use spans_pipeline::workload::{WorkloadShape, generate};

/// Spans in the generated workload.
const WORKLOAD_SPANS: usize = 20_000;
/// Spans per consumer batch (Sentry's production batch size).
const BATCH: usize = 2000;
/// Segments per flush (Sentry's default `max-flush-segments`).
const FLUSH_SEGMENTS: usize = 500;

fn workload() -> Vec<Vec<u8>> {
    generate(&WorkloadShape {
        spans: WORKLOAD_SPANS,
        ..WorkloadShape::default()
    })
    .into_iter()
    .map(|span| span.payload)
    .collect()
}

fn decode_batch(lines: &[Vec<u8>]) -> Vec<Span<'_>> {
    lines
        .iter()
        .map(|line| Span::decode(line, 0).expect("valid span"))
        .collect()
}

fn cpu_work(c: &mut Criterion) {
    let lines = workload();
    let batch = &lines[..BATCH];

    let mut group = c.benchmark_group("spans_pipeline::span::Span");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("decode_2000", |b| {
        b.iter(|| black_box(decode_batch(black_box(batch))));
    });
    group.finish();

    let spans = decode_batch(batch);
    let mut group = c.benchmark_group("spans_pipeline::buffer::build_subsegments");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("build_subsegments_2000", |b| {
        b.iter(|| black_box(build_subsegments(black_box(&spans), 0)));
    });
    group.finish();

    let subsegments = build_subsegments(&spans, 0);
    let mut group = c.benchmark_group("spans_pipeline::buffer::PayloadEncoder");
    group.throughput(Throughput::Elements(BATCH as u64));
    for level in [-1, 0] {
        let mut encoder = PayloadEncoder::new(level).expect("encoder");
        group.bench_function(format!("encode_2000_level_{level}"), |b| {
            b.iter(|| {
                for subsegment in &subsegments {
                    let payloads = subsegment.spans.iter().map(|span| span.payload);
                    black_box(encoder.encode(payloads).expect("encode"));
                }
            });
        });
    }
    group.finish();
}

async fn new_buffer(redis: &TestRedis) -> SpansBuffer {
    let conn = RedisConnection::connect(&redis.urls(), false)
        .await
        .expect("connect");
    SpansBuffer::new(conn, BufferOptions::default(), vec![0], None)
        .await
        .expect("buffer")
}

/// `process_spans` of consecutive 2000-span batches, as a consumer sees them; Redis is
/// emptied (untimed) after each pass over the workload.
fn process_spans(c: &mut Criterion) {
    let lines = workload();
    let batches: Vec<Vec<Span<'_>>> = lines.chunks(BATCH).map(decode_batch).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let redis = TestRedis::Standalone(RedisServer::start());
    let buffer = runtime.block_on(new_buffer(&redis));

    let mut group = c.benchmark_group("spans_pipeline::buffer::SpansBuffer");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(30);
    let mut next = 0;
    group.bench_function("process_spans_2000", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                if next == batches.len() {
                    redis.flush_all();
                    next = 0;
                }
                let batch = &batches[next];
                next += 1;
                let started = Instant::now();
                runtime
                    .block_on(buffer.process_spans(batch, 0))
                    .expect("process");
                total += started.elapsed();
            }
            total
        });
    });
    group.finish();
}

/// Flush of 500 ready segments (flush, build messages, done) from a buffer filled with the
/// whole workload; refilled (untimed) before each iteration.
fn flush_segments(c: &mut Criterion) {
    let lines = workload();
    let batches: Vec<Vec<Span<'_>>> = lines.chunks(BATCH).map(decode_batch).collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let redis = TestRedis::Standalone(RedisServer::start());
    let writer = runtime.block_on(new_buffer(&redis));
    let flusher = runtime.block_on(new_buffer(&redis));
    let options = flusher.options().clone();

    let mut group = c.benchmark_group("spans_pipeline::buffer::SpansBuffer");
    group.throughput(Throughput::Elements(FLUSH_SEGMENTS as u64));
    group.sample_size(20);
    group.bench_function("flush_500_segments", |b| {
        b.iter_batched(
            || {
                redis.flush_all();
                for batch in &batches {
                    runtime
                        .block_on(writer.process_spans(batch, 0))
                        .expect("process");
                }
            },
            |()| {
                let flush = runtime
                    .block_on(flusher.load_due_segments(i64::MAX / 4))
                    .expect("flush");
                assert_eq!(flush.segments.len(), FLUSH_SEGMENTS);
                for segment in &flush.segments {
                    black_box(segment.to_messages(options.max_segment_bytes));
                }
                runtime
                    .block_on(flusher.done_flush_segments(&flush.segments))
                    .expect("done");
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, cpu_work, process_spans, flush_segments);
criterion_main!(benches);
