//! The FUSE-file transport on the host kernel: `kfdmux serve --transport fuse` mounted on
//! `/dev/fuse`, driven with plain `open`/`ioctl`/`mmap`/`fork` (needs root and /dev/fuse; skipped
//! elsewhere, mandatory under `CI=true`).
//!
//! Forked children run only raw system calls on buffers prepared before the fork (the test
//! harness is multi-threaded, so a child must not allocate).

mod common;

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    acquire_and_alloc_gtt, c_ioctl, close, get_version, have_fuse, is_root, kfdmux_bin, mmap_rw,
    open_rw, pin, require, Daemon,
};
use kfdmux::abi::{
    KfdIoctlAcquireVmArgs, KfdIoctlCreateEventArgs, KfdIoctlGetProcessAperturesNewArgs,
    KfdProcessDeviceApertures, AMDKFD_IOC_ACQUIRE_VM, AMDKFD_IOC_CREATE_EVENT,
    AMDKFD_IOC_GET_PROCESS_APERTURES_NEW,
};

const KFD_IOC_EVENT_SIGNAL: u32 = 0;

fn prerequisites() -> bool {
    require(is_root() && have_fuse(), "root and /dev/fuse")
}

fn cpath(p: &Path) -> CString {
    CString::new(p.to_str().expect("utf-8 path")).expect("no NUL in path")
}

/// GET_PROCESS_APERTURES_NEW into `out` (capacity `out.len()`); returns the number filled.
fn apertures(fd: i32, out: &mut [KfdProcessDeviceApertures]) -> Result<u32, i32> {
    let mut a = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: out.as_mut_ptr() as u64,
        num_of_nodes: out.len() as u32,
        pad: 0,
    };
    c_ioctl(fd, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut a).map(|_| a.num_of_nodes)
}

/// A forked child: it computes up to 8 numbers, sends them, then waits for `release`.
struct Forked {
    pid: libc::pid_t,
    results: i32,
    go: i32,
}

impl Forked {
    /// Runs `f` in a child. `f` must only make raw system calls (no allocation, no locks).
    fn spawn(f: impl FnOnce() -> [i64; 8]) -> Forked {
        let mut res = [0i32; 2];
        let mut go = [0i32; 2];
        // SAFETY: pipe2 writes two fds into each array.
        unsafe {
            assert_eq!(libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC), 0);
        }
        // SAFETY: fork; the child only makes async-signal-safe system calls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // The child keeps only its own pipe ends: with the parent's write end of `go` open
            // here too, closing it in the parent would never reach the child as EOF.
            close(res[0]);
            close(go[1]);
            let out = f();
            let mut byte = 0u8;
            // SAFETY: writing/reading our own buffers on our own pipe ends; then _exit.
            unsafe {
                libc::write(
                    res[1],
                    out.as_ptr() as *const _,
                    std::mem::size_of_val(&out),
                );
                libc::read(go[0], &mut byte as *mut u8 as *mut _, 1);
                libc::_exit(0);
            }
        }
        close(res[1]);
        close(go[0]);
        Forked {
            pid,
            results: res[0],
            go: go[1],
        }
    }

    fn results(&self) -> [i64; 8] {
        let mut out = [0i64; 8];
        // SAFETY: reading into our own buffer.
        let n = unsafe {
            libc::read(
                self.results,
                out.as_mut_ptr() as *mut _,
                std::mem::size_of_val(&out),
            )
        };
        assert_eq!(n, 64, "child {} sent no results (crashed?)", self.pid);
        out
    }

    /// Lets the child exit; returns its wait status.
    fn finish(mut self) -> i32 {
        self.reap()
    }

    fn reap(&mut self) -> i32 {
        if self.pid == 0 {
            return 0;
        }
        close(self.go);
        close(self.results);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
        self.pid = 0;
        status
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SAFETY: our own child.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.reap();
        }
    }
}

fn stats_text(mount: &Path) -> String {
    std::fs::read_to_string(mount.join("stats")).expect("read stats")
}

fn stat_value(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in stats:\n{text}"))
}

/// (context id, pid, file) of every `context <id> fh <fh> pid <pid> uid <uid> file <kind>` line.
fn contexts(text: &str) -> Vec<(u64, u32, String)> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() != Some(&"context")
                || w.get(4) != Some(&"pid")
                || w.get(8) != Some(&"file")
            {
                return None;
            }
            Some((w[1].parse().ok()?, w[5].parse().ok()?, w[9..].join(" ")))
        })
        .collect()
}

