//! The reading turn of a single-reader session (see `engine::Session::run`): at most one
//! worker waits in `read()` on the channel and answers what it reads; the others sleep here.
//! A watchdog takes the turn away from a holder that has spent more than [`STALL`] on one
//! request (a client array in memory that faults slowly, a lock held by a long OPEN), so that
//! another worker reads meanwhile — the stall then holds one worker, not the session.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How long one request may keep the reading worker before the watchdog passes the turn on.
pub const STALL: Duration = Duration::from_millis(20);
/// Watchdog ticks without a request before it sleeps until the next one (one second).
const IDLE_TICKS: u32 = 50;

#[derive(Default)]
pub struct Turn {
    held: Mutex<bool>,
    free: Condvar,
    /// `generation << 1 | reading`: the generation bumps when the watchdog takes the turn away
    /// (so the old holder learns it is a follower now); `reading` is set while the holder waits
    /// in `read()`, where it is idle, not stuck.
    state: AtomicU64,
    /// Requests read by holders: the watchdog's sign of progress.
    progress: AtomicU64,
    dog: Mutex<Dog>,
    dog_wake: Condvar,
    dog_asleep: AtomicBool,
}

#[derive(Default)]
struct Dog {
    asleep: bool,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Turn {
    /// Waits for the turn; returns the generation the caller holds it in.
    pub fn take(&self) -> u64 {
        let mut held = lock(&self.held);
        while *held {
            held = self.free.wait(held).unwrap_or_else(|p| p.into_inner());
        }
        *held = true;
        self.state.load(SeqCst) >> 1
    }

    /// Gives the turn up (before a request that hands off, or when leaving).
    pub fn pass(&self) {
        *lock(&self.held) = false;
        self.free.notify_one();
    }

    /// The holder of generation `gen` is about to wait in `read()`; false when the watchdog
    /// took the turn away meanwhile (the caller is a follower then and must `take` again).
    pub fn reading(&self, gen: u64) -> bool {
        // Already set when the holder reads again after EINTR.
        let r = self
            .state
            .compare_exchange(gen << 1, gen << 1 | 1, SeqCst, SeqCst);
        r.is_ok() || r == Err(gen << 1 | 1)
    }

    /// The holder of generation `gen` has read a request and handles it now.
    pub fn handling(&self, gen: u64) {
        // The watchdog never takes the turn while `reading` is set, so `gen` is still current.
        self.state.store(gen << 1, SeqCst);
        self.progress.fetch_add(1, SeqCst);
        if self.dog_asleep.load(SeqCst) {
            let mut d = lock(&self.dog);
            d.asleep = false;
            self.dog_asleep.store(false, SeqCst);
            self.dog_wake.notify_one();
        }
    }

    /// Runs the watchdog until [`Turn::close`]; `stalled` is called for every turn taken away.
    pub fn watch(&self, stalled: impl Fn()) {
        let sample = || (self.progress.load(SeqCst), self.state.load(SeqCst));
        let mut last = sample();
        let mut idle = 0;
        loop {
            {
                let d = lock(&self.dog);
                if d.closed {
                    return;
                }
                let (d, _) = self
                    .dog_wake
                    .wait_timeout(d, STALL)
                    .unwrap_or_else(|p| p.into_inner());
                if d.closed {
                    return;
                }
            }
            let now = sample();
            if now != last {
                (last, idle) = (now, 0);
                continue;
            }
            if now.1 & 1 == 1 {
                // The holder waits in read(): idle. After a while, sleep until a request.
                idle += 1;
                if idle >= IDLE_TICKS && !self.sleep_until_request(now) {
                    return;
                }
                continue;
            }
            // One request has kept the holder for a whole tick: take the turn away. (Not held:
            // the last holder passed it on before a request that hands off, and every worker is
            // busy; nobody to take it from.)
            let gen = now.1 >> 1;
            let next = (gen + 1) << 1;
            let held = *lock(&self.held);
            if held
                && self
                    .state
                    .compare_exchange(now.1, next, SeqCst, SeqCst)
                    .is_ok()
            {
                log::warn!(
                    "a request kept the reading worker for over {STALL:?}; another worker reads meanwhile"
                );
                stalled();
                self.pass();
            }
            last = sample();
        }
    }

    /// Sleeps until a holder reads a request; false when the turn is closed.
    fn sleep_until_request(&self, seen: (u64, u64)) -> bool {
        let mut d = lock(&self.dog);
        d.asleep = true;
        self.dog_asleep.store(true, SeqCst);
        // A request read between the last sample and the flag above did not see the flag.
        if self.progress.load(SeqCst) != seen.0 {
            d.asleep = false;
            self.dog_asleep.store(false, SeqCst);
        }
        while d.asleep && !d.closed {
            d = self.dog_wake.wait(d).unwrap_or_else(|p| p.into_inner());
        }
        !d.closed
    }

    /// Ends [`Turn::watch`].
    pub fn close(&self) {
        lock(&self.dog).closed = true;
        self.dog_wake.notify_all();
    }
}
