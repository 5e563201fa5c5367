//! The built-in steps. Compose them from the last step back: each takes its next step last.

mod commit_offsets;
mod filter;
mod filter_map;
mod health_check;
mod noop;
mod produce;
mod reduce;
mod run_blocking;
mod run_task;
mod run_task_in_threads;
mod unfold;

pub use commit_offsets::{CommitOffsets, CommitPolicy};
pub use filter::Filter;
pub use filter_map::FilterMap;
pub use health_check::HealthCheck;
pub use noop::Noop;
pub use produce::{Produce, ProduceFailed};
pub use reduce::Reduce;
pub use run_blocking::{BlockingCall, BlockingTask, PoolError};
pub use run_task::RunTask;
pub use run_task_in_threads::{RunTaskInThreads, TaskError};
pub use unfold::Unfold;
