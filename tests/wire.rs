//! Wire-level tests: the real FUSE stack (engine → FuseFs → Mux → sim device) driven over a
//! `SOCK_SEQPACKET` socketpair by a test that plays the kernel's side of `/dev/fuse` byte for
//! byte (each `write` is one request, each reply one message), with exact expected replies.
//!
//! The header `pid` of device requests is this test process's own pid: the daemon checks the
//! caller's tgid in `/proc` and moves pointed-to memory with `process_vm_readv/writev` on it,
//! which works on oneself. Requests that must be refused use the pid of a `sleep` child.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kfdmux::abi::table::{ioc, IOC_READ, IOC_WRITE, KFD_IOC_TYPE};
use kfdmux::abi::{
    KfdEventData, KfdIoctlCreateEventArgs, KfdIoctlGetProcessAperturesNewArgs,
    KfdIoctlGetVersionArgs, KfdIoctlSetEventArgs, KfdIoctlWaitEventsArgs,
    KfdProcessDeviceApertures, AMDKFD_IOC_CREATE_EVENT, AMDKFD_IOC_GET_PROCESS_APERTURES_NEW,
    AMDKFD_IOC_GET_VERSION, AMDKFD_IOC_SET_EVENT, AMDKFD_IOC_WAIT_EVENTS,
};
use kfdmux::device::sim::{SimConfig, SimDevice};
use kfdmux::mux::Mux;
use kfdmux::transport::engine::{
    Filesystem, IoctlArgs, IoctlReply, Opened, Protocol, Request, Session,
};
use kfdmux::transport::fusefs::FuseFs;
use kfdmux::transport::wire::*;
use zerocopy::{FromBytes, Immutable, IntoBytes};

mod common;

const KFD_IOC_EVENT_SIGNAL: u32 = 0;
const KFD_IOC_WAIT_RESULT_COMPLETE: u32 = 0;
const KFD_IOC_WAIT_RESULT_TIMEOUT: u32 = 1;
const KFD_EVENT_TIMEOUT_INFINITE: u32 = 0xffff_ffff;
/// Any user address: restricted ioctls carry the struct itself, the address is informational.
const ARG_ADDR: u64 = 0x7ffd_0000_1000;
const WAIT: Duration = Duration::from_secs(5);

/// One reply as the "kernel" receives it.
#[derive(Debug, Clone)]
struct Reply {
    len: u32,
    error: i32,
    unique: u64,
    body: Vec<u8>,
}