/// Polls the stats until `pred` holds (RELEASE is asynchronous in the kernel).
fn wait_stats(mount: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let t = stats_text(mount);
        if pred(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "stats never showed {what}:\n{t}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_processes_distinct_contexts_fork_ebadf_close_releases() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start("gfx90a:2");
    let kfd = cpath(&d.mount.join("kfd"));
    let me = std::process::id();
    assert_eq!(contexts(&stats_text(&d.mount)), vec![]);

    let fd = open_rw(&kfd).expect("open kfd");
    let v = get_version(fd).expect("GET_VERSION");
    assert_eq!(v.major_version, 1);
    let mut ap = [KfdProcessDeviceApertures::new_zeroed(); 4];
    assert_eq!(apertures(fd, &mut ap), Ok(2));
    assert!(ap[0].gpu_id != 0 && ap[1].gpu_id != 0 && ap[0].gpu_id != ap[1].gpu_id);
    assert!(ap[0].gpuvm_limit > ap[0].gpuvm_base);

    // A forked child: the fd it inherited is not its own (EBADF, like KFD); its own open works.
    let child = Forked::spawn(|| {
        let inherited = match get_version(fd) {
            Ok(_) => 0,
            Err(e) => e as i64,
        };
        let mut cap = [KfdProcessDeviceApertures::new_zeroed(); 4];
        let inherited_ap = match apertures(fd, &mut cap) {
            Ok(_) => 0,
            Err(e) => e as i64,
        };
        let own = match open_rw(&kfd) {
            Ok(f) => f,
            Err(e) => return [-1, e as i64, inherited, inherited_ap, 0, 0, 0, 0],
        };
        let ver = get_version(own)
            .map(|v| v.major_version as i64)
            .unwrap_or_else(|e| -(e as i64));
        let n = apertures(own, &mut cap)
            .map(|n| n as i64)
            .unwrap_or_else(|e| -(e as i64));
        [
            own as i64,
            0,
            inherited,
            inherited_ap,
            ver,
            n,
            cap[0].gpu_id as i64,
            cap[1].gpu_id as i64,
        ]
    });
    let r = child.results();
    assert!(r[0] >= 0, "child open of kfd failed: errno {}", r[1]);
    assert_eq!(
        (r[2], r[3]),
        (libc::EBADF as i64, libc::EBADF as i64),
        "inherited fd in the child"
    );
    assert_eq!(
        (r[4], r[5]),
        (1, 2),
        "GET_VERSION / GET_PROCESS_APERTURES_NEW in the child"
    );
    assert_eq!(
        (r[6] as u32, r[7] as u32),
        (ap[0].gpu_id, ap[1].gpu_id),
        "same GPUs, same ids"
    );

    // Two contexts, one per process, distinct ids.
    let t = stats_text(&d.mount);
    let mut c = contexts(&t);
    c.sort_by_key(|x| x.1);
    let mut want = [me, child.pid as u32];
    want.sort();
    assert_eq!(c.iter().map(|x| x.1).collect::<Vec<_>>(), want, "{t}");
    assert_ne!(c[0].0, c[1].0);
    assert!(c.iter().all(|x| x.2 == "Kfd"), "{t}");
    assert_eq!(stat_value(&t, "contexts"), 2);
    assert!(stat_value(&t, "ebadf_total") >= 2, "{t}");

    // The child exits (closing its own fd and its copy of ours): only its context goes.
    let status = child.finish();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    let t = wait_stats(&d.mount, "the child's context released", |t| {
        contexts(t).iter().map(|x| x.1).collect::<Vec<_>>() == [me]
    });
    assert_eq!(stat_value(&t, "contexts"), 1);
    assert_eq!(
        get_version(fd).map(|v| v.major_version),
        Ok(1),
        "our context survives the child"
    );

    // close → RELEASE → no contexts.
    close(fd);
    let t = wait_stats(&d.mount, "contexts 0", |t| stat_value(t, "contexts") == 0);
    assert!(contexts(&t).is_empty());
    assert_eq!(stat_value(&t, "releases_total"), 2);
}

/// The daemon's memfd holding `marker` at `offset` exists (read through /proc/<daemon>/fd).
fn daemon_memfd_has(mount: &Path, offset: u64, marker: &[u8]) -> bool {
    let mnt = mount.to_str().expect("utf-8");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    for p in procs.flatten() {
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        if !args.contains(&mnt.as_bytes()) || !args.contains(&&b"serve"[..]) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for f in fds.flatten() {
            let Ok(target) = std::fs::read_link(f.path()) else {
                continue;
            };
            if !target.to_string_lossy().starts_with("/memfd:") {
                continue;
            }
            let Ok(file) = std::fs::File::open(f.path()) else {
                continue;
            };
            let mut buf = vec![0u8; marker.len()];
            use std::os::unix::fs::FileExt;
            if file.read_exact_at(&mut buf, offset).is_ok() && buf == marker {
                return true;
            }
        }
    }
    false
}

#[test]
fn mmap_is_passthrough_to_the_process_own_memory() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start("gfx90a:1");
    let kfd = cpath(&d.mount.join("kfd"));
    let render = cpath(&d.mount.join("renderD128"));
    let fd = open_rw(&kfd).expect("open kfd");
    let rfd = open_rw(&render).expect("open renderD128");
    let size = 2 * 4096u64;
    let alloc = acquire_and_alloc_gtt(fd, rfd, size, &|| d.log_text());
    let gpu_id = alloc.gpu_id;
    assert!(alloc.handle != 0);
    assert_eq!(alloc.mmap_offset % 4096, 0);
    assert!(
        alloc.mmap_offset < i64::MAX as u64,
        "offsets must fit off_t"
    );

    let map = |f: i32| {
        mmap_rw(
            f,
            alloc.mmap_offset,
            size as usize,
            "mmap of the GTT buffer",
        )
    };
    let p1 = map(rfd);
    let p2 = map(rfd);
    let marker = *b"kfdmux!\x01";
    // SAFETY: both mappings are `size` bytes long and live until munmap below.
    unsafe {
        std::ptr::copy_nonoverlapping(marker.as_ptr(), p1.add(4096), 8);
        assert_eq!(
            std::slice::from_raw_parts(p2.add(4096), 8),
            &marker,
            "second mapping sees the write"
        );
    }
    // The mapping is the daemon's memfd, not a private copy.
    let mut far = marker;
    far[7] = 0x02;
    // SAFETY: in bounds of the mapping.
    unsafe { std::ptr::copy_nonoverlapping(far.as_ptr(), p1.add(4096), 8) };
    assert!(
        daemon_memfd_has(&d.mount, alloc.mmap_offset + 4096, &far),
        "the client's write is in the daemon's memfd at mmap_offset"
    );
    // Daemon → client: an events page in this buffer (the dGPU path of libhsakmt); the daemon
    // initialises the new event's slot to "unsignaled" (all ones).
    // SAFETY: in bounds of the mapping.
    unsafe { std::ptr::write_bytes(p1, 0, 4096) };
    let mut ev = KfdIoctlCreateEventArgs {
        event_page_offset: alloc.handle,
        event_trigger_data: 0,
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 1,
        node_id: 0,
        event_id: 0,
        event_slot_index: 0,
    };
    assert_eq!(
        c_ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &mut ev),
        Ok(()),
        "CREATE_EVENT on our page"
    );
    let slot = ev.event_slot_index as usize;
    assert!(slot < 512);
    // SAFETY: slot < 512 u64 slots in the first page.
    let v = unsafe { std::ptr::read_volatile((p1 as *const u64).add(slot)) };
    assert_eq!(
        v,
        u64::MAX,
        "the daemon's write to the events slot shows in our mapping"
    );
    // (Like the kernel, the daemon filled the whole events area with "unsignaled"; put the
    // marker back for the checks below.)
    // SAFETY: in bounds of the mapping.
    unsafe { std::ptr::copy_nonoverlapping(far.as_ptr(), p1.add(4096), 8) };
    // With passthrough, read() on the fd reaches the backing memfd as well.
    let mut rb = [0u8; 8];
    let at = (alloc.mmap_offset + 4096) as libc::off_t;
    // SAFETY: reading 8 bytes into our own buffer.
    let n = unsafe { libc::pread(rfd, rb.as_mut_ptr() as *mut _, 8, at) };
    assert_eq!((n, rb), (8, far), "pread on the render node file");

    // Another process: it cannot open our inode (via /proc/<pid>/fd) nor use our fds for
    // ioctls; its own render node file is another inode backed by its own memory.
    let me = std::process::id();
    let via_proc = CString::new(format!("/proc/{me}/fd/{rfd}")).expect("path");
    let our_ino = std::fs::metadata(format!("/proc/self/fd/{rfd}"))
        .expect("stat")
        .ino();
    let off = alloc.mmap_offset as libc::off_t;
    let child = Forked::spawn(|| {
        let proc_open = match open_rw(&via_proc) {
            Ok(f) => {
                close(f);
                0
            }
            Err(e) => e as i64,
        };
        let inherited = get_version(fd).err().unwrap_or(0) as i64;
        let mut vm2 = KfdIoctlAcquireVmArgs {
            drm_fd: rfd as u32,
            gpu_id,
        };
        let acquire = c_ioctl(fd, AMDKFD_IOC_ACQUIRE_VM, &mut vm2)
            .err()
            .unwrap_or(0) as i64;
        // Its own render node: a different inode.
        let own = match open_rw(&render) {
            Ok(f) => f,
            Err(e) => return [proc_open, inherited, acquire, -(e as i64), 0, 0, 0, 0],
        };
        // SAFETY: fstat into a zeroed struct stat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and struct.
        unsafe { libc::fstat(own, &mut st) };
        // Its own file at our offset maps its own (empty) memory, not ours.
        // SAFETY: a fresh shared mapping, checked for MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                own,
                off,
            )
        };
        let own_map = if p == libc::MAP_FAILED {
            // SAFETY: reading this thread's errno.
            -(unsafe { *libc::__errno_location() } as i64)
        } else {
            // SAFETY: the mapping is 8192 bytes.
            unsafe { std::ptr::read_volatile((p as *const u8).add(4096) as *const i64) }
        };
        // The inherited fd: mmap is passthrough (no daemon round trip), so it maps our memory.
        // SAFETY: as above.
        let q = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_SHARED,
                rfd,
                off,
            )
        };
        let inherited_map = if q == libc::MAP_FAILED {
            // SAFETY: reading this thread's errno.
            -(unsafe { *libc::__errno_location() } as i64)
        } else {
            // SAFETY: the mapping is 8192 bytes.
            unsafe { std::ptr::read_volatile((q as *const u8).add(4096) as *const i64) }
        };
        [
            proc_open,
            inherited,
            acquire,
            own as i64,
            st.st_ino as i64,
            own_map,
            inherited_map,
            0,
        ]
    });
    let r = child.results();
    drop(child);
    assert_eq!(
        r[0],
        libc::EACCES as i64,
        "open of our inode through /proc by another process"
    );
    assert_eq!(
        (r[1], r[2]),
        (libc::EBADF as i64, libc::EBADF as i64),
        "ioctls on inherited fds"
    );
    assert!(r[3] >= 0, "child's own render node open: errno {}", -r[3]);
    assert_ne!(
        r[4] as u64, our_ino,
        "the child's render node is its own inode"
    );
    assert_eq!(
        r[5], 0,
        "the child's own file at our offset shows its own (zeroed) memory"
    );
    assert_eq!(
        r[6],
        i64::from_ne_bytes(far),
        "an inherited fd maps the opener's memory"
    );

    // SAFETY: unmapping our own mappings.
    unsafe {
        libc::munmap(p1 as *mut _, size as usize);
        libc::munmap(p2 as *mut _, size as usize);
    }
    close(rfd);
    close(fd);
    wait_stats(&d.mount, "contexts 0", |t| stat_value(t, "contexts") == 0);
}

