//! Hand-over of a client's mapping memfd to the preload library (CUSE has no mmap).
//!
//! CONTRACT used by the mux: `Tokens::issue(tgid) -> u64` is called for the kfdmux-private
//! ioctl `KFDMUX_IOC_HANDOVER_TOKEN` on a kfdmux file by its opener; the token is one-time,
//! bound to that tgid and short-lived. The socket server redeems it.
//!
//! The server ([`spawn_server`]) listens on a Unix stream socket. Protocol, one exchange per
//! connection (see docs/cuse-mmap.md):
//! - client → daemon: the 8 token bytes, exactly as the ioctl wrote them (little-endian u64);
//! - daemon → client: one status byte — `0` with the process's memfd attached (`SCM_RIGHTS`),
//!   or a positive errno and no fd: `EACCES` unknown, used or expired token; `EPERM` the socket
//!   peer is not the process the token was issued to; `EAGAIN` too many connections; otherwise
//!   the device's error.
//!
//! The requester proves twice that the memory is its own: the token comes from an ioctl that
//! the mux answers only for the file's opener, and the socket peer's credentials (`SO_PEERCRED`,
//! taken by the kernel at connect time) must belong to the same process. A token is consumed by
//! its first presentation, also when that presentation is refused.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::device::{Caller, Env, FileKind};
use crate::errno::Errno;
use crate::mux::{tgid_of, Mux};

/// `_IOR('K', 0xF0, struct { u64 token; })`: a one-time hand-over token for the caller.
pub const KFDMUX_IOC_HANDOVER_TOKEN: u32 = crate::abi::table::ioc(
    crate::abi::table::IOC_READ,
    crate::abi::table::KFD_IOC_TYPE,
    0xF0,
    8,
);

/// How long a token stays redeemable.
pub const TOKEN_TTL: Duration = Duration::from_secs(10);

/// Where the daemon listens for hand-overs unless told otherwise (`--handover-socket`).
pub const DEFAULT_SOCKET: &str = "/run/kfdmux/handover.sock";
/// The environment variable that tells the preload library where the socket is.
pub const SOCKET_ENV: &str = "KFDMUX_HANDOVER_SOCKET";
/// The environment variable that makes the preload library log to stderr.
pub const DEBUG_ENV: &str = "KFDMUX_PRELOAD_DEBUG";
/// File name of the preload library (built by the `kfdmux-preload` workspace member).
pub const PRELOAD_LIB: &str = "libkfdmux_preload.so";

/// A client must send its token within this time (a silent client only holds its own thread).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once; more are refused with `EAGAIN`.
pub const MAX_CONNECTIONS: usize = 64;

/// `_IO('K', 0xF1)`: "this file's opener has the preload library's channel": from now on fds
/// going out of its ioctls (EXPORT_DMABUF, SMI_EVENTS) are parked for it instead of refused.
pub const KFDMUX_IOC_FD_CHANNEL: u32 = crate::abi::table::ioc(
    crate::abi::table::IOC_NONE,
    crate::abi::table::KFD_IOC_TYPE,
    0xF1,
    0,
);

/// `_IOWR('K', 0xF2, struct { u64 slot_in_token_out; })`: a one-time token for the fd parked in
/// `slot` (the number an ioctl wrote into its fd field), redeemable on the hand-over socket.
pub const KFDMUX_IOC_PARKED_TOKEN: u32 = crate::abi::table::ioc(
    crate::abi::table::IOC_READ | crate::abi::table::IOC_WRITE,
    crate::abi::table::KFD_IOC_TYPE,
    0xF2,
    8,
);

/// Fds parked for one file and not yet fetched; more are refused with EMFILE.
pub const MAX_PARKED: usize = 64;

/// What a token hands over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The process's mapping memfd (mmap).
    Memory,
    /// The fd parked in `slot` of file `file` (a context id).
    Parked { file: u64, slot: u32 },
}

/// The fds parked for one open file.
#[derive(Default)]
struct Parking {
    channel: bool,
    next: u32,
    fds: HashMap<u32, (u32, OwnedFd)>,
}