impl Reply {
    /// The `IoctlOut` result and the data after it; panics on a malformed ioctl reply.
    fn ioctl(&self) -> (IoctlOut, &[u8]) {
        assert_eq!(self.error, 0, "ioctl reply carries an error: {self:?}");
        let (o, rest) = IoctlOut::read_from_prefix(&self.body).expect("IoctlOut in reply");
        assert_eq!(
            (o.flags, o.in_iovs, o.out_iovs),
            (0, 0, 0),
            "restricted ioctl replies never retry"
        );
        (o, rest)
    }
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair writes two new fds into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn my_pid() -> u32 {
    std::process::id()
}

fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

/// A process that is not us: requests carrying its pid must be refused.
struct Other(Child);

impl Other {
    fn spawn() -> Other {
        Other(
            Command::new("sleep")
                .arg("60")
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn sleep"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Other {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kernel's end of a session.
struct Kernel {
    fd: OwnedFd,
    session: Option<Arc<Session>>,
    runner: Option<JoinHandle<()>>,
    stash: Vec<Reply>,
    next_unique: u64,
    kfd_minor: u32,
}

impl Kernel {
    /// The real stack over a socketpair, 2 worker threads, not yet initialised.
    fn start(want_passthrough: bool) -> Kernel {
        let (ours, theirs) = seqpacket_pair();
        let gpus = kfdmux::topology::parse_gpus("gfx90a:2").expect("gpu spec");
        let cfg = SimConfig::default();
        let kfd_minor = cfg.kfd_minor;
        let device = SimDevice::new(gpus, cfg);
        let fs = FuseFs::new(Mux::new(device));
        let session = Session::new(theirs, fs.clone(), Protocol::Fuse, want_passthrough);
        fs.set_channel(session.chan.clone());
        Kernel::run(ours, session, 2, kfd_minor, false)
    }

    /// Any filesystem behind the engine, `threads` workers, initialised with a 7.41 INIT.
    /// `one_cpu`: the session's threads may run on CPU 0 only (single-reader mode needs that).
    fn serving(fs: Arc<dyn Filesystem>, threads: usize, one_cpu: bool) -> Kernel {
        let (ours, theirs) = seqpacket_pair();
        let session = Session::new(theirs, fs, Protocol::Fuse, false);
        let mut k = Kernel::run(ours, session, threads, 0, one_cpu);
        let r = k.call(
            FUSE_INIT,
            0,
            my_pid(),
            &init_body(7, 41, default_kernel_flags()),
        );
        assert_eq!(r.error, 0, "INIT: {r:?}");
        k
    }

    fn run(
        ours: OwnedFd,
        session: Arc<Session>,
        threads: usize,
        kfd_minor: u32,
        one_cpu: bool,
    ) -> Kernel {
        let s = session.clone();
        let runner = std::thread::spawn(move || {
            if one_cpu {
                common::pin(0);
            }
            let _ = s.run(threads);
        });
        Kernel {
            fd: ours,
            session: Some(session),
            runner: Some(runner),
            stash: Vec::new(),
            next_unique: 2,
            kfd_minor,
        }
    }

    /// Closes the channel as an unmount does; every worker must be gone within `d`.
    fn shut_down_within(&mut self, d: Duration) {
        // SAFETY: shutting down our own socket.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        let r = self.runner.take().expect("runner");
        let deadline = Instant::now() + d;
        while !r.is_finished() {
            assert!(
                Instant::now() < deadline,
                "workers still running {d:?} after EOF"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = r.join();
    }

    /// Started and initialised with a 7.41 INIT.
    fn ready() -> Kernel {
        let mut k = Kernel::start(false);
        let r = k.call(
            FUSE_INIT,
            0,
            my_pid(),
            &init_body(7, 41, default_kernel_flags()),
        );
        assert_eq!(r.error, 0, "INIT: {r:?}");
        k
    }

    fn send_raw(&self, msg: &[u8]) {
        // SAFETY: writing our own buffer to our own socket.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const _,
                msg.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        assert_eq!(
            n,
            msg.len() as isize,
            "send: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends a request with a fresh (even) unique; returns the unique.
    fn send(&mut self, opcode: u32, nodeid: u64, pid: u32, body: &[u8]) -> u64 {
        let unique = self.next_unique;
        self.next_unique += 2;
        self.send_raw(&request(opcode, unique, nodeid, pid, body));
        unique
    }

    /// The next message on the channel within `timeout`.
    fn recv_any(&self, timeout: Duration) -> Option<Reply> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if r <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 256 * 1024];
        // SAFETY: receiving into our own buffer.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut _,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n <= 0 {
            return None;
        }
        buf.truncate(n as usize);
        let (h, body) =
            OutHeader::read_from_prefix(&buf).expect("reply shorter than an out header");
        assert_eq!(
            h.len as usize,
            buf.len(),
            "out header length must equal the message length"
        );
        Some(Reply {
            len: h.len,
            error: h.error,
            unique: h.unique,
            body: body.to_vec(),
        })
    }

    /// The reply to `unique` (other replies are kept for later).
    fn wait_for(&mut self, unique: u64, timeout: Duration) -> Option<Reply> {
        if let Some(i) = self.stash.iter().position(|r| r.unique == unique) {
            return Some(self.stash.remove(i));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.recv_any(left)?;
            if r.unique == unique {
                return Some(r);
            }
            self.stash.push(r);
            if left.is_zero() {
                return None;
            }
        }
    }

    fn reply(&mut self, unique: u64) -> Reply {
        self.wait_for(unique, WAIT)
            .unwrap_or_else(|| panic!("no reply to request {unique} within {WAIT:?}"))
    }

    fn call(&mut self, opcode: u32, nodeid: u64, pid: u32, body: &[u8]) -> Reply {
        let u = self.send(opcode, nodeid, pid, body);
        self.reply(u)
    }

    /// Asserts that nothing at all arrives within `d`.
    fn expect_silence(&mut self, d: Duration) {
        assert!(
            self.stash.is_empty(),
            "unexpected replies: {:?}",
            self.stash
        );
        if let Some(r) = self.recv_any(d) {
            panic!("expected no reply, got {r:?}");
        }
    }

    fn lookup(&mut self, name: &str, pid: u32) -> Result<EntryOut, i32> {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        let r = self.call(FUSE_LOOKUP, FUSE_ROOT_ID, pid, &b);
        if r.error != 0 {
            return Err(r.error);
        }
        assert_eq!(
            r.body.len(),
            std::mem::size_of::<EntryOut>(),
            "LOOKUP reply size"
        );
        Ok(EntryOut::read_from_bytes(&r.body).expect("EntryOut"))
    }

    fn open(&mut self, nodeid: u64, pid: u32) -> Result<OpenOut, i32> {
        let body = OpenIn {
            flags: libc::O_RDWR as u32,
            open_flags: 0,
        };
        let r = self.call(FUSE_OPEN, nodeid, pid, body.as_bytes());
        if r.error != 0 {
            return Err(r.error);
        }
        assert_eq!(r.body.len(), 16, "OPEN reply size");
        Ok(OpenOut::read_from_bytes(&r.body).expect("OpenOut"))
    }

    /// LOOKUP + OPEN of `name` for `pid`: (nodeid, fh).
    fn open_file(&mut self, name: &str, pid: u32) -> (u64, u64) {
        let e = self
            .lookup(name, pid)
            .unwrap_or_else(|e| panic!("LOOKUP {name}: {e}"));
        let o = self
            .open(e.nodeid, pid)
            .unwrap_or_else(|e| panic!("OPEN {name}: {e}"));
        (e.nodeid, o.fh)
    }

    fn release(&mut self, nodeid: u64, fh: u64, pid: u32) -> Reply {
        let body = ReleaseIn {
            fh,
            flags: libc::O_RDWR as u32,
            release_flags: 0,
            lock_owner: 0,
        };
        self.call(FUSE_RELEASE, nodeid, pid, body.as_bytes())
    }

    /// Sends a restricted ioctl as the kernel does for a FUSE regular file.
    fn send_ioctl(
        &mut self,
        f: (u64, u64),
        pid: u32,
        cmd: u32,
        input: &[u8],
        out_size: u32,
    ) -> u64 {
        let io = IoctlIn {
            fh: f.1,
            flags: 0,
            cmd,
            arg: ARG_ADDR,
            in_size: input.len() as u32,
            out_size,
        };
        let mut body = io.as_bytes().to_vec();
        body.extend_from_slice(input);
        self.send(FUSE_IOCTL, f.0, pid, &body)
    }

    /// An `_IOWR`/`_IOR`/`_IOW` ioctl of `T` with the sizes the kernel derives from `cmd`.
    fn ioctl<T: IntoBytes + Immutable>(
        &mut self,
        f: (u64, u64),
        pid: u32,
        cmd: u32,
        arg: &T,
    ) -> Reply {
        let u = self.send_typed(f, pid, cmd, arg);
        self.reply(u)
    }

    fn send_typed<T: IntoBytes + Immutable>(
        &mut self,
        f: (u64, u64),
        pid: u32,
        cmd: u32,
        arg: &T,
    ) -> u64 {
        let dir = cmd >> 30;
        let size = (cmd >> 16) & 0x3fff;
        let input: &[u8] = if dir & IOC_WRITE != 0 {
            &arg.as_bytes()[..size as usize]
        } else {
            &[]
        };
        let out = if dir & IOC_READ != 0 { size } else { 0 };
        self.send_ioctl(f, pid, cmd, input, out)
    }

    /// The stats file's text, read over the wire like `cat` would.
    fn stats(&mut self) -> String {
        let (node, fh) = self.open_file("stats", my_pid());
        let rd = ReadIn {
            fh,
            offset: 0,
            size: 65536,
            read_flags: 0,
            lock_owner: 0,
            flags: 0,
            padding: 0,
        };
        let r = self.call(FUSE_READ, node, my_pid(), rd.as_bytes());
        assert_eq!(r.error, 0, "READ stats: {r:?}");
        let rel = self.release(node, fh, my_pid());
        assert_eq!((rel.error, rel.len), (0, 16));
        String::from_utf8(r.body).expect("stats is text")
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // EOF on the channel stops the workers (they read 0 bytes).
        // SAFETY: shutting down our own socket.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(r) = self.runner.take() {
            let _ = r.join();
        }
        self.session.take();
    }
}

fn request(opcode: u32, unique: u64, nodeid: u64, pid: u32, body: &[u8]) -> Vec<u8> {
    let h = InHeader {
        len: (40 + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        uid: uid(),
        gid: 0,
        pid,
        total_extlen: 0,
        padding: 0,
    };
    let mut m = h.as_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

/// What a 6.x kernel offers in INIT (a subset that matters here).
fn default_kernel_flags() -> u64 {
    FUSE_ASYNC_READ
        | FUSE_BIG_WRITES
        | FUSE_MAX_PAGES
        | FUSE_INIT_EXT
        | FUSE_PASSTHROUGH
        | (1 << 3)
        | (1 << 11)
}

fn init_body(major: u32, minor: u32, flags: u64) -> Vec<u8> {
    let mut b = InitIn {
        major,
        minor,
        max_readahead: 131072,
        flags: flags as u32,
    }
    .as_bytes()
    .to_vec();
    b.extend_from_slice(
        InitInExt {
            flags2: (flags >> 32) as u32,
            unused: [0; 11],
        }
        .as_bytes(),
    );
    b
}

fn stats_map(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with("context "))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// (context id, fh, pid) of every `context ...` line.
fn stats_contexts(text: &str) -> Vec<(u64, u64, u32)> {
    text.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() != Some(&"context") || w.get(2) != Some(&"fh") || w.get(4) != Some(&"pid")
            {
                return None;
            }
            Some((w[1].parse().ok()?, w[3].parse().ok()?, w[5].parse().ok()?))
        })
        .collect()
}

// ----- INIT ------------------------------------------------------------------------------------

#[test]
fn init_negotiates_exact_reply() {
    let mut k = Kernel::start(false);
    let r = k.call(
        FUSE_INIT,
        0,
        my_pid(),
        &init_body(7, 41, default_kernel_flags()),
    );
    let expect = InitOut {
        major: 7,
        minor: 41,
        max_readahead: 131072,
        flags: (FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES) as u32,
        max_background: 64,
        congestion_threshold: 48,
        max_write: 128 * 1024,
        time_gran: 1,
        max_pages: 32,
        map_alignment: 0,
        flags2: 0,
        max_stack_depth: 0,
        unused: [0; 6],
    };
    assert_eq!((r.error, r.len), (0, 16 + 64));
    assert_eq!(r.body, expect.as_bytes(), "InitOut without passthrough");
    // The session now answers requests.
    assert!(k.lookup("kfd", my_pid()).is_ok());
}

#[test]
fn init_with_passthrough_wanted_and_offered() {
    let mut k = Kernel::start(true);
    let r = k.call(
        FUSE_INIT,
        0,
        my_pid(),
        &init_body(7, 41, default_kernel_flags()),
    );
    let out = InitOut::read_from_bytes(&r.body).expect("InitOut");
    assert_eq!((r.error, out.major, out.minor), (0, 7, 41));
    assert_eq!(
        out.flags as u64,
        FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_INIT_EXT
    );
    assert_eq!(out.flags2 as u64, FUSE_PASSTHROUGH >> 32);
    assert_eq!(out.max_stack_depth, 1);
    assert!(k.session.as_ref().expect("session").chan.passthrough());
    // A socket cannot register backing files: OPEN falls back to direct I/O without a backing id.
    let e = k.lookup("kfd", my_pid()).expect("lookup");
    let o = k.open(e.nodeid, my_pid()).expect("open");
    assert_eq!(
        (o.open_flags, o.backing_id),
        (FOPEN_DIRECT_IO | FOPEN_NOFLUSH, 0)
    );
}

#[test]
fn init_older_kernel_gets_its_minor_and_no_passthrough() {
    let mut k = Kernel::start(true);
    let flags = default_kernel_flags();
    let r = k.call(FUSE_INIT, 0, my_pid(), &init_body(7, 36, flags));
    let out = InitOut::read_from_bytes(&r.body).expect("InitOut");
    assert_eq!((r.error, out.major, out.minor), (0, 7, 36));
    assert_eq!(
        out.flags as u64,
        FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES
    );
    assert_eq!((out.flags2, out.max_stack_depth), (0, 0));
    assert!(!k.session.as_ref().expect("session").chan.passthrough());
    // A newer kernel than we know: we answer with our own minor.
    let mut k = Kernel::start(false);
    let r = k.call(FUSE_INIT, 0, my_pid(), &init_body(7, 99, FUSE_ASYNC_READ));
    let out = InitOut::read_from_bytes(&r.body).expect("InitOut");
    assert_eq!(
        (r.error, out.major, out.minor, out.flags),
        (0, 7, 41, FUSE_ASYNC_READ as u32)
    );
}

#[test]
fn requests_before_init_get_eio() {
    let mut k = Kernel::start(false);
    for op in [FUSE_LOOKUP, FUSE_OPEN, FUSE_IOCTL, FUSE_GETATTR, 9999] {
        let r = k.call(op, FUSE_ROOT_ID, my_pid(), b"kfd\0");
        assert_eq!(
            (r.error, r.len),
            (-libc::EIO, 16),
            "opcode {op} before INIT"
        );
    }
}

#[test]
fn init_major_8_gets_major_7_only_then_real_init_works() {
    let mut k = Kernel::start(false);
    let r = k.call(
        FUSE_INIT,
        0,
        my_pid(),
        &init_body(8, 0, default_kernel_flags()),
    );
    assert_eq!((r.error, r.len), (0, 16 + 64));
    let out = InitOut::read_from_bytes(&r.body).expect("InitOut");
    assert_eq!(out.major, 7);
    // Nothing is negotiated by that reply: no flags, no sizes.
    assert_eq!(
        (
            out.flags,
            out.flags2,
            out.max_write,
            out.max_readahead,
            out.max_pages
        ),
        (0, 0, 0, 0, 0)
    );
    // Still not initialised…
    assert_eq!(
        k.call(FUSE_LOOKUP, FUSE_ROOT_ID, my_pid(), b"kfd\0").error,
        -libc::EIO
    );
    // …until the kernel retries with major 7.
    let r = k.call(
        FUSE_INIT,
        0,
        my_pid(),
        &init_body(7, 41, default_kernel_flags()),
    );
    assert_eq!(r.error, 0);
    assert!(k.lookup("kfd", my_pid()).is_ok());
}

#[test]
fn init_too_old_or_truncated_is_refused() {
    let mut k = Kernel::start(false);
    let r = k.call(
        FUSE_INIT,
        0,
        my_pid(),
        &init_body(7, 25, default_kernel_flags()),
    );
    assert_eq!((r.error, r.len), (-libc::EPROTO, 16), "minor 25 < 26");
    let r = k.call(FUSE_INIT, 0, my_pid(), &init_body(6, 41, 0));
    assert_eq!((r.error, r.len), (-libc::EPROTO, 16), "major 6");
    let r = k.call(FUSE_INIT, 0, my_pid(), &[7, 0, 0, 0, 41, 0]);
    assert_eq!((r.error, r.len), (-libc::EINVAL, 16), "truncated INIT");
    let r = k.call(CUSE_INIT, 0, my_pid(), &init_body(7, 41, 0));
    assert_eq!(
        (r.error, r.len),
        (-libc::EPROTO, 16),
        "CUSE_INIT on a FUSE channel"
    );
    // None of that initialised the session.
    assert_eq!(
        k.call(FUSE_LOOKUP, FUSE_ROOT_ID, my_pid(), b"kfd\0").error,
        -libc::EIO
    );
    // INIT without the extension (a kernel that does not set INIT_EXT) works.
    let r = k.call(
        FUSE_INIT,
        0,
        my_pid(),
        InitIn {
            major: 7,
            minor: 31,
            max_readahead: 4096,
            flags: 1,
        }
        .as_bytes(),
    );
    let out = InitOut::read_from_bytes(&r.body).expect("InitOut");
    assert_eq!(
        (r.error, out.minor, out.flags, out.max_readahead),
        (0, 31, 1, 4096)
    );
}

// ----- malformed requests ------------------------------------------------------------------

#[test]
fn unknown_opcodes_get_enosys() {
    let mut k = Kernel::ready();
    // MKNOD, MKDIR, UNLINK, SYMLINK, RENAME2, LSEEK, and numbers nobody uses.
    for op in [8, 9, 10, 6, 45, 46, 4095, 4097, 100_000, u32::MAX] {
        let r = k.call(op, FUSE_ROOT_ID, my_pid(), &[0u8; 24]);
        assert_eq!((r.error, r.len), (-libc::ENOSYS, 16), "opcode {op}");
    }
}

#[test]
fn header_length_mismatch_is_einval() {
    let mut k = Kernel::ready();
    let mut m = request(FUSE_LOOKUP, 1000, FUSE_ROOT_ID, my_pid(), b"kfd\0");
    m[0] += 8; // claims more than was sent
    k.send_raw(&m);
    let r = k.reply(1000);
    assert_eq!((r.error, r.len), (-libc::EINVAL, 16));
    let mut m = request(FUSE_LOOKUP, 1002, FUSE_ROOT_ID, my_pid(), b"kfd\0");
    m[0] -= 2; // claims less than was sent
    k.send_raw(&m);
    assert_eq!(k.reply(1002).error, -libc::EINVAL);
    let mut m = request(FUSE_LOOKUP, 1004, FUSE_ROOT_ID, my_pid(), b"kfd\0");
    m[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    k.send_raw(&m);
    assert_eq!(k.reply(1004).error, -libc::EINVAL);
    // Shorter than a header: nothing to answer to (no unique); dropped silently.
    k.send_raw(&[1, 2, 3]);
    k.send_raw(&request(FUSE_LOOKUP, 1006, 1, my_pid(), b"")[..39]);
    k.expect_silence(Duration::from_millis(150));
    assert!(
        k.lookup("kfd", my_pid()).is_ok(),
        "the session still answers"
    );
}

#[test]
fn truncated_bodies_are_einval() {
    let mut k = Kernel::ready();
    let (node, fh) = k.open_file("kfd", my_pid());
    let io = IoctlIn {
        fh,
        flags: 0,
        cmd: AMDKFD_IOC_SET_EVENT,
        arg: ARG_ADDR,
        in_size: 8,
        out_size: 0,
    };
    let cases: Vec<(u32, u64, Vec<u8>, &str)> = vec![
        (
            FUSE_LOOKUP,
            FUSE_ROOT_ID,
            b"kfd".to_vec(),
            "LOOKUP name without NUL",
        ),
        (FUSE_OPEN, node, vec![2, 0, 0], "OPEN short"),
        (
            FUSE_RELEASE,
            node,
            fh.to_le_bytes().to_vec(),
            "RELEASE short",
        ),
        (FUSE_READ, node, vec![0; 20], "READ short"),
        (FUSE_WRITE, node, vec![0; 39], "WRITE short"),
        (
            FUSE_IOCTL,
            node,
            io.as_bytes()[..31].to_vec(),
            "IOCTL header short",
        ),
        (
            FUSE_IOCTL,
            node,
            io.as_bytes().to_vec(),
            "IOCTL in_size beyond the message",
        ),
        (
            FUSE_IOCTL,
            node,
            [io.as_bytes(), &[0u8; 7]].concat(),
            "IOCTL one byte short",
        ),
        (FUSE_INTERRUPT, node, vec![0; 7], "INTERRUPT short"),
        (FUSE_POLL, node, vec![0; 23], "POLL short"),
        (FUSE_OPENDIR, FUSE_ROOT_ID, vec![], "OPENDIR empty"),
    ];
    for (op, nodeid, body, what) in cases {
        let r = k.call(op, nodeid, my_pid(), &body);
        assert_eq!((r.error, r.len), (-libc::EINVAL, 16), "{what}");
    }
    // WRITE whose size field exceeds the data.
    let w = WriteIn {
        fh,
        offset: 0,
        size: 100,
        write_flags: 0,
        lock_owner: 0,
        flags: 0,
        padding: 0,
    };
    let r = k.call(
        FUSE_WRITE,
        node,
        my_pid(),
        &[w.as_bytes(), &[0u8; 10]].concat(),
    );
    assert_eq!(r.error, -libc::EINVAL, "WRITE size beyond the data");
    // The file is still open and works.
    let r = k.ioctl(
        (node, fh),
        my_pid(),
        AMDKFD_IOC_GET_VERSION,
        &KfdIoctlGetVersionArgs::new_zeroed(),
    );
    assert_eq!(r.ioctl().0.result, 0);
}

// ----- files, OPEN, IOCTL ------------------------------------------------------------------

#[test]
fn lookup_gives_per_process_inodes_with_zero_timeouts() {
    let mut k = Kernel::ready();
    let other = Other::spawn();
    let e = k.lookup("kfd", my_pid()).expect("kfd");
    assert!(e.nodeid >= 2 && e.nodeid != FUSE_ROOT_ID);
    assert_eq!(
        (
            e.entry_valid,
            e.entry_valid_nsec,
            e.attr_valid,
            e.attr_valid_nsec
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(
        (e.attr.ino, e.attr.mode, e.attr.nlink),
        (e.nodeid, libc::S_IFREG | 0o666, 1)
    );
    // The same process gets the same inode again; another process its own.
    assert_eq!(k.lookup("kfd", my_pid()).expect("kfd").nodeid, e.nodeid);
    let e2 = k
        .lookup("kfd", other.pid())
        .expect("kfd for the other process");
    assert_ne!(e2.nodeid, e.nodeid);
    // One render node per GPU (gfx90a:2 → renderD128, renderD129), also per process.
    let r0 = k.lookup("renderD128", my_pid()).expect("renderD128");
    let r1 = k.lookup("renderD129", my_pid()).expect("renderD129");
    let r0o = k
        .lookup("renderD128", other.pid())
        .expect("renderD128 other");
    assert!(r0.nodeid != r1.nodeid && r0.nodeid != r0o.nodeid);
    // stats is shared and read-only.
    let s1 = k.lookup("stats", my_pid()).expect("stats");
    let s2 = k.lookup("stats", other.pid()).expect("stats");
    assert_eq!(
        (s1.nodeid, s1.attr.mode),
        (s2.nodeid, libc::S_IFREG | 0o444)
    );
    for bad in ["renderD130", "kfd2", "", "KFD"] {
        assert_eq!(
            k.lookup(bad, my_pid()).err(),
            Some(-libc::ENOENT),
            "{bad:?}"
        );
    }
    // Lookups below a file, and from a pid that does not exist.
    let r = k.call(FUSE_LOOKUP, e.nodeid, my_pid(), b"kfd\0");
    assert_eq!(r.error, -libc::ENOENT);
    assert_eq!(k.lookup("kfd", 0x7fff_fff0).err(), Some(-libc::ESRCH));
    // GETATTR of the root and of a file.
    let r = k.call(
        FUSE_GETATTR,
        FUSE_ROOT_ID,
        my_pid(),
        GetattrIn::default().as_bytes(),
    );
    let a = AttrOut::read_from_bytes(&r.body).expect("AttrOut");
    assert_eq!(
        (r.error, a.attr.ino, a.attr.mode),
        (0, 1, libc::S_IFDIR | 0o755)
    );
    let r = k.call(
        FUSE_GETATTR,
        e.nodeid,
        my_pid(),
        GetattrIn::default().as_bytes(),
    );
    let a = AttrOut::read_from_bytes(&r.body).expect("AttrOut");
    assert_eq!((a.attr.ino, a.attr_valid), (e.nodeid, 0));
    assert_eq!(
        k.call(FUSE_GETATTR, 9999, my_pid(), &[0; 16]).error,
        -libc::ENOENT
    );
}

#[test]
fn forget_drops_the_inode() {
    let mut k = Kernel::ready();
    let e = k.lookup("kfd", my_pid()).expect("kfd");
    assert_eq!(k.lookup("kfd", my_pid()).expect("kfd").nodeid, e.nodeid);
    // Two lookups: forgetting one keeps the inode, forgetting both drops it.
    k.send(
        FUSE_FORGET,
        e.nodeid,
        my_pid(),
        ForgetIn { nlookup: 1 }.as_bytes(),
    );
    let r = k.call(FUSE_GETATTR, e.nodeid, my_pid(), &[0; 16]);
    assert_eq!(r.error, 0, "one lookup left");
    let batch = [
        BatchForgetIn { count: 1, dummy: 0 }.as_bytes(),
        ForgetOne {
            nodeid: e.nodeid,
            nlookup: 1,
        }
        .as_bytes(),
    ]
    .concat();
    k.send(FUSE_BATCH_FORGET, 0, my_pid(), &batch);
    // FORGET has no reply: give the other worker time before asking again.
    std::thread::sleep(Duration::from_millis(100));
    let r = k.call(FUSE_GETATTR, e.nodeid, my_pid(), &[0; 16]);
    assert_eq!(
        r.error,
        -libc::ENOENT,
        "FORGET replies nothing and drops the node"
    );
    assert_ne!(
        k.lookup("kfd", my_pid()).expect("kfd").nodeid,
        e.nodeid,
        "a fresh inode"
    );
}

#[test]
fn open_of_another_process_inode_is_eacces() {
    let mut k = Kernel::ready();
    let other = Other::spawn();
    let mine = k.lookup("kfd", my_pid()).expect("kfd");
    let theirs = k.lookup("kfd", other.pid()).expect("kfd");
    assert_eq!(k.open(mine.nodeid, other.pid()).err(), Some(-libc::EACCES));
    assert_eq!(k.open(theirs.nodeid, my_pid()).err(), Some(-libc::EACCES));
    let r128 = k.lookup("renderD128", my_pid()).expect("render");
    assert_eq!(k.open(r128.nodeid, other.pid()).err(), Some(-libc::EACCES));
    // The refusals opened nothing.
    assert_eq!(stats_map(&k.stats())["contexts"], 0);
    let o = k.open(mine.nodeid, my_pid()).expect("own inode");
    assert_eq!(
        (o.open_flags, o.backing_id),
        (FOPEN_DIRECT_IO | FOPEN_NOFLUSH, 0),
        "no passthrough on a socket"
    );
    let o2 = k.open(theirs.nodeid, other.pid()).expect("their own inode");
    assert_ne!(o.fh, o2.fh);
    let text = k.stats();
    let mut pids: Vec<u32> = stats_contexts(&text).iter().map(|c| c.2).collect();
    pids.sort();
    let mut want = vec![my_pid(), other.pid()];
    want.sort();
    assert_eq!(pids, want, "{text}");
}

#[test]
fn get_version_exact_reply() {
    let mut k = Kernel::ready();
    let f = k.open_file("kfd", my_pid());
    let u = k.send_ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &[], 8);
    let r = k.reply(u);
    let mut want = IoctlOut {
        result: 0,
        flags: 0,
        in_iovs: 0,
        out_iovs: 0,
    }
    .as_bytes()
    .to_vec();
    want.extend_from_slice(
        KfdIoctlGetVersionArgs {
            major_version: 1,
            minor_version: k.kfd_minor,
        }
        .as_bytes(),
    );
    assert_eq!((r.error, r.len), (0, 16 + 16 + 8));
    assert_eq!(r.body, want);
    // A caller whose header asks for less gets less (the kernel copies `out_size`).
    let u = k.send_ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &[], 4);
    let r = k.reply(u);
    assert_eq!(r.body[16..], 1u32.to_le_bytes());
}

#[test]
fn ioctl_errors_are_the_kernels() {
    let mut k = Kernel::ready();
    let other = Other::spawn();
    let f = k.open_file("kfd", my_pid());
    let zero8 = [0u8; 8];
    // Unknown nr, wrong type, known nr with an unknown size.
    let r = k.ioctl(
        f,
        my_pid(),
        ioc(IOC_READ | IOC_WRITE, KFD_IOC_TYPE, 0x7e, 8),
        &zero8,
    );
    assert_eq!((r.error, r.len), (-libc::ENOTTY, 16), "unknown nr");
    let r = k.ioctl(f, my_pid(), ioc(IOC_READ, b'd' as u32, 0x00, 8), &zero8);
    assert_eq!(r.error, -libc::ENOTTY, "DRM ioctl on kfd");
    let r = k.ioctl(
        f,
        my_pid(),
        ioc(IOC_READ, KFD_IOC_TYPE, 0x01, 12),
        &[0u8; 12],
    );
    assert_eq!(r.error, -libc::EINVAL, "GET_VERSION with size 12");
    // A KFD ioctl on a render node.
    let rf = k.open_file("renderD128", my_pid());
    let r = k.ioctl(rf, my_pid(), AMDKFD_IOC_GET_VERSION, &zero8);
    assert_eq!(r.error, -libc::ENOTTY, "KFD ioctl on a render node");
    // 32-bit callers are refused as KFD does.
    let io = IoctlIn {
        fh: f.1,
        flags: FUSE_IOCTL_COMPAT,
        cmd: AMDKFD_IOC_GET_VERSION,
        arg: 0,
        in_size: 0,
        out_size: 8,
    };
    let r = k.call(FUSE_IOCTL, f.0, my_pid(), io.as_bytes());
    assert_eq!(r.error, -libc::EPERM, "compat ioctl");
    // Unknown file handle; another process's request on our file.
    let r = k.ioctl((f.0, 4242), my_pid(), AMDKFD_IOC_GET_VERSION, &zero8);
    assert_eq!(r.error, -libc::EBADF, "unknown fh");
    let r = k.ioctl(f, other.pid(), AMDKFD_IOC_GET_VERSION, &zero8);
    assert_eq!((r.error, r.len), (-libc::EBADF, 16), "another process");
    assert_eq!(stats_map(&k.stats())["ebadf_total"], 1);
    // ioctl on the stats file.
    let (sn, sfh) = k.open_file("stats", my_pid());
    let r = k.ioctl((sn, sfh), my_pid(), AMDKFD_IOC_GET_VERSION, &zero8);
    assert_eq!(r.error, -libc::ENOTTY, "stats has no ioctls");
    // Our own request still works.
    assert_eq!(
        k.ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &zero8)
            .ioctl()
            .0
            .result,
        0
    );
}

#[test]
fn get_process_apertures_new_writes_into_caller_memory() {
    let mut k = Kernel::ready();
    let f = k.open_file("kfd", my_pid());
    // Ask for the count first (num_of_nodes = 0, no pointer needed).
    let q = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: 0,
        num_of_nodes: 0,
        pad: 0,
    };
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &q);
    let (o, data) = r.ioctl();
    assert_eq!((o.result, data.len()), (0, 16));
    let got = KfdIoctlGetProcessAperturesNewArgs::read_from_bytes(data).expect("args");
    assert_eq!(got.num_of_nodes, 2);
    // Room for 4, with a canary pattern the daemon must overwrite only where it fills entries.
    let mut entries = vec![KfdProcessDeviceApertures::new_zeroed(); 4];
    entries[..].as_mut_bytes().fill(0xa5);
    let a = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: entries.as_ptr() as u64,
        num_of_nodes: 4,
        pad: 0,
    };
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &a);
    let (o, data) = r.ioctl();
    assert_eq!(o.result, 0);
    let got = KfdIoctlGetProcessAperturesNewArgs::read_from_bytes(data).expect("args");
    assert_eq!(
        (got.num_of_nodes, got.kfd_process_device_apertures_ptr),
        (2, entries.as_ptr() as u64)
    );
    // The daemon wrote through process_vm_writev; make sure the compiler reads memory again.
    let entries: Vec<KfdProcessDeviceApertures> = std::hint::black_box(entries);
    for e in &entries[..2] {
        assert!(e.gpu_id != 0 && e.gpu_id != 0xa5a5_a5a5, "{e:?}");
        assert!(e.lds_base != 0 && e.lds_limit > e.lds_base, "{e:?}");
        assert!(
            e.scratch_limit > e.scratch_base && e.gpuvm_limit > e.gpuvm_base,
            "{e:?}"
        );
        assert_eq!(e.pad, 0);
    }
    assert_ne!(entries[0].gpu_id, entries[1].gpu_id);
    // A null pointer with a count: EFAULT before anything runs.
    let bad = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: 0,
        num_of_nodes: 2,
        pad: 0,
    };
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &bad);
    assert_eq!((r.error, r.len), (-libc::EFAULT, 16));
    // An unmapped pointer: the copy-out fails; the struct still comes back (as KFD copies it
    // out whatever the handler returned) with the error as the ioctl result.
    let bad = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: 8,
        num_of_nodes: 2,
        pad: 0,
    };
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &bad);
    let (o, data) = r.ioctl();
    assert_eq!((o.result, data.len()), (-libc::EFAULT, 16));
    // An absurd count is refused before any allocation.
    let bad = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: 8,
        num_of_nodes: u32::MAX,
        pad: 0,
    };
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &bad);
    assert_eq!(r.error, -libc::EINVAL);
}

