//! `kfdmux run [--gpus SPEC] [-- CMD]`: run an unmodified ROCm program against kfdmux.
//!
//! The parent (which stays in the host's mount namespace) starts a daemon unless `--daemon DIR`
//! names a running one, then forks a child that enters a private mount namespace and builds
//! *shadow* directories over `/dev`, `/sys/devices/virtual`, `/sys/class` and `/sys/module`:
//! a tmpfs holding every original entry (directories and device nodes bind-mounted back,
//! symlinks copied) plus kfdmux's entries. Nothing is ever created in the host's devtmpfs or
//! sysfs; everything lives on tmpfs mounts that only the namespace sees.
//!
//! `/dev/kfd` and `/dev/dri/renderD<minor>` are *symlinks* to the daemon's FUSE files: the
//! daemon tells client processes apart by inode, which it hands out per process on LOOKUP, so
//! every open must walk the path (a bind mount would pin one inode for everybody).

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Options of `kfdmux run` (flattened into the CLI by `main.rs`).
#[derive(Debug, Clone, clap::Args)]
pub struct RunOptions {
    /// GPUs of the daemon kfdmux starts, e.g. `gfx90a:2` or `gfx90a,gfx1030`
    /// (ignored with --daemon).
    #[arg(long, value_name = "SPEC", default_value = "gfx90a:2")]
    pub gpus: String,
    /// Use the running daemon whose FUSE mount is DIR (topology in `DIR.sysfs`)
    /// instead of starting one.
    #[arg(long, value_name = "DIR")]
    pub daemon: Option<PathBuf>,
    /// How the daemon kfdmux starts serves the device: FUSE files (needs kernel ≥ 6.9 for
    /// mmap) or CUSE character devices (needs CONFIG_CUSE; mmap through the preload library,
    /// which `run` puts in LD_PRELOAD).
    #[arg(long, value_enum, default_value = "fuse")]
    pub transport: crate::daemon::Transport,
    /// The device below the daemon kfdmux starts: the simulated KFD, or the kernel's KFD
    /// forwarded (`kfd`; then CMD gets HSA_USERPTR_FOR_PAGED_MEM=0, because secondary
    /// contexts refuse USERPTR — also set with --daemon when that daemon forwards /dev/kfd).
    #[arg(long, value_enum, default_value = "sim")]
    pub device: crate::daemon::DeviceKind,
    /// With `--device kfd`: the KFD to forward (default /dev/kfd).
    #[arg(long, value_name = "PATH")]
    pub kfd_path: Option<PathBuf>,
    /// Run CMD as USER (a name, UID or UID:GID). Default: the user who ran sudo
    /// (SUDO_UID/SUDO_GID) when running as root through sudo, otherwise the current ids.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Keep HOME, USER and LOGNAME as they are when switching to another user
    /// (by default they are set from that user's passwd entry).
    #[arg(long)]
    pub keep_env: bool,
    /// The command to run and its arguments.
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        num_args = 1..,
        default_value = "rocminfo"
    )]
    pub cmd: Vec<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            gpus: "gfx90a:2".into(),
            daemon: None,
            transport: crate::daemon::Transport::Fuse,
            device: crate::daemon::DeviceKind::Sim,
            kfd_path: None,
            user: None,
            keep_env: false,
            cmd: vec!["rocminfo".into()],
        }
    }
}

/// Where kfdmux's files are, and what the namespace needs to put them in place.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The daemon's FUSE mount: holds `kfd` and `renderD<minor>`.
    pub mount: PathBuf,
    /// The daemon's sysfs tree: `kfd/topology/...` and `module/amdgpu/{initstate,version}`.
    pub sysfs: PathBuf,
    /// Render minors to link as `/dev/dri/renderD<minor>`.
    pub render_minors: Vec<u32>,
    /// An empty directory the namespace mounts a tmpfs on, for the fake `lsmod`; put first on
    /// CMD's PATH.
    pub bin_dir: PathBuf,
    /// An empty directory used to assemble shadow directories before moving them in place.
    pub stage: PathBuf,
}

/// An entry a shadow directory adds (or replaces) beside the original entries.
#[derive(Debug, Clone)]
pub enum Extra {
    /// `name` → `target` symlink.
    Symlink { name: String, target: PathBuf },
    /// `name`, bind-mounted (recursively) from `from`; a directory or a file.
    Bind { name: String, from: PathBuf },
    /// A fresh directory `name` holding the entries of `copy_of` (if given) plus `extras`.
    Dir {
        name: String,
        copy_of: Option<PathBuf>,
        extras: Vec<Extra>,
    },
}

impl Extra {
    fn name(&self) -> &str {
        match self {
            Extra::Symlink { name, .. } | Extra::Bind { name, .. } | Extra::Dir { name, .. } => {
                name
            }
        }
    }
}

/// The sysfs directory that belongs to a daemon mounted at `mount` (`<mount>.sysfs`, the
/// daemon's default for `--sysfs-out`).
pub fn sysfs_dir_for(mount: &Path) -> PathBuf {
    let mut s = mount.as_os_str().as_bytes();
    while s.len() > 1 && s.ends_with(b"/") {
        s = &s[..s.len() - 1];
    }
    let mut v = s.to_vec();
    v.extend_from_slice(b".sysfs");
    PathBuf::from(OsString::from_vec(v))
}

