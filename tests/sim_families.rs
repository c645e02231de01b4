//! The sim's ioctl families against the kernel's errnos and outputs: queues, SVM, dma-buf,
//! memory accounting (GTT, doorbells) and the SVM switch. Driven directly (no transport); the
//! caller is this test process, so address-space checks see real mappings.

#[path = "sim_helpers.rs"]
mod sim_helpers;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Arc;

use kfdmux::abi::*;
use kfdmux::device::sim::SimConfig;
use kfdmux::device::{Device, DeviceContext};
use kfdmux::errno::Errno;
use sim_helpers::*;
use zerocopy::IntoBytes;

const PAGE: u64 = 4096;
const GTT: u32 = KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
const VRAM: u32 = KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
const ENOTSUPP: Errno = Errno(524);
const EADDRINUSE: Errno = Errno(libc::EADDRINUSE);

/// A kfd context with the VM of every GPU acquired (render fds 10+i, file ids 100+i).
fn setup(h: &Harness) -> Box<dyn DeviceContext> {
    let ctx = h.open_kfd();
    h.acquire_all(&*ctx);
    ctx
}

fn alloc(
    h: &Harness,
    ctx: &dyn DeviceContext,
    gpu: usize,
    flags: u32,
    size: u64,
    va: u64,
) -> Result<KfdIoctlAllocMemoryOfGpuArgs, Errno> {
    let mut a = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: va,
        size,
        handle: 0,
        mmap_offset: 0,
        gpu_id: h.gpu_id(gpu),
        flags,
    };
    h.io0(ctx, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut a)
        .map(|_| a)
}

fn map(h: &Harness, ctx: &dyn DeviceContext, handle: u64, gpus: &[usize]) -> Result<(), Errno> {
    let ids: Vec<u32> = gpus.iter().map(|g| h.gpu_id(*g)).collect();
    let mut a = KfdIoctlMapMemoryToGpuArgs {
        handle,
        device_ids_array_ptr: 0x1000,
        n_devices: ids.len() as u32,
        n_success: 0,
    };
    h.io(
        ctx,
        AMDKFD_IOC_MAP_MEMORY_TO_GPU,
        &mut a,
        vec![("device_ids_array_ptr", u32s(&ids))],
    )
    .0
}

/// Allocates and maps a GTT buffer at `va` on GPU `gpu`; returns its handle.
fn mapped_gtt(h: &Harness, ctx: &dyn DeviceContext, gpu: usize, size: u64, va: u64) -> u64 {
    let a = alloc(h, ctx, gpu, GTT, size, va).expect("alloc");
    map(h, ctx, a.handle, &[gpu]).expect("map");
    a.handle
}

fn memfd(h: &Harness) -> File {
    let pm = h.dev.process_memory(tgid()).unwrap();
    File::from(pm.backing_fd().try_clone_to_owned().unwrap())
}

// ---- queues ----------------------------------------------------------------------------

const RING: u64 = 0x10_0000;
const PTRS: u64 = 0x20_0000;
const EOP: u64 = 0x30_0000;
const CWSR: u64 = 0x40_0000;

/// A context whose GPU 0 has a ring (64 KiB), a pointer page, an EOP buffer and a save area mapped.
fn queue_setup(h: &Harness) -> Box<dyn DeviceContext> {
    let ctx = setup(h);
    mapped_gtt(h, &*ctx, 0, 0x10000, RING);
    mapped_gtt(h, &*ctx, 0, PAGE, PTRS);
    mapped_gtt(h, &*ctx, 0, PAGE, EOP);
    mapped_gtt(h, &*ctx, 0, 0x10_0000, CWSR);
    ctx
}

fn queue_args(h: &Harness, ty: u32) -> KfdIoctlCreateQueueArgs {
    let mut a = KfdIoctlCreateQueueArgs::new_zeroed();
    a.ring_base_address = RING;
    a.write_pointer_address = PTRS + 0x38;
    a.read_pointer_address = PTRS + 0x80;
    a.ring_size = 0x10000;
    a.gpu_id = h.gpu_id(0);
    a.queue_type = ty;
    a.queue_percentage = 100;
    a.queue_priority = 7;
    a.eop_buffer_address = EOP;
    a.eop_buffer_size = PAGE;
    a.ctx_save_restore_address = CWSR;
    a.ctx_save_restore_size = 0x1000;
    a
}

