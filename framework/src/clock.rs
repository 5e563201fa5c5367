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

    /// Waits for `duration` at most, for room in a pipeline: the system clock returns early
    /// when a task of a step (`RunTaskInThreads`) finished, so the waiting loop sees the room
    /// at once. By default, and for a manual clock, [`sleep`](Self::sleep).
    fn wait(&self, duration: Duration) {
        self.sleep(duration);
    }
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

    fn wait(&self, duration: Duration) {
        crate::wake::wait(duration);
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

/// Reads a clock sparingly from a step's `poll`, which the processor calls on every message.
///
/// Reading the system clock costs tens of nanoseconds (a busy pipeline spends less than that on
/// a whole message), so while messages keep flowing the sampler reads it only every `every`
/// polls, adapting `every` so reads stay about [`SAMPLE_SPACING`] apart. A poll with no new
/// message since the previous one (an idle loop, where a timer may be what matters) always
/// reads the clock. The instant returned is never older than about `SAMPLE_SPACING` in a
/// steady stream.
#[derive(Debug, Clone)]
pub(crate) struct ClockSampler {
    every: u32,
    countdown: u32,
    last: Option<Instant>,
}

/// The most polls a [`ClockSampler`] answers from one read. It bounds how stale the instant
/// can get when polls suddenly slow down (a stream turning from cheap to expensive messages)
/// to this many of the slower polls.
const MAX_SKIPPED_READS: u32 = 64;

/// The target time between two real clock reads of a [`ClockSampler`].
pub(crate) const SAMPLE_SPACING: Duration = Duration::from_micros(200);

impl ClockSampler {
    pub(crate) const fn new() -> Self {
        Self {
            every: 1,
            countdown: 0,
            last: None,
        }
    }

    /// The current instant, or `None` when `busy` (messages arrived since the last call) and
    /// the clock was read recently enough: nothing timed can have become due since that read.
    #[inline]
    pub(crate) fn sample(&mut self, clock: &dyn Clock, busy: bool) -> Option<Instant> {
        if self.last.is_some() && busy && self.countdown > 0 {
            self.countdown -= 1;
            return None;
        }
        Some(self.read(clock, busy))
    }

    fn read(&mut self, clock: &dyn Clock, busy: bool) -> Instant {
        let now = clock.now();
        self.every = match self.last {
            Some(last) if busy => {
                let elapsed = now.saturating_duration_since(last);
                if elapsed < SAMPLE_SPACING / 2 {
                    (self.every * 2).min(MAX_SKIPPED_READS)
                } else if elapsed <= SAMPLE_SPACING * 2 {
                    self.every
                } else {
                    // Polls slowed down: scale back in proportion, at once.
                    let scaled = u128::from(self.every) * SAMPLE_SPACING.as_nanos()
                        / elapsed.as_nanos().max(1);
                    u32::try_from(scaled).unwrap_or(1).max(1)
                }
            }
            _ => 1,
        };
        self.countdown = self.every - 1;
        self.last = Some(now);
        now
    }

    /// Forgets the cached instant (the clock was replaced).
    pub(crate) const fn reset(&mut self) {
        self.last = None;
        self.countdown = 0;
        self.every = 1;
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
    fn an_idle_sampler_reads_the_clock_every_time() {
        let clock = ManualClock::new();
        let mut sampler = ClockSampler::new();
        sampler.sample(&clock, false);

        clock.advance(Duration::from_secs(1));

        assert_eq!(sampler.sample(&clock, false), Some(clock.now()));
    }

    #[test]
    fn a_busy_sampler_skips_reads_while_time_barely_moves_and_catches_up_at_once() {
        let clock = ManualClock::new();
        let mut sampler = ClockSampler::new();
        for _ in 0..20 {
            sampler.sample(&clock, true); // time does not move: reads get rarer
        }
        assert!(sampler.every > 1);

        clock.advance(Duration::from_millis(5));
        let polls = sampler.every + 1;
        let reads: Vec<_> = (0..polls)
            .filter_map(|_| sampler.sample(&clock, true))
            .collect();

        // Within `every` busy polls the sampler reads the clock again, and having seen time
        // jump it goes back to reading on every poll.
        assert_eq!(reads.first(), Some(&clock.now()));
        assert!(reads.len() > 1, "kept skipping reads after time jumped");
    }

    #[test]
    fn no_deadline_never_expires() {
        let clock = ManualClock::new();

        clock.advance(Duration::from_secs(3600));

        assert!(!expired(&clock, None));
        assert!(expired(&clock, Some(clock.now())));
    }
}
