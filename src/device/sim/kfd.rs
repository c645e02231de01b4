//! One open of the simulated `/dev/kfd`: a kfd_process in kernel terms.
//!
//! Handlers are looked up by `_IOC_NR` in [`handler`] (the model is the kernel's ioctl table in
//! kfd_chardev.c) and run under the context's lock; completions of other parked calls that a
//! handler causes (SET_EVENT waking waiters) are collected and answered after the lock is
//! released.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rustc_hash::FxHashMap;

use crate::abi::*;
use crate::device::{Caller, DeviceContext, Done, Env, FileKind, IoctlCall, IoctlResult};
use crate::errno::Errno;

use super::dmabuf::{self, DmabufObj};
use super::events::{self, EventState};
use super::mem::{page_align, ProcMem, PAGE_SIZE};
use super::procmaps;
use super::queues::{self, PddQueues, QueueState};
use super::svm::{self, SvmState};
use super::timer::TimerKey;
use super::Shared;

/// A parked or finished call to answer once the context lock is released.
pub(crate) struct Completion {
    pub call: IoctlCall,
    pub done: Done,
    pub result: IoctlResult,
}

/// Lowest-free id allocator (the kernel's idr hands out the lowest free id).
#[derive(Debug, Default)]
pub(crate) struct IdAlloc {
    free: BTreeSet<u32>,
    next: u32,
}

impl IdAlloc {
    /// The lowest free id below `limit`.
    pub fn alloc(&mut self, limit: u32) -> Option<u32> {
        if let Some(&id) = self.free.iter().next() {
            if id < limit {
                self.free.remove(&id);
                return Some(id);
            }
        }
        if self.next < limit {
            self.next += 1;
            return Some(self.next - 1);
        }
        None
    }
    pub fn free(&mut self, id: u32) {
        if id.checked_add(1) == Some(self.next) {
            self.next -= 1;
            // Fold trailing free ids back into `next`.
            while self.next > 0 && self.free.remove(&(self.next - 1)) {
                self.next -= 1;
            }
        } else if id < self.next {
            self.free.insert(id);
        }
    }
}

/// Per-GPU data of a context (the kernel's kfd_process_device).
#[derive(Debug, Default)]
pub(crate) struct Pdd {
    /// The render file acquired as this GPU's VM (ACQUIRE_VM), by the transport's file id.
    pub drm_file: Option<u32>,
    /// Buffer handle ids (low 32 bits of a handle).
    pub idr: IdAlloc,
    /// GPU VA ranges mapped in this GPU's VM: start → (end, handle).
    pub vm: BTreeMap<u64, (u64, u64)>,
    pub scratch_va: u64,
    pub trap: Option<(u64, u64)>,
    pub policy: Option<(u32, u32, u64, u64)>,
    /// Queue bookkeeping: doorbell slice, doorbell ids, queue count, GWS.
    pub q: PddQueues,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BoKind {
    Vram,
    Gtt,
    Userptr,
    Doorbell,
    Mmio,
}

#[derive(Debug)]
pub(crate) struct Bo {
    pub gpu: usize,
    pub kind: BoKind,
    /// The allocation flags (for GET_DMABUF_INFO / IPC later).
    #[allow(dead_code)]
    pub flags: u32,
    pub va: u64,
    /// Page-aligned size.
    pub size: u64,
    /// Range in the process memfd (VRAM, GTT, doorbell, MMIO).
    pub mem_off: Option<u64>,
    /// CPU address of a USERPTR buffer (for the mapping check of a later issue).
    #[allow(dead_code)]
    pub userptr: u64,
    /// Which GPUs (by index) map it.
    pub mapped: Vec<bool>,
    /// The dma-buf exported from this buffer, or the one it was imported from.
    pub dmabuf: Option<Arc<DmabufObj>>,
    /// Imported (IMPORT_DMABUF): no memory of its own, not accounted.
    pub imported: bool,
}

impl Bo {
    fn map_count(&self) -> usize {
        self.mapped.iter().filter(|m| **m).count()
    }
}

/// Everything a context owns; guarded by the context's lock.
pub(crate) struct KfdState {
    pub secondary: bool,
    pub released: bool,
    pub pdds: Vec<Pdd>,
    pub bos: FxHashMap<u64, Bo>,
    pub ev: EventState,
    pub queues: QueueState,
    pub svm: SvmState,
    pub xnack: bool,
    pub runtime_enabled: bool,
    pub r_debug: u64,
}

/// The shared part of a kfd context (also reachable from the timer and interrupt cancellers).
pub struct KfdInner {
    pub(crate) id: u64,
    pub(crate) shared: Arc<Shared>,
    pub(crate) mem: Arc<ProcMem>,
    pub(crate) opener: Caller,
    pub(crate) st: Mutex<KfdState>,
    pub(crate) next_wid: AtomicU64,
}

/// What a handler works with.
pub(crate) struct Cx<'a> {
    pub inner: &'a Arc<KfdInner>,
    pub env: &'a dyn Env,
    pub st: &'a mut KfdState,
    /// Parked calls to answer after the lock is released.
    pub wake: Vec<Completion>,
    /// Deadlines to disarm after the lock is released.
    pub disarm: Vec<TimerKey>,
}

