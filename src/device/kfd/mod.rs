//! `kfd`: the real `/dev/kfd` below the mux, one kernel context per client open.
//!
//! KFD serves only the process that opened it (ioctls and mmaps from any other fail with EBADF),
//! so every kernel context is *owned* by kfdmux: on KFD ≥ 1.19 the daemon opens the kfd file once
//! per client context and issues CREATE_PROCESS ([`owner::InProcOwner`]); below 1.19 all opens of
//! one process share one context, so each client context gets a context host, a kfdmux process of
//! its own ([`host`]). Every ioctl is forwarded by the schema: pointer fields are copied into
//! owner buffers and rewritten, fd fields are taken from the client (`pidfd_getfd`) and passed
//! to the owner, and the kernel's mmap offsets (`type << 62`) are replaced by offsets into the
//! client's own memfd (shadow pages), relayed to the hardware page for doorbells and the MMIO
//! page. See docs/kfd-device.md.

pub mod host;
pub mod owner;
pub mod relay;
pub mod topo;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::abi::table::{read_uint, write_uint, Kind};
use crate::abi::*;
use crate::device::sim::mem::{page_align, ProcMem};
use crate::device::{Caller, Device, DeviceContext, Done, Env, FileKind, IoctlCall, ProcessMemory};
use crate::errno::Errno;

use owner::{CancelToken, FwdReq, InProcOwner, Owner, PtrBuf};
use relay::{Relay, RelayDir};

/// How client contexts get kernel contexts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextMode {
    /// Secondary contexts when the kernel has KFD ≥ 1.19, context hosts otherwise.
    Auto,
    /// CREATE_PROCESS per context (refused at start-up below 1.19).
    Secondary,
    /// A context host process per context (works on every KFD).
    Hosts,
}

/// Configuration of a [`KfdDevice`].
#[derive(Debug, Clone)]
pub struct KfdConfig {
    /// The kernel's kfd file (`/dev/kfd`; in tests a lower kfdmux's FUSE `kfd`).
    pub kfd_path: PathBuf,
    /// Where the render nodes `renderD<minor>` are (`/dev/dri`).
    pub render_dir: PathBuf,
    /// The kernel's kfd sysfs directory (holding `topology/`).
    pub sysfs: PathBuf,
    /// GPUs this daemon may give out, by index among the GPU nodes (None: all).
    pub gpus: Option<Vec<usize>>,
    pub mode: ContextMode,
    /// Doorbell relay polling interval.
    pub doorbell_poll: Duration,
    /// The kfdmux binary context hosts run.
    pub exe: PathBuf,
}

/// The doorbell relay's polling interval unless told otherwise (`--doorbell-poll-us`).
pub const DEFAULT_DOORBELL_POLL_US: u64 = 100;

impl KfdConfig {
    /// The configuration for the kfd file at `kfd_path` with its topology under `sysfs`: every
    /// GPU, render nodes where [`KfdConfig::default_render_dir`] says, the default doorbell
    /// polling, and this kfdmux binary for context hosts.
    pub fn new(kfd_path: &Path, sysfs: &Path, mode: ContextMode) -> Result<KfdConfig, String> {
        Ok(KfdConfig {
            render_dir: KfdConfig::default_render_dir(kfd_path),
            kfd_path: kfd_path.to_path_buf(),
            sysfs: sysfs.to_path_buf(),
            gpus: None,
            mode,
            doorbell_poll: Duration::from_micros(DEFAULT_DOORBELL_POLL_US),
            exe: std::env::current_exe().map_err(|e| format!("locating the kfdmux binary: {e}"))?,
        })
    }

    /// Defaults for `kfd_path`: render nodes beside it (a kfdmux FUSE directory) unless it is
    /// `/dev/kfd`.
    pub fn default_render_dir(kfd_path: &Path) -> PathBuf {
        match kfd_path.parent() {
            Some(p) if p != Path::new("/dev") && !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("/dev/dri"),
        }
    }
}

