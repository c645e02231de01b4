//! `sim`: a software KFD (and amdgpu render node) faithful to the kernel's observable behaviour.
//!
//! One [`SimDevice`] serves a list of simulated GPUs. Every open of the kfd file is a
//! [`kfd::KfdCtx`] (one kfd_process in kernel terms), every open of a render node a
//! [`drm::RenderCtx`]. Buffer memory lives in one memfd per client process ([`mem::ProcMem`]),
//! so CPU mappings are real shared memory. Blocking `WAIT_EVENTS` calls are parked and answered
//! from the setter's thread, the device's single timer thread, or the interrupt canceller.
//! What each ioctl does, and where the sim knowingly differs from the kernel: docs/sim.md.

pub mod dmabuf;
pub mod drm;
pub mod events;
pub mod kfd;
pub mod mem;
pub mod procmaps;
pub mod queues;
pub mod smi;
pub mod svm;
pub mod timer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::device::{Caller, Device, DeviceContext, FileKind, ProcessMemory};
use crate::errno::Errno;
use crate::topology::Gpu;

use mem::ProcMem;

/// Tunables of a [`SimDevice`].
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// `GET_VERSION` answers `1.<kfd_minor>`. libhsakmt only requires major 1; the default, 14,
    /// is the newest minor whose features the sim implements or refuses like the kernel does
    /// (1.13 runtime enable/debugger ioctls, 1.14 event age).
    pub kfd_minor: u32,
    /// `DRM_IOCTL_VERSION` answers amdgpu `3.<drm_minor>.0`.
    pub drm_minor: u32,
    /// Size of each process's sparse memfd (bytes; mmap offsets stay below it).
    pub memfd_size: u64,
    /// `AMDKFD_IOC_SVM` works (a kernel built with CONFIG_HSA_AMD_SVM). Off: every SVM call
    /// answers EPERM, as such a kernel does. The topology must agree: its GPU nodes carry
    /// `HSA_CAP_SVMAPI_SUPPORTED` exactly when this is on (`TopologyOptions::svm_capability`).
    pub svm: bool,
    /// Limit on GTT allocations of all contexts and GPUs together (the kernel's TTM limit,
    /// device-independent); 0 = half of the host's RAM, as the kernel's default.
    pub gtt_bytes: u64,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            kfd_minor: 14,
            drm_minor: 54,
            memfd_size: 1 << 40,
            svm: true,
            gtt_bytes: 0,
        }
    }
}

/// Device-wide counters for the stats file.
#[derive(Default)]
pub(crate) struct Stats {
    pub contexts: AtomicU64,
    pub render_contexts: AtomicU64,
    pub buffers: AtomicU64,
    pub buffer_bytes: AtomicU64,
    pub events: AtomicU64,
    pub waiters: AtomicU64,
    pub processes: AtomicU64,
    pub queues: AtomicU64,
    pub svm_ranges: AtomicU64,
}

/// VRAM accounting of one GPU, shared by all contexts (the kernel's limit is per device).
#[derive(Default)]
pub(crate) struct VramAccount {
    /// Page-aligned bytes of live VRAM buffers.
    pub used: AtomicU64,
    /// The same, each buffer rounded up to 2 MiB (what AVAILABLE_MEMORY subtracts).
    pub used_aligned: AtomicU64,
}

/// Granularity of AVAILABLE_MEMORY (the kernel's VRAM_AVAILABLITY_ALIGN).
pub(crate) const VRAM_AVAIL_ALIGN: u64 = 2 << 20;

/// What every context of a device shares.
pub(crate) struct Shared {
    pub cfg: SimConfig,
    pub gpus: Vec<Gpu>,
    pub vram: Vec<VramAccount>,
    procs: Mutex<HashMap<u32, Weak<ProcMem>>>,
    pub next_ctx: AtomicU64,
    pub stats: Stats,
    pub timer: Arc<timer::Timer>,
    /// Bytes of live GTT buffers (all contexts, all GPUs) and their limit.
    pub gtt_used: AtomicU64,
    pub gtt_limit: u64,
    /// Per-GPU queue bookkeeping shared by all contexts (HWS limits, SDMA queue slots).
    pub dev_queues: Vec<Mutex<queues::DevQueues>>,
    /// dma-bufs this device exported, by the inode of their memfd.
    pub dmabufs: dmabuf::Registry,
    /// How an exported dma-buf reaches the caller's fd table (None: it cannot).
    pub fd_installer: Mutex<Option<Arc<dyn FdInstaller>>>,
    /// SMI event streams (SMI_EVENTS).
    pub smi: smi::Registry,
}

