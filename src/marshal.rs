//! Moves pointed-to memory between a client and an [`IoctlCall`], driven by the schema: every
//! pointer field the argument struct's `StructDef` names is fetched before the device runs and
//! written back after it. Restricted (FUSE-file) ioctls reach the client with
//! `process_vm_readv/writev`.

use crate::abi::table::{CountUnit, FieldDef, Kind, PtrDef, StructDef};
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
    regions(def, arg).collect()
}

/// [`plan`] one region at a time, so the restricted path builds no list of them.
fn regions<'a>(
    def: &'a StructDef,
    arg: &'a [u8],
) -> impl Iterator<Item = Result<Region, Errno>> + 'a {
    def.fields.iter().filter_map(move |f| match &f.kind {
        Kind::Pointer(p) => region(def, f, p, arg).transpose(),
        _ => None,
    })
}

/// Pointer field `f` of `arg`: its region, or None when it points at nothing (count 0).
fn region(def: &StructDef, f: &FieldDef, p: &PtrDef, arg: &[u8]) -> Result<Option<Region>, Errno> {
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
        return Ok(None);
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
    Ok(Some(Region {
        field: f.name,
        addr,
        len: len as usize,
        io: p.io,
    }))
}

/// Plans the regions `arg` points at and reads the `In`/`InOut` ones from process `pid`;
/// `Out` regions start zeroed. Every region is checked before any is read, as [`plan`] does
/// (a bad count is EINVAL even where an earlier pointer would fault).
pub fn fetch(pid: u32, def: &StructDef, arg: &[u8]) -> Result<Vec<ArrayBuf>, Errno> {
    if let Some(e) = regions(def, arg).find_map(Result::err) {
        return Err(e);
    }
    let mut out = SPARE
        .with(|s| s.borrow_mut().lists.pop())
        .unwrap_or_default();
    for r in regions(def, arg).flatten() {
        let mut data = SPARE
            .with(|s| s.borrow_mut().bufs.pop())
            .unwrap_or_default();
        data.clear();
        let read = if r.io.is_in() {
            read_process_into(pid, r.addr, r.len, &mut data)
        } else {
            data.resize(r.len, 0);
            Ok(())
        };
        out.push(ArrayBuf {
            field: r.field,
            addr: r.addr,
            io: r.io,
            data,
        });
        if let Err(e) = read {
            recycle(out);
            return Err(e);
        }
    }
    Ok(out)
}

/// Buffers a worker thread keeps for the arrays of its next calls, and their bounds.
const SPARE_BUFFERS: usize = 4;
const SPARE_BYTES: usize = 64 * 1024;
const SPARE_LISTS: usize = 2;

/// Array buffers and array lists of answered calls, reused by this thread's next fetch: an
/// event array (3 KiB for 64 events) is a large allocation, and glibc consolidates its fast
/// bins before every one — a visible part of a pointer ioctl's cost.
#[derive(Default)]
struct Spare {
    bufs: Vec<Vec<u8>>,
    lists: Vec<Vec<ArrayBuf>>,
}

thread_local! {
    static SPARE: std::cell::RefCell<Spare> = std::cell::RefCell::new(Spare::default());
}

/// Gives the arrays of an answered call back to this thread's spare buffers.
pub fn recycle(mut arrays: Vec<ArrayBuf>) {
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        for a in arrays.drain(..) {
            let cap = a.data.capacity();
            if s.bufs.len() < SPARE_BUFFERS && cap > 0 && cap <= SPARE_BYTES {
                s.bufs.push(a.data);
            }
        }
        if s.lists.len() < SPARE_LISTS && arrays.capacity() > 0 && arrays.capacity() <= 8 {
            s.lists.push(arrays);
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

/// `process_vm_readv` of exactly `len` bytes at `addr` in `pid` into the empty `buf` (its
/// length becomes `len`), without zeroing first what the read overwrites; EFAULT when short.
fn read_process_into(pid: u32, addr: u64, len: usize, buf: &mut Vec<u8>) -> Result<(), Errno> {
    buf.clear();
    buf.reserve(len);
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut _,
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut _,
        iov_len: len,
    };
    // SAFETY: `local` is `len` bytes of `buf`'s capacity; the kernel checks the remote side.
    let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
    if n < 0 || n as usize != len {
        log::debug!(
            "process_vm_readv pid {pid} {addr:#x}+{len}: {}",
            Errno::last()
        );
        return Err(Errno::EFAULT);
    }
    // SAFETY: the capacity is at least `len`, and the kernel wrote all `len` bytes.
    unsafe { buf.set_len(len) };
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
