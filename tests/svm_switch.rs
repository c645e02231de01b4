//! The SVM policy switch end to end: `kfdmux serve --svm` makes the topology advertise
//! SVMAPISupported and the sim accept AMDKFD_IOC_SVM; without it the bit is clear and the ioctl
//! answers EPERM (a kernel built without SVM). The two always agree. Needs root + /dev/fuse.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kfdmux::abi::*;
use kfdmux::topology::HSA_CAP_SVMAPI_SUPPORTED;

struct Serve {
    child: Child,
    mount: std::path::PathBuf,
    _dir: TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .stderr(Stdio::null())
            .status();
    }
}

fn serve(extra: &[&str]) -> Serve {
    let dir = TempDir::new("svm-switch");
    let mount = dir.path().join("m");
    let child = Command::new(kfdmux_bin())
        .args([
            "serve",
            "--transport",
            "fuse",
            "--gpus",
            "gfx90a:1",
            "--mount",
        ])
        .arg(&mount)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kfdmux serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(kfdmux::run::is_fuse_mount(&mount) && mount.join("kfd").exists()) {
        assert!(Instant::now() < deadline, "daemon did not mount");
        std::thread::sleep(Duration::from_millis(20));
    }
    Serve {
        child,
        mount,
        _dir: dir,
    }
}

fn capability_bit(sysfs: &Path) -> bool {
    let text = std::fs::read_to_string(sysfs.join("kfd/topology/nodes/1/properties"))
        .expect("node 1 properties");
    let props = kfdmux::sysfs::parse_properties(&text);
    let cap = kfdmux::sysfs::property(&props, "capability").expect("capability") as u32;
    cap & HSA_CAP_SVMAPI_SUPPORTED != 0
}

/// SVM SET_ATTR (PREFERRED_LOC = system memory) over two pages of our own memory.
fn svm_set_attr(kfd: &Path) -> Result<(), i32> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kfd)
        .expect("open kfd");
    let mem = vec![0u8; 3 * 4096];
    let start = (mem.as_ptr() as u64 + 4095) & !4095;
    // The fixed part then one attribute, as libhsakmt lays it out.
    let mut buf = [0u8; 24 + 8];
    buf[0..8].copy_from_slice(&start.to_le_bytes());
    buf[8..16].copy_from_slice(&(2 * 4096u64).to_le_bytes());
    buf[16..20].copy_from_slice(&KFD_IOCTL_SVM_OP_SET_ATTR.to_le_bytes());
    buf[20..24].copy_from_slice(&1u32.to_le_bytes());
    buf[24..28].copy_from_slice(&KFD_IOCTL_SVM_ATTR_PREFERRED_LOC.to_le_bytes());
    buf[28..32].copy_from_slice(&0u32.to_le_bytes());
    let cmd = AMDKFD_IOC_SVM + (8 << 16); // one attribute more in _IOC_SIZE
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is as large as the size the command encodes.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), cmd as _, buf.as_mut_ptr()) };
    drop(mem);
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(())
    }
}

#[test]
fn svm_bit_and_ioctl_agree() {
    if !require(is_root() && have_fuse(), "root and /dev/fuse") {
        return;
    }
    let off = serve(&[]);
    assert!(
        !capability_bit(&kfdmux::run::sysfs_dir_for(&off.mount)),
        "SVM bit clear by default"
    );
    assert_eq!(
        svm_set_attr(&off.mount.join("kfd")),
        Err(libc::EPERM),
        "SVM refused by default"
    );
    drop(off);
    let on = serve(&["--svm"]);
    assert!(
        capability_bit(&kfdmux::run::sysfs_dir_for(&on.mount)),
        "SVM bit set with --svm"
    );
    assert_eq!(
        svm_set_attr(&on.mount.join("kfd")),
        Ok(()),
        "SVM accepted with --svm"
    );
}
