//! Contexts never see each other's handles, events, queues, SVM ranges or GPU mappings: two
//! contexts in one process and contexts of two processes, driven directly, and two opens of
//! the kfd file through the real FUSE transport (root and /dev/fuse; skipped elsewhere,
//! mandatory under CI=true).

mod common;
#[path = "sim_helpers.rs"]
mod sim_helpers;

use kfdmux::abi::*;
use kfdmux::device::{Caller, Device, DeviceContext, FileKind};
use kfdmux::errno::Errno;
use sim_helpers::*;
use zerocopy::IntoBytes;

const PAGE: u64 = 4096;
const GTT: u32 = KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;

fn acquire(h: &Harness, ctx: &dyn DeviceContext, caller: Caller) {
    for i in 0..h.dev.gpus().len() {
        h.env.add_render(10 + i as i32, i as u32, 100 + i as u32);
        let a = KfdIoctlAcquireVmArgs {
            drm_fd: 10 + i as u32,
            gpu_id: h.gpu_id(i),
        };
        let r = h.call(
            ctx,
            make_call(AMDKFD_IOC_ACQUIRE_VM, a.as_bytes(), vec![], caller),
        );
        assert_eq!(r.result, Ok(()));
    }
}

/// Calls `cmd` with `a` as `caller`; `a` takes what the device wrote back.
fn io<T: zerocopy::IntoBytes + zerocopy::FromBytes + zerocopy::Immutable>(
    h: &Harness,
    ctx: &dyn DeviceContext,
    caller: Caller,
    cmd: u32,
    a: &mut T,
    arrays: Vec<(&str, Vec<u8>)>,
) -> Result<(), Errno> {
    let r = h.call(ctx, make_call(cmd, a.as_bytes(), arrays, caller));
    *a = r.call.args();
    r.result
}

struct Owned {
    buf: u64,
    buf_off: u64,
    event: u32,
    queue: u32,
}

/// Gives `ctx` a mapped buffer at VA 0x10_0000 on GPU 0, a signal event and a queue.
fn populate(h: &Harness, ctx: &dyn DeviceContext, caller: Caller) -> Owned {
    acquire(h, ctx, caller);
    let mut handles = Vec::new();
    let mut first_off = 0;
    for (va, size) in [(0x10_0000u64, 0x10000u64), (0x20_0000, PAGE)] {
        let mut a = KfdIoctlAllocMemoryOfGpuArgs {
            va_addr: va,
            size,
            handle: 0,
            mmap_offset: 0,
            gpu_id: h.gpu_id(0),
            flags: GTT,
        };
        io(
            h,
            ctx,
            caller,
            AMDKFD_IOC_ALLOC_MEMORY_OF_GPU,
            &mut a,
            vec![],
        )
        .unwrap();
        let mut m = KfdIoctlMapMemoryToGpuArgs {
            handle: a.handle,
            device_ids_array_ptr: 0x1000,
            n_devices: 1,
            n_success: 0,
        };
        let ids = u32s(&[h.gpu_id(0)]);
        io(
            h,
            ctx,
            caller,
            AMDKFD_IOC_MAP_MEMORY_TO_GPU,
            &mut m,
            vec![("device_ids_array_ptr", ids)],
        )
        .unwrap();
        if handles.is_empty() {
            first_off = a.mmap_offset;
        }
        handles.push(a.handle);
    }
    let mut ev = KfdIoctlCreateEventArgs::new_zeroed();
    ev.event_type = KFD_IOC_EVENT_SIGNAL;
    ev.auto_reset = 1;
    io(h, ctx, caller, AMDKFD_IOC_CREATE_EVENT, &mut ev, vec![]).unwrap();
    let mut q = KfdIoctlCreateQueueArgs::new_zeroed();
    q.ring_base_address = 0x10_0000;
    q.write_pointer_address = 0x20_0000;
    q.read_pointer_address = 0x20_0080;
    q.ring_size = 0x10000;
    q.gpu_id = h.gpu_id(0);
    q.queue_type = KFD_IOC_QUEUE_TYPE_COMPUTE_AQL;
    q.queue_percentage = 100;
    io(h, ctx, caller, AMDKFD_IOC_CREATE_QUEUE, &mut q, vec![]).unwrap();
    Owned {
        buf: handles[0],
        buf_off: first_off,
        event: ev.event_id,
        queue: q.queue_id,
    }
}

