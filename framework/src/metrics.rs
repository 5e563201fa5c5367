//! Metric names, all in one place, recorded through the `metrics` facade.
//!
//! The host application installs a recorder (Prometheus, StatsD); without one, recording is
//! a no-op. Names are dotted, under `rill.`. A step's own metrics carry the label [`STEP`]
//! (its kind, or the name given with its `with_metric_name`), so two steps of one kind in a
//! pipeline are told apart; `Produce`'s also carry [`TOPIC`], the topic it writes to.

/// Label: the step a metric comes from.
pub const STEP: &str = "step";
/// Label: the topic a step writes to.
pub const TOPIC: &str = "topic";

/// Counter: messages polled from the consumer.
pub const MESSAGES_POLLED: &str = "rill.consumer.messages_polled";
/// Counter: submissions the pipeline rejected (backpressure).
pub const MESSAGES_REJECTED: &str = "rill.consumer.messages_rejected";
/// Counter: offset commits sent to the consumer.
pub const COMMITS: &str = "rill.consumer.commits";
/// Counter: commits that failed transiently and will be retried.
pub const COMMIT_FAILURES: &str = "rill.consumer.commit_failures";
/// Counter: times the processor paused its partitions after sustained backpressure.
pub const PAUSES: &str = "rill.consumer.pauses";
/// Histogram: seconds the processor spent in backpressure before a message was accepted.
pub const BACKPRESSURE_SECONDS: &str = "rill.consumer.backpressure_seconds";
/// Histogram: seconds spent joining the pipeline on a rebalance or shutdown.
pub const JOIN_SECONDS: &str = "rill.consumer.join_seconds";
/// Counter: partitions assigned.
pub const PARTITIONS_ASSIGNED: &str = "rill.consumer.partitions_assigned";
/// Counter: partitions revoked.
pub const PARTITIONS_REVOKED: &str = "rill.consumer.partitions_revoked";
/// Counter: invalid messages (tag `outcome`: `dead_lettered`, `skipped`).
pub const INVALID_MESSAGES: &str = "rill.consumer.invalid_messages";
/// Histogram: seconds between a message's broker timestamp and its commit step.
pub const LATENCY_SECONDS: &str = "rill.consumer.latency_seconds";
/// Counter: batches flushed by `Reduce` (tag `reason`: `size`, `time`, `join`).
pub const BATCHES_FLUSHED: &str = "rill.reduce.batches_flushed";
/// Gauge: tasks in flight in `RunTaskInThreads`.
pub const TASKS_IN_FLIGHT: &str = "rill.run_task_in_threads.in_flight";
/// Counter: deliveries confirmed by `Produce` (tag `status`: `ok`, `retried`, `failed`).
pub const PRODUCE_DELIVERIES: &str = "rill.produce.deliveries";
/// Counter: messages dropped by `Filter` and `FilterMap`.
pub const MESSAGES_FILTERED: &str = "rill.filter.dropped";
/// Dead letters given up after every delivery attempt failed ([`Undeliverable::CommitPast`](crate::dlq::Undeliverable)).
pub const DLQ_UNDELIVERABLE: &str = "rill.dlq.undeliverable";