type SyncFn = fn(&mut Cx, &mut IoctlCall) -> IoctlResult;

enum Handler {
    Sync(SyncFn),
    /// WAIT_EVENTS: may park the call.
    Wait,
}

/// The ioctl table, by nr.
fn handler(nr: u32) -> Option<(&'static str, Handler)> {
    use Handler::Sync as S;
    Some(match nr {
        0x01 => ("GET_VERSION", S(get_version)),
        0x02 => ("CREATE_QUEUE", S(queues::create_queue)),
        0x03 => ("DESTROY_QUEUE", S(queues::destroy_queue)),
        0x04 => ("SET_MEMORY_POLICY", S(set_memory_policy)),
        0x05 => ("GET_CLOCK_COUNTERS", S(get_clock_counters)),
        0x06 => ("GET_PROCESS_APERTURES", S(get_process_apertures)),
        0x07 => ("UPDATE_QUEUE", S(queues::update_queue)),
        0x08 => ("CREATE_EVENT", S(events::create_event)),
        0x09 => ("DESTROY_EVENT", S(events::destroy_event)),
        0x0A => ("SET_EVENT", S(events::set_event)),
        0x0B => ("RESET_EVENT", S(events::reset_event)),
        0x0C => ("WAIT_EVENTS", Handler::Wait),
        0x0D..=0x10 => ("DBG_*_DEPRECATED", S(eperm)),
        0x11 => ("SET_SCRATCH_BACKING_VA", S(set_scratch_backing_va)),
        0x12 => ("GET_TILE_CONFIG", S(get_tile_config)),
        0x13 => ("SET_TRAP_HANDLER", S(set_trap_handler)),
        0x14 => ("GET_PROCESS_APERTURES_NEW", S(get_process_apertures_new)),
        0x15 => ("ACQUIRE_VM", S(acquire_vm)),
        0x16 => ("ALLOC_MEMORY_OF_GPU", S(alloc_memory_of_gpu)),
        0x17 => ("FREE_MEMORY_OF_GPU", S(free_memory_of_gpu)),
        0x18 => ("MAP_MEMORY_TO_GPU", S(map_memory_to_gpu)),
        0x19 => ("UNMAP_MEMORY_FROM_GPU", S(unmap_memory_from_gpu)),
        0x1A => ("SET_CU_MASK", S(queues::set_cu_mask)),
        0x1B => ("GET_QUEUE_WAVE_STATE", S(queues::get_queue_wave_state)),
        0x1C => ("GET_DMABUF_INFO", S(dmabuf::get_dmabuf_info)),
        0x1D => ("IMPORT_DMABUF", S(dmabuf::import_dmabuf)),
        0x1E => ("ALLOC_QUEUE_GWS", S(queues::alloc_queue_gws)),
        0x1F => ("SMI_EVENTS", S(smi_events)),
        0x20 => ("SVM", S(svm::svm_ioctl)),
        0x21 => ("SET_XNACK_MODE", S(set_xnack_mode)),
        0x22 => ("CRIU_OP", S(not_implemented)),
        0x23 => ("AVAILABLE_MEMORY", S(available_memory)),
        0x24 => ("EXPORT_DMABUF", S(dmabuf::export_dmabuf)),
        0x25 => ("RUNTIME_ENABLE", S(runtime_enable)),
        0x26 => ("DBG_TRAP", S(dbg_trap)),
        0x27 => ("CREATE_PROCESS", S(create_process)),
        0x28 => ("PROFILER", S(not_implemented)),
        0x80..=0x87 => ("ROCM_DKMS_ONLY", S(dkms_only)),
        _ => return None,
    })
}

pub struct KfdCtx {
    inner: Arc<KfdInner>,
}

impl KfdCtx {
    pub(crate) fn new(shared: Arc<Shared>, mem: Arc<ProcMem>, opener: Caller) -> KfdCtx {
        let id = shared.next_ctx.fetch_add(1, Ordering::Relaxed);
        let pdds = shared.gpus.iter().map(|_| Pdd::default()).collect();
        shared.stats.contexts.fetch_add(1, Ordering::Relaxed);
        let st = KfdState {
            secondary: false,
            released: false,
            pdds,
            bos: FxHashMap::default(),
            ev: EventState::default(),
            queues: QueueState::default(),
            svm: SvmState::default(),
            xnack: false,
            runtime_enabled: false,
            r_debug: 0,
        };
        KfdCtx {
            inner: Arc::new(KfdInner {
                id,
                shared,
                mem,
                opener,
                st: Mutex::new(st),
                next_wid: AtomicU64::new(1),
            }),
        }
    }
}

