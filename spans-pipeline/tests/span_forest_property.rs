//! Property: for a random forest of span trees, split into random batches in random order,
//! the buffer flushes one segment per tree holding every span of it exactly once, and leaves
//! nothing behind, on both Redis modes.

#![allow(clippy::unwrap_used)]

#[path = "support/buffer.rs"]
mod buffer_support;

use buffer_support::{SegmentView, SpanSpec, assert_clean, buffer, spans, start, view};
use integration_tests::redis_server::TestRedis;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use spans_pipeline::buffer::BufferOptions;

/// A generated case: tree sizes, and a seed that picks parents, arrival order and batches.
#[derive(Clone, Debug)]
struct Forest {
    tree_sizes: Vec<usize>,
    seed: u64,
    max_spans_per_evalsha: usize,
}

/// A small deterministic generator (xorshift), so a failing case is reproducible from `seed`.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

impl Forest {
    /// The spans of every tree (span 0 of each tree is its root), and the expected view.
    fn spans(&self) -> (Vec<SpanSpec>, SegmentView) {
        let mut rng = Rng(self.seed | 1);
        let mut all = Vec::new();
        let mut expected = SegmentView::new();
        for (tree, &size) in self.tree_sizes.iter().enumerate() {
            let trace = format!("{tree:032x}");
            let ids: Vec<String> = (0..size).map(|i| format!("{tree:08x}{i:08x}")).collect();
            let mut members = Vec::new();
            for (i, span_id) in ids.iter().enumerate() {
                let spec = if i == 0 {
                    SpanSpec::new(span_id, None, true)
                } else {
                    SpanSpec::new(span_id, Some(&ids[rng.below(i)]), false)
                };
                all.push(spec.trace(&trace));
                members.push((span_id.clone(), i == 0, ids[0].clone()));
            }
            members.sort();
            expected.insert(format!("span-buf:s:{{1:{trace}}}:{}", ids[0]), members);
        }
        for i in (1..all.len()).rev() {
            all.swap(i, rng.below(i + 1));
        }
        (all, expected)
    }

    /// Random batch boundaries over the shuffled spans.
    fn batches(&self, spans: &[SpanSpec]) -> Vec<Vec<SpanSpec>> {
        let mut rng = Rng(self.seed.rotate_left(17) | 1);
        let mut out = Vec::new();
        let mut current = Vec::new();
        for spec in spans {
            current.push(spec.clone());
            if rng.below(3) == 0 {
                out.push(std::mem::take(&mut current));
            }
        }
        if !current.is_empty() {
            out.push(current);
        }
        out
    }
}

fn forests() -> impl Strategy<Value = Forest> {
    (
        proptest::collection::vec(1usize..12, 1..4),
        any::<u64>(),
        0usize..3,
    )
        .prop_map(|(tree_sizes, seed, max_spans_per_evalsha)| Forest {
            tree_sizes,
            seed,
            max_spans_per_evalsha,
        })
}

async fn check(redis: &TestRedis, forest: &Forest) {
    redis.flush_all();
    let options = BufferOptions {
        max_spans_per_evalsha: forest.max_spans_per_evalsha,
        ..BufferOptions::default()
    };
    let buffer = buffer(redis, options, vec![0]).await;
    let (all, expected) = forest.spans();
    for (now, batch) in forest.batches(&all).iter().enumerate() {
        buffer
            .process_spans(&spans(batch), now as i64)
            .await
            .unwrap();
    }
    let flush = buffer.load_due_segments(1_000).await.unwrap();
    assert_eq!(view(&flush.segments), expected);
    assert!(flush.lost.is_empty(), "{:?}", flush.lost);
    buffer.done_flush_segments(&flush.segments).await.unwrap();
    assert_clean(redis);
}

#[test]
fn any_arrival_order_and_batching_gives_the_same_segments() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (mode, cases) in TestRedis::MODES.into_iter().zip([48, 16]) {
        let redis = start(mode);
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&forests(), |forest| {
                runtime.block_on(check(&redis, &forest));
                Ok(())
            })
            .unwrap();
    }
}