/// `b` cannot reach anything of `a` by `a`'s ids, and `a` still has all of it afterwards.
fn assert_isolated(
    h: &Harness,
    a: &dyn DeviceContext,
    ca: Caller,
    b: &dyn DeviceContext,
    cb: Caller,
    oa: &Owned,
) {
    acquire(h, b, cb);
    // Handles: unknown in b (FREE EINVAL, MAP the kernel's ENOMEM).
    let mut f = KfdIoctlFreeMemoryOfGpuArgs { handle: oa.buf };
    assert_eq!(
        io(h, b, cb, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut f, vec![]),
        Err(Errno::EINVAL)
    );
    let mut m = KfdIoctlMapMemoryToGpuArgs {
        handle: oa.buf,
        device_ids_array_ptr: 0x1000,
        n_devices: 1,
        n_success: 0,
    };
    let ids = u32s(&[h.gpu_id(0)]);
    assert_eq!(
        io(
            h,
            b,
            cb,
            AMDKFD_IOC_MAP_MEMORY_TO_GPU,
            &mut m,
            vec![("device_ids_array_ptr", ids)]
        ),
        Err(Errno::ENOMEM)
    );
    // Events: b has none, so a's id is unknown.
    let mut s = KfdIoctlSetEventArgs {
        event_id: oa.event,
        pad: 0,
    };
    assert_eq!(
        io(h, b, cb, AMDKFD_IOC_SET_EVENT, &mut s, vec![]),
        Err(Errno::EINVAL)
    );
    let mut d = KfdIoctlDestroyEventArgs {
        event_id: oa.event,
        pad: 0,
    };
    assert_eq!(
        io(h, b, cb, AMDKFD_IOC_DESTROY_EVENT, &mut d, vec![]),
        Err(Errno::EINVAL)
    );
    // Queues.
    let mut dq = KfdIoctlDestroyQueueArgs {
        queue_id: oa.queue,
        pad: 0,
    };
    assert_eq!(
        io(h, b, cb, AMDKFD_IOC_DESTROY_QUEUE, &mut dq, vec![]),
        Err(Errno::EINVAL)
    );
    // Mappings: b's GPU VM is empty, so the same VA maps without conflict, and b's buffer gets
    // the same handle value (handle spaces are per context) yet is a different buffer.
    let bo = populate(h, b, cb);
    assert_eq!(
        bo.buf, oa.buf,
        "equal handle values, separate handle spaces"
    );
    assert_ne!(bo.buf_off, 0);
    // b's event of the same id and its SET do not reach a: a's wait times out.
    assert_eq!(bo.event, oa.event);
    let mut s = KfdIoctlSetEventArgs {
        event_id: bo.event,
        pad: 0,
    };
    io(h, b, cb, AMDKFD_IOC_SET_EVENT, &mut s, vec![]).unwrap();
    let mut ed = KfdEventData::new_zeroed();
    ed.event_id = oa.event;
    let mut w = KfdIoctlWaitEventsArgs {
        events_ptr: 0x1000,
        num_events: 1,
        wait_for_all: 0,
        timeout: 0,
        wait_result: 0,
    };
    io(
        h,
        a,
        ca,
        AMDKFD_IOC_WAIT_EVENTS,
        &mut w,
        vec![("events_ptr", ed.as_bytes().to_vec())],
    )
    .unwrap();
    assert_eq!(w.wait_result, KFD_IOC_WAIT_RESULT_TIMEOUT);
    // b frees its buffer (after unmapping); a's identical handle still names a's buffer.
    let mut um = KfdIoctlUnmapMemoryFromGpuArgs {
        handle: bo.buf,
        device_ids_array_ptr: 0x1000,
        n_devices: 1,
        n_success: 0,
    };
    let ids = u32s(&[h.gpu_id(0)]);
    io(
        h,
        b,
        cb,
        AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU,
        &mut um,
        vec![("device_ids_array_ptr", ids)],
    )
    .unwrap();
    let mut f = KfdIoctlFreeMemoryOfGpuArgs { handle: bo.buf };
    assert_eq!(
        io(h, b, cb, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut f, vec![]),
        Ok(())
    );
    let mut f = KfdIoctlFreeMemoryOfGpuArgs { handle: oa.buf };
    assert_eq!(
        io(h, a, ca, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut f, vec![]),
        Err(Errno::EBUSY),
        "a's buffer is still there, and still mapped"
    );
    let mut dq = KfdIoctlDestroyQueueArgs {
        queue_id: oa.queue,
        pad: 0,
    };
    assert_eq!(
        io(h, a, ca, AMDKFD_IOC_DESTROY_QUEUE, &mut dq, vec![]),
        Ok(())
    );
}