impl KfdInner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, KfdState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers what a handler left to answer (outside the lock).
    pub(crate) fn finish(&self, wake: Vec<Completion>, disarm: Vec<TimerKey>) {
        for k in disarm {
            self.shared.timer.cancel(k);
        }
        for c in wake {
            c.done.complete(c.call, c.result);
        }
    }

    fn ioctl(self: &Arc<Self>, env: &dyn Env, mut call: IoctlCall, done: Done) {
        let nr = call.def.nr;
        if crate::abi::table::ioc_type(call.cmd) != crate::abi::table::KFD_IOC_TYPE {
            log::debug!("sim kfd: non-KFD command {:#010x}: ENOTTY", call.cmd);
            return done.complete(call, Err(Errno::ENOTTY));
        }
        let Some((name, h)) = handler(nr) else {
            log::debug!("sim kfd: unknown nr {nr:#x}: ENOTTY");
            return done.complete(call, Err(Errno::ENOTTY));
        };
        match h {
            Handler::Wait => events::wait_events(self, env, call, done),
            Handler::Sync(f) => {
                let mut st = self.lock();
                let mut cx = Cx {
                    inner: self,
                    env,
                    st: &mut st,
                    wake: Vec::new(),
                    disarm: Vec::new(),
                };
                let r = f(&mut cx, &mut call);
                let (wake, disarm) = (std::mem::take(&mut cx.wake), std::mem::take(&mut cx.disarm));
                drop(st);
                if let Err(e) = r {
                    log::debug!("sim kfd ctx {}: {name} -> {e:?}", self.id);
                }
                self.finish(wake, disarm);
                done.complete(call, r);
            }
        }
    }

    /// Frees everything; parked waiters are answered with EINTR.
    fn release(self: &Arc<Self>) {
        let mut st = self.lock();
        if st.released {
            return;
        }
        st.released = true;
        let mut cx = Cx {
            inner: self,
            env: &NoEnv,
            st: &mut st,
            wake: Vec::new(),
            disarm: Vec::new(),
        };
        free_all(&mut cx);
        let (wake, disarm) = (std::mem::take(&mut cx.wake), std::mem::take(&mut cx.disarm));
        drop(st);
        self.shared.smi.drop_ctx(self.id);
        self.shared.stats.contexts.fetch_sub(1, Ordering::Relaxed);
        log::debug!(
            "sim kfd ctx {} of pid {} released",
            self.id,
            self.opener.tgid
        );
        self.finish(wake, disarm);
    }

    /// The deadline of waiter `wid` passed (timer thread).
    pub(crate) fn waiter_timeout(self: &Arc<Self>, wid: u64) {
        let mut st = self.lock();
        let mut cx = Cx {
            inner: self,
            env: &NoEnv,
            st: &mut st,
            wake: Vec::new(),
            disarm: Vec::new(),
        };
        events::on_timeout(&mut cx, wid);
        let (wake, disarm) = (std::mem::take(&mut cx.wake), std::mem::take(&mut cx.disarm));
        drop(st);
        self.finish(wake, disarm);
    }

    /// The caller interrupted waiter `wid` (FUSE_INTERRUPT).
    pub(crate) fn waiter_interrupt(self: &Arc<Self>, wid: u64) {
        let mut st = self.lock();
        let mut cx = Cx {
            inner: self,
            env: &NoEnv,
            st: &mut st,
            wake: Vec::new(),
            disarm: Vec::new(),
        };
        events::resolve(&mut cx, wid, events::Outcome::Interrupted);
        let (wake, disarm) = (std::mem::take(&mut cx.wake), std::mem::take(&mut cx.disarm));
        drop(st);
        self.finish(wake, disarm);
    }
}

/// An Env for internal paths that never look up fds.
struct NoEnv;
impl Env for NoEnv {
    fn file_of_fd(&self, _: &Caller, _: i32) -> Result<Option<(FileKind, u32)>, Errno> {
        Err(Errno::EBADF)
    }
}

impl DeviceContext for KfdCtx {
    fn ioctl(&self, env: &dyn Env, call: IoctlCall, done: Done) {
        self.inner.ioctl(env, call, done)
    }
    fn release(&self) {
        self.inner.release()
    }
}

impl Drop for KfdCtx {
    fn drop(&mut self) {
        // A context dropped without RELEASE still frees its resources.
        self.inner.release()
    }
}

/// Frees every buffer, event, waiter and acquired VM of the context (release, CREATE_PROCESS).
fn free_all(cx: &mut Cx) {
    events::free_all(cx);
    queues::free_all(cx);
    svm::free_all(cx);
    let handles: Vec<u64> = cx.st.bos.keys().copied().collect();
    for h in handles {
        if let Some(bo) = cx.st.bos.remove(&h) {
            drop_bo(cx, h, bo);
        }
    }
    for pdd in cx.st.pdds.iter_mut() {
        *pdd = Pdd::default();
    }
}

