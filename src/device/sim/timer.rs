//! One timer thread per device for the deadlines of parked `WAIT_EVENTS` calls.
//!
//! Deadlines sit in an ordered map keyed by (instant, sequence) so a waiter that completes early
//! removes its entry (no stale entries pile up behind long timeouts). The thread sleeps on a
//! condvar until the earliest deadline, takes the due entries out under the lock and fires them
//! after releasing it, so a firing callback may take context locks freely.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Instant;

use super::kfd::KfdInner;

/// Identifies one armed deadline (for cancelling it).
pub type TimerKey = (Instant, u64);

struct Entry {
    ctx: Weak<KfdInner>,
    waiter: u64,
}

#[derive(Default)]
struct State {
    entries: BTreeMap<TimerKey, Entry>,
    seq: u64,
    started: bool,
    shutdown: bool,
}

pub struct Timer {
    st: Mutex<State>,
    cv: Condvar,
}

impl Timer {
    pub fn new() -> Arc<Timer> {
        Arc::new(Timer {
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms a deadline that calls `ctx.waiter_timeout(waiter)` at `at`.
    pub fn arm(self: &Arc<Self>, at: Instant, ctx: Weak<KfdInner>, waiter: u64) -> TimerKey {
        let mut st = self.lock();
        st.seq += 1;
        let key = (at, st.seq);
        let first = st.entries.keys().next().is_none_or(|k| key < *k);
        st.entries.insert(key, Entry { ctx, waiter });
        if !st.started && !st.shutdown {
            st.started = true;
            let me = self.clone();
            if let Err(e) = std::thread::Builder::new()
                .name("sim-timer".into())
                .spawn(move || me.run())
            {
                log::error!("sim: cannot start the timer thread: {e}");
                st.started = false;
            }
        }
        drop(st);
        if first {
            self.cv.notify_one();
        }
        key
    }

    pub fn cancel(&self, key: TimerKey) {
        self.lock().entries.remove(&key);
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops the thread (pending deadlines are dropped; their contexts answer at release).
    pub fn shutdown(&self) {
        let mut st = self.lock();
        st.shutdown = true;
        st.entries.clear();
        drop(st);
        self.cv.notify_all();
    }

    fn run(self: Arc<Self>) {
        let mut st = self.lock();
        loop {
            if st.shutdown {
                return;
            }
            let now = Instant::now();
            match st.entries.keys().next().copied() {
                None => st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(k) if k.0 > now => {
                    st = self
                        .cv
                        .wait_timeout(st, k.0 - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                Some(_) => {
                    let mut due = Vec::new();
                    while let Some(e) = st.entries.first_entry() {
                        if e.key().0 > now {
                            break;
                        }
                        due.push(e.remove());
                    }
                    drop(st);
                    for e in due {
                        if let Some(ctx) = e.ctx.upgrade() {
                            ctx.waiter_timeout(e.waiter);
                        }
                    }
                    st = self.lock();
                }
            }
        }
    }
}
