//! The access policy (issue 9): who may open, per-context quotas, per-uid context limits,
//! operations on other processes, bounded counts. Most tests drive the policy layer over the
//! real sim; `*_over_the_wire` ones go through the FUSE/CUSE engine; `daemon_*` ones run the
//! daemon on a real FUSE mount (root + /dev/fuse; skipped elsewhere, mandatory under CI).

mod common;
#[path = "../fuzz/src/kernel.rs"]
mod kernel;
mod sec_daemon;
#[path = "sim_helpers.rs"]
mod sim_helpers;

use std::sync::Arc;

use kfdmux::abi::*;
use kfdmux::device::{Caller, Device, DeviceContext, FileKind};
use kfdmux::errno::Errno;
use kfdmux::mux::Mux;
use kfdmux::policy::{self, Policy, PolicyDevice, Quotas};
use sim_helpers::*;

const VRAM: u32 = KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
const GTT: u32 = KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
const MIB: u64 = 1 << 20;

fn caller(uid: u32, gid: u32) -> Caller {
    Caller {
        pid: tgid(),
        tgid: tgid(),
        uid,
        gid,
    }
}

/// A pid no process has (above any pid_max): its capabilities read as none.
const NOPID: u32 = 0x3FFF_FFF0;

/// A kfd context through the policy with every GPU's VM acquired (render fds 10+i).
fn open_bound(h: &Harness, dev: &PolicyDevice) -> Box<dyn DeviceContext> {
    let ctx = dev.open(&h.caller, FileKind::Kfd).expect("open kfd");
    h.acquire_all(&*ctx);
    ctx
}

fn alloc(
    h: &Harness,
    ctx: &dyn DeviceContext,
    flags: u32,
    size: u64,
    va: u64,
) -> Result<u64, Errno> {
    let mut a = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: va,
        size,
        handle: 0,
        mmap_offset: 0,
        gpu_id: h.gpu_id(0),
        flags,
    };
    h.io0(ctx, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut a)
        .map(|_| a.handle)
}

fn free(h: &Harness, ctx: &dyn DeviceContext, handle: u64) -> Result<(), Errno> {
    let mut a = KfdIoctlFreeMemoryOfGpuArgs { handle };
    h.io0(ctx, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut a)
}

fn create_event(h: &Harness, ctx: &dyn DeviceContext) -> Result<u32, Errno> {
    let mut a = KfdIoctlCreateEventArgs {
        event_page_offset: 0,
        event_trigger_data: 0,
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 1,
        node_id: 0,
        event_id: 0,
        event_slot_index: 0,
    };
    h.io0(ctx, AMDKFD_IOC_CREATE_EVENT, &mut a)
        .map(|_| a.event_id)
}

#[test]
fn open_refused_for_users_and_groups_not_allowed() {
    let h = Harness::new("gfx90a:1");
    let p = Policy {
        allow_users: Some(vec![1000]),
        allow_groups: Some(vec![2000]),
        ..Default::default()
    };
    let dev = PolicyDevice::new(h.dev.clone(), p);
    assert!(
        dev.open(&caller(1000, 1000), FileKind::Kfd).is_ok(),
        "listed user"
    );
    assert!(
        dev.open(&caller(3000, 2000), FileKind::Kfd).is_ok(),
        "member of a listed group"
    );
    assert!(dev.open(&caller(0, 0), FileKind::Kfd).is_ok(), "root");
    for kind in [FileKind::Kfd, FileKind::Render(0)] {
        assert_eq!(
            dev.open(&caller(3000, 3000), kind).err(),
            Some(Errno::EACCES),
            "{kind:?}"
        );
    }
    let s: std::collections::HashMap<_, _> = dev.stats().into_iter().collect();
    assert_eq!(s["policy_denied_opens"], 2);
    // Through the mux, as the transports call it: the errno reaches the open() reply.
    let mux = Mux::new(Arc::new(dev));
    assert_eq!(
        mux.open(caller(3000, 3000), FileKind::Kfd),
        Err(Errno::EACCES)
    );
}