/// Returns a removed buffer's memory, accounting and handle id.
fn drop_bo(cx: &mut Cx, handle: u64, bo: Bo) {
    let sh = &cx.inner.shared;
    // A doorbell buffer shows the GPU's doorbell slice, which belongs to the context's queues.
    if let (Some(off), false) = (bo.mem_off, bo.kind == BoKind::Doorbell) {
        cx.inner.mem.free(off, bo.size);
    }
    match bo.kind {
        _ if bo.imported => {}
        BoKind::Vram => sh.vram_unreserve(bo.gpu, bo.size),
        BoKind::Gtt => sh.gtt_unreserve(bo.size),
        _ => {}
    }
    for (gi, m) in bo.mapped.iter().enumerate() {
        if *m {
            if let Some(p) = cx.st.pdds.get_mut(gi) {
                p.vm.remove(&bo.va);
            }
        }
    }
    if let Some(p) = cx.st.pdds.get_mut(bo.gpu) {
        p.idr.free(handle as u32);
    }
    sh.stats.buffers.fetch_sub(1, Ordering::Relaxed);
    sh.stats.buffer_bytes.fetch_sub(bo.size, Ordering::Relaxed);
}

impl Cx<'_> {
    pub fn shared(&self) -> &Shared {
        &self.inner.shared
    }
    /// GPU index of `gpu_id` in this context (EINVAL when unknown, as kfd_process_device_data_by_id).
    pub fn pdd_index(&self, gpu_id: u32) -> Result<usize, Errno> {
        self.shared().gpu_index(gpu_id).ok_or_else(|| {
            log::debug!("sim kfd: unknown gpu_id {gpu_id:#x}");
            Errno::EINVAL
        })
    }
    /// `kfd_bind_process_to_device`: the GPU's VM must have been acquired (ENODEV otherwise).
    pub fn bound(&self, gi: usize) -> Result<(), Errno> {
        match self.st.pdds.get(gi).and_then(|p| p.drm_file) {
            Some(_) => Ok(()),
            None => {
                log::debug!("sim kfd: GPU {gi} used before ACQUIRE_VM: ENODEV");
                Err(Errno::ENODEV)
            }
        }
    }
}

// ---- basic queries -------------------------------------------------------------------------

fn get_version(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a = KfdIoctlGetVersionArgs {
        major_version: 1,
        minor_version: cx.shared().cfg.kfd_minor,
    };
    call.set_args(&a);
    Ok(())
}

/// `(lds_base, lds_limit, scratch_base, scratch_limit, gpuvm_base, gpuvm_limit)` of GPU `gi`,
/// as kfd_flat_memory.c computes them for a dGPU.
pub(crate) fn apertures(cx: &Cx, gi: usize) -> KfdProcessDeviceApertures {
    let g = &cx.shared().gpus[gi];
    // 32-bit aperture limit: base's upper half | 0xffffffff.
    let limit = |b: u64| (b & 0xFFFF_FFFF_0000_0000) | 0xFFFF_FFFF;
    // SVM_USER_BASE: CWSR TBA/TMA (2 pages) + 2 pages.
    let gpuvm_base = 4 * PAGE_SIZE;
    let gpuvm_limit = (1u64 << 47) - 1;
    let (lds, scratch) = if g.preset.gfx_target_version >= 90000 {
        (1u64 << 48, 2u64 << 48)
    } else {
        // GFX8 (VI) layout: apertures in the non-canonical upper range.
        (1u64 << 61, (1u64 << 61) + 0x1_0000_0000)
    };
    KfdProcessDeviceApertures {
        lds_base: lds,
        lds_limit: limit(lds),
        scratch_base: scratch,
        scratch_limit: limit(scratch),
        gpuvm_base,
        gpuvm_limit,
        gpu_id: g.gpu_id,
        pad: 0,
    }
}

fn get_process_apertures_new(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlGetProcessAperturesNewArgs = call.args();
    let n = cx.st.pdds.len();
    if a.num_of_nodes == 0 {
        // Only the count, so user space can size its buffer.
        a.num_of_nodes = n as u32;
        call.set_args(&a);
        return Ok(());
    }
    let count = n.min(a.num_of_nodes as usize);
    let entries: Vec<KfdProcessDeviceApertures> = (0..count).map(|i| apertures(cx, i)).collect();
    let buf = call
        .array_mut("kfd_process_device_apertures_ptr")
        .ok_or(Errno::EFAULT)?;
    let esz = std::mem::size_of::<KfdProcessDeviceApertures>();
    if buf.len() < count * esz {
        return Err(Errno::EFAULT);
    }
    for (i, e) in entries.iter().enumerate() {
        buf[i * esz..(i + 1) * esz].copy_from_slice(zerocopy::IntoBytes::as_bytes(e));
    }
    // The kernel copies only the filled entries; the rest of the caller's buffer is untouched.
    buf.truncate(count * esz);
    a.num_of_nodes = count as u32;
    call.set_args(&a);
    Ok(())
}

fn get_process_apertures(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlGetProcessAperturesArgs = call.args();
    let count = cx.st.pdds.len().min(a.process_apertures.len());
    for i in 0..count {
        a.process_apertures[i] = apertures(cx, i);
    }
    a.num_of_nodes = count as u32;
    call.set_args(&a);
    Ok(())
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// The simulated GPU timestamp counter runs at 100 MHz (DEV_INFO's gpu_counter_freq).
pub(crate) fn gpu_clock_counter() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_RAW) / 10
}

