//! Faults (issue 9): clients killed mid-call or holding memory, many open/alloc/close cycles,
//! the daemon killed with SIGKILL, clients racing their own memory between CUSE retry rounds.
//!
//! `real_*` tests run the daemon on a real FUSE mount (root + /dev/fuse: skipped elsewhere,
//! mandatory under CI=true); clients are forked children that only make raw syscalls. `cuse_*`
//! tests play the kernel's side of CUSE over a socketpair (the same harness as the fuzz targets).
//! Every resource check reads the daemon's stats (contexts, buffers, bytes, events, waiters).

mod common;
#[path = "../fuzz/src/kernel.rs"]
mod kernel;
mod sec_daemon;

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{fork_client, fork_parked_waiter, kill_and_reap, raw_ioctl};
use kernel::*;
use kfdmux::abi::*;
use kfdmux::transport::wire::*;
use sec_daemon::SecDaemon;
use zerocopy::{FromBytes, IntoBytes};

fn real_ok() -> bool {
    common::require(
        common::is_root() && common::have_fuse(),
        "root and /dev/fuse",
    )
}

/// Polls `cond` on the daemon's stats for up to 5 s; the last stats on failure.
fn wait_stats(
    d: &SecDaemon,
    what: &str,
    cond: impl Fn(&HashMap<String, u64>) -> bool,
) -> HashMap<String, u64> {
    common::wait_stats_at(&d.mount, what, cond, &|| d.log_text())
}

/// Nothing of a client left: the counters the fuzzer's `leaked` checks are all zero.
fn released(s: &HashMap<String, u64>) -> bool {
    leaked(&s.iter().map(|(k, v)| (k.clone(), *v)).collect()).is_empty()
}

fn gpu_id(mount: &Path) -> u32 {
    let p = kfdmux::run::sysfs_dir_for(mount).join("kfd/topology/nodes/1/gpu_id");
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .unwrap()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

#[test]
fn real_client_killed_while_parked_in_wait_events_is_released() {
    if !real_ok() {
        return;
    }
    let dir = common::TempDir::new("kfdmux-faults");
    let d = SecDaemon::start(&dir.path().join("mnt"), "gfx90a:1", &[]);
    let kfd = cpath(&d.mount.join("kfd"));
    let pid = fork_parked_waiter(&kfd);
    let before = wait_stats(&d, "client parked", |s| {
        s["waiters"] == 1 && s["events"] == 1
    });
    kill_and_reap(pid);
    let after = wait_stats(&d, "killed client released", released);
    println!(
        "parked client: before kill {:?}, after {:?}",
        pick(&before),
        pick(&after)
    );
}

fn pick(s: &HashMap<String, u64>) -> Vec<(&'static str, u64)> {
    [
        "contexts",
        "render_contexts",
        "buffers",
        "buffer_bytes",
        "events",
        "waiters",
    ]
    .into_iter()
    .map(|k| (k, s.get(k).copied().unwrap_or(0)))
    .collect()
}

#[test]
fn real_client_killed_holding_mapped_memory_is_released() {
    if !real_ok() {
        return;
    }
    let dir = common::TempDir::new("kfdmux-faults");
    let d = SecDaemon::start(&dir.path().join("mnt"), "gfx90a:1", &[]);
    let gid = gpu_id(&d.mount);
    let kfd = cpath(&d.mount.join("kfd"));
    let render = cpath(&d.mount.join("renderD128"));
    let size = 2u64 << 20;
    let mut acq = KfdIoctlAcquireVmArgs {
        drm_fd: 0,
        gpu_id: gid,
    };
    let mut al = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: 0x7f00_0000_0000 & !0xFFFF,
        size,
        handle: 0,
        mmap_offset: 0,
        gpu_id: gid,
        flags: KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE,
    };
    let mut al2 = KfdIoctlAllocMemoryOfGpuArgs {
        flags: KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE,
        va_addr: 0x7e00_0000_0000,
        ..al
    };
    let ids = [gid];
    let mut map = KfdIoctlMapMemoryToGpuArgs {
        handle: 0,
        device_ids_array_ptr: ids.as_ptr() as u64,
        n_devices: 1,
        n_success: 0,
    };
    let (pid, how) = fork_client(|ready| unsafe {
        let fd = libc::open(kfd.as_ptr(), libc::O_RDWR);
        let rfd = libc::open(render.as_ptr(), libc::O_RDWR);
        if fd < 0 || rfd < 0 {
            return 1;
        }
        acq.drm_fd = rfd as u32;
        if raw_ioctl(fd, AMDKFD_IOC_ACQUIRE_VM, &mut acq) != 0
            || raw_ioctl(fd, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut al) != 0
            || raw_ioctl(fd, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut al2) != 0
        {
            return 2;
        }
        map.handle = al.handle;
        if raw_ioctl(fd, AMDKFD_IOC_MAP_MEMORY_TO_GPU, &mut map) != 0 {
            return 3;
        }
        // CPU mapping of the GTT buffer through the render node (FUSE passthrough).
        let p = libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rfd,
            al.mmap_offset as i64,
        );
        let mapped = if p != libc::MAP_FAILED {
            *(p as *mut u64) = 0x5eed;
            b"m"
        } else {
            b"u"
        };
        libc::write(ready, mapped.as_ptr().cast(), 1);
        loop {
            libc::pause();
        }
    });
    let before = wait_stats(&d, "client holds memory", |s| {
        s["buffers"] == 2 && s["buffer_bytes"] >= 2 * size
    });
    kill_and_reap(pid);
    let after = wait_stats(&d, "killed client released", released);
    let how = if how == b'm' {
        "CPU-mapped (passthrough)"
    } else {
        "not CPU-mapped: no FUSE passthrough"
    };
    println!(
        "client holding memory ({how}): before kill {:?}, after {:?}",
        pick(&before),
        pick(&after)
    );
}

