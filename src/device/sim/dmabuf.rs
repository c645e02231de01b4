//! dma-bufs between contexts of one device: EXPORT_DMABUF, IMPORT_DMABUF, GET_DMABUF_INFO.
//!
//! An exported buffer becomes a [`DmabufObj`]: a memfd of the buffer's size holding a snapshot
//! of the buffer's CPU-visible bytes at the first export. The device keeps a registry of its
//! objects by the memfd's inode (`st_dev`, `st_ino`), so a client fd is recognised as one of ours
//! however it reached the client (EXPORT's fd, a copy passed over a socket, a dup): IMPORT and
//! GET_DMABUF_INFO stat `/proc/<caller>/fd/<n>` and look the inode up. An fd that is not open
//! is EBADF and an open fd that is not one of our dma-bufs EINVAL, as `dma_buf_get` and
//! amdgpu's "not our dma-buf ops" check answer. Inodes cannot be forged: only a holder of the
//! memfd can pass it on.
//!
//! Putting a new fd into the caller needs the transport: [`crate::device::Env::give_fd`] (CUSE
//! with the preload library's channel parks the fd for the client to fetch) or a test harness's
//! [`super::FdInstaller`]; without either (FUSE, or a CUSE client without the preload library)
//! EXPORT answers EOPNOTSUPP and logs the way out.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex, Weak};

use crate::abi::*;
use crate::device::IoctlCall;
use crate::errno::Errno;

use super::kfd::{Bo, BoKind, Cx};

/// Identity of a dma-buf: the inode of its memfd.
pub type Key = (u64, u64);

/// One exported buffer.
#[derive(Debug)]
pub struct DmabufObj {
    pub file: File,
    pub size: u64,
    /// Exporting GPU (index).
    pub gpu: usize,
    pub vram: bool,
    /// Exported from a PUBLIC (CPU-visible VRAM) allocation.
    pub public: bool,
    pub key: Key,
}

/// The device's dma-bufs by inode (weak: an object lives while a buffer refers to it).
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<Key, Weak<DmabufObj>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Weak<DmabufObj>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, obj: &Arc<DmabufObj>) {
        let mut m = self.lock();
        m.retain(|_, w| w.strong_count() > 0);
        m.insert(obj.key, Arc::downgrade(obj));
    }

    pub fn get(&self, key: Key) -> Option<Arc<DmabufObj>> {
        self.lock().get(&key).and_then(Weak::upgrade)
    }

    /// Live objects (for the stats file).
    pub fn live(&self) -> u64 {
        self.lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count() as u64
    }
}

/// The inode behind fd `fd` of process (thread) `pid`: EBADF when it is not open.
fn fd_key(pid: u32, fd: u32) -> Result<Key, Errno> {
    if fd > i32::MAX as u32 {
        return Err(Errno::EBADF);
    }
    // pidfd_getfd + statx(AT_STATX_DONT_SYNC), not stat of /proc/<pid>/fd/<fd>: if the fd is
    // one of our own FUSE files, a stat would wait on this daemon's workers (GETATTR).
    let file = crate::transport::sys::take_fd(pid, fd as i32).map_err(|e| {
        log::debug!("sim kfd: fd {fd} of {pid}: {e}: EBADF");
        Errno::EBADF
    })?;
    crate::transport::sys::fd_identity(std::os::fd::AsRawFd::as_raw_fd(&file))
}

/// The caller's fd as one of our dma-bufs (`dma_buf_get` + the amdgpu ops check).
fn lookup(cx: &Cx, call: &IoctlCall, fd: u32) -> Result<Arc<DmabufObj>, Errno> {
    let key = fd_key(call.caller.tgid, fd)?;
    cx.shared().dmabufs.get(key).ok_or_else(|| {
        log::debug!("sim kfd: fd {fd} is not a dma-buf of this device: EINVAL");
        Errno::EINVAL
    })
}

/// A new memfd-backed object holding a copy of the buffer's bytes.
fn create(cx: &Cx, bo: &Bo) -> Result<Arc<DmabufObj>, Errno> {
    // SAFETY: a valid NUL-terminated name; memfd_create has no other inputs.
    let fd = unsafe { libc::memfd_create(c"kfdmux-dmabuf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        let e = Errno::last();
        log::warn!("sim kfd: memfd_create for a dma-buf: {e}");
        return Err(e);
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bo.size).map_err(|e| Errno::from_io(&e))?;
    if let Some(off) = bo.mem_off {
        // Copy what the CPU sees now, skipping all-zero chunks (the memfds are sparse).
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK as usize];
        let mut done = 0;
        while done < bo.size {
            let n = CHUNK.min(bo.size - done) as usize;
            cx.inner.mem.read_at(off + done, &mut buf[..n])?;
            if buf[..n].iter().any(|b| *b != 0) {
                file.write_all_at(&buf[..n], done)
                    .map_err(|e| Errno::from_io(&e))?;
            }
            done += n as u64;
        }
    }
    let m = file.metadata().map_err(|e| Errno::from_io(&e))?;
    Ok(Arc::new(DmabufObj {
        file,
        size: bo.size,
        gpu: bo.gpu,
        vram: bo.kind == BoKind::Vram,
        public: bo.flags & KFD_IOC_ALLOC_MEM_FLAGS_PUBLIC != 0,
        key: (m.dev(), m.ino()),
    }))
}

