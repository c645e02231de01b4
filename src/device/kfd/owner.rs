//! The owner of a kernel context: the process that opened `/dev/kfd` and is therefore the only
//! one the kernel lets issue its ioctls and mmaps. For KFD ≥ 1.19 that is the daemon itself
//! ([`InProcOwner`], one fd per client context after CREATE_PROCESS); below 1.19 a context host
//! (`host.rs`). Requests reach it as [`FwdReq`]: the argument struct with every pointer field
//! already replaced by a buffer the owner holds and every fd field by an fd the owner holds.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::abi::table::{ioc_size, write_uint};
use crate::errno::Errno;

use super::relay::{Mapping, Relay, RelayDir};

/// One pointed-to buffer of a forwarded ioctl.
#[derive(Debug, Default)]
pub struct PtrBuf {
    /// Offset and size of the pointer field in the argument struct.
    pub off: usize,
    pub size: usize,
    /// The bytes (in: the client's; out: written by the kernel). Empty: the pointer is null.
    pub data: Vec<u8>,
}

/// A forwarded ioctl.
#[derive(Debug, Default)]
pub struct FwdReq {
    pub cmd: u32,
    pub arg: Vec<u8>,
    pub ptrs: Vec<PtrBuf>,
    /// Fd fields: offset, size, and the fd the owner passes in their place.
    pub fds: Vec<(usize, usize, OwnedFd)>,
    /// Fd fields the kernel fills with a new fd (SMI_EVENTS, EXPORT_DMABUF): offset, size.
    pub out_fd_fields: Vec<(usize, usize)>,
    /// After a successful call: the new fds, in `out_fd_fields` order (owned by the daemon).
    pub out_fds: Vec<OwnedFd>,
}

/// Issues `req` on `fd` in this process: pointer and fd fields are patched to this process's
/// buffers and fds, then `ioctl(2)`.
pub fn exec(fd: i32, req: &mut FwdReq) -> Result<(), Errno> {
    let need = ioc_size(req.cmd) as usize;
    if req.arg.len() < need {
        req.arg.resize(need, 0);
    }
    for p in req.ptrs.iter_mut() {
        let addr = if p.data.is_empty() {
            0
        } else {
            p.data.as_mut_ptr() as u64
        };
        write_uint(&mut req.arg, p.off, p.size, addr);
    }
    for (off, size, f) in &req.fds {
        write_uint(&mut req.arg, *off, *size, f.as_raw_fd() as u64);
    }
    // An argument-less (_IO) command still gets a valid pointer; the kernel ignores it.
    let mut dummy = [0u8; 8];
    let p = if req.arg.is_empty() {
        dummy.as_mut_ptr()
    } else {
        req.arg.as_mut_ptr()
    };
    // SAFETY: `p` points at a buffer at least _IOC_SIZE(cmd) bytes long, and every pointer
    // field inside it points at a live buffer of the length its count field gives.
    let r = unsafe { libc::ioctl(fd, req.cmd as _, p) };
    if r < 0 {
        return Err(Errno::last());
    }
    // The kernel installed new fds in this process: own them from here on.
    for &(off, size) in &req.out_fd_fields {
        let v = crate::abi::table::read_uint(&req.arg, off, size) as i32;
        if v < 0 {
            return Err(Errno::EIO);
        }
        // SAFETY: the ioctl succeeded, so the field holds an fd it just installed for us.
        req.out_fds
            .push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(v) });
    }
    Ok(())
}