/// One raw ioctl on an fd we own (this process).
fn ioctl<T: IntoBytes + FromBytes>(fd: i32, cmd: u32, a: &mut T) -> Result<(), i32> {
    // SAFETY: `a` is a valid, writable argument struct of the size `cmd` encodes.
    let r = unsafe { libc::ioctl(fd, cmd as _, a as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

#[test]
fn real_ten_thousand_open_alloc_close_cycles_keep_daemon_memory_flat() {
    if !real_ok() {
        return;
    }
    let dir = common::TempDir::new("kfdmux-faults");
    let d = SecDaemon::start(&dir.path().join("mnt"), "gfx90a:1", &[]);
    let gid = gpu_id(&d.mount);
    let kfd = d.mount.join("kfd");
    let render = d.mount.join("renderD128");
    let cycle = || {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&kfd)
            .expect("open kfd");
        let r = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&render)
            .expect("open render");
        let mut acq = KfdIoctlAcquireVmArgs {
            drm_fd: r.as_raw_fd() as u32,
            gpu_id: gid,
        };
        ioctl(f.as_raw_fd(), AMDKFD_IOC_ACQUIRE_VM, &mut acq).expect("ACQUIRE_VM");
        let mut al = KfdIoctlAllocMemoryOfGpuArgs {
            va_addr: 0x1000_0000,
            size: 64 * 1024,
            handle: 0,
            mmap_offset: 0,
            gpu_id: gid,
            flags: KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE,
        };
        ioctl(f.as_raw_fd(), AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut al).expect("ALLOC");
        // Closed holding the buffer: RELEASE must free it.
    };
    for _ in 0..1000 {
        cycle();
    }
    wait_stats(&d, "warm-up released", released);
    let rss0 = d.rss_kb();
    let t = Instant::now();
    for _ in 0..10_000 {
        cycle();
    }
    let s = wait_stats(&d, "10,000 cycles released", released);
    let rss1 = d.rss_kb();
    println!(
        "10,000 open/alloc/close cycles in {:.1} s: daemon VmRSS {rss0} kB -> {rss1} kB ({:+} kB); opens_total {}",
        t.elapsed().as_secs_f64(),
        rss1 as i64 - rss0 as i64,
        s["opens_total"]
    );
    assert!(
        rss1 < rss0 + 2048,
        "daemon RSS grew by {} kB over 10,000 cycles",
        rss1 - rss0
    );
    assert_eq!(s["vram_used_gpu0"], 0);
}

#[test]
fn real_daemon_sigkill_gives_enotconn_and_a_restarted_daemon_serves() {
    if !real_ok() {
        return;
    }
    let dir = common::TempDir::new("kfdmux-faults");
    let mount = dir.path().join("mnt");
    let mut d = SecDaemon::start(&mount, "gfx90a:1", &[]);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.join("kfd"))
        .unwrap();
    let fd = f.as_raw_fd();
    let mut v = KfdIoctlGetVersionArgs {
        major_version: 0,
        minor_version: 0,
    };
    ioctl(fd, AMDKFD_IOC_GET_VERSION, &mut v).unwrap();
    assert_eq!(v.major_version, 1);
    // A second client parked in WAIT_EVENTS when the daemon dies.
    let mut ev = KfdIoctlCreateEventArgs {
        event_page_offset: 0,
        event_trigger_data: 0,
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 1,
        node_id: 0,
        event_id: 0,
        event_slot_index: 0,
    };
    ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &mut ev).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let eid = ev.event_id;
    std::thread::spawn(move || {
        let mut data: KfdEventData = zerocopy::FromZeros::new_zeroed();
        data.event_id = eid;
        let mut w = KfdIoctlWaitEventsArgs {
            events_ptr: &mut data as *mut KfdEventData as u64,
            num_events: 1,
            wait_for_all: 0,
            timeout: u32::MAX,
            wait_result: 0,
        };
        let _ = tx.send(ioctl(fd, AMDKFD_IOC_WAIT_EVENTS, &mut w));
    });
    wait_stats(&d, "waiter parked", |s| s["waiters"] == 1);
    let t = Instant::now();
    d.kill9();
    let parked = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the parked WAIT_EVENTS returned");
    let parked_after = t.elapsed();
    let r = ioctl(fd, AMDKFD_IOC_GET_VERSION, &mut v);
    let new_after = t.elapsed();
    let ok_errs = [libc::ENOTCONN, libc::ENODEV, libc::ECONNABORTED];
    assert!(
        matches!(parked, Err(e) if ok_errs.contains(&e)),
        "parked call after SIGKILL: {parked:?}"
    );
    assert!(
        matches!(r, Err(e) if ok_errs.contains(&e)),
        "new call after SIGKILL: {r:?}"
    );
    assert!(
        new_after < Duration::from_secs(5),
        "answers took {new_after:?}"
    );
    println!(
        "daemon SIGKILL: parked WAIT_EVENTS -> errno {:?} after {parked_after:?}, new ioctl -> errno {:?} after {new_after:?}",
        parked.err(),
        r.err()
    );
    drop(f);
    // A restarted daemon detaches the dead mount and serves new opens on the same dir.
    let d2 = SecDaemon::start(&mount, "gfx90a:1", &[]);
    let f2 = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mount.join("kfd"))
        .expect("open after restart");
    let mut v2 = KfdIoctlGetVersionArgs {
        major_version: 0,
        minor_version: 0,
    };
    ioctl(f2.as_raw_fd(), AMDKFD_IOC_GET_VERSION, &mut v2).expect("GET_VERSION after restart");
    assert_eq!(v2.major_version, 1);
    assert_eq!(d2.stats()["contexts"], 1);
}