#[test]
fn two_contexts_in_one_process() {
    let h = Harness::new("gfx90a:2");
    let (a, b) = (h.open_kfd(), h.open_kfd());
    let oa = populate(&h, &*a, h.caller);
    assert_isolated(&h, &*a, h.caller, &*b, h.caller, &oa);
    // SVM ranges are per context too: b reads the defaults where a set a preferred GPU.
    let m = Mapping::new(PAGE as usize);
    let svm = |ctx: &dyn DeviceContext, op: u32, v: u32| {
        let mut bytes = KfdIoctlSvmArgs {
            start_addr: m.addr,
            size: PAGE,
            op,
            nattr: 1,
        }
        .as_bytes()
        .to_vec();
        bytes.extend_from_slice(&KFD_IOCTL_SVM_ATTR_PREFERRED_LOC.to_le_bytes());
        bytes.extend_from_slice(&v.to_le_bytes());
        let r = h.call(
            ctx,
            make_call(AMDKFD_IOC_SVM + (8 << 16), &bytes, vec![], h.caller),
        );
        assert_eq!(r.result, Ok(()));
        u32::from_le_bytes(r.call.arg[28..32].try_into().unwrap())
    };
    svm(&*a, KFD_IOCTL_SVM_OP_SET_ATTR, h.gpu_id(1));
    assert_eq!(svm(&*a, KFD_IOCTL_SVM_OP_GET_ATTR, 0), h.gpu_id(1));
    assert_eq!(
        svm(&*b, KFD_IOCTL_SVM_OP_GET_ATTR, 0),
        KFD_IOCTL_SVM_LOCATION_UNDEFINED
    );
}

#[test]
fn contexts_of_two_processes() {
    let h = Harness::new("gfx90a:2");
    // The second process: this test's parent (a real, different tgid).
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() } as u32;
    let other = Caller {
        pid: ppid,
        tgid: ppid,
        uid: 1001,
        gid: 1001,
    };
    let a = h.open_kfd();
    let b = h.dev.open(&other, FileKind::Kfd).unwrap();
    let oa = populate(&h, &*a, h.caller);
    assert_isolated(&h, &*a, h.caller, &*b, other, &oa);
    // Each process has its own memory: the memfds differ.
    let ma = h.dev.process_memory(h.caller.tgid).unwrap();
    let mb = h.dev.process_memory(ppid).unwrap();
    use std::os::fd::AsRawFd;
    let ino = |fd: i32| {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on a live fd into a zeroed stat.
        assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
        st.st_ino
    };
    assert_ne!(
        ino(ma.backing_fd().as_raw_fd()),
        ino(mb.backing_fd().as_raw_fd())
    );
}

// ---- through the FUSE transport ------------------------------------------------------------

#[test]
fn two_opens_through_fuse_are_isolated() {
    if !common::require(
        common::is_root() && common::have_fuse(),
        "root and /dev/fuse",
    ) {
        return;
    }
    let d = common::Daemon::start("gfx90a:1");
    common::assert_two_opens_isolated(&d.mount, &|| d.log_text());
}
