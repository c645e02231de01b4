//! The FUSE protocol engine: reads requests from a `/dev/fuse` (or `/dev/cuse`) channel with a
//! few worker threads, parses them, hands them to a [`Filesystem`], and writes replies.
//!
//! Replies to IOCTL may be sent later from any thread ([`IoctlReply`] is `Send`); a parked
//! ioctl registers a canceller that `FUSE_INTERRUPT` runs. Nothing in a request can panic the
//! engine: every length is checked and malformed requests get an errno and a log line.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rustc_hash::FxHashMap;
use zerocopy::{FromBytes, IntoBytes};

use super::wire::*;
use crate::errno::Errno;

/// Who sent a request (from the request header).
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub unique: u64,
    pub opcode: u32,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// An opened file as the filesystem answers OPEN.
#[derive(Clone, Copy, Debug, Default)]
pub struct Opened {
    pub fh: u64,
    pub open_flags: u32,
    pub backing_id: i32,
}

/// An IOCTL request's parameters.
#[derive(Clone, Copy, Debug)]
pub struct IoctlArgs {
    pub fh: u64,
    pub flags: u32,
    pub cmd: u32,
    pub arg: u64,
    pub out_size: u32,
}

/// What the filesystem behind the engine implements. Defaults answer as a file without the
/// operation would (`ENOSYS` where the kernel then falls back).
pub trait Filesystem: Send + Sync + 'static {
    /// Called once the INIT negotiation is done.
    fn init(&self, _passthrough: bool) {}
    fn lookup(&self, _req: &Request, _parent: u64, _name: &[u8]) -> Result<EntryOut, Errno> {
        Err(Errno::ENOENT)
    }
    fn forget(&self, _nodeid: u64, _nlookup: u64) {}
    fn getattr(&self, _req: &Request, _nodeid: u64) -> Result<AttrOut, Errno> {
        Err(Errno::ENOSYS)
    }
    fn open(&self, _req: &Request, _nodeid: u64, _flags: u32) -> Result<Opened, Errno> {
        Err(Errno::ENOSYS)
    }
    fn release(&self, _req: &Request, _nodeid: u64, _fh: u64) {}
    fn read(&self, _req: &Request, _fh: u64, _offset: u64, _size: u32) -> Result<Vec<u8>, Errno> {
        Err(Errno::EINVAL)
    }
    fn write(&self, _req: &Request, _fh: u64, _offset: u64, _data: &[u8]) -> Result<u32, Errno> {
        Err(Errno::EINVAL)
    }
    /// Answers through `reply`, now or later.
    fn ioctl(&self, req: &Request, args: IoctlArgs, in_data: &[u8], reply: IoctlReply) {
        let _ = (req, args, in_data);
        reply.error(Errno::ENOTTY)
    }
    /// Returns the ready mask; `kh` is set when the caller wants a wake-up notification.
    fn poll(&self, _req: &Request, _fh: u64, _kh: Option<u64>, _events: u32) -> Result<u32, Errno> {
        Err(Errno::ENOSYS)
    }
    /// Directory listing of `nodeid`: (ino, d_type, name).
    fn readdir(&self, _req: &Request, _nodeid: u64) -> Result<Vec<(u64, u32, Vec<u8>)>, Errno> {
        Err(Errno::ENOTDIR)
    }
    fn destroy(&self) {}
    /// Whether requests are answered without blocking the worker (in-memory work, waits that
    /// park): then one worker at a time reads and answers them itself (see [`Session::run`]).
    fn single_reader(&self) -> bool {
        false
    }
    /// With [`Filesystem::single_reader`]: whether a request with `opcode` may take long, so
    /// reading passes to another worker before it is handled (opening and releasing a file
    /// create and free a context with all its memory).
    fn hands_off(&self, opcode: u32) -> bool {
        opcode == FUSE_OPEN || opcode == FUSE_RELEASE
    }
}

enum Inflight {
    Running { interrupted: bool },
    Parked(Box<dyn FnOnce() + Send>),
}