/// Which CREATE_PROCESS encoding the running kernel took.
const CREATE_PROCESS_ENCODINGS: [(u32, &str); 3] = [
    (AMDKFD_IOC_CREATE_PROCESS, "_IO (upstream)"),
    (AMDKFD_IOC_CREATE_PROCESS_ROCM, "_IOWR {flags} (ROCm)"),
    (AMDKFD_IOC_CREATE_PROCESS_DRAFT, "_IOR {pasid} (draft)"),
];

#[derive(Clone, Copy, Debug)]
enum Mode {
    Secondary { create_cmd: u32 },
    Hosts,
}

#[derive(Default)]
struct Stats {
    contexts: AtomicU64,
    forwarded: AtomicU64,
    refused_policy: AtomicU64,
    offsets_translated: AtomicU64,
    hosts_spawned: AtomicU64,
}

struct Shared {
    cfg: KfdConfig,
    version: (u32, u32),
    mode: Mode,
    gpus: Vec<topo::GpuNode>,
    relay: Arc<Relay>,
    procs: Mutex<HashMap<u32, Weak<ProcMem>>>,
    stats: Stats,
}

/// The real KFD, forwarded.
pub struct KfdDevice {
    sh: Arc<Shared>,
}

fn open_rw(path: &Path) -> Result<OwnedFd, Errno> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: a valid NUL-terminated path; a non-negative result is a new fd we own.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `fd` was just opened and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// GET_VERSION on an open kfd file.
pub fn get_version(fd: &OwnedFd) -> Result<(u32, u32), Errno> {
    let mut req = FwdReq {
        cmd: AMDKFD_IOC_GET_VERSION,
        arg: vec![0; 8],
        ..Default::default()
    };
    owner::exec(fd.as_raw_fd(), &mut req)?;
    Ok((
        read_uint(&req.arg, 0, 4) as u32,
        read_uint(&req.arg, 4, 4) as u32,
    ))
}

/// Turns the context `fd` holds into a secondary one with `cmd` (one of the encodings).
fn create_process(fd: &OwnedFd, cmd: u32) -> Result<(), Errno> {
    let mut req = FwdReq {
        cmd,
        arg: vec![0; 8],
        ..Default::default()
    };
    owner::exec(fd.as_raw_fd(), &mut req)
}

impl KfdDevice {
    /// The GPUs given out, in device order: `(gpu_id, render_minor, gfx_target_version)`.
    pub fn gpu_list(&self) -> Vec<(u32, u32, u32)> {
        self.sh
            .gpus
            .iter()
            .map(|g| (g.gpu_id, g.render_minor, g.gfx_target_version))
            .collect()
    }

