//! The sim device's KFD semantics, driven directly (no transport).

#[path = "sim_helpers.rs"]
mod sim_helpers;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kfdmux::abi::*;
use kfdmux::device::{Device, DeviceContext};
use kfdmux::errno::Errno;
use sim_helpers::*;
use zerocopy::FromBytes;

const PAGE: u64 = 4096;
const VRAM: u32 = KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
const GTT: u32 = KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;

/// Opens a kfd context and acquires the VM of every GPU (render fds 10+i, file ids 100+i).
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
    mmap_in: u64,
) -> (Result<(), Errno>, KfdIoctlAllocMemoryOfGpuArgs) {
    let mut a = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: va,
        size,
        handle: 0,
        mmap_offset: mmap_in,
        gpu_id: h.gpu_id(gpu),
        flags,
    };
    let r = h.io0(ctx, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut a);
    (r, a)
}

fn free(h: &Harness, ctx: &dyn DeviceContext, handle: u64) -> Result<(), Errno> {
    h.io0(
        ctx,
        AMDKFD_IOC_FREE_MEMORY_OF_GPU,
        &mut KfdIoctlFreeMemoryOfGpuArgs { handle },
    )
}

fn map(
    h: &Harness,
    ctx: &dyn DeviceContext,
    cmd: u32,
    handle: u64,
    ids: &[u32],
    n_success: u32,
) -> (Result<(), Errno>, u32) {
    let mut a = KfdIoctlMapMemoryToGpuArgs {
        handle,
        device_ids_array_ptr: 0x1000,
        n_devices: ids.len() as u32,
        n_success,
    };
    let (r, _) = h.io(ctx, cmd, &mut a, vec![("device_ids_array_ptr", u32s(ids))]);
    (r, a.n_success)
}

fn memfd(h: &Harness) -> File {
    let pm = h.dev.process_memory(tgid()).unwrap();
    File::from(pm.backing_fd().try_clone_to_owned().unwrap())
}

fn read_u64(f: &File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_le_bytes(b)
}

#[test]
fn get_version_reports_configured_minor() {
    let h = Harness::with_config(
        "gfx90a",
        kfdmux::device::sim::SimConfig {
            kfd_minor: 12,
            ..Default::default()
        },
    );
    let ctx = h.open_kfd();
    let mut a = KfdIoctlGetVersionArgs {
        major_version: 0,
        minor_version: 0,
    };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_GET_VERSION, &mut a), Ok(()));
    assert_eq!((a.major_version, a.minor_version), (1, 12));
}

#[test]
fn apertures_for_two_gpus() {
    let h = Harness::new("gfx90a:2");
    let ctx = h.open_kfd();
    // Capacity 0: only the count.
    let mut a = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: 0,
        num_of_nodes: 0,
        pad: 0,
    };
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut a),
        Ok(())
    );
    assert_eq!(a.num_of_nodes, 2);
    // Capacity 1: one entry.
    let mut a = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: 0x1000,
        num_of_nodes: 1,
        pad: 0,
    };
    let (r, call) = h.io(&*ctx, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut a, vec![]);
    assert_eq!(r, Ok(()));
    assert_eq!(a.num_of_nodes, 1);
    let buf = call.array("kfd_process_device_apertures_ptr").unwrap();
    assert_eq!(buf.len(), 56);
    let e = KfdProcessDeviceApertures::read_from_bytes(buf).unwrap();
    assert_eq!(e.gpu_id, h.gpu_id(0));
    assert_eq!(
        (e.lds_base, e.lds_limit),
        (1 << 48, (1 << 48) | 0xFFFF_FFFF)
    );
    assert_eq!(
        (e.scratch_base, e.scratch_limit),
        (2 << 48, (2 << 48) | 0xFFFF_FFFF)
    );
    assert_eq!((e.gpuvm_base, e.gpuvm_limit), (0x4000, (1 << 47) - 1));
    // Capacity 4: both GPUs, count clamped to 2.
    let mut a = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: 0x1000,
        num_of_nodes: 4,
        pad: 0,
    };
    let (_, call) = h.io(&*ctx, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut a, vec![]);
    assert_eq!(a.num_of_nodes, 2);
    let buf = call.array("kfd_process_device_apertures_ptr").unwrap();
    let e1 = KfdProcessDeviceApertures::read_from_bytes(&buf[56..112]).unwrap();
    assert_eq!(e1.gpu_id, h.gpu_id(1));
    assert!(
        buf[112..].iter().all(|b| *b == 0),
        "entries past the count stay untouched"
    );
    // The deprecated inline form.
    let mut old = KfdIoctlGetProcessAperturesArgs::new_zeroed();
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_GET_PROCESS_APERTURES, &mut old),
        Ok(())
    );
    assert_eq!(old.num_of_nodes, 2);
    assert_eq!(old.process_apertures[1].gpu_id, h.gpu_id(1));
}

