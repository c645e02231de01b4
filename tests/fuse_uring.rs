//! The FUSE transport over io_uring (`kfdmux serve --transport fuse --fuse-uring`) on the host
//! kernel: the `kfdmux check` suite over a ring-mode mount, proof (the daemon's `stats`) that
//! requests went through the ring, parked WAIT_EVENTS that do not block other callers on the
//! same CPU (more of them than the initial queue depth), INTERRUPT of a parked request,
//! passthrough mmap, and distinct contexts for two processes.
//!
//! Needs root, /dev/fuse and a kernel with FUSE-over-io_uring (Linux >= 6.14,
//! `/sys/module/fuse/parameters/enable_uring`); as root the test sets enable_uring to Y itself.
//! Skipped elsewhere with a message; mandatory under `CI=true`.

mod common;

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::{
    acquire_and_alloc_gtt, c_ioctl, close, get_version, have_fuse, is_root, kfdmux_bin, mmap_rw,
    open_rw, pin, require, wait_stats_at, Daemon,
};
use kfdmux::abi::{
    KfdEventData, KfdIoctlCreateEventArgs, KfdIoctlSetEventArgs, KfdIoctlWaitEventsArgs,
    AMDKFD_IOC_CREATE_EVENT, AMDKFD_IOC_SET_EVENT, AMDKFD_IOC_WAIT_EVENTS,
};

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
const KFD_IOC_EVENT_SIGNAL: u32 = 0;
const KFD_IOC_WAIT_RESULT_COMPLETE: u32 = 0;
/// How long a liveness check waits before calling it a hang (not a timing assertion).
const HANG: Duration = Duration::from_secs(20);

/// Root, /dev/fuse and kernel support; turns enable_uring on (it only affects connections
/// that ask for io_uring at INIT).
fn prerequisites() -> bool {
    if !require(is_root() && have_fuse(), "root and /dev/fuse") {
        return false;
    }
    if !require(
        Path::new(ENABLE_URING).exists(),
        "a kernel with FUSE-over-io_uring (Linux >= 6.14, CONFIG_FUSE_IO_URING)",
    ) {
        return false;
    }
    let on = fs::read_to_string(ENABLE_URING).is_ok_and(|v| v.trim() == "Y");
    if !on {
        if let Err(e) = fs::write(ENABLE_URING, "Y") {
            return require(false, &format!("writable {ENABLE_URING} ({e})"));
        }
    }
    true
}

/// `kfdmux serve --transport fuse --fuse-uring`, stopped and unmounted on drop.
struct UringDaemon(Daemon);

impl std::ops::Deref for UringDaemon {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.0
    }
}

impl UringDaemon {
    fn start(extra: &[&str]) -> UringDaemon {
        let mut args = vec!["--fuse-uring"];
        args.extend_from_slice(extra);
        // Ready once it logged "serving" (after the queues registered), not merely mounted.
        UringDaemon(Daemon::start_with(
            "gfx90a:1",
            &args,
            Some("serving gfx90a:1"),
        ))
    }

    fn kfd(&self) -> CString {
        CString::new(self.mount.join("kfd").to_str().unwrap()).unwrap()
    }

    /// Polls the stats until `pred` holds (a liveness bound, not a timing check).
    fn wait_stats(&self, what: &str, pred: impl Fn(&HashMap<String, u64>) -> bool) {
        wait_stats_at(&self.mount, what, pred, &|| self.log_text());
    }
}

fn create_event(fd: i32) -> u32 {
    let mut e = KfdIoctlCreateEventArgs::new_zeroed();
    e.event_type = KFD_IOC_EVENT_SIGNAL;
    e.auto_reset = 0;
    assert_eq!(
        c_ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &mut e),
        Ok(()),
        "CREATE_EVENT"
    );
    e.event_id
}

fn set_event(fd: i32, id: u32) -> Result<(), i32> {
    let mut s = KfdIoctlSetEventArgs::new_zeroed();
    s.event_id = id;
    c_ioctl(fd, AMDKFD_IOC_SET_EVENT, &mut s)
}

/// WAIT_EVENTS on one event with an infinite timeout; the wait_result or the errno.
fn wait_forever(fd: i32, id: u32) -> Result<u32, i32> {
    let mut ev = [KfdEventData::new_zeroed()];
    ev[0].event_id = id;
    let mut w = KfdIoctlWaitEventsArgs::new_zeroed();
    w.events_ptr = ev.as_mut_ptr() as u64;
    w.num_events = 1;
    w.timeout = u32::MAX;
    c_ioctl(fd, AMDKFD_IOC_WAIT_EVENTS, &mut w).map(|_| w.wait_result)
}

