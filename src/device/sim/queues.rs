//! User-mode queues: CREATE/DESTROY/UPDATE_QUEUE, SET_CU_MASK, GET_QUEUE_WAVE_STATE and
//! ALLOC_QUEUE_GWS, validated as kfd_chardev.c, kfd_process_queue_manager.c and the HWS
//! device queue manager validate them. No queue runs: the sim has no command processor.
//!
//! Limits, in the kernel's order: 1024 queues per process and GPU (ENOSPC), 1024 queue ids
//! per process (ENOMEM), 4096 queues per GPU over all processes (EPERM, HWS), SDMA queue slots
//! per GPU (engines × queues per engine; ENOMEM), CP doorbells per process and GPU (the 8 KiB
//! SOC15 slice minus the range reserved for SDMA/other engines and its mirror; EBUSY).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use crate::abi::*;
use crate::device::IoctlCall;
use crate::errno::Errno;

use super::kfd::{doorbell_slice, Cx, IdAlloc};

/// KFD_MAX_NUM_OF_QUEUES_PER_PROCESS (also the doorbell ids of a process slice).
pub const MAX_QUEUES_PER_PROCESS: u32 = 1024;
/// The amdkfd `max_num_of_queues_per_device` default.
pub const MAX_QUEUES_PER_DEVICE: u32 = 4096;
/// KFD_MIN_QUEUE_RING_SIZE: smaller rings are raised to it (and the caller sees the new size).
pub const MIN_RING_SIZE: u32 = 1024;
/// x86-64 TASK_SIZE_MAX: `access_ok` refuses user pointers beyond it.
const TASK_SIZE_MAX: u64 = (1 << 47) - 4096;
/// KFD_QUEUE_DOORBELL_MIRROR_OFFSET (in doorbells).
const DOORBELL_MIRROR: u32 = 512;
/// SOC15 doorbells reserved for SDMA and other engines (vega20/navi layout, 64-bit units).
const NON_CP_FIRST: u32 = 0x100;
const NON_CP_LAST: u32 = 0x18F;
/// First doorbell of SDMA engine `e` is `SDMA_DOORBELL_BASE + SDMA_DOORBELL_STRIDE * e`.
const SDMA_DOORBELL_BASE: u32 = 0x100;
const SDMA_DOORBELL_STRIDE: u32 = 0xA;
/// Largest CU mask the kernel keeps (longer masks are cut).
const MAX_CU_MASK_BITS: u32 = 1024;
/// The kernel's ENOTSUPP (524), which leaks to user space for an unknown queue type.
pub const ENOTSUPP: Errno = Errno(524);

/// Per-GPU queue bookkeeping of the whole device.
#[derive(Debug, Default)]
pub struct DevQueues {
    /// Queues of all processes (HWS `total_queue_count`).
    pub total: u32,
    /// SDMA queue slots in use (`sdma_bitmap`): ids `0..engines*queues_per_engine`.
    pub sdma: BTreeSet<u32>,
    /// XGMI SDMA queue slots in use.
    pub xgmi: BTreeSet<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Compute,
    Sdma,
    SdmaXgmi,
}

#[derive(Debug)]
pub(crate) struct Queue {
    gpu: usize,
    kind: Kind,
    /// SDMA slot in the device's (xgmi) bitmap.
    sdma_id: Option<u32>,
    doorbell_id: u32,
    ring: u64,
    ring_size: u32,
    percent: u32,
    priority: u32,
    cu_mask: Vec<u32>,
    gws: bool,
}

impl Queue {
    /// `is_active`: a ring, a size and a share of the GPU.
    fn active(&self) -> bool {
        self.ring != 0 && self.ring_size > 0 && self.percent & 0xFF > 0
    }
}

/// A context's queues (ids are per process, lowest free first).
#[derive(Debug, Default)]
pub(crate) struct QueueState {
    queues: BTreeMap<u32, Queue>,
    ids: IdAlloc,
}

impl QueueState {
    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }
}

/// Per-GPU queue data of a context (part of the kernel's qpd).
#[derive(Debug, Default)]
pub(crate) struct PddQueues {
    /// The process's doorbell slice for this GPU (memfd offset, aligned to the slice size).
    pub db_slice: Option<u64>,
    /// CP doorbell ids in use.
    db_used: BTreeSet<u32>,
    count: u32,
    /// GWS assigned to a queue of this GPU.
    gws: bool,
}