fn create_q(
    h: &Harness,
    ctx: &dyn DeviceContext,
    a: &mut KfdIoctlCreateQueueArgs,
) -> Result<(), Errno> {
    h.io0(ctx, AMDKFD_IOC_CREATE_QUEUE, a)
}

fn destroy_q(h: &Harness, ctx: &dyn DeviceContext, id: u32) -> Result<(), Errno> {
    h.io0(
        ctx,
        AMDKFD_IOC_DESTROY_QUEUE,
        &mut KfdIoctlDestroyQueueArgs {
            queue_id: id,
            pad: 0,
        },
    )
}

#[test]
fn queues_create_validate_and_doorbells() {
    let h = Harness::new("gfx90a:2");
    let ctx = queue_setup(&h);
    let mut a = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE_AQL);
    assert_eq!(create_q(&h, &*ctx, &mut a), Ok(()));
    assert_eq!(a.queue_id, 0);
    let slice = a.doorbell_offset & !8191;
    assert_eq!(
        a.doorbell_offset, slice,
        "doorbell 0 sits at the slice start"
    );
    assert!(slice != 0 && slice.is_multiple_of(8192));
    let mut b = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE);
    assert_eq!(create_q(&h, &*ctx, &mut b), Ok(()));
    assert_eq!((b.queue_id, b.doorbell_offset), (1, slice + 8));
    // A DOORBELL buffer shows the same slice.
    let db = alloc(
        &h,
        &*ctx,
        0,
        KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL,
        8192,
        0x90_0000,
    )
    .unwrap();
    assert_eq!(db.mmap_offset, slice);
    // SDMA queues get the engines' static doorbells: engine 0 queue 0, then engine 1 queue 0.
    let mut s0 = queue_args(&h, KFD_IOC_QUEUE_TYPE_SDMA);
    assert_eq!(create_q(&h, &*ctx, &mut s0), Ok(()));
    assert_eq!((s0.queue_id, s0.doorbell_offset), (2, slice + 0x100 * 8));
    let mut s1 = queue_args(&h, KFD_IOC_QUEUE_TYPE_SDMA);
    assert_eq!(create_q(&h, &*ctx, &mut s1), Ok(()));
    assert_eq!(s1.doorbell_offset, slice + 0x10A * 8);
    // Small rings are raised to 1024 bytes, and the caller sees it.
    let mut small = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE_AQL);
    small.ring_size = 0;
    assert_eq!(create_q(&h, &*ctx, &mut small), Ok(()));
    assert_eq!(small.ring_size, 1024);
    assert_eq!(h.stat("queues"), 5);

    // Refusals, in the kernel's order.
    let bad = |f: &dyn Fn(&mut KfdIoctlCreateQueueArgs)| {
        let mut a = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE_AQL);
        f(&mut a);
        create_q(&h, &*ctx, &mut a)
    };
    assert_eq!(bad(&|a| a.queue_percentage = 101), Err(Errno::EINVAL));
    assert_eq!(bad(&|a| a.queue_priority = 16), Err(Errno::EINVAL));
    assert_eq!(bad(&|a| a.ring_size = 3000), Err(Errno::EINVAL));
    assert_eq!(
        bad(&|a| a.ring_base_address = 0x7fff_ffff_f000),
        Err(Errno::EFAULT)
    );
    assert_eq!(
        bad(&|a| a.read_pointer_address = u64::MAX - 8),
        Err(Errno::EFAULT)
    );
    assert_eq!(bad(&|a| a.queue_type = 7), Err(ENOTSUPP));
    assert_eq!(
        bad(&|a| a.queue_type = KFD_IOC_QUEUE_TYPE_SDMA_BY_ENG_ID),
        Err(ENOTSUPP),
        "SDMA by engine id is KFD 1.17"
    );
    assert_eq!(bad(&|a| a.gpu_id = 77), Err(Errno::EINVAL));
    assert_eq!(
        bad(&|a| a.ring_base_address = 0x80_0000),
        Err(Errno::EINVAL),
        "ring not mapped"
    );
    assert_eq!(
        bad(&|a| a.ring_base_address = RING + PAGE),
        Err(Errno::EINVAL),
        "ring must start its mapping"
    );
    assert_eq!(
        bad(&|a| a.write_pointer_address = 0x80_0000),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        bad(&|a| a.gpu_id = h.gpu_id(1)),
        Err(Errno::EINVAL),
        "the buffers are mapped on GPU 0 only"
    );
    // A GPU whose VM was not acquired.
    let fresh = h.open_kfd();
    let mut a = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE_AQL);
    assert_eq!(create_q(&h, &*fresh, &mut a), Err(Errno::ESRCH));
    assert_eq!(h.stat("queues"), 5, "failed creates leave nothing behind");

    // DESTROY: the id is reused lowest-first.
    assert_eq!(destroy_q(&h, &*ctx, 1), Ok(()));
    assert_eq!(destroy_q(&h, &*ctx, 1), Err(Errno::EINVAL));
    let mut c = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE);
    assert_eq!(create_q(&h, &*ctx, &mut c), Ok(()));
    assert_eq!((c.queue_id, c.doorbell_offset), (1, slice + 8));
    drop(ctx);
    assert_eq!(h.stat("queues"), 0, "release destroys the queues");
}

