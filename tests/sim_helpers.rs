//! Drives a `SimDevice` directly: builds `IoctlCall`s from a command, an argument struct and
//! array buffers, and collects the answer from a `Done` whose sink sends it over a channel.
//! Included by the sim_* tests with `#[path = "sim_helpers.rs"] mod sim_helpers;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kfdmux::abi::table::{ioc_nr, ioc_size, ioc_type, Kind, DRM_IOC_TYPE};
use kfdmux::abi::{KfdIoctlAcquireVmArgs, AMDKFD_IOC_ACQUIRE_VM};
use kfdmux::device::sim::{SimConfig, SimDevice};
use kfdmux::device::{
    ArrayBuf, Caller, Device, DeviceContext, Done, DoneSink, Env, FileKind, IoctlCall, IoctlResult,
};
use kfdmux::errno::Errno;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// fd number → what `Env::file_of_fd` answers for it.
#[derive(Default)]
pub struct TestEnv {
    pub fds: Mutex<HashMap<i32, Option<(FileKind, u32)>>>,
}

impl TestEnv {
    /// fd `fd` is render file `file_id` of GPU `gpu`.
    pub fn add_render(&self, fd: i32, gpu: u32, file_id: u32) {
        self.fds
            .lock()
            .unwrap()
            .insert(fd, Some((FileKind::Render(gpu), file_id)));
    }
    /// fd `fd` is open but not one of ours.
    pub fn add_foreign(&self, fd: i32) {
        self.fds.lock().unwrap().insert(fd, None);
    }
}

impl Env for TestEnv {
    fn file_of_fd(&self, _caller: &Caller, fd: i32) -> Result<Option<(FileKind, u32)>, Errno> {
        self.fds
            .lock()
            .unwrap()
            .get(&fd)
            .copied()
            .ok_or(Errno::EBADF)
    }
}

/// What a device answered.
pub struct Reply {
    pub result: IoctlResult,
    pub call: IoctlCall,
}

impl Reply {
    pub fn args<T: FromBytes + IntoBytes>(&self) -> T {
        self.call.args()
    }
    pub fn array(&self, field: &str) -> &[u8] {
        self.call.array(field).expect("array present")
    }
}

type Cancel = Box<dyn FnOnce() + Send>;

struct ChanSink {
    tx: Sender<Reply>,
    cancel: Arc<Mutex<Option<Cancel>>>,
    interrupted: Arc<AtomicBool>,
}

impl DoneSink for ChanSink {
    fn complete(self: Box<Self>, call: IoctlCall, result: IoctlResult) {
        let _ = self.tx.send(Reply { result, call });
    }
    fn on_interrupt(&mut self, cancel: Cancel) -> bool {
        if self.interrupted.load(Ordering::SeqCst) {
            return false;
        }
        *self.cancel.lock().unwrap() = Some(cancel);
        true
    }
}

/// A call in flight: its answer arrives on `rx`; `interrupt()` plays FUSE_INTERRUPT.
pub struct Pending {
    pub rx: Receiver<Reply>,
    cancel: Arc<Mutex<Option<Cancel>>>,
    interrupted: Arc<AtomicBool>,
}

impl Pending {
    pub fn interrupt(&self) {
        self.interrupted.store(true, Ordering::SeqCst);
        let c = self.cancel.lock().unwrap().take();
        if let Some(c) = c {
            c();
        }
    }
    pub fn has_canceller(&self) -> bool {
        self.cancel.lock().unwrap().is_some()
    }
    pub fn wait(&self, secs: u64) -> Reply {
        self.rx
            .recv_timeout(Duration::from_secs(secs))
            .expect("the device answered in time")
    }
    pub fn try_get(&self) -> Option<Reply> {
        self.rx.try_recv().ok()
    }
}

/// Builds the call for `cmd` with argument bytes `arg` and pointed-to arrays by field name
/// (arrays not given are zero-filled from their count field, as the mux fetches them).
pub fn make_call(cmd: u32, arg: &[u8], arrays: Vec<(&str, Vec<u8>)>, caller: Caller) -> IoctlCall {
    let nr = ioc_nr(cmd);
    let def = if ioc_type(cmd) == DRM_IOC_TYPE {
        kfdmux::abi::drm_ioctl(nr)
    } else {
        kfdmux::abi::kfd_ioctl(nr)
    }
    .expect("known ioctl");
    let variant = def.variant_for(cmd).expect("known variant");
    let full = variant
        .arg
        .map(|a| a.size)
        .unwrap_or(0)
        .max(ioc_size(cmd) as usize);
    let mut argb = vec![0u8; full];
    argb[..arg.len().min(full)].copy_from_slice(&arg[..arg.len().min(full)]);
    let mut bufs = Vec::new();
    if let Some(sd) = variant.arg {
        for f in sd.fields {
            if let Kind::Pointer(p) = &f.kind {
                let given = arrays
                    .iter()
                    .find(|(n, _)| *n == f.name)
                    .map(|(_, d)| d.clone());
                let data = match given {
                    Some(d) => d,
                    None => {
                        let count = sd.get(&argb, p.count_field).unwrap_or(0) as usize;
                        vec![0u8; count * p.elem_size]
                    }
                };
                bufs.push(ArrayBuf {
                    field: f.name,
                    addr: 0x10_0000,
                    io: p.io,
                    data,
                });
            }
        }
    }
    IoctlCall {
        cmd,
        def,
        variant,
        arg: argb,
        arrays: bufs,
        caller,
    }
}

pub struct Harness {
    pub dev: Arc<SimDevice>,
    pub env: TestEnv,
    pub caller: Caller,
}