/// Puts a file into a client's fd table (EXPORT_DMABUF). Transports that can do that (CUSE with
/// the preload hand-over socket, or a test harness) register one with
/// [`SimDevice::set_fd_installer`]; without one EXPORT_DMABUF answers EOPNOTSUPP.
pub trait FdInstaller: Send + Sync {
    /// Installs `file` in `caller`'s fd table; returns the fd number there.
    fn install(&self, caller: &Caller, file: std::fs::File, cloexec: bool) -> Result<i32, Errno>;
}

impl Shared {
    /// GPU index of `gpu_id`.
    pub fn gpu_index(&self, gpu_id: u32) -> Option<usize> {
        self.gpus.iter().position(|g| g.gpu_id == gpu_id)
    }

    /// Reserves `size` bytes of VRAM on GPU `gi`; ENOMEM when it does not fit.
    pub fn vram_reserve(&self, gi: usize, size: u64) -> Result<(), Errno> {
        let total = self.gpus[gi].preset.vram_bytes;
        let acct = &self.vram[gi];
        let aligned = size
            .div_ceil(VRAM_AVAIL_ALIGN)
            .saturating_mul(VRAM_AVAIL_ALIGN);
        acct.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(size).filter(|&n| n <= total)
            })
            .map_err(|_| Errno::ENOMEM)?;
        acct.used_aligned.fetch_add(aligned, Ordering::AcqRel);
        Ok(())
    }

    pub fn vram_unreserve(&self, gi: usize, size: u64) {
        let aligned = size
            .div_ceil(VRAM_AVAIL_ALIGN)
            .saturating_mul(VRAM_AVAIL_ALIGN);
        let acct = &self.vram[gi];
        let _ = acct
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(size))
            });
        let _ = acct
            .used_aligned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(aligned))
            });
    }

    /// Reserves `size` bytes of GTT (device-wide, like the kernel's TTM limit); ENOMEM when full.
    pub fn gtt_reserve(&self, size: u64) -> Result<(), Errno> {
        self.gtt_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(size).filter(|&n| n <= self.gtt_limit)
            })
            .map(|_| ())
            .map_err(|_| Errno::ENOMEM)
    }

    pub fn gtt_unreserve(&self, size: u64) {
        let _ = self
            .gtt_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(size))
            });
    }

    /// VRAM still available on GPU `gi`, as AVAILABLE_MEMORY reports it.
    pub fn vram_available(&self, gi: usize) -> u64 {
        let total = self.gpus[gi].preset.vram_bytes;
        let used = self.vram[gi].used_aligned.load(Ordering::Acquire);
        total.saturating_sub(used) / VRAM_AVAIL_ALIGN * VRAM_AVAIL_ALIGN
    }

    /// The memory object of process `tgid` (created on first use).
    pub fn proc_mem(&self, tgid: u32) -> Result<Arc<ProcMem>, Errno> {
        let mut procs = self.procs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = procs.get(&tgid).and_then(Weak::upgrade) {
            return Ok(m);
        }
        procs.retain(|_, w| w.strong_count() > 0);
        let m = Arc::new(ProcMem::new(tgid, self.cfg.memfd_size)?);
        procs.insert(tgid, Arc::downgrade(&m));
        self.stats
            .processes
            .store(procs.len() as u64, Ordering::Relaxed);
        Ok(m)
    }
}

/// The host's RAM in bytes (sysinfo), 0 if unknown.
fn host_ram() -> u64 {
    // SAFETY: sysinfo only writes the struct we pass; a zeroed sysinfo is a valid value.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a valid, writable sysinfo for the duration of the call.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return 0;
    }
    (si.totalram as u64).saturating_mul(si.mem_unit.max(1) as u64)
}

/// The simulated device.
pub struct SimDevice {
    shared: Arc<Shared>,
}