/// Is `path` the mount point of a FUSE filesystem in this process's mount namespace?
///
/// Read from `/proc/self/mountinfo` rather than `statfs`, so it needs no answer from the
/// daemon (which may not be serving yet).
pub fn is_fuse_mount(path: &Path) -> bool {
    let Ok(canon) = fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = fs::read("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.as_os_str().as_bytes();
    for line in info.split(|&b| b == b'\n') {
        // id parent maj:min root mountpoint options [optional...] - fstype source superopts
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        if fields.len() < 5 || unescape_mountinfo(fields[4]) != want {
            continue;
        }
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        if let Some(fstype) = fields.get(dash + 1) {
            if *fstype == b"fuse" || fstype.starts_with(b"fuse.") {
                return true;
            }
        }
    }
    false
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                out.push((oct[0] - b'0') * 64 + (oct[1] - b'0') * 8 + (oct[2] - b'0'));
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The render minors the daemon at `mount` serves: its `renderD<minor>` files, sorted.
pub fn render_minors(mount: &Path) -> io::Result<Vec<u32>> {
    let mut minors = Vec::new();
    for entry in fs::read_dir(mount)? {
        let entry = entry?;
        if let Some(m) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("renderD"))
            .and_then(|m| m.parse::<u32>().ok())
        {
            minors.push(m);
        }
    }
    minors.sort_unstable();
    Ok(minors)
}

/// The fake `lsmod` put first on CMD's PATH: the host's list (if it has one) plus `amdgpu`,
/// which kfdmux stands in for. rocminfo 5.2.3 gates on `popen("lsmod | grep amdgpu")`.
pub fn lsmod_script(real_lsmod: Option<&Path>) -> String {
    let real = match real_lsmod {
        Some(p) => format!("out=$('{}' 2>/dev/null) || out=", p.display()),
        None => "out=".to_string(),
    };
    format!(
        "#!/bin/sh\n\
         # kfdmux run: the host's modules plus amdgpu, served by kfdmux in this namespace.\n\
         {real}\n\
         [ -n \"$out\" ] || out='Module                  Size  Used by'\n\
         printf '%s\\n' \"$out\"\n\
         printf '%s\\n' \"$out\" | grep -q '^amdgpu ' || \
         echo 'amdgpu                      0  0'\n"
    )
}

/// The ids CMD runs with, and the groups to set (None: keep everything as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Login name and home from passwd, if the uid has an entry.
    pub name: Option<String>,
    pub home: Option<PathBuf>,
}

/// Who CMD should run as: `--user` if given, else the sudo caller (`SUDO_UID`/`SUDO_GID`,
/// honoured only when we are root), else `None` = keep the current ids.
pub fn target_user(
    user: Option<&str>,
    euid: u32,
    sudo_uid: Option<&str>,
    sudo_gid: Option<&str>,
) -> Result<Option<TargetUser>, String> {
    let (uid, gid) = if let Some(spec) = user {
        let (u, g) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let (uid, pw_gid) = match u.parse::<u32>() {
            Ok(uid) => (uid, passwd_by_uid(uid).map(|p| p.gid)),
            Err(_) => {
                let p = passwd_by_name(u).ok_or_else(|| format!("--user: no user named {u:?}"))?;
                (p.uid, Some(p.gid))
            }
        };
        let gid = match g {
            Some(g) => g
                .parse::<u32>()
                .map_err(|_| format!("--user: bad group id {g:?}"))?,
            None => pw_gid.unwrap_or(uid),
        };
        (uid, gid)
    } else {
        let Some(su) = sudo_uid.filter(|_| euid == 0) else {
            return Ok(None);
        };
        let uid = su
            .parse::<u32>()
            .map_err(|_| format!("SUDO_UID is not a number: {su:?}"))?;
        if uid == 0 {
            return Ok(None);
        }
        let gid = match sudo_gid.map(str::parse::<u32>) {
            Some(Ok(g)) => g,
            _ => passwd_by_uid(uid).map(|p| p.gid).unwrap_or(uid),
        };
        (uid, gid)
    };
    let pw = passwd_by_uid(uid);
    let groups = match &pw {
        Some(p) => group_list(&p.name, gid),
        None => vec![gid],
    };
    Ok(Some(TargetUser {
        uid,
        gid,
        groups,
        name: pw.as_ref().map(|p| p.name.to_string_lossy().into_owned()),
        home: pw.map(|p| p.home),
    }))
}

