//! CUSE at wire level: the real stack (SimDevice gfx90a:2 → Mux → CuseFs → `Session::new_cuse`)
//! driven over a `SOCK_SEQPACKET` socketpair by a test that plays the kernel's side of
//! `/dev/cuse` byte for byte, as tests/wire.rs does for `/dev/fuse`: CUSE_INIT, OPEN/RELEASE
//! (nodeid 0), and unrestricted ioctls with their `FUSE_IOCTL_RETRY` rounds, checked against the
//! exact replies (`IoctlOut` + iovec lists, or result + the bytes the kernel scatters over the
//! out iovecs).
//!
//! In CUSE mode the daemon never touches client memory itself: the kernel (here, this test)
//! gathers the in iovecs and scatters the reply. The addresses used are therefore made up and
//! unmapped in this process — a daemon that reached for them with `process_vm_*` would fail.
//! Header pids are this process's own (the mux checks the caller's tgid in /proc).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kfdmux::abi::*;
use kfdmux::device::sim::{SimConfig, SimDevice};
use kfdmux::device::FileKind;
use kfdmux::handover::KFDMUX_IOC_HANDOVER_TOKEN;
use kfdmux::mux::{Mux, CUSE_MAX_BYTES, MAX_ROUNDS};
use kfdmux::transport::cuse::{render_devname, CuseEnv, CuseFs};
use kfdmux::transport::engine::Session;
use kfdmux::transport::wire::*;
use zerocopy::{FromBytes, Immutable, IntoBytes};

const DEVNAME: &str = "kfdmux/kfd";
const WAIT: Duration = Duration::from_secs(5);
/// Made-up client addresses (see the module comment).
const ARG: u64 = 0x7ffd_0000_1000;
const ARR: u64 = 0x7ffd_0004_0000;
const ARR2: u64 = 0x7ffd_0008_0000;
const ARR3: u64 = 0x7ffd_000c_0000;
const UNRESTRICTED: u32 = FUSE_IOCTL_UNRESTRICTED;
const KFD_IOC_EVENT_SIGNAL: u32 = 0;
const KFD_EVENT_TIMEOUT_INFINITE: u32 = 0xffff_ffff;
const EVENT_DATA: usize = 48;

fn my_pid() -> u32 {
    std::process::id()
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

fn iov(base: u64, len: u64) -> IoctlIovec {
    IoctlIovec { base, len }
}

/// One reply as the kernel receives it.
#[derive(Debug, Clone)]
struct Reply {
    len: u32,
    error: i32,
    unique: u64,
    body: Vec<u8>,
}

/// What an ioctl reply says, parsed strictly (lengths must add up exactly).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ans {
    /// Header error, no body.
    Err(i32),
    /// `FUSE_IOCTL_RETRY` with in and out iovecs.
    Retry(Vec<IoctlIovec>, Vec<IoctlIovec>),
    /// Final: result and the bytes for the out iovecs.
    Done(i32, Vec<u8>),
}

impl Reply {
    fn ans(&self) -> Ans {
        if self.error != 0 {
            assert_eq!(
                (self.len, self.body.len()),
                (16, 0),
                "error replies are bare: {self:?}"
            );
            return Ans::Err(-self.error);
        }
        let (o, rest) = IoctlOut::read_from_prefix(&self.body).expect("IoctlOut");
        if o.flags & FUSE_IOCTL_RETRY != 0 {
            assert_eq!(o.flags, FUSE_IOCTL_RETRY, "no other flag with RETRY");
            assert_eq!(o.result, 0, "RETRY carries result 0");
            let n = (o.in_iovs + o.out_iovs) as usize;
            assert!(n <= FUSE_IOCTL_MAX_IOV);
            // fuse_copy_ioctl_iovec: the body after ioctl_out must be exactly the iovecs.
            assert_eq!(rest.len(), n * 16, "RETRY body holds exactly its iovecs");
            let all: Vec<IoctlIovec> = rest
                .chunks_exact(16)
                .map(|c| IoctlIovec::read_from_bytes(c).expect("iovec"))
                .collect();
            let (i, o2) = all.split_at(o.in_iovs as usize);
            return Ans::Retry(i.to_vec(), o2.to_vec());
        }
        assert_eq!(
            (o.flags, o.in_iovs, o.out_iovs),
            (0, 0, 0),
            "final reply: {o:?}"
        );
        Ans::Done(o.result, rest.to_vec())
    }
}

/// A device, its mux and the CUSE environment: shared by the kfd and render sessions.
struct Stack {
    mux: Arc<Mux>,
    env: Arc<CuseEnv>,
    gpu_ids: Vec<u32>,
}

impl Stack {
    fn new() -> Stack {
        let gpus = kfdmux::topology::parse_gpus("gfx90a:2").expect("gpu spec");
        let gpu_ids = gpus.iter().map(|g| g.gpu_id).collect();
        let device = SimDevice::new(gpus, SimConfig::default());
        Stack {
            mux: Mux::new(device),
            env: Arc::new(CuseEnv::default()),
            gpu_ids,
        }
    }