#[test]
fn acquire_vm_checks_the_render_fd() {
    let h = Harness::new("gfx90a:2");
    let ctx = h.open_kfd();
    h.env.add_render(10, 0, 100);
    h.env.add_render(11, 1, 101);
    h.env.add_render(12, 0, 102);
    h.env.add_foreign(13);
    let acq = |fd: u32, gpu_id: u32| {
        h.io0(
            &*ctx,
            AMDKFD_IOC_ACQUIRE_VM,
            &mut KfdIoctlAcquireVmArgs { drm_fd: fd, gpu_id },
        )
    };
    // Allocating before ACQUIRE_VM: no VM bound yet.
    assert_eq!(
        alloc(&h, &*ctx, 0, GTT, PAGE, 0x10000, 0).0,
        Err(Errno::ENODEV)
    );
    assert_eq!(
        acq(13, h.gpu_id(0)),
        Err(Errno::EINVAL),
        "not a render node"
    );
    assert_eq!(acq(99, h.gpu_id(0)), Err(Errno::EINVAL), "fd not open");
    assert_eq!(acq(10, 0xdead), Err(Errno::EINVAL), "unknown gpu_id");
    assert_eq!(
        acq(11, h.gpu_id(0)),
        Err(Errno::EINVAL),
        "render node of the other GPU"
    );
    assert_eq!(acq(10, h.gpu_id(0)), Ok(()));
    assert_eq!(acq(10, h.gpu_id(0)), Ok(()), "same file again");
    assert_eq!(
        acq(12, h.gpu_id(0)),
        Err(Errno::EBUSY),
        "a different file once acquired"
    );
    // Another context of the process may use a render fd of its own.
    let ctx2 = h.open_kfd();
    let mut a = KfdIoctlAcquireVmArgs {
        drm_fd: 12,
        gpu_id: h.gpu_id(0),
    };
    assert_eq!(h.io0(&*ctx2, AMDKFD_IOC_ACQUIRE_VM, &mut a), Ok(()));
    // A render file of another process (passed over a socket) is a different file: EBUSY.
    h.env.add_render(14, 0, 999);
    let mut a = KfdIoctlAcquireVmArgs {
        drm_fd: 14,
        gpu_id: h.gpu_id(0),
    };
    assert_eq!(
        h.io0(&*ctx2, AMDKFD_IOC_ACQUIRE_VM, &mut a),
        Err(Errno::EBUSY)
    );
    // The VM binding is per context: the first context's release leaves the second bound.
    ctx.release();
    assert_eq!(alloc(&h, &*ctx2, 0, GTT, PAGE, 0x10000, 0).0, Ok(()));
}

#[test]
fn alloc_kinds_handles_and_offsets() {
    let h = Harness::new("gfx90a:2");
    let ctx = setup(&h);
    let g1 = h.gpu_id(1) as u64;
    let (r, v) = alloc(&h, &*ctx, 1, VRAM, 3 * PAGE + 5, 0x100000, 0);
    assert_eq!(r, Ok(()));
    assert_eq!(v.handle, g1 << 32, "gpu_id << 32 | first idr id 0");
    let (_, g) = alloc(&h, &*ctx, 1, GTT, PAGE, 0x200000, 0);
    assert_eq!(g.handle, g1 << 32 | 1);
    let user = Mapping::new(3 * PAGE as usize);
    let (r, u) = alloc(
        &h,
        &*ctx,
        1,
        KFD_IOC_ALLOC_MEM_FLAGS_USERPTR,
        2 * PAGE,
        0x300000,
        user.addr,
    );
    assert_eq!(r, Ok(()));
    assert_eq!(u.handle, g1 << 32 | 2);
    assert_eq!(u.mmap_offset, 0, "userptr buffers have no mmap offset");
    let (r, m) = alloc(
        &h,
        &*ctx,
        1,
        KFD_IOC_ALLOC_MEM_FLAGS_MMIO_REMAP,
        PAGE,
        0x400000,
        0,
    );
    assert_eq!(r, Ok(()));
    let (r, d) = alloc(
        &h,
        &*ctx,
        1,
        KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL,
        8192,
        0x500000,
        0,
    );
    assert_eq!(r, Ok(()));
    let offs = [v.mmap_offset, g.mmap_offset, m.mmap_offset, d.mmap_offset];
    for o in offs {
        assert!(o != 0 && o % PAGE == 0, "offset {o:#x}");
        assert!(o < 1 << 40);
    }
    // Ranges don't overlap (VRAM took 4 pages).
    let mut sorted = offs.to_vec();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 4);
    assert!(g.mmap_offset >= v.mmap_offset + 4 * PAGE || g.mmap_offset + PAGE <= v.mmap_offset);
    // Handles of GPU 0 count from 0 on their own.
    let (_, g0) = alloc(&h, &*ctx, 0, GTT, PAGE, 0x600000, 0);
    assert_eq!(g0.handle, (h.gpu_id(0) as u64) << 32);
    // Refusals.
    assert_eq!(
        alloc(&h, &*ctx, 1, KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL, PAGE, 0, 0).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        alloc(
            &h,
            &*ctx,
            1,
            KFD_IOC_ALLOC_MEM_FLAGS_MMIO_REMAP,
            2 * PAGE,
            0,
            0
        )
        .0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        alloc(&h, &*ctx, 1, KFD_IOC_ALLOC_MEM_FLAGS_USERPTR, PAGE, 0, 0).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        alloc(
            &h,
            &*ctx,
            1,
            KFD_IOC_ALLOC_MEM_FLAGS_USERPTR,
            PAGE,
            0,
            0x1234
        )
        .0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        alloc(&h, &*ctx, 1, KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE, PAGE, 0, 0).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(alloc(&h, &*ctx, 1, GTT, 0, 0, 0).0, Err(Errno::EINVAL));
    // USERPTR pages must be mapped in the caller: a hole in the range is EFAULT.
    user.punch(2 * PAGE as usize, PAGE as usize);
    assert_eq!(
        alloc(
            &h,
            &*ctx,
            1,
            KFD_IOC_ALLOC_MEM_FLAGS_USERPTR,
            3 * PAGE,
            0x700000,
            user.addr
        )
        .0,
        Err(Errno::EFAULT)
    );
    assert_eq!(
        alloc(
            &h,
            &*ctx,
            1,
            KFD_IOC_ALLOC_MEM_FLAGS_USERPTR,
            PAGE,
            0x700000,
            user.addr + 2 * PAGE
        )
        .0,
        Err(Errno::EFAULT)
    );
    let mut bad = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: 0,
        size: PAGE,
        handle: 0,
        mmap_offset: 0,
        gpu_id: 7,
        flags: GTT,
    };
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut bad),
        Err(Errno::EINVAL)
    );
    assert_eq!(h.stat("buffers"), 6);
    // Freed ids are reused lowest first.
    assert_eq!(free(&h, &*ctx, g.handle), Ok(()));
    assert_eq!(free(&h, &*ctx, g.handle), Err(Errno::EINVAL), "double free");
    let (_, again) = alloc(&h, &*ctx, 1, GTT, PAGE, 0x700000, 0);
    assert_eq!(again.handle, g1 << 32 | 1);
    ctx.release();
    assert_eq!((h.stat("buffers"), h.stat("buffer_bytes")), (0, 0));
}