#[test]
fn queue_update_cu_mask_wave_state_gws_and_xnack() {
    let h = Harness::new("gfx90a");
    let ctx = queue_setup(&h);
    let mut a = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE_AQL);
    create_q(&h, &*ctx, &mut a).unwrap();
    let mut sd = queue_args(&h, KFD_IOC_QUEUE_TYPE_SDMA);
    create_q(&h, &*ctx, &mut sd).unwrap();
    let q = a.queue_id;

    // UPDATE_QUEUE
    let upd = |id: u32, f: &dyn Fn(&mut KfdIoctlUpdateQueueArgs)| {
        let mut u = KfdIoctlUpdateQueueArgs::new_zeroed();
        u.queue_id = id;
        u.ring_base_address = RING;
        u.ring_size = 0x10000;
        u.queue_percentage = 100;
        f(&mut u);
        h.io0(&*ctx, AMDKFD_IOC_UPDATE_QUEUE, &mut u)
    };
    assert_eq!(upd(q, &|_| {}), Ok(()));
    assert_eq!(upd(99, &|_| {}), Err(Errno::EFAULT));
    assert_eq!(upd(q, &|u| u.queue_percentage = 101), Err(Errno::EINVAL));
    assert_eq!(upd(q, &|u| u.queue_priority = 16), Err(Errno::EINVAL));
    assert_eq!(upd(q, &|u| u.ring_size = 100), Err(Errno::EINVAL));
    assert_eq!(
        upd(q, &|u| u.ring_base_address = 0x80_0000),
        Err(Errno::EINVAL)
    );

    // SET_CU_MASK
    let cu = |id: u32, bits: u32| {
        let mut m = KfdIoctlSetCuMaskArgs {
            queue_id: id,
            num_cu_mask: bits,
            cu_mask_ptr: 0x1000,
        };
        h.io0(&*ctx, AMDKFD_IOC_SET_CU_MASK, &mut m)
    };
    assert_eq!(cu(q, 0), Err(Errno::EINVAL));
    assert_eq!(cu(q, 33), Err(Errno::EINVAL));
    assert_eq!(cu(99, 64), Err(Errno::EFAULT));
    assert_eq!(cu(q, 64), Ok(()));

    // GET_QUEUE_WAVE_STATE: only an inactive compute queue has one.
    let ws = |id: u32| {
        let mut w = KfdIoctlGetQueueWaveStateArgs::new_zeroed();
        w.queue_id = id;
        w.ctl_stack_used_size = 77;
        let r = h.io0(&*ctx, AMDKFD_IOC_GET_QUEUE_WAVE_STATE, &mut w);
        (r, w.ctl_stack_used_size, w.save_area_used_size)
    };
    assert_eq!(ws(99).0, Err(Errno::EFAULT));
    assert_eq!(ws(q).0, Err(Errno::EINVAL), "active queue");
    assert_eq!(ws(sd.queue_id).0, Err(Errno::EINVAL), "SDMA queue");
    assert_eq!(upd(q, &|u| u.queue_percentage = 0), Ok(()));
    assert_eq!(ws(q), (Ok(()), 0, 0));

    // ALLOC_QUEUE_GWS: one queue per process and GPU.
    let gws = |id: u32, n: u32| {
        let mut g = KfdIoctlAllocQueueGwsArgs {
            queue_id: id,
            num_gws: n,
            first_gws: 55,
            pad: 0,
        };
        let r = h.io0(&*ctx, AMDKFD_IOC_ALLOC_QUEUE_GWS, &mut g);
        (r, g.first_gws)
    };
    assert_eq!(gws(99, 1).0, Err(Errno::EINVAL));
    assert_eq!(gws(q, 0).0, Err(Errno::EINVAL), "nothing to release");
    assert_eq!(gws(q, 1), (Ok(()), 0));
    assert_eq!(gws(sd.queue_id, 1).0, Err(Errno::EBUSY));
    assert_eq!(gws(q, 0), (Ok(()), 0));

    // SET_XNACK_MODE changes (or even re-sets) only without queues; a query always works.
    let xn = |v: i32| {
        let mut x = KfdIoctlSetXnackModeArgs { xnack_enabled: v };
        let r = h.io0(&*ctx, AMDKFD_IOC_SET_XNACK_MODE, &mut x);
        (r, x.xnack_enabled)
    };
    assert_eq!(xn(1).0, Err(Errno::EBUSY));
    assert_eq!(xn(0).0, Err(Errno::EBUSY));
    assert_eq!(xn(-1), (Ok(()), 0));
    destroy_q(&h, &*ctx, q).unwrap();
    destroy_q(&h, &*ctx, sd.queue_id).unwrap();
    assert_eq!(xn(1).0, Ok(()));
    assert_eq!(xn(-1), (Ok(()), 1));
}

