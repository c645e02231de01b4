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

use kernel::*;
use kfdmux::abi::*;
use kfdmux::transport::wire::*;
use sec_daemon::SecDaemon;
use zerocopy::{FromBytes, IntoBytes};

fn real_ok() -> bool {
    common::require(common::is_root() && common::have_fuse(), "root and /dev/fuse")
}

/// Polls `cond` on the daemon's stats for up to 5 s; the last stats on failure.
fn wait_stats(d: &SecDaemon, what: &str, cond: impl Fn(&HashMap<String, u64>) -> bool) -> HashMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = d.stats();
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: stats never got there: {s:?}\n{}", d.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn released(s: &HashMap<String, u64>) -> bool {
    ["contexts", "render_contexts", "buffers", "buffer_bytes", "events", "waiters"]
        .iter()
        .all(|k| s.get(*k).copied().unwrap_or(0) == 0)
}

fn gpu_id(mount: &Path) -> u32 {
    let p = kfdmux::run::sysfs_dir_for(mount).join("kfd/topology/nodes/1/gpu_id");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().parse().unwrap()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

/// Forks a child that runs `body` (raw syscalls only, no allocation: we are multithreaded)
/// and tells us through a pipe when it reached its blocking point (writes one byte) or
/// failed (exits). Returns its pid once it is ready.
fn fork_client(body: impl FnOnce(i32) -> i32) -> i32 {
    let mut p = [0i32; 2];
    // SAFETY: pipe writes two fds.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: the child runs only syscalls on memory prepared before the fork, then _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            libc::close(p[0]);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let code = body(p[1]);
            libc::_exit(code);
        }
    }
    assert!(pid > 0);
    // SAFETY: our end of the pipe.
    unsafe { libc::close(p[1]) };
    let mut b = 0u8;
    // SAFETY: reading one byte into `b`.
    let n = unsafe { libc::read(p[0], (&mut b as *mut u8).cast(), 1) };
    // SAFETY: closing our pipe end.
    unsafe { libc::close(p[0]) };
    if n != 1 {
        let mut st = 0;
        // SAFETY: reaping our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        panic!("client failed before its blocking point (exit status {st:#x})");
    }
    pid
}

fn kill_and_reap(pid: i32) {
    // SAFETY: our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// ioctl from a forked child: raw syscall, returns 0 or the errno.
unsafe fn raw_ioctl<T>(fd: i32, cmd: u32, arg: *mut T) -> i32 {
    if libc::ioctl(fd, cmd as _, arg) < 0 {
        *libc::__errno_location()
    } else {
        0
    }
}

#[test]
fn real_client_killed_while_parked_in_wait_events_is_released() {
    if !real_ok() {
        return;
    }
    let dir = common::TempDir::new("kfdmux-faults");
    let d = SecDaemon::start(&dir.path().join("mnt"), "gfx90a:1", &[]);
    let kfd = cpath(&d.mount.join("kfd"));
    let mut ev = KfdIoctlCreateEventArgs {
        event_page_offset: 0,
        event_trigger_data: 0,
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 1,
        node_id: 0,
        event_id: 0,
        event_slot_index: 0,
    };
    let mut data: KfdEventData = zerocopy::FromZeros::new_zeroed();
    let mut w = KfdIoctlWaitEventsArgs { events_ptr: 0, num_events: 1, wait_for_all: 0, timeout: u32::MAX, wait_result: 0 };
    let pid = fork_client(|ready| unsafe {
        let fd = libc::open(kfd.as_ptr(), libc::O_RDWR);
        if fd < 0 || raw_ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &mut ev) != 0 {
            return 1;
        }
        data.event_id = ev.event_id;
        w.events_ptr = &mut data as *mut KfdEventData as u64;
        libc::write(ready, b"r".as_ptr().cast(), 1);
        raw_ioctl(fd, AMDKFD_IOC_WAIT_EVENTS, &mut w) // parks forever
    });
    let before = wait_stats(&d, "client parked", |s| s["waiters"] == 1 && s["events"] == 1);
    kill_and_reap(pid);
    let after = wait_stats(&d, "killed client released", released);
    println!("parked client: before kill {:?}, after {:?}", pick(&before), pick(&after));
}

