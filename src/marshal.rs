//! Moves pointed-to memory between a client and an [`IoctlCall`], driven by the schema: every
//! pointer field the argument struct's `StructDef` names is fetched before the device runs and
//! written back after it. Restricted (FUSE-file) ioctls reach the client with
//! `process_vm_readv/writev`.

use crate::abi::table::{CountUnit, Kind, StructDef};
use crate::device::ArrayBuf;
use crate::errno::Errno;

/// Largest pointed-to array one ioctl may name (bytes). The kernel's own limits are smaller for
/// every KFD array (e.g. 4096 events × 48 B); this bound keeps a garbage count from making the
/// daemon allocate gigabytes.
pub const MAX_ARRAY_BYTES: usize = 1 << 20;

/// One pointer field resolved against an argument struct.
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub field: &'static str,
    pub addr: u64,
    pub len: usize,
    pub io: crate::abi::table::Io,
}

/// The regions an argument struct points at, in field order. Counts are checked against
/// [`MAX_ARRAY_BYTES`] (EINVAL beyond); a null pointer with a non-zero count is EFAULT.
pub fn plan(def: &StructDef, arg: &[u8]) -> Result<Vec<Region>, Errno> {
    let mut out = Vec::new();
    for f in def.fields {
        let Kind::Pointer(p) = &f.kind else { continue };
        let Some(count) = def.get(arg, p.count_field) else {
            log::warn!(
                "schema: {}.{} names a missing count field",
                def.name,
                f.name
            );
            return Err(Errno::EINVAL);
        };
        let elems = match p.count_unit {
            CountUnit::Elements => count,
            CountUnit::Bytes => count.div_ceil(p.elem_size.max(1) as u64),
            CountUnit::Bits => count.div_ceil(8 * p.elem_size.max(1) as u64),
        };
        let len = elems.checked_mul(p.elem_size as u64).ok_or(Errno::EINVAL)?;
        if len == 0 {
            continue;
        }
        if len > MAX_ARRAY_BYTES as u64 {
            log::warn!(
                "{}.{}: {} bytes exceed the {} byte limit",
                def.name,
                f.name,
                len,
                MAX_ARRAY_BYTES
            );
            return Err(Errno::EINVAL);
        }
        let addr = crate::abi::table::read_uint(arg, f.offset, f.size);
        if addr == 0 {
            return Err(Errno::EFAULT);
        }
        out.push(Region {
            field: f.name,
            addr,
            len: len as usize,
            io: p.io,
        });
    }
    Ok(out)
}

/// Reads the `In`/`InOut` regions from process `pid`; `Out` regions start zeroed.
pub fn fetch(pid: u32, regions: &[Region]) -> Result<Vec<ArrayBuf>, Errno> {
    regions
        .iter()
        .map(|r| {
            let mut data = spare_buffer(r.len);
            if r.io.is_in() {
                read_process(pid, r.addr, &mut data)?;
            }
            Ok(ArrayBuf {
                field: r.field,
                addr: r.addr,
                io: r.io,
                data,
            })
        })
        .collect()
}

/// Buffers a worker thread keeps for the arrays of its next calls, and their bounds.
const SPARE_BUFFERS: usize = 4;
const SPARE_BYTES: usize = 64 * 1024;

thread_local! {
    /// Array buffers of answered calls, reused by this thread's next fetch: an event array
    /// (3 KiB for 64 events) is a large allocation, and glibc consolidates its fast bins
    /// before every one — a visible part of a pointer ioctl's cost.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `len` zero bytes, in a spare buffer when this thread has one.
fn spare_buffer(len: usize) -> Vec<u8> {
    let mut v = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    v.clear();
    v.resize(len, 0);
    v
}

/// Gives the arrays of an answered call back to this thread's spare buffers.
pub fn recycle(arrays: Vec<ArrayBuf>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        for a in arrays {
            let cap = a.data.capacity();
            if s.len() < SPARE_BUFFERS && cap > 0 && cap <= SPARE_BYTES {
                s.push(a.data);
            }
        }
    });
}

/// Writes the `Out`/`InOut` arrays back to process `pid`. A device shortens an array to what it
/// wrote (as the kernel copies out only what it filled); an emptied one costs no system call.
pub fn write_back(pid: u32, arrays: &[ArrayBuf]) -> Result<(), Errno> {
    for a in arrays
        .iter()
        .filter(|a| a.io.is_out() && !a.data.is_empty())
    {
        write_process(pid, a.addr, &a.data)?;
    }
    Ok(())
}

/// `process_vm_readv` of exactly `buf.len()` bytes at `addr` in `pid`; EFAULT when short.
pub fn read_process(pid: u32, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut _,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut _,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes our own writable buffer; the remote side is checked by the kernel.
    let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
    if n < 0 || n as usize != buf.len() {
        log::debug!(
            "process_vm_readv pid {pid} {addr:#x}+{}: {}",
            buf.len(),
            Errno::last()
        );
        return Err(Errno::EFAULT);
    }
    Ok(())
}

/// `process_vm_writev` of all of `buf` at `addr` in `pid`; EFAULT when short.
pub fn write_process(pid: u32, addr: u64, buf: &[u8]) -> Result<(), Errno> {
    let local = libc::iovec {
        iov_base: buf.as_ptr() as *mut _,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut _,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes our own readable buffer; the remote side is checked by the kernel.
    let n = unsafe { libc::process_vm_writev(pid as i32, &local, 1, &remote, 1, 0) };
    if n < 0 || n as usize != buf.len() {
        log::debug!(
            "process_vm_writev pid {pid} {addr:#x}+{}: {}",
            buf.len(),
            Errno::last()
        );
        return Err(Errno::EFAULT);
    }
    Ok(())
}