/// Hand-over tokens and the fds parked for clients of the preload channel.
#[derive(Default)]
pub struct Tokens {
    map: Mutex<HashMap<u64, (u32, Instant, Grant)>>,
    parked: Mutex<HashMap<u64, Parking>>,
}

impl Tokens {
    /// A fresh random token bound to `tgid` for its memory.
    pub fn issue(&self, tgid: u32) -> u64 {
        self.issue_grant(tgid, Grant::Memory)
    }

    fn issue_grant(&self, tgid: u32, grant: Grant) -> u64 {
        let mut t = [0u8; 8];
        // SAFETY: getrandom writes at most 8 bytes into `t`.
        let n = unsafe { libc::getrandom(t.as_mut_ptr() as *mut _, 8, 0) };
        let token = if n == 8 {
            u64::from_le_bytes(t)
        } else {
            Instant::now().elapsed().as_nanos() as u64 ^ tgid as u64
        };
        if let Ok(mut m) = self.map.lock() {
            let now = Instant::now();
            m.retain(|_, (_, at, _)| now.duration_since(*at) < TOKEN_TTL);
            m.insert(token, (tgid, now, grant));
        }
        token
    }

    /// Redeems a memory token: the tgid it was issued to, once.
    pub fn redeem(&self, token: u64) -> Option<u32> {
        match self.redeem_grant(token)? {
            (tgid, Grant::Memory) => Some(tgid),
            _ => None,
        }
    }

    /// Redeems any token: its tgid and what it grants, once.
    pub fn redeem_grant(&self, token: u64) -> Option<(u32, Grant)> {
        let mut m = self.map.lock().ok()?;
        let (tgid, at, grant) = m.remove(&token)?;
        (at.elapsed() < TOKEN_TTL).then_some((tgid, grant))
    }

    fn parking(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Parking>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks file `file` (a context id) as having the preload channel (KFDMUX_IOC_FD_CHANNEL).
    pub fn enable_channel(&self, file: u64) {
        self.parking().entry(file).or_default().channel = true;
    }

    /// Whether fds going out of file `file`'s ioctls can be parked.
    pub fn channel_on(&self, file: u64) -> bool {
        self.parking().get(&file).is_some_and(|p| p.channel)
    }

    /// Parks `fd` for process `tgid` on file `file`; returns the slot the client fetches it by.
    pub fn park(&self, file: u64, tgid: u32, fd: OwnedFd) -> Result<u32, Errno> {
        let mut m = self.parking();
        let p = m.entry(file).or_default();
        if p.fds.len() >= MAX_PARKED {
            log::warn!("context {file}: {MAX_PARKED} fds parked and never fetched: EMFILE");
            return Err(Errno::EMFILE);
        }
        // Slots count from 1 and skip those in use (wrap-around after 2^32 parks).
        loop {
            p.next = p.next.wrapping_add(1).max(1);
            if !p.fds.contains_key(&p.next) {
                break;
            }
        }
        let slot = p.next;
        p.fds.insert(slot, (tgid, fd));
        Ok(slot)
    }

    /// A one-time token for the fd parked in `slot` of `file` for `tgid` (EBADF: none there).
    pub fn issue_parked(&self, file: u64, tgid: u32, slot: u32) -> Result<u64, Errno> {
        let parked = self
            .parking()
            .get(&file)
            .and_then(|p| p.fds.get(&slot))
            .is_some_and(|(t, _)| *t == tgid);
        if !parked {
            log::debug!("context {file}: no fd parked in slot {slot} for pid {tgid}: EBADF");
            return Err(Errno::EBADF);
        }
        Ok(self.issue_grant(tgid, Grant::Parked { file, slot }))
    }

    /// Takes the fd parked in `slot` of `file` for `tgid`.
    pub fn take_parked(&self, file: u64, tgid: u32, slot: u32) -> Result<OwnedFd, Errno> {
        let mut m = self.parking();
        let p = m.get_mut(&file).ok_or(Errno::EBADF)?;
        match p.fds.get(&slot) {
            Some((t, _)) if *t == tgid => {}
            _ => return Err(Errno::EBADF),
        }
        p.fds.remove(&slot).map(|(_, fd)| fd).ok_or(Errno::EBADF)
    }

    /// File `file` was closed: fds parked for it and never fetched are closed.
    pub fn file_closed(&self, file: u64) {
        let gone = self.parking().remove(&file);
        if let Some(p) = gone.filter(|p| !p.fds.is_empty()) {
            log::info!(
                "context {file} closed with {} fd(s) parked and never fetched: closed",
                p.fds.len()
            );
        }
    }

    /// Fds parked and not yet fetched (all files).
    pub fn parked_count(&self) -> usize {
        self.parking().values().map(|p| p.fds.len()).sum()
    }
}

/// The [`Env`] of one CUSE file's ioctl: fds going out are parked for the preload library when
/// the file's opener announced the channel (KFDMUX_IOC_FD_CHANNEL), refused otherwise.
pub struct ParkingEnv<'a> {
    pub base: &'a dyn Env,
    pub mux: &'a Mux,
    /// The file handle of the file (its context id is looked up only when an fd goes out, so
    /// other ioctls pay nothing).
    pub fh: u64,
}

