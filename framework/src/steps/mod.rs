//! The built-in steps. Compose them from the last step back: each takes its next step last.

mod commit_offsets;
mod noop;
mod run_task;

pub use commit_offsets::{CommitOffsets, CommitPolicy};
pub use noop::Noop;
pub use run_task::RunTask;
