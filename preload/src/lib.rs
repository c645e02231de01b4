//! kfdmux-preload: `mmap` and outgoing fds for kfdmux's CUSE devices.
//!
//! CUSE character devices have no mmap: the kernel answers `mmap()` on them with `ENODEV`. Loaded
//! with `LD_PRELOAD`, this library exports `mmap`/`mmap64`; when the real `mmap` of a file
//! descriptor fails with `ENODEV`, and that fd is a character device (or a regular file: a FUSE
//! file without passthrough) answering kfdmux's private ioctl `KFDMUX_IOC_HANDOVER_TOKEN`, it
//! asks the daemon for the memfd that holds this process's mappable buffers and maps that instead,
//! at the same offset. Everything else is passed through untouched.
//!
//! The hand-over (see docs/cuse-mmap.md): the ioctl on the very fd returns a one-time token bound
//! to this process (the daemon answers it only for the fd's opener); the library connects to the
//! daemon's Unix socket (`$KFDMUX_HANDOVER_SOCKET`, default `/run/kfdmux/handover.sock`), sends
//! the 8 token bytes and receives one status byte (0, or an errno) with the memfd attached
//! (`SCM_RIGHTS`). The daemon also checks that the socket peer is the process the token was
//! issued to, so a token leaked to another process is worthless.
//!
//! Nothing is cached: every redirected mmap fetches the memfd afresh (one ioctl and one socket
//! round trip), maps it and closes it. A cached memfd could outlive the daemon's memory object
//! (closed and reopened device, fork, a second daemon) and then map stale pages silently.
//!
//! It also exports `ioctl`, for the two KFD ioctls that return a new fd (SMI_EVENTS,
//! EXPORT_DMABUF): on a kfdmux CUSE file it first tells the daemon (`KFDMUX_IOC_FD_CHANNEL`) to
//! park the fd instead of refusing it, issues the call, then trades the parking slot the daemon
//! wrote into the fd field for a one-time token (`KFDMUX_IOC_PARKED_TOKEN`), fetches the fd over
//! the same socket and writes its number into the field. Every other ioctl goes straight on.
//!
//! `munmap`, `mremap`, `mprotect` and `msync` need no help: the result is an ordinary shared
//! mapping of a memfd, which the kernel handles like any other, so they are not wrapped.
//!
//! This code runs inside arbitrary processes: it never panics, never allocates on the mmap path,
//! reads its environment once (at load), logs only when `KFDMUX_PRELOAD_DEBUG` is set (to
//! stderr), and sets `errno` on every failure.

use std::ffi::{c_int, c_void};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::sync::OnceLock;

#[cfg(not(target_pointer_width = "64"))]
compile_error!("kfdmux-preload supports 64-bit targets only (KFD refuses 32-bit processes)");

/// `_IOR('K', 0xF0, u64)`: kfdmux's one-time hand-over token for the calling process.
pub const KFDMUX_IOC_HANDOVER_TOKEN: u32 = (2 << 30) | (8 << 16) | ((b'K' as u32) << 8) | 0xF0;

/// `_IO('K', 0xF1)`: tells kfdmux that this process fetches fds going out of ioctls over the
/// hand-over socket (the fd channel); any other file refuses it.
pub const KFDMUX_IOC_FD_CHANNEL: u32 = ((b'K' as u32) << 8) | 0xF1;
/// `_IOWR('K', 0xF2, u64)`: slot in, one-time token for the fd parked there out.
pub const KFDMUX_IOC_PARKED_TOKEN: u32 = (3 << 30) | (8 << 16) | ((b'K' as u32) << 8) | 0xF2;
/// `AMDKFD_IOC_SMI_EVENTS` = `_IOWR('K', 0x1F, {u32 gpuid; u32 anon_fd})`.
pub const AMDKFD_IOC_SMI_EVENTS: u32 = (3 << 30) | (8 << 16) | ((b'K' as u32) << 8) | 0x1F;
/// `AMDKFD_IOC_EXPORT_DMABUF` = `_IOWR('K', 0x24, {u64 handle; u32 flags; u32 dmabuf_fd})`.
pub const AMDKFD_IOC_EXPORT_DMABUF: u32 = (3 << 30) | (16 << 16) | ((b'K' as u32) << 8) | 0x24;

/// Where the daemon listens unless `KFDMUX_HANDOVER_SOCKET` says otherwise.
const DEFAULT_SOCKET: &[u8] = b"/run/kfdmux/handover.sock";
/// `sizeof(sockaddr_un.sun_path)`.
const SUN_PATH_MAX: usize = 108;
/// A daemon that does not answer within this time fails the mmap instead of hanging it.
const IO_TIMEOUT_SECS: libc::time_t = 5;
/// At most this many fds are accepted in one reply (the first is used, the rest closed).
const MAX_FDS: usize = 4;

