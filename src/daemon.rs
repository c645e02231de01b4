//! `kfdmux serve`: builds the device, the mux and a transport, and runs until a signal.

use std::path::PathBuf;
use std::sync::Arc;

use crate::device::sim::{SimConfig, SimDevice};
use crate::device::{Device, FileKind};
use crate::mux::Mux;
use crate::transport::engine::{Protocol, Session};
use crate::transport::fusefs::FuseFs;
use crate::transport::mount;
use crate::transport::uring::UringOptions;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A FUSE directory holding `kfd` and render-node files (bind or symlink them into place).
    Fuse,
    /// CUSE character devices: `/dev/<NAME>` and `/dev/<dir of NAME>/dri/renderD<minor>`.
    Cuse,
}

/// The device below the mux.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The software KFD.
    Sim,
    /// The kernel's KFD, forwarded (docs/kfd-device.md).
    Kfd,
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
    /// Let the sim accept AMDKFD_IOC_SVM and advertise it (SVMAPISupported, capability bit 27)
    /// in the topology; off, SVM answers EPERM and the bit is clear — the two always agree.
    #[arg(long)]
    pub svm: bool,
    /// KFD minor version the sim reports with GET_VERSION.
    #[arg(long, default_value_t = SimConfig::default().kfd_minor)]
    pub kfd_minor: u32,
    /// Unix socket handing each client process its mapping memfd (preload library; CUSE has no
    /// mmap). CUSE default: /run/kfdmux/handover.sock; with FUSE only when given.
    #[arg(long, value_name = "PATH")]
    pub handover_socket: Option<PathBuf>,
    /// Worker threads answering FUSE requests. With the sim on a daemon confined to one CPU
    /// (taskset, a one-CPU cpuset), one of them reads and answers at a time and the others take
    /// over while it opens or releases a context; otherwise all of them read. More (4) raise
    /// throughput with many busy clients and cost latency with one or two (docs/bench.md).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// FUSE transport: also carry requests over io_uring (FUSE-over-io_uring, Linux >= 6.14, needs
    /// `echo Y > /sys/module/fuse/parameters/enable_uring`): one ring queue per CPU, its
    /// thread pinned there; `--threads` workers still read INIT, INTERRUPT and FORGET from
    /// /dev/fuse. See docs/fuse-transport.md.
    #[arg(long)]
    pub fuse_uring: bool,
    /// Ring entries each queue registers at start (`--fuse-uring`); a queue adds 16 more
    /// whenever parked requests leave it fewer than 4, up to 256.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub fuse_uring_depth: u32,
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
    /// Which device answers: the simulator, or the real kernel KFD (`--kfd-path`), forwarded.
    #[arg(long, value_enum, default_value = "sim")]
    pub device: DeviceKind,
    /// The kernel's kfd file (`--device kfd`).
    #[arg(long, value_name = "PATH", default_value = "/dev/kfd")]
    pub kfd_path: PathBuf,
    /// Directory of the kernel's render nodes (`--device kfd`; default: beside `--kfd-path`,
    /// or /dev/dri for /dev/kfd).
    #[arg(long, value_name = "DIR")]
    pub kfd_render_dir: Option<PathBuf>,
    /// The kernel's kfd sysfs directory holding `topology/` (`--device kfd`).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/sys/devices/virtual/kfd/kfd"
    )]
    pub kfd_sysfs: PathBuf,
    /// GPUs the kfd device gives out, by index among the host's GPU nodes (e.g. `0,2`; default all).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub kfd_gpus: Option<Vec<usize>>,
    /// How client contexts get kernel contexts (`--device kfd`).
    #[arg(long, value_enum, default_value = "auto")]
    pub kfd_contexts: crate::device::kfd::ContextMode,
    /// Doorbell relay polling interval in microseconds (`--device kfd`).
    #[arg(long, value_name = "US", default_value_t = crate::device::kfd::DEFAULT_DOORBELL_POLL_US)]
    pub doorbell_poll_us: u64,
    /// Make the sim behave like the kernel for forwarding tests: `shared` (before KFD 1.19: one
    /// context per process) or `v119` (CREATE_PROCESS makes secondary contexts).
    #[arg(long, value_enum, default_value = "off")]
    pub kernel_mode: crate::device::kernelmode::KernelMode,
    /// Internal: run as a context host on socket FD for a client UID:GID (`--device kfd`).
    #[arg(long, value_name = "FD:UID:GID", hide = true)]
    pub context_host: Option<String>,
    /// Serve the instances of a configuration file instead (docs/containers.md); the
    /// per-device flags then come from the file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["mount", "sysfs_out", "record", "handover_socket"])]
    pub config: Option<PathBuf>,
}