struct Passwd {
    name: CString,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

fn passwd_lookup(
    by: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> Option<Passwd> {
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: passwd is plain data; zeroed is a valid (empty) value to be filled in.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = by(&mut pw, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success pw_name/pw_dir point to NUL-terminated strings inside `buf`.
        let (name, home) = unsafe { (CStr::from_ptr(pw.pw_name), CStr::from_ptr(pw.pw_dir)) };
        return Some(Passwd {
            name: name.to_owned(),
            uid: pw.pw_uid,
            gid: pw.pw_gid,
            home: PathBuf::from(OsStr::from_bytes(home.to_bytes())),
        });
    }
}

fn passwd_by_uid(uid: u32) -> Option<Passwd> {
    // SAFETY: getpwuid_r writes only into the passwd struct and buffer it is given.
    passwd_lookup(|pw, buf, len, res| unsafe { libc::getpwuid_r(uid, pw, buf, len, res) })
}

fn passwd_by_name(name: &str) -> Option<Passwd> {
    let c = CString::new(name).ok()?;
    // SAFETY: as above; `c` outlives the call.
    passwd_lookup(|pw, buf, len, res| unsafe { libc::getpwnam_r(c.as_ptr(), pw, buf, len, res) })
}

/// Supplementary groups of `name` (always including `gid`).
fn group_list(name: &CStr, gid: u32) -> Vec<u32> {
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: `groups` has room for `count` entries; getgrouplist updates `count`.
        let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if rc >= 0 {
            groups.truncate(count.max(0) as usize);
            return groups;
        }
        if count <= n || count > 65536 {
            return vec![gid];
        }
        n = count;
    }
}

/// Does this process have CAP_SYS_ADMIN (needed for unshare(CLONE_NEWNS) and mount)?
fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        // SAFETY: geteuid has no preconditions.
        return unsafe { libc::geteuid() } == 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{}: path contains NUL", p.display()))
}

fn errno_str() -> io::Error {
    io::Error::last_os_error()
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let c_src = src.map(cstr).transpose()?;
    let c_dst = cstr(dst)?;
    let c_type = fstype.map(|t| CString::new(t).unwrap_or_default());
    let c_data = data.map(|d| CString::new(d).unwrap_or_default());
    let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            c_src.as_ref().map_or(c"none".as_ptr(), |c| c.as_ptr()),
            c_dst.as_ptr(),
            p(&c_type),
            flags,
            p(&c_data) as *const libc::c_void,
        )
    };
    if rc != 0 {
        let e = errno_str();
        return Err(format!(
            "mount {} on {} (flags {flags:#x}): {e}",
            src.map_or_else(
                || fstype.unwrap_or("none").to_string(),
                |s| s.display().to_string()
            ),
            dst.display()
        ));
    }
    Ok(())
}

/// Fill `dst` (an empty directory on a tmpfs) with the entries of `src` — directories and
/// non-directories bind-mounted back, symlinks copied — except those `extras` replace, then
/// add `extras`.
fn populate(dst: &Path, src: Option<&Path>, extras: &[Extra]) -> Result<(), String> {
    let replaced: HashSet<&str> = extras.iter().map(Extra::name).collect();
    if let Some(src) = src {
        let entries = fs::read_dir(src).map_err(|e| format!("read {}: {e}", src.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("read {}: {e}", src.display()))?;
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| replaced.contains(n)) {
                continue;
            }
            let from = src.join(&name);
            let to = dst.join(&name);
            if let Err(e) = recreate(&from, &to) {
                // Device nodes come and go (udev); one vanished entry is not worth failing for.
                log::warn!("kfdmux run: leaving out {}: {e}", from.display());
                let _ = fs::remove_file(&to).or_else(|_| fs::remove_dir(&to));
            }
        }
    }
    for extra in extras {
        add_extra(dst, extra)?;
    }
    Ok(())
}

fn recreate(from: &Path, to: &Path) -> Result<(), String> {
    let meta = fs::symlink_metadata(from).map_err(|e| format!("lstat: {e}"))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(from).map_err(|e| format!("readlink: {e}"))?;
        std::os::unix::fs::symlink(target, to).map_err(|e| format!("symlink: {e}"))
    } else if ft.is_dir() {
        fs::create_dir(to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
        let _ = fs::set_permissions(
            to,
            fs::Permissions::from_mode(meta.permissions().mode() & 0o7777),
        );
        mount(Some(from), to, None, libc::MS_BIND | libc::MS_REC, None)
    } else {
        // Files, device nodes, sockets, fifos: an empty file as the mount point, the original
        // bound onto it (the node keeps its own mount's flags, so devices stay usable).
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(|e| format!("create {}: {e}", to.display()))?;
        mount(Some(from), to, None, libc::MS_BIND | libc::MS_REC, None)
    }
}