#[test]
fn buffer_offsets_address_the_process_memfd() {
    let h = Harness::new("gfx1030");
    let ctx = setup(&h);
    let (_, a) = alloc(&h, &*ctx, 0, GTT, 2 * PAGE, 0x100000, 0);
    let (_, b) = alloc(&h, &*ctx, 0, VRAM, PAGE, 0x200000, 0);
    let f = memfd(&h);
    f.write_all_at(b"hello from the device", a.mmap_offset + PAGE)
        .unwrap();
    // A client mapping of the same offset sees the bytes.
    // SAFETY: mapping a memfd range we own, read-only, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PAGE as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            a.mmap_offset as i64,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: p maps 2 pages; we read 21 bytes at page 1 and write one byte at page 0.
    let seen =
        unsafe { std::slice::from_raw_parts((p as *const u8).add(PAGE as usize), 21).to_vec() };
    assert_eq!(&seen, b"hello from the device");
    // SAFETY: as above, within the mapping.
    unsafe { *(p as *mut u8) = 0x5a };
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, a.mmap_offset).unwrap();
    assert_eq!(one[0], 0x5a);
    // The other buffer is untouched.
    f.read_exact_at(&mut one, b.mmap_offset).unwrap();
    assert_eq!(one[0], 0);
    // SAFETY: unmapping what we mapped.
    unsafe { libc::munmap(p, 2 * PAGE as usize) };
    // A second context of the same process shares the memfd but gets other ranges.
    let ctx2 = setup_second(&h);
    let (_, c) = alloc(&h, &*ctx2, 0, GTT, PAGE, 0x100000, 0);
    assert!(c.mmap_offset >= a.mmap_offset + 2 * PAGE || c.mmap_offset + PAGE <= a.mmap_offset);
    assert_ne!(c.mmap_offset, b.mmap_offset);
}

fn setup_second(h: &Harness) -> Box<dyn DeviceContext> {
    let ctx = h.open_kfd();
    h.env.add_render(50, 0, 500);
    let mut a = KfdIoctlAcquireVmArgs {
        drm_fd: 50,
        gpu_id: h.gpu_id(0),
    };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_ACQUIRE_VM, &mut a), Ok(()));
    ctx
}

#[test]
fn free_punches_the_hole() {
    let h = Harness::new("gfx90a");
    let ctx = setup(&h);
    let size = 1 << 20;
    let (_, a) = alloc(&h, &*ctx, 0, GTT, size, 0x100000, 0);
    let f = memfd(&h);
    f.write_all_at(&vec![0xabu8; size as usize], a.mmap_offset)
        .unwrap();
    let blocks = |f: &File| {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks()
    };
    let before = blocks(&f);
    assert!(
        before >= size / 512,
        "written pages are allocated ({before} blocks)"
    );
    assert_eq!(free(&h, &*ctx, a.handle), Ok(()));
    let after = blocks(&f);
    assert!(after + size / 512 <= before, "blocks {before} -> {after}");
    let mut b = [1u8; 16];
    f.read_exact_at(&mut b, a.mmap_offset).unwrap();
    assert_eq!(b, [0u8; 16], "the range reads as zero");
}

#[test]
fn vram_accounting_and_enomem() {
    let h = Harness::new("gfx1030");
    let ctx = setup(&h);
    let gpu_id = h.gpu_id(0);
    let avail = |ctx: &dyn DeviceContext| {
        let mut a = KfdIoctlGetAvailableMemoryArgs {
            available: 0,
            gpu_id,
            pad: 0,
        };
        assert_eq!(h.io0(ctx, AMDKFD_IOC_AVAILABLE_MEMORY, &mut a), Ok(()));
        a.available
    };
    let total = h.dev.gpus()[0].preset.vram_bytes;
    let a0 = avail(&*ctx);
    assert_eq!(a0, total / (2 << 20) * (2 << 20));
    let (r, big) = alloc(&h, &*ctx, 0, VRAM, 1 << 30, 0x1_0000_0000, 0);
    assert_eq!(r, Ok(()));
    let a1 = avail(&*ctx);
    assert_eq!(a0 - a1, 1 << 30);
    // A small buffer still costs a 2 MiB granule in AVAILABLE_MEMORY.
    let (_, small) = alloc(&h, &*ctx, 0, VRAM, PAGE, 0x2000, 0);
    assert_eq!(a1 - avail(&*ctx), 2 << 20);
    // The rest of VRAM: too much.
    assert_eq!(
        alloc(&h, &*ctx, 0, VRAM, total, 0x2_0000_0000, 0).0,
        Err(Errno::ENOMEM)
    );
    // Accounting is per device: another context sees the same availability.
    let ctx2 = setup_second(&h);
    assert_eq!(avail(&*ctx2), avail(&*ctx));
    // GTT is not charged to VRAM.
    let before = avail(&*ctx);
    alloc(&h, &*ctx, 0, GTT, 1 << 20, 0x3_0000_0000, 0)
        .0
        .unwrap();
    assert_eq!(avail(&*ctx), before);
    assert_eq!(free(&h, &*ctx, big.handle), Ok(()));
    assert_eq!(free(&h, &*ctx, small.handle), Ok(()));
    assert_eq!(avail(&*ctx), a0);
    let unknown = KfdIoctlGetAvailableMemoryArgs {
        available: 0,
        gpu_id: 1,
        pad: 0,
    };
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_AVAILABLE_MEMORY, &mut { unknown }),
        Err(Errno::EINVAL)
    );
}