impl ServeOptions {
    /// The access policy and quotas the flags describe.
    pub fn policy(&self) -> Result<crate::policy::Policy, String> {
        use crate::policy::{parse_ids, Policy, Quotas};
        Ok(Policy {
            allow_users: self
                .allow_users
                .as_deref()
                .map(|l| parse_ids(l, false))
                .transpose()?,
            allow_groups: self
                .allow_groups
                .as_deref()
                .map(|l| parse_ids(l, true))
                .transpose()?,
            quotas: Quotas {
                mem_bytes: self.quota_mem,
                queues: self.quota_queues,
                events: self.quota_events,
            },
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
    if let Some(path) = &opts.config {
        return serve_config(path, opts);
    }
    if let Some(spec) = &opts.context_host {
        return crate::device::kfd::host::run(
            spec,
            &opts.kfd_path,
            std::time::Duration::from_micros(opts.doorbell_poll_us),
        );
    }
    if opts.device == DeviceKind::Kfd {
        return serve_kfd(opts);
    }
    let gpus = crate::topology::parse_gpus(&opts.gpus)?;
    let cfg = SimConfig {
        kfd_minor: opts.kfd_minor,
        svm: opts.svm,
        ..Default::default()
    };
    if let Some(sdir) = opts.sysfs_dir() {
        let _ = std::fs::remove_dir_all(&sdir);
        let topo = crate::sysfs::TopologyOptions {
            svm_capability: cfg.svm,
            ..Default::default()
        };
        crate::sysfs::write_topology(&sdir, &gpus, &topo)
            .map_err(|e| format!("writing the topology into {}: {e}", sdir.display()))?;
        crate::sysfs::write_amdgpu_module(&sdir.join("module/amdgpu"))
            .map_err(|e| format!("writing {}/module/amdgpu: {e}", sdir.display()))?;
    }
    let header = crate::trace::Header::for_sim(&opts.gpus, &gpus, &cfg);
    let device: Arc<dyn Device> = SimDevice::new(gpus, cfg);
    let device = crate::device::kernelmode::KernelModeDevice::wrap(device, opts.kernel_mode);
    let device = crate::policy::wrap(device, opts.policy()?);
    serve_mux(opts, Mux::new(device), header)
}

/// `serve --device kfd`: the kernel's KFD, forwarded (docs/kfd-device.md).
fn serve_kfd(opts: &ServeOptions) -> Result<(), String> {
    use crate::device::kfd::{KfdConfig, KfdDevice};
    let mut cfg = KfdConfig::new(&opts.kfd_path, &opts.kfd_sysfs, opts.kfd_contexts)?;
    if let Some(dir) = &opts.kfd_render_dir {
        cfg.render_dir = dir.clone();
    }
    cfg.gpus = opts.kfd_gpus.clone();
    cfg.doorbell_poll = std::time::Duration::from_micros(opts.doorbell_poll_us.max(1));
    let kfd = KfdDevice::new(cfg)?;
    if let Some(sdir) = opts.sysfs_dir() {
        let _ = std::fs::remove_dir_all(&sdir);
        kfd.write_sysfs(&sdir)?;
    }
    let header = crate::trace::Header::for_kfd(kfd.version().1, &kfd.gpu_list());
    let device: Arc<dyn Device> = kfd;
    let device = crate::policy::wrap(device, opts.policy()?);
    let mux = Mux::new(device);
    serve_mux(opts, mux, header)
}

/// Starts recording if asked, serves `mux` on the chosen transport until a signal, then trims
/// the trace.
fn serve_mux(
    opts: &ServeOptions,
    mux: Arc<Mux>,
    header: crate::trace::Header,
) -> Result<(), String> {
    let recorder = opts
        .record
        .as_deref()
        .map(|path| start_recording(&mux, path, &header).map_err(|e| format!("--record {e}")))
        .transpose()?;
    let set = block_signals();
    let r = match opts.transport {
        Transport::Fuse => serve_fuse(opts, mux, &set),
        Transport::Cuse => serve_cuse(opts, mux, &set),
    };
    if let Some(rec) = recorder {
        finish_recording(&rec);
    }
    r
}

/// Records every call `mux` sees into `path` from now on; `Err` names the path.
fn start_recording(
    mux: &Mux,
    path: &std::path::Path,
    header: &crate::trace::Header,
) -> Result<Arc<crate::trace::Recorder>, String> {
    let rec = crate::trace::Recorder::create(path, header)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    mux.set_recorder(rec.clone());
    log::info!("recording every call into {}", path.display());
    Ok(rec)
}

/// Trims the mapped-ahead zeros after the records (a killed daemon leaves them; readers skip
/// them).
fn finish_recording(rec: &crate::trace::Recorder) {
    if let Err(e) = rec.finish() {
        log::warn!("trimming the trace file: {e}");
    }
}

fn serve_cuse(opts: &ServeOptions, mux: Arc<Mux>, set: &libc::sigset_t) -> Result<(), String> {
    use crate::transport::cuse;
    let env = Arc::new(cuse::CuseEnv::default());
    let mut names = vec![(opts.name.clone(), FileKind::Kfd)];
    for i in 0..mux.device.gpu_count() {
        names.push((
            cuse::render_devname(&opts.name, mux.device.render_minor(i)),
            FileKind::Render(i),
        ));
    }
    let mut runners = Vec::new();
    for (name, kind) in &names {
        let fd = cuse::open_cuse()?;
        let fs = Arc::new(cuse::CuseFs {
            mux: mux.clone(),
            kind: *kind,
            env: env.clone(),
        });
        let session = Session::new_cuse(fd, fs, name);
        let threads = if *kind == FileKind::Kfd {
            opts.threads
        } else {
            2
        };
        runners.push(std::thread::spawn(move || session.run(threads)));
    }
    let hsock = opts
        .handover_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::handover::DEFAULT_SOCKET));
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
                return Err(format!(
                    "CUSE device {name} did not appear in /sys/class/cuse"
                ));
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
    let mount_dir = opts
        .mount
        .clone()
        .ok_or("--mount DIR is required with --transport fuse")?;
    if let Some(p) = &opts.handover_socket {
        crate::handover::spawn_server(p, mux.clone())
            .map_err(|e| format!("hand-over socket {}: {e}", p.display()))?;
    }
    let uring = opts.fuse_uring.then(|| UringOptions {
        depth: opts.fuse_uring_depth.max(1),
        ..Default::default()
    });
    let (runner, dev) = start_fuse(FuseFs::new(mux), &mount_dir, opts.threads, uring)?;
    log::info!(
        "serving {} on {} (sysfs {:?})",
        opts.gpus,
        mount_dir.display(),
        opts.sysfs_dir()
    );
    let sig = wait_signal(set);
    log::info!("signal {sig}: unmounting {}", mount_dir.display());
    mount::unmount(&mount_dir);
    if let Some(d) = dev {
        abort_connection(d);
    }
    let _ = runner.join();
    Ok(())
}

type Runner = std::thread::JoinHandle<std::io::Result<()>>;

/// Mounts `fs` on `mount_dir` and runs its session with `threads` workers, and with `uring`
/// the FUSE-over-io_uring queues (refused up front where the kernel lacks it; waits until they
/// registered). Returns the session's runner and the mount's device number.
fn start_fuse(
    fs: Arc<FuseFs>,
    mount_dir: &std::path::Path,
    threads: usize,
    uring: Option<UringOptions>,
) -> Result<(Runner, Option<u64>), String> {
    if uring.is_some() {
        // Before mounting: a kernel without it, or with enable_uring N, is refused up front.
        crate::transport::uring::preflight()?;
    }
    let (fd, early_dev) = mount::mount_fuse(mount_dir)?;
    // Known before any worker runs: ACQUIRE_VM recognises our render files by st_dev.
    if early_dev != 0 {
        log::debug!("mounted {} (device {early_dev:#x})", mount_dir.display());
        fs.set_dev(early_dev);
    }
    let session = Session::new(fd, fs.clone(), Protocol::Fuse, true);
    fs.set_channel(session.chan.clone());
    let ready = match uring {
        Some(u) => match crate::transport::uring::enable(&session, u) {
            Ok(rx) => Some(rx),
            Err(e) => {
                mount::unmount(mount_dir);
                return Err(e);
            }
        },
        None => None,
    };
    let runner = {
        let s = session.clone();
        std::thread::spawn(move || s.run(threads))
    };
    let dev = mount::mount_dev(mount_dir);
    if let Some(d) = dev {
        if early_dev != 0 && early_dev != d {
            log::warn!("mountinfo said device {early_dev:#x}, stat says {d:#x}; using the latter");
        }
        fs.set_dev(d);
    }
    if let Some(rx) = ready {
        // INIT comes right after the mount; the queues register as soon as it is answered.
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| Err("no FUSE INIT within 20 s".to_string()));
        if let Err(e) = r {
            mount::unmount(mount_dir);
            if let Some(d) = dev {
                abort_connection(d);
            }
            let _ = runner.join();
            return Err(format!("FUSE-over-io_uring: {e}"));
        }
    }
    Ok((runner, dev))
}