type IoctlFn = unsafe extern "C" fn(c_int, libc::c_ulong, *mut c_void) -> c_int;

/// The next `ioctl` in lookup order, once resolved.
static REAL_IOCTL: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

type MmapFn =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, libc::off_t) -> *mut c_void;

/// The next `mmap` in lookup order (libc's, or another interposer's), once resolved.
static REAL_MMAP: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// Set while `dlsym` runs: an allocator inside it may call `mmap` again; those calls go straight
/// to the system call instead of recursing.
static RESOLVING: AtomicBool = AtomicBool::new(false);

struct Config {
    socket: [u8; SUN_PATH_MAX],
    socket_len: usize,
    debug: bool,
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Reads the environment once: at load time (the constructor below), before the program can
/// change or clear it.
fn config() -> &'static Config {
    CONFIG.get_or_init(|| {
        let mut c = Config {
            socket: [0; SUN_PATH_MAX],
            socket_len: 0,
            debug: false,
        };
        // SAFETY: getenv returns NULL or a NUL-terminated string owned by the environment; it is
        // copied before anything else can modify the environment in this call.
        unsafe {
            let p = libc::getenv(c"KFDMUX_HANDOVER_SOCKET".as_ptr());
            let path: &[u8] = if p.is_null() {
                DEFAULT_SOCKET
            } else {
                std::ffi::CStr::from_ptr(p).to_bytes()
            };
            // sun_path needs room for the terminating NUL; a longer path cannot be connected to
            // and is left empty (the hand-over then fails with ENODEV and a debug line).
            if !path.is_empty() && path.len() < SUN_PATH_MAX {
                c.socket[..path.len()].copy_from_slice(path);
                c.socket_len = path.len();
            }
            let d = libc::getenv(c"KFDMUX_PRELOAD_DEBUG".as_ptr());
            c.debug = !d.is_null() && *d != 0 && !(*d == b'0' as libc::c_char && *d.add(1) == 0);
        }
        c
    })
}

extern "C" fn preload_init() {
    let _ = config();
}

/// Runs [`preload_init`] when the dynamic loader loads the library.
#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = preload_init;

/// A fixed stack buffer for one debug line (no allocation).
struct Line {
    buf: [u8; 512],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn debug_line(args: std::fmt::Arguments<'_>) {
    if !config().debug {
        return;
    }
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = write!(line, "kfdmux-preload[{pid}]: ");
    let _ = line.write_fmt(args);
    line.buf[line.len] = b'\n';
    line.len += 1;
    // Keep errno as the caller will see it.
    let saved = errno();
    // SAFETY: writes `len` initialised bytes of `buf` to stderr.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    set_errno(saved);
}

macro_rules! debug {
    ($($t:tt)*) => { debug_line(format_args!($($t)*)) };
}

fn errno() -> c_int {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e };
}

/// `mmap` as a raw system call: used while `dlsym` is resolving the real one.
unsafe extern "C" fn sys_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: the caller's arguments go to the kernel unchanged; syscall returns -1
    // (MAP_FAILED) and sets errno on failure.
    unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) as *mut c_void }
}

/// The next `mmap` in symbol lookup order (never this library's own).
fn next_mmap() -> MmapFn {
    let p = REAL_MMAP.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: only function pointers of `mmap`'s type are ever stored in REAL_MMAP.
        return unsafe { std::mem::transmute::<*mut c_void, MmapFn>(p) };
    }
    if RESOLVING.swap(true, Ordering::AcqRel) {
        // Inside dlsym (or another thread is resolving): the system call is a correct mmap.
        return sys_mmap;
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; returns NULL or a symbol address.
    let sym = unsafe { libc::dlsym(libc::RTLD_NEXT, c"mmap".as_ptr()) };
    let ours = mmap as MmapFn as *mut c_void;
    let f: MmapFn = if sym.is_null() || sym == ours {
        sys_mmap
    } else {
        // SAFETY: `mmap` in any libc has this signature.
        unsafe { std::mem::transmute::<*mut c_void, MmapFn>(sym) }
    };
    REAL_MMAP.store(f as *mut c_void, Ordering::Release);
    RESOLVING.store(false, Ordering::Release);
    f
}

/// Closes an fd on drop.
struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        let saved = errno();
        // SAFETY: closes an fd this library opened and owns.
        unsafe { libc::close(self.0) };
        set_errno(saved);
    }
}