impl ParkingEnv<'_> {
    fn file(&self) -> u64 {
        self.mux.file(self.fh).map(|f| f.id).unwrap_or(0)
    }
}

impl Env for ParkingEnv<'_> {
    fn file_of_fd(&self, caller: &Caller, fd: i32) -> Result<Option<(FileKind, u32)>, Errno> {
        self.base.file_of_fd(caller, fd)
    }

    fn can_give_fd(&self) -> bool {
        self.mux.tokens.channel_on(self.file()) || self.base.can_give_fd()
    }

    fn give_fd(
        &self,
        caller: &Caller,
        file: OwnedFd,
        cloexec: bool,
        what: &str,
    ) -> Result<u32, Errno> {
        let id = self.file();
        if !self.mux.tokens.channel_on(id) {
            return self.base.give_fd(caller, file, cloexec, what);
        }
        // The preload library sets FD_CLOEXEC itself from the ioctl's flags: the fd arrives
        // with it set (MSG_CMSG_CLOEXEC) and is cleared there when the caller did not ask.
        let slot = self.mux.tokens.park(id, caller.tgid, file)?;
        log::debug!(
            "{what}: fd parked in slot {slot} of context {id} for pid {}",
            caller.tgid
        );
        Ok(slot)
    }
}

/// Answers the channel's private ioctls (CUSE, file opener only); None for any other command.
/// `in_data` is the 8-byte slot for [`KFDMUX_IOC_PARKED_TOKEN`].
pub fn private_ioctl(
    tokens: &Tokens,
    file: u64,
    caller: &Caller,
    cmd: u32,
    in_data: &[u8],
) -> Option<Result<Vec<u8>, Errno>> {
    match cmd {
        KFDMUX_IOC_FD_CHANNEL => {
            tokens.enable_channel(file);
            log::debug!("context {file}: pid {} has the fd channel", caller.tgid);
            Some(Ok(Vec::new()))
        }
        KFDMUX_IOC_PARKED_TOKEN => {
            let slot = in_data
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(u64::MAX);
            let Ok(slot) = u32::try_from(slot) else {
                return Some(Err(Errno::EBADF));
            };
            Some(
                tokens
                    .issue_parked(file, caller.tgid, slot)
                    .map(|t| t.to_le_bytes().to_vec()),
            )
        }
        _ => None,
    }
}

/// Binds the hand-over socket at `path` (creating its directory, replacing a stale socket,
/// mode 0666 so that unprivileged clients can connect) and serves it on a thread of its own,
/// one short-lived thread per connection. Fails if `path` is not a socket or another daemon
/// is listening on it.
pub fn spawn_server(path: &Path, mux: Arc<Mux>) -> io::Result<JoinHandle<()>> {
    let listener = bind_socket(path)?;
    log::info!("serving mmap hand-overs on {}", path.display());
    std::thread::Builder::new()
        .name("kfdmux-handover".into())
        .spawn(move || accept_loop(listener, mux))
}

fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another daemon serves hand-overs on {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Decrements the live-connection count when a connection is done (or its thread never ran).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: UnixListener, mux: Arc<Mux>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // EMFILE/ENFILE/ENOMEM pass; anything else means the listener is unusable.
                match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS) => {
                        log::warn!("hand-over accept: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => continue,
                    _ => {
                        log::error!("hand-over accept: {e}; no more mmap hand-overs");
                        return;
                    }
                }
            }
        };
        if active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::AcqRel);
            log::warn!(
                "hand-over: {MAX_CONNECTIONS} connections already open; refusing one with EAGAIN"
            );
            let _ = conn.set_write_timeout(Some(READ_TIMEOUT));
            let _ = send_reply(&conn, Err(Errno::EAGAIN));
            continue;
        }
        let slot = Slot(active.clone());
        let mux = mux.clone();
        let spawned = std::thread::Builder::new()
            .name("kfdmux-handover-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(&mux, &conn);
            });
        if let Err(e) = spawned {
            log::warn!("hand-over: cannot start a connection thread: {e}");
        }
    }
}

/// What a redeemed token hands over: the process's memfd or a parked fd.
enum Handed {
    Memory(Arc<dyn crate::device::ProcessMemory>),
    Parked(OwnedFd),
}

/// Answers one connection: reads the token, checks it and the peer, replies.
pub fn serve_connection(mux: &Mux, conn: &UnixStream) {
    let _ = conn.set_read_timeout(Some(READ_TIMEOUT));
    let _ = conn.set_write_timeout(Some(READ_TIMEOUT));
    let peer = peer_cred(conn);
    let result = authorize(mux, conn, peer);
    let (pid, uid) = peer.map(|c| (c.pid, c.uid as i64)).unwrap_or((-1, -1));
    match &result {
        Ok((tgid, Handed::Memory(_))) => {
            log::info!("hand-over: memory of pid {tgid} handed to its process (peer pid {pid})")
        }
        Ok((tgid, Handed::Parked(_))) => {
            log::info!(
                "hand-over: a parked fd of pid {tgid} handed to its process (peer pid {pid})"
            )
        }
        Err(e) => log::warn!("hand-over refused to peer pid {pid} uid {uid}: {e}"),
    }
    let fd = result.as_ref().map(|(_, h)| match h {
        Handed::Memory(mem) => mem.backing_fd(),
        Handed::Parked(fd) => fd.as_fd(),
    });
    if let Err(e) = send_reply(conn, fd.map_err(|e| *e)) {
        log::debug!("hand-over: replying to peer pid {pid}: {e}");
    }
}

fn authorize(
    mux: &Mux,
    mut conn: &UnixStream,
    peer: Result<libc::ucred, Errno>,
) -> Result<(u32, Handed), Errno> {
    let mut buf = [0u8; 8];
    conn.read_exact(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Errno::ETIMEDOUT,
        _ => Errno::EPROTO,
    })?;
    let token = u64::from_le_bytes(buf);
    // Redeem before anything can fail: a presented token is spent, also when refused.
    let owner = mux.tokens.redeem_grant(token);
    let peer = peer?;
    let (owner, grant) = owner.ok_or(Errno::EACCES)?;
    let peer_tgid = u32::try_from(peer.pid)
        .ok()
        .filter(|p| *p > 0)
        .and_then(tgid_of);
    if peer_tgid != Some(owner) {
        log::warn!(
            "hand-over: token of pid {owner} presented by pid {} (tgid {peer_tgid:?}): EPERM",
            peer.pid
        );
        return Err(Errno::EPERM);
    }
    match grant {
        Grant::Memory => Ok((owner, Handed::Memory(mux.device.process_memory(owner)?))),
        Grant::Parked { file, slot } => Ok((
            owner,
            Handed::Parked(mux.tokens.take_parked(file, owner, slot)?),
        )),
    }
}