#[test]
fn map_unmap_progress_and_va_conflicts() {
    let h = Harness::new("gfx90a:2");
    let ctx = setup(&h);
    let (g0, g1) = (h.gpu_id(0), h.gpu_id(1));
    let (_, a) = alloc(&h, &*ctx, 0, VRAM, 4 * PAGE, 0x100000, 0);
    // A bad device id in the middle: the first succeeds, progress is reported.
    let (r, n) = map(
        &h,
        &*ctx,
        AMDKFD_IOC_MAP_MEMORY_TO_GPU,
        a.handle,
        &[g0, 0xbad, g1],
        0,
    );
    assert_eq!((r, n), (Err(Errno::EINVAL), 1));
    // Retrying from n_success skips what is done.
    let (r, n) = map(
        &h,
        &*ctx,
        AMDKFD_IOC_MAP_MEMORY_TO_GPU,
        a.handle,
        &[g0, g1],
        1,
    );
    assert_eq!((r, n), (Ok(()), 2));
    // Mapping again is harmless.
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, a.handle, &[g1], 0),
        (Ok(()), 1)
    );
    // An overlapping VA on GPU 0 is refused, a disjoint one maps.
    let (_, b) = alloc(&h, &*ctx, 0, GTT, 2 * PAGE, 0x100000 + 3 * PAGE, 0);
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, b.handle, &[g0], 0),
        (Err(Errno::EINVAL), 0)
    );
    let (_, c) = alloc(&h, &*ctx, 0, GTT, 2 * PAGE, 0x100000 + 4 * PAGE, 0);
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, c.handle, &[g0], 0),
        (Ok(()), 1)
    );
    // Bad arguments.
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, a.handle, &[], 0).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, a.handle, &[g0], 2).0,
        Err(Errno::EINVAL)
    );
    let unknown = (g0 as u64) << 32 | 77;
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, unknown, &[g0], 0).0,
        Err(Errno::ENOMEM)
    );
    assert_eq!(
        map(
            &h,
            &*ctx,
            AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU,
            unknown,
            &[g0],
            0
        )
        .0,
        Err(Errno::EINVAL)
    );
    // A mapped buffer cannot be freed.
    assert_eq!(free(&h, &*ctx, a.handle), Err(Errno::EBUSY));
    // Unmap: not mapped on the second id → progress 1.
    assert_eq!(
        map(
            &h,
            &*ctx,
            AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU,
            c.handle,
            &[g0, g1],
            0
        ),
        (Err(Errno::EINVAL), 1)
    );
    assert_eq!(
        map(
            &h,
            &*ctx,
            AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU,
            a.handle,
            &[g0, g1],
            0
        ),
        (Ok(()), 2)
    );
    assert_eq!(free(&h, &*ctx, a.handle), Ok(()));
    // a's VA is free again and c was unmapped from GPU 0 above: b maps now, c then clashes with b.
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, b.handle, &[g0], 0).0,
        Ok(())
    );
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, c.handle, &[g0], 0).0,
        Err(Errno::EINVAL)
    );
    // On GPU 1 nothing is mapped: c maps there.
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, c.handle, &[g1], 0).0,
        Ok(())
    );
    // An unaligned VA is refused at map time.
    let (_, u) = alloc(&h, &*ctx, 0, GTT, PAGE, 0x900010, 0);
    assert_eq!(
        map(&h, &*ctx, AMDKFD_IOC_MAP_MEMORY_TO_GPU, u.handle, &[g0], 0).0,
        Err(Errno::EINVAL)
    );
}

#[test]
fn clock_counters() {
    let h = Harness::new("gfx90a");
    let ctx = h.open_kfd();
    let mut a = KfdIoctlGetClockCountersArgs::new_zeroed();
    a.gpu_id = h.gpu_id(0);
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_GET_CLOCK_COUNTERS, &mut a), Ok(()));
    assert_eq!(a.system_clock_freq, 1_000_000_000);
    assert!(a.gpu_clock_counter > 0 && a.cpu_clock_counter > 0 && a.system_clock_counter > 0);
    let first = a;
    std::thread::sleep(Duration::from_millis(2));
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_GET_CLOCK_COUNTERS, &mut a), Ok(()));
    assert!(a.cpu_clock_counter >= first.cpu_clock_counter + 1_000_000);
    assert!(a.gpu_clock_counter > first.gpu_clock_counter);
    let mut z = KfdIoctlGetClockCountersArgs::new_zeroed();
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_GET_CLOCK_COUNTERS, &mut z),
        Ok(()),
        "gpu_id 0 is accepted"
    );
    assert_eq!(z.gpu_clock_counter, 0);
}