    fn stats(&self) -> HashMap<String, u64> {
        self.mux
            .stats_text()
            .lines()
            .filter(|l| !l.starts_with("context "))
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect()
    }
}

/// The kernel's end of one CUSE channel (2 worker threads, as the daemon runs render nodes).
struct Kernel {
    fd: OwnedFd,
    runner: Option<JoinHandle<()>>,
    stash: Vec<Reply>,
    next_unique: u64,
}

impl Kernel {
    fn start(stack: &Stack, kind: FileKind, devname: &str) -> Kernel {
        let (ours, theirs) = seqpacket_pair();
        let fs = Arc::new(CuseFs {
            mux: stack.mux.clone(),
            kind,
            env: stack.env.clone(),
        });
        let session = Session::new_cuse(theirs, fs, devname);
        let runner = std::thread::spawn(move || {
            let _ = session.run(2);
        });
        Kernel {
            fd: ours,
            runner: Some(runner),
            stash: Vec::new(),
            next_unique: 2,
        }
    }

    /// Started and past a CUSE_INIT from a 7.38 kernel (Linux 6.1).
    fn ready(stack: &Stack, kind: FileKind, devname: &str) -> Kernel {
        let mut k = Kernel::start(stack, kind, devname);
        let r = k.call(CUSE_INIT, 0, my_pid(), cuse_init_in(7, 38).as_bytes());
        assert_eq!(r.error, 0, "CUSE_INIT: {r:?}");
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

    fn send(&mut self, opcode: u32, nodeid: u64, pid: u32, body: &[u8]) -> u64 {
        let unique = self.next_unique;
        self.next_unique += 2;
        self.send_raw(&request(opcode, unique, nodeid, pid, body));
        unique
    }

    fn recv_any(&self, timeout: Duration) -> Option<Reply> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } <= 0 {
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
        let (h, body) = OutHeader::read_from_prefix(&buf).expect("out header");
        assert_eq!(
            h.len as usize,
            buf.len(),
            "out header length = message length"
        );
        Some(Reply {
            len: h.len,
            error: h.error,
            unique: h.unique,
            body: body.to_vec(),
        })
    }

    fn reply(&mut self, unique: u64) -> Reply {
        if let Some(i) = self.stash.iter().position(|r| r.unique == unique) {
            return self.stash.remove(i);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self
                .recv_any(left)
                .unwrap_or_else(|| panic!("no reply to request {unique} within {WAIT:?}"));
            if r.unique == unique {
                return r;
            }
            self.stash.push(r);
        }
    }

    fn call(&mut self, opcode: u32, nodeid: u64, pid: u32, body: &[u8]) -> Reply {
        let u = self.send(opcode, nodeid, pid, body);
        self.reply(u)
    }

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

    /// CUSE opens carry nodeid 0 (cuse_open → fuse_do_open(fm, 0, ...)).
    fn open(&mut self, pid: u32) -> Result<OpenOut, i32> {
        let r = self.call(
            FUSE_OPEN,
            0,
            pid,
            OpenIn {
                flags: libc::O_RDWR as u32,
                open_flags: 0,
            }
            .as_bytes(),
        );
        if r.error != 0 {
            return Err(r.error);
        }
        assert_eq!(r.body.len(), 16, "OPEN reply size");
        Ok(OpenOut::read_from_bytes(&r.body).expect("OpenOut"))
    }

    fn release(&mut self, fh: u64) -> Reply {
        let body = ReleaseIn {
            fh,
            flags: libc::O_RDWR as u32,
            release_flags: 0,
            lock_owner: 0,
        };
        self.call(FUSE_RELEASE, 0, my_pid(), body.as_bytes())
    }

    /// Sends one ioctl round as fuse_do_ioctl does: in_size = the gathered data, out_size = the
    /// sum of the out iovecs (0 in round 1).
    #[allow(clippy::too_many_arguments)]
    fn send_round(
        &mut self,
        fh: u64,
        pid: u32,
        flags: u32,
        cmd: u32,
        arg: u64,
        data: &[u8],
        out_size: u32,
    ) -> u64 {
        let io = IoctlIn {
            fh,
            flags,
            cmd,
            arg,
            in_size: data.len() as u32,
            out_size,
        };
        let mut body = io.as_bytes().to_vec();
        body.extend_from_slice(data);
        self.send(FUSE_IOCTL, 0, pid, &body)
    }

    fn round(&mut self, fh: u64, cmd: u32, arg: u64, data: &[u8], out_size: u32) -> Ans {
        let u = self.send_round(fh, my_pid(), UNRESTRICTED, cmd, arg, data, out_size);
        self.reply(u).ans()
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // EOF on the channel stops the workers.
        // SAFETY: shutting down our own socket.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(r) = self.runner.take() {
            let _ = r.join();
        }
    }
}

