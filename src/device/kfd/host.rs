//! Context hosts: below KFD 1.19 all opens of `/dev/kfd` by one process share one kernel
//! context, so each client context gets a process of its own — `kfdmux serve --context-host`,
//! fork+exec'd by the daemon — that opens the kfd file (its own kernel context), runs the
//! forwarded ioctls and the doorbell relay, and dies with the context: when the daemon closes
//! its end of the socketpair (the client closed its fd), or when the daemon dies
//! (PR_SET_PDEATHSIG). It runs with no more privilege than it needs: after opening the kfd file
//! it drops to the client's uid/gid (when started as root), clears supplementary groups and
//! sets PR_SET_NO_NEW_PRIVS.
//!
//! RPC over a SOCK_STREAM socketpair, little-endian frames `u32 len | payload`, fds as
//! SCM_RIGHTS on the frame: request `u64 id | u8 op | ...`, reply `u64 id | i32 errno | ...`.
//! Ops: 1 ioctl (`cmd, arg, ptrs, fd fields, out fd fields`; the reply carries the fds the
//! kernel returned in out fd fields — SMI_EVENTS, EXPORT_DMABUF — as SCM_RIGHTS), 2 relay (`kernel off, len, shadow off, dir` +
//! the shadow memfd), 3 unrelay, 4 cancel (interrupts request `id`'s ioctl with a signal).

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use crate::device::Caller;
use crate::errno::Errno;

use super::owner::{self, CancelToken, FwdReq, Owner, PtrBuf};
use super::relay::{Relay, RelayDir};
use super::KfdConfig;

const OP_IOCTL: u8 = 1;
const OP_RELAY: u8 = 2;
const OP_UNRELAY: u8 = 3;
const OP_CANCEL: u8 = 4;
const MAX_FRAME: usize = 64 << 20;
const MAX_FDS: usize = 8;

// ---- framing --------------------------------------------------------------------------------

fn send_frame(sock: RawFd, payload: &[u8], fds: &[RawFd]) -> Result<(), Errno> {
    let mut buf = (payload.len() as u32).to_le_bytes().to_vec();
    buf.extend_from_slice(payload);
    let mut sent = 0;
    while sent < buf.len() {
        let mut iov = libc::iovec {
            iov_base: buf[sent..].as_ptr() as *mut _,
            iov_len: buf.len() - sent,
        };
        // SAFETY: msghdr is plain data; zeroed is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let mut cbuf = vec![0u8; 64 + 4 * MAX_FDS];
        if sent == 0 && !fds.is_empty() {
            let n = fds.len().min(MAX_FDS);
            // SAFETY: CMSG_SPACE is a pure computation.
            let space = unsafe { libc::CMSG_SPACE((4 * n) as u32) } as usize;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: the control buffer is large enough for one header with `n` fds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((4 * n) as u32) as usize;
                std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), n);
            }
        }
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if r < 0 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        sent += r as usize;
    }
    Ok(())
}

/// A frame's payload and the fds that came with it.
type Frame = (Vec<u8>, Vec<OwnedFd>);

/// One frame; None at EOF.
fn recv_frame(sock: RawFd) -> Result<Option<Frame>, Errno> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    let mut fds = Vec::new();
    while got < 4 {
        let mut iov = libc::iovec {
            iov_base: hdr[got..].as_mut_ptr().cast(),
            iov_len: 4 - got,
        };
        let mut cbuf = vec![0u8; 64 + 4 * MAX_FDS];
        // SAFETY: zeroed msghdr is valid; pointers set below are live for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.len();
        // SAFETY: as above.
        let r = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r < 0 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        got += r as usize;
        // SAFETY: walking the control messages the kernel wrote into `cbuf`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let n = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                    let p = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..n {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    let len = u32::from_le_bytes(hdr) as usize;
    if len > MAX_FRAME {
        return Err(Errno::EPROTO);
    }
    let mut payload = vec![0u8; len];
    // SAFETY: the socket fd stays open while this borrowed File lives (forgotten below).
    let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(sock) });
    f.read_exact(&mut payload).map_err(|e| Errno::from_io(&e))?;
    Ok(Some((payload, fds)))
}

struct Rd<'a>(&'a [u8]);
impl Rd<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Errno> {
        if self.0.len() < n {
            return Err(Errno::EPROTO);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, Errno> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Errno> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| Errno::EPROTO)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, Errno> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| Errno::EPROTO)?,
        ))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, Errno> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
}

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_le_bytes());
    v.extend_from_slice(b);
}

// ---- daemon side ----------------------------------------------------------------------------

