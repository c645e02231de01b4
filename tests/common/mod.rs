//! Helpers shared by the integration tests: the kfdmux binary, prerequisites, temporary
//! directories and a daemon guard.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The kfdmux binary cargo built for these tests.
pub fn kfdmux_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kfdmux"))
}

/// A prerequisite check: true if `cond`. Otherwise, under CI (`CI=true`) the test fails — CI
/// must run everything — and elsewhere it prints `skipped: <what> missing` and returns false.
pub fn require(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} missing (CI=true: prerequisites are mandatory)");
    }
    eprintln!("skipped: {what} missing");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn have_fuse() -> bool {
    Path::new("/dev/fuse").exists()
}

/// Is `name` an executable on PATH?
pub fn have_cmd(name: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|d| {
        fs::metadata(d.join(name)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// A temporary directory (mode 0755), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let mut tmpl = std::env::temp_dir()
            .join(format!("{prefix}.XXXXXX"))
            .into_os_string()
            .into_vec();
        tmpl.push(0);
        // SAFETY: a writable NUL-terminated template for mkdtemp to fill in.
        let p = unsafe { libc::mkdtemp(tmpl.as_mut_ptr().cast()) };
        assert!(!p.is_null(), "mkdtemp: {}", std::io::Error::last_os_error());
        tmpl.pop();
        let dir = PathBuf::from(OsString::from_vec(tmpl));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `kfdmux serve --transport fuse --mount <tmp>/mnt --gpus SPEC`, stopped and unmounted on drop.
pub struct Daemon {
    child: Child,
    pub mount: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl Daemon {
    pub fn start(gpus: &str) -> Daemon {
        Daemon::start_with(gpus, &[], None)
    }

    /// `serve --transport fuse --gpus GPUS EXTRA...`; ready when mounted and, if `ready_log`
    /// is given, once the log says it (e.g. after io_uring queues registered).
    pub fn start_with(gpus: &str, extra: &[&str], ready_log: Option<&str>) -> Daemon {
        let dir = TempDir::new("kfdmux-test-daemon");
        let mount = dir.path().join("mnt");
        let mut args: Vec<OsString> = vec!["serve".into(), "--transport".into(), "fuse".into()];
        args.extend([
            "--mount".into(),
            mount.clone().into(),
            "--gpus".into(),
            gpus.into(),
        ]);
        args.extend(extra.iter().map(OsString::from));
        Daemon::launch(dir, mount, &args, ready_log)
    }

    /// `kfdmux serve --config FILE` with `toml`, in which `MNT` stands for the mount directory
    /// of the (one FUSE) instance and `STATE` for a state directory, both temporary.
    pub fn start_config(toml: &str, ready_log: Option<&str>) -> Daemon {
        let dir = TempDir::new("kfdmux-test-daemon");
        let mount = dir.path().join("mnt");
        let state = dir.path().join("state");
        let cfg = dir.path().join("kfdmux.toml");
        let text = toml
            .replace("MNT", mount.to_str().expect("utf-8 path"))
            .replace("STATE", state.to_str().expect("utf-8 path"));
        fs::write(&cfg, text).unwrap();
        let args: Vec<OsString> = vec!["serve".into(), "--config".into(), cfg.into()];
        Daemon::launch(dir, mount, &args, ready_log)
    }

    fn launch(dir: TempDir, mount: PathBuf, args: &[OsString], ready_log: Option<&str>) -> Daemon {
        fs::create_dir(&mount).unwrap();
        let log = dir.path().join("daemon.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new(kfdmux_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn kfdmux serve");
        let mut d = Daemon {
            child,
            mount,
            log,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("kfdmux serve exited with {status}:\n{}", d.log_text());
            }
            if kfdmux::run::is_fuse_mount(&d.mount)
                && d.mount.join("kfd").exists()
                && ready_log.is_none_or(|l| d.log_text().contains(l))
            {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "kfdmux serve did not mount {} in 10 s:\n{}",
                d.mount.display(),
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's sysfs tree (`<mount>.sysfs`).
    pub fn sysfs(&self) -> PathBuf {
        kfdmux::run::sysfs_dir_for(&self.mount)
    }

    /// The names of the daemon's threads (`/proc/PID/task/*/comm`).
    pub fn thread_names(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.child.id());
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(|t| fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect();
        names.sort();
        names
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stats(&self) -> HashMap<String, u64> {
        read_stats(&self.mount)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if kfdmux::run::is_fuse_mount(&self.mount) {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = &self.dir; // removed after the unmount, by its own Drop
    }
}

/// Polls `mount`/stats until `cond` holds and returns them; fails after 5 s (a liveness
/// bound, not a timing check) saying `what`, the last stats and `log()`.
pub fn wait_stats_at(
    mount: &Path,
    what: &str,
    cond: impl Fn(&HashMap<String, u64>) -> bool,
    log: &dyn Fn() -> String,
) -> HashMap<String, u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = read_stats(mount);
        if cond(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: stats never got there: {s:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The daemon's `stats` file (`key value` lines) as numbers; non-numeric lines are skipped.
pub fn read_stats(mount: &Path) -> HashMap<String, u64> {
    let text = fs::read_to_string(mount.join("stats"))
        .unwrap_or_else(|e| panic!("read {}/stats: {e}", mount.display()));
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// Forks a child that runs `body` (raw syscalls only, no allocation: we are multithreaded)
/// and tells us through a pipe when it reached its blocking point (writes one byte) or
/// failed (exits). Returns its pid once it is ready.
pub fn fork_client(body: impl FnOnce(i32) -> i32) -> (i32, u8) {
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
    (pid, b)
}

/// Forks a client that opens `kfd`, creates an auto-reset signal event and parks in an
/// infinite WAIT_EVENTS on it; returns its pid once it is about to park.
pub fn fork_parked_waiter(kfd: &std::ffi::CStr) -> i32 {
    use kfdmux::abi::*;
    let mut ev = KfdIoctlCreateEventArgs {
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 1,
        ..zerocopy::FromZeros::new_zeroed()
    };
    let mut data: KfdEventData = zerocopy::FromZeros::new_zeroed();
    let mut w = KfdIoctlWaitEventsArgs {
        num_events: 1,
        timeout: u32::MAX,
        ..zerocopy::FromZeros::new_zeroed()
    };
    let (pid, _) = fork_client(|ready| unsafe {
        let fd = libc::open(kfd.as_ptr(), libc::O_RDWR);
        if fd < 0 || raw_ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &mut ev) != 0 {
            return 1;
        }
        data.event_id = ev.event_id;
        w.events_ptr = &mut data as *mut KfdEventData as u64;
        libc::write(ready, b"r".as_ptr().cast(), 1);
        raw_ioctl(fd, AMDKFD_IOC_WAIT_EVENTS, &mut w) // parks forever
    });
    pid
}

pub fn kill_and_reap(pid: i32) {
    // SAFETY: our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
}

/// ioctl from a forked child: raw syscall, returns 0 or the errno.
///
/// # Safety
/// `arg` must point to the struct `cmd` takes.
pub unsafe fn raw_ioctl<T>(fd: i32, cmd: u32, arg: *mut T) -> i32 {
    if libc::ioctl(fd, cmd as _, arg) < 0 {
        *libc::__errno_location()
    } else {
        0
    }
}

/// Two opens of `mount`/kfd (with `mount`/renderD128) are isolated from each other: handles,
/// events and queues of one are unknown to the other, each gets its own memory, and an fd
/// cannot go out over FUSE. `log` says what the daemon logged, for failures. Shared by the sim
/// (tests/sim_isolation.rs) and the kfd device through both layers (tests/kfd_device.rs).
pub fn assert_two_opens_isolated(mount: &Path, log: &dyn Fn() -> String) {
    use kfdmux::abi::*;
    const PAGE: u64 = 4096;
    const GTT: u32 = KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
    let (a, b) = (c_open(&mount.join("kfd")), c_open(&mount.join("kfd")));
    let r = c_open(&mount.join("renderD128"));
    let mut ap = [KfdProcessDeviceApertures::new_zeroed(); 1];
    let mut n = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: ap.as_mut_ptr() as u64,
        num_of_nodes: 1,
        pad: 0,
    };
    assert_eq!(
        c_ioctl(a, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut n),
        Ok(())
    );
    let gpu_id = ap[0].gpu_id;
    for fd in [a, b] {
        let mut vm = KfdIoctlAcquireVmArgs {
            drm_fd: r as u32,
            gpu_id,
        };
        assert_eq!(
            c_ioctl(fd, AMDKFD_IOC_ACQUIRE_VM, &mut vm),
            Ok(()),
            "{}",
            log()
        );
    }
    let alloc = |fd: i32| {
        let mut al = KfdIoctlAllocMemoryOfGpuArgs {
            va_addr: 0x10_0000,
            size: PAGE,
            handle: 0,
            mmap_offset: 0,
            gpu_id,
            flags: GTT,
        };
        c_ioctl(fd, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut al).map(|_| al)
    };
    let x = alloc(a).unwrap();
    // b does not know a's handle, has no events of a, and no queues.
    let mut f = KfdIoctlFreeMemoryOfGpuArgs { handle: x.handle };
    assert_eq!(
        c_ioctl(b, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut f),
        Err(libc::EINVAL)
    );
    let mut ev = KfdIoctlCreateEventArgs::new_zeroed();
    ev.event_type = KFD_IOC_EVENT_SIGNAL;
    assert_eq!(c_ioctl(a, AMDKFD_IOC_CREATE_EVENT, &mut ev), Ok(()));
    let mut s = KfdIoctlSetEventArgs {
        event_id: ev.event_id,
        pad: 0,
    };
    assert_eq!(c_ioctl(b, AMDKFD_IOC_SET_EVENT, &mut s), Err(libc::EINVAL));
    let mut dq = KfdIoctlDestroyQueueArgs::new_zeroed();
    assert_eq!(
        c_ioctl(b, AMDKFD_IOC_DESTROY_QUEUE, &mut dq),
        Err(libc::EINVAL)
    );
    // b's own buffer gets the same handle value and a different memory range.
    let y = alloc(b).unwrap();
    assert_eq!(y.handle, x.handle);
    assert_ne!(y.mmap_offset, x.mmap_offset);
    // EXPORT_DMABUF cannot hand an fd to a FUSE caller.
    let mut ex = KfdIoctlExportDmabufArgs {
        handle: x.handle,
        flags: libc::O_RDWR as u32,
        dmabuf_fd: 0,
    };
    assert_eq!(
        c_ioctl(a, AMDKFD_IOC_EXPORT_DMABUF, &mut ex),
        Err(libc::EOPNOTSUPP)
    );
    let mut f = KfdIoctlFreeMemoryOfGpuArgs { handle: x.handle };
    assert_eq!(c_ioctl(a, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut f), Ok(()));
    let mut f = KfdIoctlFreeMemoryOfGpuArgs { handle: y.handle };
    assert_eq!(c_ioctl(b, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut f), Ok(()));
    for fd in [a, b, r] {
        // SAFETY: fds this test opened.
        unsafe { libc::close(fd) };
    }
}

pub fn c_ioctl<T>(fd: i32, cmd: u32, arg: &mut T) -> Result<(), i32> {
    // SAFETY: `arg` is a live, writable struct of the size the command encodes.
    let r = unsafe { libc::ioctl(fd, cmd as _, arg as *mut T) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

pub fn c_open(p: &std::path::Path) -> i32 {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    fd
}

/// `open(path, O_RDWR | O_CLOEXEC)`: the fd or the errno. Safe in a forked child.
pub fn open_rw(path: &std::ffi::CString) -> Result<i32, i32> {
    // SAFETY: a valid NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(fd)
    }
}

pub fn close(fd: i32) {
    // SAFETY: closing an fd the test opened.
    unsafe { libc::close(fd) };
}

/// AMDKFD_IOC_GET_VERSION on `fd`.
pub fn get_version(fd: i32) -> Result<kfdmux::abi::KfdIoctlGetVersionArgs, i32> {
    let mut v = kfdmux::abi::KfdIoctlGetVersionArgs::new_zeroed();
    c_ioctl(fd, kfdmux::abi::AMDKFD_IOC_GET_VERSION, &mut v).map(|_| v)
}

/// On `fd` (kfd) with `rfd` (the first GPU's render node): ACQUIRE_VM, then ALLOC of `size`
/// bytes of writable GTT 2 MiB into the GPU's VM — CPU-mappable memory, as ROCm gets it.
/// Panics naming the step; `log` (the daemon's) goes with an ACQUIRE_VM failure.
pub fn acquire_and_alloc_gtt(
    fd: i32,
    rfd: i32,
    size: u64,
    log: &dyn Fn() -> String,
) -> kfdmux::abi::KfdIoctlAllocMemoryOfGpuArgs {
    use kfdmux::abi::*;
    let mut ap = [KfdProcessDeviceApertures::new_zeroed(); 1];
    let mut a = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: ap.as_mut_ptr() as u64,
        num_of_nodes: 1,
        pad: 0,
    };
    let n = c_ioctl(fd, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut a).map(|_| a.num_of_nodes);
    assert_eq!(n, Ok(1), "GET_PROCESS_APERTURES_NEW");
    let gpu_id = ap[0].gpu_id;
    let mut vm = KfdIoctlAcquireVmArgs {
        drm_fd: rfd as u32,
        gpu_id,
    };
    let r = c_ioctl(fd, AMDKFD_IOC_ACQUIRE_VM, &mut vm);
    assert_eq!(r, Ok(()), "ACQUIRE_VM; daemon log:\n{}", log());
    let mut alloc = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: (ap[0].gpuvm_base + (1 << 21)) & !0xfff,
        size,
        handle: 0,
        mmap_offset: 0,
        gpu_id,
        flags: KFD_IOC_ALLOC_MEM_FLAGS_GTT | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE,
    };
    assert_eq!(
        c_ioctl(fd, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut alloc),
        Ok(()),
        "ALLOC GTT"
    );
    alloc
}

/// A shared read-write mapping of `len` bytes of `fd` at `offset`; panics naming `what` (and
/// the errno) when mmap fails. The caller unmaps it.
pub fn mmap_rw(fd: i32, offset: u64, len: usize, what: &str) -> *mut u8 {
    // SAFETY: a fresh shared mapping at an address the kernel picks; checked for MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "{what}: {}",
        std::io::Error::last_os_error()
    );
    p as *mut u8
}

/// Pins the calling thread to `cpu` (threads it starts later inherit it).
pub fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}
