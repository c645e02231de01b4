//! An append-only file written through a shared mapping: appending a record is a `memcpy`
//! under a lock, not a `write(2)`. A daemon killed at any moment leaves every completed record
//! in the page cache, followed by zeros the reader treats as the end; `finish` (or drop) trims
//! the file to its data.
//!
//! The expensive part of writing through a mapping is the first write to each page (a page
//! fault: on ext4 a journal handle and a block reservation, ~10–25 µs here). A background
//! thread therefore keeps the pages ahead of the data populated for writing with
//! `madvise(MADV_POPULATE_WRITE)`, which faults pages in without changing their contents, so
//! the request path only copies. The appender never writes into a page that is not known to
//! be populated: if it outruns the thread it populates synchronously, and if that fails (a
//! full disk) the append fails with the errno instead of the daemon dying of SIGBUS.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// How much is mapped (and the file grown) at a time.
const WINDOW: usize = 16 << 20;
/// How far ahead of the data the background thread keeps pages populated.
const AHEAD: u64 = 4 << 20;
/// The thread is woken when fewer populated bytes than this remain ahead of the data.
const LOW_WATER: u64 = AHEAD / 2;
/// The thread populates this much per madvise, so `populated` advances in small steps and the
/// appender does not fall back to populating pages the thread is about to.
const CHUNK: u64 = 64 << 10;
const PAGE: u64 = 4096;

/// One mapped window of the file: bytes `[base, base + len)`; unmapped on drop. Shared with
/// the populating thread so a window it is working on outlives a remap.
struct Window {
    ptr: *mut u8,
    len: usize,
    base: u64,
}

// SAFETY: the window is a plain memory range; writes go through `Inner` under its mutex and
// the populating thread only passes the range to madvise, which does not change contents.
unsafe impl Send for Window {}
// SAFETY: as above — shared references only read `ptr`/`len`/`base`.
unsafe impl Sync for Window {}