fn request(opcode: u32, unique: u64, nodeid: u64, pid: u32, body: &[u8]) -> Vec<u8> {
    let h = InHeader {
        len: (40 + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        // SAFETY: getuid cannot fail.
        uid: unsafe { libc::getuid() },
        gid: 0,
        pid,
        total_extlen: 0,
        padding: 0,
    };
    let mut m = h.as_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

/// What cuse_send_init sends: the kernel's version and CUSE_UNRESTRICTED_IOCTL.
fn cuse_init_in(major: u32, minor: u32) -> CuseInitIn {
    CuseInitIn {
        major,
        minor,
        unused: 0,
        flags: CUSE_UNRESTRICTED_IOCTL,
    }
}

/// The exact bytes of a RETRY reply body.
fn retry_body(ins: &[IoctlIovec], outs: &[IoctlIovec]) -> Vec<u8> {
    let mut b = IoctlOut {
        result: 0,
        flags: FUSE_IOCTL_RETRY,
        in_iovs: ins.len() as u32,
        out_iovs: outs.len() as u32,
    }
    .as_bytes()
    .to_vec();
    b.extend_from_slice(ins.as_bytes());
    b.extend_from_slice(outs.as_bytes());
    b
}

fn out_size(outs: &[IoctlIovec]) -> u32 {
    outs.iter().map(|i| i.len as u32).sum()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Plays a flat `_IOWR`/`_IOW` ioctl (no pointers): round 1 asks for the struct, round 2 is
/// final. Returns the final answer.
fn flat<T: IntoBytes + Immutable>(k: &mut Kernel, fh: u64, cmd: u32, arg: &T) -> Ans {
    let size = ((cmd >> 16) & 0x3fff) as u64;
    let writes = cmd >> 30 & 2 != 0;
    let s = iov(ARG, size);
    let want_out: &[IoctlIovec] = if writes {
        std::slice::from_ref(&s)
    } else {
        &[]
    };
    assert_eq!(
        k.round(fh, cmd, ARG, &[], 0),
        Ans::Retry(vec![s], want_out.to_vec()),
        "round 1 of {cmd:#x}"
    );
    k.round(
        fh,
        cmd,
        ARG,
        &arg.as_bytes()[..size as usize],
        out_size(want_out),
    )
}

fn apertures(stack: &Stack, gi: usize) -> KfdProcessDeviceApertures {
    // kfd_flat_memory.c for a GFX9 dGPU: LDS at 1 << 48, scratch at 2 << 48, 32-bit limits;
    // GPUVM from SVM_USER_BASE (4 pages) to the 47-bit hole.
    KfdProcessDeviceApertures {
        lds_base: 1 << 48,
        lds_limit: (1 << 48) | 0xffff_ffff,
        scratch_base: 2 << 48,
        scratch_limit: (2 << 48) | 0xffff_ffff,
        gpuvm_base: 0x4000,
        gpuvm_limit: (1 << 47) - 1,
        gpu_id: stack.gpu_ids[gi],
        pad: 0,
    }
}

// ---- INIT, OPEN, RELEASE ---------------------------------------------------------------------

#[test]
fn cuse_init_exact_reply_and_devname() {
    let stack = Stack::new();
    let mut k = Kernel::start(&stack, FileKind::Kfd, DEVNAME);
    // Nothing before INIT.
    let r = k.call(
        FUSE_OPEN,
        0,
        my_pid(),
        OpenIn {
            flags: 2,
            open_flags: 0,
        }
        .as_bytes(),
    );
    assert_eq!((r.error, r.len), (-libc::EIO, 16));
    // FUSE_INIT on a CUSE channel is the wrong protocol.
    let mut fuse_init = InitIn {
        major: 7,
        minor: 38,
        max_readahead: 0,
        flags: 0,
    }
    .as_bytes()
    .to_vec();
    fuse_init.extend_from_slice(
        InitInExt {
            flags2: 0,
            unused: [0; 11],
        }
        .as_bytes(),
    );
    let r = k.call(FUSE_INIT, 0, my_pid(), &fuse_init);
    assert_eq!((r.error, r.len), (-libc::EPROTO, 16));
    // Truncated and too-old CUSE_INITs.
    let r = k.call(
        CUSE_INIT,
        0,
        my_pid(),
        &cuse_init_in(7, 38).as_bytes()[..12],
    );
    assert_eq!((r.error, r.len), (-libc::EINVAL, 16));
    let r = k.call(
        CUSE_INIT,
        0,
        my_pid(),
        cuse_init_in(7, FUSE_MIN_MINOR - 1).as_bytes(),
    );
    assert_eq!((r.error, r.len), (-libc::EPROTO, 16));

    // A 7.38 kernel (Linux 6.1) gets its own minor back.
    let r = k.call(CUSE_INIT, 0, my_pid(), cuse_init_in(7, 38).as_bytes());
    let want = CuseInitOut {
        major: 7,
        minor: 38,
        unused: 0,
        flags: CUSE_UNRESTRICTED_IOCTL,
        max_read: 128 * 1024,
        max_write: 128 * 1024,
        dev_major: 0, // 0: the kernel allocates the device number
        dev_minor: 0,
        spare: [0; 10],
    };
    assert_eq!(r.error, 0);
    assert_eq!(
        r.body,
        cat(&[want.as_bytes(), b"DEVNAME=kfdmux/kfd\0"]),
        "CUSE_INIT reply"
    );
    assert_eq!(r.len as usize, 16 + 72 + 19);
    drop(k);

    // A newer kernel is answered with our newest minor (41).
    let mut k = Kernel::start(&stack, FileKind::Render(0), &render_devname(DEVNAME, 128));
    let r = k.call(CUSE_INIT, 0, my_pid(), cuse_init_in(7, 45).as_bytes());
    let want = CuseInitOut {
        minor: FUSE_KERNEL_MINOR_VERSION,
        ..want
    };
    assert_eq!(FUSE_KERNEL_MINOR_VERSION, 41);
    assert_eq!(
        r.body,
        cat(&[want.as_bytes(), b"DEVNAME=kfdmux/dri/renderD128\0"])
    );
}

#[test]
fn open_gives_a_context_and_release_frees_it() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let o = k.open(my_pid()).expect("OPEN");
    assert_eq!(o.open_flags, FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE);
    assert_eq!(o.backing_id, 0);
    let o2 = k.open(my_pid()).expect("second OPEN");
    assert_ne!(o.fh, o2.fh, "every open is its own context");
    assert_eq!(stack.stats()["contexts"], 2);
    // An ioctl from another process is refused in its first round already.
    let other = Other::spawn();
    let u = k.send_round(
        o.fh,
        other.pid(),
        UNRESTRICTED,
        AMDKFD_IOC_GET_VERSION,
        ARG,
        &[],
        0,
    );
    assert_eq!(k.reply(u).ans(), Ans::Err(libc::EBADF));

    let r = k.release(o.fh);
    assert_eq!((r.error, r.len), (0, 16));
    let s = stack.stats();
    assert_eq!((s["contexts"], s["releases_total"]), (1, 1));
    assert_eq!(
        k.round(o.fh, AMDKFD_IOC_GET_VERSION, ARG, &[], 0),
        Ans::Err(libc::EBADF)
    );
    k.release(o2.fh);
    assert_eq!(stack.stats()["contexts"], 0);
}

// ---- flat ioctls: two round trips ------------------------------------------------------------

#[test]
fn get_version_takes_two_rounds() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    // Round 1 (in_size 0, out_size 0): RETRY asking the struct as in AND out iovec, although
    // GET_VERSION is _IOR. The in iovec is how the daemon tells the final round from the first
    // (in_size 8 instead of 0); for the kernel it is one copy_from_user of memory the caller
    // must have writable anyway.
    let u = k.send_round(
        fh,
        my_pid(),
        UNRESTRICTED,
        AMDKFD_IOC_GET_VERSION,
        ARG,
        &[],
        0,
    );
    let r = k.reply(u);
    assert_eq!(r.body, retry_body(&[iov(ARG, 8)], &[iov(ARG, 8)]));
    assert_eq!(r.len, 16 + 16 + 32);
    // Round 2 with whatever the client's memory held: the final reply is the 8 bytes.
    let u = k.send_round(
        fh,
        my_pid(),
        UNRESTRICTED,
        AMDKFD_IOC_GET_VERSION,
        ARG,
        &[0xa5; 8],
        8,
    );
    let r = k.reply(u);
    let v = KfdIoctlGetVersionArgs {
        major_version: 1,
        minor_version: SimConfig::default().kfd_minor,
    };
    assert_eq!(r.ans(), Ans::Done(0, v.as_bytes().to_vec()));
    assert_eq!(r.len, 16 + 16 + 8);
}

#[test]
fn ior_struct_reaches_the_device_zeroed_as_kfd_does() {
    // GET_PROCESS_APERTURES (_IOR, 7 slots): KFD zeroes an _IOR struct before the handler, so
    // the slots beyond the GPUs come back as zeros, not as the client's old bytes.
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    let cmd = AMDKFD_IOC_GET_PROCESS_APERTURES;
    let s = iov(ARG, 400);
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    let Ans::Done(0, out) = k.round(fh, cmd, ARG, &[0xa5; 400], 400) else {
        panic!("final round")
    };
    let mut want = KfdIoctlGetProcessAperturesArgs::new_zeroed();
    want.process_apertures[0] = apertures(&stack, 0);
    want.process_apertures[1] = apertures(&stack, 1);
    want.num_of_nodes = 2;
    assert_eq!(out, want.as_bytes());
}

// ---- one pointer level: three round trips ------------------------------------------------------

#[test]
fn get_process_apertures_new_takes_three_rounds() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    let cmd = AMDKFD_IOC_GET_PROCESS_APERTURES_NEW;
    let s = iov(ARG, 16);
    let args = |n: u32| KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: ARR,
        num_of_nodes: n,
        pad: 0,
    };

    // num_of_nodes 0 asks for the count: no array, so two rounds.
    assert_eq!(
        flat(&mut k, fh, cmd, &args(0)),
        Ans::Done(0, args(2).as_bytes().to_vec())
    );

    // Two nodes: round 2 asks for the struct (in) and struct + array (out); the array is Out,
    // so it is not fetched.
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    let r2 = k.round(fh, cmd, ARG, args(2).as_bytes(), 16);
    assert_eq!(r2, Ans::Retry(vec![s], vec![s, iov(ARR, 112)]));
    let want = cat(&[
        args(2).as_bytes(),
        apertures(&stack, 0).as_bytes(),
        apertures(&stack, 1).as_bytes(),
    ]);
    assert_eq!(
        k.round(fh, cmd, ARG, args(2).as_bytes(), 16 + 112),
        Ans::Done(0, want.clone())
    );

    // Room for four: only the two filled entries are sent, so the kernel leaves the other two
    // untouched (it copies `transferred` bytes and no more).
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    assert_eq!(
        k.round(fh, cmd, ARG, args(4).as_bytes(), 16),
        Ans::Retry(vec![s], vec![s, iov(ARR, 224)])
    );
    let Ans::Done(0, out) = k.round(fh, cmd, ARG, args(4).as_bytes(), 16 + 224) else {
        panic!()
    };
    assert_eq!(out[..16], *args(2).as_bytes(), "num_of_nodes says 2");
    assert_eq!(out[16..], want[16..], "exactly the two entries");
}