/// A transport that carries some requests outside `read(/dev/fuse)` and answers them itself
/// (FUSE-over-io_uring, `super::uring`).
pub trait RingReply: Send + Sync {
    /// Sends the reply to `unique` if this transport holds that request; false: not ours.
    fn try_send(&self, unique: u64, error: i32, parts: &[&[u8]]) -> bool;
}

/// The write side of a channel, shared by workers and late replies.
pub struct Channel {
    fd: OwnedFd,
    inflight: Mutex<FxHashMap<u64, Inflight>>,
    passthrough: AtomicBool,
    proto_minor: AtomicU32,
    destroyed: AtomicBool,
    /// Set when the io_uring queues start (`super::uring`); replies to their requests go there.
    ring: OnceLock<Arc<dyn RingReply>>,
    /// Requests read from `/dev/fuse` and requests that arrived in a ring entry (`stats`).
    pub dev_requests: AtomicU64,
    pub ring_requests: AtomicU64,
    /// Single-reader mode: requests that kept the reading worker so long that the watchdog
    /// passed the reading turn on (`super::turn`).
    pub reader_stalls: AtomicU64,
    /// Ring mode: INTERRUPTs (from /dev/fuse) whose target had not been dispatched yet. The
    /// kernel cannot requeue them (an EAGAIN reply finds only /dev/fuse requests), so the
    /// target is marked interrupted when it arrives. Bounded: a target answered before its
    /// INTERRUPT arrived never comes, and the oldest marks are dropped.
    early_interrupts: Mutex<std::collections::VecDeque<u64>>,
}

/// How many early INTERRUPT marks are kept (see `Channel::early_interrupts`).
const EARLY_INTERRUPTS: usize = 256;

impl Channel {
    pub fn new(fd: OwnedFd) -> Arc<Channel> {
        Arc::new(Channel {
            fd,
            inflight: Mutex::new(FxHashMap::default()),
            passthrough: AtomicBool::new(false),
            proto_minor: AtomicU32::new(0),
            destroyed: AtomicBool::new(false),
            ring: OnceLock::new(),
            dev_requests: AtomicU64::new(0),
            ring_requests: AtomicU64::new(0),
            reader_stalls: AtomicU64::new(0),
            early_interrupts: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Ring mode: whether an INTERRUPT for `unique` came before the request (and forgets it).
    fn take_early_interrupt(&self, unique: u64) -> bool {
        if self.ring.get().is_none() {
            return false;
        }
        let Ok(mut q) = self.early_interrupts.lock() else {
            return false;
        };
        match q.iter().position(|&u| u == unique) {
            Some(i) => {
                q.remove(i);
                true
            }
            None => false,
        }
    }

    /// Routes replies of ring-borne requests to `ring` (once; later calls are ignored).
    pub fn set_ring(&self, ring: Arc<dyn RingReply>) {
        let _ = self.ring.set(ring);
    }

    /// Transport counters for the `stats` file.
    pub fn transport_stats(&self) -> String {
        format!(
            "fuse_dev_requests {}\nfuse_ring_requests {}\nfuse_reader_stalls {}\n",
            self.dev_requests.load(Ordering::Relaxed),
            self.ring_requests.load(Ordering::Relaxed),
            self.reader_stalls.load(Ordering::Relaxed)
        )
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Whether the kernel accepted FUSE_PASSTHROUGH.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    /// Writes one reply: header + parts, in one `writev` (the kernel needs it whole).
    pub fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) {
        if unique != 0 {
            if let Some(r) = self.ring.get() {
                if r.try_send(unique, error, parts) {
                    return;
                }
            }
        }
        let len = 16 + parts.iter().map(|p| p.len()).sum::<usize>();
        let hdr = OutHeader {
            len: len as u32,
            error,
            unique,
        };
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 4];
        iov[0] = libc::iovec {
            iov_base: hdr.as_bytes().as_ptr() as *mut _,
            iov_len: 16,
        };
        let mut n = 1;
        for p in parts.iter().take(3) {
            iov[n] = libc::iovec {
                iov_base: p.as_ptr() as *mut _,
                iov_len: p.len(),
            };
            n += 1;
        }
        // SAFETY: every iovec points into a live slice borrowed for the duration of the call.
        let r = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), n as i32) };
        if r < 0 {
            let e = Errno::last();
            // ENOENT: the request was interrupted/aborted before our answer; harmless.
            if e != Errno::ENOENT {
                log::debug!("reply to request {unique} failed: {e}");
            }
        }
    }

    fn send_error(&self, unique: u64, e: Errno) {
        self.send(unique, -e.0, &[]);
    }

    /// A wake-up for a poll handle (`FUSE_NOTIFY_POLL`).
    pub fn poll_wakeup(&self, kh: u64) {
        let body = NotifyPollWakeupOut { kh };
        self.send(0, FUSE_NOTIFY_POLL, &[body.as_bytes()]);
    }

    /// Registers `fd` as a passthrough backing file; returns its backing id.
    pub fn backing_open(&self, fd: i32) -> Result<i32, Errno> {
        let map = BackingMap {
            fd,
            flags: 0,
            padding: 0,
        };
        // SAFETY: FUSE_DEV_IOC_BACKING_OPEN reads one fuse_backing_map from the pointer.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_OPEN as _,
                &map as *const BackingMap,
            )
        };
        if r < 0 {
            Err(Errno::last())
        } else {
            Ok(r)
        }
    }

    pub fn backing_close(&self, id: i32) {
        let id = id as u32;
        // SAFETY: FUSE_DEV_IOC_BACKING_CLOSE reads one u32 from the pointer.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE as _,
                &id as *const u32,
            )
        };
        if r < 0 {
            log::debug!("backing close {id}: {}", Errno::last());
        }
    }

    fn finish(&self, unique: u64) {
        if let Ok(mut m) = self.inflight.lock() {
            m.remove(&unique);
        }
    }
}