fn add_extra(dst: &Path, extra: &Extra) -> Result<(), String> {
    let to = dst.join(extra.name());
    match extra {
        Extra::Symlink { target, .. } => std::os::unix::fs::symlink(target, &to)
            .map_err(|e| format!("symlink {} -> {}: {e}", to.display(), target.display())),
        Extra::Bind { from, .. } => {
            let meta = fs::metadata(from).map_err(|e| format!("{}: {e}", from.display()))?;
            if meta.is_dir() {
                fs::create_dir(&to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
            } else {
                fs::File::create(&to).map_err(|e| format!("create {}: {e}", to.display()))?;
            }
            mount(Some(from), &to, None, libc::MS_BIND | libc::MS_REC, None)
        }
        Extra::Dir {
            copy_of, extras, ..
        } => {
            fs::create_dir(&to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
            let _ = fs::set_permissions(&to, fs::Permissions::from_mode(0o755));
            populate(&to, copy_of.as_deref(), extras)
        }
    }
}

/// Replace `target` (in this mount namespace, which must be private) by a tmpfs holding its
/// original entries plus `extras`. The tmpfs is assembled at `stage` (an empty directory
/// outside `target`) and moved onto `target` in one step.
pub fn shadow(
    target: &Path,
    stage: &Path,
    extras: &[Extra],
    tmpfs_opts: &str,
) -> Result<(), String> {
    let mode = fs::metadata(target)
        .map_err(|e| format!("{}: {e}", target.display()))?
        .permissions()
        .mode()
        & 0o7777;
    let opts = format!("mode={mode:o},{tmpfs_opts}");
    mount(None, stage, Some("tmpfs"), libc::MS_NOSUID, Some(&opts))
        .map_err(|e| format!("shadow {}: {e}", target.display()))?;
    let filled = populate(stage, Some(target), extras)
        .and_then(|()| mount(Some(stage), target, None, libc::MS_MOVE, None));
    if let Err(e) = filled {
        let c = cstr(stage)?;
        // SAFETY: c is a valid path; detaching our own staging tmpfs.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        return Err(format!("shadow {}: {e}", target.display()));
    }
    Ok(())
}

/// Turn this process's view into kfdmux's: private mount namespace, `/dev/kfd` and
/// `/dev/dri/renderD<minor>` symlinked to the FUSE files, the topology at
/// `/sys/devices/virtual/kfd/kfd` (+ `/sys/class/kfd/kfd`), `/sys/module/amdgpu`, and the
/// fake `lsmod` in `layout.bin_dir`. Meant for a freshly forked child; the host is untouched.
pub fn enter_namespace(layout: &Layout, real_lsmod: Option<&Path>) -> Result<(), String> {
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        let e = errno_str();
        return Err(format!(
            "cannot create a mount namespace ({e}): kfdmux run needs root (CAP_SYS_ADMIN)"
        ));
    }
    // Nothing we mount from here on may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;

    // A tmpfs of our own for the lsmod script: exec works even if /tmp is noexec.
    mount(
        None,
        &layout.bin_dir,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=755,size=64k"),
    )?;
    let lsmod = layout.bin_dir.join("lsmod");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&lsmod)
        .and_then(|mut f| f.write_all(lsmod_script(real_lsmod).as_bytes()))
        .map_err(|e| format!("write {}: {e}", lsmod.display()))?;

    let sys = &layout.sysfs;
    let kfd_topology = sys.join("kfd");
    if !kfd_topology.join("topology").is_dir() {
        return Err(format!(
            "{}: no topology tree (kfd/topology)",
            sys.display()
        ));
    }
    let host_dri = Path::new("/dev/dri");
    let mut dri = Vec::new();
    for m in &layout.render_minors {
        let name = format!("renderD{m}");
        dri.push(Extra::Symlink {
            target: layout.mount.join(&name),
            name,
        });
    }
    let dev_extras = vec![
        Extra::Symlink {
            name: "kfd".into(),
            target: layout.mount.join("kfd"),
        },
        Extra::Dir {
            name: "dri".into(),
            copy_of: host_dri.is_dir().then(|| host_dri.to_path_buf()),
            extras: dri,
        },
    ];
    shadow(Path::new("/dev"), &layout.stage, &dev_extras, "size=1m")?;

    let virtual_extras = vec![Extra::Dir {
        name: "kfd".into(),
        copy_of: None,
        extras: vec![Extra::Bind {
            name: "kfd".into(),
            from: kfd_topology,
        }],
    }];
    shadow(
        Path::new("/sys/devices/virtual"),
        &layout.stage,
        &virtual_extras,
        "size=64k",
    )?;

    // Real sysfs: /sys/class/kfd/kfd -> ../../devices/virtual/kfd/kfd (rocm-smi reads this one).
    let class_extras = vec![Extra::Dir {
        name: "kfd".into(),
        copy_of: None,
        extras: vec![Extra::Symlink {
            name: "kfd".into(),
            target: PathBuf::from("../../devices/virtual/kfd/kfd"),
        }],
    }];
    shadow(
        Path::new("/sys/class"),
        &layout.stage,
        &class_extras,
        "size=64k",
    )?;

    let amdgpu = sys.join("module/amdgpu");
    if amdgpu.is_dir() {
        let module_extras = vec![Extra::Bind {
            name: "amdgpu".into(),
            from: amdgpu,
        }];
        shadow(
            Path::new("/sys/module"),
            &layout.stage,
            &module_extras,
            "size=64k",
        )?;
    } else {
        log::warn!(
            "kfdmux run: {} missing; /sys/module/amdgpu not provided",
            amdgpu.display()
        );
    }
    Ok(())
}

/// Find `prog` the way execvp would, in `path` (a PATH value).
fn resolve_command(prog: &str, path: &OsStr) -> Option<PathBuf> {
    if prog.contains('/') {
        return Some(PathBuf::from(prog));
    }
    std::env::split_paths(path)
        .map(|d| d.join(prog))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The host's `lsmod` (not ours), for the fake one to include its output.
fn find_real_lsmod(path: &OsStr) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::split_paths(path).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("lsmod"))
        .find(|p| p.is_file())
        .and_then(|p| fs::canonicalize(&p).ok().map(|_| p))
}

