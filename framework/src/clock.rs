//! Time, injected: the system clock in production, a manual clock in tests.
//!
//! Every time-based decision (batch windows, commit intervals, backpressure grace periods,
//! join deadlines) reads a [`Clock`]. With a [`ManualClock`], a test moves time forward itself
//! and never sleeps; nothing needs a background thread to make time pass.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A source of time that can also wait.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> Instant;

    /// Waits for `duration`: the system clock sleeps, a manual clock moves forward instead.
    fn sleep(&self, duration: Duration);
}

/// A clock shared between the steps of a pipeline and its processor.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl SystemClock {
    /// The system clock, shared.
    pub fn shared() -> SharedClock {
        Arc::new(Self)
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// A clock that only moves when told to; clones share the same time.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use rill::{Clock, ManualClock};
///
/// let clock = ManualClock::new();
/// let start = clock.now();
///
/// clock.advance(Duration::from_secs(5));
/// clock.sleep(Duration::from_secs(1)); // returns at once, one second later
///
/// assert_eq!(clock.now() - start, Duration::from_secs(6));
/// ```
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<Mutex<Instant>>,
}

impl ManualClock {
    /// A clock stopped at the current instant.
    pub fn new() -> Self {
        Self {
            now: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Moves time forward by `duration`.
    pub fn advance(&self, duration: Duration) {
        *self.now.lock() += duration;
    }

    /// This clock, shared (the clone keeps following [`advance`](Self::advance)).
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock").finish_non_exhaustive()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.now.lock()
    }

    fn sleep(&self, duration: Duration) {
        self.advance(duration);
    }
}

/// Whether `deadline` has passed on `clock`; `None` never passes.
pub(crate) fn expired(clock: &dyn Clock, deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| clock.now() >= d)
}

/// The earlier of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_of_a_manual_clock_share_time() {
        let clock = ManualClock::new();
        let shared = clock.shared();
        let before = shared.now();

        clock.advance(Duration::from_millis(10));

        assert_eq!(shared.now() - before, Duration::from_millis(10));
    }

    #[test]
    fn no_deadline_never_expires() {
        let clock = ManualClock::new();

        clock.advance(Duration::from_secs(3600));

        assert!(!expired(&clock, None));
        assert!(expired(&clock, Some(clock.now())));
    }
}