fn pick(s: &HashMap<String, u64>) -> Vec<(&'static str, u64)> {
    ["contexts", "render_contexts", "buffers", "buffer_bytes", "events", "waiters"]
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
    let mut acq = KfdIoctlAcquireVmArgs { drm_fd: 0, gpu_id: gid };
    let mut al = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: 0x7f00_0000_0000 & !0xFFFF,
        size,
        handle: 0,
        mmap_offset: 0,
        gpu_id: gid,
        flags: KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE,
    };
    let mut al2 = KfdIoctlAllocMemoryOfGpuArgs { flags: KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE, va_addr: 0x7e00_0000_0000, ..al };
    let ids = [gid];
    let mut map = KfdIoctlMapMemoryToGpuArgs { handle: 0, device_ids_array_ptr: ids.as_ptr() as u64, n_devices: 1, n_success: 0 };
    let pid = fork_client(|ready| unsafe {
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
        let p = libc::mmap(std::ptr::null_mut(), size as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, rfd, al.mmap_offset as i64);
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
    let before = wait_stats(&d, "client holds memory", |s| s["buffers"] == 2 && s["buffer_bytes"] >= 2 * size);
    kill_and_reap(pid);
    let after = wait_stats(&d, "killed client released", |s| released(s) && s.get("vram_used_gpu0").copied().unwrap_or(0) == 0);
    println!("client holding memory: before kill {:?}, after {:?}", pick(&before), pick(&after));
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
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&kfd).expect("open kfd");
        let r = std::fs::OpenOptions::new().read(true).write(true).open(&render).expect("open render");
        let mut acq = KfdIoctlAcquireVmArgs { drm_fd: r.as_raw_fd() as u32, gpu_id: gid };
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
    assert!(rss1 < rss0 + 2048, "daemon RSS grew by {} kB over 10,000 cycles", rss1 - rss0);
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
    let f = std::fs::OpenOptions::new().read(true).write(true).open(mount.join("kfd")).unwrap();
    let fd = f.as_raw_fd();
    let mut v = KfdIoctlGetVersionArgs { major_version: 0, minor_version: 0 };
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
    let parked = rx.recv_timeout(Duration::from_secs(10)).expect("the parked WAIT_EVENTS returned");
    let parked_after = t.elapsed();
    let r = ioctl(fd, AMDKFD_IOC_GET_VERSION, &mut v);
    let new_after = t.elapsed();
    let ok_errs = [libc::ENOTCONN, libc::ENODEV, libc::ECONNABORTED];
    assert!(matches!(parked, Err(e) if ok_errs.contains(&e)), "parked call after SIGKILL: {parked:?}");
    assert!(matches!(r, Err(e) if ok_errs.contains(&e)), "new call after SIGKILL: {r:?}");
    assert!(new_after < Duration::from_secs(5), "answers took {new_after:?}");
    println!(
        "daemon SIGKILL: parked WAIT_EVENTS -> errno {:?} after {parked_after:?}, new ioctl -> errno {:?} after {new_after:?}",
        parked.err(),
        r.err()
    );
    drop(f);
    // A restarted daemon detaches the dead mount and serves new opens on the same dir.
    let d2 = SecDaemon::start(&mount, "gfx90a:1", &[]);
    let f2 = std::fs::OpenOptions::new().read(true).write(true).open(mount.join("kfd")).expect("open after restart");
    let mut v2 = KfdIoctlGetVersionArgs { major_version: 0, minor_version: 0 };
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

    fn round(&mut self, cmd: u32, arg: u64, in_data: &[u8], out_size: u32) -> (u64, Option<IoctlAnswer>) {
        let u = self.k.send_ioctl(1, self.ids, self.fh, FUSE_IOCTL_UNRESTRICTED, cmd, arg, in_data, out_size);
        let a = self.k.wait_for(u, Duration::from_millis(50)).map(|r| parse_ioctl_reply(&r).expect("well-formed"));
        (u, a)
    }

    /// Plays every round faithfully until the final answer.
    fn call(&mut self, mem: &mut ClientMem, cmd: u32, arg: u64) -> IoctlAnswer {
        let (mut data, mut out) = (Vec::new(), 0);
        for _ in 0..10 {
            match self.round(cmd, arg, &data, out).1.expect("answered") {
                IoctlAnswer::Retry(i, o) => {
                    (data, out) = kernel_next_round(mem, &i, &o).expect("kernel gathers");
                    if let IoctlAnswer::Retry(..) = IoctlAnswer::Done(0, vec![]) {}
                    self.last_outs = o;
                }
                done => return done,
            }
        }
        panic!("more than 10 rounds")
    }

    fn stats(&self) -> std::collections::BTreeMap<String, u64> {
        stats_map(&self.mux.stats_text())
    }
}