/// A private temporary directory (0755 so the target user can reach the mount inside).
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<WorkDir, String> {
        let tmpl = std::env::temp_dir().join("kfdmux-run.XXXXXX");
        let mut bytes = tmpl.into_os_string().into_vec();
        bytes.push(0);
        // SAFETY: `bytes` is a writable NUL-terminated template that mkdtemp fills in.
        let p = unsafe { libc::mkdtemp(bytes.as_mut_ptr() as *mut libc::c_char) };
        if p.is_null() {
            return Err(format!(
                "cannot create a temporary directory: {}",
                errno_str()
            ));
        }
        bytes.pop();
        let dir = PathBuf::from(OsString::from_vec(bytes));
        let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
        for sub in ["bin", "stage"] {
            fs::create_dir(dir.join(sub))
                .map_err(|e| format!("mkdir in {}: {e}", dir.display()))?;
        }
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            log::warn!("kfdmux run: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// A daemon this `kfdmux run` started; stopped (and its mount gone) on drop.
struct DaemonChild {
    child: Child,
    mount: PathBuf,
    log: Option<PathBuf>,
    /// CUSE: the device nodes that must exist before CMD starts.
    cuse_nodes: Vec<PathBuf>,
}

impl DaemonChild {
    fn start(
        exe: &Path,
        gpus: &str,
        mount: &Path,
        sysfs: &Path,
        log: &Path,
        cuse: Option<&CuseRun>,
        kfd: Option<&Path>,
    ) -> Result<DaemonChild, String> {
        let mut cmd = Command::new(exe);
        cmd.arg("serve");
        if let Some(path) = kfd {
            cmd.arg("--device").arg("kfd").arg("--kfd-path").arg(path);
        }
        match cuse {
            None => {
                if !Path::new("/dev/fuse").exists() {
                    return Err("/dev/fuse is missing: load the fuse module (modprobe fuse) or pass it into the container".into());
                }
                fs::create_dir(mount).map_err(|e| format!("mkdir {}: {e}", mount.display()))?;
                cmd.arg("--transport").arg("fuse").arg("--mount").arg(mount);
            }
            Some(c) => {
                cmd.arg("--transport")
                    .arg("cuse")
                    .arg("--name")
                    .arg(&c.name)
                    .arg("--handover-socket")
                    .arg(&c.socket);
            }
        }
        cmd.arg("--gpus")
            .arg(gpus)
            .arg("--sysfs-out")
            .arg(sysfs)
            .stdin(Stdio::null())
            // Its own process group: a Ctrl-C for CMD must not take the daemon down under it.
            .process_group(0);
        let log = if std::env::var_os("RUST_LOG").is_some() {
            None // the user asked for logs: let them reach the terminal
        } else {
            let f = fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
            let f2 = f.try_clone().map_err(|e| e.to_string())?;
            cmd.stdout(f).stderr(f2);
            Some(log.to_path_buf())
        };
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the daemon {}: {e}", exe.display()))?;
        let mut d = DaemonChild {
            child,
            mount: mount.to_path_buf(),
            log,
            cuse_nodes: cuse.map(|c| c.nodes.clone()).unwrap_or_default(),
        };
        d.wait_ready(sysfs)?;
        Ok(d)
    }

    fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|l| fs::read_to_string(l).ok())
            .map(|t| {
                if t.trim().is_empty() {
                    String::new()
                } else {
                    format!("; its output:\n{}", t.trim_end())
                }
            })
            .unwrap_or_default()
    }

    fn wait_ready(&mut self, sysfs: &Path) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "the kfdmux daemon failed to start ({status}){}",
                    self.log_text()
                ));
            }
            let ready = if self.cuse_nodes.is_empty() {
                is_fuse_mount(&self.mount) && self.mount.join("kfd").exists()
            } else {
                self.cuse_nodes.iter().all(|n| n.exists())
            };
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the kfdmux daemon did not mount {} within 10 s{}",
                    self.mount.display(),
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !sysfs.join("kfd/topology").is_dir() {
            return Err(format!(
                "the kfdmux daemon wrote no topology into {}",
                sysfs.display()
            ));
        }
        Ok(())
    }

    /// SIGTERM, wait (the daemon unmounts), escalate if needed. Returns the daemon's status.
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = None;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    status = Some(s);
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        if status.is_none() {
            log::warn!("kfdmux run: the daemon ignored SIGTERM; killing it");
            let _ = self.child.kill();
            status = self.child.wait().ok();
        }
        if is_fuse_mount(&self.mount) {
            if let Ok(c) = cstr(&self.mount) {
                // SAFETY: c is a valid path; a lazy unmount of the mount we started.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        status
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A CUSE daemon `kfdmux run` starts: its device names and hand-over socket.
struct CuseRun {
    /// DEVNAME of the kfd node (`kfdmux-run-<pid>/kfd`).
    name: String,
    socket: PathBuf,
    /// `/dev/<name>` and each `/dev/<dir>/dri/renderD<minor>`.
    nodes: Vec<PathBuf>,
}

impl CuseRun {
    fn new(gpus: &str, work: &Path) -> Result<CuseRun, String> {
        if !Path::new("/dev/cuse").exists() {
            return Err("/dev/cuse is missing: this kernel has no CUSE loaded; try `modprobe cuse`, or use --transport fuse".into());
        }
        let name = format!("kfdmux-run-{}/kfd", std::process::id());
        let mut nodes = vec![Path::new("/dev").join(&name)];
        for g in crate::topology::parse_gpus(gpus)? {
            nodes.push(
                Path::new("/dev").join(crate::transport::cuse::render_devname(
                    &name,
                    g.render_minor,
                )),
            );
        }
        Ok(CuseRun {
            name,
            socket: work.join("handover.sock"),
            nodes,
        })
    }
}

/// CMD's pid, for the parent's SIGTERM/SIGHUP handler to forward to.
static CMD_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CMD_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Signal dispositions of the parent while CMD runs (restored on drop): Ctrl-C / Ctrl-\ reach
/// CMD from the terminal and are ignored here so we can clean up; SIGTERM/SIGHUP are passed on.
struct ParentSignals(Vec<(libc::c_int, libc::sigaction)>);

impl ParentSignals {
    fn install() -> ParentSignals {
        let mut saved = Vec::new();
        for (sig, handler) in [
            (libc::SIGINT, libc::SIG_IGN),
            (libc::SIGQUIT, libc::SIG_IGN),
            (
                libc::SIGTERM,
                forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            ),
            (
                libc::SIGHUP,
                forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            ),
        ] {
            // SAFETY: sigaction structs are plain data; we pass valid pointers.
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                let mut old: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = handler;
                new.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut new.sa_mask);
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    saved.push((sig, old));
                }
            }
        }
        ParentSignals(saved)
    }
}