/// Runs `f` on another thread and waits for it at most HANG (a hang is a failure).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("{what}: no answer (blocked)"))
}

extern "C" fn on_usr1(_: libc::c_int) {}

#[test]
fn check_suite_passes_over_the_ring_and_requests_use_it() {
    if !prerequisites() {
        return;
    }
    let d = UringDaemon::start(&[]);
    check_over_the_ring(&d);
}

#[test]
fn config_instance_with_fuse_uring_serves_over_the_ring() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start_config(
        "[daemon]\nstate_dir = \"STATE\"\n\n[[instance]]\nname = \"u\"\ngpus = \"gfx90a:1\"\n\
         mount = \"MNT\"\nfuse_uring = true\nfuse_uring_depth = 4\n",
        Some("instance 'u': serving"),
    );
    assert!(
        d.log_text().contains(" 4 entries each"),
        "the instance's queues registered with depth 4:\n{}",
        d.log_text()
    );
    check_over_the_ring(&d);
}

/// `kfdmux check` against `d` passes, and its requests came over the ring.
fn check_over_the_ring(d: &Daemon) {
    assert!(
        d.log_text().contains("FUSE over io_uring:"),
        "queues registered:\n{}",
        d.log_text()
    );
    let before = d.stats();
    let out = Command::new(kfdmux_bin())
        .arg("check")
        .arg("--kfd")
        .arg(d.mount.join("kfd"))
        .output()
        .expect("run kfdmux check");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kfdmux check over io_uring:\n{text}\ndaemon:\n{}",
        d.log_text()
    );
    assert!(text.contains("8 passed, 0 failed"), "{text}");
    let after = d.stats();
    let delta = |k: &str| after[k] - before[k];
    let ioctls = delta("ioctls_total");
    let ring = delta("fuse_ring_requests");
    let dev = delta("fuse_dev_requests");
    assert!(ioctls > 20, "the suite made ioctls: {after:?}");
    // Every ioctl (plus LOOKUP/OPEN/RELEASE...) came in a ring entry; /dev/fuse only carried
    // INTERRUPT and FORGET.
    assert!(ring >= ioctls, "ring {ring} < ioctls {ioctls}: {after:?}");
    assert!(
        dev < ring / 4,
        "/dev/fuse carried {dev} of {} requests",
        dev + ring
    );
}

#[test]
fn parked_waits_do_not_block_the_queue_and_interrupt_works() {
    if !prerequisites() {
        return;
    }
    // Two entries per queue at start: the parked waiters below outnumber them, so the queue
    // must grow for other callers on the same CPU to get through.
    let d = UringDaemon::start(&["--fuse-uring-depth", "2"]);
    let kfd = d.kfd();
    let fd = open_rw(&kfd).expect("open kfd");
    let id = create_event(fd);
    let base = d.stats()["waiters"];
    // More than a queue's first registration (2, topped up to 18 at once): it has to grow.
    // One waiter at a time, each parked before the next comes: the queue grows while its
    // entries run low. (A burst larger than the free entries while all others are parked
    // waits for a completion on that queue: the kernel gives queued requests only to entries
    // that commit, not to newly registered ones — docs/fuse-transport.md.)
    const WAITERS: usize = 24;
    let mut handles = Vec::new();
    for i in 0..WAITERS {
        handles.push(std::thread::spawn(move || {
            pin(0);
            wait_forever(fd, id)
        }));
        d.wait_stats("the next waiter parked", |s| s["waiters"] > base + i as u64);
    }
    // Another client on the same CPU is served while the waiters hold their entries.
    let kfd2 = kfd.clone();
    let v = within("GET_VERSION beside 24 parked waiters", move || {
        pin(0);
        let f = open_rw(&kfd2)?;
        let v = get_version(f);
        close(f);
        v
    })
    .expect("GET_VERSION from another client");
    assert_eq!(v.major_version, 1);

    // INTERRUPT of a parked request (a signal without SA_RESTART): EINTR.
    // SAFETY: installing a handler that does nothing, without SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
    }
    let id2 = create_event(fd);
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        pin(0);
        // SAFETY: pthread_self has no preconditions.
        let _ = tx.send(unsafe { libc::pthread_self() });
        wait_forever(fd, id2)
    });
    let thread = rx.recv().expect("waiter thread id");
    d.wait_stats("interruptible waiter parked", |s| {
        s["waiters"] > base + WAITERS as u64
    });
    // SAFETY: signalling a live thread of ours.
    unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
    let r = within("the interrupted waiter", move || {
        waiter.join().expect("join")
    });
    assert_eq!(r, Err(libc::EINTR), "interrupted WAIT_EVENTS");

    // SET_EVENT answers every parked waiter (from whichever thread handles it).
    assert_eq!(set_event(fd, id), Ok(()));
    for h in handles {
        let r = within("a woken waiter", move || h.join().expect("join"));
        assert_eq!(r, Ok(KFD_IOC_WAIT_RESULT_COMPLETE));
    }
    d.wait_stats("waiters gone", |s| s["waiters"] == base);
    close(fd);
    assert!(d.stats()["fuse_ring_requests"] > 10);
}

