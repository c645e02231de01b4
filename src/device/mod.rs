//! The "kernel" below the mux: a device answers ioctls of one open file (a context).
//!
//! A device sees an ioctl as an [`IoctlCall`]: the argument struct's bytes (already sized to the
//! full struct of the variant, zero-filled as the kernel does) and every pointed-to array the
//! schema names, already fetched from the caller. It answers through [`Done`], now or later
//! (blocking ioctls park and complete from another thread). Whatever it writes into
//! `arg`/arrays is written back to the caller by the transport.

pub mod kernelmode;
pub mod kfd;
pub mod sim;

use std::sync::Arc;

use crate::abi::table::{Io, IoctlDef, IoctlVariant};
use crate::errno::Errno;

/// The process on whose behalf a request arrives (from the FUSE request header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    /// Thread-group id (the process); the opener check compares these.
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Which file of the device an open is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// The kfd compute device.
    Kfd,
    /// The render node of GPU `index` (0-based in the device's GPU list).
    Render(u32),
}

/// One pointed-to array fetched from the caller for a pointer field (or the trailing array).
#[derive(Debug)]
pub struct ArrayBuf {
    /// The pointer field's name (`"attrs"` style name of the trailing array for SVM).
    pub field: &'static str,
    /// The caller's address the bytes came from / go to.
    pub addr: u64,
    pub io: Io,
    /// `In`/`InOut`: the caller's bytes; `Out`: zeroes. The device may write into it.
    pub data: Vec<u8>,
}

/// One ioctl as the device sees it.
#[derive(Debug)]
pub struct IoctlCall {
    pub cmd: u32,
    pub def: &'static IoctlDef,
    pub variant: &'static IoctlVariant,
    /// The argument struct: `max(variant size, struct size)` bytes, caller bytes first.
    pub arg: Vec<u8>,
    pub arrays: Vec<ArrayBuf>,
    pub caller: Caller,
}

impl IoctlCall {
    pub fn array(&self, field: &str) -> Option<&[u8]> {
        self.arrays
            .iter()
            .find(|a| a.field == field)
            .map(|a| a.data.as_slice())
    }
    pub fn array_mut(&mut self, field: &str) -> Option<&mut Vec<u8>> {
        self.arrays
            .iter_mut()
            .find(|a| a.field == field)
            .map(|a| &mut a.data)
    }
    /// The argument struct as a typed value (zero-extended when the caller's variant is shorter).
    pub fn args<T: zerocopy::FromBytes + zerocopy::IntoBytes>(&self) -> T {
        let mut v = T::new_zeroed();
        let dst = zerocopy::IntoBytes::as_mut_bytes(&mut v);
        let n = dst.len().min(self.arg.len());
        dst[..n].copy_from_slice(&self.arg[..n]);
        v
    }
    /// Stores a typed argument struct back into `arg`.
    pub fn set_args<T: zerocopy::IntoBytes + zerocopy::Immutable>(&mut self, v: &T) {
        let src = zerocopy::IntoBytes::as_bytes(v);
        let n = src.len().min(self.arg.len());
        self.arg[..n].copy_from_slice(&src[..n]);
    }
}

/// The answer to one ioctl: `Ok(())` writes `arg` and the out arrays back and returns 0.
pub type IoctlResult = Result<(), Errno>;

/// Completes one ioctl exactly once, possibly later and from another thread.
///
/// Dropping a `Done` without completing it answers the caller with `EIO` (never a hang).
pub struct Done {
    inner: Option<Box<dyn DoneSink>>,
}

/// What the transport plugs into a [`Done`].
pub trait DoneSink: Send {
    /// Writes back (on `Ok`) and replies.
    fn complete(self: Box<Self>, call: IoctlCall, result: IoctlResult);
    /// Registers `cancel` to run if the caller interrupts this request (FUSE_INTERRUPT).
    /// Returns false when the request was already interrupted: then the device must complete
    /// it with `EINTR` itself (the canceller is dropped, not run).
    fn on_interrupt(&mut self, cancel: Box<dyn FnOnce() + Send>) -> bool;
}