/// The socket peer's credentials as the kernel recorded them at connect time.
fn peer_cred(conn: &UnixStream) -> Result<libc::ucred, Errno> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(Errno::last());
    }
    Ok(cred)
}

/// Sends the status byte, with `fd` attached on success.
fn send_reply(conn: &UnixStream, result: Result<BorrowedFd<'_>, Errno>) -> io::Result<()> {
    let mut status = [match result {
        Ok(_) => 0u8,
        Err(e) => u8::try_from(e.0).unwrap_or(libc::EIO as u8),
    }];
    let mut iov = libc::iovec {
        iov_base: status.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // u64 elements keep the control buffer aligned for cmsghdr; 32 bytes ≥ CMSG_SPACE(4).
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Ok(fd) = result {
        let raw: RawFd = fd.as_raw_fd();
        // SAFETY: CMSG_SPACE/CMSG_LEN are size computations; the header and the fd are written
        // inside `control`, whose size (32) covers CMSG_SPACE(sizeof(int)) (24 on 64-bit).
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space.min(std::mem::size_of_val(&control));
            let c = libc::CMSG_FIRSTHDR(&msg);
            if c.is_null() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, raw);
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers of the sizes it states; MSG_NOSIGNAL avoids
        // SIGPIPE when the client has gone.
        let n = unsafe { libc::sendmsg(conn.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if n < 0 && e.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return Err(if n < 0 {
            e
        } else {
            io::Error::from_raw_os_error(libc::EPROTO)
        });
    }
}

/// The client side of the protocol, for tests and tools: presents `token` on the socket at
/// `path` and returns the memfd, or the daemon's refusal.
pub fn request_memfd(path: &Path, token: u64) -> io::Result<std::os::fd::OwnedFd> {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&token.to_le_bytes())?;
    let mut status = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: status.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: `msg` points at live buffers of the sizes it states.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walks the control buffer the kernel filled, within msg_controllen; every fd
    // received is owned from here on (closed on drop).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                        data.add(i),
                    )));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    match (n, status[0], fds.into_iter().next()) {
        (1, 0, Some(fd)) => Ok(fd),
        (1, e, _) if e != 0 => Err(io::Error::from_raw_os_error(e as i32)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "malformed hand-over answer",
        )),
    }
}

/// Where `kfdmux run` finds the preload library: `$KFDMUX_PRELOAD` if set, else beside the
/// `kfdmux` executable (cargo puts both in `target/<profile>/`), else `/usr/lib/kfdmux/`.
pub fn find_preload_lib() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KFDMUX_PRELOAD") {
        return Some(PathBuf::from(p));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(PRELOAD_LIB)));
    let candidates = beside
        .into_iter()
        .chain([PathBuf::from("/usr/lib/kfdmux").join(PRELOAD_LIB)]);
    candidates.into_iter().find(|p| p.is_file())
}