#[test]
fn settings_ioctls() {
    let h = Harness::new("gfx90a");
    let ctx = h.open_kfd();
    let gpu_id = h.gpu_id(0);
    let mut p = KfdIoctlSetMemoryPolicyArgs::new_zeroed();
    p.gpu_id = gpu_id;
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_SET_MEMORY_POLICY, &mut p),
        Err(Errno::ESRCH),
        "no VM yet"
    );
    drop(ctx);
    let ctx = setup(&h);
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_SET_MEMORY_POLICY, &mut p), Ok(()));
    p.alternate_policy = 7;
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_SET_MEMORY_POLICY, &mut p),
        Err(Errno::EINVAL)
    );
    let mut s = KfdIoctlSetScratchBackingVaArgs {
        va_addr: 0x1000_0000,
        gpu_id,
        pad: 0,
    };
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_SET_SCRATCH_BACKING_VA, &mut s),
        Ok(())
    );
    s.gpu_id = 3;
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_SET_SCRATCH_BACKING_VA, &mut s),
        Err(Errno::EINVAL)
    );
    let mut t = KfdIoctlSetTrapHandlerArgs {
        tba_addr: 0x2000,
        tma_addr: 0x3000,
        gpu_id,
        pad: 0,
    };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_SET_TRAP_HANDLER, &mut t), Ok(()));
    t.gpu_id = 0;
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_SET_TRAP_HANDLER, &mut t),
        Err(Errno::EINVAL)
    );
    // XNACK: query, enable (gfx90a allows it per process), query again.
    let mut x = KfdIoctlSetXnackModeArgs { xnack_enabled: -1 };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_SET_XNACK_MODE, &mut x), Ok(()));
    assert_eq!(x.xnack_enabled, 0);
    assert_eq!(
        h.io0(
            &*ctx,
            AMDKFD_IOC_SET_XNACK_MODE,
            &mut KfdIoctlSetXnackModeArgs { xnack_enabled: 1 }
        ),
        Ok(())
    );
    let mut x = KfdIoctlSetXnackModeArgs { xnack_enabled: -1 };
    h.io0(&*ctx, AMDKFD_IOC_SET_XNACK_MODE, &mut x).unwrap();
    assert_eq!(x.xnack_enabled, 1);
    // gfx1030 cannot run with XNACK on.
    let h2 = Harness::new("gfx1030");
    let c2 = h2.open_kfd();
    assert_eq!(
        h2.io0(
            &*c2,
            AMDKFD_IOC_SET_XNACK_MODE,
            &mut KfdIoctlSetXnackModeArgs { xnack_enabled: 1 }
        ),
        Err(Errno::EPERM)
    );
    assert_eq!(
        h2.io0(
            &*c2,
            AMDKFD_IOC_SET_XNACK_MODE,
            &mut KfdIoctlSetXnackModeArgs { xnack_enabled: 0 }
        ),
        Ok(())
    );
    // Tile config: GB_ADDR_CONFIG of the preset, tables clamped to 32/16 entries.
    let mut tc = KfdIoctlGetTileConfigArgs::new_zeroed();
    tc.gpu_id = gpu_id;
    tc.num_tile_configs = 40;
    tc.num_macro_tile_configs = 4;
    tc.tile_config_ptr = 0x1000;
    tc.macro_tile_config_ptr = 0x2000;
    let (r, _) = h.io(&*ctx, AMDKFD_IOC_GET_TILE_CONFIG, &mut tc, vec![]);
    assert_eq!(r, Ok(()));
    assert_eq!((tc.num_tile_configs, tc.num_macro_tile_configs), (32, 4));
    assert_eq!(tc.gb_addr_config, h.dev.gpus()[0].preset.gb_addr_config);
    // Runtime enable (debugger runtime): enable, enable again EBUSY, disable.
    let mut re = KfdIoctlRuntimeEnableArgs {
        r_debug: 0x1234,
        mode_mask: KFD_RUNTIME_ENABLE_MODE_ENABLE_MASK,
        capabilities_mask: 0,
    };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_RUNTIME_ENABLE, &mut re), Ok(()));
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_RUNTIME_ENABLE, &mut re),
        Err(Errno::EBUSY)
    );
    re.mode_mask = 0;
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_RUNTIME_ENABLE, &mut re), Ok(()));
    // Debugger: unavailable.
    let mut d = KfdIoctlDbgTrapArgs::new_zeroed();
    d.pid = tgid();
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_DBG_TRAP, &mut d),
        Err(Errno::EINVAL)
    );
    let mut dd = KfdIoctlDbgTrapArgsDeprecated::new_zeroed();
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_DBG_TRAP_DEPRECATED, &mut dd),
        Err(Errno::EINVAL)
    );
    // No queues exist: queue ioctls answer as for an unknown queue id.
    let mut dq = KfdIoctlDestroyQueueArgs {
        queue_id: 0,
        pad: 0,
    };
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_DESTROY_QUEUE, &mut dq),
        Err(Errno::EINVAL)
    );
    // SVM (on by default): an empty range at address 0 is EINVAL.
    let mut svm = KfdIoctlSvmArgs::new_zeroed();
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_SVM, &mut svm), Err(Errno::EINVAL));
}

#[test]
fn create_process_makes_a_secondary_context_once() {
    let h = Harness::new("gfx90a");
    for cmd in [
        AMDKFD_IOC_CREATE_PROCESS,
        AMDKFD_IOC_CREATE_PROCESS_ROCM,
        AMDKFD_IOC_CREATE_PROCESS_DRAFT,
    ] {
        let ctx = h.open_kfd();
        let r = h.call(
            &*ctx,
            sim_helpers::make_call(cmd, &[0u8; 8], vec![], h.caller),
        );
        assert_eq!(r.result, Ok(()), "cmd {cmd:#x}");
        if cmd == AMDKFD_IOC_CREATE_PROCESS_DRAFT {
            let a: KfdIoctlCreateProcessDraftArgs = r.call.args();
            assert_ne!(a.pasid, 0);
        }
        let r = h.call(
            &*ctx,
            sim_helpers::make_call(cmd, &[0u8; 8], vec![], h.caller),
        );
        assert_eq!(
            r.result,
            Err(Errno::EINVAL),
            "second CREATE_PROCESS on one fd"
        );
    }
    // A secondary context refuses USERPTR, SVM and the debugger, but does the rest.
    let ctx = h.open_kfd();
    h.call(
        &*ctx,
        sim_helpers::make_call(AMDKFD_IOC_CREATE_PROCESS, &[], vec![], h.caller),
    )
    .result
    .unwrap();
    h.env.add_render(10, 0, 100);
    let mut a = KfdIoctlAcquireVmArgs {
        drm_fd: 10,
        gpu_id: h.gpu_id(0),
    };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_ACQUIRE_VM, &mut a), Ok(()));
    assert_eq!(
        alloc(
            &h,
            &*ctx,
            0,
            KFD_IOC_ALLOC_MEM_FLAGS_USERPTR,
            PAGE,
            0x1000,
            0x10000
        )
        .0,
        Err(Errno::EOPNOTSUPP)
    );
    assert_eq!(alloc(&h, &*ctx, 0, GTT, PAGE, 0x1000, 0).0, Ok(()));
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_SVM, &mut KfdIoctlSvmArgs::new_zeroed()),
        Err(Errno::EOPNOTSUPP)
    );
    assert_eq!(
        h.io0(
            &*ctx,
            AMDKFD_IOC_DBG_TRAP,
            &mut KfdIoctlDbgTrapArgs::new_zeroed()
        ),
        Err(Errno::EOPNOTSUPP)
    );
}