/// `kfdmux check` against a daemon confined to one CPU (one reader at a time, with the turn
/// watchdog) and against an unconfined one (every worker reads).
#[test]
fn check_suite_passes_with_one_reader_on_one_cpu_and_with_all_readers() {
    if !prerequisites() {
        return;
    }
    let cpus = kfdmux::transport::sys::affinity_cpus().unwrap_or(1);
    // Unconfined first: pinning this thread cannot be undone here.
    for one_cpu in [false, true] {
        if one_cpu {
            // The daemon and the check inherit this thread's affinity.
            pin(0);
        }
        let d = Daemon::start("gfx90a:2");
        let out = std::process::Command::new(kfdmux_bin())
            .arg("check")
            .arg("--kfd")
            .arg(d.mount.join("kfd"))
            .output()
            .expect("run kfdmux check");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("8 passed, 0 failed"),
            "kfdmux check (one CPU: {one_cpu}):\n{text}\ndaemon:\n{}",
            d.log_text()
        );
        let threads = d.thread_names();
        let watchdog = threads.iter().any(|t| t == "fuse-turn");
        if one_cpu || cpus == 1 {
            assert!(
                watchdog,
                "one CPU: the reading turn's watchdog runs: {threads:?}"
            );
        } else {
            assert!(
                !watchdog,
                "{cpus} CPUs: every worker reads, no turn: {threads:?}"
            );
        }
        let s = d.stats();
        assert_eq!(
            s["fuse_reader_stalls"], 0,
            "no request stalled the reader: {s:?}"
        );
    }
}