/// `access_ok(addr, size)` on x86-64.
fn access_ok(addr: u64, size: u64) -> bool {
    size <= TASK_SIZE_MAX && addr <= TASK_SIZE_MAX - size
}

fn is_soc15(cx: &Cx, gi: usize) -> bool {
    cx.shared().gpus[gi].preset.gfx_target_version >= 90000
}

/// The context's doorbell slice on GPU `gi` (allocated on first use, like
/// kfd_alloc_process_doorbells). ENOMEM when the memfd is full.
pub(crate) fn doorbell_slice_of(cx: &mut Cx, gi: usize) -> Result<u64, Errno> {
    if let Some(o) = cx.st.pdds[gi].q.db_slice {
        return Ok(o);
    }
    let size = doorbell_slice(cx.shared().gpus[gi].preset.gfx_target_version);
    let off = cx.inner.mem.alloc_aligned(size, size)?;
    cx.st.pdds[gi].q.db_slice = Some(off);
    Ok(off)
}

/// Is `[addr, addr+len)` inside one buffer mapped in GPU `gi`'s VM?
fn mapped(cx: &Cx, gi: usize, addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len.max(1)) else {
        return false;
    };
    cx.st.pdds[gi]
        .vm
        .range(..=addr)
        .next_back()
        .is_some_and(|(_, (e, _))| *e >= end)
}

/// Does a mapping of GPU `gi` start exactly at `addr` and span at least `len` bytes?
fn mapping_starts_at(cx: &Cx, gi: usize, addr: u64, len: u64) -> bool {
    cx.st.pdds[gi]
        .vm
        .get(&addr)
        .is_some_and(|(e, _)| e - addr >= len)
}

/// `kfd_queue_acquire_buffers`: the queue's memory must be mapped on its GPU (EINVAL).
fn check_buffers(cx: &Cx, gi: usize, a: &KfdIoctlCreateQueueArgs, kind: Kind) -> Result<(), Errno> {
    let fail = |what: &str, addr: u64| {
        log::debug!("sim kfd: CREATE_QUEUE: {what} {addr:#x} is not mapped on GPU {gi}: EINVAL");
        Err(Errno::EINVAL)
    };
    if !mapped(cx, gi, a.write_pointer_address, 8) {
        return fail("write pointer", a.write_pointer_address);
    }
    if !mapped(cx, gi, a.read_pointer_address, 8) {
        return fail("read pointer", a.read_pointer_address);
    }
    if !mapping_starts_at(cx, gi, a.ring_base_address, a.ring_size as u64) {
        return fail("ring", a.ring_base_address);
    }
    if kind == Kind::Compute {
        if a.eop_buffer_address != 0
            && !mapped(cx, gi, a.eop_buffer_address, a.eop_buffer_size.max(1))
        {
            return fail("EOP buffer", a.eop_buffer_address);
        }
        if a.ctx_save_restore_address != 0
            && !mapped(
                cx,
                gi,
                a.ctx_save_restore_address,
                a.ctx_save_restore_size as u64,
            )
        {
            return fail("context save area", a.ctx_save_restore_address);
        }
    }
    Ok(())
}

/// `set_queue_properties_from_user`: the argument checks made before any lookup.
fn check_properties(cx: &Cx, a: &mut KfdIoctlCreateQueueArgs) -> Result<Kind, Errno> {
    if a.queue_percentage & 0xFF > KFD_MAX_QUEUE_PERCENTAGE {
        return Err(Errno::EINVAL);
    }
    if a.queue_priority > KFD_MAX_QUEUE_PRIORITY {
        return Err(Errno::EINVAL);
    }
    if a.ring_base_address != 0 && !access_ok(a.ring_base_address, 8) {
        return Err(Errno::EFAULT);
    }
    if a.ring_size != 0 && !a.ring_size.is_power_of_two() {
        return Err(Errno::EINVAL);
    }
    if a.ring_size < MIN_RING_SIZE {
        a.ring_size = MIN_RING_SIZE;
    }
    if !access_ok(a.read_pointer_address, 4) || !access_ok(a.write_pointer_address, 4) {
        return Err(Errno::EFAULT);
    }
    if a.eop_buffer_address != 0 && !access_ok(a.eop_buffer_address, 4) {
        return Err(Errno::EFAULT);
    }
    if a.ctx_save_restore_address != 0 && !access_ok(a.ctx_save_restore_address, 4) {
        return Err(Errno::EFAULT);
    }
    match a.queue_type {
        KFD_IOC_QUEUE_TYPE_COMPUTE | KFD_IOC_QUEUE_TYPE_COMPUTE_AQL => Ok(Kind::Compute),
        KFD_IOC_QUEUE_TYPE_SDMA => Ok(Kind::Sdma),
        KFD_IOC_QUEUE_TYPE_SDMA_XGMI => Ok(Kind::SdmaXgmi),
        // SDMA by engine id arrived with KFD 1.17.
        KFD_IOC_QUEUE_TYPE_SDMA_BY_ENG_ID if cx.shared().cfg.kfd_minor >= 17 => Ok(Kind::Sdma),
        t => {
            log::debug!("sim kfd: CREATE_QUEUE: queue type {t}: ENOTSUPP");
            Err(ENOTSUPP)
        }
    }
}