    /// Opens the kernel's kfd file, reads its version and picks how contexts are made; refuses
    /// (with a message saying why) when the file is missing or inaccessible, or when neither
    /// secondary contexts nor context hosts can work.
    pub fn new(cfg: KfdConfig) -> Result<Arc<KfdDevice>, String> {
        let p = cfg.kfd_path.display().to_string();
        let probe = open_rw(&cfg.kfd_path).map_err(|e| match e {
            Errno::ENOENT => format!("{p} does not exist: is the amdgpu driver loaded (modprobe amdgpu) and is there an AMD GPU?"),
            Errno::EACCES | Errno::EPERM => format!("{p}: permission denied: run kfdmux as a user in the render group, or as root"),
            e => format!("opening {p}: {e}"),
        })?;
        let version = get_version(&probe)
            .map_err(|e| format!("GET_VERSION on {p}: {e} (is it really a kfd device?)"))?;
        if version.0 != 1 {
            return Err(format!(
                "{p}: KFD major version {} (kfdmux knows 1.x)",
                version.0
            ));
        }
        let hosts_ok = || -> Result<(), String> {
            if !cfg.exe.is_file() {
                return Err(format!(
                    "context hosts need the kfdmux binary, {} is missing",
                    cfg.exe.display()
                ));
            }
            Ok(())
        };
        let mode = if version.1 >= 19 && cfg.mode != ContextMode::Hosts {
            let mut chosen = None;
            let mut errs = Vec::new();
            for (cmd, label) in CREATE_PROCESS_ENCODINGS {
                // A fresh fd per attempt: a successful CREATE_PROCESS turns the fd's context.
                let fd = open_rw(&cfg.kfd_path).map_err(|e| format!("opening {p}: {e}"))?;
                match create_process(&fd, cmd) {
                    Ok(()) => {
                        log::info!("{p}: KFD 1.{}: secondary contexts via CREATE_PROCESS {label} ({cmd:#010x})", version.1);
                        chosen = Some(cmd);
                        break;
                    }
                    Err(e) => errs.push(format!("{label}: {e}")),
                }
            }
            match chosen {
                Some(create_cmd) => Mode::Secondary { create_cmd },
                None if cfg.mode == ContextMode::Secondary => {
                    return Err(format!(
                        "{p}: KFD 1.{} refused every CREATE_PROCESS encoding ({})",
                        version.1,
                        errs.join("; ")
                    ))
                }
                None => {
                    log::warn!(
                        "{p}: CREATE_PROCESS refused ({}); using context hosts",
                        errs.join("; ")
                    );
                    hosts_ok().map_err(|e| format!("{p}: no secondary contexts and {e}"))?;
                    Mode::Hosts
                }
            }
        } else {
            if cfg.mode == ContextMode::Secondary {
                return Err(format!(
                    "{p}: KFD 1.{} has no secondary contexts (CREATE_PROCESS needs 1.19); use --kfd-contexts hosts or auto",
                    version.1
                ));
            }
            hosts_ok().map_err(|e| {
                format!("{p}: KFD 1.{} has no secondary contexts and {e}", version.1)
            })?;
            log::info!(
                "{p}: KFD 1.{}: one context host process per client context",
                version.1
            );
            Mode::Hosts
        };
        drop(probe);
        let gpus = topo::read_gpus(&cfg.sysfs, cfg.gpus.as_deref())?;
        owner::install_interrupt_handler();
        let relay = Relay::new(cfg.doorbell_poll);
        Ok(Arc::new(KfdDevice {
            sh: Arc::new(Shared {
                cfg,
                version,
                mode,
                gpus,
                relay,
                procs: Mutex::new(HashMap::new()),
                stats: Stats::default(),
            }),
        }))
    }

    /// `(major, minor)` of the kernel's KFD.
    pub fn version(&self) -> (u32, u32) {
        self.sh.version
    }

    /// True when client contexts are secondary kernel contexts of the daemon (KFD ≥ 1.19).
    pub fn uses_secondary_contexts(&self) -> bool {
        matches!(self.sh.mode, Mode::Secondary { .. })
    }

    /// Writes the topology clients see into `sysfs_out` (`kfd/topology/...` and
    /// `module/amdgpu/...`): the host's, filtered to the GPUs given out, SVM capability cleared.
    pub fn write_sysfs(&self, sysfs_out: &Path) -> Result<(), String> {
        topo::write_filtered(&self.sh.cfg.sysfs, &sysfs_out.join("kfd"), &self.sh.gpus)?;
        crate::sysfs::write_amdgpu_module(&sysfs_out.join("module/amdgpu"))
            .map_err(|e| format!("writing {}/module/amdgpu: {e}", sysfs_out.display()))
    }

    fn proc_mem(&self, tgid: u32) -> Result<Arc<ProcMem>, Errno> {
        let mut procs = self.sh.procs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = procs.get(&tgid).and_then(Weak::upgrade) {
            return Ok(m);
        }
        procs.retain(|_, w| w.strong_count() > 0);
        let m = Arc::new(ProcMem::new(tgid, 1 << 40)?);
        procs.insert(tgid, Arc::downgrade(&m));
        Ok(m)
    }