#[test]
fn queue_limits_doorbells_ids_sdma_and_device() {
    let h = Harness::new("gfx90a:2");
    // SDMA: engines × queues per engine slots per GPU (ENOMEM), XGMI likewise.
    let ctx = queue_setup(&h);
    let p = h.dev.gpus()[0].preset;
    let mut n = 0;
    loop {
        let mut a = queue_args(&h, KFD_IOC_QUEUE_TYPE_SDMA);
        match create_q(&h, &*ctx, &mut a) {
            Ok(()) => n += 1,
            Err(e) => {
                assert_eq!(e, Errno::ENOMEM);
                break;
            }
        }
    }
    assert_eq!(n, p.num_sdma_engines * p.num_sdma_queues_per_engine);
    let mut x = queue_args(&h, KFD_IOC_QUEUE_TYPE_SDMA_XGMI);
    assert_eq!(create_q(&h, &*ctx, &mut x), Ok(()));
    drop(ctx);

    // CP doorbells: 1024 per slice minus the 2 × 144 reserved for other engines → EBUSY.
    let ctx = queue_setup(&h);
    mapped_gtt(&h, &*ctx, 1, 0x10000, RING);
    mapped_gtt(&h, &*ctx, 1, PAGE, PTRS);
    mapped_gtt(&h, &*ctx, 1, PAGE, EOP);
    mapped_gtt(&h, &*ctx, 1, 0x10_0000, CWSR);
    let fill = |ctx: &dyn DeviceContext, gpu: usize| -> (u32, Errno) {
        let mut n = 0;
        loop {
            let mut a = queue_args(&h, KFD_IOC_QUEUE_TYPE_COMPUTE_AQL);
            a.gpu_id = h.gpu_id(gpu);
            match create_q(&h, ctx, &mut a) {
                Ok(()) => n += 1,
                Err(e) => return (n, e),
            }
        }
    };
    assert_eq!(fill(&*ctx, 0), (736, Errno::EBUSY));
    // Queue ids are per process: 1024 in all → ENOMEM on the second GPU.
    assert_eq!(fill(&*ctx, 1), (1024 - 736, Errno::ENOMEM));
    drop(ctx);
    assert_eq!(h.stat("queues"), 0);

    // 4096 queues per GPU over all processes (HWS) → EPERM.
    let mut ctxs = Vec::new();
    let mut total = 0;
    let last = loop {
        let c = queue_setup(&h);
        let (n, e) = fill(&*c, 0);
        total += n;
        ctxs.push(c);
        if e != Errno::EBUSY {
            break e;
        }
    };
    assert_eq!((total, last), (4096, Errno::EPERM));
    ctxs.pop();
    let c = queue_setup(&h);
    assert!(fill(&*c, 0).0 > 0, "released queues free device slots");
}

