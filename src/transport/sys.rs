//! Small syscall wrappers the transports need (pidfd, mount), each unsafe block in one place.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use crate::errno::Errno;

/// `pidfd_open(pid)`.
pub fn pidfd_open(pid: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall with integer arguments; a non-negative result is a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `r` is a freshly opened fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// A duplicate of process `pid`'s fd `fd` (`pidfd_getfd`); EBADF when it is not open.
pub fn take_fd(pid: u32, fd: i32) -> Result<OwnedFd, Errno> {
    if fd < 0 {
        return Err(Errno::EBADF);
    }
    let pidfd = pidfd_open(pid)?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall with integer arguments; a non-negative result is a new fd we own.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `r` is a freshly installed fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// (st_dev, st_ino) of an open fd from the inode's cached attributes: `statx` with
/// `AT_STATX_DONT_SYNC`, so a FUSE file (possibly our own) is not asked for GETATTR.
pub fn fd_identity(fd: i32) -> Result<(u64, u64), Errno> {
    // SAFETY: struct statx is plain old data; all-zero is a valid value.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty path with AT_EMPTY_PATH names `fd` itself; statx fills `sx`.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_INO,
            &mut sx,
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok((
        libc::makedev(sx.stx_dev_major, sx.stx_dev_minor),
        sx.stx_ino,
    ))
}

fn cstr(s: &str) -> Result<CString, Errno> {
    CString::new(s).map_err(|_| Errno::EINVAL)
}

/// `mount(2)`.
pub fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), Errno> {
    let (src, target, fstype, data) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr() as *const _,
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `umount2(2)`.
pub fn umount(target: &str, flags: libc::c_int) -> Result<(), Errno> {
    let t = cstr(target)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(t.as_ptr(), flags) } < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `statfs(2)` f_type of `path`.
pub fn fs_type(path: &str) -> Result<i64, Errno> {
    let p = cstr(path)?;
    // SAFETY: statfs fills one struct statfs; all-zero is a valid initial value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and a writable struct.
    if unsafe { libc::statfs(p.as_ptr(), &mut st) } < 0 {
        return Err(Errno::last());
    }
    Ok(st.f_type as i64)
}

/// `FUSE_SUPER_MAGIC`.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// How many CPUs the calling thread may run on (`sched_getaffinity`); None when unknown.
pub fn affinity_cpus() -> Option<usize> {
    // SAFETY: cpu_set_t is plain bits; the kernel writes at most the size we pass.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size given.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return None;
    }
    // SAFETY: counting bits of an initialised set.
    Some(unsafe { libc::CPU_COUNT(&set) } as usize)
}
