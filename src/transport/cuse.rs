//! The CUSE transport: one character device per file (`/dev/<NAME>` for kfd and
//! `/dev/<dir of NAME>/dri/renderD<minor>` per GPU), each its own `/dev/cuse` channel. Ioctls
//! are unrestricted: pointed-to memory moves with `FUSE_IOCTL_RETRY` rounds (see
//! `Mux::ioctl_unrestricted`). CUSE has no mmap (ENODEV); see docs/cuse.md.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use super::engine::{Filesystem, IoctlArgs, IoctlReply, Opened, Request};
use super::wire::*;
use crate::abi::table::{ioc_size, ioc_type, KFD_IOC_TYPE};
use crate::device::{Caller, Env, FileKind};
use crate::errno::Errno;
use crate::handover::{private_ioctl, ParkingEnv, KFDMUX_IOC_FD_CHANNEL, KFDMUX_IOC_PARKED_TOKEN};
use crate::mux::{tgid_of, Mux};

/// The device numbers of this daemon's CUSE nodes, to recognise them among a client's fds.
#[derive(Default)]
pub struct CuseEnv {
    rdevs: Mutex<Vec<(u64, FileKind)>>,
}

impl CuseEnv {
    pub fn add(&self, rdev: u64, kind: FileKind) {
        if let Ok(mut v) = self.rdevs.lock() {
            v.push((rdev, kind));
        }
    }
}

impl Env for CuseEnv {
    fn file_of_fd(&self, caller: &Caller, fd: i32) -> Result<Option<(FileKind, u32)>, Errno> {
        let file = super::sys::take_fd(caller.tgid, fd)?;
        // SAFETY: struct stat is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one struct stat into `st`.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } < 0 {
            return Err(Errno::last());
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFCHR {
            return Ok(None);
        }
        let v = self.rdevs.lock().map_err(|_| Errno::EIO)?;
        Ok(v.iter()
            .find(|(r, _)| *r == st.st_rdev)
            .map(|(_, k)| (*k, caller.tgid)))
    }
}

/// One CUSE device node.
pub struct CuseFs {
    pub mux: Arc<Mux>,
    pub kind: FileKind,
    pub env: Arc<CuseEnv>,
}

impl CuseFs {
    /// The preload channel's private ioctls (docs/cuse-mmap.md): the opener check as for every
    /// ioctl, one retry round for the 8-byte slot of KFDMUX_IOC_PARKED_TOKEN.
    fn channel_ioctl(&self, req: &Request, args: &IoctlArgs, in_data: &[u8], reply: IoctlReply) {
        let (file, caller) = match self.mux.caller_file(args.fh, req.pid) {
            Ok(fc) => fc,
            Err(e) => return reply.error(e),
        };
        let size = ioc_size(args.cmd) as usize;
        if args.flags & FUSE_IOCTL_UNRESTRICTED != 0 && in_data.len() < size {
            let iov = IoctlIovec {
                base: args.arg,
                len: size as u64,
            };
            return reply.retry(std::slice::from_ref(&iov), std::slice::from_ref(&iov));
        }
        match private_ioctl(&self.mux.tokens, file.id, &caller, args.cmd, in_data) {
            Some(Ok(out)) => reply.ok(0, &out[..out.len().min(args.out_size as usize)]),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOTTY),
        }
    }
}

impl Filesystem for CuseFs {
    fn single_reader(&self) -> bool {
        self.mux.device.answers_in_place()
    }

    fn open(&self, req: &Request, _nodeid: u64, _flags: u32) -> Result<Opened, Errno> {
        let tgid = tgid_of(req.pid).ok_or(Errno::ESRCH)?;
        let caller = Caller {
            pid: req.pid,
            tgid,
            uid: req.uid,
            gid: req.gid,
        };
        let fh = self.mux.open(caller, self.kind)?;
        Ok(Opened {
            fh,
            open_flags: FOPEN_DIRECT_IO | FOPEN_NONSEEKABLE,
            backing_id: 0,
        })
    }