pub(crate) fn create_queue(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let mut a: KfdIoctlCreateQueueArgs = call.args();
    let r = create(cx, &mut a);
    // The struct goes back either way (the clamped ring size, the ids on success).
    call.set_args(&a);
    r
}

fn create(cx: &mut Cx, a: &mut KfdIoctlCreateQueueArgs) -> Result<(), Errno> {
    let kind = check_properties(cx, a)?;
    let gi = cx.pdd_index(a.gpu_id)?;
    // The kernel answers a failed bind with ESRCH here.
    cx.bound(gi).map_err(|_| Errno::ESRCH)?;
    let preset = cx.shared().gpus[gi].preset;
    let by_engine = a.queue_type == KFD_IOC_QUEUE_TYPE_SDMA_BY_ENG_ID;
    if by_engine && a.sdma_engine_id >= preset.num_sdma_engines + preset.num_sdma_xgmi_engines {
        return Err(Errno::EINVAL);
    }
    let slice = doorbell_slice_of(cx, gi)?;
    check_buffers(cx, gi, a, kind)?;
    // pqm_create_queue
    if cx.st.pdds[gi].q.count >= MAX_QUEUES_PER_PROCESS {
        return Err(Errno::ENOSPC);
    }
    let Some(qid) = cx.st.queues.ids.alloc(MAX_QUEUES_PER_PROCESS) else {
        log::debug!("sim kfd: no more queue ids in this process: ENOMEM");
        return Err(Errno::ENOMEM);
    };
    let soc15 = is_soc15(cx, gi);
    let r = (|| {
        let mut dq = cx.shared().dev_queues[gi]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if dq.total >= MAX_QUEUES_PER_DEVICE {
            log::warn!("sim kfd: GPU {gi} already has {} queues: EPERM", dq.total);
            return Err(Errno::EPERM);
        }
        // allocate_sdma_queue
        let (engines, per_engine) = (preset.num_sdma_engines, preset.num_sdma_queues_per_engine);
        let xgmi_engines = preset.num_sdma_xgmi_engines;
        let sdma = match kind {
            Kind::Compute => None,
            Kind::Sdma if by_engine => {
                // One engine's slots: engine e owns ids e, e+engines, …
                let (set, n, e) = if a.sdma_engine_id < engines {
                    (&mut dq.sdma, engines, a.sdma_engine_id)
                } else {
                    (&mut dq.xgmi, xgmi_engines, a.sdma_engine_id - engines)
                };
                let id = (0..per_engine)
                    .map(|q| e + q * n)
                    .find(|id| !set.contains(id))
                    .ok_or(Errno::ENOMEM)?;
                set.insert(id);
                Some((a.sdma_engine_id >= engines, id, a.sdma_engine_id, id / n))
            }
            Kind::Sdma | Kind::SdmaXgmi => {
                let xgmi = kind == Kind::SdmaXgmi;
                let (set, n) = if xgmi {
                    (&mut dq.xgmi, xgmi_engines)
                } else {
                    (&mut dq.sdma, engines)
                };
                let id = (0..n * per_engine)
                    .find(|id| !set.contains(id))
                    .ok_or_else(|| {
                        log::debug!("sim kfd: no free SDMA queue on GPU {gi}: ENOMEM");
                        Errno::ENOMEM
                    })?;
                set.insert(id);
                let engine = id % n + if xgmi { engines } else { 0 };
                Some((xgmi, id, engine, id / n))
            }
        };
        dq.total += 1;
        Ok(sdma)
    })();
    let sdma = match r {
        Ok(s) => s,
        Err(e) => {
            cx.st.queues.ids.free(qid);
            return Err(e);
        }
    };
    // allocate_doorbell
    let q = &mut cx.st.pdds[gi].q;
    let doorbell_id = if !soc15 {
        Some(qid)
    } else if let Some((_, _, engine, queue)) = sdma {
        Some(
            SDMA_DOORBELL_BASE
                + SDMA_DOORBELL_STRIDE * engine
                + (queue & 1) * DOORBELL_MIRROR
                + (queue >> 1),
        )
    } else {
        let reserved = |i: u32| {
            (NON_CP_FIRST..=NON_CP_LAST).contains(&(i % DOORBELL_MIRROR)) && i < 2 * DOORBELL_MIRROR
        };
        let id = (0..MAX_QUEUES_PER_PROCESS).find(|i| !reserved(*i) && !q.db_used.contains(i));
        if let Some(id) = id {
            q.db_used.insert(id);
        }
        id
    };
    let Some(doorbell_id) = doorbell_id else {
        log::debug!("sim kfd: no free doorbell on GPU {gi}: EBUSY");
        release_slots(cx, gi, sdma.map(|(x, id, _, _)| (x, id)));
        cx.st.queues.ids.free(qid);
        return Err(Errno::EBUSY);
    };
    cx.st.pdds[gi].q.count += 1;
    cx.st.queues.queues.insert(
        qid,
        Queue {
            gpu: gi,
            kind,
            sdma_id: sdma.map(|(x, id, _, _)| id | if x { 1 << 31 } else { 0 }),
            doorbell_id,
            ring: a.ring_base_address,
            ring_size: a.ring_size,
            percent: a.queue_percentage,
            priority: a.queue_priority,
            cu_mask: Vec::new(),
            gws: false,
        },
    );
    cx.shared().stats.queues.fetch_add(1, Ordering::Relaxed);
    a.queue_id = qid;
    // Our own mmap offset of the slice; SOC15 adds the doorbell's byte offset inside it.
    a.doorbell_offset = slice + if soc15 { doorbell_id as u64 * 8 } else { 0 };
    log::debug!(
        "sim kfd ctx {}: queue {qid} ({:?}) on GPU {gi}, doorbell {doorbell_id}",
        cx.inner.id,
        kind
    );
    Ok(())
}

