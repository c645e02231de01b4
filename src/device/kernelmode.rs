//! "Kernel mode" for the sim: a wrapper that makes a [`SimDevice`] answer the way the real KFD
//! does for what forwarding must cope with, so the `kfd` device can be tested against it.
//!
//! - Opener-only (EBADF for any other process) is what the mux already enforces for every device.
//! - `shared` (KFD before 1.19): all opens of the kfd file by one process share ONE context
//!   (the kernel finds the kfd_process by `mm`); CREATE_PROCESS (nr 0x27) does not exist (EINVAL).
//! - `v119`: opens of one process share the primary context as before, and CREATE_PROCESS turns
//!   the fd's context into a fresh secondary one with the secondary rules (the sim's: USERPTR,
//!   SVM and DBG_TRAP give EOPNOTSUPP; a second CREATE_PROCESS on the fd gives EINVAL).
//!
//! The shared primary lives until the last fd of that process closes (the kernel keeps it until
//! the process exits; a FUSE daemon does not see exits).

use std::collections::HashMap;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, Weak};

use crate::device::{
    Caller, Device, DeviceContext, Done, DoneSink, Env, FileKind, IoctlCall, IoctlResult,
    ProcessMemory,
};
use crate::errno::Errno;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelMode {
    /// Every open is its own context (kfdmux's normal behaviour).
    Off,
    /// Before KFD 1.19: one context per process, no CREATE_PROCESS.
    Shared,
    /// KFD 1.19: one primary per process; CREATE_PROCESS makes the fd's own secondary context.
    V119,
}

/// One process's primary context, shared by its opens.
struct Primary {
    ctx: Box<dyn DeviceContext>,
}

impl Drop for Primary {
    fn drop(&mut self) {
        self.ctx.release();
    }
}

pub struct KernelModeDevice {
    inner: Arc<dyn Device>,
    mode: KernelMode,
    primaries: Mutex<HashMap<u32, Weak<Primary>>>,
}

impl KernelModeDevice {
    pub fn wrap(inner: Arc<dyn Device>, mode: KernelMode) -> Arc<dyn Device> {
        if mode == KernelMode::Off {
            return inner;
        }
        Arc::new(KernelModeDevice {
            inner,
            mode,
            primaries: Mutex::new(HashMap::new()),
        })
    }

    fn primary(&self, caller: &Caller) -> Result<Arc<Primary>, Errno> {
        let mut p = self.primaries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(x) = p.get(&caller.tgid).and_then(Weak::upgrade) {
            return Ok(x);
        }
        p.retain(|_, w| w.strong_count() > 0);
        let x = Arc::new(Primary {
            ctx: self.inner.open(caller, FileKind::Kfd)?,
        });
        p.insert(caller.tgid, Arc::downgrade(&x));
        Ok(x)
    }
}

enum Held {
    Primary(Arc<Primary>),
    Secondary(Box<dyn DeviceContext>),
}

struct KmCtx {
    dev: Arc<dyn Device>,
    mode: KernelMode,
    caller: Caller,
    held: Mutex<Option<Held>>,
}

/// Completes into a channel (for a call the wrapper makes itself).
struct ChanSink(std::sync::mpsc::Sender<(IoctlCall, IoctlResult)>);
impl DoneSink for ChanSink {
    fn complete(self: Box<Self>, call: IoctlCall, result: IoctlResult) {
        let _ = self.0.send((call, result));
    }
    fn on_interrupt(&mut self, _: Box<dyn FnOnce() + Send>) -> bool {
        true
    }
}

impl DeviceContext for KmCtx {
    fn ioctl(&self, env: &dyn Env, call: IoctlCall, done: Done) {
        let is_create = crate::abi::table::ioc_type(call.cmd) == crate::abi::table::KFD_IOC_TYPE
            && call.def.nr == 0x27;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if is_create {
            if self.mode == KernelMode::Shared {
                log::debug!(
                    "kernel mode shared: CREATE_PROCESS does not exist before KFD 1.19: EINVAL"
                );
                return done.complete(call, Err(Errno::EINVAL));
            }
            if matches!(*held, Some(Held::Primary(_))) {
                // A fresh context for this fd, made secondary by the sim's own handler.
                let ctx = match self.dev.open(&self.caller, FileKind::Kfd) {
                    Ok(c) => c,
                    Err(e) => return done.complete(call, Err(e)),
                };
                let (tx, rx) = channel();
                ctx.ioctl(env, call, Done::new(Box::new(ChanSink(tx))));
                let Ok((call, r)) = rx.recv() else { return };
                if r.is_ok() {
                    *held = Some(Held::Secondary(ctx));
                } else {
                    ctx.release();
                }
                return done.complete(call, r);
            }
        }
        match held.as_ref() {
            Some(Held::Primary(p)) => p.ctx.ioctl(env, call, done),
            Some(Held::Secondary(c)) => c.ioctl(env, call, done),
            None => done.complete(call, Err(Errno::EBADF)),
        }
    }

    fn release(&self) {
        let h = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Held::Secondary(c)) = &h {
            c.release();
        }
        drop(h);
    }
}

impl Device for KernelModeDevice {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn answers_in_place(&self) -> bool {
        self.inner.answers_in_place()
    }
    fn gpu_count(&self) -> u32 {
        self.inner.gpu_count()
    }
    fn render_minor(&self, index: u32) -> u32 {
        self.inner.render_minor(index)
    }
    fn open(&self, caller: &Caller, kind: FileKind) -> Result<Box<dyn DeviceContext>, Errno> {
        if kind != FileKind::Kfd {
            return self.inner.open(caller, kind);
        }
        let p = self.primary(caller)?;
        Ok(Box::new(KmCtx {
            dev: self.inner.clone(),
            mode: self.mode,
            caller: *caller,
            held: Mutex::new(Some(Held::Primary(p))),
        }))
    }
    fn process_memory(&self, tgid: u32) -> Result<Arc<dyn ProcessMemory>, Errno> {
        self.inner.process_memory(tgid)
    }
    fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.inner.stats();
        let live = self
            .primaries
            .lock()
            .map(|p| p.values().filter(|w| w.strong_count() > 0).count())
            .unwrap_or(0);
        v.push(("kernel_mode_primaries", live as u64));
        v
    }
}