/// The daemon's handle on one context host.
pub struct HostOwner {
    sock: Arc<OwnedFd>,
    write: Mutex<()>,
    pending: Arc<Mutex<HashMap<u64, Sender<Frame>>>>,
    next: AtomicU64,
    pid: u32,
}

impl HostOwner {
    /// Starts a context host for `caller`'s context.
    pub fn spawn(cfg: &KfdConfig, caller: &Caller) -> Result<HostOwner, Errno> {
        let mut sv = [0; 2];
        // SAFETY: socketpair writes two fds into `sv`.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        } < 0
        {
            return Err(Errno::last());
        }
        // SAFETY: both fds are fresh and ours.
        let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        let child_fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(&cfg.exe);
        cmd.args([
            "serve",
            "--transport",
            "fuse",
            "--mount",
            "/",
            "--device",
            "kfd",
        ])
        .arg("--kfd-path")
        .arg(&cfg.kfd_path)
        .arg("--doorbell-poll-us")
        .arg(cfg.doorbell_poll.as_micros().to_string())
        .arg("--context-host")
        .arg(format!("3:{}:{}", caller.uid, caller.gid))
        .stdin(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls (dup2, fcntl, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if child_fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0);
                } else if libc::dup2(child_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| Errno::from_io(&e))?;
        drop(theirs);
        let pid = child.id();
        // Reap it when it exits (it exits when our end closes).
        std::thread::spawn(move || {
            let mut c = child;
            let _ = c.wait();
        });
        let sock = Arc::new(ours);
        let pending: Arc<Mutex<HashMap<u64, Sender<Frame>>>> = Default::default();
        let (s, p) = (sock.clone(), pending.clone());
        std::thread::Builder::new()
            .name(format!("kfdmux-host-{pid}"))
            .spawn(move || {
                while let Ok(Some((payload, fds))) = recv_frame(s.as_raw_fd()) {
                    let id = Rd(&payload).u64().unwrap_or(0);
                    if let Some(tx) = p.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                        // Fds of a reply nobody waits for any more are dropped (closed).
                        let _ = tx.send((payload, fds));
                    }
                }
                // EOF: the host died; every waiting call gets EIO (senders dropped).
                p.lock().unwrap_or_else(|e| e.into_inner()).clear();
            })
            .map_err(|e| Errno::from_io(&e))?;
        log::info!(
            "context host pid {pid} for pid {} (uid {})",
            caller.tgid,
            caller.uid
        );
        Ok(HostOwner {
            sock,
            write: Mutex::new(()),
            pending,
            next: AtomicU64::new(1),
            pid,
        })
    }

    fn call(
        &self,
        op: u8,
        body: &[u8],
        fds: &[RawFd],
        cancel: Option<&CancelToken>,
    ) -> Result<Frame, Errno> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let mut msg = id.to_le_bytes().to_vec();
        msg.push(op);
        msg.extend_from_slice(body);
        {
            let _g = self.write.lock().unwrap_or_else(|e| e.into_inner());
            send_frame(self.sock.as_raw_fd(), &msg, fds)
                .inspect_err(|e| log::warn!("context host {}: {e}", self.pid))?;
        }
        if let Some(c) = cancel {
            let sock = self.sock.clone();
            let w = Arc::new(Mutex::new(()));
            c.set_action(Box::new(move || {
                let mut m = 0u64.to_le_bytes().to_vec();
                m.push(OP_CANCEL);
                m.extend_from_slice(&id.to_le_bytes());
                let _g = w.lock();
                let _ = send_frame(sock.as_raw_fd(), &m, &[]);
            }));
        }
        let (reply, fds) = rx.recv().map_err(|_| Errno::EIO)?;
        Ok((reply.get(8..).ok_or(Errno::EPROTO)?.to_vec(), fds))
    }
}