fn get_clock_counters(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlGetClockCountersArgs = call.args();
    // The kernel does not validate gpu_id: an unknown one reads a GPU counter of 0.
    a.gpu_clock_counter = if cx.shared().gpu_index(a.gpu_id).is_some() {
        gpu_clock_counter()
    } else {
        0
    };
    a.cpu_clock_counter = clock_ns(libc::CLOCK_MONOTONIC_RAW);
    a.system_clock_counter = clock_ns(libc::CLOCK_BOOTTIME);
    a.system_clock_freq = 1_000_000_000;
    call.set_args(&a);
    Ok(())
}

fn available_memory(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlGetAvailableMemoryArgs = call.args();
    let gi = cx.pdd_index(a.gpu_id)?;
    a.available = cx.shared().vram_available(gi);
    call.set_args(&a);
    Ok(())
}

fn get_tile_config(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlGetTileConfigArgs = call.args();
    let gi = cx.pdd_index(a.gpu_id)?;
    a.gb_addr_config = cx.shared().gpus[gi].preset.gb_addr_config;
    // GFX9+ keeps no tiling tables: the kernel copies that many zero entries.
    a.num_banks = 0;
    a.num_ranks = 0;
    a.num_tile_configs = a.num_tile_configs.min(32);
    a.num_macro_tile_configs = a.num_macro_tile_configs.min(16);
    for (field, n) in [
        ("tile_config_ptr", a.num_tile_configs),
        ("macro_tile_config_ptr", a.num_macro_tile_configs),
    ] {
        if let Some(buf) = call.array_mut(field) {
            let k = (n as usize * 4).min(buf.len());
            buf[..k].fill(0);
        }
    }
    call.set_args(&a);
    Ok(())
}

// ---- process-wide settings -----------------------------------------------------------------

fn set_memory_policy(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlSetMemoryPolicyArgs = call.args();
    let ok = |p: u32| p == KFD_IOC_CACHE_POLICY_COHERENT || p == KFD_IOC_CACHE_POLICY_NONCOHERENT;
    if !ok(a.default_policy) || !ok(a.alternate_policy) {
        return Err(Errno::EINVAL);
    }
    let gi = cx.pdd_index(a.gpu_id)?;
    // The kernel maps a failed bind to ESRCH here.
    cx.bound(gi).map_err(|_| Errno::ESRCH)?;
    cx.st.pdds[gi].policy = Some((
        a.default_policy,
        a.alternate_policy,
        a.alternate_aperture_base,
        a.alternate_aperture_size,
    ));
    Ok(())
}

fn set_scratch_backing_va(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlSetScratchBackingVaArgs = call.args();
    let gi = cx.pdd_index(a.gpu_id)?;
    cx.bound(gi)?;
    cx.st.pdds[gi].scratch_va = a.va_addr;
    Ok(())
}

fn set_trap_handler(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlSetTrapHandlerArgs = call.args();
    let gi = cx.pdd_index(a.gpu_id)?;
    cx.bound(gi).map_err(|_| Errno::ESRCH)?;
    cx.st.pdds[gi].trap = Some((a.tba_addr, a.tma_addr));
    Ok(())
}

/// GPUs that may run with XNACK on: the per-process-XNACK parts (GC 9.4.2/9.4.3+); other
/// SOC15 GPUs run with retry faults off (amdgpu's noretry default); pre-GFX9 GPUs don't count.
fn xnack_capable(gfx_target_version: u32) -> Option<bool> {
    match gfx_target_version {
        v if v < 90000 => None,
        90010 => Some(true),
        v if (90400..100000).contains(&v) => Some(true),
        _ => Some(false),
    }
}

fn set_xnack_mode(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlSetXnackModeArgs = call.args();
    if a.xnack_enabled < 0 {
        a.xnack_enabled = cx.st.xnack as i32;
        call.set_args(&a);
        return Ok(());
    }
    // The mode changes only while the process has no queues (also to the same value).
    if !cx.st.queues.is_empty() {
        log::debug!("sim kfd: SET_XNACK_MODE with user queues: EBUSY");
        return Err(Errno::EBUSY);
    }
    let want = a.xnack_enabled != 0;
    if want == cx.st.xnack {
        return Ok(());
    }
    if want
        && cx
            .shared()
            .gpus
            .iter()
            .any(|g| xnack_capable(g.preset.gfx_target_version) == Some(false))
    {
        return Err(Errno::EPERM);
    }
    cx.st.xnack = want;
    Ok(())
}

fn runtime_enable(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlRuntimeEnableArgs = call.args();
    if a.mode_mask & KFD_RUNTIME_ENABLE_MODE_ENABLE_MASK != 0 {
        if cx.st.runtime_enabled {
            return Err(Errno::EBUSY);
        }
        cx.st.runtime_enabled = true;
        cx.st.r_debug = a.r_debug;
    } else {
        cx.st.runtime_enabled = false;
        cx.st.r_debug = 0;
    }
    Ok(())
}

