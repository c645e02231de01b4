//! `kfdmux check`: the protocol-level acceptance suite, run as an ordinary client against a
//! kfd file and a render node — the same cases over the FUSE transport on the host and over
//! CUSE inside the VM. Each case prints `PASS name` or `FAIL name: why`.

use std::ffi::CString;
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::abi::*;
use crate::errno::Errno;

#[derive(clap::Args, Debug, Clone)]
pub struct CheckOptions {
    /// The kfd file to test (FUSE: `<mount>/kfd`; CUSE: `/dev/<name>`).
    #[arg(long, default_value = "/dev/kfd")]
    pub kfd: String,
    /// The render node of the first GPU (default: `renderD128` beside the kfd file, or in a
    /// `dri/` directory beside it).
    #[arg(long)]
    pub render: Option<String>,
    /// Run only the cases whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing an fd this value owns.
        unsafe { libc::close(self.0) };
    }
}

fn open(path: &str) -> Result<Fd, String> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!("open {path}: {}", Errno::last()));
    }
    Ok(Fd(fd))
}

/// One ioctl with a typed argument; the errno on failure.
fn ioctl<T: IntoBytes + FromBytes + Immutable>(
    fd: &Fd,
    cmd: u32,
    arg: &mut T,
) -> Result<(), Errno> {
    // SAFETY: `arg` is a live, writable struct of the size `cmd` encodes (callers pair them).
    let r = unsafe { libc::ioctl(fd.0, cmd as _, arg as *mut T) };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

fn version(fd: &Fd) -> Result<KfdIoctlGetVersionArgs, Errno> {
    let mut v = KfdIoctlGetVersionArgs::new_zeroed();
    ioctl(fd, AMDKFD_IOC_GET_VERSION, &mut v).map(|_| v)
}

fn gpu_ids(fd: &Fd) -> Result<Vec<u32>, String> {
    let mut ap = vec![KfdProcessDeviceApertures::new_zeroed(); 16];
    let mut a = KfdIoctlGetProcessAperturesNewArgs::new_zeroed();
    a.kfd_process_device_apertures_ptr = ap.as_mut_ptr() as u64;
    a.num_of_nodes = ap.len() as u32;
    ioctl(fd, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut a)
        .map_err(|e| format!("apertures: {e}"))?;
    let n = (a.num_of_nodes as usize).min(ap.len());
    if n == 0 {
        return Err("apertures: no GPUs".into());
    }
    let ids: Vec<u32> = ap[..n].iter().map(|x| x.gpu_id).collect();
    if ids.contains(&0) || ap[..n].iter().any(|x| x.gpuvm_limit <= x.gpuvm_base) {
        return Err(format!("apertures: bad entries {:?}", &ap[..n]));
    }
    Ok(ids)
}

fn create_signal_event(fd: &Fd) -> Result<u32, String> {
    let mut e = KfdIoctlCreateEventArgs::new_zeroed();
    e.event_type = KFD_IOC_EVENT_SIGNAL;
    e.auto_reset = 1;
    ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &mut e).map_err(|err| format!("create event: {err}"))?;
    Ok(e.event_id)
}

fn set_event(fd: &Fd, id: u32) -> Result<(), Errno> {
    let mut s = KfdIoctlSetEventArgs::new_zeroed();
    s.event_id = id;
    ioctl(fd, AMDKFD_IOC_SET_EVENT, &mut s)
}

/// WAIT_EVENTS on one event; returns the wait_result.
fn wait_one(fd: &Fd, id: u32, timeout_ms: u32) -> Result<u32, Errno> {
    let mut ev = [KfdEventData::new_zeroed()];
    ev[0].event_id = id;
    let mut w = KfdIoctlWaitEventsArgs::new_zeroed();
    w.events_ptr = ev.as_mut_ptr() as u64;
    w.num_events = 1;
    w.timeout = timeout_ms;
    ioctl(fd, AMDKFD_IOC_WAIT_EVENTS, &mut w).map(|_| w.wait_result)
}

fn available(fd: &Fd, gpu: u32) -> Result<u64, String> {
    let mut a = KfdIoctlGetAvailableMemoryArgs::new_zeroed();
    a.gpu_id = gpu;
    ioctl(fd, AMDKFD_IOC_AVAILABLE_MEMORY, &mut a).map_err(|e| format!("available memory: {e}"))?;
    Ok(a.available)
}

fn alloc_vram(fd: &Fd, gpu: u32, va: u64, size: u64) -> Result<u64, Errno> {
    let mut a = KfdIoctlAllocMemoryOfGpuArgs::new_zeroed();
    a.va_addr = va;
    a.size = size;
    a.gpu_id = gpu;
    a.flags = KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE;
    ioctl(fd, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &mut a).map(|_| a.handle)
}

