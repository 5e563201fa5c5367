//! Touch a file while the pipeline is being polled, as a liveness signal.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::clock::{ClockSampler, SharedClock, SystemClock};
use crate::commit::CommitRequest;
use crate::error::{StrategyError, SubmitError};
use crate::message::{Message, Partition};
use crate::strategy::ProcessingStrategy;

/// Passes everything through to the next step and, on `poll`, touches `path` at most once
/// per `interval` (default 1 s).
///
/// A liveness probe checks the file's age: it goes stale when the consumer loop stops
/// polling (a stuck step, a deadlock). Failing to write the file is logged, never fatal.
///
/// # Examples
///
/// ```
/// use rill::steps::{HealthCheck, Noop};
/// use rill::ProcessingStrategy;
///
/// let dir = std::env::temp_dir().join(format!("rill-health-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let mut step = HealthCheck::new(dir.join("alive"), Noop);
/// ProcessingStrategy::<()>::poll(&mut step).unwrap();
/// assert!(dir.join("alive").exists());
/// # std::fs::remove_dir_all(dir).unwrap();
/// ```
#[derive(Debug)]
pub struct HealthCheck<N> {
    path: PathBuf,
    interval: Duration,
    last_touch: Option<Instant>,
    clock: SharedClock,
    sampler: ClockSampler,
    /// Whether messages went through since the last poll.
    busy: bool,
    next_step: N,
}

impl<N> HealthCheck<N> {
    /// Touches `path` as `next_step` is polled.
    pub fn new(path: impl Into<PathBuf>, next_step: N) -> Self {
        Self {
            path: path.into(),
            interval: Duration::from_secs(1),
            last_touch: None,
            clock: SystemClock::shared(),
            sampler: ClockSampler::new(),
            busy: false,
            next_step,
        }
    }

    /// Sets the least time between two touches.
    #[must_use]
    pub const fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Reads time from `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.sampler.reset();
        self.clock = clock;
        self
    }

    fn touch(&mut self) {
        let busy = std::mem::take(&mut self.busy);
        // A clock read costs more than passing a message on: sample it while busy.
        let Some(now) = self.sampler.sample(&*self.clock, busy) else {
            return;
        };
        if self
            .last_touch
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            return;
        }
        self.last_touch = Some(now);
        if let Err(error) = std::fs::write(&self.path, b"") {
            tracing::warn!(%error, path = %self.path.display(), "Could not touch the health file.");
        }
    }
}

impl<T, N: ProcessingStrategy<T>> ProcessingStrategy<T> for HealthCheck<N> {
    fn poll(&mut self) -> Result<Option<CommitRequest>, StrategyError> {
        self.touch();
        self.next_step.poll()
    }

    fn submit(&mut self, message: Message<T>) -> Result<(), SubmitError<T>> {
        self.busy = true;
        self.next_step.submit(message)
    }

    fn join(&mut self, deadline: Option<Instant>) -> Result<Option<CommitRequest>, StrategyError> {
        self.next_step.join(deadline)
    }

    fn close(&mut self) {
        self.next_step.close();
    }

    fn partitions_changed(&mut self, assigned: &[Partition], revoked: &[Partition]) {
        self.next_step.partitions_changed(assigned, revoked);
    }

    fn terminate(&mut self) {
        self.next_step.terminate();
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.next_step.next_deadline()
    }

    fn is_idle(&self) -> bool {
        self.next_step.is_idle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::testing::RecordingStep;

    fn modified(path: &std::path::Path) -> std::time::SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    #[test]
    fn touches_at_most_once_per_interval_and_polls_the_next_step() {
        let dir = tempdir();
        let path = dir.join("alive");
        let clock = ManualClock::new();
        let next = RecordingStep::<u32>::new();
        let mut step = HealthCheck::new(&path, next.clone()).with_clock(clock.shared());

        step.poll().unwrap();
        let first = modified(&path);
        std::fs::remove_file(&path).unwrap();
        step.poll().unwrap();
        assert!(!path.exists(), "touched again within the interval");
        clock.advance(Duration::from_secs(1));
        step.poll().unwrap();

        assert!(path.exists());
        assert!(modified(&path) >= first);
        assert_eq!(next.polls(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_that_cannot_be_written_is_not_fatal() {
        let mut step = HealthCheck::new("/nonexistent-dir/alive", RecordingStep::<u32>::new());

        assert!(step.poll().is_ok());
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "rill-health-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