/// The answer to one IOCTL, sendable later from another thread. Dropped unanswered: EIO.
pub struct IoctlReply {
    chan: Arc<Channel>,
    unique: u64,
    answered: bool,
}

impl IoctlReply {
    pub fn unique(&self) -> u64 {
        self.unique
    }
    /// Success (or a negative `result` with data, as the kernel copies out even on error).
    pub fn ok(mut self, result: i32, out: &[u8]) {
        let o = IoctlOut {
            result,
            flags: 0,
            in_iovs: 0,
            out_iovs: 0,
        };
        self.chan.send(self.unique, 0, &[o.as_bytes(), out]);
        self.done();
    }
    pub fn error(mut self, e: Errno) {
        self.chan.send_error(self.unique, e);
        self.done();
    }
    /// `FUSE_IOCTL_RETRY` with the iovecs to fetch and to make writable (unrestricted only).
    pub fn retry(mut self, in_iovs: &[IoctlIovec], out_iovs: &[IoctlIovec]) {
        let o = IoctlOut {
            result: 0,
            flags: FUSE_IOCTL_RETRY,
            in_iovs: in_iovs.len() as u32,
            out_iovs: out_iovs.len() as u32,
        };
        self.chan.send(
            self.unique,
            0,
            &[o.as_bytes(), in_iovs.as_bytes(), out_iovs.as_bytes()],
        );
        self.done();
    }
    /// Registers `cancel` for FUSE_INTERRUPT. False: the request was already interrupted (the
    /// caller must answer EINTR itself; `cancel` is dropped).
    pub fn on_interrupt(&mut self, cancel: Box<dyn FnOnce() + Send>) -> bool {
        let Ok(mut m) = self.chan.inflight.lock() else {
            return false;
        };
        match m.get_mut(&self.unique) {
            Some(slot @ Inflight::Running { interrupted: false }) => {
                *slot = Inflight::Parked(cancel);
                true
            }
            _ => false,
        }
    }
    fn done(&mut self) {
        self.answered = true;
        self.chan.finish(self.unique);
    }
}