// ---- CUSE at wire level: retry rounds --------------------------------------------------------

struct Cuse {
    k: FakeKernel,
    mux: Arc<kfdmux::mux::Mux>,
    ids: (u32, u32, u32),
    fh: u64,
}

impl Cuse {
    fn new() -> Cuse {
        let gpus = kfdmux::topology::parse_gpus("gfx90a:1").unwrap();
        let dev = kfdmux::device::sim::SimDevice::new(gpus, Default::default());
        let mux = kfdmux::mux::Mux::new(dev);
        let fs = Arc::new(kfdmux::transport::cuse::CuseFs {
            mux: mux.clone(),
            kind: kfdmux::device::FileKind::Kfd,
            env: Arc::new(Default::default()),
        });
        let mut k = FakeKernel::cuse(fs, "kfdmux-test/kfd");
        let ids = (1000, 1000, std::process::id());
        let fh = k.open(1, ids).expect("open");
        Cuse { k, mux, ids, fh }
    }

    fn round(
        &mut self,
        cmd: u32,
        arg: u64,
        in_data: &[u8],
        out_size: u32,
    ) -> (u64, Option<IoctlAnswer>) {
        let u = self.k.send_ioctl(
            1,
            self.ids,
            self.fh,
            FUSE_IOCTL_UNRESTRICTED,
            cmd,
            arg,
            in_data,
            out_size,
        );
        let a = self
            .k
            .wait_for(u, Duration::from_millis(50))
            .map(|r| parse_ioctl_reply(&r).expect("well-formed"));
        (u, a)
    }