/// The harness's caller is this test process itself, so the sim's checks against the caller's
/// address space (USERPTR, SVM) and fd table (dma-buf) see real memory and real fds.
pub fn tgid() -> u32 {
    std::process::id()
}

/// Installs exported dma-bufs into this test process (what a CUSE transport would do for its
/// client): the fd number is the harness's answer.
pub struct SelfInstaller;

impl kfdmux::device::sim::FdInstaller for SelfInstaller {
    fn install(&self, _caller: &Caller, file: std::fs::File, cloexec: bool) -> Result<i32, Errno> {
        use std::os::fd::IntoRawFd;
        let fd = file.into_raw_fd();
        if !cloexec {
            // SAFETY: fcntl on an fd we own; clears FD_CLOEXEC only.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        }
        Ok(fd)
    }
}

impl Harness {
    pub fn new(gpus: &str) -> Harness {
        Harness::with_config(gpus, SimConfig::default())
    }

    pub fn with_config(gpus: &str, cfg: SimConfig) -> Harness {
        let gpus = kfdmux::topology::parse_gpus(gpus).expect("gpu list");
        let dev = SimDevice::new(gpus, cfg);
        Harness {
            dev,
            env: TestEnv::default(),
            caller: Caller {
                pid: tgid(),
                tgid: tgid(),
                uid: 1000,
                gid: 1000,
            },
        }
    }

    pub fn gpu_id(&self, i: usize) -> u32 {
        self.dev.gpus()[i].gpu_id
    }

    pub fn open_kfd(&self) -> Box<dyn DeviceContext> {
        self.dev
            .open(&self.caller, FileKind::Kfd)
            .expect("open kfd")
    }

    /// ACQUIRE_VM of every GPU on `ctx` with render fds 10+i (file ids 100+i).
    pub fn acquire_all(&self, ctx: &dyn DeviceContext) {
        for i in 0..self.dev.gpus().len() {
            self.env.add_render(10 + i as i32, i as u32, 100 + i as u32);
            let mut a = KfdIoctlAcquireVmArgs {
                drm_fd: 10 + i as u32,
                gpu_id: self.gpu_id(i),
            };
            assert_eq!(self.io0(ctx, AMDKFD_IOC_ACQUIRE_VM, &mut a), Ok(()));
        }
    }

    pub fn open_render(&self, i: u32) -> Box<dyn DeviceContext> {
        self.dev
            .open(&self.caller, FileKind::Render(i))
            .expect("open render")
    }

    /// Starts a call; the answer may come later.
    pub fn start(&self, ctx: &dyn DeviceContext, call: IoctlCall) -> Pending {
        let (tx, rx) = channel();
        let cancel = Arc::new(Mutex::new(None));
        let interrupted = Arc::new(AtomicBool::new(false));
        let sink = ChanSink {
            tx,
            cancel: cancel.clone(),
            interrupted: interrupted.clone(),
        };
        ctx.ioctl(&self.env, call, Done::new(Box::new(sink)));
        Pending {
            rx,
            cancel,
            interrupted,
        }
    }

    /// Starts a call whose caller was interrupted before the device registered a canceller.
    pub fn start_interrupted(&self, ctx: &dyn DeviceContext, call: IoctlCall) -> Pending {
        let (tx, rx) = channel();
        let cancel = Arc::new(Mutex::new(None));
        let interrupted = Arc::new(AtomicBool::new(true));
        let sink = ChanSink {
            tx,
            cancel: cancel.clone(),
            interrupted: interrupted.clone(),
        };
        ctx.ioctl(&self.env, call, Done::new(Box::new(sink)));
        Pending {
            rx,
            cancel,
            interrupted,
        }
    }

    /// A call that must be answered right away.
    pub fn call(&self, ctx: &dyn DeviceContext, call: IoctlCall) -> Reply {
        let p = self.start(ctx, call);
        p.rx.recv_timeout(Duration::from_secs(5)).expect("answered")
    }

    /// Typed call: `a` is sent and replaced by what the device wrote back.
    pub fn io<T: IntoBytes + FromBytes + Immutable>(
        &self,
        ctx: &dyn DeviceContext,
        cmd: u32,
        a: &mut T,
        arrays: Vec<(&str, Vec<u8>)>,
    ) -> (IoctlResult, IoctlCall) {
        let call = make_call(cmd, a.as_bytes(), arrays, self.caller);
        let r = self.call(ctx, call);
        *a = r.call.args();
        (r.result, r.call)
    }

    /// Typed call without arrays, returning only the result.
    pub fn io0<T: IntoBytes + FromBytes + Immutable>(
        &self,
        ctx: &dyn DeviceContext,
        cmd: u32,
        a: &mut T,
    ) -> IoctlResult {
        self.io(ctx, cmd, a, Vec::new()).0
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.dev
            .stats()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or(u64::MAX)
    }
}

/// `u32`s as little-endian bytes (device id arrays).
pub fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Anonymous memory of this process (USERPTR and SVM ranges must be mapped), unmapped on drop.
pub struct Mapping {
    pub addr: u64,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize) -> Mapping {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap");
        Mapping {
            addr: p as u64,
            len,
        }
    }

    /// Unmaps `[addr+off, addr+off+len)` (punches a hole into the mapping).
    pub fn punch(&self, off: usize, len: usize) {
        // SAFETY: the range lies inside our own mapping, which nothing else uses.
        let r = unsafe { libc::munmap((self.addr as usize + off) as *mut libc::c_void, len) };
        assert_eq!(r, 0);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping (munmap of already-punched holes is harmless).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}