#[test]
fn open_refused_over_the_wire() {
    // The FUSE engine + FuseFs + mux + policy + sim, the kernel played over a socketpair.
    let h = Harness::new("gfx90a:1");
    let p = Policy {
        allow_users: Some(vec![1000]),
        ..Default::default()
    };
    let mux = Mux::new(policy::wrap(h.dev.clone(), p));
    let fs = kfdmux::transport::fusefs::FuseFs::new(mux.clone());
    let mut k = kernel::FakeKernel::fuse(fs);
    let me = std::process::id();
    let lookup = |k: &mut kernel::FakeKernel, ids| {
        let r = k.call(kfdmux::transport::wire::FUSE_LOOKUP, 1, ids, b"kfd\0");
        assert_eq!(r.hdr.error, 0);
        u64::from_le_bytes(r.body[..8].try_into().unwrap())
    };
    let node = lookup(&mut k, (3000, 3000, me));
    assert_eq!(k.open(node, (3000, 3000, me)), Err(libc::EACCES));
    let fh = k.open(node, (1000, 1000, me)).expect("allowed user opens");
    assert!(mux.stats_text().contains("contexts 1"));
    k.release(node, fh, (1000, 1000, me));
    assert!(mux.stats_text().contains("contexts 0"));
}

#[test]
fn memory_quota_counts_vram_and_gtt_per_context() {
    let h = Harness::new("gfx90a:1");
    let q = Quotas {
        mem_bytes: Some(8 * MIB),
        ..Default::default()
    };
    let dev = PolicyDevice::new(
        h.dev.clone(),
        Policy {
            quotas: q,
            ..Default::default()
        },
    );
    let ctx = open_bound(&h, &dev);
    let a = alloc(&h, &*ctx, VRAM, 4 * MIB, 0x1000_0000).expect("4 MiB VRAM");
    let b =
        alloc(&h, &*ctx, GTT, 4 * MIB - 4095, 0x2000_0000).expect("4 MiB GTT (page-aligned size)");
    assert_eq!(
        alloc(&h, &*ctx, GTT, 1, 0x3000_0000),
        Err(Errno::ENOMEM),
        "over the quota"
    );
    // A failed FREE returns nothing; a good one returns its bytes.
    assert!(free(&h, &*ctx, 0xdead).is_err());
    assert_eq!(alloc(&h, &*ctx, GTT, 1, 0x3000_0000), Err(Errno::ENOMEM));
    free(&h, &*ctx, a).unwrap();
    let c = alloc(&h, &*ctx, VRAM, 4 * MIB, 0x3000_0000).expect("room again after FREE");
    // Another context has its own quota.
    let ctx2 = open_bound(&h, &dev);
    let d = alloc(&h, &*ctx2, VRAM, 8 * MIB, 0x1000_0000).expect("second context");
    // CREATE_PROCESS frees what the context held: its ledger starts again.
    let mut cp = KfdIoctlCreateProcessArgs { flags: 0, pad: 0 };
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_CREATE_PROCESS_ROCM, &mut cp),
        Ok(())
    );
    let ctx_ = &*ctx;
    for i in 0..h.dev.gpus().len() {
        let mut a = KfdIoctlAcquireVmArgs {
            drm_fd: 10 + i as u32,
            gpu_id: h.gpu_id(i),
        };
        assert_eq!(h.io0(ctx_, AMDKFD_IOC_ACQUIRE_VM, &mut a), Ok(()));
    }
    alloc(&h, ctx_, VRAM, 8 * MIB, 0x1000_0000).expect("fresh ledger after CREATE_PROCESS");
    let s: std::collections::HashMap<_, _> = dev.stats().into_iter().collect();
    assert_eq!(s["policy_quota_rejects"], 2);
    let _ = (b, c, d);
    ctx.release();
    ctx2.release();
    assert_eq!(h.stat("buffer_bytes"), 0);
}

#[test]
fn event_quota_gives_enospc_and_frees_on_destroy() {
    let h = Harness::new("gfx90a:1");
    let q = Quotas {
        events: Some(2),
        ..Default::default()
    };
    let dev = PolicyDevice::new(
        h.dev.clone(),
        Policy {
            quotas: q,
            ..Default::default()
        },
    );
    let ctx = dev.open(&h.caller, FileKind::Kfd).unwrap();
    let e1 = create_event(&h, &*ctx).unwrap();
    create_event(&h, &*ctx).unwrap();
    assert_eq!(create_event(&h, &*ctx), Err(Errno::ENOSPC));
    let mut d = KfdIoctlDestroyEventArgs {
        event_id: e1,
        pad: 0,
    };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_DESTROY_EVENT, &mut d), Ok(()));
    create_event(&h, &*ctx).expect("room after DESTROY_EVENT");
    ctx.release();
    assert_eq!(h.stat("events"), 0);
}