/// Connects to the daemon, presents `token` and returns the fd it hands over (the memfd, or a
/// parked fd), or an errno.
fn fetch_fd(token: u64) -> Result<c_int, c_int> {
    let cfg = config();
    if cfg.socket_len == 0 {
        debug!(
            "KFDMUX_HANDOVER_SOCKET is empty or longer than {} bytes",
            SUN_PATH_MAX - 1
        );
        return Err(libc::ENODEV);
    }
    let path = &cfg.socket[..cfg.socket_len];
    // SAFETY: plain socket creation.
    let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(errno());
    }
    let sock = Fd(s);
    let tv = libc::timeval {
        tv_sec: IO_TIMEOUT_SECS,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: passes a valid timeval of the size given.
        unsafe {
            libc::setsockopt(
                sock.0,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    // SAFETY: sockaddr_un is plain old data; all-zero is valid (and NUL-terminates sun_path).
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    loop {
        // SAFETY: `sa` is a valid sockaddr_un of the length given.
        let r = unsafe {
            libc::connect(
                sock.0,
                (&sa as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
        let e = errno();
        if e != libc::EINTR {
            debug!(
                "connect {}: errno {e}; is the daemon serving hand-overs?",
                Bytes(path)
            );
            // No hand-over server: behave as without this library.
            return Err(libc::ENODEV);
        }
    }
    let bytes = token.to_ne_bytes();
    let mut sent = 0;
    while sent < bytes.len() {
        // SAFETY: sends initialised bytes from `bytes`; MSG_NOSIGNAL avoids SIGPIPE.
        let n = unsafe {
            libc::send(
                sock.0,
                bytes[sent..].as_ptr().cast(),
                bytes.len() - sent,
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            debug!("sending the token: errno {e}");
            return Err(libc::EPROTO);
        }
        sent += n as usize;
    }
    recv_reply(sock.0)
}

/// Receives the daemon's status byte and the memfd attached to it.
fn recv_reply(sock: c_int) -> Result<c_int, c_int> {
    let mut status = [0u8; 1];
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<c_int>()) as u32) } as usize;
    let space = space.min(std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: status.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: `msg` points at live buffers of the sizes it states.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        break n;
    };
    if n < 0 {
        debug!("waiting for the daemon's answer: errno {}", errno());
        return Err(libc::EPROTO);
    }
    // Collect every fd that arrived, so none leaks whatever happens next.
    let mut fds = [-1 as c_int; MAX_FDS];
    let mut nfds = 0;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // msg_controllen; fds are read unaligned from CMSG_DATA.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const c_int;
                let count = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<c_int>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    if nfds < MAX_FDS {
                        fds[nfds] = fd;
                        nfds += 1;
                    } else {
                        libc::close(fd);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let keep = if n == 1 && status[0] == 0 && msg.msg_flags & libc::MSG_CTRUNC == 0 && nfds > 0 {
        Some(fds[0])
    } else {
        None
    };
    for &fd in fds[..nfds].iter().filter(|&&fd| Some(fd) != keep) {
        drop(Fd(fd));
    }
    match keep {
        Some(fd) => Ok(fd),
        None if n == 1 && status[0] != 0 => {
            debug!("the daemon refused the hand-over: errno {}", status[0]);
            Err(status[0] as c_int)
        }
        None => {
            debug!(
                "malformed answer from the daemon ({n} bytes, {nfds} fds, flags {:#x})",
                msg.msg_flags
            );
            Err(libc::EPROTO)
        }
    }
}

/// Shows a path for a debug line.
struct Bytes<'a>(&'a [u8]);

impl std::fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.utf8_chunks() {
            f.write_str(c.valid())?;
            if !c.invalid().is_empty() {
                f.write_char('?')?;
            }
        }
        Ok(())
    }
}

/// The slow path: the real mmap of `fd` failed with ENODEV.
unsafe fn redirect(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let enodev = || {
        set_errno(libc::ENODEV);
        libc::MAP_FAILED
    };
    // SAFETY: struct stat is plain old data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one struct stat.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return enodev();
    }
    let fmt = st.st_mode & libc::S_IFMT;
    if fmt != libc::S_IFCHR && fmt != libc::S_IFREG {
        return enodev();
    }
    let mut token: u64 = 0;
    // SAFETY: the ioctl writes at most 8 bytes into `token`; other files refuse the unknown
    // command (ENOTTY), which tells us the fd is not kfdmux's.
    if unsafe { libc::ioctl(fd, KFDMUX_IOC_HANDOVER_TOKEN as _, &mut token as *mut u64) } != 0 {
        debug!("fd {fd}: mmap gave ENODEV and the token ioctl errno {}: not a kfdmux file (or not its opener)", errno());
        return enodev();
    }
    let memfd = match fetch_fd(token) {
        Ok(m) => Fd(m),
        Err(e) => {
            set_errno(e);
            return libc::MAP_FAILED;
        }
    };
    // SAFETY: the caller's mapping request, against the memfd instead of the CUSE fd.
    let p = unsafe { next_mmap()(addr, len, prot, flags, memfd.0, off) };
    // The mapping keeps the memfd's file alive; the fd itself is not needed any more.
    let e = errno();
    drop(memfd);
    if p == libc::MAP_FAILED {
        debug!("fd {fd}: mmap of the handed-over memfd at {off:#x}+{len:#x} failed: errno {e}");
        set_errno(e);
    } else {
        debug!("fd {fd}: mapped {len:#x} bytes at offset {off:#x} to {p:p} through the hand-over");
    }
    p
}