impl Drop for IoctlReply {
    fn drop(&mut self) {
        if !self.answered {
            log::warn!(
                "ioctl request {} dropped unanswered; replying EIO",
                self.unique
            );
            self.chan.send_error(self.unique, Errno::EIO);
            self.chan.finish(self.unique);
        }
    }
}

/// Which INIT the channel expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Fuse,
    /// CUSE: the next transport; `CUSE_INIT` is answered by `cuse_init` in its module.
    Cuse,
}

/// Receive buffer: header + the largest write/ioctl we allow (128 KiB) + slack.
pub const BUFFER_SIZE: usize = 128 * 1024 + 4096;
/// `max_write` we announce.
pub const MAX_WRITE: u32 = 128 * 1024;

/// A session: a channel plus the filesystem behind it.
pub struct Session {
    pub chan: Arc<Channel>,
    fs: Arc<dyn Filesystem>,
    proto: Protocol,
    want_passthrough: bool,
    /// CUSE: the `DEVNAME` the device registers as (e.g. `kfdmux/kfd`).
    cuse_devname: Option<String>,
    initialized: AtomicBool,
    /// `request_uring`: offer FUSE_OVER_IO_URING at INIT and tell the hook the outcome.
    want_uring: AtomicBool,
    uring_hook: Mutex<Option<UringHook>>,
    /// The reading turn of single-reader mode (see [`Session::run`]).
    turn: super::turn::Turn,
}

/// Called once after the FUSE INIT reply is written, with whether io_uring was negotiated.
pub type UringHook = Box<dyn FnOnce(bool) + Send>;

impl Session {
    pub fn new(
        fd: OwnedFd,
        fs: Arc<dyn Filesystem>,
        proto: Protocol,
        want_passthrough: bool,
    ) -> Arc<Session> {
        Arc::new(Session {
            chan: Channel::new(fd),
            fs,
            proto,
            want_passthrough,
            cuse_devname: None,
            initialized: AtomicBool::new(false),
            want_uring: AtomicBool::new(false),
            uring_hook: Mutex::new(None),
            turn: Default::default(),
        })
    }

    /// A CUSE session on an open `/dev/cuse`: CUSE_INIT registers `/dev/<devname>`.
    pub fn new_cuse(fd: OwnedFd, fs: Arc<dyn Filesystem>, devname: &str) -> Arc<Session> {
        Arc::new(Session {
            chan: Channel::new(fd),
            fs,
            proto: Protocol::Cuse,
            want_passthrough: false,
            cuse_devname: Some(devname.to_string()),
            initialized: AtomicBool::new(false),
            want_uring: AtomicBool::new(false),
            uring_hook: Mutex::new(None),
            turn: Default::default(),
        })
    }

    /// Asks for FUSE-over-io_uring at INIT (before `run`); `hook` learns the outcome right
    /// after the INIT reply, when the kernel accepts ring registrations.
    pub fn request_uring(&self, hook: UringHook) {
        if let Ok(mut h) = self.uring_hook.lock() {
            *h = Some(hook);
        }
        self.want_uring.store(true, Ordering::Release);
    }