// ---- events --------------------------------------------------------------------------------

struct Ev<'a> {
    h: &'a Harness,
    ctx: Box<dyn DeviceContext>,
}

impl Ev<'_> {
    fn create(
        &self,
        ty: u32,
        auto_reset: bool,
        page_handle: u64,
    ) -> (Result<(), Errno>, KfdIoctlCreateEventArgs) {
        let mut a = KfdIoctlCreateEventArgs::new_zeroed();
        a.event_type = ty;
        a.auto_reset = auto_reset as u32;
        a.event_page_offset = page_handle;
        let r = self.h.io0(&*self.ctx, AMDKFD_IOC_CREATE_EVENT, &mut a);
        (r, a)
    }
    fn signal_event(&self, auto_reset: bool) -> u32 {
        let (r, a) = self.create(KFD_IOC_EVENT_SIGNAL, auto_reset, 0);
        r.unwrap();
        a.event_id
    }
    fn set(&self, id: u32) -> Result<(), Errno> {
        self.h.io0(
            &*self.ctx,
            AMDKFD_IOC_SET_EVENT,
            &mut KfdIoctlSetEventArgs {
                event_id: id,
                pad: 0,
            },
        )
    }
    fn reset(&self, id: u32) -> Result<(), Errno> {
        self.h.io0(
            &*self.ctx,
            AMDKFD_IOC_RESET_EVENT,
            &mut KfdIoctlResetEventArgs {
                event_id: id,
                pad: 0,
            },
        )
    }
    fn destroy(&self, id: u32) -> Result<(), Errno> {
        self.h.io0(
            &*self.ctx,
            AMDKFD_IOC_DESTROY_EVENT,
            &mut KfdIoctlDestroyEventArgs {
                event_id: id,
                pad: 0,
            },
        )
    }
    fn wait_call(&self, ids: &[(u32, u64)], all: bool, timeout: u32) -> kfdmux::device::IoctlCall {
        let mut data = Vec::new();
        for (id, age) in ids {
            let mut e = KfdEventData::new_zeroed();
            e.event_id = *id;
            let mut b = zerocopy::IntoBytes::as_bytes(&e).to_vec();
            b[..8].copy_from_slice(&age.to_le_bytes());
            data.extend_from_slice(&b);
        }
        let a = KfdIoctlWaitEventsArgs {
            events_ptr: 0x1000,
            num_events: ids.len() as u32,
            wait_for_all: all as u32,
            timeout,
            wait_result: 0xff,
        };
        sim_helpers::make_call(
            AMDKFD_IOC_WAIT_EVENTS,
            zerocopy::IntoBytes::as_bytes(&a),
            vec![("events_ptr", data)],
            self.h.caller,
        )
    }
    fn wait_now(&self, ids: &[u32], all: bool, timeout: u32) -> (Result<(), Errno>, u32) {
        let ids: Vec<(u32, u64)> = ids.iter().map(|i| (*i, 0)).collect();
        let r = self.h.call(&*self.ctx, self.wait_call(&ids, all, timeout));
        (r.result, r.args::<KfdIoctlWaitEventsArgs>().wait_result)
    }
    fn start_wait(&self, ids: &[u32], all: bool, timeout: u32) -> Pending {
        let ids: Vec<(u32, u64)> = ids.iter().map(|i| (*i, 0)).collect();
        self.h.start(&*self.ctx, self.wait_call(&ids, all, timeout))
    }
}

const COMPLETE: u32 = KFD_IOC_WAIT_RESULT_COMPLETE;
const TIMEOUT: u32 = KFD_IOC_WAIT_RESULT_TIMEOUT;
const FAIL: u32 = KFD_IOC_WAIT_RESULT_FAIL;

