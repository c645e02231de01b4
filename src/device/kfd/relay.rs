//! The doorbell relay: the client maps shadow pages (its memfd); the owner maps the hardware
//! page; one polling thread per daemon copies what changed from one to the other.
//!
//! Doorbell and MMIO-remap pages relay shadow → hardware (the client writes, the GPU reads); an
//! events page relays hardware → shadow. The relay compares 64-bit words against the value it
//! last copied, so a client that writes the same doorbell value twice is relayed once — the
//! hardware only needs the newest write pointer.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::errno::Errno;

/// Which way a relayed range is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayDir {
    /// Client writes (doorbells, HDP flush) reach the hardware page.
    ShadowToReal,
    /// Hardware writes (events page) reach the client.
    RealToShadow,
}

/// A shared mapping owned by the relay (unmapped on drop).
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all access goes through volatile word reads and
// writes by the relay thread.
unsafe impl Send for Mapping {}

impl Mapping {
    /// `mmap(len, RW, MAP_SHARED, fd, off)`.
    pub fn new(fd: BorrowedFd<'_>, off: u64, len: usize) -> Result<Mapping, Errno> {
        let o = libc::off_t::try_from(off).map_err(|_| Errno::EINVAL)?;
        // SAFETY: a fresh shared mapping chosen by the kernel; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                o,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    fn words(&self) -> usize {
        self.len / 8
    }

    fn read(&self, i: usize) -> u64 {
        debug_assert!(i < self.words());
        // SAFETY: `i` < len/8, the mapping is live and 8-aligned (page aligned base).
        unsafe { std::ptr::read_volatile((self.ptr as *const u64).add(i)) }
    }

    fn write(&self, i: usize, v: u64) {
        debug_assert!(i < self.words());
        // SAFETY: as in `read`; a single aligned 64-bit store, as a doorbell write is.
        unsafe { std::ptr::write_volatile((self.ptr as *mut u64).add(i), v) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range mmap gave us.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct Pair {
    shadow: Mapping,
    real: Mapping,
    dir: RelayDir,
    last: Vec<u64>,
}

/// Counters for the stats file.
#[derive(Default)]
pub struct RelayStats {
    pub pairs: AtomicU64,
    pub relayed_words: AtomicU64,
    pub polls: AtomicU64,
}

pub struct Relay {
    pairs: Mutex<HashMap<u64, Pair>>,
    next: AtomicU64,
    poll: Duration,
    pub stats: RelayStats,
    started: std::sync::Once,
}

impl Relay {
    pub fn new(poll: Duration) -> Arc<Relay> {
        Arc::new(Relay {
            pairs: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            poll,
            stats: RelayStats::default(),
            started: std::sync::Once::new(),
        })
    }

    /// Relays `shadow` and `real` (same length) from now on; returns the pair's id.
    pub fn add(self: &Arc<Relay>, shadow: Mapping, real: Mapping, dir: RelayDir) -> u64 {
        let n = shadow.words().min(real.words());
        // Start from what both sides hold now: hardware contents show through to the client.
        for i in 0..n {
            shadow.write(i, real.read(i));
        }
        let last = (0..n).map(|i| shadow.read(i)).collect();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.pairs.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Pair {
                shadow,
                real,
                dir,
                last,
            },
        );
        self.stats.pairs.fetch_add(1, Ordering::Relaxed);
        self.started.call_once(|| {
            let weak = Arc::downgrade(self);
            let poll = self.poll;
            let r = std::thread::Builder::new()
                .name("kfdmux-relay".into())
                .spawn(move || run(weak, poll));
            if let Err(e) = r {
                log::error!("doorbell relay thread: {e}");
            }
        });
        id
    }

    /// Stops relaying pair `id` (after a last pass, so a final doorbell write is not lost).
    pub fn remove(&self, id: u64) {
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut p) = pairs.remove(&id) {
            self.stats
                .relayed_words
                .fetch_add(pass(&mut p), Ordering::Relaxed);
            self.stats.pairs.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// One pass over every pair (also what the thread does each poll interval).
    pub fn pass_all(&self) -> u64 {
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        let n: u64 = pairs.values_mut().map(pass).sum();
        self.stats.relayed_words.fetch_add(n, Ordering::Relaxed);
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        n
    }
}

fn pass(p: &mut Pair) -> u64 {
    let mut n = 0;
    for (i, last) in p.last.iter_mut().enumerate() {
        let (from, to) = match p.dir {
            RelayDir::ShadowToReal => (&p.shadow, &p.real),
            RelayDir::RealToShadow => (&p.real, &p.shadow),
        };
        let v = from.read(i);
        if v != *last {
            to.write(i, v);
            *last = v;
            n += 1;
        }
    }
    n
}

fn run(relay: Weak<Relay>, poll: Duration) {
    loop {
        std::thread::sleep(poll);
        let Some(r) = relay.upgrade() else { return };
        r.pass_all();
    }
}