    fn owner_for(&self, caller: &Caller) -> Result<Arc<dyn Owner>, Errno> {
        match self.sh.mode {
            Mode::Secondary { create_cmd } => {
                let fd = open_rw(&self.sh.cfg.kfd_path)
                    .inspect_err(|e| log::warn!("kfd: opening the kernel's kfd: {e}"))?;
                create_process(&fd, create_cmd)
                    .inspect_err(|e| log::warn!("kfd: CREATE_PROCESS: {e}"))?;
                Ok(Arc::new(InProcOwner {
                    fd,
                    relay: self.sh.relay.clone(),
                }))
            }
            Mode::Hosts => {
                let h = host::HostOwner::spawn(&self.sh.cfg, caller)
                    .inspect_err(|e| log::warn!("kfd: starting a context host: {e}"))?;
                self.sh.stats.hosts_spawned.fetch_add(1, Ordering::Relaxed);
                Ok(Arc::new(h))
            }
        }
    }
}

impl Device for KfdDevice {
    fn name(&self) -> &'static str {
        "kfd"
    }

    fn gpu_count(&self) -> u32 {
        self.sh.gpus.len() as u32
    }

    fn render_minor(&self, index: u32) -> u32 {
        self.sh
            .gpus
            .get(index as usize)
            .map(|g| g.render_minor)
            .unwrap_or(128 + index)
    }

    fn open(&self, caller: &Caller, kind: FileKind) -> Result<Box<dyn DeviceContext>, Errno> {
        let shadow = self.proc_mem(caller.tgid)?;
        let owner: Arc<dyn Owner> = match kind {
            FileKind::Kfd => self.owner_for(caller)?,
            FileKind::Render(i) => {
                let g = self.sh.gpus.get(i as usize).ok_or(Errno::ENODEV)?;
                let fd = open_rw(&render_path(&self.sh.cfg, g.render_minor))?;
                Arc::new(InProcOwner {
                    fd,
                    relay: self.sh.relay.clone(),
                })
            }
        };
        self.sh.stats.contexts.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(KfdFile {
            sh: self.sh.clone(),
            kind,
            owner,
            shadow,
            st: Mutex::new(FileState::default()),
        }))
    }

    fn process_memory(&self, tgid: u32) -> Result<Arc<dyn ProcessMemory>, Errno> {
        Ok(self.proc_mem(tgid)?)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let s = &self.sh.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let r = &self.sh.relay.stats;
        vec![
            ("kfd_contexts", l(&s.contexts)),
            ("kfd_forwarded", l(&s.forwarded)),
            ("kfd_refused_policy", l(&s.refused_policy)),
            ("kfd_offsets_translated", l(&s.offsets_translated)),
            ("kfd_hosts_spawned", l(&s.hosts_spawned)),
            ("relay_pairs", l(&r.pairs)),
            ("relay_words", l(&r.relayed_words)),
            ("relay_polls", l(&r.polls)),
        ]
    }
}

fn render_path(cfg: &KfdConfig, minor: u32) -> PathBuf {
    cfg.render_dir.join(format!("renderD{minor}"))
}

/// A range of the client's memfd standing for a range of the kernel's mmap space.
#[derive(Debug)]
struct Region {
    kbase: u64,
    len: u64,
    sbase: u64,
    relay: Option<u64>,
    handle: Option<u64>,
}

#[derive(Default)]
struct FileState {
    regions: Vec<Region>,
    /// The owner's render file per GPU index (ACQUIRE_VM).
    render: HashMap<u32, OwnedFd>,
    client_created_process: bool,
    released: bool,
}

/// One client open, forwarded to its kernel context.
struct KfdFile {
    sh: Arc<Shared>,
    kind: FileKind,
    owner: Arc<dyn Owner>,
    shadow: Arc<ProcMem>,
    st: Mutex<FileState>,
}