fn render_path(o: &CheckOptions) -> String {
    if let Some(r) = &o.render {
        return r.clone();
    }
    let dir = std::path::Path::new(&o.kfd)
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let beside = dir.join("renderD128");
    if beside.exists() {
        return beside.to_string_lossy().into_owned();
    }
    dir.join("dri/renderD128").to_string_lossy().into_owned()
}

/// ACQUIRE_VM for the first GPU with its render node (allocations need a VM, as in KFD).
fn acquire_vm(o: &CheckOptions, fd: &Fd, gpu: u32) -> Result<Fd, String> {
    let r = open(&render_path(o))?;
    let mut a = KfdIoctlAcquireVmArgs::new_zeroed();
    a.drm_fd = r.0 as u32;
    a.gpu_id = gpu;
    ioctl(fd, AMDKFD_IOC_ACQUIRE_VM, &mut a).map_err(|e| format!("ACQUIRE_VM: {e}"))?;
    Ok(r)
}

fn expect_errno<T: std::fmt::Debug>(
    r: Result<T, Errno>,
    want: Errno,
    what: &str,
) -> Result<(), String> {
    match r {
        Err(e) if e == want => Ok(()),
        other => Err(format!("{what}: expected {want:?}, got {other:?}")),
    }
}

fn case_version(o: &CheckOptions) -> Result<(), String> {
    let fd = open(&o.kfd)?;
    let v = version(&fd).map_err(|e| format!("GET_VERSION: {e}"))?;
    if v.major_version != 1 {
        return Err(format!("major version {}", v.major_version));
    }
    gpu_ids(&fd).map(|_| ())
}

fn case_contexts_per_open(o: &CheckOptions) -> Result<(), String> {
    let a = open(&o.kfd)?;
    let b = open(&o.kfd)?;
    let id = create_signal_event(&a)?;
    set_event(&a, id).map_err(|e| format!("SET_EVENT on its own context: {e}"))?;
    // An event of context A does not exist in context B.
    expect_errno(
        set_event(&b, id),
        Errno::EINVAL,
        "SET_EVENT of another open's event",
    )
}

fn case_fork_ebadf(o: &CheckOptions) -> Result<(), String> {
    let fd = open(&o.kfd)?;
    version(&fd).map_err(|e| format!("parent GET_VERSION: {e}"))?;
    // SAFETY: the child only calls async-signal-safe functions (ioctl, _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", Errno::last()));
    }
    if pid == 0 {
        let mut v = KfdIoctlGetVersionArgs::new_zeroed();
        // SAFETY: valid struct for GET_VERSION.
        let r = unsafe { libc::ioctl(fd.0, AMDKFD_IOC_GET_VERSION as _, &mut v as *mut _) };
        let code = if r < 0 && Errno::last() == Errno::EBADF {
            0
        } else {
            1
        };
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        version(&fd).map_err(|e| format!("parent GET_VERSION after fork: {e}"))?;
        Ok(())
    } else {
        Err("the child of a fork could use the inherited fd (expected EBADF)".into())
    }
}

fn case_pointer_ioctls(o: &CheckOptions) -> Result<(), String> {
    let fd = open(&o.kfd)?;
    let gpus = gpu_ids(&fd)?;
    expect_errno(
        alloc_vram(&fd, gpus[0], 1 << 32, 1 << 20),
        Errno::ENODEV,
        "alloc before ACQUIRE_VM",
    )?;
    let _render = acquire_vm(o, &fd, gpus[0])?;
    let h = alloc_vram(&fd, gpus[0], 1 << 32, 1 << 20).map_err(|e| format!("alloc VRAM: {e}"))?;
    // Map to [our GPU, a GPU that does not exist]: one success, then EINVAL.
    let mut ids = [gpus[0], 0xdead_beef];
    let mut m = KfdIoctlMapMemoryToGpuArgs::new_zeroed();
    m.handle = h;
    m.device_ids_array_ptr = ids.as_mut_ptr() as u64;
    m.n_devices = 2;
    let r = ioctl(&fd, AMDKFD_IOC_MAP_MEMORY_TO_GPU, &mut m);
    expect_errno(r, Errno::EINVAL, "MAP to a missing GPU")?;
    if m.n_success != 1 {
        return Err(format!("MAP n_success {} (expected 1)", m.n_success));
    }
    m.n_devices = 1;
    m.n_success = 0;
    ioctl(&fd, AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU, &mut m).map_err(|e| format!("UNMAP: {e}"))?;
    let mut f = KfdIoctlFreeMemoryOfGpuArgs::new_zeroed();
    f.handle = h;
    ioctl(&fd, AMDKFD_IOC_FREE_MEMORY_OF_GPU, &mut f).map_err(|e| format!("FREE: {e}"))?;
    // A pointer to unmapped memory is EFAULT.
    let mut bad = KfdIoctlGetProcessAperturesNewArgs::new_zeroed();
    bad.kfd_process_device_apertures_ptr = 8;
    bad.num_of_nodes = 1;
    expect_errno(
        ioctl(&fd, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &mut bad),
        Errno::EFAULT,
        "apertures into a bad pointer",
    )
}