#[test]
fn signal_events_use_the_user_events_page() {
    let h = Harness::new("gfx90a");
    let ctx = setup(&h);
    let (_, page) = alloc(&h, &*ctx, 0, GTT, 32 * 1024, 0x100000, 0);
    let f = memfd(&h);
    let ev = Ev { h: &h, ctx };
    let (r, e0) = ev.create(KFD_IOC_EVENT_SIGNAL, true, page.handle);
    assert_eq!(r, Ok(()));
    assert_eq!(
        (e0.event_id, e0.event_slot_index, e0.event_trigger_data),
        (0, 0, 0)
    );
    assert_eq!(e0.event_page_offset, page.mmap_offset);
    // The whole page now reads "unsignaled".
    assert_eq!(read_u64(&f, page.mmap_offset), u64::MAX);
    assert_eq!(read_u64(&f, page.mmap_offset + 32 * 1024 - 8), u64::MAX);
    let (_, e1) = ev.create(KFD_IOC_EVENT_SIGNAL, false, 0);
    assert_eq!((e1.event_id, e1.event_slot_index), (1, 1));
    // The page is set once; its buffer cannot be freed.
    assert_eq!(
        ev.create(KFD_IOC_EVENT_SIGNAL, false, page.handle).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(free(&h, &*ev.ctx, page.handle), Err(Errno::EPERM));
    // SET does not write the slot (the GPU writes slots; the kernel only reads them).
    ev.set(1).unwrap();
    assert_eq!(read_u64(&f, page.mmap_offset + 8), u64::MAX);
    // Non-signal events take ids in the upper half; the CPU cannot set or reset them.
    let (r, m) = ev.create(KFD_IOC_EVENT_MEMORY, false, 0);
    assert_eq!(r, Ok(()));
    assert_eq!(m.event_id, 0x4000_0000);
    assert_eq!(m.event_page_offset, 0);
    assert_eq!(ev.set(m.event_id), Err(Errno::EINVAL));
    assert_eq!(ev.reset(m.event_id), Err(Errno::EINVAL));
    assert_eq!(ev.set(12345), Err(Errno::EINVAL));
    assert_eq!(ev.reset(12345), Err(Errno::EINVAL));
    assert_eq!(ev.destroy(12345), Err(Errno::EINVAL));
    assert_eq!(h.stat("events"), 3);
    // Destroyed slot ids are reused.
    ev.destroy(0).unwrap();
    assert_eq!(ev.create(KFD_IOC_EVENT_SIGNAL, false, 0).1.event_id, 0);
    ev.ctx.release();
    assert_eq!(h.stat("events"), 0);
}

#[test]
fn signal_event_limit_follows_the_page_size() {
    let h = Harness::new("gfx90a");
    let ctx = setup(&h);
    // A one-page events buffer holds 512 slots.
    let (_, page) = alloc(&h, &*ctx, 0, GTT, PAGE, 0x100000, 0);
    let ev = Ev { h: &h, ctx };
    assert_eq!(
        ev.create(KFD_IOC_EVENT_SIGNAL, false, page.handle).0,
        Ok(())
    );
    for _ in 1..512 {
        ev.signal_event(false);
    }
    assert_eq!(
        ev.create(KFD_IOC_EVENT_SIGNAL, false, 0).0,
        Err(Errno::ENOSPC)
    );
    // Other event types are not limited by the page.
    assert_eq!(ev.create(KFD_IOC_EVENT_HW_EXCEPTION, false, 0).0, Ok(()));
}

#[test]
fn events_page_without_a_buffer_is_provided_by_the_sim() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let (r, e) = ev.create(KFD_IOC_EVENT_SIGNAL, false, 0);
    assert_eq!(r, Ok(()));
    assert!(e.event_page_offset != 0 && e.event_page_offset % PAGE == 0);
    assert_eq!(read_u64(&memfd(&h), e.event_page_offset), u64::MAX);
}

#[test]
fn wait_any_all_timeout_zero_and_reset_modes() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let auto = ev.signal_event(true);
    let manual = ev.signal_event(false);
    assert_eq!(ev.wait_now(&[auto, manual], false, 0), (Ok(()), TIMEOUT));
    ev.set(auto).unwrap();
    assert_eq!(
        ev.wait_now(&[auto, manual], true, 0),
        (Ok(()), TIMEOUT),
        "all: manual not set"
    );
    // The failed wait-all consumed the auto-reset signal.
    assert_eq!(ev.wait_now(&[auto], false, 0), (Ok(()), TIMEOUT));
    ev.set(auto).unwrap();
    ev.set(manual).unwrap();
    assert_eq!(ev.wait_now(&[auto, manual], true, 0), (Ok(()), COMPLETE));
    // Manual reset stays signaled until RESET.
    assert_eq!(ev.wait_now(&[manual], false, 0), (Ok(()), COMPLETE));
    assert_eq!(ev.wait_now(&[manual], false, 1000), (Ok(()), COMPLETE));
    ev.reset(manual).unwrap();
    assert_eq!(ev.wait_now(&[manual], false, 0), (Ok(()), TIMEOUT));
    assert_eq!(ev.wait_now(&[auto], false, 0), (Ok(()), TIMEOUT));
    // Unknown event: EINVAL with wait_result FAIL.
    assert_eq!(
        ev.wait_now(&[auto, 999], false, 0),
        (Err(Errno::EINVAL), FAIL)
    );
    // No events: complete at once.
    assert_eq!(ev.wait_now(&[], true, 0), (Ok(()), COMPLETE));
}

#[test]
fn event_age_reports_missed_signals() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let id = ev.signal_event(true);
    ev.set(id).unwrap();
    // Consume the signal.
    assert_eq!(ev.wait_now(&[id], false, 0), (Ok(()), COMPLETE));
    // A waiter that last saw age 1 is told at once that age 2 happened.
    let r = h.call(&*ev.ctx, ev.wait_call(&[(id, 1)], false, 0));
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, COMPLETE);
    let data = r.array("events_ptr");
    assert_eq!(u64::from_le_bytes(data[..8].try_into().unwrap()), 2);
    // Up to date: it waits.
    let r = h.call(&*ev.ctx, ev.wait_call(&[(id, 2)], false, 0));
    assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, TIMEOUT);
}

#[test]
fn timed_wait_times_out() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let id = ev.signal_event(false);
    let t0 = Instant::now();
    let p = ev.start_wait(&[id], false, 60);
    assert!(p.try_get().is_none(), "parked");
    assert_eq!(h.stat("waiters"), 1);
    let r = p.wait(5);
    let dt = t0.elapsed();
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, TIMEOUT);
    assert!(
        dt >= Duration::from_millis(60) && dt < Duration::from_secs(3),
        "{dt:?}"
    );
    assert_eq!(h.stat("waiters"), 0);
    assert_eq!(h.stat("timers"), 0);
}