impl Done {
    pub fn new(sink: Box<dyn DoneSink>) -> Done {
        Done { inner: Some(sink) }
    }
    pub fn complete(mut self, call: IoctlCall, result: IoctlResult) {
        if let Some(s) = self.inner.take() {
            s.complete(call, result)
        }
    }
    /// See [`DoneSink::on_interrupt`].
    pub fn on_interrupt(&mut self, cancel: Box<dyn FnOnce() + Send>) -> bool {
        match self.inner.as_mut() {
            Some(s) => s.on_interrupt(cancel),
            None => false,
        }
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if self.inner.is_some() {
            log::error!("ioctl dropped without an answer; replying EIO");
            // No call to hand back: the sink replies without writing back.
            if let Some(s) = self.inner.take() {
                s.complete(
                    IoctlCall {
                        cmd: 0,
                        def: &DROPPED_DEF,
                        variant: &DROPPED_DEF.variants[0],
                        arg: Vec::new(),
                        arrays: Vec::new(),
                        caller: Caller {
                            pid: 0,
                            tgid: 0,
                            uid: 0,
                            gid: 0,
                        },
                    },
                    Err(Errno::EIO),
                );
            }
        }
    }
}

static DROPPED_DEF: IoctlDef = IoctlDef {
    nr: 0,
    name: "DROPPED",
    variants: &[IoctlVariant {
        cmd: 0,
        dir: crate::abi::table::Dir::None,
        size: 0,
        arg: None,
        label: "none",
    }],
    trailing: false,
};

/// Services the transport gives a device: facts about the caller's world.
pub trait Env: Send + Sync {
    /// Which of this daemon's files the caller's fd `fd` is (for ACQUIRE_VM's drm_fd):
    /// `Ok(Some(kind))` when it is ours, `Ok(None)` when it is some other file, `Err` (EBADF)
    /// when the fd is not open.
    fn file_of_fd(&self, caller: &Caller, fd: i32) -> Result<Option<(FileKind, u32)>, Errno>;

    /// Whether [`Env::give_fd`] can succeed for this call (lets a device refuse before it
    /// creates anything).
    fn can_give_fd(&self) -> bool {
        false
    }

    /// Hands a new file to the caller for an fd field going out (EXPORT_DMABUF, SMI_EVENTS):
    /// returns the number the device writes into that field. Only CUSE with the preload
    /// library's channel can (see docs/cuse-mmap.md); elsewhere EOPNOTSUPP, and `file` is
    /// closed. `what` names the ioctl for the log line.
    fn give_fd(
        &self,
        caller: &Caller,
        file: std::os::fd::OwnedFd,
        cloexec: bool,
        what: &str,
    ) -> Result<u32, Errno> {
        let _ = (caller, file, cloexec);
        log::warn!("{what}: {NO_FD_CHANNEL}: EOPNOTSUPP");
        Err(Errno::EOPNOTSUPP)
    }
}

/// Why an fd cannot go out to a client, and the way out (one log line).
pub const NO_FD_CHANNEL: &str = "the ioctl returns a new fd, which only reaches clients of the \
     CUSE transport that run with kfdmux's preload library (`kfdmux run --transport cuse` sets it)";

/// The CPU-visible memory of one client process: one memfd per process (see docs/fuse-transport.md).
/// Offsets handed to the client as `mmap_offset` index into it.
pub trait ProcessMemory: Send + Sync {
    /// The memfd backing all of this process's mappings.
    fn backing_fd(&self) -> std::os::fd::BorrowedFd<'_>;
}

/// A device: opens contexts.
pub trait Device: Send + Sync {
    fn name(&self) -> &'static str;
    /// Number of GPUs (render nodes) the device exposes.
    fn gpu_count(&self) -> u32;
    /// Render minor of GPU `index` (e.g. 128).
    fn render_minor(&self, index: u32) -> u32;
    /// A new open file of `kind` by `caller`.
    fn open(&self, caller: &Caller, kind: FileKind) -> Result<Box<dyn DeviceContext>, Errno>;
    /// The memory object of process `tgid` whose memfd backs its mmaps of every file; created on
    /// first use, shared by all of that process's contexts.
    fn process_memory(&self, tgid: u32) -> Result<Arc<dyn ProcessMemory>, Errno>;
    /// Counters for the stats file: (name, value) pairs.
    fn stats(&self) -> Vec<(&'static str, u64)>;
    /// Whether every ioctl finishes on the calling worker without waiting on anything outside
    /// the daemon (in-memory work and short system calls; a wait parks instead). The
    /// transports then let one warm worker read and answer requests in turn
    /// (`transport::engine::Session::run`). False (the default) for a device that forwards to
    /// another one: its calls may block.
    fn answers_in_place(&self) -> bool {
        false
    }
}

/// One open file of a device.
pub trait DeviceContext: Send + Sync {
    /// Answers one ioctl through `done` (now or later).
    fn ioctl(&self, env: &dyn Env, call: IoctlCall, done: Done);
    /// The file is closed: free everything (parked waiters are answered with EINTR first).
    fn release(&self);
}