    fn release(&self, _req: &Request, _nodeid: u64, fh: u64) {
        let id = self.mux.file(fh).map(|f| f.id);
        self.mux.release(fh);
        // Fds parked for the preload channel and never fetched die with the file.
        if let Some(id) = id {
            self.mux.tokens.file_closed(id);
        }
    }

    fn ioctl(&self, req: &Request, args: IoctlArgs, in_data: &[u8], reply: IoctlReply) {
        if args.flags & (FUSE_IOCTL_COMPAT | FUSE_IOCTL_32BIT | FUSE_IOCTL_COMPAT_X32) != 0 {
            // KFD refuses 32-bit callers (at open, which CUSE cannot tell; here instead).
            log::info!("32-bit ioctl from pid {}: EPERM", req.pid);
            return reply.error(Errno::EPERM);
        }
        if ioc_type(args.cmd) == KFD_IOC_TYPE
            && matches!(args.cmd, KFDMUX_IOC_FD_CHANNEL | KFDMUX_IOC_PARKED_TOKEN)
        {
            return self.channel_ioctl(req, &args, in_data, reply);
        }
        // Fds going out of this file's ioctls are parked for the preload library, if its
        // opener announced the channel.
        let parking = ParkingEnv {
            base: &*self.env,
            mux: &self.mux,
            fh: args.fh,
        };
        let env: &dyn Env = &parking;
        if args.flags & FUSE_IOCTL_UNRESTRICTED != 0 {
            self.mux.ioctl_unrestricted(
                env,
                req.pid,
                args.fh,
                args.cmd,
                args.arg,
                in_data,
                args.out_size,
                reply,
            )
        } else {
            self.mux.ioctl_restricted(
                env,
                req.pid,
                args.fh,
                args.cmd,
                in_data,
                args.out_size,
                reply,
            )
        }
    }

    fn poll(&self, _req: &Request, _fh: u64, _kh: Option<u64>, _events: u32) -> Result<u32, Errno> {
        Ok((libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM) as u32)
    }
}

/// Opens `/dev/cuse`, saying plainly what to do when it is missing.
pub fn open_cuse() -> Result<OwnedFd, String> {
    match OpenOptions::new().read(true).write(true).open("/dev/cuse") {
        Ok(f) => Ok(f.into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(
            "/dev/cuse does not exist: this kernel has no CUSE loaded. Try `modprobe cuse` \
             (needs CONFIG_CUSE), or use the FUSE transport: `kfdmux serve --transport fuse --mount DIR`"
                .into(),
        ),
        Err(e) => Err(format!("opening /dev/cuse: {e} (the CUSE transport needs root)")),
    }
}

/// The sysfs name of a CUSE device (`/` in DEVNAME becomes `!`).
pub fn sysfs_name(devname: &str) -> String {
    devname.replace('/', "!")
}

/// The device number the kernel gave CUSE device `devname`, once it is registered.
pub fn cuse_rdev(devname: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/sys/class/cuse/{}/dev", sysfs_name(devname))).ok()?;
    let (ma, mi) = s.trim().split_once(':')?;
    Some(libc::makedev(ma.parse().ok()?, mi.parse().ok()?))
}

/// Aborts the connection of CUSE device `devname` (as fusectl's abort does for FUSE).
pub fn abort(devname: &str) {
    let p = format!("/sys/class/cuse/{}/abort", sysfs_name(devname));
    if let Err(e) = std::fs::write(&p, "1") {
        log::debug!("{p}: {e}");
    }
}

/// The render-node DEVNAME that goes with kfd DEVNAME `name`: `dri/renderD<minor>` beside it.
pub fn render_devname(name: &str, minor: u32) -> String {
    match name.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/dri/renderD{minor}"),
        None => format!("dri/renderD{minor}"),
    }
}