#[test]
fn drm_version_scatters_three_out_arrays_in_iovec_order() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Render(0), &render_devname(DEVNAME, 128));
    let fh = k.open(my_pid()).expect("OPEN render node").fh;
    let v = DrmVersion {
        version_major: 0,
        version_minor: 0,
        version_patchlevel: 0,
        _pad0: 0,
        name_len: 16,
        name: ARR,
        date_len: 16,
        date: ARR2,
        desc_len: 16,
        desc: ARR3,
    };
    let s = iov(ARG, 64);
    assert_eq!(
        k.round(fh, DRM_IOCTL_VERSION, ARG, &[], 0),
        Ans::Retry(vec![s], vec![s])
    );
    let outs = vec![s, iov(ARR, 16), iov(ARR2, 16), iov(ARR3, 16)];
    assert_eq!(
        k.round(fh, DRM_IOCTL_VERSION, ARG, v.as_bytes(), 64),
        Ans::Retry(vec![s], outs.clone())
    );
    let Ans::Done(0, out) = k.round(fh, DRM_IOCTL_VERSION, ARG, v.as_bytes(), out_size(&outs))
    else {
        panic!()
    };
    let got = DrmVersion::read_from_bytes(&out[..64]).expect("drm_version");
    assert_eq!(
        (got.version_major, got.name_len, got.date_len, got.desc_len),
        (3, 6, 8, 7)
    );
    let field = |i: usize| &out[64 + 16 * i..(64 + 16 * (i + 1)).min(out.len())];
    // Each string starts at its own iovec (the shorter names are padded, not packed); the
    // last one ends the reply, so the rest of the caller's desc buffer is not written — as
    // drm_copy_field writes only the string's bytes.
    assert_eq!(&field(0)[..6], b"amdgpu");
    assert_eq!(&field(1)[..8], b"20150101");
    assert_eq!(field(2), b"AMD GPU");
    assert_eq!(out.len(), 64 + 32 + 7);
}