fn refuse(sh: &Shared, e: Errno, msg: &str) -> Errno {
    sh.stats.refused_policy.fetch_add(1, Ordering::Relaxed);
    log::warn!("kfd: {msg}: {e}");
    e
}

impl KfdFile {
    fn lock(&self) -> std::sync::MutexGuard<'_, FileState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Policy, then the owner's copy of the call.
    fn prepare(&self, env: &dyn Env, call: &IoctlCall) -> Result<FwdReq, Errno> {
        let nr = call.def.nr;
        let sd = call.variant.arg;
        if self.kind == FileKind::Kfd {
            match nr {
                0x20 => {
                    return Err(refuse(&self.sh, Errno::EOPNOTSUPP, "SVM refused: forwarded contexts cannot bind the client's address space (the topology clears SVMAPISupported; use HSA_USE_SVM=0)"))
                }
                0x16 if sd.and_then(|s| s.get(&call.arg, "flags")).unwrap_or(0) & KFD_IOC_ALLOC_MEM_FLAGS_USERPTR as u64 != 0 => {
                    return Err(refuse(&self.sh, Errno::EOPNOTSUPP, "USERPTR refused: the kernel context is not in the client's address space; run with HSA_USERPTR_FOR_PAGED_MEM=0 (kfdmux run sets it) so ROCm allocates host memory as GTT"))
                }
                0x22 => return Err(refuse(&self.sh, Errno::EOPNOTSUPP, "CRIU refused: checkpointing a forwarded context is not supported")),
                0x1F | 0x24 if !env.can_give_fd() => {
                    return Err(refuse(&self.sh, Errno::EOPNOTSUPP, &format!("{} refused: {}", call.def.name, crate::device::NO_FD_CHANNEL)))
                }
                0x27 => {
                    // The client's context already is its own kernel context.
                    let mut st = self.lock();
                    if st.client_created_process {
                        return Err(Errno::EINVAL);
                    }
                    st.client_created_process = true;
                    return Err(Errno(0));
                }
                _ => {}
            }
        }
        let mut req = FwdReq {
            cmd: call.cmd,
            arg: call.arg.clone(),
            ..Default::default()
        };
        let Some(sd) = sd else { return Ok(req) };
        for f in sd.fields {
            match &f.kind {
                Kind::Pointer(_) => {
                    // Never let the kernel write to a client address in the owner's memory.
                    let data = call
                        .arrays
                        .iter()
                        .find(|a| a.field == f.name)
                        .map(|a| a.data.clone())
                        .unwrap_or_default();
                    req.ptrs.push(PtrBuf {
                        off: f.offset,
                        size: f.size,
                        data,
                    });
                }
                Kind::Fd if f.io == crate::abi::table::Io::Out && env.can_give_fd() => {
                    // Filled by the kernel; goes to the client through env.give_fd.
                    req.out_fd_fields.push((f.offset, f.size));
                }
                Kind::Fd if f.io.is_out() => {
                    return Err(refuse(
                        &self.sh,
                        Errno::EOPNOTSUPP,
                        &format!(
                            "{}.{}: fds coming out of the kernel cannot reach a FUSE client",
                            call.def.name, f.name
                        ),
                    ));
                }
                Kind::Fd => {
                    let cfd = read_uint(&call.arg, f.offset, f.size) as i32;
                    let fd = self.take_client_fd(env, call, nr, cfd)?;
                    req.fds.push((f.offset, f.size, fd));
                }
                _ => {}
            }
        }
        Ok(req)
    }