/// The kernel copies out only the entries it filled (`i * 56` bytes); the caller's memory
/// beyond them is left alone.
#[test]
fn get_process_apertures_new_leaves_unfilled_entries_alone() {
    let mut k = Kernel::ready();
    let f = k.open_file("kfd", my_pid());
    let mut entries = vec![KfdProcessDeviceApertures::new_zeroed(); 4];
    entries[..].as_mut_bytes().fill(0xa5);
    let a = KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: entries.as_ptr() as u64,
        num_of_nodes: 4,
        pad: 0,
    };
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, &a);
    assert_eq!(r.ioctl().0.result, 0);
    let entries: Vec<KfdProcessDeviceApertures> = std::hint::black_box(entries);
    assert!(entries[1].gpu_id != 0xa5a5_a5a5, "two entries filled");
    assert!(
        entries[2..].as_bytes().iter().all(|&b| b == 0xa5),
        "entries beyond the filled ones must be left alone: {:?}",
        &entries[2]
    );
}

// ----- parked requests ---------------------------------------------------------------------

fn create_signal_event(k: &mut Kernel, f: (u64, u64)) -> u32 {
    let a = KfdIoctlCreateEventArgs {
        event_page_offset: 0,
        event_trigger_data: 0,
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 1,
        node_id: 0,
        event_id: 0,
        event_slot_index: 0,
    };
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_CREATE_EVENT, &a);
    let (o, data) = r.ioctl();
    assert_eq!((o.result, data.len()), (0, 32), "CREATE_EVENT");
    let got = KfdIoctlCreateEventArgs::read_from_bytes(data).expect("args");
    got.event_id
}