#[test]
fn map_memory_to_gpu_fetches_its_in_array_and_rechecks_changed_structs() {
    let stack = Stack::new();
    // ACQUIRE_VM takes a render-node fd of the caller: the CUSE env recognises our render nodes
    // by device number. At wire level there is no /dev/kfdmux/dri/renderD*, so /dev/null and
    // /dev/zero (real char devices, taken from this process with pidfd_getfd like a client's fd)
    // stand in as GPU 0's and GPU 1's render nodes. Only the rdev lookup is faked.
    let null = File::open("/dev/null").expect("/dev/null");
    let zero = File::open("/dev/zero").expect("/dev/zero");
    stack
        .env
        .add(null.metadata().expect("stat").rdev(), FileKind::Render(0));
    stack
        .env
        .add(zero.metadata().expect("stat").rdev(), FileKind::Render(1));
    let regular = File::open("/proc/self/exe").expect("a regular file");
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    let (g0, g1) = (stack.gpu_ids[0], stack.gpu_ids[1]);
    let acquire = |fd: &File, gpu_id| KfdIoctlAcquireVmArgs {
        drm_fd: fd.as_raw_fd() as u32,
        gpu_id,
    };

    // _IOW: round 1 asks the struct in only; the final reply carries no data.
    assert_eq!(
        flat(&mut k, fh, AMDKFD_IOC_ACQUIRE_VM, &acquire(&regular, g0)),
        Ans::Err(libc::EINVAL),
        "not a render node"
    );
    assert_eq!(
        flat(&mut k, fh, AMDKFD_IOC_ACQUIRE_VM, &acquire(&null, g1)),
        Ans::Err(libc::EINVAL),
        "GPU 0's node for GPU 1"
    );
    assert_eq!(
        flat(&mut k, fh, AMDKFD_IOC_ACQUIRE_VM, &acquire(&null, g0)),
        Ans::Done(0, vec![])
    );
    assert_eq!(
        flat(&mut k, fh, AMDKFD_IOC_ACQUIRE_VM, &acquire(&zero, g1)),
        Ans::Done(0, vec![])
    );

    let alloc = KfdIoctlAllocMemoryOfGpuArgs {
        va_addr: 0x1_0000_0000,
        size: 1 << 16,
        handle: 0,
        mmap_offset: 0,
        gpu_id: g0,
        flags: KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE,
    };
    let Ans::Done(0, out) = flat(&mut k, fh, AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, &alloc) else {
        panic!("ALLOC")
    };
    let handle = KfdIoctlAllocMemoryOfGpuArgs::read_from_bytes(&out)
        .expect("args")
        .handle;
    assert_eq!(handle >> 32, g0 as u64, "the handle names its GPU");

    let cmd = AMDKFD_IOC_MAP_MEMORY_TO_GPU;
    let s = iov(ARG, 24);
    let map = |n: u32, done: u32| KfdIoctlMapMemoryToGpuArgs {
        handle,
        device_ids_array_ptr: ARR,
        n_devices: n,
        n_success: done,
    };
    let ids = |v: &[u32]| v.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>();

    // 1. The client changes n_devices from 1 to 2 between rounds 2 and 3: the kernel re-sends
    //    the new struct with the old iovecs; the daemon asks again with the new ones.
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    assert_eq!(
        k.round(fh, cmd, ARG, map(1, 0).as_bytes(), 24),
        Ans::Retry(vec![s, iov(ARR, 4)], vec![s])
    );
    let stale = cat(&[map(2, 0).as_bytes(), &ids(&[g0])]);
    assert_eq!(
        k.round(fh, cmd, ARG, &stale, 24),
        Ans::Retry(vec![s, iov(ARR, 8)], vec![s])
    );
    assert_eq!(stack.stats()["buffers"], 1);
    // The consistent round runs, with both ids from the In array.
    let fin = cat(&[map(2, 0).as_bytes(), &ids(&[g0, g1])]);
    assert_eq!(
        k.round(fh, cmd, ARG, &fin, 24),
        Ans::Done(0, map(2, 2).as_bytes().to_vec())
    );

    // 2. The ids really come from the array: an unknown GPU id is the kernel's EINVAL, and the
    //    struct is still copied out (n_success 0) as KFD copies it whatever the handler returned.
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    assert_eq!(
        k.round(fh, cmd, ARG, map(1, 0).as_bytes(), 24),
        Ans::Retry(vec![s, iov(ARR, 4)], vec![s])
    );
    let bad = cat(&[map(1, 0).as_bytes(), &ids(&[0xdead])]);
    assert_eq!(
        k.round(fh, cmd, ARG, &bad, 24),
        Ans::Done(-libc::EINVAL, map(1, 0).as_bytes().to_vec())
    );

    // 3. A client that changes its struct every round gets MAX_ROUNDS array rounds, then EINVAL.
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    let mut data = map(1, 0).as_bytes().to_vec();
    let mut retries = 0;
    let refused = loop {
        match k.round(fh, cmd, ARG, &data, 24) {
            Ans::Retry(i, o) => {
                retries += 1;
                assert_eq!(o, vec![s]);
                // Gather what was asked, then flip the count: never consistent.
                let asked = (i[1].len / 4) as u32;
                data = cat(&[
                    map(3 - asked, 0).as_bytes(),
                    &ids(&vec![g0; asked as usize]),
                ]);
            }
            other => break other,
        }
    };
    assert_eq!((retries, refused), (MAX_ROUNDS, Ans::Err(libc::EINVAL)));
    // The refusal forgot the pending rounds: the same ioctl, played straight, works again.
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    assert_eq!(
        k.round(fh, cmd, ARG, map(2, 0).as_bytes(), 24),
        Ans::Retry(vec![s, iov(ARR, 8)], vec![s])
    );
    assert_eq!(
        k.round(fh, cmd, ARG, &fin, 24),
        Ans::Done(0, map(2, 2).as_bytes().to_vec())
    );
}

