//! `kfdmux serve`: builds the device, the mux and a transport, and runs until a signal.

use std::path::PathBuf;
use std::sync::Arc;

use crate::device::sim::{SimConfig, SimDevice};
use crate::device::{Device, FileKind};
use crate::mux::Mux;
use crate::transport::engine::{Protocol, Session};
use crate::transport::fusefs::FuseFs;
use crate::transport::mount;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A FUSE directory holding `kfd` and render-node files (bind or symlink them into place).
    Fuse,
    /// CUSE character devices: `/dev/<NAME>` and `/dev/<dir of NAME>/dri/renderD<minor>`.
    Cuse,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServeOptions {
    /// How clients reach the device.
    #[arg(long, value_enum, default_value = "fuse")]
    pub transport: Transport,
    /// Directory to mount the FUSE files on (FUSE transport).
    #[arg(long, required_if_eq("transport", "fuse"))]
    pub mount: Option<PathBuf>,
    /// CUSE device name of the kfd node, sub-directories allowed (`kfdmux/kfd` → /dev/kfdmux/kfd).
    #[arg(long, default_value = "kfdmux/kfd")]
    pub name: String,
    /// Simulated GPUs, e.g. `gfx90a:2,gfx1030` (presets: gfx90a, gfx942, gfx1030).
    #[arg(long, default_value = "gfx90a:1")]
    pub gpus: String,
    /// Where to write the sysfs topology tree (default: `<mount>.sysfs`): it holds
    /// `kfd/topology/...` (for /sys/devices/virtual/kfd) and `module/amdgpu/...`.
    #[arg(long)]
    pub sysfs_out: Option<PathBuf>,
    /// KFD minor version the sim reports with GET_VERSION.
    #[arg(long, default_value_t = SimConfig::default().kfd_minor)]
    pub kfd_minor: u32,
    /// Unix socket handing each client process its mapping memfd (preload library; CUSE has no
    /// mmap). CUSE default: /run/kfdmux/handover.sock; with FUSE only when given.
    #[arg(long, value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,
    /// Worker threads reading FUSE requests.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Record every open, ioctl and close into PATH (see docs/trace-format.md;
    /// `kfdmux trace show PATH`, `kfdmux replay PATH`).
    #[arg(long, value_name = "PATH")]
    pub record: Option<PathBuf>,
    /// Users allowed to open the device (comma-separated names or uids; root always may).
    /// Others get EACCES at open. Default: everyone.
    #[arg(long, value_name = "USERS")]
    pub allow_users: Option<String>,
    /// Groups whose members (primary or supplementary) may open the device.
    #[arg(long, value_name = "GROUPS")]
    pub allow_groups: Option<String>,
    /// Per-context VRAM+GTT bytes (suffixes K, M, G); beyond it ALLOC gets ENOMEM.
    #[arg(long, value_name = "BYTES", value_parser = crate::policy::parse_bytes)]
    pub quota_mem: Option<u64>,
    /// Per-context live queues; beyond it CREATE_QUEUE gets ENOSPC.
    #[arg(long, value_name = "N")]
    pub quota_queues: Option<u32>,
    /// Per-context live events; beyond it CREATE_EVENT gets ENOSPC.
    #[arg(long, value_name = "N")]
    pub quota_events: Option<u32>,
    /// Live kfd contexts one uid may hold; beyond it open gets ENOSPC.
    #[arg(long, value_name = "N")]
    pub max_contexts_per_uid: Option<u32>,
}

impl ServeOptions {
    /// The access policy and quotas the flags describe.
    pub fn policy(&self) -> Result<crate::policy::Policy, String> {
        use crate::policy::{parse_ids, Policy, Quotas};
        Ok(Policy {
            allow_users: self.allow_users.as_deref().map(|l| parse_ids(l, false)).transpose()?,
            allow_groups: self.allow_groups.as_deref().map(|l| parse_ids(l, true)).transpose()?,
            quotas: Quotas { mem_bytes: self.quota_mem, queues: self.quota_queues, events: self.quota_events },
            max_contexts_per_uid: self.max_contexts_per_uid,
        })
    }

    pub fn sysfs_dir(&self) -> Option<PathBuf> {
        self.sysfs_out.clone().or_else(|| {
            self.mount.as_ref().map(|m| {
                let mut s = m.clone().into_os_string();
                s.push(".sysfs");
                PathBuf::from(s)
            })
        })
    }
}

/// Blocks the termination signals in the calling thread (and threads it spawns later) so that
/// the main thread can `sigwait` for them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local, zero-initialised set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is a valid signal set and `sig` a writable int.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Aborts the FUSE connection of the mount whose device is `dev` (so workers and clients
/// stop at once instead of waiting for every client to close).
fn abort_connection(dev: u64) {
    let minor = libc::minor(dev);
    let conns = "/sys/fs/fuse/connections";
    if !std::path::Path::new(conns).join(minor.to_string()).exists() {
        // fusectl is not mounted (systemd usually does it); the abort file lives there.
        if let Err(e) = crate::transport::sys::mount("fusectl", conns, "fusectl", 0, "") {
            log::debug!("mounting fusectl on {conns}: {e}");
        }
    }
    let path = format!("{conns}/{minor}/abort");
    if let Err(e) = std::fs::write(&path, "1") {
        log::debug!("{path}: {e}");
    }
}