fn case_wait_set(o: &CheckOptions) -> Result<(), String> {
    let fd = open(&o.kfd)?;
    let id = create_signal_event(&fd)?;
    let raw = fd.0;
    let waiter = std::thread::spawn(move || {
        let fd = Fd(raw);
        let r = wait_one(&fd, id, u32::MAX);
        std::mem::forget(fd);
        r
    });
    std::thread::sleep(Duration::from_millis(100));
    if waiter.is_finished() {
        return Err("WAIT_EVENTS returned before the event was set".into());
    }
    set_event(&fd, id).map_err(|e| format!("SET_EVENT: {e}"))?;
    match waiter.join() {
        Ok(Ok(r)) if r == KFD_IOC_WAIT_RESULT_COMPLETE => Ok(()),
        other => Err(format!("waiter: {other:?}")),
    }
}

fn case_wait_timeout(o: &CheckOptions) -> Result<(), String> {
    let fd = open(&o.kfd)?;
    let id = create_signal_event(&fd)?;
    let t = Instant::now();
    let r = wait_one(&fd, id, 50).map_err(|e| format!("WAIT_EVENTS: {e}"))?;
    if r != KFD_IOC_WAIT_RESULT_TIMEOUT {
        return Err(format!("wait_result {r}, expected TIMEOUT"));
    }
    if t.elapsed() < Duration::from_millis(40) {
        return Err(format!(
            "timed out after {:?}, before the 50 ms timeout",
            t.elapsed()
        ));
    }
    expect_errno(
        wait_one(&fd, 0xffff, 0),
        Errno::EINVAL,
        "WAIT on an unknown event",
    )
}

extern "C" fn on_usr1(_: libc::c_int) {}

fn case_wait_interrupt(o: &CheckOptions) -> Result<(), String> {
    let fd = open(&o.kfd)?;
    let id = create_signal_event(&fd)?;
    // SAFETY: installing a handler that does nothing, without SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let raw = fd.0;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        // SAFETY: pthread_self has no preconditions.
        let _ = tx.send(unsafe { libc::pthread_self() });
        let fd = Fd(raw);
        let r = wait_one(&fd, id, u32::MAX);
        std::mem::forget(fd);
        r
    });
    let thread = rx.recv().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: signalling a live thread of ours.
    unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
    let r = waiter.join().map_err(|_| "waiter panicked".to_string())?;
    expect_errno(r, Errno::EINTR, "interrupted WAIT_EVENTS")?;
    // The context still works after the interrupt.
    set_event(&fd, id).map_err(|e| format!("SET_EVENT after interrupt: {e}"))?;
    match wait_one(&fd, id, 1000) {
        Ok(r) if r == KFD_IOC_WAIT_RESULT_COMPLETE => Ok(()),
        other => Err(format!("wait after interrupt: {other:?}")),
    }
}

fn case_release_on_close(o: &CheckOptions) -> Result<(), String> {
    let watcher = open(&o.kfd)?;
    let gpu = gpu_ids(&watcher)?[0];
    let before = available(&watcher, gpu)?;
    let size = 64 << 20;
    {
        let fd = open(&o.kfd)?;
        let _render = acquire_vm(o, &fd, gpu)?;
        alloc_vram(&fd, gpu, 1 << 33, size).map_err(|e| format!("alloc: {e}"))?;
        let during = available(&watcher, gpu)?;
        if before.saturating_sub(during) < size {
            return Err(format!(
                "AVAILABLE_MEMORY {before} → {during} after a {size}-byte alloc elsewhere"
            ));
        }
    } // close without FREE
      // RELEASE is sent when the last reference goes; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = available(&watcher, gpu)?;
        if now == before {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("memory not returned after close: {before} → {now}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

type Case = (&'static str, fn(&CheckOptions) -> Result<(), String>);

pub const CASES: &[Case] = &[
    ("version_and_apertures", case_version),
    ("contexts_per_open", case_contexts_per_open),
    ("fork_child_ebadf", case_fork_ebadf),
    ("pointer_ioctls", case_pointer_ioctls),
    ("wait_woken_by_set", case_wait_set),
    ("wait_timeout", case_wait_timeout),
    ("wait_interrupted", case_wait_interrupt),
    ("release_on_close", case_release_on_close),
];

/// Runs the suite; the exit status is the number of failures (0 = all passed).
pub fn run(o: &CheckOptions) -> i32 {
    let mut failed = 0;
    let mut ran = 0;
    for (name, f) in CASES {
        if o.only.as_deref().is_some_and(|s| !name.contains(s)) {
            continue;
        }
        ran += 1;
        match f(o) {
            Ok(()) => println!("PASS {name}"),
            Err(e) => {
                failed += 1;
                println!("FAIL {name}: {e}");
            }
        }
    }
    println!("{} passed, {failed} failed", ran - failed);
    failed
}