/// Sends WAIT_EVENTS on one event; the event array lives in `events` (kept alive by the caller).
fn send_wait(
    k: &mut Kernel,
    f: (u64, u64),
    events: &mut Box<KfdEventData>,
    event_id: u32,
    timeout: u32,
) -> u64 {
    events.event_id = event_id;
    let a = KfdIoctlWaitEventsArgs {
        events_ptr: &**events as *const KfdEventData as u64,
        num_events: 1,
        wait_for_all: 0,
        timeout,
        wait_result: 0xdead,
    };
    k.send_typed(f, my_pid(), AMDKFD_IOC_WAIT_EVENTS, &a)
}

fn wait_result(r: &Reply) -> (i32, u32) {
    let (o, data) = r.ioctl();
    assert_eq!(data.len(), 24, "WAIT_EVENTS copies its struct out");
    (
        o.result,
        KfdIoctlWaitEventsArgs::read_from_bytes(data)
            .expect("args")
            .wait_result,
    )
}

#[test]
fn parked_wait_interrupted_then_answered_by_set_event() {
    let mut k = Kernel::ready();
    let f = k.open_file("kfd", my_pid());
    let ev = create_signal_event(&mut k, f);
    let mut events = Box::new(KfdEventData::new_zeroed());

    // 1. A wait forever parks: no reply.
    let w1 = send_wait(&mut k, f, &mut events, ev, KFD_EVENT_TIMEOUT_INFINITE);
    k.expect_silence(Duration::from_millis(200));
    // Parking holds no worker: both workers still answer (two requests at once).
    let a = k.send_ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &[], 8);
    let b = k.send_ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &[], 8);
    assert_eq!(k.reply(a).ioctl().0.result, 0);
    assert_eq!(k.reply(b).ioctl().0.result, 0);

    // 2. FUSE_INTERRUPT (the kernel's unique for it is the target's | 1) → EINTR; the
    //    interrupt itself gets no reply.
    k.send_raw(&request(
        FUSE_INTERRUPT,
        w1 | 1,
        0,
        my_pid(),
        InterruptIn { unique: w1 }.as_bytes(),
    ));
    let r = k.reply(w1);
    assert_eq!(wait_result(&r).0, -libc::EINTR, "interrupted wait: {r:?}");
    k.expect_silence(Duration::from_millis(100));

    // 3. Another wait, answered later by SET_EVENT from a second request.
    let w2 = send_wait(&mut k, f, &mut events, ev, KFD_EVENT_TIMEOUT_INFINITE);
    k.expect_silence(Duration::from_millis(200));
    let s = k.ioctl(
        f,
        my_pid(),
        AMDKFD_IOC_SET_EVENT,
        &KfdIoctlSetEventArgs {
            event_id: ev,
            pad: 0,
        },
    );
    let (o, data) = s.ioctl();
    assert_eq!(
        (o.result, data.len()),
        (0, 0),
        "SET_EVENT is _IOW: nothing copied out"
    );
    let r = k.reply(w2);
    assert_eq!(wait_result(&r), (0, KFD_IOC_WAIT_RESULT_COMPLETE));
    // The interrupted first wait did not come back a second time.
    k.expect_silence(Duration::from_millis(100));

    // 4. Auto-reset: the event was consumed, so a zero-timeout wait times out at once…
    let w3 = send_wait(&mut k, f, &mut events, ev, 0);
    assert_eq!(wait_result(&k.reply(w3)), (0, KFD_IOC_WAIT_RESULT_TIMEOUT));
    // …and a finite wait times out after its deadline.
    let t0 = Instant::now();
    let w4 = send_wait(&mut k, f, &mut events, ev, 150);
    let r = k.reply(w4);
    assert!(
        t0.elapsed() >= Duration::from_millis(140),
        "answered after {:?}",
        t0.elapsed()
    );
    assert_eq!(wait_result(&r), (0, KFD_IOC_WAIT_RESULT_TIMEOUT));
    // A set event is seen by a later wait without blocking.
    k.ioctl(
        f,
        my_pid(),
        AMDKFD_IOC_SET_EVENT,
        &KfdIoctlSetEventArgs {
            event_id: ev,
            pad: 0,
        },
    );
    let w5 = send_wait(&mut k, f, &mut events, ev, KFD_EVENT_TIMEOUT_INFINITE);
    assert_eq!(wait_result(&k.reply(w5)), (0, KFD_IOC_WAIT_RESULT_COMPLETE));
}