pub fn serve(opts: &ServeOptions) -> Result<(), String> {
    let gpus = crate::topology::parse_gpus(&opts.gpus)?;
    if let Some(sdir) = opts.sysfs_dir() {
        let _ = std::fs::remove_dir_all(&sdir);
        crate::sysfs::write_topology(&sdir, &gpus, &Default::default())
            .map_err(|e| format!("writing the topology into {}: {e}", sdir.display()))?;
        crate::sysfs::write_amdgpu_module(&sdir.join("module/amdgpu"))
            .map_err(|e| format!("writing {}/module/amdgpu: {e}", sdir.display()))?;
    }
    let cfg = SimConfig { kfd_minor: opts.kfd_minor, ..Default::default() };
    let header = opts.record.as_ref().map(|_| crate::trace::Header::for_sim(&opts.gpus, &gpus, &cfg));
    let device: Arc<dyn Device> = SimDevice::new(gpus, cfg);
    let device = crate::policy::wrap(device, opts.policy()?);
    let mux = Mux::new(device);
    if let (Some(path), Some(header)) = (&opts.record, header) {
        let rec = crate::trace::Recorder::create(path, &header)
            .map_err(|e| format!("--record {}: {e}", path.display()))?;
        mux.set_recorder(rec);
        log::info!("recording every call into {}", path.display());
    }
    let set = block_signals();
    match opts.transport {
        Transport::Fuse => serve_fuse(opts, mux, &set),
        Transport::Cuse => serve_cuse(opts, mux, &set),
    }
}

fn serve_cuse(opts: &ServeOptions, mux: Arc<Mux>, set: &libc::sigset_t) -> Result<(), String> {
    use crate::transport::cuse;
    let env = Arc::new(cuse::CuseEnv::default());
    let mut names = vec![(opts.name.clone(), FileKind::Kfd)];
    for i in 0..mux.device.gpu_count() {
        names.push((cuse::render_devname(&opts.name, mux.device.render_minor(i)), FileKind::Render(i)));
    }
    let mut runners = Vec::new();
    for (name, kind) in &names {
        let fd = cuse::open_cuse()?;
        let fs = Arc::new(cuse::CuseFs { mux: mux.clone(), kind: *kind, env: env.clone() });
        let session = Session::new_cuse(fd, fs, name);
        let threads = if *kind == FileKind::Kfd { opts.threads } else { 2 };
        runners.push(std::thread::spawn(move || session.run(threads)));
    }
    let hsock = opts.handover_socket.clone().unwrap_or_else(|| PathBuf::from(crate::handover::DEFAULT_SOCKET));
    crate::handover::spawn_server(&hsock, mux.clone())
        .map_err(|e| format!("hand-over socket {}: {e}", hsock.display()))?;
    // The kernel registers each device when it has our CUSE_INIT reply.
    for (name, kind) in &names {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(rdev) = cuse::cuse_rdev(name) {
                env.add(rdev, *kind);
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("CUSE device {name} did not appear in /sys/class/cuse"));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    log::info!("serving {} as /dev/{} over CUSE", opts.gpus, opts.name);
    let sig = wait_signal(set);
    log::info!("signal {sig}: removing the CUSE devices");
    let _ = std::fs::remove_file(&hsock);
    for (name, _) in &names {
        cuse::abort(name);
    }
    for r in runners {
        let _ = r.join();
    }
    Ok(())
}

fn serve_fuse(opts: &ServeOptions, mux: Arc<Mux>, set: &libc::sigset_t) -> Result<(), String> {
    let mount_dir = opts.mount.clone().ok_or("--mount DIR is required with --transport fuse")?;
    if let Some(p) = &opts.handover_socket {
        crate::handover::spawn_server(p, mux.clone())
            .map_err(|e| format!("hand-over socket {}: {e}", p.display()))?;
    }
    let fs = FuseFs::new(mux);
    let (fd, early_dev) = mount::mount_fuse(&mount_dir)?;
    // Known before any worker runs: ACQUIRE_VM recognises our render files by st_dev.
    if early_dev != 0 {
        log::debug!("mounted {} (device {early_dev:#x})", mount_dir.display());
        fs.set_dev(early_dev);
    }
    let session = Session::new(fd, fs.clone(), Protocol::Fuse, true);
    fs.set_channel(session.chan.clone());
    let runner = {
        let s = session.clone();
        let threads = opts.threads;
        std::thread::spawn(move || s.run(threads))
    };
    let dev = mount::mount_dev(&mount_dir);
    if let Some(d) = dev {
        if early_dev != 0 && early_dev != d {
            log::warn!("mountinfo said device {early_dev:#x}, stat says {d:#x}; using the latter");
        }
        fs.set_dev(d);
    }
    log::info!("serving {} on {} (sysfs {:?})", opts.gpus, mount_dir.display(), opts.sysfs_dir());
    let sig = wait_signal(set);
    log::info!("signal {sig}: unmounting {}", mount_dir.display());
    mount::unmount(&mount_dir);
    if let Some(d) = dev {
        abort_connection(d);
    }
    let _ = runner.join();
    Ok(())
}