/// Returns a queue's device-wide slots (total count and SDMA slot).
fn release_slots(cx: &Cx, gi: usize, sdma: Option<(bool, u32)>) {
    let mut dq = cx.shared().dev_queues[gi]
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    dq.total = dq.total.saturating_sub(1);
    match sdma {
        Some((true, id)) => {
            dq.xgmi.remove(&id);
        }
        Some((false, id)) => {
            dq.sdma.remove(&id);
        }
        None => {}
    }
}

fn destroy(cx: &mut Cx, qid: u32) -> Option<()> {
    let q = cx.st.queues.queues.remove(&qid)?;
    cx.st.queues.ids.free(qid);
    let gi = q.gpu;
    let sdma = q.sdma_id.map(|v| (v & (1 << 31) != 0, v & !(1 << 31)));
    release_slots(cx, gi, sdma);
    let pq = &mut cx.st.pdds[gi].q;
    pq.count = pq.count.saturating_sub(1);
    if q.kind == Kind::Compute {
        pq.db_used.remove(&q.doorbell_id);
    }
    if q.gws {
        pq.gws = false;
    }
    cx.shared().stats.queues.fetch_sub(1, Ordering::Relaxed);
    Some(())
}

pub(crate) fn destroy_queue(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let a: KfdIoctlDestroyQueueArgs = call.args();
    destroy(cx, a.queue_id).ok_or_else(|| {
        log::debug!(
            "sim kfd: DESTROY_QUEUE of unknown queue {}: EINVAL",
            a.queue_id
        );
        Errno::EINVAL
    })
}

/// Destroys every queue of the context (release, CREATE_PROCESS) and frees the doorbell slices.
pub(crate) fn free_all(cx: &mut Cx) {
    let ids: Vec<u32> = cx.st.queues.queues.keys().copied().collect();
    for qid in ids {
        destroy(cx, qid);
    }
    for gi in 0..cx.st.pdds.len() {
        if let Some(off) = cx.st.pdds[gi].q.db_slice.take() {
            let size = doorbell_slice(cx.shared().gpus[gi].preset.gfx_target_version);
            cx.inner.mem.free(off, size);
        }
    }
}