// ---- limits and refusals ------------------------------------------------------------------------

fn create_signal_event(k: &mut Kernel, fh: u64) -> u32 {
    let a = KfdIoctlCreateEventArgs {
        event_page_offset: 0,
        event_trigger_data: 0,
        event_type: KFD_IOC_EVENT_SIGNAL,
        auto_reset: 0,
        node_id: 0,
        event_id: 0,
        event_slot_index: 0,
    };
    let Ans::Done(0, out) = flat(k, fh, AMDKFD_IOC_CREATE_EVENT, &a) else {
        panic!("CREATE_EVENT")
    };
    KfdIoctlCreateEventArgs::read_from_bytes(&out)
        .expect("args")
        .event_id
}

fn wait_args(n: u32, timeout: u32) -> KfdIoctlWaitEventsArgs {
    KfdIoctlWaitEventsArgs {
        events_ptr: ARR,
        num_events: n,
        wait_for_all: 0,
        timeout,
        wait_result: 0,
    }
}

fn events(ids: impl Iterator<Item = u32>) -> Vec<u8> {
    ids.flat_map(|id| {
        let mut d = KfdEventData::new_zeroed();
        d.event_id = id;
        d.as_bytes().to_vec()
    })
    .collect()
}

#[test]
fn cuse_limits_are_e2big_and_the_schema_bound_einval() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    let ev = create_signal_event(&mut k, fh);
    let s = iov(ARG, 24);
    let cmd = AMDKFD_IOC_WAIT_EVENTS;
    // The largest WAIT_EVENTS one round can carry: 24 + 2730 × 48 = 131064 bytes each way.
    let max = ((CUSE_MAX_BYTES as usize - 24) / EVENT_DATA) as u32;
    assert_eq!(max, 2730);
    let arr = iov(ARR, max as u64 * 48);
    assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
    assert_eq!(
        k.round(fh, cmd, ARG, wait_args(max, 0).as_bytes(), 24),
        Ans::Retry(vec![s, arr], vec![s, arr])
    );
    // It runs (the event is signaled; waiting on it 2730 times is waiting on it once).
    let sig = KfdIoctlSetEventArgs {
        event_id: ev,
        pad: 0,
    };
    assert_eq!(
        flat(&mut k, fh, AMDKFD_IOC_SET_EVENT, &sig),
        Ans::Done(0, vec![])
    );
    let evs = events(std::iter::repeat_n(ev, max as usize));
    let fin = cat(&[wait_args(max, 0).as_bytes(), &evs]);
    let Ans::Done(0, out) = k.round(fh, cmd, ARG, &fin, 24 + arr.len as u32) else {
        panic!("full-size round")
    };
    // Only the struct comes back: the kernel writes no event data for signal events waited on
    // without an age, so the reply leaves the client's array alone.
    assert_eq!(out.len(), 24);
    let w = KfdIoctlWaitEventsArgs::read_from_bytes(&out[..24]).expect("args");
    assert_eq!(w.wait_result, 0, "KFD_IOC_WAIT_RESULT_COMPLETE");

    // One more event is over CUSE's 128 KiB per direction: E2BIG (the kernel would say ENOMEM
    // after the RETRY; the daemon refuses first, with a log line).
    for n in [max + 1, (marshal_max() / EVENT_DATA) as u32] {
        assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
        assert_eq!(
            k.round(fh, cmd, ARG, wait_args(n, 0).as_bytes(), 24),
            Ans::Err(libc::E2BIG),
            "{n} events"
        );
    }
    // Beyond the schema's bound on any one array (marshal::MAX_ARRAY_BYTES, 1 MiB) the count is
    // refused as garbage before CUSE's limits are considered: EINVAL.
    for n in [(marshal_max() / EVENT_DATA) as u32 + 1, u32::MAX] {
        assert_eq!(k.round(fh, cmd, ARG, &[], 0), Ans::Retry(vec![s], vec![s]));
        assert_eq!(
            k.round(fh, cmd, ARG, wait_args(n, 0).as_bytes(), 24),
            Ans::Err(libc::EINVAL),
            "{n} events"
        );
    }
    // A null array with a count is EFAULT, as copy_from_user of NULL.
    let null = KfdIoctlWaitEventsArgs {
        events_ptr: 0,
        ..wait_args(1, 0)
    };
    assert_eq!(
        k.round(fh, cmd, ARG, null.as_bytes(), 24),
        Ans::Err(libc::EFAULT)
    );

    // The out direction has the same limit: apertures for 2340 nodes fit (16 + 2340 × 56 =
    // 131056), 2341 do not.
    let ap = |n: u32| KfdIoctlGetProcessAperturesNewArgs {
        kfd_process_device_apertures_ptr: ARR,
        num_of_nodes: n,
        pad: 0,
    };
    let cmd = AMDKFD_IOC_GET_PROCESS_APERTURES_NEW;
    let s16 = iov(ARG, 16);
    assert_eq!(
        k.round(fh, cmd, ARG, ap(2340).as_bytes(), 16),
        Ans::Retry(vec![s16], vec![s16, iov(ARR, 2340 * 56)])
    );
    assert_eq!(
        k.round(fh, cmd, ARG, ap(2341).as_bytes(), 16),
        Ans::Err(libc::E2BIG)
    );
}