impl Window {
    fn map(file: &File, base: u64, len: usize) -> io::Result<Window> {
        file.set_len(base + len as u64)?;
        // SAFETY: mapping `len` bytes of our own file at a page-aligned offset; the file is at
        // least that long (set_len above). The mapping is released in `drop`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                base as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Window {
            ptr: p as *mut u8,
            len,
            base,
        })
    }

    fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Faults file bytes `[from, to)` (page-rounded, clipped to the window) in for writing.
    fn populate(&self, from: u64, to: u64) -> io::Result<()> {
        let from = (from.max(self.base) / PAGE) * PAGE;
        let to = to.min(self.end()).div_ceil(PAGE) * PAGE;
        if from >= to {
            return Ok(());
        }
        // SAFETY: `[from, to)` lies inside this live mapping (clipped above, page aligned);
        // MADV_POPULATE_WRITE only faults pages in and leaves their contents as they are.
        let r = unsafe {
            libc::madvise(
                self.ptr.add((from - self.base) as usize) as *mut libc::c_void,
                (to - from) as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping made in `map`; nobody holds it any more.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

struct Inner {
    file: File,
    window: Option<Arc<Window>>,
    /// Bytes of data in the file.
    end: u64,
    /// File offset up to which the current window's pages are populated.
    populated: u64,
    /// Set when the appender is dropped: the thread exits.
    stop: bool,
    /// The thread is waiting for work (so a wake-up is needed).
    idle: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct MappedAppender {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MappedAppender {
    /// Appends after the `end` bytes already in `file`.
    pub fn new(file: File, end: u64) -> io::Result<MappedAppender> {
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                file,
                window: None,
                end,
                populated: 0,
                stop: false,
                idle: false,
            }),
            wake: Condvar::new(),
        });
        remap(&mut shared.lock(), 0)?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kfdmux-trace".into())
            .spawn(move || populate_ahead(&s))?;
        Ok(MappedAppender {
            shared,
            thread: Some(thread),
        })
    }

    /// Appends `parts` contiguously. On error nothing is written.
    pub fn append(&self, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut g = self.shared.lock();
        let need_end = g.end + total as u64;
        let fits = g.window.as_ref().is_some_and(|w| need_end <= w.end());
        if !fits {
            remap(&mut g, total)?;
        }
        let w = g.window.clone().ok_or(io::ErrorKind::Other)?;
        if need_end > g.populated {
            // Outran the thread (or a fresh window): populate what this record needs now.
            w.populate(g.populated.max(g.end), need_end)?;
            g.populated = need_end.div_ceil(PAGE) * PAGE;
        }
        let mut at = (g.end - w.base) as usize;
        for p in parts {
            // SAFETY: `at + p.len() <= len` (the window holds `need_end`, checked above) and
            // those pages are populated for writing; the source is a live slice that cannot
            // overlap our mapping of the file.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), w.ptr.add(at), p.len()) };
            at += p.len();
        }
        g.end = need_end;
        // Wake the thread only when it has stopped: it keeps going on its own until AHEAD.
        if g.populated < need_end + LOW_WATER && g.populated < w.end() && g.idle {
            g.idle = false;
            self.shared.wake.notify_one();
        }
        Ok(())
    }

    /// Trims the file to its data (the mapping is kept; later appends grow it again).
    pub fn finish(&self) -> io::Result<()> {
        let mut g = self.shared.lock();
        g.window = None;
        g.populated = 0;
        let end = g.end;
        g.file.set_len(end)
    }
}

/// Maps a window starting at the page that holds `end`, big enough for `need` more bytes.
fn remap(g: &mut Inner, need: usize) -> io::Result<()> {
    g.window = None;
    let base = g.end / PAGE * PAGE;
    let len = WINDOW.max(need + PAGE as usize).div_ceil(PAGE as usize) * PAGE as usize;
    let w = Window::map(&g.file, base, len)?;
    g.window = Some(Arc::new(w));
    // Nothing of a new mapping is known to be populated.
    g.populated = base;
    Ok(())
}

/// The background thread: keeps [`AHEAD`] bytes past the data populated.
fn populate_ahead(s: &Shared) {
    let mut g = s.lock();
    loop {
        if g.stop {
            return;
        }
        let target = match &g.window {
            Some(w) if g.populated < g.end + AHEAD && g.populated < w.end() => {
                let from = g.populated.max(g.end);
                Some((w.clone(), from, (from + CHUNK).min(w.end())))
            }
            _ => None,
        };
        let Some((w, from, to)) = target else {
            g.idle = true;
            g = s.wake.wait(g).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        drop(g);
        let r = w.populate(from, to);
        g = s.lock();
        match r {
            // Only if the window is still current and nobody populated further meanwhile.
            Ok(()) => {
                if g.window.as_ref().is_some_and(|c| Arc::ptr_eq(c, &w)) && g.populated < to {
                    g.populated = to;
                }
            }
            Err(e) => {
                // The appender will hit the same error synchronously and report it; stop
                // trying until it has moved on.
                log::debug!("trace: populating {from}..{to} ahead failed: {e}");
                // (A stop requested while populating must not be slept through.)
                if !g.stop {
                    g.idle = true;
                    g = s.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

impl Drop for MappedAppender {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn appends_across_windows_and_trims() {
        let dir = std::env::temp_dir().join(format!("kfdmux-mapped-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let a = MappedAppender::new(f, 0).unwrap();
        let rec: Vec<u8> = (0..=250u8).collect();
        let mut want = Vec::new();
        // More than one window, so the remap path and the thread's window check both run.
        while want.len() < WINDOW + 3 * AHEAD as usize {
            a.append(&[&rec, b"xy"]).unwrap();
            want.extend_from_slice(&rec);
            want.extend_from_slice(b"xy");
        }
        // A record bigger than a window gets a window of its own.
        let big = vec![7u8; WINDOW + 10];
        a.append(&[&big]).unwrap();
        want.extend_from_slice(&big);
        drop(a);
        let mut got = Vec::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "file contents differ from what was appended");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
