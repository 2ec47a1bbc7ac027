//! Staying awake while misses come close together.
//!
//! A miss served by a sleeping pager costs two wake-ups: the pager's, when
//! the fault arrives, and the faulting thread's, when its page is in. On a
//! virtual machine each wakes a halted vCPU, which costs tens of µs (the
//! guest's halt polling is often off), several times the miss itself.
//! While misses come within [`Keeper`]'s window of each other:
//!
//! - the pager polls its descriptors instead of sleeping in `poll`,
//!   yielding its CPU to any other runnable thread between polls;
//! - keeper threads at `SCHED_IDLE` priority spin on the other CPUs, so
//!   the CPU of a thread that blocks on a miss is not halted when its page
//!   comes in. They run only when a CPU has nothing else to run.
//!
//! Once no miss has come for a window, everything sleeps again: an idle
//! program costs no CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use lego_sys::process;

/// When the last miss was served, and the threads that spin after it.
pub struct Keeper {
    start: Instant,
    /// The window, in µs (0: never spin).
    window_us: u64,
    /// Until when (µs since `start`) the pager and the keepers spin.
    hot_until: AtomicU64,
    /// Some keeper sleeps on `wake`.
    asleep: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Keeper {
    pub fn new(window: Duration) -> Self {
        Self {
            start: Instant::now(),
            window_us: window.as_micros() as u64,
            hot_until: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// How many keeper threads to start: one per CPU beside the pager's
    /// (at most three), none when spinning is off or there is one CPU.
    pub fn threads(&self) -> usize {
        if self.window_us == 0 {
            return 0;
        }
        process::usable_cpus().saturating_sub(1).min(3)
    }

    /// A miss was served: spin for another window.
    pub fn missed(&self) {
        if self.window_us == 0 {
            return;
        }
        self.hot_until.store(self.now_us() + self.window_us, SeqCst);
        if self.asleep.load(SeqCst) {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }

    /// Whether a miss came within the window.
    pub fn is_hot(&self) -> bool {
        self.now_us() < self.hot_until.load(SeqCst)
    }

    /// The body of a keeper thread.
    pub fn keep_awake(&self) -> ! {
        process::set_thread_name(process::KEEPER_THREAD_NAME);
        if let Err(e) = process::set_idle_priority() {
            process::warn(&format!(
                "runtime: a keeper thread stays at normal priority: {e}"
            ));
        }
        loop {
            // No `pause` in the loop: on a VM a pause loop can make the
            // hypervisor deschedule the vCPU, which is what this avoids.
            while self.is_hot() {}
            let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.asleep.store(true, SeqCst);
            while !self.is_hot() {
                guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            self.asleep.store(false, SeqCst);
        }
    }

    /// Waits for an event on `fds` up to `timeout_ms`: polling, yielding
    /// between polls, while hot; sleeping otherwise.
    pub fn poll(&self, fds: &mut [libc::pollfd], timeout_ms: i32) -> std::io::Result<usize> {
        while self.is_hot() {
            let n = process::poll(fds, 0)?;
            if n > 0 {
                return Ok(n);
            }
            process::yield_now();
        }
        process::poll(fds, timeout_ms)
    }
}