// ---- Several instances from a configuration file (`serve --config`, docs/containers.md). ----

/// The fake `lsmod` containers get (CDI mounts it at /usr/local/bin/lsmod): the image's own
/// module list, if it has an lsmod, plus `amdgpu` (rocminfo 5.2.3 runs `lsmod | grep amdgpu`).
pub const CONTAINER_LSMOD_SCRIPT: &str = r#"#!/bin/sh
# kfdmux: the container's module list plus amdgpu, which kfdmux stands in for.
out=
for l in /usr/sbin/lsmod /usr/bin/lsmod /sbin/lsmod /bin/lsmod; do
  if [ -x "$l" ]; then out=$("$l" 2>/dev/null); break; fi
done
[ -n "$out" ] || out='Module                  Size  Used by'
printf '%s\n' "$out"
case "$out" in *"
amdgpu "*) ;; *) echo 'amdgpu                      0  0' ;; esac
"#;

/// A started instance and what stopping it takes.
struct RunningInstance {
    name: String,
    recorder: Option<Arc<crate::trace::Recorder>>,
    fuse: Option<(PathBuf, Option<u64>)>,
    cuse_names: Vec<String>,
    handover: Option<PathBuf>,
    runners: Vec<Runner>,
}

impl RunningInstance {
    fn stop(self) {
        if let Some((dir, dev)) = &self.fuse {
            mount::unmount(dir);
            if let Some(d) = dev {
                abort_connection(*d);
            }
        }
        for n in &self.cuse_names {
            crate::transport::cuse::abort(n);
        }
        if let Some(h) = &self.handover {
            let _ = std::fs::remove_file(h);
        }
        for r in self.runners {
            let _ = r.join();
        }
        if let Some(rec) = &self.recorder {
            finish_recording(rec);
        }
        log::info!("instance '{}' stopped", self.name);
    }
}