fn create_queue(h: &Harness, ctx: &dyn DeviceContext, va: u64) -> Result<u32, Errno> {
    let mut a: KfdIoctlCreateQueueArgs = zerocopy::FromZeros::new_zeroed();
    a.gpu_id = h.gpu_id(0);
    a.queue_type = KFD_IOC_QUEUE_TYPE_COMPUTE_AQL;
    a.queue_percentage = 100;
    a.ring_base_address = va;
    a.ring_size = 4096;
    a.read_pointer_address = va + 0x8000;
    a.write_pointer_address = va + 0x8008;
    h.io0(ctx, AMDKFD_IOC_CREATE_QUEUE, &mut a)
        .map(|_| a.queue_id)
}

#[test]
fn queue_quota_gives_enospc() {
    let h = Harness::new("gfx90a:1");
    let zero = PolicyDevice::new(
        h.dev.clone(),
        Policy {
            quotas: Quotas {
                queues: Some(0),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let ctx = open_bound(&h, &zero);
    assert_eq!(
        create_queue(&h, &*ctx, 0x1000_0000),
        Err(Errno::ENOSPC),
        "quota 0: refused before the device"
    );
    ctx.release();

    let one = PolicyDevice::new(
        h.dev.clone(),
        Policy {
            quotas: Quotas {
                queues: Some(1),
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let ctx = open_bound(&h, &one);
    // Queue memory: a GTT buffer mapped on GPU 0 holding ring, rptr and wptr, plus doorbells.
    let bo = alloc(&h, &*ctx, GTT, 64 * 1024, 0x1000_0000).unwrap();
    let mut m = KfdIoctlMapMemoryToGpuArgs {
        handle: bo,
        device_ids_array_ptr: 0x10_0000,
        n_devices: 1,
        n_success: 0,
    };
    let (r, _) = h.io(
        &*ctx,
        AMDKFD_IOC_MAP_MEMORY_TO_GPU,
        &mut m,
        vec![("device_ids_array_ptr", u32s(&[h.gpu_id(0)]))],
    );
    assert_eq!(r, Ok(()));
    let _ = alloc(
        &h,
        &*ctx,
        KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL,
        8192,
        0x2000_0000,
    );
    match create_queue(&h, &*ctx, 0x1000_0000) {
        Ok(id) => {
            assert_eq!(
                create_queue(&h, &*ctx, 0x1000_0000),
                Err(Errno::ENOSPC),
                "second queue over quota 1"
            );
            let mut d = KfdIoctlDestroyQueueArgs {
                queue_id: id,
                pad: 0,
            };
            assert_eq!(h.io0(&*ctx, AMDKFD_IOC_DESTROY_QUEUE, &mut d), Ok(()));
            create_queue(&h, &*ctx, 0x1000_0000).expect("room after DESTROY_QUEUE");
        }
        Err(e) => {
            // A device that cannot create this queue: a failed create must not use the quota.
            assert_ne!(e, Errno::ENOSPC);
            assert_eq!(create_queue(&h, &*ctx, 0x1000_0000), Err(e));
        }
    }
    ctx.release();
}

#[test]
fn contexts_per_uid_limit_gives_enospc() {
    let h = Harness::new("gfx90a:1");
    let dev = PolicyDevice::new(
        h.dev.clone(),
        Policy {
            max_contexts_per_uid: Some(2),
            ..Default::default()
        },
    );
    let a = dev.open(&caller(1000, 1000), FileKind::Kfd).unwrap();
    let b = dev.open(&caller(1000, 1000), FileKind::Kfd).unwrap();
    assert_eq!(
        dev.open(&caller(1000, 1000), FileKind::Kfd).err(),
        Some(Errno::ENOSPC)
    );
    let _r = dev
        .open(&caller(1000, 1000), FileKind::Render(0))
        .expect("render opens are not contexts");
    let c = dev
        .open(&caller(1001, 1001), FileKind::Kfd)
        .expect("another uid");
    assert_eq!(dev.contexts_of(1000), 2);
    a.release();
    let d = dev
        .open(&caller(1000, 1000), FileKind::Kfd)
        .expect("slot back after release");
    drop(b); // dropped without RELEASE (a dead transport) also gives the slot back
    assert_eq!(dev.contexts_of(1000), 1);
    drop((c, d));
    assert_eq!(dev.contexts_of(1000) + dev.contexts_of(1001), 0);
}

/// This test process's effective capabilities include CAP_SYS_ADMIN (root in CI).
fn i_am_admin() -> bool {
    policy::process_caps(std::process::id()) & (1 << 21) != 0
}

#[test]
fn criu_and_debugger_on_other_processes_refused() {
    let h = Harness::new("gfx90a:1");
    let dev = PolicyDevice::new(
        h.dev.clone(),
        Policy {
            max_contexts_per_uid: Some(64),
            ..Default::default()
        },
    );
    let ctx = dev.open(&h.caller, FileKind::Kfd).unwrap();
    // CRIU_OP from a caller without CAP_CHECKPOINT_RESTORE/CAP_SYS_ADMIN: EACCES.
    let mut c: KfdIoctlCriuArgs = zerocopy::FromZeros::new_zeroed();
    c.pid = NOPID;
    let nocap = Caller {
        pid: NOPID,
        tgid: NOPID,
        uid: 1000,
        gid: 1000,
    };
    let call = make_call(
        AMDKFD_IOC_CRIU_OP,
        zerocopy::IntoBytes::as_bytes(&c),
        Vec::new(),
        nocap,
    );
    assert_eq!(h.call(&*ctx, call).result, Err(Errno::EACCES));
    // A capable caller (this process, when root) still cannot name another process.
    let me = std::process::id();
    if i_am_admin() {
        let call_as_me = |cmd: u32, arg: &[u8]| {
            let mut call = make_call(
                cmd,
                arg,
                Vec::new(),
                Caller {
                    pid: me,
                    tgid: me,
                    uid: 0,
                    gid: 0,
                },
            );
            call.caller = Caller {
                pid: me,
                tgid: me,
                uid: 0,
                gid: 0,
            };
            h.call(&*ctx, call).result
        };
        c.pid = 1;
        assert_eq!(
            call_as_me(AMDKFD_IOC_CRIU_OP, zerocopy::IntoBytes::as_bytes(&c)),
            Err(Errno::EPERM)
        );
        c.pid = me;
        let own = call_as_me(AMDKFD_IOC_CRIU_OP, zerocopy::IntoBytes::as_bytes(&c));
        assert!(
            own != Err(Errno::EPERM) && own != Err(Errno::EACCES),
            "own pid reaches the device: {own:?}"
        );
    } else {
        eprintln!("not CAP_SYS_ADMIN: the capable-caller half of this test is skipped");
    }
    // DBG_TRAP, the old ROCm DBG_TRAP and CROSS_MEMORY_COPY naming another pid: EPERM.
    let mut d: KfdIoctlDbgTrapArgs = zerocopy::FromZeros::new_zeroed();
    d.pid = 1;
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_DBG_TRAP, &mut d), Err(Errno::EPERM));
    d.pid = tgid();
    assert_ne!(
        h.io0(&*ctx, AMDKFD_IOC_DBG_TRAP, &mut d),
        Err(Errno::EPERM),
        "own pid reaches the device"
    );
    let mut old: KfdIoctlDbgTrapArgsDeprecated = zerocopy::FromZeros::new_zeroed();
    old.pid = 1;
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_DBG_TRAP_DEPRECATED, &mut old),
        Err(Errno::EPERM)
    );
    let mut x: KfdIoctlCrossMemoryCopyArgs = zerocopy::FromZeros::new_zeroed();
    x.pid = 1;
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_CROSS_MEMORY_COPY, &mut x),
        Err(Errno::EPERM)
    );
    let s: std::collections::HashMap<_, _> = dev.stats().into_iter().collect();
    assert!(s["policy_other_process_rejects"] >= 4);
}