/// The environment a CUSE client needs: `LD_PRELOAD` with `lib` prepended to `existing` (an
/// `LD_PRELOAD` already set is kept after it) and `KFDMUX_HANDOVER_SOCKET`.
pub fn preload_env(
    lib: &Path,
    socket: &Path,
    existing: Option<&OsStr>,
) -> Vec<(OsString, OsString)> {
    let mut preload = lib.as_os_str().to_os_string();
    if let Some(old) = existing.filter(|o| !o.is_empty()) {
        preload.push(":");
        preload.push(old);
    }
    vec![
        ("LD_PRELOAD".into(), preload),
        (SOCKET_ENV.into(), socket.as_os_str().to_os_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ioctl_number_is_ior_k_f0_u64() {
        assert_eq!(KFDMUX_IOC_HANDOVER_TOKEN, 0x8008_4BF0);
    }

    #[test]
    fn tokens_are_one_time_and_bound() {
        let t = Tokens::default();
        let a = t.issue(42);
        let b = t.issue(43);
        assert_ne!(a, b);
        assert_eq!(t.redeem(a), Some(42));
        assert_eq!(t.redeem(a), None);
        assert_eq!(t.redeem(b), Some(43));
        assert_eq!(t.redeem(0x1234), None);
    }

    /// A pipe: (read end, write end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        use std::os::fd::FromRawFd;
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two new fds into `p`.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds are fresh and ours.
        unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
    }

    /// Whether a pipe's read end is still open somewhere (its write end polls without POLLERR).
    fn has_reader(w: &OwnedFd) -> bool {
        let mut p = libc::pollfd {
            fd: w.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: polls one pollfd without waiting.
        unsafe { libc::poll(&mut p, 1, 0) };
        p.revents & libc::POLLERR == 0
    }

    #[test]
    fn parked_fds_go_to_their_process_once_and_die_with_the_file() {
        let t = Tokens::default();
        assert!(!t.channel_on(7));
        t.enable_channel(7);
        assert!(t.channel_on(7) && !t.channel_on(8));
        let (r, w) = pipe();
        let slot = t.park(7, 42, r).expect("park");
        assert_eq!(
            t.issue_parked(7, 43, slot),
            Err(Errno::EBADF),
            "another process"
        );
        assert_eq!(
            t.issue_parked(8, 42, slot),
            Err(Errno::EBADF),
            "another file"
        );
        assert_eq!(
            t.issue_parked(7, 42, slot + 1),
            Err(Errno::EBADF),
            "no such slot"
        );
        let tok = t.issue_parked(7, 42, slot).expect("token");
        assert_eq!(t.redeem(tok), None, "a parked-fd token is no memory token");
        let tok = t.issue_parked(7, 42, slot).expect("token");
        assert_eq!(
            t.redeem_grant(tok),
            Some((42, Grant::Parked { file: 7, slot }))
        );
        assert_eq!(t.take_parked(7, 43, slot).err(), Some(Errno::EBADF));
        let fd = t.take_parked(7, 42, slot).expect("taken once");
        assert_eq!(t.take_parked(7, 42, slot).err(), Some(Errno::EBADF));
        drop(fd);
        // Never fetched: closed when the file closes.
        let (r2, w2) = pipe();
        let s2 = t.park(7, 42, r2).expect("park");
        assert_ne!(s2, slot, "slots are not reused at once");
        assert_eq!(t.parked_count(), 1);
        assert!(has_reader(&w2));
        t.file_closed(7);
        assert_eq!(t.parked_count(), 0);
        assert!(!has_reader(&w2), "the parked fd was closed");
        assert!(!t.channel_on(7));
        drop(w);
        // A bound on what one file may hold unfetched.
        for _ in 0..MAX_PARKED {
            let (r, _w) = pipe();
            t.park(9, 1, r).expect("park");
        }
        let (r, _w) = pipe();
        assert_eq!(t.park(9, 1, r).err(), Some(Errno::EMFILE));
        t.file_closed(9);
    }

    #[test]
    fn preload_env_keeps_existing_preloads() {
        let v = preload_env(
            Path::new("/l/p.so"),
            Path::new("/run/s"),
            Some(OsStr::new("/x.so")),
        );
        assert_eq!(v[0], ("LD_PRELOAD".into(), "/l/p.so:/x.so".into()));
        assert_eq!(v[1], (SOCKET_ENV.into(), "/run/s".into()));
        let v = preload_env(Path::new("/l/p.so"), Path::new("/run/s"), None);
        assert_eq!(v[0].1, OsString::from("/l/p.so"));
    }

    #[test]
    fn bind_refuses_non_socket_and_replaces_stale_socket() {
        let dir = std::env::temp_dir().join(format!("kfdmux-handover-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/h.sock");
        let l = bind_socket(&path).expect("bind in a new directory");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o666
        );
        // Live: refused.
        assert_eq!(
            bind_socket(&path).err().map(|e| e.kind()),
            Some(io::ErrorKind::AddrInUse)
        );
        drop(l);
        // Stale (nobody listening): replaced.
        let l2 = bind_socket(&path).expect("replace a stale socket");
        drop(l2);
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            bind_socket(&file).err().map(|e| e.kind()),
            Some(io::ErrorKind::AlreadyExists)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