// ---- memory: GTT accounting, doorbells --------------------------------------------------

#[test]
fn gtt_is_accounted_device_wide() {
    let h = Harness::with_config(
        "gfx90a:2",
        SimConfig {
            gtt_bytes: 4 * PAGE,
            ..Default::default()
        },
    );
    let a = setup(&h);
    let b = setup(&h);
    let x = alloc(&h, &*a, 0, GTT, 3 * PAGE, 0x10_0000).unwrap();
    assert_eq!(h.dev.gtt_usage(), (3 * PAGE, 4 * PAGE));
    assert_eq!(
        alloc(&h, &*b, 1, GTT, 2 * PAGE, 0x10_0000).err(),
        Some(Errno::ENOMEM),
        "the limit spans GPUs and contexts"
    );
    assert!(alloc(&h, &*b, 1, GTT, PAGE, 0x10_0000).is_ok());
    // VRAM does not count against GTT.
    assert!(alloc(&h, &*b, 1, VRAM, 8 * PAGE, 0x20_0000).is_ok());
    h.io0(
        &*a,
        AMDKFD_IOC_FREE_MEMORY_OF_GPU,
        &mut KfdIoctlFreeMemoryOfGpuArgs { handle: x.handle },
    )
    .unwrap();
    assert_eq!(h.stat("gtt_used"), PAGE);
    drop(b);
    assert_eq!(h.stat("gtt_used"), 0);
}

// ---- SVM -------------------------------------------------------------------------------