#[test]
fn wait_is_woken_by_set_from_another_thread() {
    let h = Arc::new(Harness::new("gfx90a"));
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let id = ev.signal_event(true);
    let p = ev.start_wait(&[id], false, TIMEOUT_FOREVER);
    assert!(p.try_get().is_none());
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            ev.set(id).unwrap();
        });
    });
    let r = p.wait(5);
    assert_eq!(r.result, Ok(()));
    assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, COMPLETE);
    // The set woke a waiter, so the auto-reset event did not stay signaled.
    assert_eq!(ev.wait_now(&[id], false, 0), (Ok(()), TIMEOUT));
    // A finite wait woken early leaves no deadline armed.
    let p = ev.start_wait(&[id], false, 100_000);
    ev.set(id).unwrap();
    assert_eq!(
        p.wait(5).args::<KfdIoctlWaitEventsArgs>().wait_result,
        COMPLETE
    );
    assert_eq!(h.stat("timers"), 0);
}

const TIMEOUT_FOREVER: u32 = 0xFFFF_FFFF;

#[test]
fn wait_all_completes_when_the_last_event_is_set() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let a = ev.signal_event(false);
    let b = ev.signal_event(false);
    let p = ev.start_wait(&[a, b], true, TIMEOUT_FOREVER);
    ev.set(a).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    assert!(p.try_get().is_none(), "only one of two set");
    ev.set(b).unwrap();
    assert_eq!(
        p.wait(5).args::<KfdIoctlWaitEventsArgs>().wait_result,
        COMPLETE
    );
}

#[test]
fn interrupt_answers_eintr() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let id = ev.signal_event(false);
    let p = ev.start_wait(&[id], false, TIMEOUT_FOREVER);
    assert!(p.has_canceller());
    assert!(p.try_get().is_none());
    p.interrupt();
    let r = p.wait(5);
    assert_eq!(r.result, Err(Errno::EINTR));
    assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, FAIL);
    assert_eq!(h.stat("waiters"), 0);
    // Interrupted before the device could register its canceller.
    let ids = [(id, 0)];
    let p = h.start_interrupted(&*ev.ctx, ev.wait_call(&ids, false, TIMEOUT_FOREVER));
    assert_eq!(p.wait(5).result, Err(Errno::EINTR));
    // A wait that completes immediately needs no canceller.
    ev.set(id).unwrap();
    let p = ev.start_wait(&[id], false, TIMEOUT_FOREVER);
    assert_eq!(p.wait(5).result, Ok(()));
    assert!(!p.has_canceller());
    // Exactly one answer: a late interrupt after completion does nothing.
    p.interrupt();
    assert!(p.try_get().is_none());
}

#[test]
fn release_answers_parked_waiters_with_eintr() {
    let h = Harness::new("gfx90a");
    let ctx = setup(&h);
    let (_, page) = alloc(&h, &*ctx, 0, GTT, 32 * 1024, 0x100000, 0);
    let ev = Ev { h: &h, ctx };
    ev.create(KFD_IOC_EVENT_SIGNAL, false, page.handle)
        .0
        .unwrap();
    let p = ev.start_wait(&[0], false, 50_000);
    let q = ev.start_wait(&[0], false, TIMEOUT_FOREVER);
    assert_eq!(h.stat("waiters"), 2);
    assert_eq!(h.stat("timers"), 1);
    ev.ctx.release();
    assert_eq!(p.wait(5).result, Err(Errno::EINTR));
    assert_eq!(q.wait(5).result, Err(Errno::EINTR));
    assert_eq!(
        (
            h.stat("waiters"),
            h.stat("events"),
            h.stat("buffers"),
            h.stat("timers"),
            h.stat("contexts")
        ),
        (0, 0, 0, 0, 0)
    );
    // Release is idempotent (drop releases again).
    drop(ev);
}

#[test]
fn destroying_a_waited_event_fails_the_wait() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let a = ev.signal_event(false);
    let b = ev.signal_event(false);
    let p = ev.start_wait(&[a, b], false, TIMEOUT_FOREVER);
    ev.destroy(b).unwrap();
    let r = p.wait(5);
    assert_eq!(r.result, Err(Errno::EIO));
    assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, FAIL);
}

#[test]
fn hundred_concurrent_waiters_are_all_woken() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let id = ev.signal_event(true);
    let other = ev.signal_event(false);
    let waits: Vec<Pending> = (0..100)
        .map(|i| {
            if i % 2 == 0 {
                ev.start_wait(&[id], false, TIMEOUT_FOREVER)
            } else {
                ev.start_wait(&[other, id], false, 60_000)
            }
        })
        .collect();
    assert_eq!(h.stat("waiters"), 100);
    let t0 = Instant::now();
    ev.set(id).unwrap();
    for p in &waits {
        let r = p.wait(5);
        assert_eq!(r.result, Ok(()));
        assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, COMPLETE);
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!((h.stat("waiters"), h.stat("timers")), (0, 0));
    // Woken from many threads at once too.
    let waits: Vec<Pending> = (0..100)
        .map(|_| ev.start_wait(&[other], false, TIMEOUT_FOREVER))
        .collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| ev.set(other).unwrap());
        }
    });
    for p in &waits {
        assert_eq!(p.wait(5).result, Ok(()));
    }
}

#[test]
fn memory_events_time_out_without_faults() {
    let h = Harness::new("gfx90a");
    let ev = Ev {
        h: &h,
        ctx: h.open_kfd(),
    };
    let (_, m) = ev.create(KFD_IOC_EVENT_MEMORY, false, 0);
    // Nothing signals memory events in the sim: the wait times out and leaves the data alone
    // (the kernel copies event data out only on COMPLETE: nothing is handed back to write).
    let r = h.call(&*ev.ctx, ev.wait_call(&[(m.event_id, 0)], false, 0));
    assert_eq!(r.args::<KfdIoctlWaitEventsArgs>().wait_result, TIMEOUT);
    assert!(r.array("events_ptr").is_empty());
}