#[test]
fn interrupt_of_unknown_request_asks_to_requeue() {
    let mut k = Kernel::ready();
    // The kernel re-queues an interrupt answered with EAGAIN (the target is not seen yet).
    k.send_raw(&request(
        FUSE_INTERRUPT,
        77 | 1,
        0,
        my_pid(),
        InterruptIn { unique: 76 }.as_bytes(),
    ));
    let r = k.reply(77);
    assert_eq!((r.error, r.len), (-libc::EAGAIN, 16));
}

#[test]
fn release_answers_parked_waits_and_frees_the_context() {
    let mut k = Kernel::ready();
    let f = k.open_file("kfd", my_pid());
    let ev = create_signal_event(&mut k, f);
    let mut events = Box::new(KfdEventData::new_zeroed());
    let text = k.stats();
    assert_eq!(stats_map(&text)["contexts"], 1);
    assert_eq!(
        stats_contexts(&text),
        vec![(stats_contexts(&text)[0].0, f.1, my_pid())]
    );

    let w = send_wait(&mut k, f, &mut events, ev, KFD_EVENT_TIMEOUT_INFINITE);
    k.expect_silence(Duration::from_millis(150));
    // RELEASE: an empty reply, and the parked wait is answered (never left hanging).
    let rel = k.send(
        FUSE_RELEASE,
        f.0,
        my_pid(),
        ReleaseIn {
            fh: f.1,
            flags: 2,
            release_flags: 0,
            lock_owner: 0,
        }
        .as_bytes(),
    );
    let r = k.reply(rel);
    assert_eq!((r.error, r.len, r.body.len()), (0, 16, 0));
    let r = k.reply(w);
    assert_eq!(
        wait_result(&r).0,
        -libc::EINTR,
        "parked wait at release: {r:?}"
    );
    let text = k.stats();
    let s = stats_map(&text);
    assert_eq!(
        (s["contexts"], s["opens_total"], s["releases_total"]),
        (0, 1, 1),
        "{text}"
    );
    assert!(stats_contexts(&text).is_empty());
    // The handle is gone.
    let r = k.ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &[0u8; 8]);
    assert_eq!(r.error, -libc::EBADF);
}