fn svm_call(
    h: &Harness,
    ctx: &dyn DeviceContext,
    op: u32,
    start: u64,
    size: u64,
    attrs: &[(u32, u32)],
) -> (Result<(), Errno>, Vec<(u32, u32)>) {
    let hdr = KfdIoctlSvmArgs {
        start_addr: start,
        size,
        op,
        nattr: attrs.len() as u32,
    };
    let mut bytes = hdr.as_bytes().to_vec();
    for (t, v) in attrs {
        bytes.extend_from_slice(&t.to_le_bytes());
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let cmd = AMDKFD_IOC_SVM + (((attrs.len() * 8) as u32) << 16);
    let r = h.call(ctx, make_call(cmd, &bytes, vec![], h.caller));
    let out = r.call.arg[24..24 + 8 * attrs.len()]
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_le_bytes(c[..4].try_into().unwrap()),
                u32::from_le_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect();
    (r.result, out)
}

const SET: u32 = KFD_IOCTL_SVM_OP_SET_ATTR;
const GET: u32 = KFD_IOCTL_SVM_OP_GET_ATTR;
const PREF: u32 = KFD_IOCTL_SVM_ATTR_PREFERRED_LOC;
const ACCESS: u32 = KFD_IOCTL_SVM_ATTR_ACCESS;
const SETF: u32 = KFD_IOCTL_SVM_ATTR_SET_FLAGS;
const CLRF: u32 = KFD_IOCTL_SVM_ATTR_CLR_FLAGS;
const GRAN: u32 = KFD_IOCTL_SVM_ATTR_GRANULARITY;
const UNDEF: u32 = KFD_IOCTL_SVM_LOCATION_UNDEFINED;
const HOST_COH: u32 = KFD_IOCTL_SVM_FLAG_HOST_ACCESS | KFD_IOCTL_SVM_FLAG_COHERENT;

#[test]
fn svm_set_split_and_get_mixed_ranges() {
    let h = Harness::new("gfx90a:2");
    let ctx = setup(&h);
    let m = Mapping::new(16 * PAGE as usize);
    let pg = |i: u64| m.addr + i * PAGE;
    let (g0, g1) = (h.gpu_id(0), h.gpu_id(1));
    // [0,8): preferred GPU 0, GPU_RO.
    let (r, _) = svm_call(
        &h,
        &*ctx,
        SET,
        pg(0),
        8 * PAGE,
        &[(PREF, g0), (SETF, KFD_IOCTL_SVM_FLAG_GPU_RO), (GRAN, 0x50)],
    );
    assert_eq!(r, Ok(()));
    // [4,12): preferred GPU 1, GPU 1 may access: splits [0,8) at 4 and adds [8,12).
    let (r, _) = svm_call(&h, &*ctx, SET, pg(4), 8 * PAGE, &[(PREF, g1), (ACCESS, g1)]);
    assert_eq!(r, Ok(()));
    assert_eq!(h.stat("svm_ranges"), 3);
    let get = |s: u64, n: u64| {
        svm_call(
            &h,
            &*ctx,
            GET,
            pg(s),
            n * PAGE,
            &[
                (PREF, 0),
                (ACCESS, g1),
                (ACCESS, g0),
                (SETF, 0),
                (CLRF, 0),
                (GRAN, 0),
            ],
        )
    };
    let (r, v) = get(0, 4);
    assert_eq!(r, Ok(()));
    assert_eq!(v[0], (PREF, g0));
    assert_eq!(v[1].0, KFD_IOCTL_SVM_ATTR_NO_ACCESS);
    assert_eq!(v[3].1, HOST_COH | KFD_IOCTL_SVM_FLAG_GPU_RO);
    assert_eq!(v[5].1, 0x3F, "granularity is clamped to 0x3f");
    let (_, v) = get(4, 8);
    assert_eq!(v[0], (PREF, g1));
    assert_eq!(v[1], (ACCESS, g1), "access from GPU 1 on all of [4,12)");
    assert_eq!(v[2].0, KFD_IOCTL_SVM_ATTR_NO_ACCESS);
    assert_eq!(v[5].1, 9, "min(0x3f, default 9)");
    // Mixed: locations differ → UNDEFINED; flags: AND / complement of OR; access: intersection.
    let (_, v) = get(0, 12);
    assert_eq!(v[0], (PREF, UNDEF));
    assert_eq!(v[1].0, KFD_IOCTL_SVM_ATTR_NO_ACCESS);
    assert_eq!(v[3], (SETF, HOST_COH));
    assert_eq!(v[4], (CLRF, !(HOST_COH | KFD_IOCTL_SVM_FLAG_GPU_RO)));
    // No range at all: the defaults.
    let (_, v) = get(12, 4);
    assert_eq!(
        (v[0], v[1].0, v[3], v[5]),
        (
            (PREF, UNDEF),
            KFD_IOCTL_SVM_ATTR_NO_ACCESS,
            (SETF, HOST_COH),
            (GRAN, 9)
        )
    );
    // Refusals.
    assert_eq!(
        svm_call(&h, &*ctx, SET, pg(0) + 1, PAGE, &[]).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        svm_call(&h, &*ctx, SET, pg(0), 0, &[]).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        svm_call(&h, &*ctx, 7, pg(0), PAGE, &[]).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        svm_call(&h, &*ctx, SET, pg(0), PAGE, &[(99, 0)]).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        svm_call(&h, &*ctx, SET, pg(0), PAGE, &[(ACCESS, 0xdead)]).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        svm_call(
            &h,
            &*ctx,
            GET,
            pg(0),
            PAGE,
            &[(KFD_IOCTL_SVM_ATTR_NO_ACCESS, g0)]
        )
        .0,
        Err(Errno::EINVAL)
    );
    m.punch(14 * PAGE as usize, PAGE as usize);
    assert_eq!(
        svm_call(&h, &*ctx, SET, pg(12), 4 * PAGE, &[]).0,
        Err(Errno::EFAULT),
        "a hole in the range"
    );
    assert_eq!(
        svm_call(&h, &*ctx, GET, pg(12), 4 * PAGE, &[]).0,
        Err(Errno::EFAULT)
    );
    // SVM and buffers exclude each other: an SVM range over a mapped buffer's VA is
    // EADDRINUSE, and so is a buffer at an SVM range's VA.
    let m2 = Mapping::new(4 * PAGE as usize);
    mapped_gtt(&h, &*ctx, 0, PAGE, m2.addr);
    assert_eq!(
        svm_call(&h, &*ctx, SET, m2.addr, 2 * PAGE, &[]).0,
        Err(EADDRINUSE)
    );
    assert_eq!(
        alloc(&h, &*ctx, 1, GTT, PAGE, pg(5)).err(),
        Some(EADDRINUSE)
    );
    drop(ctx);
    assert_eq!(h.stat("svm_ranges"), 0);
}

#[test]
fn svm_switch_and_secondary_contexts() {
    let m = Mapping::new(PAGE as usize);
    let off = Harness::with_config(
        "gfx90a",
        SimConfig {
            svm: false,
            ..Default::default()
        },
    );
    let ctx = off.open_kfd();
    assert_eq!(
        svm_call(&off, &*ctx, SET, m.addr, PAGE, &[]).0,
        Err(Errno::EPERM)
    );
    assert_eq!(
        svm_call(&off, &*ctx, GET, m.addr, PAGE, &[]).0,
        Err(Errno::EPERM)
    );
    let h = Harness::new("gfx90a");
    let ctx = h.open_kfd();
    assert_eq!(svm_call(&h, &*ctx, SET, m.addr, PAGE, &[]).0, Ok(()));
    h.call(
        &*ctx,
        make_call(AMDKFD_IOC_CREATE_PROCESS, &[], vec![], h.caller),
    )
    .result
    .unwrap();
    assert_eq!(
        svm_call(&h, &*ctx, SET, m.addr, PAGE, &[]).0,
        Err(Errno::EOPNOTSUPP)
    );
    assert_eq!(h.stat("svm_ranges"), 0, "CREATE_PROCESS dropped the ranges");
}

// ---- dma-buf ---------------------------------------------------------------------------

fn export(h: &Harness, ctx: &dyn DeviceContext, handle: u64, flags: u32) -> Result<i32, Errno> {
    let mut a = KfdIoctlExportDmabufArgs {
        handle,
        flags,
        dmabuf_fd: 0,
    };
    h.io0(ctx, AMDKFD_IOC_EXPORT_DMABUF, &mut a)
        .map(|_| a.dmabuf_fd as i32)
}

fn import(
    h: &Harness,
    ctx: &dyn DeviceContext,
    fd: i32,
    gpu: usize,
    va: u64,
) -> Result<u64, Errno> {
    let mut a = KfdIoctlImportDmabufArgs {
        va_addr: va,
        handle: 0,
        gpu_id: h.gpu_id(gpu),
        dmabuf_fd: fd as u32,
    };
    h.io0(ctx, AMDKFD_IOC_IMPORT_DMABUF, &mut a)
        .map(|_| a.handle)
}

fn info(h: &Harness, ctx: &dyn DeviceContext, fd: i32) -> Result<KfdIoctlGetDmabufInfoArgs, Errno> {
    let mut a = KfdIoctlGetDmabufInfoArgs::new_zeroed();
    a.dmabuf_fd = fd as u32;
    h.io0(ctx, AMDKFD_IOC_GET_DMABUF_INFO, &mut a).map(|_| a)
}

#[test]
fn dmabuf_between_contexts() {
    let h = Harness::new("gfx90a:2");
    let a = setup(&h);
    let b = setup(&h);
    let v = alloc(
        &h,
        &*a,
        0,
        VRAM | KFD_IOC_ALLOC_MEM_FLAGS_PUBLIC,
        2 * PAGE,
        0x10_0000,
    )
    .unwrap();
    memfd(&h)
        .write_all_at(b"dma-buf bytes", v.mmap_offset)
        .unwrap();
    // Without a way to install fds in the caller (the FUSE transport): EOPNOTSUPP.
    assert_eq!(
        export(&h, &*a, v.handle, libc::O_RDWR as u32),
        Err(Errno::EOPNOTSUPP)
    );
    h.dev.set_fd_installer(Arc::new(SelfInstaller));
    assert_eq!(
        export(&h, &*a, v.handle, 0x4),
        Err(Errno::EINVAL),
        "bad flags"
    );
    assert_eq!(export(&h, &*a, v.handle + 9, 0), Err(Errno::EINVAL));
    let fd = export(&h, &*a, v.handle, (libc::O_RDWR | libc::O_CLOEXEC) as u32).unwrap();
    // SAFETY: the harness installed `fd` in this process for us; we own it now.
    let f = unsafe { File::from_raw_fd(fd) };
    let mut head = [0u8; 13];
    (&f).read_exact(&mut head).unwrap();
    assert_eq!(
        &head, b"dma-buf bytes",
        "the dma-buf holds the buffer's bytes"
    );
    assert_eq!(f.metadata().unwrap().len(), 2 * PAGE);
    let i = info(&h, &*b, fd).unwrap();
    assert_eq!(
        (i.size, i.gpu_id, i.flags, i.metadata_size),
        (
            2 * PAGE,
            h.gpu_id(0),
            KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_PUBLIC,
            0
        )
    );
    // Another context imports it on GPU 1; imports are not charged to VRAM.
    let avail = h.dev.vram_available(1).unwrap();
    let hb = import(&h, &*b, fd, 1, 0x50_0000).unwrap();
    assert_eq!(hb, (h.gpu_id(1) as u64) << 32);
    assert_eq!(h.dev.vram_available(1), Some(avail));
    assert_eq!(map(&h, &*b, hb, &[1]), Ok(()));
    // A dup of the fd is the same dma-buf (recognised by inode, not fd number).
    let dup = f.try_clone().unwrap();
    assert!(import(&h, &*b, dup.as_raw_fd(), 1, 0x60_0000).is_ok());
    // A second export of one buffer is another fd of the same dma-buf.
    let fd2 = export(&h, &*a, v.handle, libc::O_CLOEXEC as u32).unwrap();
    // SAFETY: installed for us by the harness.
    let f2 = unsafe { File::from_raw_fd(fd2) };
    assert_eq!(f2.metadata().unwrap().ino(), f.metadata().unwrap().ino());
    assert_eq!(h.stat("dmabufs"), 1);
    // Not ours / not open.
    let null = File::open("/dev/null").unwrap();
    assert_eq!(
        import(&h, &*b, null.as_raw_fd(), 1, 0).err(),
        Some(Errno::EINVAL)
    );
    assert_eq!(info(&h, &*b, null.as_raw_fd()).err(), Some(Errno::EINVAL));
    assert_eq!(import(&h, &*b, 999_999, 1, 0).err(), Some(Errno::EBADF));
    assert_eq!(info(&h, &*b, -1).err(), Some(Errno::EBADF));
    let mut bad_gpu = KfdIoctlImportDmabufArgs {
        va_addr: 0,
        handle: 0,
        gpu_id: 0xbad,
        dmabuf_fd: fd as u32,
    };
    assert_eq!(
        h.io0(&*b, AMDKFD_IOC_IMPORT_DMABUF, &mut bad_gpu),
        Err(Errno::EINVAL),
        "unknown gpu_id"
    );
    let unbound = h.open_kfd();
    assert_eq!(import(&h, &*unbound, fd, 0, 0).err(), Some(Errno::ENODEV));
    // USERPTR memory cannot be exported.
    let m = Mapping::new(PAGE as usize);
    let mut u = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: 0x70_0000,
        size: PAGE,
        handle: 0,
        mmap_offset: m.addr,
        gpu_id: h.gpu_id(0),
        flags: KFD_IOC_ALLOC_MEM_FLAGS_USERPTR,
    };
    h.io0(&*a, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut u).unwrap();
    assert_eq!(export(&h, &*a, u.handle, 0), Err(Errno::EPERM));
    // The object lives while a buffer refers to it.
    drop(a);
    assert_eq!(h.stat("dmabufs"), 1, "the importer still holds it");
    drop(b);
    assert_eq!(h.stat("dmabufs"), 0);
    assert_eq!(import(&h, &*unbound, fd, 0, 0).err(), Some(Errno::EINVAL));
}