#[test]
fn passthrough_mmap_and_distinct_contexts_over_the_ring() {
    if !prerequisites() {
        return;
    }
    let d = UringDaemon::start(&[]);
    let kfd = d.kfd();
    let render = CString::new(d.mount.join("renderD128").to_str().unwrap()).unwrap();
    let fd = open_rw(&kfd).expect("open kfd");
    let rfd = open_rw(&render).expect("open renderD128");
    let size = 2 * 4096usize;
    let alloc = acquire_and_alloc_gtt(fd, rfd, size as u64, &|| d.log_text());
    let map = || {
        mmap_rw(
            rfd,
            alloc.mmap_offset,
            size,
            "mmap over a ring-mode mount (passthrough)",
        )
    };
    let (p1, p2) = (map(), map());
    let marker = *b"uring!\x00\x01";
    // SAFETY: both mappings are `size` bytes long and live until munmap below.
    unsafe {
        std::ptr::copy_nonoverlapping(marker.as_ptr(), p1.add(4096), 8);
        assert_eq!(std::slice::from_raw_parts(p2.add(4096), 8), &marker);
    }
    // Daemon → client: the daemon initialises a new event's slot in this page to all ones.
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
    assert_eq!(c_ioctl(fd, AMDKFD_IOC_CREATE_EVENT, &mut ev), Ok(()));
    let slot = ev.event_slot_index as usize;
    assert!(slot < 512);
    // SAFETY: slot < 512 u64 slots in the first page.
    let v = unsafe { std::ptr::read_volatile((p2 as *const u64).add(slot)) };
    assert_eq!(
        v,
        u64::MAX,
        "the daemon's write shows in the client mapping"
    );
    // SAFETY: unmapping our own mappings.
    unsafe {
        libc::munmap(p1 as *mut _, size);
        libc::munmap(p2 as *mut _, size);
    }

    // A second process opens kfd: its own context, listed with its own pid.
    let mut res = [0i32; 2];
    let mut go = [0i32; 2];
    // SAFETY: pipe2 writes two fds into each array.
    unsafe {
        assert_eq!(libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC), 0);
        assert_eq!(libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC), 0);
    }
    // SAFETY: fork; the child makes only raw system calls on buffers prepared before, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        close(res[0]);
        close(go[1]);
        let ok: u8 = match open_rw(&kfd) {
            Ok(f) if get_version(f).is_ok() => 1,
            _ => 2,
        };
        let mut byte = 0u8;
        // SAFETY: our own pipe ends and one-byte buffers; then _exit.
        unsafe {
            libc::write(res[1], &ok as *const u8 as *const _, 1);
            libc::read(go[0], &mut byte as *mut u8 as *mut _, 1);
            libc::_exit(0);
        }
    }
    close(res[1]);
    close(go[0]);
    let mut ok = 0u8;
    // SAFETY: reading one byte from our pipe end.
    let n = unsafe { libc::read(res[0], &mut ok as *mut u8 as *mut _, 1) };
    let text = fs::read_to_string(d.mount.join("stats")).expect("stats");
    close(go[1]); // lets the child exit
    let mut status = 0;
    // SAFETY: reaping our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!((n, ok), (1, 1), "the child opened kfd and got GET_VERSION");
    // `context <id> fh <fh> pid <tgid> ...`
    let ctx: Vec<(u64, u32)> = text
        .lines()
        .filter(|l| l.starts_with("context ") && l.contains("file Kfd"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            Some((w.get(1)?.parse().ok()?, w.get(5)?.parse().ok()?))
        })
        .collect();
    let me = std::process::id();
    let mine: Vec<_> = ctx.iter().filter(|c| c.1 == me).collect();
    let theirs: Vec<_> = ctx.iter().filter(|c| c.1 == pid as u32).collect();
    assert_eq!((mine.len(), theirs.len()), (1, 1), "stats:\n{text}");
    assert_ne!(mine[0].0, theirs[0].0, "distinct contexts");
    close(rfd);
    close(fd);
    let s = d.stats();
    assert!(
        s["fuse_ring_requests"] > s["fuse_dev_requests"],
        "requests went through the ring: {s:?}"
    );
}