impl Drop for ParentSignals {
    fn drop(&mut self) {
        for (sig, old) in &self.0 {
            // SAFETY: restoring a disposition previously returned by sigaction.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
        CMD_PID.store(0, Ordering::Relaxed);
    }
}

/// Everything the forked child needs, prepared before the fork.
struct Exec {
    prog: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    user: Option<TargetUser>,
}

/// In the child: reset signals, switch user, exec. Returns only on failure.
fn exec_child(x: &Exec) -> String {
    // SAFETY: restoring default dispositions and an empty mask before exec; plain libc calls.
    unsafe {
        for sig in [
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGPIPE,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    if let Some(u) = &x.user {
        let groups: Vec<libc::gid_t> = u.groups.clone();
        // SAFETY: `groups` is a valid array of `groups.len()` gids.
        if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
            return format!("setgroups: {}", errno_str());
        }
        // SAFETY: plain id changes; gid first, while we may still change it.
        if unsafe { libc::setgid(u.gid) } != 0 {
            return format!("setgid({}): {}", u.gid, errno_str());
        }
        // SAFETY: as above.
        if unsafe { libc::setuid(u.uid) } != 0 {
            return format!("setuid({}): {}", u.uid, errno_str());
        }
    }
    let argv: Vec<*const libc::c_char> = x
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = x
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe { libc::execve(x.prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    format!("cannot run {}: {}", x.prog.to_string_lossy(), errno_str())
}

/// Fork a child that enters kfdmux's namespace and execs the command; wait for it.
/// Returns its exit status (128+N when killed by signal N), or the child's setup error.
fn spawn_in_namespace(layout: &Layout, real_lsmod: Option<&Path>, x: &Exec) -> Result<i32, String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds has room for the two descriptors pipe2 returns.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", errno_str()));
    }
    // SAFETY: pipe2 just returned these fds; we own them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let signals = ParentSignals::install();
    // SAFETY: fork; the child only runs enter_namespace/exec_child and then _exit, never
    // returning into the caller (glibc keeps malloc usable in the child of a fork).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno_str()));
    }
    if pid == 0 {
        drop(rd);
        let msg = match enter_namespace(layout, real_lsmod) {
            Ok(()) => exec_child(x),
            Err(e) => e,
        };
        let mut f = fs::File::from(wr);
        let _ = f.write_all(msg.as_bytes());
        // SAFETY: leave the child without running the parent's destructors or atexit hooks.
        unsafe { libc::_exit(127) };
    }
    CMD_PID.store(pid, Ordering::Relaxed);
    drop(wr);
    let mut msg = String::new();
    let _ = fs::File::from(rd).read_to_string(&mut msg);
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: waiting for our own child; status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(format!("waitpid: {}", errno_str()));
        }
    }
    drop(signals);
    if !msg.is_empty() {
        return Err(msg);
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    })
}