fn marshal_max() -> usize {
    kfdmux::marshal::MAX_ARRAY_BYTES
}

#[test]
fn compat_ioctls_are_refused_with_eperm() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    // What cuse_file_compat_ioctl sends for a 32-bit caller on a 64-bit kernel (and x32).
    for flags in [
        UNRESTRICTED | FUSE_IOCTL_COMPAT | FUSE_IOCTL_32BIT,
        UNRESTRICTED | FUSE_IOCTL_COMPAT | FUSE_IOCTL_32BIT | FUSE_IOCTL_COMPAT_X32,
        UNRESTRICTED | FUSE_IOCTL_32BIT,
    ] {
        let u = k.send_round(fh, my_pid(), flags, AMDKFD_IOC_GET_VERSION, ARG, &[], 0);
        assert_eq!(k.reply(u).ans(), Ans::Err(libc::EPERM), "flags {flags:#x}");
    }
    // Unknown ioctls are ENOTTY before any retry; a KFD ioctl on a render node too.
    assert_eq!(
        k.round(
            fh,
            kfdmux::abi::table::ioc(3, b'K' as u32, 0x7f, 8),
            ARG,
            &[],
            0
        ),
        Ans::Err(libc::ENOTTY)
    );
    assert_eq!(
        k.round(fh, DRM_IOCTL_VERSION, ARG, &[], 0),
        Ans::Err(libc::ENOTTY)
    );
}