    /// Plays every round faithfully until the final answer, copying it out like the kernel.
    fn call(&mut self, mem: &mut ClientMem, cmd: u32, arg: u64) -> IoctlAnswer {
        let (mut data, mut out, mut outs) = (Vec::new(), 0, Vec::new());
        for _ in 0..10 {
            match self.round(cmd, arg, &data, out).1.expect("answered") {
                IoctlAnswer::Retry(i, o) => {
                    (data, out) = kernel_next_round(mem, &i, &o).expect("kernel gathers");
                    outs = o;
                }
                IoctlAnswer::Done(r, d) => {
                    kernel_copy_out(mem, &outs, out, &d).expect("copy-out within the round");
                    return IoctlAnswer::Done(r, d);
                }
                e => return e,
            }
        }
        panic!("more than 10 rounds")
    }

    fn stats(&self) -> std::collections::BTreeMap<String, u64> {
        stats_map(&self.mux.stats_text())
    }
}

const STRUCT_AT: u64 = 0x1000_0000;
const ARRAY_AT: u64 = 0x2000_0000;

fn signal_event(c: &mut Cuse, mem: &mut ClientMem) -> u32 {
    let ev = KfdIoctlCreateEventArgs {
        event_page_offset: 0,
        event_trigger_data: 0,
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 0,
        node_id: 0,
        event_id: 0,
        event_slot_index: 0,
    };
    mem.map(STRUCT_AT, ev.as_bytes().to_vec());
    assert_eq!(
        c.call(mem, AMDKFD_IOC_CREATE_EVENT, STRUCT_AT),
        IoctlAnswer::Done(0, mem.read(STRUCT_AT, 32).unwrap())
    );
    KfdIoctlCreateEventArgs::read_from_bytes(&mem.read(STRUCT_AT, 32).unwrap())
        .unwrap()
        .event_id
}

fn wait_args(num: u32, ptr: u64) -> KfdIoctlWaitEventsArgs {
    KfdIoctlWaitEventsArgs {
        events_ptr: ptr,
        num_events: num,
        wait_for_all: 0,
        timeout: 0,
        wait_result: 0,
    }
}

fn event_data(ids: &[u32]) -> Vec<u8> {
    let mut v = Vec::new();
    for id in ids {
        let mut d: KfdEventData = zerocopy::FromZeros::new_zeroed();
        d.event_id = *id;
        v.extend_from_slice(d.as_bytes());
    }
    v
}

#[test]
fn cuse_client_killed_between_retry_rounds_is_released() {
    let mut c = Cuse::new();
    let mut mem = ClientMem::default();
    let e = signal_event(&mut c, &mut mem);
    mem.map(ARRAY_AT, event_data(&[e]));
    mem.map(
        STRUCT_AT + 0x100,
        wait_args(1, ARRAY_AT).as_bytes().to_vec(),
    );
    // Round 1 (nothing) -> asked for the struct; round 2 (struct) -> asked for struct + array.
    let (_, a1) = c.round(AMDKFD_IOC_WAIT_EVENTS, STRUCT_AT + 0x100, &[], 0);
    let Some(IoctlAnswer::Retry(i, o)) = a1 else {
        panic!("round 1: {a1:?}")
    };
    let (d, n) = kernel_next_round(&mem, &i, &o).unwrap();
    let (_, a2) = c.round(AMDKFD_IOC_WAIT_EVENTS, STRUCT_AT + 0x100, &d, n);
    assert!(
        matches!(a2, Some(IoctlAnswer::Retry(ref i, _)) if i.len() == 2),
        "round 2: {a2:?}"
    );
    let before = c.stats();
    assert_eq!((before["contexts"], before["events"]), (1, 1));
    // The client dies here: the kernel sends no final round, only RELEASE.
    let fh = c.fh;
    c.k.release(1, fh, c.ids);
    let after = c.stats();
    assert!(
        leaked(&after).is_empty(),
        "left after RELEASE: {:?}",
        leaked(&after)
    );
    assert!(
        !c.mux.stats_text().contains("context "),
        "no open file left"
    );
    println!("killed between rounds: before {before:?}\nafter {after:?}");
}