/// `kfdmux run`: run `opts.cmd` in kfdmux's view of the machine; returns CMD's exit status.
pub fn run_command(opts: &RunOptions) -> Result<i32, String> {
    if !has_cap_sys_admin() {
        return Err(
            "kfdmux run needs root (CAP_SYS_ADMIN) to create a mount namespace; try sudo".into(),
        );
    }
    let default_cmd = ["rocminfo".to_string()];
    let cmd: &[String] = if opts.cmd.is_empty() {
        &default_cmd
    } else {
        &opts.cmd
    };

    // CMD's environment: ours, with the fake lsmod first on PATH.
    let work = WorkDir::create()?;
    let bin_dir = work.0.join("bin");
    let old_path = std::env::var_os("PATH").unwrap_or_else(|| {
        OsString::from("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    });
    let mut path = bin_dir.clone().into_os_string();
    path.push(":");
    path.push(&old_path);
    // `lsmod` is ours in the namespace (it exists only there, on the namespace's tmpfs).
    let prog = if cmd[0] == "lsmod" {
        bin_dir.join("lsmod")
    } else {
        resolve_command(&cmd[0], &old_path)
            .ok_or_else(|| format!("{}: command not found", cmd[0]))?
    };

    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let sudo_uid = std::env::var("SUDO_UID").ok();
    let sudo_gid = std::env::var("SUDO_GID").ok();
    let user = target_user(
        opts.user.as_deref(),
        euid,
        sudo_uid.as_deref(),
        sudo_gid.as_deref(),
    )?;

    let mut env: Vec<(OsString, OsString)> =
        std::env::vars_os().filter(|(k, _)| k != "PATH").collect();
    env.push(("PATH".into(), path));
    if let (Some(u), false) = (&user, opts.keep_env) {
        let set = |env: &mut Vec<(OsString, OsString)>, k: &str, v: OsString| {
            env.retain(|(key, _)| key != k);
            env.push((k.into(), v));
        };
        if let Some(name) = &u.name {
            set(&mut env, "USER", name.into());
            set(&mut env, "LOGNAME", name.into());
        }
        if let Some(home) = &u.home {
            set(&mut env, "HOME", home.clone().into_os_string());
        }
    }
    let to_c = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| "argument or environment contains NUL".to_string())
    };
    let exec = Exec {
        prog: cstr(&prog)?,
        argv: cmd
            .iter()
            .map(|a| to_c(OsStr::new(a)))
            .collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.clone();
                kv.push("=");
                kv.push(v);
                to_c(&kv)
            })
            .collect::<Result<_, _>>()?,
        user,
    };

    let mut daemon = None;
    let cuse = match (opts.transport, &opts.daemon) {
        (crate::daemon::Transport::Cuse, Some(_)) => {
            return Err("--daemon works with the FUSE transport only".into())
        }
        (crate::daemon::Transport::Cuse, None) => Some(CuseRun::new(&opts.gpus, &work.0)?),
        _ => None,
    };
    let mut exec = exec;
    if let Some(c) = &cuse {
        let lib = crate::handover::find_preload_lib().ok_or(
            "libkfdmux_preload.so not found beside kfdmux: build it (`cargo build --workspace`) or set KFDMUX_PRELOAD",
        )?;
        let existing = std::env::var_os("LD_PRELOAD");
        for (k, v) in crate::handover::preload_env(&lib, &c.socket, existing.as_deref()) {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(&v);
            exec.envp.retain(|e| {
                !e.as_bytes()
                    .starts_with(format!("{}=", k.to_string_lossy()).as_bytes())
            });
            exec.envp.push(to_c(&kv)?);
        }
    }
    let kfd_path = (opts.device == crate::daemon::DeviceKind::Kfd).then(|| {
        opts.kfd_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("/dev/kfd"))
    });
    if kfd_path.is_some() {
        // Secondary kernel contexts refuse USERPTR: make ROCm allocate host memory as GTT.
        exec.envp
            .retain(|e| !e.as_bytes().starts_with(b"HSA_USERPTR_FOR_PAGED_MEM="));
        exec.envp
            .push(to_c(OsStr::new("HSA_USERPTR_FOR_PAGED_MEM=0"))?);
    }
    let (mount, sysfs) = match &opts.daemon {
        Some(dir) => {
            let dir =
                fs::canonicalize(dir).map_err(|e| format!("--daemon {}: {e}", dir.display()))?;
            if !dir.join("kfd").exists() {
                return Err(format!(
                    "--daemon {}: no kfd file there; is the daemon running?",
                    dir.display()
                ));
            }
            if !is_fuse_mount(&dir) {
                log::warn!(
                    "kfdmux run: {} is not a FUSE mount; using its files as they are",
                    dir.display()
                );
            }
            let sysfs = sysfs_dir_for(&dir);
            if !sysfs.join("kfd/topology").is_dir() {
                return Err(format!(
                    "--daemon {}: no topology in {}",
                    dir.display(),
                    sysfs.display()
                ));
            }
            (dir, sysfs)
        }
        None => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find the kfdmux binary: {e}"))?;
            let mount = work.0.join("mnt");
            let sysfs = sysfs_dir_for(&mount);
            daemon = Some(DaemonChild::start(
                &exe,
                &opts.gpus,
                &mount,
                &sysfs,
                &work.0.join("daemon.log"),
                cuse.as_ref(),
                kfd_path.as_deref(),
            )?);
            if let Some(c) = &cuse {
                // The namespace links /dev/kfd and the render nodes to these: a directory of
                // symlinks shaped like a FUSE mount, pointing at the CUSE nodes.
                let links = work.0.join("cuse-links");
                fs::create_dir(&links).map_err(|e| format!("mkdir {}: {e}", links.display()))?;
                for n in &c.nodes {
                    let name = n.file_name().ok_or("bad CUSE node name")?;
                    std::os::unix::fs::symlink(n, links.join(name))
                        .map_err(|e| format!("symlink {}: {e}", n.display()))?;
                }
                (links, sysfs)
            } else {
                (mount, sysfs)
            }
        }
    };
    let render_minors =
        render_minors(&mount).map_err(|e| format!("list {}: {e}", mount.display()))?;
    if render_minors.is_empty() {
        log::warn!("kfdmux run: {} has no renderD* files", mount.display());
    }
    let layout = Layout {
        mount,
        sysfs,
        render_minors,
        bin_dir,
        stage: work.0.join("stage"),
    };
    let real_lsmod = find_real_lsmod(&old_path);
    let result = spawn_in_namespace(&layout, real_lsmod.as_deref(), &exec);

    if let Some(mut d) = daemon {
        match d.stop() {
            Some(s) if s.success() => {}
            s => eprintln!(
                "kfdmux run: the daemon exited with {}{}",
                s.map_or_else(|| "an unknown status".to_string(), |s| s.to_string()),
                d.log_text()
            ),
        }
    }
    drop(work);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunOptions,
    }

    #[test]
    fn cli_defaults_and_trailing_command() {
        let c = Cli::try_parse_from(["run"]).unwrap();
        assert_eq!(c.run.gpus, "gfx90a:2");
        assert_eq!(c.run.cmd, ["rocminfo"]);
        assert!(c.run.daemon.is_none() && !c.run.keep_env);
        let c =
            Cli::try_parse_from(["run", "--gpus", "gfx1030", "--", "sh", "-c", "exit 3"]).unwrap();
        assert_eq!(c.run.gpus, "gfx1030");
        assert_eq!(c.run.cmd, ["sh", "-c", "exit 3"]);
        let c = Cli::try_parse_from(["run", "--daemon", "/x", "ls", "-l"]).unwrap();
        assert_eq!(c.run.daemon.as_deref(), Some(Path::new("/x")));
        assert_eq!(c.run.cmd, ["ls", "-l"]);
    }

    #[test]
    fn sysfs_dir_is_mount_dot_sysfs() {
        assert_eq!(
            sysfs_dir_for(Path::new("/run/k/mnt")),
            Path::new("/run/k/mnt.sysfs")
        );
        assert_eq!(
            sysfs_dir_for(Path::new("/run/k/mnt/")),
            Path::new("/run/k/mnt.sysfs")
        );
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(br"/a\040b\134c"), b"/a b\\c");
        assert_eq!(unescape_mountinfo(br"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(br"/trail\04"), br"/trail\04");
    }

    #[test]
    fn lsmod_script_adds_amdgpu_once() {
        let s = lsmod_script(None);
        let out = Command::new("sh").arg("-c").arg(&s).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("Module"), "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("amdgpu ")).count(),
            1,
            "{text}"
        );
        // A host lsmod that already lists amdgpu: no second line.
        let dir = std::env::temp_dir().join(format!("kfdmux-lsmod-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("lsmod");
        fs::write(
            &fake,
            "#!/bin/sh\necho 'Module Size Used by'\necho 'amdgpu 1 0'\necho 'fuse 2 1'\n",
        )
        .unwrap();
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(lsmod_script(Some(&fake)))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            text.lines().filter(|l| l.starts_with("amdgpu ")).count(),
            1,
            "{text}"
        );
        assert!(text.contains("fuse 2 1"), "{text}");
    }

    #[test]
    fn target_user_rules() {
        // Not root: SUDO_* is ignored.
        assert_eq!(
            target_user(None, 1000, Some("1234"), Some("99")).unwrap(),
            None
        );
        // Root without sudo, or sudo from root: keep ids.
        assert_eq!(target_user(None, 0, None, None).unwrap(), None);
        assert_eq!(target_user(None, 0, Some("0"), Some("0")).unwrap(), None);
        let u = target_user(None, 0, Some("4321"), Some("98"))
            .unwrap()
            .unwrap();
        assert_eq!((u.uid, u.gid), (4321, 98));
        assert!(u.groups.contains(&98));
        assert!(target_user(None, 0, Some("x"), None).is_err());
        let u = target_user(Some("65534:65533"), 0, None, None)
            .unwrap()
            .unwrap();
        assert_eq!((u.uid, u.gid), (65534, 65533));
        let u = target_user(Some("root"), 0, None, None).unwrap().unwrap();
        assert_eq!((u.uid, u.gid), (0, 0));
        assert_eq!(u.home.as_deref(), Some(Path::new("/root")));
        assert!(target_user(Some("no-such-user-kfdmux"), 0, None, None).is_err());
        assert!(target_user(Some("1:x"), 0, None, None).is_err());
    }

    #[test]
    fn resolve_finds_executables_only() {
        assert_eq!(
            resolve_command("sh", OsStr::new("/nonexistent:/bin")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            resolve_command("./x", OsStr::new("/bin")),
            Some(PathBuf::from("./x"))
        );
        assert_eq!(
            resolve_command("no-such-cmd-kfdmux", OsStr::new("/bin:/usr/bin")),
            None
        );
    }
}
