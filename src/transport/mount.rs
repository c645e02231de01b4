//! Mounting the FUSE-file transport.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::sys;
use crate::errno::Errno;

/// Opens `/dev/fuse` and mounts a kfdmux filesystem on `dir` (created if missing). A dead
/// kfdmux mount left there by a killed daemon (ENOTCONN) is detached first.
pub fn mount_fuse(dir: &Path) -> Result<(OwnedFd, u64), String> {
    let d = dir.to_str().ok_or("mount path is not UTF-8")?;
    if let Err(e) = std::fs::metadata(dir) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            log::warn!("{d}: a dead FUSE mount is in the way; detaching it");
            let _ = sys::umount(d, libc::MNT_DETACH);
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {d}: {e}"))?;
    let fuse = OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(|e| {
        format!("opening /dev/fuse: {e} (the FUSE transport needs the fuse module and root)")
    })?;
    let fd: OwnedFd = fuse.into();
    use std::os::fd::AsRawFd;
    let opts = format!("fd={},rootmode=40000,user_id=0,group_id=0,allow_other", fd.as_raw_fd());
    sys::mount("kfdmux", d, "fuse.kfdmux", libc::MS_NOSUID | libc::MS_NODEV, &opts)
        .map_err(|e: Errno| format!("mounting FUSE on {d}: {e} (needs root / CAP_SYS_ADMIN)"))?;
    Ok((fd, 0))
}

/// The device number of the mounted filesystem (after INIT completed, stat works).
pub fn mount_dev(dir: &Path) -> Option<u64> {
    std::fs::metadata(dir).ok().map(|m| m.dev())
}

/// Detaches the mount at `dir` (lazy: clients still holding files get ENOTCONN/ENODEV).
pub fn unmount(dir: &Path) {
    if let Some(d) = dir.to_str() {
        if let Err(e) = sys::umount(d, libc::MNT_DETACH) {
            log::debug!("unmounting {d}: {e}");
        }
    }
}