/// Lets a blocked forwarded ioctl be interrupted (FUSE_INTERRUPT of the client's call).
#[derive(Default)]
pub struct CancelToken {
    fired: AtomicBool,
    action: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl CancelToken {
    /// Runs `f` on cancel (at once if the token already fired).
    pub fn set_action(&self, f: Box<dyn Fn() + Send>) {
        if self.fired.load(Ordering::Acquire) {
            f();
        }
        *self.action.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }
    pub fn cancel(&self) {
        self.fired.store(true, Ordering::Release);
        if let Some(f) = self
            .action
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            f();
        }
    }
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

/// The signal that interrupts an owner thread blocked in a forwarded ioctl.
pub fn interrupt_signal() -> i32 {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_interrupt_signal(_: libc::c_int) {}

/// Installs a no-op handler (without SA_RESTART) for [`interrupt_signal`], so the signal only
/// makes a blocked ioctl return EINTR.
pub fn install_interrupt_handler() {
    // SAFETY: installing a handler that does nothing; the struct is fully initialised.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_interrupt_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(interrupt_signal(), &sa, std::ptr::null_mut());
    }
}

/// Runs `f` (a blocking ioctl on this thread) so that `cancel` interrupts it: the thread is
/// signalled until `f` returns.
pub fn interruptible<T>(cancel: &CancelToken, f: impl FnOnce() -> T) -> T {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    cancel.set_action(Box::new(move || {
        let d = d.clone();
        // Keep signalling: the first signal may land before the thread entered the ioctl.
        std::thread::spawn(move || {
            for _ in 0..2000 {
                if d.load(Ordering::Acquire) {
                    return;
                }
                // SAFETY: `me` stays a live thread until `done` is set (checked just above,
                // and `done` is set before `interruptible` returns).
                unsafe { libc::pthread_kill(me, interrupt_signal()) };
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
    }));
    let r = f();
    done.store(true, Ordering::Release);
    // Serialise with a signaller that read `done` as false just before: it only signals a
    // thread that ignores the signal now.
    r
}

/// What the device needs of an owner.
pub trait Owner: Send + Sync {
    /// Issues `req`; returns it with the kernel's outputs.
    fn ioctl(&self, req: FwdReq, cancel: &CancelToken) -> (FwdReq, Result<(), Errno>);
    /// Maps the kernel's page(s) at `kernel_off` and relays them with `shadow`'s range at
    /// `shadow_off`; returns the relay id.
    fn relay(
        &self,
        kernel_off: u64,
        len: u64,
        shadow: &std::fs::File,
        shadow_off: u64,
        dir: RelayDir,
    ) -> Result<u64, Errno>;
    fn unrelay(&self, id: u64);
}

/// The daemon itself owns the context: `fd` is the daemon's own open of the kfd (or render) file.
pub struct InProcOwner {
    pub fd: OwnedFd,
    pub relay: Arc<Relay>,
}

impl Owner for InProcOwner {
    fn ioctl(&self, mut req: FwdReq, cancel: &CancelToken) -> (FwdReq, Result<(), Errno>) {
        let fd = self.fd.as_raw_fd();
        let r = interruptible(cancel, || exec(fd, &mut req));
        (req, r)
    }

    fn relay(
        &self,
        kernel_off: u64,
        len: u64,
        shadow: &std::fs::File,
        shadow_off: u64,
        dir: RelayDir,
    ) -> Result<u64, Errno> {
        relay_pair(
            &self.relay,
            self.fd.as_fd(),
            kernel_off,
            len,
            shadow,
            shadow_off,
            dir,
        )
    }

    fn unrelay(&self, id: u64) {
        self.relay.remove(id)
    }
}

/// Maps both sides and hands them to `relay`.
pub fn relay_pair(
    relay: &Arc<Relay>,
    kfd: std::os::fd::BorrowedFd<'_>,
    kernel_off: u64,
    len: u64,
    shadow: &std::fs::File,
    shadow_off: u64,
    dir: RelayDir,
) -> Result<u64, Errno> {
    let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
    let real = Mapping::new(kfd, kernel_off, len).inspect_err(|e| {
        log::warn!("kfd: mapping the kernel's page at offset {kernel_off:#x} (+{len:#x}): {e}");
    })?;
    let sh = Mapping::new(shadow.as_fd(), shadow_off, len)?;
    Ok(relay.add(sh, real, dir))
}
