//! An append-only file written through a shared mapping: appending a record is a `memcpy`
//! under a lock, not a `write(2)` — the recorder's cost on the request path. The file is grown
//! in windows (sparse, zero-filled) ahead of the data. A daemon killed at any moment leaves
//! every completed record in the page cache, followed by zeros the reader treats as the end;
//! `finish` (or drop) trims the file to its data.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// How much is mapped (and the file grown) at a time.
const WINDOW: usize = 16 << 20;

pub struct MappedAppender {
    file: File,
    /// The mapped window: file bytes `[base, base + len)`.
    ptr: *mut u8,
    len: usize,
    base: u64,
    /// Bytes of data in the file.
    end: u64,
}

// SAFETY: the mapping is owned by this value and only touched through `&mut self` (the
// recorder keeps it behind a mutex).
unsafe impl Send for MappedAppender {}

impl MappedAppender {
    /// Appends after the `end` bytes already in `file`.
    pub fn new(file: File, end: u64) -> io::Result<MappedAppender> {
        let mut a = MappedAppender {
            file,
            ptr: std::ptr::null_mut(),
            len: 0,
            base: 0,
            end,
        };
        a.remap(0)?;
        Ok(a)
    }

    /// Maps a window starting at the page that holds `end`, big enough for `need` more bytes.
    fn remap(&mut self, need: usize) -> io::Result<()> {
        self.unmap();
        let page = 4096u64;
        let base = self.end / page * page;
        let len = WINDOW.max(need + page as usize).div_ceil(page as usize) * page as usize;
        self.file.set_len(base + len as u64)?;
        // SAFETY: mapping `len` bytes of our own file at a page-aligned offset; the file is at
        // least that long (set_len above). The mapping is released in `unmap`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                base as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.ptr = p as *mut u8;
        self.len = len;
        self.base = base;
        Ok(())
    }

    fn unmap(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr`/`len` describe the mapping made in `remap`.
            unsafe { libc::munmap(self.ptr as *mut _, self.len) };
            self.ptr = std::ptr::null_mut();
        }
    }

    /// Appends `parts` contiguously.
    pub fn append(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if self.end + total as u64 > self.base + self.len as u64 {
            self.remap(total)?;
        }
        let mut at = (self.end - self.base) as usize;
        for p in parts {
            // SAFETY: `at + p.len() <= len` (checked above); the source is a live slice that
            // cannot overlap our mapping of the file.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), self.ptr.add(at), p.len()) };
            at += p.len();
        }
        self.end += total as u64;
        Ok(())
    }

    /// Trims the file to its data.
    pub fn finish(&mut self) -> io::Result<()> {
        self.unmap();
        self.file.set_len(self.end)
    }
}

impl Drop for MappedAppender {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