/// `ioctl(2)` as a raw system call (while `dlsym` resolves the real one).
unsafe extern "C" fn sys_ioctl(fd: c_int, req: libc::c_ulong, arg: *mut c_void) -> c_int {
    // SAFETY: the caller's arguments go to the kernel unchanged.
    unsafe { libc::syscall(libc::SYS_ioctl, fd, req, arg) as c_int }
}

/// The next `ioctl` in symbol lookup order (never this library's own).
fn next_ioctl() -> IoctlFn {
    let p = REAL_IOCTL.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: only function pointers of `ioctl`'s type are ever stored in REAL_IOCTL.
        return unsafe { std::mem::transmute::<*mut c_void, IoctlFn>(p) };
    }
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; returns NULL or a symbol address.
    let sym = unsafe { libc::dlsym(libc::RTLD_NEXT, c"ioctl".as_ptr()) };
    let ours = ioctl as IoctlFn as *mut c_void;
    let f: IoctlFn = if sym.is_null() || sym == ours {
        sys_ioctl
    } else {
        // SAFETY: `ioctl` in any libc takes (int, unsigned long, ...); the third argument of a
        // variadic call is passed like a fixed pointer argument on the 64-bit Linux ABIs.
        unsafe { std::mem::transmute::<*mut c_void, IoctlFn>(sym) }
    };
    REAL_IOCTL.store(f as *mut c_void, Ordering::Release);
    f
}

/// The second half of SMI_EVENTS / EXPORT_DMABUF on a kfdmux file with the fd channel on: the
/// daemon wrote a parking slot into the fd field at `off`; fetch the fd parked there and put
/// its number in the field instead.
///
/// Safety: `arg` is the caller's argument struct for the command, at least `off + 4` bytes.
unsafe fn fetch_parked(fd: c_int, arg: *mut u8, off: usize, cloexec: bool) -> c_int {
    // SAFETY: the caller's argument struct is at least `off + 4` bytes (the cmd's size).
    let slot = unsafe { std::ptr::read_unaligned(arg.add(off) as *const u32) };
    let mut t: u64 = slot as u64;
    // SAFETY: the private ioctl reads and writes 8 bytes at `t`.
    if unsafe {
        next_ioctl()(
            fd,
            KFDMUX_IOC_PARKED_TOKEN as _,
            (&mut t as *mut u64).cast(),
        )
    } != 0
    {
        debug!(
            "fd {fd}: no token for parked slot {slot}: errno {}",
            errno()
        );
        return -1;
    }
    let newfd = match fetch_fd(t) {
        Ok(f) => f,
        Err(e) => {
            // ENODEV: no hand-over socket; the client sees what it would without the channel.
            set_errno(if e == libc::ENODEV {
                libc::EOPNOTSUPP
            } else {
                e
            });
            return -1;
        }
    };
    if !cloexec {
        // SAFETY: clears FD_CLOEXEC on the fd just received (it arrives with it set).
        unsafe { libc::fcntl(newfd, libc::F_SETFD, 0) };
    }
    // SAFETY: as above: the fd field lies inside the caller's struct.
    unsafe { std::ptr::write_unaligned(arg.add(off) as *mut u32, newfd as u32) };
    debug!("fd {fd}: parked slot {slot} fetched as fd {newfd}");
    0
}

