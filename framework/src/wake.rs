//! Wakes a waiting processor loop when a task of a step finished on another thread.
//!
//! While its pipeline rejects, the loop has nothing to do but wait for room: it waits its
//! retry pause, and the room usually comes from a task (`RunTaskInThreads`, its blocking
//! form) finishing on a worker thread, which the loop cannot see. Waiting the pause out after
//! the task finished leaves the step's threads idle: with tasks of 2 ms and a 1 ms pause, a
//! fifth of their time or more. So every task signals here when it finishes, and the system
//! clock's [`wait`](crate::Clock::wait) returns at that signal.
//!
//! The signal is one per process: a task finishing wakes every loop that waits, and a loop
//! woken by another's task only looks once more, which costs a poll of its pipeline. Notifying
//! with no loop waiting costs two atomic operations.
//!
//! A task finishing after the loop polled its pipeline but before the loop waits must not be
//! missed (the other tasks of a wave finish moments after the first): the loop [`observe`]s
//! the signal before it polls, and [`wait`] returns at once if a task finished since.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, const_mutex};

/// Signals finished work; [`wait`] returns at the next signal.
static SIGNAL: Signal = Signal::new();

thread_local! {
    /// The generation this thread's loop saw when it last looked at its pipeline.
    static OBSERVED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Tells waiting loops that a task finished.
pub(crate) fn notify() {
    SIGNAL.notify();
}

/// Notes that this thread is about to look at its pipeline: the next [`wait`] counts the
/// tasks finishing from now on.
pub(crate) fn observe() {
    OBSERVED.set(Some(SIGNAL.generation.load(Ordering::SeqCst)));
}

/// Waits for `timeout` at most, returning early at a [`notify`] since the last [`observe`] of
/// this thread (or, without one, since now).
pub(crate) fn wait(timeout: Duration) {
    let seen = OBSERVED
        .take()
        .unwrap_or_else(|| SIGNAL.generation.load(Ordering::SeqCst));
    SIGNAL.wait(seen, timeout);
}

struct Signal {
    /// Counts notifications, so a waiter can tell one came.
    generation: AtomicU64,
    /// Threads in [`Signal::wait`], so a notification with none skips the lock.
    waiters: AtomicUsize,
    lock: Mutex<()>,
    condvar: Condvar,
}

impl Signal {
    const fn new() -> Self {
        Self {
            generation: AtomicU64::new(0),
            waiters: AtomicUsize::new(0),
            lock: const_mutex(()),
            condvar: Condvar::new(),
        }
    }

    fn notify(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        // A waiter counted itself before reading the generation: either it reads the new one
        // and does not wait, or it waits on the condvar, which this wakes under the lock.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _guard = self.lock.lock();
            self.condvar.notify_all();
        }
    }

    /// Waits until the generation moved past `seen`, for `timeout` at most.
    fn wait(&self, seen: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut guard = self.lock.lock();
        while self.generation.load(Ordering::SeqCst) == seen {
            if self.condvar.wait_until(&mut guard, deadline).timed_out() {
                break;
            }
        }
        drop(guard);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;

    #[test]
    fn a_notification_ends_a_wait_long_before_its_timeout() {
        let signal = Arc::new(Signal::new());
        let returned = Arc::new(AtomicBool::new(false));
        let waiter = {
            let signal = Arc::clone(&signal);
            let returned = Arc::clone(&returned);
            std::thread::spawn(move || {
                let seen = signal.generation.load(Ordering::SeqCst);
                signal.wait(seen, Duration::from_secs(3600));
                returned.store(true, Ordering::SeqCst);
            })
        };

        // Notify until the waiter is back: it may not have read the generation yet.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !returned.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the wait did not end at a notification"
            );
            signal.notify();
            std::thread::yield_now();
        }
        waiter.join().unwrap();
    }

    #[test]
    fn a_wait_without_notification_ends_at_its_timeout() {
        let signal = Signal::new();

        signal.wait(
            signal.generation.load(Ordering::SeqCst),
            Duration::from_millis(1),
        );

        assert_eq!(signal.waiters.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_task_that_finished_after_the_loop_looked_ends_the_wait_at_once() {
        observe();
        notify(); // between the poll and the wait

        // Would block the test for an hour if the notification were missed.
        wait(Duration::from_secs(3600));
    }
}