impl Owner for HostOwner {
    fn ioctl(&self, mut req: FwdReq, cancel: &CancelToken) -> (FwdReq, Result<(), Errno>) {
        let mut b = Vec::new();
        b.extend_from_slice(&req.cmd.to_le_bytes());
        put_bytes(&mut b, &req.arg);
        b.extend_from_slice(&(req.ptrs.len() as u32).to_le_bytes());
        for p in &req.ptrs {
            b.extend_from_slice(&(p.off as u32).to_le_bytes());
            b.extend_from_slice(&(p.size as u32).to_le_bytes());
            put_bytes(&mut b, &p.data);
        }
        b.extend_from_slice(&(req.fds.len() as u32).to_le_bytes());
        for (off, size, _) in &req.fds {
            b.extend_from_slice(&(*off as u32).to_le_bytes());
            b.extend_from_slice(&(*size as u32).to_le_bytes());
        }
        b.extend_from_slice(&(req.out_fd_fields.len() as u32).to_le_bytes());
        for (off, size) in &req.out_fd_fields {
            b.extend_from_slice(&(*off as u32).to_le_bytes());
            b.extend_from_slice(&(*size as u32).to_le_bytes());
        }
        let fds: Vec<RawFd> = req.fds.iter().map(|(_, _, f)| f.as_raw_fd()).collect();
        let (reply, got) = match self.call(OP_IOCTL, &b, &fds, Some(cancel)) {
            Ok(r) => r,
            Err(e) => return (req, Err(e)),
        };
        // The new fds the kernel gave the host, now ours (closed if unused).
        req.out_fds = got;
        let parse = |req: &mut FwdReq| -> Result<Result<(), Errno>, Errno> {
            let mut r = Rd(&reply);
            let errno = r.u32()? as i32;
            req.arg = r.bytes()?;
            let n = r.u32()? as usize;
            for i in 0..n {
                let d = r.bytes()?;
                if let Some(p) = req.ptrs.get_mut(i) {
                    p.data = d;
                }
            }
            Ok(if errno == 0 {
                Ok(())
            } else {
                Err(Errno(errno))
            })
        };
        let r = parse(&mut req).unwrap_or(Err(Errno::EIO));
        (req, r)
    }

    fn relay(
        &self,
        kernel_off: u64,
        len: u64,
        shadow: &std::fs::File,
        shadow_off: u64,
        dir: RelayDir,
    ) -> Result<u64, Errno> {
        let mut b = Vec::new();
        for v in [kernel_off, len, shadow_off] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(matches!(dir, RelayDir::RealToShadow) as u8);
        let (reply, _) = self.call(OP_RELAY, &b, &[shadow.as_fd().as_raw_fd()], None)?;
        let mut r = Rd(&reply);
        let errno = r.u32()? as i32;
        if errno != 0 {
            return Err(Errno(errno));
        }
        r.u64()
    }

    fn unrelay(&self, id: u64) {
        let _ = self.call(OP_UNRELAY, &id.to_le_bytes(), &[], None);
    }
}

impl Drop for HostOwner {
    fn drop(&mut self) {
        // SAFETY: shutting down our own socket makes the host see EOF and exit.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

// ---- host side ------------------------------------------------------------------------------

/// Drops to `uid`/`gid` (when root) with no supplementary groups, and forbids regaining
/// privilege.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), String> {
    // SAFETY: plain syscalls with integer arguments.
    unsafe {
        if libc::geteuid() == 0
            && uid != 0
            && (libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0)
        {
            return Err(format!(
                "dropping to uid {uid} gid {gid}: {}",
                Errno::last()
            ));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!("PR_SET_NO_NEW_PRIVS: {}", Errno::last()));
        }
    }
    Ok(())
}