fn dbg_trap(cx: &mut Cx, _call: &mut IoctlCall) -> IoctlResult {
    if cx.st.secondary {
        return Err(Errno::EOPNOTSUPP);
    }
    // A kernel whose debugger is unavailable (no HWS scheduler) refuses every op with EINVAL.
    log::debug!("sim kfd: DBG_TRAP: debugger not supported");
    Err(Errno::EINVAL)
}

fn create_process(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    if cx.st.secondary {
        return Err(Errno::EINVAL);
    }
    // The fd now holds a fresh secondary context; what the fd's first context held is freed
    // (in kfdmux every open is already its own context, nothing else can reach it).
    free_all(cx);
    cx.st.secondary = true;
    if let Some(sd) = call.variant.arg {
        // The early draft returned the new context's PASID.
        let pasid = (cx.inner.id as u32 & 0xFFFF).max(1);
        sd.set(&mut call.arg, "pasid", pasid as u64);
    }
    log::info!("sim kfd ctx {}: now a secondary context", cx.inner.id);
    Ok(())
}

fn acquire_vm(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlAcquireVmArgs = call.args();
    let file = match cx.env.file_of_fd(&call.caller, a.drm_fd as i32) {
        Ok(f) => f,
        Err(_) => return Err(Errno::EINVAL), // fget failed
    };
    let gi = cx.pdd_index(a.gpu_id)?;
    let Some((FileKind::Render(ri), fid)) = file else {
        log::debug!(
            "sim kfd: ACQUIRE_VM fd {} is not a render node of ours: EINVAL",
            a.drm_fd
        );
        return Err(Errno::EINVAL);
    };
    match cx.st.pdds[gi].drm_file {
        Some(f) if f == fid => return Ok(()),
        Some(_) => return Err(Errno::EBUSY),
        None => {}
    }
    if ri as usize != gi {
        log::debug!("sim kfd: ACQUIRE_VM with the render node of GPU {ri} for GPU {gi}: EINVAL");
        return Err(Errno::EINVAL);
    }
    // The kernel also refuses a render file that is already another kfd process's compute VM.
    // The transports identify a render file only by its opener's tgid, so two render opens of
    // one process look alike and that check cannot be made here (docs/sim.md).
    cx.st.pdds[gi].drm_file = Some(fid);
    Ok(())
}

// ---- memory ---------------------------------------------------------------------------------

/// Size of a process's doorbell slice: 1024 queues × 8-byte doorbells on SOC15 (4 before).
pub(crate) fn doorbell_slice(gfx_target_version: u32) -> u64 {
    if gfx_target_version >= 90000 {
        8192
    } else {
        4096
    }
}