    /// The owner's fd for the client's fd `cfd`: for ACQUIRE_VM the owner's own render node of
    /// the GPU the client's render file stands for; otherwise the client's file itself.
    fn take_client_fd(
        &self,
        env: &dyn Env,
        call: &IoctlCall,
        nr: u32,
        cfd: i32,
    ) -> Result<OwnedFd, Errno> {
        if nr == 0x15 {
            let which = env
                .file_of_fd(&call.caller, cfd)
                .map_err(|_| Errno::EINVAL)?;
            let Some((FileKind::Render(i), _)) = which else {
                log::debug!("kfd: ACQUIRE_VM fd {cfd} is not one of our render nodes: EINVAL");
                return Err(Errno::EINVAL);
            };
            let mut st = self.lock();
            if let std::collections::hash_map::Entry::Vacant(e) = st.render.entry(i) {
                let g = self.sh.gpus.get(i as usize).ok_or(Errno::EINVAL)?;
                e.insert(open_rw(&render_path(&self.sh.cfg, g.render_minor))?);
            }
            let fd = st.render.get(&i).ok_or(Errno::EIO)?;
            return fd.try_clone().map_err(|e| Errno::from_io(&e));
        }
        crate::transport::sys::take_fd(call.caller.tgid, cfd).map_err(|e| {
            log::debug!(
                "kfd: {}: taking fd {cfd} of pid {}: {e}",
                call.def.name,
                call.caller.tgid
            );
            Errno::EBADF
        })
    }

    /// Hands the fds the kernel returned to the client (CUSE + the preload channel) and writes
    /// the numbers it will know them by into the call. Fds not handed over are closed.
    fn give_out_fds(
        &self,
        env: &dyn Env,
        call: &mut IoctlCall,
        fields: &[(usize, usize)],
        fds: Vec<OwnedFd>,
    ) -> Result<(), Errno> {
        if fds.len() != fields.len() {
            log::warn!(
                "kfd: {}: {} fd(s) back for {} fd field(s)",
                call.def.name,
                fds.len(),
                fields.len()
            );
            return Err(Errno::EIO);
        }
        // EXPORT_DMABUF's flags ask for O_CLOEXEC; anon_inode_getfd of SMI_EVENTS does not.
        let cloexec = call.def.nr == 0x24
            && call
                .variant
                .arg
                .and_then(|sd| sd.get(&call.arg, "flags"))
                .unwrap_or(0)
                & libc::O_CLOEXEC as u64
                != 0;
        let what = format!("kfd: {}", call.def.name);
        for (&(off, size), fd) in fields.iter().zip(fds) {
            let n = env.give_fd(&call.caller, fd, cloexec, &what)?;
            write_uint(&mut call.arg, off, size, n as u64);
        }
        Ok(())
    }

    /// Copies the kernel's outputs into the client's call, restoring the client's pointer and
    /// fd values and translating mmap offsets.
    fn finish(&self, call: &mut IoctlCall, mut req: FwdReq, r: Result<(), Errno>) {
        let Some(sd) = call.variant.arg else { return };
        for p in &req.ptrs {
            write_uint(
                &mut req.arg,
                p.off,
                p.size,
                read_uint(&call.arg, p.off, p.size),
            );
            if r.is_ok() {
                if let Some(a) = call.arrays.iter_mut().find(|a| {
                    sd.fields
                        .iter()
                        .any(|f| f.offset == p.off && f.name == a.field)
                }) {
                    if a.io.is_out() && a.data.len() == p.data.len() {
                        a.data.copy_from_slice(&p.data);
                    }
                }
            }
        }
        for (off, size, _) in &req.fds {
            write_uint(&mut req.arg, *off, *size, read_uint(&call.arg, *off, *size));
        }
        let n = call.arg.len().min(req.arg.len());
        call.arg[..n].copy_from_slice(&req.arg[..n]);
        if r.is_ok() && self.kind == FileKind::Kfd {
            self.translate(call);
        }
        // Whatever happened, no kernel mmap offset reaches the client.
        for f in sd
            .fields
            .iter()
            .filter(|f| matches!(f.kind, Kind::MmapOffset) && f.io.is_out())
        {
            let v = read_uint(&call.arg, f.offset, f.size);
            if v >> 62 != 0 {
                log::warn!(
                    "kfd: {}.{}: untranslated kernel mmap offset {v:#x} hidden",
                    call.def.name,
                    f.name
                );
                write_uint(&mut call.arg, f.offset, f.size, 0);
            }
        }
    }