    /// Runs `threads` workers until the channel closes (unmount, abort) or DESTROY.
    ///
    /// Every worker blocked in `read(/dev/fuse)` takes its turn (the kernel wakes the longest
    /// waiting one), so with several readers each request wakes a sleeping thread — about
    /// 0.5 µs of a 4.7 µs round trip on one CPU (docs/bench.md). When the filesystem is
    /// [`Filesystem::single_reader`] *and* the calling thread (whose affinity the workers
    /// inherit) may run on one CPU only, only the worker holding the reading turn reads; it
    /// answers requests itself and keeps reading, so a steady stream of requests wakes nobody,
    /// and it passes the turn to a waiting worker before a request that
    /// [`Filesystem::hands_off`]. On several CPUs every worker reads: a lone reader is woken on
    /// whichever CPU it last ran on, mostly not the caller's, and a cross-CPU wake-up costs far
    /// more than the saving (unpinned, one client: 81–100 µs p50 against 5–57 µs here).
    pub fn run(self: &Arc<Self>, threads: usize) -> io::Result<()> {
        let single = self.fs.single_reader() && super::sys::affinity_cpus() == Some(1);
        let dog = if single {
            let s = Arc::clone(self);
            let stalls = move || {
                s.chan.reader_stalls.fetch_add(1, Ordering::Relaxed);
            };
            let s = Arc::clone(self);
            Some(
                std::thread::Builder::new()
                    .name("fuse-turn".into())
                    .spawn(move || s.turn.watch(stalls))?,
            )
        } else {
            None
        };
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let s = Arc::clone(self);
            match std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || s.worker(single))
            {
                Ok(h) => handles.push(h),
                Err(e) if handles.is_empty() => {
                    self.turn.close();
                    return Err(e);
                }
                Err(e) => log::warn!("starting FUSE worker {i}: {e}; running with {i}"),
            }
        }
        for h in handles {
            let _ = h.join();
        }
        self.turn.close();
        if let Some(d) = dog {
            let _ = d.join();
        }
        Ok(())
    }

    fn worker(&self, single: bool) {
        let mut buf = vec![0u8; BUFFER_SIZE];
        // Single-reader mode: the generation of the reading turn this worker holds.
        let mut turn: Option<u64> = None;
        loop {
            if single {
                let gen = *turn.get_or_insert_with(|| self.turn.take());
                if self.chan.destroyed.load(Ordering::Relaxed) {
                    break;
                }
                if !self.turn.reading(gen) {
                    // The watchdog passed the turn on while this worker was busy.
                    turn = None;
                    continue;
                }
            }
            // SAFETY: reading into our own buffer of BUFFER_SIZE bytes.
            let n =
                unsafe { libc::read(self.chan.raw_fd(), buf.as_mut_ptr() as *mut _, buf.len()) };
            if n < 0 {
                let e = Errno::last();
                match e {
                    Errno::EINTR | Errno::EAGAIN | Errno::ENOENT => continue,
                    Errno::ENODEV => break, // unmounted or aborted
                    _ => {
                        log::error!("reading the FUSE channel: {e}");
                        break;
                    }
                }
            }
            if n == 0 {
                break;
            }
            self.chan.dev_requests.fetch_add(1, Ordering::Relaxed);
            let msg = &buf[..n as usize];
            if let Some(gen) = turn {
                self.turn.handling(gen);
                if take::<InHeader>(msg).is_none_or(|(h, _)| self.fs.hands_off(h.opcode)) {
                    self.turn.pass();
                    turn = None;
                }
            }
            self.dispatch(msg);
            if self.chan.destroyed.load(Ordering::Relaxed) {
                break;
            }
        }
        // The next worker reads on and meets the same end (ENODEV or `destroyed`).
        if turn.is_some() {
            self.turn.pass();
        }
    }

    /// Handles one request (public for the wire tests' use through a socketpair as well).
    pub fn dispatch(&self, msg: &[u8]) {
        let Some((h, _)) = take::<InHeader>(msg) else {
            log::warn!(
                "request shorter than a header ({} bytes) dropped",
                msg.len()
            );
            return;
        };
        if h.len as usize != msg.len() {
            log::warn!(
                "request {}: header says {} bytes, got {}",
                h.unique,
                h.len,
                msg.len()
            );
            return self.chan.send_error(h.unique, Errno::EINVAL);
        }
        let body = &msg[40..];
        let req = Request {
            unique: h.unique,
            opcode: h.opcode,
            nodeid: h.nodeid,
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
        };
        if h.opcode == FUSE_INIT || h.opcode == CUSE_INIT {
            return self.init(&req, body);
        }
        if !self.initialized.load(Ordering::Acquire) {
            log::warn!("opcode {} before INIT", h.opcode);
            return self.chan.send_error(h.unique, Errno::EIO);
        }
        if let Err(e) = self.handle(&req, body) {
            self.chan.send_error(h.unique, e);
        }
    }

    fn init(&self, req: &Request, body: &[u8]) {
        let ok = matches!(
            (req.opcode, self.proto),
            (FUSE_INIT, Protocol::Fuse) | (CUSE_INIT, Protocol::Cuse)
        );
        if !ok {
            log::warn!(
                "INIT opcode {} does not match this channel ({:?})",
                req.opcode,
                self.proto
            );
            return self.chan.send_error(req.unique, Errno::EPROTO);
        }
        let Some((inp, rest)) = take::<InitIn>(body) else {
            log::warn!("truncated INIT ({} bytes)", body.len());
            return self.chan.send_error(req.unique, Errno::EINVAL);
        };
        if inp.major < FUSE_KERNEL_VERSION {
            log::error!(
                "kernel FUSE protocol {}.{} is too old",
                inp.major,
                inp.minor
            );
            return self.chan.send_error(req.unique, Errno::EPROTO);
        }
        if inp.major > FUSE_KERNEL_VERSION {
            // The kernel will send INIT again with our major.
            let out = InitOut {
                major: FUSE_KERNEL_VERSION,
                minor: FUSE_KERNEL_MINOR_VERSION,
                ..Default::default()
            };
            return self.chan.send(req.unique, 0, &[out.as_bytes()]);
        }
        if inp.minor < FUSE_MIN_MINOR {
            log::error!(
                "kernel FUSE protocol 7.{} is older than 7.{}",
                inp.minor,
                FUSE_MIN_MINOR
            );
            return self.chan.send_error(req.unique, Errno::EPROTO);
        }
        let want_uring = self.proto == Protocol::Fuse && self.want_uring.load(Ordering::Acquire);
        // 7.42 brought FUSE_OVER_IO_URING; without it we stay at our usual newest minor.
        let our_minor = if want_uring {
            FUSE_URING_MINOR_VERSION
        } else {
            FUSE_KERNEL_MINOR_VERSION
        };
        let minor = inp.minor.min(our_minor);
        self.chan.proto_minor.store(minor, Ordering::Relaxed);
        if self.proto == Protocol::Cuse {
            let name = self.cuse_devname.as_deref().unwrap_or("kfdmux");
            let out = CuseInitOut {
                major: FUSE_KERNEL_VERSION,
                minor,
                flags: CUSE_UNRESTRICTED_IOCTL,
                max_read: MAX_WRITE,
                max_write: MAX_WRITE,
                ..Default::default()
            };
            let info = format!("DEVNAME={name}\0");
            // As for FUSE below: ready before the reply, since the kernel registers the device
            // on it and an OPEN may reach another worker before this one returns.
            self.fs.init(false);
            self.initialized.store(true, Ordering::Release);
            self.chan
                .send(req.unique, 0, &[out.as_bytes(), info.as_bytes()]);
            return;
        }
        let mut kflags = inp.flags as u64;
        if kflags & FUSE_INIT_EXT != 0 {
            if let Some((ext, _)) = take::<InitInExt>(rest) {
                kflags |= (ext.flags2 as u64) << 32;
            }
        }
        let mut want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES;
        let passthrough = self.want_passthrough && kflags & FUSE_PASSTHROUGH != 0 && minor >= 40;
        if passthrough {
            want |= FUSE_PASSTHROUGH | FUSE_INIT_EXT;
        }
        let uring = want_uring && kflags & FUSE_OVER_IO_URING != 0 && minor >= 42;
        if uring {
            want |= FUSE_OVER_IO_URING | FUSE_INIT_EXT;
        }
        let flags = want & kflags;
        let out = InitOut {
            major: FUSE_KERNEL_VERSION,
            minor,
            max_readahead: inp.max_readahead,
            flags: flags as u32,
            max_background: 64,
            congestion_threshold: 48,
            max_write: MAX_WRITE,
            time_gran: 1,
            max_pages: (MAX_WRITE / 4096) as u16,
            map_alignment: 0,
            flags2: (flags >> 32) as u32,
            max_stack_depth: if passthrough { 1 } else { 0 },
            unused: [0; 6],
        };
        self.chan.passthrough.store(passthrough, Ordering::Relaxed);
        // Initialised before the reply goes out: the kernel sends the next request as soon as it
        // has the reply, and another worker may read it before this one returns.
        self.fs.init(passthrough);
        self.initialized.store(true, Ordering::Release);
        self.chan.send(req.unique, 0, &[out.as_bytes()]);
        if want_uring {
            let hook = self.uring_hook.lock().ok().and_then(|mut h| h.take());
            if let Some(h) = hook {
                h(uring);
            }
        }
    }

    fn handle(&self, req: &Request, body: &[u8]) -> Result<(), Errno> {
        let chan = &self.chan;
        let fs = &self.fs;
        match req.opcode {
            FUSE_LOOKUP => {
                let name = body.strip_suffix(&[0]).ok_or(Errno::EINVAL)?;
                let e = fs.lookup(req, req.nodeid, name)?;
                chan.send(req.unique, 0, &[e.as_bytes()]);
            }
            FUSE_FORGET => {
                let (f, _) = take::<ForgetIn>(body).ok_or(Errno::EINVAL)?;
                fs.forget(req.nodeid, f.nlookup); // no reply
            }
            FUSE_BATCH_FORGET => {
                let (b, mut rest) = take::<BatchForgetIn>(body).ok_or(Errno::EINVAL)?;
                for _ in 0..b.count {
                    let Some((one, r)) = take::<ForgetOne>(rest) else {
                        break;
                    };
                    fs.forget(one.nodeid, one.nlookup);
                    rest = r;
                }
            }
            FUSE_GETATTR => {
                let a = fs.getattr(req, req.nodeid)?;
                chan.send(req.unique, 0, &[a.as_bytes()]);
            }
            FUSE_SETATTR => {
                // Nothing is settable; report the attributes unchanged (O_TRUNC opens work).
                let a = fs.getattr(req, req.nodeid)?;
                chan.send(req.unique, 0, &[a.as_bytes()]);
            }
            FUSE_OPEN | FUSE_OPENDIR => {
                let (o, _) = take::<OpenIn>(body).ok_or(Errno::EINVAL)?;
                let r = fs.open(req, req.nodeid, o.flags)?;
                let out = OpenOut {
                    fh: r.fh,
                    open_flags: r.open_flags,
                    backing_id: r.backing_id,
                };
                chan.send(req.unique, 0, &[out.as_bytes()]);
            }
            FUSE_RELEASE | FUSE_RELEASEDIR => {
                let (r, _) = take::<ReleaseIn>(body).ok_or(Errno::EINVAL)?;
                fs.release(req, req.nodeid, r.fh);
                chan.send(req.unique, 0, &[]);
            }
            FUSE_READ => {
                let (r, _) = take::<ReadIn>(body).ok_or(Errno::EINVAL)?;
                let data = fs.read(req, r.fh, r.offset, r.size.min(MAX_WRITE))?;
                let n = data.len().min(r.size as usize);
                chan.send(req.unique, 0, &[&data[..n]]);
            }
            FUSE_READDIR => {
                let (r, _) = take::<ReadIn>(body).ok_or(Errno::EINVAL)?;
                let entries = fs.readdir(req, req.nodeid)?;
                let mut out = Vec::new();
                for (i, (ino, typ, name)) in entries.iter().enumerate().skip(r.offset as usize) {
                    let d = Dirent {
                        ino: *ino,
                        off: i as u64 + 1,
                        namelen: name.len() as u32,
                        typ: *typ,
                    };
                    let rec = (24 + name.len() + 7) & !7;
                    if out.len() + rec > r.size as usize {
                        break;
                    }
                    out.extend_from_slice(d.as_bytes());
                    out.extend_from_slice(name);
                    out.resize(out.len() + rec - 24 - name.len(), 0);
                }
                chan.send(req.unique, 0, &[&out]);
            }
            FUSE_WRITE => {
                let (w, data) = take::<WriteIn>(body).ok_or(Errno::EINVAL)?;
                let data = data.get(..w.size as usize).ok_or(Errno::EINVAL)?;
                let n = fs.write(req, w.fh, w.offset, data)?;
                chan.send(
                    req.unique,
                    0,
                    &[WriteOut {
                        size: n,
                        padding: 0,
                    }
                    .as_bytes()],
                );
            }
            FUSE_IOCTL => {
                let (io, data) = take::<IoctlIn>(body).ok_or(Errno::EINVAL)?;
                let in_data = data.get(..io.in_size as usize).ok_or(Errno::EINVAL)?;
                if let Ok(mut m) = chan.inflight.lock() {
                    // Under the inflight lock, as `interrupt` records early ones.
                    let interrupted = chan.take_early_interrupt(req.unique);
                    m.insert(req.unique, Inflight::Running { interrupted });
                }
                let reply = IoctlReply {
                    chan: Arc::clone(chan),
                    unique: req.unique,
                    answered: false,
                };
                let args = IoctlArgs {
                    fh: io.fh,
                    flags: io.flags,
                    cmd: io.cmd,
                    arg: io.arg,
                    out_size: io.out_size,
                };
                fs.ioctl(req, args, in_data, reply);
            }
            FUSE_INTERRUPT => {
                let (i, _) = take::<InterruptIn>(body).ok_or(Errno::EINVAL)?;
                self.interrupt(req.unique, i.unique);
            }
            FUSE_POLL => {
                let (p, _) = take::<PollIn>(body).ok_or(Errno::EINVAL)?;
                let kh = (p.flags & FUSE_POLL_SCHEDULE_NOTIFY != 0).then_some(p.kh);
                let revents = fs.poll(req, p.fh, kh, p.events)?;
                chan.send(
                    req.unique,
                    0,
                    &[PollOut {
                        revents,
                        padding: 0,
                    }
                    .as_bytes()],
                );
            }
            FUSE_STATFS => {
                let st = Kstatfs {
                    bsize: 4096,
                    frsize: 4096,
                    namelen: 255,
                    ..Default::default()
                };
                chan.send(req.unique, 0, &[st.as_bytes()]);
            }
            // ENOSYS makes the kernel stop sending FLUSH on every close (no_flush); that also
            // keeps a worker that closes a client fd it borrowed from waiting on another.
            FUSE_FLUSH => return Err(Errno::ENOSYS),
            FUSE_FSYNC | FUSE_ACCESS => chan.send(req.unique, 0, &[]),
            FUSE_DESTROY => {
                fs.destroy();
                chan.destroyed.store(true, Ordering::Relaxed);
                chan.send(req.unique, 0, &[]);
            }
            op => {
                log::debug!("opcode {op} not implemented");
                return Err(Errno::ENOSYS);
            }
        }
        Ok(())
    }

    fn interrupt(&self, own_unique: u64, target: u64) {
        let cancel = {
            let Ok(mut m) = self.chan.inflight.lock() else {
                return;
            };
            match m.get_mut(&target) {
                Some(Inflight::Running { interrupted }) => {
                    *interrupted = true;
                    None
                }
                Some(slot @ Inflight::Parked(_)) => {
                    match std::mem::replace(slot, Inflight::Running { interrupted: true }) {
                        Inflight::Parked(c) => Some(c),
                        Inflight::Running { .. } => None,
                    }
                }
                None => {
                    // Not seen yet (or already answered): ask the kernel to queue it again.
                    if self.chan.ring.get().is_some() {
                        // A ring request may still be on its way to a queue thread.
                        if let Ok(mut q) = self.chan.early_interrupts.lock() {
                            if q.len() >= EARLY_INTERRUPTS {
                                q.pop_front();
                            }
                            q.push_back(target);
                        }
                    }
                    drop(m);
                    self.chan.send_error(own_unique, Errno::EAGAIN);
                    return;
                }
            }
        };
        if let Some(c) = cancel {
            log::debug!("request {target} interrupted");
            c();
        }
    }
}

/// Parses a raw buffer as a `T` (for tests and transports).
pub fn parse<T: FromBytes>(b: &[u8]) -> Option<T> {
    T::read_from_prefix(b).ok().map(|(t, _)| t)
}