fn alloc_memory_of_gpu(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlAllocMemoryOfGpuArgs = call.args();
    let flags = a.flags;
    let is_userptr = flags & KFD_IOC_ALLOC_MEM_FLAGS_USERPTR != 0;
    if is_userptr && cx.st.secondary {
        log::debug!("sim kfd: USERPTR is not supported on a secondary context");
        return Err(Errno::EOPNOTSUPP);
    }
    if a.size == 0 {
        return Err(Errno::EINVAL);
    }
    // GPU VA (and, for USERPTR, CPU VA) already taken by SVM ranges.
    if cx.shared().cfg.svm
        && (cx.st.svm.overlaps_bytes(a.va_addr, a.size)
            || (is_userptr && cx.st.svm.overlaps_bytes(a.mmap_offset, a.size)))
    {
        log::debug!(
            "sim kfd: address {:#x} already allocated by SVM: EADDRINUSE",
            a.va_addr
        );
        return Err(Errno(libc::EADDRINUSE));
    }
    let gi = cx.pdd_index(a.gpu_id)?;
    cx.bound(gi)?;
    let gfx = cx.shared().gpus[gi].preset.gfx_target_version;
    if flags & KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL != 0 {
        if a.size != doorbell_slice(gfx) {
            return Err(Errno::EINVAL);
        }
    } else if flags & KFD_IOC_ALLOC_MEM_FLAGS_MMIO_REMAP != 0 && a.size != PAGE_SIZE {
        return Err(Errno::EINVAL);
    }
    let kind = if flags & KFD_IOC_ALLOC_MEM_FLAGS_VRAM != 0 {
        BoKind::Vram
    } else if flags & KFD_IOC_ALLOC_MEM_FLAGS_GTT != 0 {
        BoKind::Gtt
    } else if is_userptr {
        BoKind::Userptr
    } else if flags & KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL != 0 {
        BoKind::Doorbell
    } else if flags & KFD_IOC_ALLOC_MEM_FLAGS_MMIO_REMAP != 0 {
        BoKind::Mmio
    } else {
        return Err(Errno::EINVAL);
    };
    let size = page_align(a.size).ok_or(Errno::EINVAL)?;
    if size > (1u64 << 47) {
        return Err(Errno::ENOMEM);
    }
    let mut userptr = 0;
    if kind == BoKind::Userptr {
        // The kernel requires a non-zero address; an unaligned one is refused here too.
        if a.mmap_offset == 0 || !a.mmap_offset.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        userptr = a.mmap_offset;
    }
    // amdgpu_amdkfd_reserve_mem_limit: VRAM per GPU, GTT device-wide.
    match kind {
        BoKind::Vram => cx.shared().vram_reserve(gi, size).inspect_err(|_| {
            log::debug!("sim kfd: VRAM of GPU {gi} exhausted ({size:#x} bytes asked): ENOMEM");
        })?,
        BoKind::Gtt => cx.shared().gtt_reserve(size).inspect_err(|_| {
            log::debug!("sim kfd: GTT limit reached ({size:#x} bytes asked): ENOMEM");
        })?,
        _ => {}
    }
    let unreserve = |cx: &Cx| match kind {
        BoKind::Vram => cx.shared().vram_unreserve(gi, size),
        BoKind::Gtt => cx.shared().gtt_unreserve(size),
        _ => {}
    };
    // init_user_pages: every page of the range must be mapped in the caller (EFAULT).
    if kind == BoKind::Userptr {
        procmaps::require_mapped(call.caller.pid, userptr, size, "USERPTR range")?;
    }
    let mem_off = match kind {
        BoKind::Userptr => None,
        // The GPU's doorbell slice of this context (shared with its queues).
        BoKind::Doorbell => Some(queues::doorbell_slice_of(cx, gi)?),
        _ => match cx.inner.mem.alloc(size) {
            Ok(o) => Some(o),
            Err(e) => {
                unreserve(cx);
                return Err(e);
            }
        },
    };
    let bo = Bo {
        gpu: gi,
        kind,
        flags,
        va: a.va_addr,
        size,
        mem_off,
        userptr,
        mapped: vec![false; cx.st.pdds.len()],
        dmabuf: None,
        imported: false,
    };
    a.handle = match insert_bo(cx, a.gpu_id, gi, bo) {
        Ok(h) => h,
        Err(e) => {
            if let (Some(o), false) = (mem_off, kind == BoKind::Doorbell) {
                cx.inner.mem.free(o, size);
            }
            unreserve(cx);
            return Err(e);
        }
    };
    // Our own offsets into the process memfd; USERPTR buffers have none.
    a.mmap_offset = mem_off.unwrap_or(0);
    call.set_args(&a);
    Ok(())
}

/// Gives `bo` a handle of GPU `gi` (`gpu_id << 32 | lowest free id`) and counts it.
pub(crate) fn insert_bo(cx: &mut Cx, gpu_id: u32, gi: usize, bo: Bo) -> Result<u64, Errno> {
    // kfd_process_device_create_obj_handle failing is EFAULT in the kernel.
    let idr = cx.st.pdds[gi].idr.alloc(u32::MAX).ok_or(Errno::EFAULT)?;
    let handle = ((gpu_id as u64) << 32) | idr as u64;
    let sh = cx.shared();
    sh.stats.buffers.fetch_add(1, Ordering::Relaxed);
    sh.stats.buffer_bytes.fetch_add(bo.size, Ordering::Relaxed);
    cx.st.bos.insert(handle, bo);
    Ok(handle)
}

fn free_memory_of_gpu(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlFreeMemoryOfGpuArgs = call.args();
    if cx.st.ev.signal_handle() == Some(a.handle) {
        log::debug!("sim kfd: freeing the events page buffer is not allowed: EPERM");
        return Err(Errno::EPERM);
    }
    cx.pdd_index((a.handle >> 32) as u32)?;
    let bo = cx.st.bos.get(&a.handle).ok_or(Errno::EINVAL)?;
    if bo.map_count() > 0 {
        log::debug!("sim kfd: buffer {:#x} is still mapped: EBUSY", a.handle);
        return Err(Errno::EBUSY);
    }
    if let Some(bo) = cx.st.bos.remove(&a.handle) {
        drop_bo(cx, a.handle, bo);
    }
    Ok(())
}