pub(crate) fn export_dmabuf(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let mut a: KfdIoctlExportDmabufArgs = call.args();
    if a.flags & !((libc::O_RDWR | libc::O_CLOEXEC) as u32) != 0 {
        return Err(Errno::EINVAL);
    }
    cx.pdd_index((a.handle >> 32) as u32)?;
    let bo = cx.st.bos.get(&a.handle).ok_or(Errno::EINVAL)?;
    match bo.kind {
        BoKind::Vram | BoKind::Gtt => {}
        // amdgpu_gem_prime_export refuses user pages.
        BoKind::Userptr => return Err(Errno::EPERM),
        BoKind::Doorbell | BoKind::Mmio => {
            log::debug!("sim kfd: exporting a doorbell/MMIO buffer is not supported: EINVAL");
            return Err(Errno::EINVAL);
        }
    }
    let installer = cx
        .shared()
        .fd_installer
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // Without the channel, refuse before creating anything (nothing to undo).
    if installer.is_none() && !cx.env.can_give_fd() {
        log::warn!(
            "sim kfd: EXPORT_DMABUF: {}: EOPNOTSUPP",
            crate::device::NO_FD_CHANNEL
        );
        return Err(Errno::EOPNOTSUPP);
    }
    // One dma-buf per buffer; a second export hands out another fd of it.
    let obj = match &bo.dmabuf {
        Some(o) => o.clone(),
        None => {
            let o = create(cx, bo)?;
            cx.shared().dmabufs.insert(&o);
            o
        }
    };
    if let Some(b) = cx.st.bos.get_mut(&a.handle) {
        b.dmabuf = Some(obj.clone());
    }
    let file = obj.file.try_clone().map_err(|e| Errno::from_io(&e))?;
    let cloexec = a.flags & libc::O_CLOEXEC as u32 != 0;
    a.dmabuf_fd = match installer {
        Some(i) => i.install(&call.caller, file, cloexec)? as u32,
        None => cx
            .env
            .give_fd(&call.caller, file.into(), cloexec, "sim kfd: EXPORT_DMABUF")?,
    };
    call.set_args(&a);
    Ok(())
}

pub(crate) fn import_dmabuf(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let mut a: KfdIoctlImportDmabufArgs = call.args();
    let obj = lookup(cx, call, a.dmabuf_fd)?;
    let gi = cx.pdd_index(a.gpu_id)?;
    cx.bound(gi)?;
    let flags = if obj.vram {
        KFD_IOC_ALLOC_MEM_FLAGS_VRAM
    } else {
        KFD_IOC_ALLOC_MEM_FLAGS_GTT
    } | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE
        | KFD_IOC_ALLOC_MEM_FLAGS_EXECUTABLE;
    let bo = Bo {
        gpu: gi,
        kind: if obj.vram { BoKind::Vram } else { BoKind::Gtt },
        flags,
        va: a.va_addr,
        size: obj.size,
        mem_off: None,
        userptr: 0,
        mapped: vec![false; cx.st.pdds.len()],
        dmabuf: Some(obj),
        imported: true,
    };
    a.handle = super::kfd::insert_bo(cx, a.gpu_id, gi, bo)?;
    call.set_args(&a);
    Ok(())
}

pub(crate) fn get_dmabuf_info(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let mut a: KfdIoctlGetDmabufInfoArgs = call.args();
    if cx.shared().gpus.is_empty() {
        return Err(Errno::EINVAL);
    }
    let obj = lookup(cx, call, a.dmabuf_fd)?;
    a.size = obj.size;
    // KFD buffers carry no metadata: nothing is copied and the size reads 0.
    a.metadata_size = 0;
    a.gpu_id = cx.shared().gpus[obj.gpu].gpu_id;
    a.flags = if obj.vram {
        KFD_IOC_ALLOC_MEM_FLAGS_VRAM
    } else {
        KFD_IOC_ALLOC_MEM_FLAGS_GTT
    };
    if obj.public {
        a.flags |= KFD_IOC_ALLOC_MEM_FLAGS_PUBLIC;
    }
    call.set_args(&a);
    Ok(())
}