#[test]
fn counts_are_bounded() {
    let h = Harness::new("gfx90a:2");
    let dev = PolicyDevice::new(
        h.dev.clone(),
        Policy {
            max_contexts_per_uid: Some(64),
            ..Default::default()
        },
    );
    let ctx = open_bound(&h, &dev);
    let bo = alloc(&h, &*ctx, GTT, 4096, 0x1000_0000).unwrap();
    // n_devices beyond the GPUs present (2).
    let ids = u32s(&[h.gpu_id(0), h.gpu_id(1), h.gpu_id(0)]);
    let mut m = KfdIoctlMapMemoryToGpuArgs {
        handle: bo,
        device_ids_array_ptr: 0x10_0000,
        n_devices: 3,
        n_success: 0,
    };
    let (r, _) = h.io(
        &*ctx,
        AMDKFD_IOC_MAP_MEMORY_TO_GPU,
        &mut m,
        vec![("device_ids_array_ptr", ids.clone())],
    );
    assert_eq!(r, Err(Errno::EINVAL));
    m.n_devices = 2;
    let (r, _) = h.io(
        &*ctx,
        AMDKFD_IOC_MAP_MEMORY_TO_GPU,
        &mut m,
        vec![("device_ids_array_ptr", ids[..8].to_vec())],
    );
    assert_eq!(r, Ok(()), "two GPUs are fine");
    // num_events beyond KFD_SIGNAL_EVENT_LIMIT.
    let mut w = KfdIoctlWaitEventsArgs {
        events_ptr: 0x10_0000,
        num_events: KFD_SIGNAL_EVENT_LIMIT + 1,
        wait_for_all: 0,
        timeout: 0,
        wait_result: 0,
    };
    assert_eq!(
        h.io0(&*ctx, AMDKFD_IOC_WAIT_EVENTS, &mut w),
        Err(Errno::EINVAL)
    );
    // SVM nattr beyond the attributes the command carries (none in the bare 24-byte command).
    let mut s = KfdIoctlSvmArgs {
        start_addr: 0x1000_0000,
        size: 4096,
        op: 0,
        nattr: 5,
    };
    assert_eq!(h.io0(&*ctx, AMDKFD_IOC_SVM, &mut s), Err(Errno::EINVAL));
    // Array bytes beyond the marshaller's limit never reach a device.
    let sd = kfdmux::abi::kfd_ioctl(0x0C).unwrap().variants[0]
        .arg
        .unwrap();
    let mut raw = vec![0u8; sd.size];
    sd.set(&mut raw, "events_ptr", 0x10_0000);
    sd.set(&mut raw, "num_events", u32::MAX as u64);
    assert_eq!(kfdmux::marshal::plan(sd, &raw).err(), Some(Errno::EINVAL));
    let st: std::collections::HashMap<_, _> = dev.stats().into_iter().collect();
    assert_eq!(st["policy_bound_rejects"], 3);
    ctx.release();
}