#[test]
fn misc_file_operations() {
    let mut k = Kernel::ready();
    let (node, fh) = k.open_file("kfd", my_pid());
    // FSYNC, ACCESS: empty success. STATFS: a statfs record.
    // FLUSH: ENOSYS, so the kernel stops sending it on every close.
    let r = k.call(FUSE_FLUSH, node, my_pid(), &[0u8; 24]);
    assert_eq!((r.error, r.len), (-libc::ENOSYS, 16));
    for op in [FUSE_FSYNC, FUSE_ACCESS] {
        let r = k.call(op, node, my_pid(), &[0u8; 24]);
        assert_eq!((r.error, r.len), (0, 16), "opcode {op}");
    }
    let r = k.call(FUSE_STATFS, FUSE_ROOT_ID, my_pid(), &[]);
    assert_eq!((r.error, r.body.len()), (0, std::mem::size_of::<Kstatfs>()));
    // READ/WRITE on kfd: EINVAL, as the kernel's kfd has no read/write.
    let rd = ReadIn {
        fh,
        offset: 0,
        size: 8,
        read_flags: 0,
        lock_owner: 0,
        flags: 0,
        padding: 0,
    };
    assert_eq!(
        k.call(FUSE_READ, node, my_pid(), rd.as_bytes()).error,
        -libc::EINVAL
    );
    let w = WriteIn {
        fh,
        offset: 0,
        size: 1,
        write_flags: 0,
        lock_owner: 0,
        flags: 0,
        padding: 0,
    };
    assert_eq!(
        k.call(FUSE_WRITE, node, my_pid(), &[w.as_bytes(), b"x"].concat())
            .error,
        -libc::EINVAL
    );
    // POLL: the VFS default mask.
    let p = PollIn {
        fh,
        kh: 0,
        flags: 0,
        events: libc::POLLIN as u32,
    };
    let r = k.call(FUSE_POLL, node, my_pid(), p.as_bytes());
    let po = PollOut::read_from_bytes(&r.body).expect("PollOut");
    assert_eq!(
        po.revents,
        (libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM) as u32
    );
    // READDIR of the root lists every file.
    let o = k.open(FUSE_ROOT_ID, my_pid()).expect("opendir");
    let rd = ReadIn {
        fh: o.fh,
        offset: 0,
        size: 4096,
        read_flags: 0,
        lock_owner: 0,
        flags: 0,
        padding: 0,
    };
    let r = k.call(FUSE_READDIR, FUSE_ROOT_ID, my_pid(), rd.as_bytes());
    assert_eq!(r.error, 0);
    let mut names = Vec::new();
    let mut rest = &r.body[..];
    while let Some((d, tail)) = take::<Dirent>(rest) {
        let name = &tail[..d.namelen as usize];
        names.push(String::from_utf8_lossy(name).into_owned());
        let rec = (24 + d.namelen as usize + 7) & !7;
        rest = &rest[rec.min(rest.len())..];
    }
    assert_eq!(
        names,
        [".", "..", "kfd", "renderD128", "renderD129", "stats"]
    );
    // DESTROY: empty reply; the workers stop.
    let r = k.call(FUSE_DESTROY, 0, my_pid(), &[]);
    assert_eq!((r.error, r.len), (0, 16));
}

