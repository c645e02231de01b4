//! The CPU-visible memory of one client process: one sparse memfd and a page-aligned range
//! allocator over it. Every buffer of the process's contexts that the client can `mmap`
//! (VRAM, GTT, doorbell, MMIO-remap, the events page) owns one range; its offset is the
//! `mmap_offset` handed to the client, valid on the kfd file and on the render nodes alike
//! because the transport maps every file of the process onto this memfd.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use crate::device::ProcessMemory;
use crate::errno::Errno;

pub const PAGE_SIZE: u64 = 4096;

/// Rounds `v` up to a whole page; `None` on overflow.
pub fn page_align(v: u64) -> Option<u64> {
    v.checked_add(PAGE_SIZE - 1).map(|x| x & !(PAGE_SIZE - 1))
}

/// First-fit allocator of page-aligned ranges with coalescing frees.
#[derive(Debug)]
pub struct RangeAlloc {
    /// Free ranges: start → length.
    free: BTreeMap<u64, u64>,
    pub used_bytes: u64,
}

impl RangeAlloc {
    /// Ranges inside `[start, end)`.
    pub fn new(start: u64, end: u64) -> RangeAlloc {
        let mut free = BTreeMap::new();
        if end > start {
            free.insert(start, end - start);
        }
        RangeAlloc {
            free,
            used_bytes: 0,
        }
    }

    /// A range of `len` bytes (a multiple of the page size).
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return None;
        }
        let (&start, &flen) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&start);
        if flen > len {
            self.free.insert(start + len, flen - len);
        }
        self.used_bytes += len;
        Some(start)
    }

    /// A range of `len` bytes starting at a multiple of `align` (a power-of-two multiple of the
    /// page size); the pieces before and after it stay free.
    pub fn alloc_aligned(&mut self, len: u64, align: u64) -> Option<u64> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || !align.is_power_of_two() {
            return None;
        }
        let (&start, &flen, at) = self.free.iter().find_map(|(s, l)| {
            let at = s.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(len)? <= s + l).then_some((s, l, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if start + flen > at + len {
            self.free.insert(at + len, start + flen - at - len);
        }
        self.used_bytes += len;
        Some(at)
    }

    /// Returns `[start, start+len)`, merging it with free neighbours.
    pub fn free(&mut self, start: u64, len: u64) {
        let mut s = start;
        let mut l = len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            l += nl;
        }
        self.free.insert(s, l);
        self.used_bytes = self.used_bytes.saturating_sub(len);
    }
}

/// One client process's memfd and its allocator.
pub struct ProcMem {
    pub tgid: u32,
    file: File,
    alloc: Mutex<RangeAlloc>,
    size: u64,
}

impl ProcMem {
    /// A new sparse memfd of `size` bytes (offsets must stay below `i64::MAX` for `off_t`).
    pub fn new(tgid: u32, size: u64) -> Result<ProcMem, Errno> {
        let size = size.min(i64::MAX as u64) & !(PAGE_SIZE - 1);
        let name =
            std::ffi::CString::new(format!("kfdmux-sim-{tgid}")).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other inputs.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            let e = Errno::last();
            log::error!("sim: memfd_create for process {tgid} failed: {e}");
            return Err(e);
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|e| {
            log::error!("sim: sizing the memfd of process {tgid} to {size} failed: {e}");
            Errno::from_io(&e)
        })?;
        // Offset 0 is never handed out, so a zero mmap_offset always means "none".
        Ok(ProcMem {
            tgid,
            file,
            alloc: Mutex::new(RangeAlloc::new(PAGE_SIZE, size)),
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// A page-aligned range of at least `len` bytes; ENOMEM when the memfd is full.
    pub fn alloc(&self, len: u64) -> Result<u64, Errno> {
        let len = page_align(len).ok_or(Errno::ENOMEM)?;
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        a.alloc(len).ok_or_else(|| {
            log::warn!(
                "sim: process {} memfd has no free range of {len} bytes",
                self.tgid
            );
            Errno::ENOMEM
        })
    }

    /// Like [`ProcMem::alloc`], aligned to `align` bytes (doorbell slices).
    pub fn alloc_aligned(&self, len: u64, align: u64) -> Result<u64, Errno> {
        let len = page_align(len).ok_or(Errno::ENOMEM)?;
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        a.alloc_aligned(len, align.max(PAGE_SIZE)).ok_or_else(|| {
            log::warn!(
                "sim: process {} memfd has no free aligned range of {len} bytes",
                self.tgid
            );
            Errno::ENOMEM
        })
    }

    /// Punches the range out (its pages return to the system and read as zero) and returns it.
    pub fn free(&self, off: u64, len: u64) {
        let Some(len) = page_align(len) else { return };
        self.punch(off, len);
        let mut a = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        a.free(off, len);
    }

    fn punch(&self, off: u64, len: u64) {
        let (Ok(o), Ok(l)) = (i64::try_from(off), i64::try_from(len)) else {
            return;
        };
        // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if r != 0 {
            log::warn!(
                "sim: punching {len:#x} bytes at {off:#x} of process {} failed: {}",
                self.tgid,
                Errno::last()
            );
        }
    }

    /// Writes `data` at `off` (shared with every client mapping of that range).
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<(), Errno> {
        self.file
            .write_all_at(data, off)
            .map_err(|e| Errno::from_io(&e))
    }

    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| Errno::from_io(&e))
    }

    /// Bytes currently allocated in the memfd.
    pub fn used_bytes(&self) -> u64 {
        self.alloc.lock().map(|a| a.used_bytes).unwrap_or(0)
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl ProcessMemory for ProcMem {
    fn backing_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_first_fit_and_coalesce() {
        let mut a = RangeAlloc::new(PAGE_SIZE, 16 * PAGE_SIZE);
        let x = a.alloc(2 * PAGE_SIZE).unwrap();
        let y = a.alloc(PAGE_SIZE).unwrap();
        let z = a.alloc(3 * PAGE_SIZE).unwrap();
        assert_eq!((x, y, z), (PAGE_SIZE, 3 * PAGE_SIZE, 4 * PAGE_SIZE));
        assert!(a.alloc(100).is_none(), "unaligned sizes are refused");
        a.free(y, PAGE_SIZE);
        a.free(x, 2 * PAGE_SIZE);
        // x and y merged: a 3-page request fits at x again.
        assert_eq!(a.alloc(3 * PAGE_SIZE), Some(PAGE_SIZE));
        a.free(PAGE_SIZE, 3 * PAGE_SIZE);
        a.free(z, 3 * PAGE_SIZE);
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.used_bytes, 0);
        assert!(a.alloc(16 * PAGE_SIZE).is_none());
        assert_eq!(a.alloc(15 * PAGE_SIZE), Some(PAGE_SIZE));
    }

    #[test]
    fn aligned_alloc_keeps_the_pieces() {
        let mut a = RangeAlloc::new(PAGE_SIZE, 16 * PAGE_SIZE);
        let x = a.alloc_aligned(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert_eq!(x, 2 * PAGE_SIZE);
        // The page before it is still free.
        assert_eq!(a.alloc(PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(a.alloc(PAGE_SIZE), Some(4 * PAGE_SIZE));
        assert_eq!(
            a.alloc_aligned(2 * PAGE_SIZE, 8 * PAGE_SIZE),
            Some(8 * PAGE_SIZE)
        );
        assert_eq!(a.used_bytes, 6 * PAGE_SIZE);
        assert!(
            a.alloc_aligned(PAGE_SIZE, 3 * PAGE_SIZE).is_none(),
            "alignment must be 2^n"
        );
    }
}