/// `kfdmux serve --context-host FD:UID:GID`: the host's main loop.
pub fn run(
    spec: &str,
    kfd_path: &std::path::Path,
    poll: std::time::Duration,
) -> Result<(), String> {
    let parts: Vec<u32> = spec
        .split(':')
        .map(|s| {
            s.parse()
                .map_err(|_| format!("--context-host {spec}: want FD:UID:GID"))
        })
        .collect::<Result<_, _>>()?;
    let [fd, uid, gid] = parts[..] else {
        return Err(format!("--context-host {spec}: want FD:UID:GID"));
    };
    // SAFETY: prctl with integer arguments; getppid has no preconditions.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() == 1 {
            return Err("the daemon is gone".into());
        }
    }
    // SAFETY: fd 3 was handed to us by the daemon and nobody else in this process owns it.
    let sock = Arc::new(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    let kfd = super::open_rw(kfd_path)
        .map_err(|e| format!("context host: opening {}: {e}", kfd_path.display()))?;
    drop_privileges(uid, gid)?;
    owner::install_interrupt_handler();
    let relay = Relay::new(poll);
    let kfd = Arc::new(kfd);
    let write = Arc::new(Mutex::new(()));
    let cancels: Arc<Mutex<HashMap<u64, Arc<CancelToken>>>> = Default::default();
    log::debug!(
        "context host {} serving {}",
        std::process::id(),
        kfd_path.display()
    );
    let reply_fds = |sock: &OwnedFd, write: &Mutex<()>, id: u64, body: &[u8], fds: &[RawFd]| {
        let mut m = id.to_le_bytes().to_vec();
        m.extend_from_slice(body);
        let _g = write.lock().unwrap_or_else(|e| e.into_inner());
        let _ = send_frame(sock.as_raw_fd(), &m, fds);
    };
    let reply = |sock: &OwnedFd, write: &Mutex<()>, id: u64, body: &[u8]| {
        reply_fds(sock, write, id, body, &[])
    };
    while let Some((payload, mut fds)) =
        recv_frame(sock.as_raw_fd()).map_err(|e| format!("context host: {e}"))?
    {
        let mut r = Rd(&payload);
        let (Ok(id), Ok(op)) = (r.u64(), r.u8()) else {
            break;
        };
        match op {
            OP_IOCTL => {
                let req = (|| -> Result<FwdReq, Errno> {
                    let cmd = r.u32()?;
                    let arg = r.bytes()?;
                    let mut req = FwdReq {
                        cmd,
                        arg,
                        ..Default::default()
                    };
                    for _ in 0..r.u32()? {
                        let (off, size) = (r.u32()? as usize, r.u32()? as usize);
                        req.ptrs.push(PtrBuf {
                            off,
                            size,
                            data: r.bytes()?,
                        });
                    }
                    let n = r.u32()? as usize;
                    let mut it = std::mem::take(&mut fds).into_iter();
                    for _ in 0..n {
                        let (off, size) = (r.u32()? as usize, r.u32()? as usize);
                        req.fds.push((off, size, it.next().ok_or(Errno::EPROTO)?));
                    }
                    for _ in 0..r.u32()? {
                        let (off, size) = (r.u32()? as usize, r.u32()? as usize);
                        if req.out_fd_fields.len() >= MAX_FDS {
                            return Err(Errno::EPROTO);
                        }
                        req.out_fd_fields.push((off, size));
                    }
                    Ok(req)
                })();
                let (sock2, write2, kfd, cancels) =
                    (sock.clone(), write.clone(), kfd.clone(), cancels.clone());
                let token = Arc::new(CancelToken::default());
                cancels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, token.clone());
                // One thread per call: WAIT_EVENTS blocks only its own.
                let spawned = std::thread::Builder::new().spawn(move || {
                    let mut body = Vec::new();
                    // New fds the kernel gave us go back with the reply (and are closed here).
                    let mut out_fds = Vec::new();
                    match req {
                        Ok(mut req) => {
                            let e = owner::interruptible(&token, || {
                                owner::exec(kfd.as_raw_fd(), &mut req)
                            })
                            .err()
                            .map(|e| e.0)
                            .unwrap_or(0);
                            body.extend_from_slice(&(e as u32).to_le_bytes());
                            put_bytes(&mut body, &req.arg);
                            body.extend_from_slice(&(req.ptrs.len() as u32).to_le_bytes());
                            for p in &req.ptrs {
                                put_bytes(&mut body, &p.data);
                            }
                            out_fds = std::mem::take(&mut req.out_fds);
                        }
                        Err(e) => body.extend_from_slice(&(e.0 as u32).to_le_bytes()),
                    }
                    cancels
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    let raw: Vec<RawFd> = out_fds.iter().map(|f| f.as_raw_fd()).collect();
                    reply_fds(&sock2, &write2, id, &body, &raw);
                });
                if spawned.is_err() {
                    reply(&sock, &write, id, &(libc::EAGAIN as u32).to_le_bytes());
                }
            }
            OP_RELAY => {
                let res = (|| -> Result<u64, Errno> {
                    let (koff, len, soff, dir) = (r.u64()?, r.u64()?, r.u64()?, r.u8()?);
                    let shadow = std::fs::File::from(fds.pop().ok_or(Errno::EPROTO)?);
                    let dir = if dir == 1 {
                        RelayDir::RealToShadow
                    } else {
                        RelayDir::ShadowToReal
                    };
                    owner::relay_pair(&relay, kfd.as_fd(), koff, len, &shadow, soff, dir)
                })();
                let mut body = Vec::new();
                match res {
                    Ok(rid) => {
                        body.extend_from_slice(&0u32.to_le_bytes());
                        body.extend_from_slice(&rid.to_le_bytes());
                    }
                    Err(e) => body.extend_from_slice(&(e.0 as u32).to_le_bytes()),
                }
                reply(&sock, &write, id, &body);
            }
            OP_UNRELAY => {
                if let Ok(rid) = r.u64() {
                    relay.remove(rid);
                }
                reply(&sock, &write, id, &0u32.to_le_bytes());
            }
            OP_CANCEL => {
                if let Ok(target) = r.u64() {
                    let t = cancels
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&target)
                        .cloned();
                    if let Some(t) = t {
                        t.cancel();
                    }
                }
            }
            _ => {
                log::warn!("context host: unknown op {op}");
                break;
            }
        }
    }
    log::debug!(
        "context host {}: the daemon closed the context; exiting",
        std::process::id()
    );
    Ok(())
}
