//! A fake kernel peer for the FUSE/CUSE engine: the daemon's real `Session` on one end of a
//! `SOCK_SEQPACKET` socketpair, requests dispatched synchronously on the calling thread (so a
//! run is deterministic), replies read from the other end. Shared by the fuzz targets and the
//! integration tests (`#[path]`-included), so both drive exactly the same code.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kfdmux::transport::engine::{Filesystem, Protocol, Session};
use kfdmux::transport::wire::*;
use zerocopy::{FromBytes, IntoBytes};

/// One reply (or notification) the daemon wrote.
#[derive(Debug, Clone)]
pub struct Reply {
    pub hdr: OutHeader,
    pub body: Vec<u8>,
}

pub struct FakeKernel {
    pub peer: OwnedFd,
    pub session: Arc<Session>,
    next_unique: u64,
    stash: VecDeque<Reply>,
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
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A request message: header + body, `len` filled in.
pub fn request(
    opcode: u32,
    unique: u64,
    nodeid: u64,
    ids: (u32, u32, u32),
    body: &[u8],
) -> Vec<u8> {
    let h = InHeader {
        len: (40 + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        uid: ids.0,
        gid: ids.1,
        pid: ids.2,
        total_extlen: 0,
        padding: 0,
    };
    let mut m = h.as_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

impl FakeKernel {
    /// A FUSE session (no passthrough), initialised.
    pub fn fuse(fs: Arc<dyn Filesystem>) -> FakeKernel {
        let (ours, peer) = seqpacket_pair();
        let session = Session::new(ours, fs, Protocol::Fuse, false);
        let mut k = FakeKernel {
            peer,
            session,
            next_unique: 1,
            stash: VecDeque::new(),
        };
        let init = InitIn {
            major: 7,
            minor: 41,
            max_readahead: 128 * 1024,
            flags: (FUSE_ASYNC_READ | FUSE_MAX_PAGES) as u32,
        };
        let r = k.call(FUSE_INIT, 0, (0, 0, 0), init.as_bytes());
        assert_eq!(r.hdr.error, 0, "INIT failed");
        k
    }

    /// A CUSE session, initialised.
    pub fn cuse(fs: Arc<dyn Filesystem>, devname: &str) -> FakeKernel {
        let (ours, peer) = seqpacket_pair();
        let session = Session::new_cuse(ours, fs, devname);
        let mut k = FakeKernel {
            peer,
            session,
            next_unique: 1,
            stash: VecDeque::new(),
        };
        let init = CuseInitIn {
            major: 7,
            minor: 41,
            unused: 0,
            flags: 0,
        };
        let r = k.call(CUSE_INIT, 0, (0, 0, 0), init.as_bytes());
        assert_eq!(r.hdr.error, 0, "CUSE_INIT failed");
        k
    }

    pub fn next_unique(&mut self) -> u64 {
        // The kernel's uniques are even (odd ones mark interrupts); keep that shape.
        self.next_unique += 2;
        self.next_unique
    }

    /// Sends a raw message (any bytes) to the daemon.
    pub fn send_raw(&self, msg: &[u8]) {
        self.session.dispatch(msg);
    }

    /// Sends a request; returns its unique.
    pub fn send(&mut self, opcode: u32, nodeid: u64, ids: (u32, u32, u32), body: &[u8]) -> u64 {
        let u = self.next_unique();
        self.send_raw(&request(opcode, u, nodeid, ids, body));
        u
    }

    /// The next message from the daemon, waiting up to `timeout` (None: nothing came).
    pub fn recv(&mut self, timeout: Duration) -> Option<Reply> {
        if let Some(r) = self.stash.pop_front() {
            return Some(r);
        }
        self.recv_wire(timeout)
    }

    fn recv_wire(&self, timeout: Duration) -> Option<Reply> {
        let mut pfd = libc::pollfd {
            fd: self.peer.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 256 * 1024];
        // SAFETY: reading into our own buffer.
        let n = unsafe {
            libc::recv(
                self.peer.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 16 {
            return None;
        }
        buf.truncate(n as usize);
        let (hdr, rest) = OutHeader::read_from_prefix(&buf).ok()?;
        assert_eq!(
            hdr.len as usize,
            buf.len(),
            "reply header length {} != message length {}",
            hdr.len,
            buf.len()
        );
        Some(Reply {
            hdr,
            body: rest.to_vec(),
        })
    }

    /// Everything the daemon has written so far (without waiting).
    pub fn drain(&mut self) -> Vec<Reply> {
        let mut v: Vec<Reply> = self.stash.drain(..).collect();
        while let Some(r) = self.recv_wire(Duration::ZERO) {
            v.push(r);
        }
        v
    }

    /// The reply to `unique`, waiting up to `timeout`; other messages are kept for later.
    pub fn wait_for(&mut self, unique: u64, timeout: Duration) -> Option<Reply> {
        if let Some(i) = self.stash.iter().position(|r| r.hdr.unique == unique) {
            return self.stash.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.recv_wire(left)?;
            if r.hdr.unique == unique {
                return Some(r);
            }
            self.stash.push_back(r);
        }
    }

    /// Sends a request and returns its reply (which must come within 5 s).
    pub fn call(&mut self, opcode: u32, nodeid: u64, ids: (u32, u32, u32), body: &[u8]) -> Reply {
        let u = self.send(opcode, nodeid, ids, body);
        self.wait_for(u, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("no reply to opcode {opcode}"))
    }

    /// OPEN of `nodeid`: the file handle, or the errno.
    pub fn open(&mut self, nodeid: u64, ids: (u32, u32, u32)) -> Result<u64, i32> {
        let r = self.call(
            FUSE_OPEN,
            nodeid,
            ids,
            OpenIn {
                flags: libc::O_RDWR as u32,
                open_flags: 0,
            }
            .as_bytes(),
        );
        if r.hdr.error != 0 {
            return Err(-r.hdr.error);
        }
        Ok(OpenOut::read_from_prefix(&r.body)
            .map(|(o, _)| o.fh)
            .unwrap_or(0))
    }

    pub fn release(&mut self, nodeid: u64, fh: u64, ids: (u32, u32, u32)) {
        let rel = ReleaseIn {
            fh,
            flags: 0,
            release_flags: 0,
            lock_owner: 0,
        };
        let r = self.call(FUSE_RELEASE, nodeid, ids, rel.as_bytes());
        assert_eq!(r.hdr.error, 0, "RELEASE failed");
    }

    /// Sends one IOCTL request; returns its unique.
    #[allow(clippy::too_many_arguments)]
    pub fn send_ioctl(
        &mut self,
        nodeid: u64,
        ids: (u32, u32, u32),
        fh: u64,
        flags: u32,
        cmd: u32,
        arg: u64,
        in_data: &[u8],
        out_size: u32,
    ) -> u64 {
        let io = IoctlIn {
            fh,
            flags,
            cmd,
            arg,
            in_size: in_data.len() as u32,
            out_size,
        };
        let mut body = io.as_bytes().to_vec();
        body.extend_from_slice(in_data);
        self.send(FUSE_IOCTL, nodeid, ids, &body)
    }
}

/// What an IOCTL reply says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoctlAnswer {
    /// `error != 0` in the header.
    Error(i32),
    /// RETRY with in and out iovecs.
    Retry(Vec<IoctlIovec>, Vec<IoctlIovec>),
    /// Done: result and the out data.
    Done(i32, Vec<u8>),
}

/// Decodes an IOCTL reply; `Err` names what is malformed.
pub fn parse_ioctl_reply(r: &Reply) -> Result<IoctlAnswer, String> {
    if r.hdr.error != 0 {
        if !r.body.is_empty() {
            return Err(format!(
                "error reply {} with a {} byte body",
                r.hdr.error,
                r.body.len()
            ));
        }
        return Ok(IoctlAnswer::Error(-r.hdr.error));
    }
    let (o, rest) =
        IoctlOut::read_from_prefix(&r.body).map_err(|_| "short ioctl_out".to_string())?;
    if o.flags & FUSE_IOCTL_RETRY != 0 {
        let ni = o.in_iovs as usize;
        let no = o.out_iovs as usize;
        if ni > FUSE_IOCTL_MAX_IOV || no > FUSE_IOCTL_MAX_IOV || ni + no > FUSE_IOCTL_MAX_IOV {
            return Err(format!("retry with {ni}+{no} iovecs"));
        }
        if rest.len() != (ni + no) * 16 {
            return Err(format!(
                "retry body {} bytes for {ni}+{no} iovecs",
                rest.len()
            ));
        }
        let iovs: Vec<IoctlIovec> = rest
            .chunks_exact(16)
            .filter_map(|c| IoctlIovec::read_from_bytes(c).ok())
            .collect();
        let (a, b) = iovs.split_at(ni);
        return Ok(IoctlAnswer::Retry(a.to_vec(), b.to_vec()));
    }
    Ok(IoctlAnswer::Done(o.result, rest.to_vec()))
}

/// A model of a client's memory for playing CUSE retry rounds: mapped ranges and their bytes.
#[derive(Default, Debug, Clone)]
pub struct ClientMem {
    pub regions: BTreeMap<u64, Vec<u8>>,
}

impl ClientMem {
    pub fn map(&mut self, addr: u64, data: Vec<u8>) {
        self.regions.insert(addr, data);
    }
    fn find(&self, addr: u64, len: u64) -> Option<(u64, usize)> {
        let (&start, data) = self.regions.range(..=addr).next_back()?;
        let off = addr.checked_sub(start)?;
        let end = off.checked_add(len)?;
        (end <= data.len() as u64).then_some((start, off as usize))
    }
    /// Reads `len` bytes at `addr` (None: not mapped, the kernel's EFAULT).
    pub fn read(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        let (start, off) = self.find(addr, len)?;
        Some(self.regions[&start][off..off + len as usize].to_vec())
    }
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len() as u64) {
            Some((start, off)) => {
                if let Some(r) = self.regions.get_mut(&start) {
                    r[off..off + data.len()].copy_from_slice(data);
                }
                true
            }
            None => false,
        }
    }
}

/// The largest retry round the kernel accepts (bytes per direction): CUSE's 32 pages.
pub const KERNEL_MAX_ROUND_BYTES: u64 = 128 * 1024;

/// What the kernel does with a RETRY: gathers the in iovecs (EFAULT if unmapped), checks the
/// limits (ENOMEM, as fuse_do_ioctl), and returns the next round's (in_data, out_size).
pub fn kernel_next_round(
    mem: &ClientMem,
    ins: &[IoctlIovec],
    outs: &[IoctlIovec],
) -> Result<(Vec<u8>, u32), i32> {
    let in_len: u64 = ins
        .iter()
        .map(|i| i.len)
        .fold(0u64, |a, b| a.saturating_add(b));
    let out_len: u64 = outs
        .iter()
        .map(|i| i.len)
        .fold(0u64, |a, b| a.saturating_add(b));
    if in_len > KERNEL_MAX_ROUND_BYTES || out_len > KERNEL_MAX_ROUND_BYTES {
        return Err(libc::ENOMEM);
    }
    let mut data = Vec::with_capacity(in_len as usize);
    for i in ins {
        data.extend_from_slice(&mem.read(i.base, i.len).ok_or(libc::EFAULT)?);
    }
    Ok((data, out_len as u32))
}

/// The kernel's copy-out of a final reply into the out iovecs; Err when the reply carries more
/// bytes than the round allowed (the kernel fails such a reply) or an iovec is unmapped.
pub fn kernel_copy_out(
    mem: &mut ClientMem,
    outs: &[IoctlIovec],
    out_size: u32,
    data: &[u8],
) -> Result<(), String> {
    if data.len() > out_size as usize {
        return Err(format!(
            "reply carries {} bytes, the round allowed {out_size}",
            data.len()
        ));
    }
    let mut off = 0usize;
    for o in outs {
        if off >= data.len() {
            break;
        }
        let n = (o.len as usize).min(data.len() - off);
        if !mem.write(o.base, &data[off..off + n]) {
            return Err(format!("out iovec {:#x}+{} unmapped", o.base, o.len));
        }
        off += n;
    }
    Ok(())
}

/// The daemon's stats text as (key, value) pairs with numeric values.
pub fn stats_map(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let k = it.next()?;
            let v = it.next()?.parse().ok()?;
            Some((k.to_string(), v))
        })
        .collect()
}

/// Counters that must read zero once every context is released: (name, value) of any that don't.
pub fn leaked(stats: &BTreeMap<String, u64>) -> Vec<(String, u64)> {
    const MUST_BE_ZERO: &[&str] = &[
        "contexts",
        "render_contexts",
        "buffers",
        "buffer_bytes",
        "events",
        "waiters",
        "queues",
        "gtt_used",
        "dmabufs",
        "svm_ranges",
        "vram_used_gpu0",
        "vram_used_gpu1",
    ];
    MUST_BE_ZERO
        .iter()
        .filter_map(|k| {
            stats
                .get(*k)
                .filter(|v| **v != 0)
                .map(|v| (k.to_string(), *v))
        })
        .collect()
}