// ---- The engine's side of ring mode, without a kernel: an INTERRUPT read from /dev/fuse
// before its target left the ring must still interrupt it (the kernel cannot requeue it). ----

mod early_interrupt {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};

    use kfdmux::errno::Errno;
    use kfdmux::transport::engine::{
        Filesystem, IoctlArgs, IoctlReply, Protocol, Request, RingReply, Session,
    };
    use kfdmux::transport::wire::*;
    use zerocopy::{FromBytes, IntoBytes};

    /// Parks every ioctl until INTERRUPT (or answers EINTR if it already was interrupted).
    struct Parker;

    impl Filesystem for Parker {
        fn ioctl(&self, _req: &Request, _args: IoctlArgs, _in: &[u8], reply: IoctlReply) {
            let slot = Arc::new(Mutex::new(None::<IoctlReply>));
            let s2 = slot.clone();
            let mut reply = reply;
            let parked = reply.on_interrupt(Box::new(move || {
                if let Some(r) = s2.lock().unwrap().take() {
                    r.error(Errno::EINTR);
                }
            }));
            if parked {
                *slot.lock().unwrap() = Some(reply);
            } else {
                reply.error(Errno::EINTR);
            }
        }
    }

    /// Stands for the ring: present (so the channel is in ring mode) but holding no request,
    /// so every reply goes to the socket where the test reads it.
    struct NoRing;

    impl RingReply for NoRing {
        fn try_send(&self, _unique: u64, _error: i32, _parts: &[&[u8]]) -> bool {
            false
        }
    }

    fn msg(opcode: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique,
            nodeid: 2,
            pid: std::process::id(),
            ..Default::default()
        };
        let mut m = h.as_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    /// The next reply on the socket: (unique, error), or None within 200 ms.
    fn reply(fd: &OwnedFd) -> Option<(u64, i32)> {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 200) } <= 0 {
            return None;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: receiving into our own buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        let (h, _) = OutHeader::read_from_prefix(&buf[..n.max(0) as usize]).ok()?;
        Some((h.unique, h.error))
    }

    fn ioctl_body() -> Vec<u8> {
        IoctlIn {
            fh: 0,
            flags: FUSE_IOCTL_UNRESTRICTED,
            cmd: 0x4b01,
            arg: 0,
            in_size: 0,
            out_size: 0,
        }
        .as_bytes()
        .to_vec()
    }

    #[test]
    fn interrupt_before_its_ring_request_still_interrupts_it() {
        let mut sv = [0i32; 2];
        // SAFETY: socketpair writes two fds.
        let r =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0, sv.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: fresh fds we own.
        let (kernel, daemon) =
            unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let s = Session::new(daemon, Arc::new(Parker), Protocol::Fuse, false);
        let init = InitIn {
            major: 7,
            minor: 41,
            max_readahead: 0,
            flags: 0,
        };
        s.dispatch(&msg(FUSE_INIT, 1, init.as_bytes()));
        assert_eq!(reply(&kernel), Some((1, 0)), "INIT");
        s.chan.set_ring(Arc::new(NoRing));

        // Control: a parked ioctl, then its INTERRUPT → EINTR.
        s.dispatch(&msg(FUSE_IOCTL, 10, &ioctl_body()));
        assert_eq!(reply(&kernel), None, "parked");
        s.dispatch(&msg(
            FUSE_INTERRUPT,
            11,
            InterruptIn { unique: 10 }.as_bytes(),
        ));
        assert_eq!(reply(&kernel), Some((10, -libc::EINTR)));

        // The INTERRUPT first (the target still in its ring entry): EAGAIN for the INTERRUPT
        // as before, and the ioctl, when it comes, is answered EINTR instead of parking.
        s.dispatch(&msg(
            FUSE_INTERRUPT,
            21,
            InterruptIn { unique: 20 }.as_bytes(),
        ));
        assert_eq!(reply(&kernel), Some((21, -libc::EAGAIN)));
        s.dispatch(&msg(FUSE_IOCTL, 20, &ioctl_body()));
        assert_eq!(
            reply(&kernel),
            Some((20, -libc::EINTR)),
            "early INTERRUPT honoured"
        );

        // The mark was used up: the next ioctl parks normally.
        s.dispatch(&msg(FUSE_IOCTL, 30, &ioctl_body()));
        assert_eq!(reply(&kernel), None, "parked, no stale mark");
        s.dispatch(&msg(
            FUSE_INTERRUPT,
            31,
            InterruptIn { unique: 30 }.as_bytes(),
        ));
        assert_eq!(reply(&kernel), Some((30, -libc::EINTR)));
    }
}