#[test]
fn handover_token_is_one_out_round() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    // Round 1: no in iovec at all, one out iovec for the token.
    let u = k.send_round(
        fh,
        my_pid(),
        UNRESTRICTED,
        KFDMUX_IOC_HANDOVER_TOKEN,
        ARG,
        &[],
        0,
    );
    let r = k.reply(u);
    assert_eq!(r.body, retry_body(&[], &[iov(ARG, 8)]));
    // Round 2 (in_size 0, out_size 8): the token, bound to this process, usable once.
    let Ans::Done(0, out) = k.round(fh, KFDMUX_IOC_HANDOVER_TOKEN, ARG, &[], 8) else {
        panic!("token round")
    };
    let token = u64::from_le_bytes(out.as_slice().try_into().expect("8 bytes"));
    assert_eq!(stack.mux.tokens.redeem(token), Some(my_pid()));
    assert_eq!(stack.mux.tokens.redeem(token), None, "one-time");
    // Another process gets no token for this file.
    let other = Other::spawn();
    let u = k.send_round(
        fh,
        other.pid(),
        UNRESTRICTED,
        KFDMUX_IOC_HANDOVER_TOKEN,
        ARG,
        &[],
        8,
    );
    assert_eq!(k.reply(u).ans(), Ans::Err(libc::EBADF));
}

// ---- parked requests -----------------------------------------------------------------------------

/// Plays WAIT_EVENTS on `ev` up to its final round; returns that round's unique (not answered).
fn send_parked_wait(k: &mut Kernel, fh: u64, ev: u32) -> (u64, Vec<u8>) {
    let s = iov(ARG, 24);
    let a = iov(ARR, 48);
    let w = wait_args(1, KFD_EVENT_TIMEOUT_INFINITE);
    assert_eq!(
        k.round(fh, AMDKFD_IOC_WAIT_EVENTS, ARG, &[], 0),
        Ans::Retry(vec![s], vec![s])
    );
    assert_eq!(
        k.round(fh, AMDKFD_IOC_WAIT_EVENTS, ARG, w.as_bytes(), 24),
        Ans::Retry(vec![s, a], vec![s, a])
    );
    let fin = cat(&[w.as_bytes(), &events([ev].into_iter())]);
    let u = k.send_round(
        fh,
        my_pid(),
        UNRESTRICTED,
        AMDKFD_IOC_WAIT_EVENTS,
        ARG,
        &fin,
        72,
    );
    (u, w.as_bytes().to_vec())
}

#[test]
fn interrupt_of_a_parked_wait_is_eintr_and_release_answers_the_rest() {
    let stack = Stack::new();
    let mut k = Kernel::ready(&stack, FileKind::Kfd, DEVNAME);
    let fh = k.open(my_pid()).expect("OPEN").fh;
    let ev = create_signal_event(&mut k, fh);
    let (w1, args) = send_parked_wait(&mut k, fh, ev);
    k.expect_silence(Duration::from_millis(200));
    assert_eq!(stack.stats()["waiters"], 1);
    // Parking holds no worker: a flat ioctl is answered meanwhile.
    assert!(matches!(
        flat(&mut k, fh, AMDKFD_IOC_GET_VERSION, &[0u8; 8]),
        Ans::Done(0, _)
    ));

    // FUSE_INTERRUPT (unique = target | 1) → the wait ends with -EINTR; its struct is copied out
    // (KFD copies the struct whatever the handler returned); the interrupt gets no reply.
    k.send_raw(&request(
        FUSE_INTERRUPT,
        w1 | 1,
        0,
        my_pid(),
        InterruptIn { unique: w1 }.as_bytes(),
    ));
    // wait_result is KFD_IOC_WAIT_RESULT_FAIL (2), as kfd_wait_on_events leaves it on error.
    let mut want = KfdIoctlWaitEventsArgs::read_from_bytes(&args).expect("args");
    want.wait_result = 2;
    assert_eq!(
        k.reply(w1).ans(),
        Ans::Done(-libc::EINTR, want.as_bytes().to_vec())
    );
    k.expect_silence(Duration::from_millis(100));
    assert_eq!(stack.stats()["waiters"], 0);

    // Another parked wait: RELEASE answers it (never left hanging) and frees the context.
    let (w2, _) = send_parked_wait(&mut k, fh, ev);
    k.expect_silence(Duration::from_millis(150));
    let r = k.release(fh);
    assert_eq!((r.error, r.len), (0, 16));
    match k.reply(w2).ans() {
        Ans::Done(res, _) => assert_eq!(res, -libc::EINTR),
        other => panic!("parked wait at release: {other:?}"),
    }
    let s = stack.stats();
    assert_eq!(
        (
            s["contexts"],
            s["events"],
            s["waiters"],
            s["releases_total"]
        ),
        (0, 0, 0, 1),
        "{s:?}"
    );
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