impl SimDevice {
    /// A device serving `gpus` (from `topology::parse_gpus`).
    pub fn new(gpus: Vec<Gpu>, cfg: SimConfig) -> Arc<SimDevice> {
        let vram = gpus.iter().map(|_| VramAccount::default()).collect();
        let gtt_limit = if cfg.gtt_bytes == 0 {
            host_ram() / 2
        } else {
            cfg.gtt_bytes
        };
        let dev_queues = gpus
            .iter()
            .map(|_| Mutex::new(queues::DevQueues::default()))
            .collect();
        let shared = Arc::new(Shared {
            cfg,
            gpus,
            vram,
            procs: Mutex::new(HashMap::new()),
            next_ctx: AtomicU64::new(1),
            stats: Stats::default(),
            timer: timer::Timer::new(),
            gtt_used: AtomicU64::new(0),
            gtt_limit,
            dev_queues,
            dmabufs: dmabuf::Registry::default(),
            fd_installer: Mutex::new(None),
            smi: smi::Registry::default(),
        });
        Arc::new(SimDevice { shared })
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.cfg
    }

    pub fn gpus(&self) -> &[Gpu] {
        &self.shared.gpus
    }

    /// Lets EXPORT_DMABUF hand fds to clients (see [`FdInstaller`]).
    pub fn set_fd_installer(&self, installer: Arc<dyn FdInstaller>) {
        *self
            .shared
            .fd_installer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(installer);
    }

    /// Bytes of GTT in use (all contexts) and the limit.
    pub fn gtt_usage(&self) -> (u64, u64) {
        (
            self.shared.gtt_used.load(Ordering::Acquire),
            self.shared.gtt_limit,
        )
    }

    /// VRAM bytes AVAILABLE_MEMORY would report for GPU index `gi` (None if out of range).
    pub fn vram_available(&self, gi: usize) -> Option<u64> {
        (gi < self.shared.gpus.len()).then(|| self.shared.vram_available(gi))
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.shared.timer.shutdown();
    }
}

impl Device for SimDevice {
    fn name(&self) -> &'static str {
        "sim"
    }

    /// Every handler is in-memory work; WAIT_EVENTS parks its call.
    fn answers_in_place(&self) -> bool {
        true
    }

    fn gpu_count(&self) -> u32 {
        self.shared.gpus.len() as u32
    }

    fn render_minor(&self, index: u32) -> u32 {
        self.shared
            .gpus
            .get(index as usize)
            .map(|g| g.render_minor)
            .unwrap_or(128 + index)
    }

    fn open(&self, caller: &Caller, kind: FileKind) -> Result<Box<dyn DeviceContext>, Errno> {
        match kind {
            FileKind::Kfd => {
                let mem = self.shared.proc_mem(caller.tgid)?;
                Ok(Box::new(kfd::KfdCtx::new(
                    self.shared.clone(),
                    mem,
                    *caller,
                )))
            }
            FileKind::Render(i) => {
                if i as usize >= self.shared.gpus.len() {
                    return Err(Errno::ENODEV);
                }
                Ok(Box::new(drm::RenderCtx::new(
                    self.shared.clone(),
                    i as usize,
                    *caller,
                )))
            }
        }
    }

    fn process_memory(&self, tgid: u32) -> Result<Arc<dyn ProcessMemory>, Errno> {
        Ok(self.shared.proc_mem(tgid)?)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.shared.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut v = vec![
            ("contexts", l(&s.contexts)),
            ("render_contexts", l(&s.render_contexts)),
            ("buffers", l(&s.buffers)),
            ("buffer_bytes", l(&s.buffer_bytes)),
            ("events", l(&s.events)),
            ("waiters", l(&s.waiters)),
            ("processes", l(&s.processes)),
            ("timers", self.shared.timer.len() as u64),
            ("queues", l(&s.queues)),
            ("svm_ranges", l(&s.svm_ranges)),
            ("dmabufs", self.shared.dmabufs.live()),
            ("smi_streams", self.shared.smi.live()),
            ("gtt_used", self.shared.gtt_used.load(Ordering::Relaxed)),
        ];
        for (i, a) in self.shared.vram.iter().enumerate() {
            // Names must be 'static; the first 8 GPUs get a counter each.
            const NAMES: [&str; 8] = [
                "vram_used_gpu0",
                "vram_used_gpu1",
                "vram_used_gpu2",
                "vram_used_gpu3",
                "vram_used_gpu4",
                "vram_used_gpu5",
                "vram_used_gpu6",
                "vram_used_gpu7",
            ];
            if let Some(n) = NAMES.get(i) {
                v.push((n, l(&a.used)));
            }
        }
        v
    }
}