    /// Replaces the kernel's mmap offsets in a successful call's outputs by the client's.
    fn translate(&self, call: &mut IoctlCall) {
        let Some(sd) = call.variant.arg else { return };
        let get = |n: &str| sd.get(&call.arg, n).unwrap_or(0);
        let (field, new) = match call.def.nr {
            0x16 => {
                let (flags, koff, size, handle) = (
                    get("flags") as u32,
                    get("mmap_offset"),
                    get("size"),
                    get("handle"),
                );
                if koff == 0 {
                    return;
                }
                let len = page_align(size).unwrap_or(size);
                let relay = if flags
                    & (KFD_IOC_ALLOC_MEM_FLAGS_DOORBELL | KFD_IOC_ALLOC_MEM_FLAGS_MMIO_REMAP)
                    != 0
                {
                    Some(RelayDir::ShadowToReal)
                } else {
                    None
                };
                (
                    "mmap_offset",
                    self.region(koff, koff, len, relay, Some(handle)),
                )
            }
            0x02 => {
                let koff = get("doorbell_offset");
                let gfx = self
                    .sh
                    .gpus
                    .iter()
                    .find(|g| g.gpu_id as u64 == get("gpu_id"))
                    .map(|g| g.gfx_target_version)
                    .unwrap_or(90000);
                let slice = if gfx >= 90000 { 8192 } else { 4096 };
                (
                    "doorbell_offset",
                    self.region(
                        koff & !(slice - 1),
                        koff,
                        slice,
                        Some(RelayDir::ShadowToReal),
                        None,
                    ),
                )
            }
            0x08 => {
                let koff = get("event_page_offset");
                if koff == 0 {
                    return;
                }
                // KFD_SIGNAL_EVENT_LIMIT × 8 bytes, written by the GPU.
                (
                    "event_page_offset",
                    self.region(koff, koff, 4096 * 8, Some(RelayDir::RealToShadow), None),
                )
            }
            0x17 => {
                self.forget_handle(get("handle"));
                return;
            }
            _ => return,
        };
        let v = new.unwrap_or(0);
        self.sh
            .stats
            .offsets_translated
            .fetch_add(1, Ordering::Relaxed);
        sd.set(&mut call.arg, field, v);
    }

    /// The client offset of kernel offset `koff` inside the kernel range `[kbase, kbase+len)`,
    /// creating the shadow range (and its relay) on first use. None: no shadow could be made.
    fn region(
        &self,
        kbase: u64,
        koff: u64,
        len: u64,
        relay: Option<RelayDir>,
        handle: Option<u64>,
    ) -> Option<u64> {
        let mut st = self.lock();
        if let Some(r) = st.regions.iter().find(|r| {
            koff >= r.kbase && koff < r.kbase + r.len && r.handle.is_none() == handle.is_none()
        }) {
            return Some(r.sbase + (koff - r.kbase));
        }
        // Keep the kernel's alignment (libhsakmt masks doorbell offsets with the slice size).
        let align = len.next_power_of_two().min(1 << 21);
        let sbase = match self.shadow.alloc_aligned(len, align) {
            Ok(o) => o,
            Err(e) => {
                log::warn!("kfd: no shadow range of {len:#x} bytes: {e}");
                return None;
            }
        };
        let relay = relay.and_then(|dir| match self.owner.relay(kbase, len, self.shadow.file(), sbase, dir) {
            Ok(id) => Some(id),
            Err(e) => {
                log::warn!("kfd: no relay for kernel range {kbase:#x}+{len:#x}: {e}; the client's page will not reach the hardware");
                None
            }
        });
        log::debug!("kfd: kernel mmap range {kbase:#x}+{len:#x} is client offset {sbase:#x} (relay {relay:?})");
        st.regions.push(Region {
            kbase,
            len,
            sbase,
            relay,
            handle,
        });
        Some(sbase + (koff - kbase))
    }