pub(crate) fn update_queue(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let a: KfdIoctlUpdateQueueArgs = call.args();
    if a.queue_percentage & 0xFF > KFD_MAX_QUEUE_PERCENTAGE
        || a.queue_priority > KFD_MAX_QUEUE_PRIORITY
    {
        return Err(Errno::EINVAL);
    }
    if a.ring_base_address != 0 && !access_ok(a.ring_base_address, 8) {
        return Err(Errno::EFAULT);
    }
    if a.ring_size != 0 && !a.ring_size.is_power_of_two() {
        return Err(Errno::EINVAL);
    }
    let Some(q) = cx.st.queues.queues.get(&a.queue_id) else {
        log::debug!(
            "sim kfd: UPDATE_QUEUE of unknown queue {}: EFAULT",
            a.queue_id
        );
        return Err(Errno::EFAULT);
    };
    // A new ring must be mapped like the first one (EINVAL otherwise).
    let gi = q.gpu;
    if a.ring_base_address != 0
        && a.ring_base_address != q.ring
        && !mapping_starts_at(cx, gi, a.ring_base_address, a.ring_size as u64)
    {
        log::debug!(
            "sim kfd: UPDATE_QUEUE: ring {:#x} is not mapped on GPU {gi}: EINVAL",
            a.ring_base_address
        );
        return Err(Errno::EINVAL);
    }
    if let Some(q) = cx.st.queues.queues.get_mut(&a.queue_id) {
        q.ring = a.ring_base_address;
        q.ring_size = a.ring_size;
        q.percent = a.queue_percentage;
        q.priority = a.queue_priority;
    }
    Ok(())
}

pub(crate) fn set_cu_mask(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let a: KfdIoctlSetCuMaskArgs = call.args();
    if a.num_cu_mask == 0 || !a.num_cu_mask.is_multiple_of(32) {
        return Err(Errno::EINVAL);
    }
    let words = (a.num_cu_mask.min(MAX_CU_MASK_BITS) / 32) as usize;
    let raw = call.array("cu_mask_ptr").ok_or(Errno::EFAULT)?;
    if raw.len() < words * 4 {
        return Err(Errno::EFAULT);
    }
    let mask: Vec<u32> = raw[..words * 4]
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let Some(q) = cx.st.queues.queues.get_mut(&a.queue_id) else {
        return Err(Errno::EFAULT);
    };
    q.cu_mask = mask;
    Ok(())
}

pub(crate) fn get_queue_wave_state(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let mut a: KfdIoctlGetQueueWaveStateArgs = call.args();
    let Some(q) = cx.st.queues.queues.get(&a.queue_id) else {
        return Err(Errno::EFAULT);
    };
    // Only an inactive compute queue has a saved state to report.
    if q.kind != Kind::Compute || q.active() {
        return Err(Errno::EINVAL);
    }
    // It never ran: no control stack, no saved waves.
    a.ctl_stack_used_size = 0;
    a.save_area_used_size = 0;
    call.set_args(&a);
    Ok(())
}

pub(crate) fn alloc_queue_gws(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    let mut a: KfdIoctlAllocQueueGwsArgs = call.args();
    let r = (|| {
        let q = cx.st.queues.queues.get(&a.queue_id).ok_or(Errno::EINVAL)?;
        let gi = q.gpu;
        if cx.shared().gpus[gi].preset.num_gws == 0 {
            return Err(Errno::ENODEV);
        }
        let want = a.num_gws != 0;
        let has = cx.st.pdds[gi].q.gws;
        // One queue per process and GPU may hold the GWS.
        if want && has {
            return Err(Errno::EBUSY);
        }
        if !want && !has {
            return Err(Errno::EINVAL);
        }
        cx.st.pdds[gi].q.gws = want;
        if let Some(q) = cx.st.queues.queues.get_mut(&a.queue_id) {
            q.gws = want;
        }
        Ok(())
    })();
    a.first_gws = 0;
    call.set_args(&a);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_ok_bounds() {
        assert!(access_ok(0, 8), "NULL passes access_ok");
        assert!(access_ok(TASK_SIZE_MAX - 8, 8));
        assert!(!access_ok(TASK_SIZE_MAX - 7, 8));
        assert!(!access_ok(u64::MAX, 1));
    }
}