#[test]
fn cuse_memory_changed_between_rounds_is_reasked_and_revalidated() {
    let mut c = Cuse::new();
    let mut mem = ClientMem::default();
    let e = signal_event(&mut c, &mut mem);
    let arg = STRUCT_AT + 0x100;
    mem.map(ARRAY_AT, event_data(&[e, e]));
    mem.map(arg, wait_args(1, ARRAY_AT).as_bytes().to_vec());
    let (_, a1) = c.round(AMDKFD_IOC_WAIT_EVENTS, arg, &[], 0);
    let Some(IoctlAnswer::Retry(i, o)) = a1 else {
        panic!()
    };
    let (d, n) = kernel_next_round(&mem, &i, &o).unwrap();
    let (_, a2) = c.round(AMDKFD_IOC_WAIT_EVENTS, arg, &d, n);
    let Some(IoctlAnswer::Retry(i2, o2)) = a2 else {
        panic!("{a2:?}")
    };
    let esz = std::mem::size_of::<KfdEventData>() as u64;
    assert_eq!(i2[1].len, esz, "one kfd_event_data");
    // Between rounds the client grows num_events to 2: the kernel re-sends the new struct with
    // the old iovecs; the daemon re-plans from it and asks again instead of trusting round 2.
    mem.write(arg + 8, &2u32.to_le_bytes());
    let (d, n) = kernel_next_round(&mem, &i2, &o2).unwrap();
    let (_, a3) = c.round(AMDKFD_IOC_WAIT_EVENTS, arg, &d, n);
    let Some(IoctlAnswer::Retry(i3, o3)) = a3 else {
        panic!("changed count not re-asked: {a3:?}")
    };
    assert_eq!(i3[1].len, 2 * esz, "re-asked for two entries");
    // The final, consistent round is what runs: the event is signaled, the wait returns at once.
    let mut s = KfdIoctlSetEventArgs {
        event_id: e,
        pad: 0,
    };
    mem.map(STRUCT_AT + 0x800, s.as_bytes().to_vec());
    assert_eq!(
        c.call(&mut mem, AMDKFD_IOC_SET_EVENT, STRUCT_AT + 0x800),
        IoctlAnswer::Done(0, vec![])
    );
    let (d, n) = kernel_next_round(&mem, &i3, &o3).unwrap();
    let (_, a4) = c.round(AMDKFD_IOC_WAIT_EVENTS, arg, &d, n);
    let Some(IoctlAnswer::Done(0, out)) = a4 else {
        panic!("final round: {a4:?}")
    };
    assert!(out.len() as u32 <= n);
    kernel_copy_out(&mut mem, &o3, n, &out).unwrap();
    let w = KfdIoctlWaitEventsArgs::read_from_bytes(&mem.read(arg, 24).unwrap()).unwrap();
    assert_eq!(
        (w.num_events, w.wait_result),
        (2, KFD_IOC_WAIT_RESULT_COMPLETE)
    );

    // Re-validated: a count changed to something over the limit between rounds is refused.
    mem.write(arg + 8, &(KFD_SIGNAL_EVENT_LIMIT * 100).to_le_bytes());
    let (_, b1) = c.round(AMDKFD_IOC_WAIT_EVENTS, arg, &[], 0);
    let Some(IoctlAnswer::Retry(i, o)) = b1 else {
        panic!()
    };
    let (d, n) = kernel_next_round(&mem, &i, &o).unwrap();
    let (_, b2) = c.round(AMDKFD_IOC_WAIT_EVENTS, arg, &d, n);
    assert!(
        matches!(b2, Some(IoctlAnswer::Error(e)) if e == libc::E2BIG || e == libc::EINVAL),
        "oversized count: {b2:?}"
    );

    // A client that keeps changing its struct every round is refused after MAX_ROUNDS.
    let mut refused = None;
    let (mut d, mut n) = (Vec::new(), 0);
    for round in 0..(kfdmux::mux::MAX_ROUNDS + 4) {
        mem.write(arg + 8, &(1 + round % 2).to_le_bytes());
        match c.round(AMDKFD_IOC_WAIT_EVENTS, arg, &d, n).1 {
            Some(IoctlAnswer::Retry(i, o)) => {
                // The struct flips between rounds: gather, then flip the count again.
                (d, n) = kernel_next_round(&mem, &i, &o).unwrap();
                let flip = if d[8] == 1 { 2u32 } else { 1 };
                d[8..12].copy_from_slice(&flip.to_le_bytes());
            }
            other => {
                refused = Some((round, other));
                break;
            }
        }
    }
    let (round, ans) = refused.expect("refused eventually");
    assert_eq!(
        ans,
        Some(IoctlAnswer::Error(libc::EINVAL)),
        "after {round} rounds"
    );
    s.event_id = 0;
    let _ = s;
    let fh = c.fh;
    c.k.release(1, fh, c.ids);
    assert!(leaked(&c.stats()).is_empty());
}