    fn forget_handle(&self, handle: u64) {
        let mut st = self.lock();
        if let Some(i) = st.regions.iter().position(|r| r.handle == Some(handle)) {
            let r = st.regions.remove(i);
            drop(st);
            self.drop_region(r);
        }
    }

    fn drop_region(&self, r: Region) {
        if let Some(id) = r.relay {
            self.owner.unrelay(id);
        }
        self.shadow.free(r.sbase, r.len);
    }
}

impl DeviceContext for KfdFile {
    fn ioctl(&self, env: &dyn Env, mut call: IoctlCall, mut done: Done) {
        let req = match self.prepare(env, &call) {
            Ok(r) => r,
            Err(Errno(0)) => return done.complete(call, Ok(())),
            Err(e) => return done.complete(call, Err(e)),
        };
        self.sh.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        if self.kind == FileKind::Kfd && call.def.nr == 0x0C {
            // WAIT_EVENTS may block for ever: not on a transport worker. FUSE_INTERRUPT cancels
            // the owner's ioctl (EINTR), as a signal would interrupt the kernel's wait.
            let cancel = Arc::new(CancelToken::default());
            let c = cancel.clone();
            if !done.on_interrupt(Box::new(move || c.cancel())) {
                return done.complete(call, Err(Errno::EINTR));
            }
            let owner = self.owner.clone();
            let me = KfdFileRef {
                sh: self.sh.clone(),
                kind: self.kind,
            };
            let spawned = std::thread::Builder::new()
                .name("kfdmux-wait".into())
                .spawn(move || {
                    let (req, r) = owner.ioctl(req, &cancel);
                    me.finish_plain(&mut call, req, r);
                    done.complete(call, r);
                });
            if let Err(e) = spawned {
                log::warn!("kfd: no thread for WAIT_EVENTS: {e}");
            }
            return;
        }
        let (mut req, mut r) = self.owner.ioctl(req, &CancelToken::default());
        if let Err(e) = r {
            log::debug!("kfd: {} -> {e}", call.def.name);
        }
        let out_fds = std::mem::take(&mut req.out_fds);
        let fields = req.out_fd_fields.clone();
        self.finish(&mut call, req, r);
        if r.is_ok() {
            r = self.give_out_fds(env, &mut call, &fields, out_fds);
        }
        done.complete(call, r);
    }

    fn release(&self) {
        let (regions, render) = {
            let mut st = self.lock();
            if st.released {
                return;
            }
            st.released = true;
            (
                std::mem::take(&mut st.regions),
                std::mem::take(&mut st.render),
            )
        };
        for r in regions {
            self.drop_region(r);
        }
        drop(render);
        self.sh.stats.contexts.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for KfdFile {
    fn drop(&mut self) {
        self.release();
    }
}

/// What WAIT_EVENTS' thread needs to finish a call (no mmap offsets there).
struct KfdFileRef {
    sh: Arc<Shared>,
    kind: FileKind,
}

impl KfdFileRef {
    fn finish_plain(&self, call: &mut IoctlCall, mut req: FwdReq, r: Result<(), Errno>) {
        let _ = (&self.sh, self.kind);
        let Some(sd) = call.variant.arg else { return };
        for p in &req.ptrs {
            write_uint(
                &mut req.arg,
                p.off,
                p.size,
                read_uint(&call.arg, p.off, p.size),
            );
            if r.is_ok() {
                let name = sd.fields.iter().find(|f| f.offset == p.off).map(|f| f.name);
                if let Some(a) = call.arrays.iter_mut().find(|a| Some(a.field) == name) {
                    if a.io.is_out() && a.data.len() == p.data.len() {
                        a.data.copy_from_slice(&p.data);
                    }
                }
            }
        }
        let n = call.arg.len().min(req.arg.len());
        call.arg[..n].copy_from_slice(&req.arg[..n]);
    }
}