/// Builds one instance's device, mux, sysfs tree and recorder, and starts its transport.
fn start_instance(
    cfg: &crate::config::Config,
    inst: &crate::config::Instance,
    threads: usize,
) -> Result<RunningInstance, String> {
    let who = format!("instance '{}'", inst.name);
    let _ = std::fs::remove_dir_all(&inst.sysfs_dir);
    // SVM stays off for instances: the topology's capability bit and the sim agree.
    crate::sysfs::write_topology(&inst.sysfs_dir, &inst.gpus, &Default::default()).map_err(
        |e| {
            format!(
                "{who}: writing the topology into {}: {e}",
                inst.sysfs_dir.display()
            )
        },
    )?;
    crate::sysfs::write_amdgpu_module(&inst.sysfs_dir.join("module/amdgpu")).map_err(|e| {
        format!(
            "{who}: writing {}/module/amdgpu: {e}",
            inst.sysfs_dir.display()
        )
    })?;
    let mut sim = SimConfig {
        svm: false,
        ..Default::default()
    };
    if let Some(m) = cfg.kfd_minor {
        sim.kfd_minor = m;
    }
    let header = crate::trace::Header::for_sim(&inst.gpus_spec, &inst.gpus, &sim);
    let device: Arc<dyn Device> = SimDevice::new(inst.gpus.clone(), sim);
    let device = crate::policy::wrap(device, inst.policy.clone());
    let mux = Mux::new(device);
    let recorder = inst
        .record
        .as_deref()
        .map(|path| start_recording(&mux, path, &header).map_err(|e| format!("{who}: record {e}")))
        .transpose()?;
    let mut run = RunningInstance {
        name: inst.name.clone(),
        recorder,
        fuse: None,
        cuse_names: Vec::new(),
        handover: None,
        runners: Vec::new(),
    };
    match inst.transport {
        Transport::Fuse => {
            let uring = inst.fuse_uring.map(|depth| UringOptions {
                depth,
                ..Default::default()
            });
            let (runner, dev) = start_fuse(FuseFs::new(mux), &inst.mount, threads, uring)
                .map_err(|e| format!("{who}: {e}"))?;
            run.runners.push(runner);
            run.fuse = Some((inst.mount.clone(), dev));
            log::info!(
                "{who}: serving {} on {}",
                inst.gpus_spec,
                inst.mount.display()
            );
        }
        Transport::Cuse => {
            use crate::transport::cuse;
            let env = Arc::new(cuse::CuseEnv::default());
            let mut names = vec![(inst.devname.clone(), FileKind::Kfd)];
            for i in 0..mux.device.gpu_count() {
                names.push((
                    cuse::render_devname(&inst.devname, mux.device.render_minor(i)),
                    FileKind::Render(i),
                ));
            }
            for (name, kind) in &names {
                let fd = match cuse::open_cuse() {
                    Ok(fd) => fd,
                    Err(e) => {
                        run.stop();
                        return Err(format!("{who}: {e}"));
                    }
                };
                let fs = Arc::new(cuse::CuseFs {
                    mux: mux.clone(),
                    kind: *kind,
                    env: env.clone(),
                });
                let session = Session::new_cuse(fd, fs, name);
                let t = if *kind == FileKind::Kfd { threads } else { 2 };
                run.runners.push(std::thread::spawn(move || session.run(t)));
                run.cuse_names.push(name.clone());
            }
            if let Err(e) = crate::handover::spawn_server(&inst.handover_socket, mux.clone()) {
                run.stop();
                return Err(format!(
                    "{who}: hand-over socket {}: {e}",
                    inst.handover_socket.display()
                ));
            }
            run.handover = Some(inst.handover_socket.clone());
            for (name, kind) in &names {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    if let Some(rdev) = cuse::cuse_rdev(name) {
                        env.add(rdev, *kind);
                        break;
                    }
                    if std::time::Instant::now() > deadline {
                        run.stop();
                        return Err(format!(
                            "{who}: CUSE device {name} did not appear in /sys/class/cuse"
                        ));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
            log::info!(
                "{who}: serving {} as /dev/{} over CUSE",
                inst.gpus_spec,
                inst.devname
            );
        }
    }
    Ok(run)
}

/// `kfdmux serve --config FILE`: every instance of the file in this one daemon, until a
/// signal; then the CDI spec (if `daemon.cdi_spec` asked for one) is removed and every
/// instance stopped.
pub fn serve_config(path: &std::path::Path, opts: &ServeOptions) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let cfg = crate::config::load(path).map_err(|errs| {
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let threads = cfg.threads.unwrap_or(opts.threads);
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| format!("{}: {e}", cfg.state_dir.display()))?;
    let lsmod = cfg.lsmod_path();
    if let Some(d) = lsmod.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let _ = std::fs::remove_file(&lsmod);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&lsmod)
        .and_then(|mut f| f.write_all(CONTAINER_LSMOD_SCRIPT.as_bytes()))
        .map_err(|e| format!("{}: {e}", lsmod.display()))?;
    let set = block_signals();
    let mut running = Vec::new();
    for inst in &cfg.instances {
        match start_instance(&cfg, inst, threads) {
            Ok(r) => running.push(r),
            Err(e) => {
                for r in running {
                    r.stop();
                }
                return Err(e);
            }
        }
    }
    if let Some(p) = &cfg.cdi_spec {
        let spec = crate::cdi::spec(
            &cfg,
            &crate::cdi::HostFacts::probe(cfg.hook_binary.as_deref()),
        );
        if let Err(e) = crate::cdi::write_spec(p, &spec) {
            for r in running {
                r.stop();
            }
            return Err(format!("CDI spec {}: {e}", p.display()));
        }
        log::info!(
            "CDI spec for {} instance(s) in {}",
            cfg.instances.len(),
            p.display()
        );
    }
    for l in crate::config::describe(&cfg) {
        log::info!("{l}");
    }
    let sig = wait_signal(&set);
    log::info!("signal {sig}: stopping {} instance(s)", running.len());
    if let Some(p) = &cfg.cdi_spec {
        let _ = std::fs::remove_file(p);
    }
    for r in running {
        r.stop();
    }
    Ok(())
}