#[test]
fn serve_flags_build_the_policy() {
    use clap::Parser;
    #[derive(Parser)]
    struct W {
        #[command(flatten)]
        o: kfdmux::daemon::ServeOptions,
    }
    let w = W::try_parse_from([
        "serve",
        "--mount",
        "/tmp/x",
        "--allow-users",
        "root,1000",
        "--allow-groups",
        "0",
        "--quota-mem",
        "512M",
        "--quota-queues",
        "8",
        "--quota-events",
        "256",
        "--max-contexts-per-uid",
        "4",
    ])
    .expect("flags parse");
    let p = w.o.policy().expect("policy");
    assert_eq!(p.allow_users, Some(vec![0, 1000]));
    assert_eq!(p.allow_groups, Some(vec![0]));
    assert_eq!(
        p.quotas,
        Quotas {
            mem_bytes: Some(512 * MIB),
            queues: Some(8),
            events: Some(256)
        }
    );
    assert_eq!(p.max_contexts_per_uid, Some(4));
    let w = W::try_parse_from(["serve", "--mount", "/tmp/x"]).unwrap();
    assert!(w.o.policy().unwrap().is_open(), "no flags: no policy layer");
    assert!(W::try_parse_from(["serve", "--mount", "/tmp/x", "--quota-mem", "12Q"]).is_err());
}

#[test]
fn daemon_context_limit_on_a_real_mount() {
    use std::os::unix::fs::OpenOptionsExt;
    if !common::require(
        common::is_root() && common::have_fuse(),
        "root and /dev/fuse",
    ) {
        return;
    }
    let dir = common::TempDir::new("kfdmux-policy");
    let d = sec_daemon::SecDaemon::start(
        &dir.path().join("mnt"),
        "gfx90a:1",
        &["--max-contexts-per-uid", "2"],
    );
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(d.mount.join("kfd"))
    };
    let a = open().expect("first");
    let b = open().expect("second");
    let e = open().expect_err("third over the limit");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    drop(a);
    // RELEASE is asynchronous to close(): give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let c = loop {
        match open() {
            Ok(f) => break f,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("slot not given back after close: {e}"),
        }
    };
    assert!(d.stats()["policy_context_limit_rejects"] >= 1);
    drop((b, c));
}