/// The `device_ids_array_ptr` entries of a MAP/UNMAP call.
fn device_ids(call: &IoctlCall, n: u32) -> Result<Vec<u32>, Errno> {
    let raw = call.array("device_ids_array_ptr").ok_or(Errno::EFAULT)?;
    let n = n as usize;
    if raw.len() < n * 4 {
        return Err(Errno::EFAULT);
    }
    Ok(raw[..n * 4]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The top of a GPU VM (48-bit).
const VM_END: u64 = 1 << 48;

fn map_memory_to_gpu(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlMapMemoryToGpuArgs = call.args();
    if a.n_devices == 0 || a.n_success > a.n_devices {
        return Err(Errno::EINVAL);
    }
    let ids = device_ids(call, a.n_devices)?;
    let gi = cx.pdd_index((a.handle >> 32) as u32)?;
    cx.bound(gi)?;
    let Some(bo) = cx.st.bos.get(&a.handle) else {
        // The kernel answers an unknown handle here with ENOMEM.
        return Err(Errno::ENOMEM);
    };
    let (va, size) = (bo.va, bo.size);
    let mut result = Ok(());
    for (i, &id) in ids.iter().enumerate().skip(a.n_success as usize) {
        let pi = match cx.pdd_index(id).and_then(|pi| cx.bound(pi).map(|_| pi)) {
            Ok(pi) => pi,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        if cx.st.bos.get(&a.handle).is_some_and(|b| b.mapped[pi]) {
            a.n_success = i as u32 + 1;
            continue;
        }
        let end = va.checked_add(size).filter(|&e| e <= VM_END);
        let Some(end) = end.filter(|_| va.is_multiple_of(PAGE_SIZE)) else {
            result = Err(Errno::EINVAL);
            break;
        };
        let vm = &mut cx.st.pdds[pi].vm;
        let clash = vm.range(..end).next_back().filter(|(_, (e, _))| *e > va);
        if let Some((s, (e, h))) = clash {
            log::debug!("sim kfd: VA {va:#x}-{end:#x} conflicts with {s:#x}-{e:#x} (buffer {h:#x}) on GPU {pi}");
            result = Err(Errno::EINVAL);
            break;
        }
        vm.insert(va, (end, a.handle));
        if let Some(b) = cx.st.bos.get_mut(&a.handle) {
            b.mapped[pi] = true;
        }
        a.n_success = i as u32 + 1;
    }
    // n_success reports progress also on failure (the struct is copied out either way).
    call.set_args(&a);
    result
}

fn unmap_memory_from_gpu(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlUnmapMemoryFromGpuArgs = call.args();
    if a.n_devices == 0 || a.n_success > a.n_devices {
        return Err(Errno::EINVAL);
    }
    let ids = device_ids(call, a.n_devices)?;
    cx.pdd_index((a.handle >> 32) as u32)?;
    let Some(bo) = cx.st.bos.get(&a.handle) else {
        return Err(Errno::EINVAL);
    };
    let va = bo.va;
    let mut result = Ok(());
    for (i, &id) in ids.iter().enumerate().skip(a.n_success as usize) {
        let pi = match cx.pdd_index(id) {
            Ok(pi) => pi,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        let mapped = cx.st.bos.get(&a.handle).is_some_and(|b| b.mapped[pi]);
        if !mapped {
            // "the BO wasn't actually mapped"
            result = Err(Errno::EINVAL);
            break;
        }
        cx.st.pdds[pi].vm.remove(&va);
        if let Some(b) = cx.st.bos.get_mut(&a.handle) {
            b.mapped[pi] = false;
        }
        a.n_success = i as u32 + 1;
    }
    call.set_args(&a);
    result
}

// ---- queues and the rest -------------------------------------------------------------------

fn smi_events(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlSmiEventsArgs = call.args();
    let gi = cx.pdd_index(a.gpuid)?;
    if !cx.env.can_give_fd() {
        log::warn!(
            "sim kfd: SMI_EVENTS: {}: EOPNOTSUPP",
            crate::device::NO_FD_CHANNEL
        );
        return Err(Errno::EOPNOTSUPP);
    }
    let fd = cx
        .shared()
        .smi
        .open(cx.inner.id, gi, call.caller.tgid, call.caller.uid)?;
    // anon_inode_getfd(.., O_RDWR): no close-on-exec.
    a.anon_fd = cx
        .env
        .give_fd(&call.caller, fd, false, "sim kfd: SMI_EVENTS")?;
    call.set_args(&a);
    Ok(())
}

/// The pre-2019 debugger ioctls: mainline keeps the numbers and answers EPERM.
fn eperm(_cx: &mut Cx, _call: &mut IoctlCall) -> IoctlResult {
    Err(Errno::EPERM)
}

/// ROCm-DKMS-only numbers (0x80..): a mainline kernel has none of them.
fn dkms_only(_cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    log::debug!(
        "sim kfd: {} (nr {:#x}) exists only in ROCm's DKMS kernel: EINVAL",
        call.def.name,
        call.def.nr
    );
    Err(Errno::EINVAL)
}

fn not_implemented(_cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    log::warn!("sim kfd: {} is not implemented: ENOTTY", call.def.name);
    Err(Errno::ENOTTY)
}

#[cfg(test)]
mod tests {
    use super::IdAlloc;

    #[test]
    fn idalloc_lowest_free() {
        let mut a = IdAlloc::default();
        assert_eq!(
            (a.alloc(10), a.alloc(10), a.alloc(10)),
            (Some(0), Some(1), Some(2))
        );
        a.free(1);
        assert_eq!(a.alloc(10), Some(1));
        a.free(2);
        a.free(1);
        a.free(0);
        assert_eq!(a.next, 0);
        assert!(a.free.is_empty());
        assert_eq!(a.alloc(1), Some(0));
        assert_eq!(a.alloc(1), None, "the limit bounds the ids");
    }
}