fn drain(k: &mut Kernel, replies: &mut HashMap<u64, usize>, d: Duration) {
    while let Some(r) = k.recv_any(d) {
        *replies.entry(r.unique).or_default() += 1;
    }
}

// ----- garbage -----------------------------------------------------------------------------

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Thousands of random and mutated requests; the session must answer a valid request
/// afterwards, never answer one request twice, and never panic (a panicking worker would stop
/// answering). Garbage is sent with pids that are not ours (a `sleep` child or pids above
/// `pid_max`), so pointers in it never reach this process's memory.
#[test]
fn garbage_does_not_kill_the_session() {
    let mut k = Kernel::ready();
    let other = Other::spawn();
    let (onode, ofh) = k.open_file("kfd", other.pid());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let ops = [
        FUSE_LOOKUP,
        FUSE_FORGET,
        FUSE_GETATTR,
        FUSE_SETATTR,
        FUSE_OPEN,
        FUSE_READ,
        FUSE_WRITE,
        FUSE_STATFS,
        FUSE_RELEASE,
        FUSE_FSYNC,
        FUSE_FLUSH,
        FUSE_INIT,
        FUSE_OPENDIR,
        FUSE_READDIR,
        FUSE_RELEASEDIR,
        FUSE_ACCESS,
        FUSE_INTERRUPT,
        FUSE_IOCTL,
        FUSE_POLL,
        FUSE_BATCH_FORGET,
        CUSE_INIT,
        0,
        7,
        44,
        51,
    ];
    let cmds = [
        AMDKFD_IOC_GET_VERSION,
        AMDKFD_IOC_GET_PROCESS_APERTURES_NEW,
        AMDKFD_IOC_CREATE_EVENT,
        AMDKFD_IOC_SET_EVENT,
        AMDKFD_IOC_WAIT_EVENTS,
    ];
    let mut sent = Vec::new();
    let mut replies: HashMap<u64, usize> = HashMap::new();
    for i in 0..4000u64 {
        let unique = 10_000 + 2 * i;
        let pid = match rng.below(3) {
            0 => other.pid(),
            1 => 0,
            _ => 0x40_0000 + rng.below(1 << 20) as u32, // above any pid_max
        };
        let mut body: Vec<u8>;
        let op;
        let nodeid;
        if i % 2 == 0 {
            // Structured: a plausible ioctl (or another request) with mutated bytes.
            op = ops[rng.below(ops.len() as u64) as usize];
            nodeid = [onode, FUSE_ROOT_ID, rng.below(64)][rng.below(3) as usize];
            body = if op == FUSE_IOCTL {
                let cmd = cmds[rng.below(cmds.len() as u64) as usize];
                let size = (cmd >> 16) & 0x3fff;
                let io = IoctlIn {
                    fh: ofh,
                    flags: 0,
                    cmd,
                    arg: 0,
                    in_size: size,
                    out_size: size,
                };
                let mut b = io.as_bytes().to_vec();
                b.extend((0..size).map(|_| rng.next() as u8));
                b
            } else {
                (0..rng.below(96)).map(|_| rng.next() as u8).collect()
            };
            for _ in 0..rng.below(4) {
                if !body.is_empty() {
                    let at = rng.below(body.len() as u64) as usize;
                    body[at] = rng.next() as u8;
                }
            }
            if rng.below(8) == 0 {
                body.truncate(rng.below(body.len() as u64 + 1) as usize);
            }
        } else {
            // Pure noise in the body, any opcode but DESTROY.
            let o = rng.next() as u32;
            op = match if rng.below(2) == 0 { o % 64 } else { o } {
                FUSE_DESTROY => FUSE_GETATTR,
                o => o,
            };
            nodeid = rng.next() % 128;
            body = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
        }
        let mut m = request(op, unique, nodeid, pid, &body);
        if rng.below(50) == 0 {
            let bogus = rng.next() as u32; // a lying length
            m[..4].copy_from_slice(&bogus.to_le_bytes());
        }
        k.send_raw(&m);
        sent.push(unique);
        drain(&mut k, &mut replies, Duration::ZERO);
    }
    drain(&mut k, &mut replies, Duration::from_millis(300));
    for (u, n) in &replies {
        assert_eq!(*n, 1, "request {u} answered {n} times");
        assert!(
            *u == 0 || sent.contains(u) || *u % 2 == 1,
            "reply to a request never sent: {u}"
        );
    }
    assert!(
        replies.len() > 3000,
        "most garbage gets an answer ({} replies)",
        replies.len()
    );
    // Both workers still serve: valid requests work, also two at once.
    let f = k.open_file("kfd", my_pid());
    let a = k.send_ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &[], 8);
    let b = k.send_ioctl(f, my_pid(), AMDKFD_IOC_GET_VERSION, &[], 8);
    for u in [a, b] {
        let r = k.reply(u);
        let (o, data) = r.ioctl();
        assert_eq!(
            (o.result, data),
            (
                0,
                KfdIoctlGetVersionArgs {
                    major_version: 1,
                    minor_version: k.kfd_minor
                }
                .as_bytes()
            )
        );
    }
    let text = k.stats();
    assert!(
        stats_contexts(&text).iter().any(|c| c.2 == my_pid()),
        "{text}"
    );
}

