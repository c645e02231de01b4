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
    let fuse = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            format!("opening /dev/fuse: {e} (the FUSE transport needs the fuse module and root)")
        })?;
    let fd: OwnedFd = fuse.into();
    use std::os::fd::AsRawFd;
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        fd.as_raw_fd()
    );
    sys::mount(
        "kfdmux",
        d,
        "fuse.kfdmux",
        libc::MS_NOSUID | libc::MS_NODEV,
        &opts,
    )
    .map_err(|e: Errno| format!("mounting FUSE on {d}: {e} (needs root / CAP_SYS_ADMIN)"))?;
    // The device number now, from mountinfo (a stat would need INIT to be answered first), so
    // the filesystem knows it before the first client can reach the files.
    Ok((fd, mountinfo_dev(dir).unwrap_or(0)))
}

/// `st_dev` of the newest kfdmux mount on `dir`, read from `/proc/self/mountinfo`.
fn mountinfo_dev(dir: &Path) -> Option<u64> {
    let canon = std::fs::canonicalize(dir.parent()?)
        .ok()?
        .join(dir.file_name()?);
    let want = canon
        .to_str()?
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        if f.get(4) != Some(&want.as_str()) || f.get(sep + 1) != Some(&"fuse.kfdmux") {
            return None;
        }
        let (maj, min) = f.get(2)?.split_once(':')?;
        Some(libc::makedev(maj.parse().ok()?, min.parse().ok()?))
    })
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