/// `ioctl(2)`: the real one; for SMI_EVENTS and EXPORT_DMABUF on a kfdmux CUSE file, the fd
/// the daemon parked is fetched over the hand-over socket and written into the fd field, so
/// the caller gets a working fd. Every other call costs one comparison.
///
/// # Safety
/// As `ioctl(2)`; declared with a fixed third argument, which is how a variadic call passes it
/// on the 64-bit Linux ABIs.
#[no_mangle]
pub unsafe extern "C" fn ioctl(fd: c_int, req: libc::c_ulong, arg: *mut c_void) -> c_int {
    let cmd = req as u32;
    let (off, fixed_cloexec) = match cmd {
        AMDKFD_IOC_SMI_EVENTS => (4usize, Some(false)),
        AMDKFD_IOC_EXPORT_DMABUF => (12usize, None),
        // SAFETY: the caller's arguments, unchanged.
        _ => return unsafe { next_ioctl()(fd, req, arg) },
    };
    let real = next_ioctl();
    let saved = errno();
    // Ask the file to park outgoing fds for us; anything but a kfdmux CUSE file refuses.
    // SAFETY: an argument-less private ioctl.
    if arg.is_null() || unsafe { real(fd, KFDMUX_IOC_FD_CHANNEL as _, std::ptr::null_mut()) } != 0 {
        set_errno(saved);
        // SAFETY: the caller's arguments, unchanged.
        return unsafe { real(fd, req, arg) };
    }
    // SAFETY: the caller's arguments, unchanged.
    let r = unsafe { real(fd, req, arg) };
    if r != 0 {
        return r;
    }
    let cloexec = fixed_cloexec.unwrap_or_else(|| {
        // SAFETY: EXPORT_DMABUF's struct is 16 bytes; flags is the u32 at offset 8.
        let flags = unsafe { std::ptr::read_unaligned((arg as *const u8).add(8) as *const u32) };
        flags & libc::O_CLOEXEC as u32 != 0
    });
    // SAFETY: `arg` is the caller's struct of the cmd's size.
    unsafe { fetch_parked(fd, arg.cast(), off, cloexec) }
}

/// `mmap(2)`: the real one, or — for a kfdmux file that cannot be mapped — its process memfd.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: the caller's arguments, unchanged.
    let p = unsafe { next_mmap()(addr, len, prot, flags, fd, off) };
    if p != libc::MAP_FAILED
        || fd < 0
        || flags & libc::MAP_ANONYMOUS != 0
        || errno() != libc::ENODEV
    {
        return p;
    }
    // SAFETY: as above.
    unsafe { redirect(addr, len, prot, flags, fd, off) }
}

/// `mmap64(2)`: the same function on 64-bit targets.
///
/// # Safety
/// As `mmap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: forwards the caller's arguments.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ioctl_number_matches_ior_k_f0_u64() {
        assert_eq!(KFDMUX_IOC_HANDOVER_TOKEN, 0x8008_4BF0);
        assert_eq!(KFDMUX_IOC_FD_CHANNEL, 0x0000_4BF1);
        assert_eq!(KFDMUX_IOC_PARKED_TOKEN, 0xC008_4BF2);
        assert_eq!(AMDKFD_IOC_SMI_EVENTS, 0xC008_4B1F);
        assert_eq!(AMDKFD_IOC_EXPORT_DMABUF, 0xC010_4B24);
    }

    #[test]
    fn other_ioctls_pass_through() {
        // SAFETY: FIONREAD on a fresh pipe writes one int.
        unsafe {
            let mut p = [0; 2];
            assert_eq!(libc::pipe(p.as_mut_ptr()), 0);
            let mut n: c_int = -1;
            assert_eq!(
                ioctl(p[0], libc::FIONREAD, (&mut n as *mut c_int).cast()),
                0
            );
            assert_eq!(n, 0);
            // SMI_EVENTS on a pipe: the channel ioctl is refused, the real call too (ENOTTY).
            let mut a = [0u32; 2];
            assert_eq!(
                ioctl(p[0], AMDKFD_IOC_SMI_EVENTS as _, a.as_mut_ptr().cast()),
                -1
            );
            assert_eq!(errno(), libc::ENOTTY);
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }

    #[test]
    fn ordinary_mappings_pass_through() {
        // SAFETY: anonymous mapping, unmapped below.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: p is a fresh 4096-byte mapping.
        unsafe { libc::munmap(p, 4096) };
    }

    #[test]
    fn dev_null_keeps_enodev() {
        // SAFETY: opens /dev/null and maps it (which fails), closing it after.
        unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            assert!(fd >= 0);
            let p = mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_eq!(p, libc::MAP_FAILED);
            assert_eq!(errno(), libc::ENODEV);
            libc::close(fd);
        }
    }
}