/// A filesystem for the engine's reading turn: records which worker thread answered each
/// IOCTL; OPEN (a request that hands reading off) blocks until the test lets it go.
struct Turns {
    single: bool,
    threads: Mutex<HashSet<std::thread::ThreadId>>,
    gate: Mutex<mpsc::Receiver<()>>,
}

impl Turns {
    fn new(single: bool) -> (Arc<Turns>, mpsc::Sender<()>) {
        let (tx, rx) = mpsc::channel();
        let t = Turns {
            single,
            threads: Mutex::new(HashSet::new()),
            gate: Mutex::new(rx),
        };
        (Arc::new(t), tx)
    }

    fn workers_seen(&self) -> usize {
        self.threads.lock().expect("threads").len()
    }
}

impl Filesystem for Turns {
    fn single_reader(&self) -> bool {
        self.single
    }
    fn open(
        &self,
        _req: &Request,
        _nodeid: u64,
        _flags: u32,
    ) -> Result<Opened, kfdmux::errno::Errno> {
        let _ = self
            .gate
            .lock()
            .expect("gate")
            .recv_timeout(Duration::from_secs(30));
        Ok(Opened::default())
    }
    fn ioctl(&self, _req: &Request, args: IoctlArgs, _in: &[u8], reply: IoctlReply) {
        if args.cmd == STALLING_CMD {
            // Not a request that hands off: it keeps the reading worker.
            let gate = self.gate.lock().expect("gate");
            let _ = gate.recv_timeout(Duration::from_secs(30));
        } else {
            let mut t = self.threads.lock().expect("threads");
            t.insert(std::thread::current().id());
        }
        reply.ok(0, &[]);
    }
}

/// The IOCTL command `Turns` blocks in until the test lets it go.
const STALLING_CMD: u32 = 0x4BFF;

/// An IOCTL request body for `Turns` (no data in or out).
fn bare_ioctl() -> Vec<u8> {
    ioctl_cmd(AMDKFD_IOC_GET_VERSION)
}

fn ioctl_cmd(cmd: u32) -> Vec<u8> {
    IoctlIn {
        fh: 1,
        flags: 0,
        cmd,
        arg: ARG_ADDR,
        in_size: 0,
        out_size: 0,
    }
    .as_bytes()
    .to_vec()
}

#[test]
fn single_reader_answers_a_stream_of_requests_on_one_warm_worker() {
    // Several workers all blocked in read take turns (the longest waiting is woken first), so
    // one after another they answer a stream of requests; in single-reader mode (a filesystem
    // that allows it, on one CPU) the worker holding the reading turn answers all of them and
    // the others sleep. On several CPUs every worker reads: a lone reader would mostly be woken
    // on another CPU than the caller's.
    let cpus = kfdmux::transport::sys::affinity_cpus().unwrap_or(1);
    for (single, one_cpu, expect_one) in [
        (true, true, true),
        (false, true, false),
        (true, false, cpus == 1),
    ] {
        let (fs, _gate) = Turns::new(single);
        let mut k = Kernel::serving(fs.clone(), 4, one_cpu);
        for _ in 0..200 {
            let r = k.call(FUSE_IOCTL, 2, my_pid(), &bare_ioctl());
            assert_eq!(r.error, 0, "IOCTL: {r:?}");
        }
        let seen = fs.workers_seen();
        if expect_one {
            assert_eq!(
                seen, 1,
                "single reader: 200 requests answered by {seen} workers"
            );
        } else {
            assert!(
                seen > 1,
                "4 readers (single {single}, one CPU {one_cpu}): 200 requests answered by {seen}"
            );
        }
        k.shut_down_within(WAIT);
    }
}

#[test]
fn single_reader_hands_reading_off_before_a_request_that_may_block() {
    let (fs, gate) = Turns::new(true);
    let mut k = Kernel::serving(fs.clone(), 2, true);
    // OPEN blocks in the filesystem; the worker handling it gave the turn away first.
    let body = OpenIn {
        flags: libc::O_RDWR as u32,
        open_flags: 0,
    };
    let open = k.send(FUSE_OPEN, 2, my_pid(), body.as_bytes());
    for _ in 0..20 {
        let r = k.call(FUSE_IOCTL, 2, my_pid(), &bare_ioctl());
        assert_eq!(r.error, 0, "IOCTL while an OPEN blocks: {r:?}");
    }
    assert!(
        k.stash.is_empty(),
        "the blocked OPEN was answered early: {:?}",
        k.stash
    );
    gate.send(()).expect("let OPEN go");
    let r = k.reply(open);
    assert_eq!(r.error, 0, "OPEN: {r:?}");
    // Both workers can still read after the hand-off, and both leave on EOF.
    for _ in 0..20 {
        let r = k.call(FUSE_IOCTL, 2, my_pid(), &bare_ioctl());
        assert_eq!(r.error, 0, "IOCTL after the OPEN: {r:?}");
    }
    k.shut_down_within(WAIT);
}

#[test]
fn single_reader_with_every_worker_blocked_still_ends_on_eof() {
    // Two OPENs hold both workers of a single-reader session; EOF must still end it once they
    // return (the turn passes to whoever is left to read).
    let (fs, gate) = Turns::new(true);
    let mut k = Kernel::serving(fs, 2, true);
    let body = OpenIn {
        flags: libc::O_RDWR as u32,
        open_flags: 0,
    };
    let a = k.send(FUSE_OPEN, 2, my_pid(), body.as_bytes());
    let b = k.send(FUSE_OPEN, 2, my_pid(), body.as_bytes());
    let c = k.send(FUSE_IOCTL, 2, my_pid(), &bare_ioctl());
    // Nobody is left to read the IOCTL while both OPENs block.
    assert!(
        k.wait_for(c, Duration::from_millis(300)).is_none(),
        "IOCTL answered with both workers blocked"
    );
    gate.send(()).expect("let one OPEN go");
    gate.send(()).expect("let the other OPEN go");
    for u in [a, b, c] {
        assert_eq!(k.reply(u).error, 0);
    }
    // Requests that handed off are no stall: the turn was free, nobody held it.
    let s = k.session.as_ref().expect("session");
    let stalls = s
        .chan
        .reader_stalls
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(stalls, 0, "a hand-off counted as a stall");
    k.shut_down_within(WAIT);
}

#[test]
fn single_reader_watchdog_passes_the_turn_on_when_a_request_stalls() {
    let (fs, gate) = Turns::new(true);
    let mut k = Kernel::serving(fs.clone(), 2, true);
    let stalls = |k: &Kernel| {
        let s = k.session.as_ref().expect("session");
        s.chan
            .reader_stalls
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // An IOCTL that does not hand off keeps the reading worker; after the watchdog's stall
    // time (20 ms) another worker reads and answers the next one.
    let stuck = k.send(FUSE_IOCTL, 2, my_pid(), &ioctl_cmd(STALLING_CMD));
    let r = k.call(FUSE_IOCTL, 2, my_pid(), &bare_ioctl());
    assert_eq!(r.error, 0, "IOCTL behind a stalled one: {r:?}");
    assert_eq!(stalls(&k), 1, "the watchdog counted the stall");
    assert!(k.stash.is_empty(), "the stalled IOCTL was answered early");
    gate.send(()).expect("let the stalled IOCTL go");
    assert_eq!(k.reply(stuck).error, 0);
    // The worker it held is a follower again: one reader answers the rest, with no more stalls.
    for _ in 0..100 {
        assert_eq!(k.call(FUSE_IOCTL, 2, my_pid(), &bare_ioctl()).error, 0);
    }
    assert_eq!(stalls(&k), 1, "no stall without a slow request");
    k.shut_down_within(WAIT);
}
