//! `kfdmux replay`: re-issues a recorded trace against a live device and compares.
//!
//! Calls are issued in their recorded start order. Before each one, replay waits for every
//! earlier call that the recording shows finished before this one started; a call that was
//! still blocked in the recording (a `WAIT_EVENTS` woken by a later `SET_EVENT`) is left in
//! flight, so several contexts keep their interleaving. Values the device chooses are mapped
//! from recorded to live by the schema's field roles: GPU ids by the device's GPU order (trace
//! header), buffer/event/queue handles and mmap offsets as their outputs are seen, descriptors
//! by what they referred to. Errno and every output field that is not volatile, a descriptor or
//! a pointer are compared; a difference names the call and the field.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abi::table::{
    ioc_size, read_uint, write_uint, Dir, FieldDef, HandleKind, Io, IoctlVariant, Kind, StructDef,
};
use crate::device::sim::{SimConfig, SimDevice};
use crate::device::{
    ArrayBuf, Caller, Device, DeviceContext, Done, DoneSink, Env, FileKind, IoctlCall, IoctlResult,
};
use crate::errno::Errno;
use crate::mux::Mux;

use super::show::{call_name, fmt_field, lookup};
use super::{errno_name, Event, FdRec, FdTarget, IoctlRec, Record, Stage, Trace};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayDevice {
    /// The simulated KFD, built with the GPUs the trace header names.
    Sim,
    /// The real /dev/kfd.
    Kfd,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// Call the device contexts directly (no kernel, no transport).
    Direct,
    /// Serve the device on a temporary FUSE mount in this process and issue real ioctl(2)s.
    Fuse,
    /// Serve it as CUSE devices (needs a CUSE kernel).
    Cuse,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ReplayOptions {
    /// The trace file.
    pub path: PathBuf,
    #[arg(long, value_enum, default_value = "sim")]
    pub device: ReplayDevice,
    #[arg(long, value_enum, default_value = "direct")]
    pub via: Via,
    /// Replay only these contexts (repeatable); the others' calls are left out.
    #[arg(long = "context", value_name = "N")]
    pub contexts: Vec<u64>,
    /// GPUs of the replay device (default: the trace header's `gpus`).
    #[arg(long, value_name = "SPEC")]
    pub gpus: Option<String>,
    /// KFD minor version the replay sim reports (default: the trace header's). A different
    /// value shows replay catching a changed device.
    #[arg(long, value_name = "N")]
    pub kfd_minor: Option<u32>,
    /// The kernel's kfd file (`--device kfd`).
    #[arg(long, value_name = "PATH", default_value = "/dev/kfd")]
    pub kfd_path: PathBuf,
    /// The kernel's kfd sysfs directory holding `topology/` (`--device kfd`).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/sys/devices/virtual/kfd/kfd"
    )]
    pub kfd_sysfs: PathBuf,
    /// How replayed contexts get kernel contexts (`--device kfd`).
    #[arg(long, value_enum, default_value = "auto")]
    pub kfd_contexts: crate::device::kfd::ContextMode,
    /// Differences printed before the rest are only counted.
    #[arg(long, default_value_t = 50)]
    pub max_diffs: usize,
    /// Print every call as it is replayed.
    #[arg(long)]
    pub verbose: bool,
}

impl ReplayOptions {
    pub fn new(path: &Path, via: Via) -> ReplayOptions {
        ReplayOptions {
            path: path.to_path_buf(),
            device: ReplayDevice::Sim,
            via,
            contexts: Vec::new(),
            gpus: None,
            kfd_minor: None,
            kfd_path: PathBuf::from("/dev/kfd"),
            kfd_sysfs: PathBuf::from("/sys/devices/virtual/kfd/kfd"),
            kfd_contexts: crate::device::kfd::ContextMode::Auto,
            max_diffs: 50,
            verbose: false,
        }
    }
}

/// One difference between the recording and the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    pub seq: u64,
    pub ctx: u64,
    /// The call (`GET_VERSION`, `open kfd`, …).
    pub call: String,
    /// The field (`minor_version`, `device_ids_array_ptr[1]`, `errno`, …).
    pub field: String,
    pub recorded: String,
    pub replayed: String,
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{} ctx {} {}: {}: recorded {}, replayed {}",
            self.seq, self.ctx, self.call, self.field, self.recorded, self.replayed
        )
    }
}

#[derive(Debug, Default)]
pub struct Report {
    /// Ioctls issued.
    pub calls: usize,
    /// Opens replayed.
    pub opens: usize,
    /// Records not replayable, with the reason: (seq, call, why).
    pub skipped: Vec<(u64, String, String)>,
    pub diffs: Vec<Diff>,
}

impl Report {
    pub fn matched(&self) -> bool {
        self.diffs.is_empty()
    }
}

// ---- value mapping --------------------------------------------------------------------------

/// What a value is, for mapping recorded values to live ones.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Class {
    Gpu,
    Handle(HandleKind),
    Mmap,
}

fn class_of(k: &Kind) -> Option<Class> {
    match k {
        Kind::GpuId => Some(Class::Gpu),
        Kind::Handle(h) => Some(Class::Handle(*h)),
        Kind::MmapOffset => Some(Class::Mmap),
        _ => None,
    }
}

/// Roles of the elements of integer arrays, which the schema does not type (its notes say
/// "gpu_ids" and "queue ids"); keyed by the pointer field's name.
fn elem_class(pointer_field: &str) -> Option<Class> {
    match pointer_field {
        "device_ids_array_ptr" => Some(Class::Gpu),
        "queue_array_ptr" | "queue_ids_ptr" => Some(Class::Handle(HandleKind::Queue)),
        _ => None,
    }
}

#[derive(Default)]
struct Maps(HashMap<(Class, u64), u64>);

impl Maps {
    fn remap(&self, c: Class, v: u64) -> u64 {
        if v == 0 {
            return 0;
        }
        if let Some(x) = self.0.get(&(c, v)) {
            return *x;
        }
        // CREATE_EVENT's event_page_offset carries a buffer handle in and an offset out.
        if c == Class::Mmap {
            if let Some(x) = self.0.get(&(Class::Handle(HandleKind::Buffer), v)) {
                return *x;
            }
        }
        v
    }
    fn learn(&mut self, c: Class, rec: u64, live: u64) {
        if rec != 0 && live != 0 {
            self.0.insert((c, rec), live);
        }
    }
}

/// Rewrites the role-carrying input fields of one struct in place.
fn remap_struct(maps: &Maps, sd: &StructDef, b: &mut [u8]) {
    let len = b.len();
    for f in sd.fields.iter().filter(|f| {
        f.io.is_in()
            && f.offset + f.size <= len
            && !matches!(f.ty, crate::abi::table::Ty::Array(..))
    }) {
        if let Some(c) = class_of(&f.kind) {
            let v = read_uint(b, f.offset, f.size);
            write_uint(b, f.offset, f.size, maps.remap(c, v));
        }
    }
}

fn remap_array(maps: &Maps, sd: &StructDef, field: &str, data: &mut [u8]) {
    let Some(Kind::Pointer(p)) = sd.field(field).map(|f| &f.kind) else {
        return;
    };
    if p.elem_size == 0 {
        return;
    }
    for chunk in data.chunks_mut(p.elem_size) {
        match (p.elem, elem_class(field)) {
            (Some(es), _) => remap_struct(maps, es, chunk),
            (None, Some(c)) if chunk.len() == p.elem_size && p.elem_size <= 8 => {
                let v = read_uint(chunk, 0, p.elem_size);
                write_uint(chunk, 0, p.elem_size, maps.remap(c, v));
            }
            _ => {}
        }
    }
}

struct Cmp<'a> {
    maps: &'a mut Maps,
    out: Vec<(String, String, String)>,
    /// Recorded and live (thread id, process id) of the caller.
    rec_who: (u32, u32),
    live_who: (u32, u32),
}

/// A field that reports or names a process id (the schema has no role for it: DRM_GET_CLIENT's
/// `pid`, the debugger's target `pid`).
fn is_pid_field(f: &FieldDef) -> bool {
    f.name == "pid" && matches!(f.kind, Kind::Plain) && (f.size == 4 || f.size == 8)
}

impl Cmp<'_> {
    /// Compares the value at `span` (offset, size) of the recorded and live bytes.
    fn value(
        &mut self,
        name: String,
        c: Option<Class>,
        f: Option<&FieldDef>,
        r: &[u8],
        l: &[u8],
        span: (usize, usize),
    ) {
        let (off, size) = span;
        let rv = read_uint(r, off, size);
        let lv = read_uint(l, off, size);
        let show = |b: &[u8], v: u64| match f {
            Some(f) => fmt_field(f, b),
            None => format!("{v:#x}"),
        };
        match c {
            Some(Class::Gpu) => {
                if self.maps.remap(Class::Gpu, rv) != lv {
                    self.out.push((name, show(r, rv), show(l, lv)));
                }
            }
            Some(c) => {
                if (rv == 0) != (lv == 0) {
                    self.out.push((name, show(r, rv), show(l, lv)));
                }
                self.maps.learn(c, rv, lv);
            }
            None => {
                if r.get(off..off + size) != l.get(off..off + size) {
                    self.out.push((name, show(r, rv), show(l, lv)));
                }
            }
        }
    }

    /// Compares the output fields of one struct (all fields with `all`, for array elements).
    fn fields(
        &mut self,
        sd: &StructDef,
        r: &[u8],
        l: &[u8],
        limit: usize,
        prefix: &str,
        all: bool,
    ) {
        for f in sd.fields {
            if f.offset + f.size > limit || !(all || f.io.is_out()) {
                continue;
            }
            if matches!(
                f.kind,
                Kind::Pad | Kind::Volatile | Kind::Pointer(_) | Kind::Fd
            ) {
                continue;
            }
            if is_pid_field(f) {
                let (rv, lv) = (
                    read_uint(r, f.offset, f.size),
                    read_uint(l, f.offset, f.size),
                );
                // The caller's thread or process id in the recording must be the live caller's.
                let was_caller = rv == self.rec_who.0 as u64 || rv == self.rec_who.1 as u64;
                let is_caller = lv == self.live_who.0 as u64 || lv == self.live_who.1 as u64;
                if was_caller != is_caller || (!was_caller && rv != lv) {
                    self.out.push((
                        format!("{prefix}{}", f.name),
                        rv.to_string(),
                        lv.to_string(),
                    ));
                }
                continue;
            }
            self.value(
                format!("{prefix}{}", f.name),
                class_of(&f.kind),
                Some(f),
                r,
                l,
                (f.offset, f.size),
            );
        }
    }

    fn array(&mut self, sd: &StructDef, field: &str, r: &[u8], l: &[u8]) {
        let Some(Kind::Pointer(p)) = sd.field(field).map(|f| &f.kind) else {
            if r != l {
                self.out.push((
                    format!("{field}[]"),
                    format!("{} bytes", r.len()),
                    "different bytes".into(),
                ));
            }
            return;
        };
        // The device may write fewer elements than the buffer holds (the kernel writes
        // `num_of_nodes` apertures); through a transport the rest of the replay's buffer is
        // simply untouched, so only what the recording holds is compared.
        if l.len() < r.len() {
            self.out.push((
                format!("{field}[]"),
                format!("{} bytes", r.len()),
                format!("{} bytes", l.len()),
            ));
            return;
        }
        let l = &l[..r.len()];
        let es = p.elem_size.max(1);
        for (i, (rc, lc)) in r.chunks(es).zip(l.chunks(es)).enumerate() {
            match p.elem {
                Some(e) => self.fields(e, rc, lc, rc.len(), &format!("{field}[{i}]."), true),
                None if es <= 8 => self.value(
                    format!("{field}[{i}]"),
                    elem_class(field),
                    None,
                    rc,
                    lc,
                    (0, es),
                ),
                None => {
                    if rc != lc {
                        self.out.push((
                            format!("{field}[{i}]"),
                            "bytes".into(),
                            "different bytes".into(),
                        ));
                    }
                }
            }
        }
    }
}

// ---- backends -------------------------------------------------------------------------------

/// One call as the backend issues it: inputs already remapped.
struct LiveCall {
    seq: u64,
    cmd: u32,
    caller: Caller,
    arg: Vec<u8>,
    /// (field, io, recorded address, input bytes or zeroes of the recorded length).
    arrays: Vec<(String, Io, u64, Vec<u8>)>,
    fds: Vec<FdRec>,
}

/// What a backend answers.
struct Completion {
    seq: u64,
    /// The live caller's (thread id, process id), for fields that report the caller.
    who: (u32, u32),
    result: i32,
    arg: Vec<u8>,
    arrays: Vec<(String, Vec<u8>)>,
}

trait Backend {
    fn gpu_ids(&self) -> Vec<u32>;
    /// The process id the live device sees for the recorded caller `tgid`.
    fn live_tgid(&self, tgid: u32) -> u32;
    fn open(&mut self, ctx: u64, caller: Caller, kind: FileKind) -> Result<(), Errno>;
    fn release(&mut self, ctx: u64);
    fn issue(&mut self, ctx: u64, call: LiveCall, tx: Sender<Completion>);
    /// Releases whatever is still open and stops.
    fn finish(&mut self);
}

fn res(r: &IoctlResult) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => -e.0,
    }
}

/// Sends the device's answer back to the replay loop.
struct ChanSink {
    seq: u64,
    tx: Sender<Completion>,
    /// The bytes each array came in with: a device hands back only what it wrote, and past
    /// that the caller's buffer keeps these (as through a transport).
    inputs: Vec<Vec<u8>>,
}

impl DoneSink for ChanSink {
    fn complete(self: Box<Self>, call: IoctlCall, result: IoctlResult) {
        let arrays = call
            .arrays
            .into_iter()
            .zip(self.inputs)
            .map(|(a, input)| {
                let mut data = a.data;
                if data.len() < input.len() {
                    data.extend_from_slice(&input[data.len()..]);
                }
                (a.field.to_string(), data)
            })
            .collect();
        let who = (call.caller.pid, call.caller.tgid);
        let _ = self.tx.send(Completion {
            seq: self.seq,
            who,
            result: res(&result),
            arg: call.arg,
            arrays,
        });
    }
    fn on_interrupt(&mut self, _cancel: Box<dyn FnOnce() + Send>) -> bool {
        true // replay never interrupts
    }
}

/// The direct backend's Env: descriptors resolve to what they referred to in the recording,
/// provided the replay has such a file open.
struct ReplayEnv<'a> {
    fds: &'a [FdRec],
    live: &'a HashMap<(FileKind, u32), usize>,
}

impl Env for ReplayEnv<'_> {
    fn file_of_fd(&self, _caller: &Caller, fd: i32) -> Result<Option<(FileKind, u32)>, Errno> {
        let Some(f) = self.fds.iter().find(|f| f.fd == fd) else {
            return Err(Errno::EBADF);
        };
        let want = match f.target {
            FdTarget::Kfd { tgid } => (FileKind::Kfd, unreal_pid(tgid)),
            FdTarget::Render { index, tgid } => (FileKind::Render(index), unreal_pid(tgid)),
            FdTarget::Other => return Ok(None),
            FdTarget::Bad(e) => return Err(Errno(e)),
        };
        Ok(self.live.get(&want).is_some_and(|n| *n > 0).then_some(want))
    }
}

/// The schema entry, full-size argument and arrays of a call, as the mux would build them.
fn build_call(kind: FileKind, c: &LiveCall) -> Result<IoctlCall, Errno> {
    let (def, variant) = Mux::lookup_cmd(kind, c.cmd)?;
    let full = variant
        .arg
        .map(|a| a.size)
        .unwrap_or(0)
        .max(ioc_size(c.cmd) as usize);
    let mut arg = vec![0u8; full];
    let n = c.arg.len().min(full);
    arg[..n].copy_from_slice(&c.arg[..n]);
    let mut arrays = Vec::new();
    if let Some(sd) = variant.arg {
        for r in crate::marshal::plan(sd, &arg)? {
            let mut data = c
                .arrays
                .iter()
                .find(|a| a.0 == r.field)
                .map(|a| a.3.clone())
                .unwrap_or_default();
            data.resize(r.len, 0);
            if !r.io.is_in() {
                data.iter_mut().for_each(|b| *b = 0);
            }
            arrays.push(ArrayBuf {
                field: r.field,
                addr: r.addr,
                io: r.io,
                data,
            });
        }
    }
    Ok(IoctlCall {
        cmd: c.cmd,
        def,
        variant,
        arg,
        arrays,
        caller: c.caller,
    })
}

/// Anonymous mappings of the replay process standing in for the recorded process's USERPTR
/// memory: an ALLOC_MEMORY_OF_GPU with the USERPTR flag names a CPU address (`mmap_offset`)
/// that the device checks is mapped in the caller (EFAULT otherwise).
#[derive(Default)]
struct Userptrs(Vec<(usize, usize)>);

impl Userptrs {
    fn rewrite(&mut self, kind: FileKind, cmd: u32, arg: &mut [u8]) {
        if kind != FileKind::Kfd
            || crate::abi::table::ioc_nr(cmd) != crate::abi::KFD_NR_ALLOC_MEMORY_OF_GPU
        {
            return;
        }
        let sd = &crate::abi::S_KFD_IOCTL_ALLOC_MEMORY_OF_GPU_ARGS;
        let flags = sd.get(arg, "flags").unwrap_or(0);
        let size = sd.get(arg, "size").unwrap_or(0) as usize;
        if flags & crate::abi::KFD_IOC_ALLOC_MEM_FLAGS_USERPTR as u64 == 0
            || size == 0
            || size > 1 << 40
        {
            return;
        }
        // SAFETY: a fresh private anonymous mapping; MAP_NORESERVE keeps large ones cheap.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            log::warn!("replay: no memory for a {size}-byte USERPTR range");
            return;
        }
        self.0.push((p as usize, size));
        sd.set(arg, "mmap_offset", p as u64);
    }
}

impl Drop for Userptrs {
    fn drop(&mut self) {
        for (addr, len) in self.0.drain(..) {
            // SAFETY: a mapping made by `rewrite`; the devices that were told about it are gone.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
        }
    }
}

struct DirectBackend {
    device: Arc<dyn Device>,
    gpu_ids: Vec<u32>,
    userptrs: Userptrs,
    ctxs: HashMap<u64, (Box<dyn DeviceContext>, FileKind, u32)>,
    live: HashMap<(FileKind, u32), usize>,
}

/// A process id no live process can have (above the kernel's `pid_max` limit of 2^22): the
/// recorded processes stay distinct for the device (it keys per-process state by tgid) without
/// being mistaken for whatever process has a recorded pid now.
fn unreal_pid(pid: u32) -> u32 {
    pid | 1 << 30
}

/// The direct replay's caller: the recorded process (as an unreal tgid) on a thread whose
/// address space is the replay's own, where the device looks up USERPTR ranges
/// (`/proc/<pid>/maps`) and where [`Userptrs`] put them.
fn unreal(c: Caller) -> Caller {
    Caller {
        pid: std::process::id(),
        tgid: unreal_pid(c.tgid),
        ..c
    }
}

impl Backend for DirectBackend {
    fn gpu_ids(&self) -> Vec<u32> {
        self.gpu_ids.clone()
    }
    fn live_tgid(&self, tgid: u32) -> u32 {
        unreal_pid(tgid)
    }
    fn open(&mut self, ctx: u64, caller: Caller, kind: FileKind) -> Result<(), Errno> {
        let caller = unreal(caller);
        let c = self.device.open(&caller, kind)?;
        self.ctxs.insert(ctx, (c, kind, caller.tgid));
        *self.live.entry((kind, caller.tgid)).or_default() += 1;
        Ok(())
    }
    fn release(&mut self, ctx: u64) {
        if let Some((c, kind, tgid)) = self.ctxs.remove(&ctx) {
            c.release();
            if let Some(n) = self.live.get_mut(&(kind, tgid)) {
                *n = n.saturating_sub(1);
            }
        }
    }
    fn issue(&mut self, ctx: u64, c: LiveCall, tx: Sender<Completion>) {
        let Some((dc, kind, _)) = self.ctxs.get(&ctx) else {
            let _ = tx.send(Completion {
                seq: c.seq,
                who: (0, 0),
                result: -libc::EBADF,
                arg: c.arg,
                arrays: Vec::new(),
            });
            return;
        };
        match build_call(*kind, &c) {
            Ok(mut call) => {
                call.caller = unreal(call.caller);
                self.userptrs.rewrite(*kind, call.cmd, &mut call.arg);
                let env = ReplayEnv {
                    fds: &c.fds,
                    live: &self.live,
                };
                let inputs = call.arrays.iter().map(|a| a.data.clone()).collect();
                let sink = ChanSink {
                    seq: c.seq,
                    tx,
                    inputs,
                };
                dc.ioctl(&env, call, Done::new(Box::new(sink)));
            }
            Err(e) => {
                let _ = tx.send(Completion {
                    seq: c.seq,
                    who: (0, 0),
                    result: -e.0,
                    arg: c.arg,
                    arrays: Vec::new(),
                });
            }
        }
    }
    fn finish(&mut self) {
        let ctxs: Vec<u64> = self.ctxs.keys().copied().collect();
        for c in ctxs {
            self.release(c);
        }
    }
}

/// Serves the device on a temporary FUSE mount inside this process and issues real ioctls.
struct FuseBackend {
    device: Arc<dyn Device>,
    gpu_ids: Vec<u32>,
    mux: Arc<Mux>,
    dir: PathBuf,
    mount: PathBuf,
    runner: Option<std::thread::JoinHandle<()>>,
    dev: Option<u64>,
    /// recorded context → (fd, kind, recorded opener tgid)
    files: HashMap<u64, (Arc<OwnedFd>, FileKind, u32)>,
    devnull: Option<OwnedFd>,
    userptrs: Userptrs,
    /// `--via cuse`: the CUSE devices this replay registered (aborted at the end); `mount` is
    /// then a directory of symlinks to them, shaped like the FUSE mount.
    cuse_names: Vec<String>,
}

impl FuseBackend {
    /// `--via cuse`: the same live stack behind CUSE character devices, in-process.
    fn new_cuse(device: Arc<dyn Device>, gpu_ids: Vec<u32>) -> Result<FuseBackend, String> {
        use crate::transport::cuse::{self, CuseEnv, CuseFs};
        use crate::transport::engine::Session;
        let dir = std::env::temp_dir().join(format!("kfdmux-replay-cuse.{}", std::process::id()));
        let links = dir.join("links");
        std::fs::create_dir_all(&links).map_err(|e| format!("{}: {e}", links.display()))?;
        let mux = Mux::new(device.clone());
        let env = Arc::new(CuseEnv::default());
        let base = format!("kfdmux-replay-{}/kfd", std::process::id());
        let mut names = vec![(base.clone(), FileKind::Kfd, "kfd".to_string())];
        for i in 0..device.gpu_count() {
            let m = device.render_minor(i);
            names.push((
                cuse::render_devname(&base, m),
                FileKind::Render(i),
                format!("renderD{m}"),
            ));
        }
        let mut sessions = Vec::new();
        for (name, kind, _) in &names {
            let fd = cuse::open_cuse()?;
            let fs = Arc::new(CuseFs {
                mux: mux.clone(),
                kind: *kind,
                env: env.clone(),
            });
            sessions.push(Session::new_cuse(fd, fs, name));
        }
        let runner = std::thread::spawn(move || {
            let hs: Vec<_> = sessions
                .into_iter()
                .map(|s| std::thread::spawn(move || s.run(2)))
                .collect();
            for h in hs {
                let _ = h.join();
            }
        });
        for (name, kind, link) in &names {
            let deadline = Instant::now() + Duration::from_secs(10);
            let rdev = loop {
                if let Some(r) = cuse::cuse_rdev(name) {
                    break r;
                }
                if Instant::now() > deadline {
                    return Err(format!("CUSE device {name} did not appear"));
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            env.add(rdev, *kind);
            let node = Path::new("/dev").join(name);
            while !node.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::os::unix::fs::symlink(&node, links.join(link))
                .map_err(|e| format!("symlink {link}: {e}"))?;
        }
        let devnull = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
        Ok(FuseBackend {
            device,
            gpu_ids,
            mux,
            dir,
            mount: links,
            runner: Some(runner),
            dev: None,
            files: HashMap::new(),
            devnull,
            userptrs: Userptrs::default(),
            cuse_names: names.into_iter().map(|(n, _, _)| n).collect(),
        })
    }

    fn new(device: Arc<dyn Device>, gpu_ids: Vec<u32>) -> Result<FuseBackend, String> {
        use crate::transport::engine::{Protocol, Session};
        use crate::transport::{fusefs::FuseFs, mount};
        let dir = std::env::temp_dir().join(format!(
            "kfdmux-replay.{}.{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let mount_dir = dir.join("mnt");
        let mux = Mux::new(device.clone());
        let fs = FuseFs::new(mux.clone());
        let (fd, early_dev) = mount::mount_fuse(&mount_dir)?;
        if early_dev != 0 {
            fs.set_dev(early_dev);
        }
        let session = Session::new(fd, fs.clone(), Protocol::Fuse, true);
        fs.set_channel(session.chan.clone());
        let runner = std::thread::spawn(move || {
            let _ = session.run(2);
        });
        let dev = mount::mount_dev(&mount_dir);
        if let Some(d) = dev {
            fs.set_dev(d);
        }
        let devnull = std::fs::File::open("/dev/null").ok().map(OwnedFd::from);
        Ok(FuseBackend {
            device,
            gpu_ids,
            mux,
            dir,
            mount: mount_dir,
            runner: Some(runner),
            dev,
            files: HashMap::new(),
            devnull,
            userptrs: Userptrs::default(),
            cuse_names: Vec::new(),
        })
    }

    fn contexts(&self) -> usize {
        let s = self.mux.stats_text();
        s.lines()
            .find_map(|l| l.strip_prefix("contexts "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The live descriptor for a recorded one.
    fn live_fd(&self, t: FdTarget) -> i32 {
        let want = match t {
            FdTarget::Kfd { tgid } => Some((FileKind::Kfd, tgid)),
            FdTarget::Render { index, tgid } => Some((FileKind::Render(index), tgid)),
            FdTarget::Other => None,
            // Not open in the recording: a number above any descriptor limit is not open here.
            FdTarget::Bad(_) => return i32::MAX,
        };
        want.and_then(|w| {
            self.files
                .values()
                .find(|(_, k, t)| (*k, *t) == w)
                .map(|(fd, _, _)| fd.as_raw_fd())
        })
        .or_else(|| self.devnull.as_ref().map(|f| f.as_raw_fd()))
        .unwrap_or(i32::MAX)
    }
}

impl Backend for FuseBackend {
    fn gpu_ids(&self) -> Vec<u32> {
        self.gpu_ids.clone()
    }
    fn live_tgid(&self, _tgid: u32) -> u32 {
        std::process::id()
    }
    fn open(&mut self, ctx: u64, caller: Caller, kind: FileKind) -> Result<(), Errno> {
        let name = match kind {
            FileKind::Kfd => "kfd".to_string(),
            FileKind::Render(i) => format!("renderD{}", self.device.render_minor(i)),
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.mount.join(name))
            .map_err(Errno::from)?;
        self.files
            .insert(ctx, (Arc::new(OwnedFd::from(f)), kind, caller.tgid));
        Ok(())
    }
    fn release(&mut self, ctx: u64) {
        let before = self.contexts();
        if let Some((fd, _, _)) = self.files.remove(&ctx) {
            drop(fd);
            // FUSE sends RELEASE asynchronously; the recording saw it before the next call.
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.contexts() >= before && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    fn issue(&mut self, ctx: u64, c: LiveCall, tx: Sender<Completion>) {
        let Some((fd, kind, _)) = self.files.get(&ctx).cloned() else {
            let _ = tx.send(Completion {
                seq: c.seq,
                who: (0, 0),
                result: -libc::EBADF,
                arg: c.arg,
                arrays: Vec::new(),
            });
            return;
        };
        let mut arg = c.arg.clone();
        arg.resize(arg.len().max(ioc_size(c.cmd) as usize).max(8), 0);
        let sd = Mux::lookup_cmd(kind, c.cmd).ok().and_then(|(_, v)| v.arg);
        // Pointed-to arrays live in buffers of ours; the struct points at them.
        let mut bufs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(sd) = sd {
            for r in crate::marshal::plan(sd, &arg).unwrap_or_default() {
                let mut data = c
                    .arrays
                    .iter()
                    .find(|a| a.0 == r.field)
                    .map(|a| a.3.clone())
                    .unwrap_or_default();
                data.resize(r.len, 0);
                bufs.push((r.field.to_string(), data));
            }
            for (field, data) in &mut bufs {
                if let Some(f) = sd.field(field) {
                    write_uint(&mut arg, f.offset, f.size, data.as_mut_ptr() as u64);
                }
            }
            for f in &c.fds {
                if let Some(fd_field) = sd.field(&f.field) {
                    write_uint(
                        &mut arg,
                        fd_field.offset,
                        fd_field.size,
                        self.live_fd(f.target) as u32 as u64,
                    );
                }
            }
        }
        self.userptrs.rewrite(kind, c.cmd, &mut arg);
        let (seq, cmd) = (c.seq, c.cmd);
        // A thread per call: a blocking WAIT_EVENTS must not hold up the calls that wake it.
        std::thread::spawn(move || {
            let mut arg = arg;
            // SAFETY: `arg` holds at least _IOC_SIZE(cmd) bytes and every pointer in it names
            // a live buffer of `bufs` of the length its count field gives; all outlive the call.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, arg.as_mut_ptr()) };
            let result = if r < 0 { -Errno::last().0 } else { 0 };
            // SAFETY: gettid/getpid have no preconditions.
            let who = unsafe { (libc::gettid() as u32, libc::getpid() as u32) };
            let _ = tx.send(Completion {
                seq,
                who,
                result,
                arg,
                arrays: bufs,
            });
        });
    }
    fn finish(&mut self) {
        let ctxs: Vec<u64> = self.files.keys().copied().collect();
        for c in ctxs {
            self.release(c);
        }
        for n in &self.cuse_names {
            crate::transport::cuse::abort(n);
        }
        if self.cuse_names.is_empty() {
            crate::transport::mount::unmount(&self.mount);
        } else {
            for e in std::fs::read_dir(&self.mount)
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if let Some(d) = self.dev {
            let _ = std::fs::write(
                format!("/sys/fs/fuse/connections/{}/abort", libc::minor(d)),
                "1",
            );
        }
        if let Some(r) = self.runner.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

// ---- the replay loop ------------------------------------------------------------------------

struct InFlight<'a> {
    rec: &'a Record,
    io: &'a IoctlRec,
    variant: Option<&'static IoctlVariant>,
}

struct Replayer<'a> {
    backend: Box<dyn Backend>,
    maps: Maps,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
    pending: HashMap<u64, InFlight<'a>>,
    report: Report,
    verbose: bool,
    /// recorded context → (tgid, uid, gid) of its opener
    owners: HashMap<u64, (u32, u32, u32)>,
    /// Contexts whose replayed open failed: their calls are not issued.
    dead: HashSet<u64>,
}

fn fmt_res(r: i32) -> String {
    if r == 0 {
        "0".into()
    } else {
        errno_name(-r)
    }
}

impl<'a> Replayer<'a> {
    fn diff(
        &mut self,
        r: &Record,
        call: String,
        field: String,
        recorded: String,
        replayed: String,
    ) {
        self.report.diffs.push(Diff {
            seq: r.seq,
            ctx: r.ctx,
            call,
            field,
            recorded,
            replayed,
        });
    }

    fn complete(&mut self, c: Completion) {
        let Some(p) = self.pending.remove(&c.seq) else {
            return;
        };
        let name = call_name(p.io.cmd);
        let expected = if p.io.stage == Stage::Device {
            p.io.dev_result
        } else {
            p.io.result
        };
        if c.result != expected {
            self.diff(
                p.rec,
                name,
                "errno".into(),
                fmt_res(expected),
                fmt_res(c.result),
            );
            return;
        }
        if p.io.stage == Stage::Mux {
            return;
        }
        let Some(sd) = p.variant.and_then(|v| v.arg) else {
            return;
        };
        let mut cmp = Cmp {
            maps: &mut self.maps,
            out: Vec::new(),
            rec_who: (p.rec.pid, p.rec.tgid),
            live_who: c.who,
        };
        if p.variant
            .is_some_and(|v| matches!(v.dir, Dir::Read | Dir::ReadWrite))
        {
            let limit = p.io.arg_in.len().min(p.io.arg_out.len());
            cmp.fields(sd, &p.io.arg_out, &c.arg, limit, "", false);
        }
        if expected == 0 {
            for a in p.io.arrays.iter().filter(|a| a.io.is_out()) {
                match c.arrays.iter().find(|(f, _)| *f == a.field) {
                    Some((_, live)) => cmp.array(sd, &a.field, &a.data_out, live),
                    None => cmp.out.push((
                        format!("{}[]", a.field),
                        format!("{} bytes", a.data_out.len()),
                        "missing".into(),
                    )),
                }
            }
        }
        for (field, r, l) in std::mem::take(&mut cmp.out) {
            self.diff(p.rec, name.clone(), field, r, l);
        }
    }

    /// Waits until no call that `pred` selects is in flight (each gets at most `limit`).
    fn drain(&mut self, pred: impl Fn(&InFlight) -> bool, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.pending.values().any(&pred) {
            let now = Instant::now();
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(now))
            {
                Ok(c) => self.complete(c),
                Err(_) => {
                    let stuck: Vec<u64> = self
                        .pending
                        .iter()
                        .filter(|(_, p)| pred(p))
                        .map(|(s, _)| *s)
                        .collect();
                    for s in stuck {
                        if let Some(p) = self.pending.remove(&s) {
                            let secs = p.io.t_end_ns.saturating_sub(p.rec.t_ns) as f64 / 1e9;
                            self.diff(
                                p.rec,
                                call_name(p.io.cmd),
                                "completion".into(),
                                format!("after {secs:.3} s"),
                                format!("still blocked after {} s", limit.as_secs()),
                            );
                        }
                    }
                    return;
                }
            }
        }
    }

    /// Why a record cannot be replayed, if it cannot.
    fn unreplayable(&self, r: &Record, i: &IoctlRec) -> Option<String> {
        if r.ctx == 0 {
            return Some("the call named no open file".into());
        }
        if i.stage == Stage::Mux {
            if i.result == -libc::EBADF {
                return Some("a process other than the opener made it (EBADF)".into());
            }
            // What the mux refuses from the arguments alone replays; a fault reading the
            // caller's memory does not (the replay's memory is valid).
            let kind = FileKind::Kfd;
            let kind = if crate::abi::table::ioc_type(i.cmd) == crate::abi::table::DRM_IOC_TYPE {
                FileKind::Render(0)
            } else {
                kind
            };
            let pre = Mux::lookup_cmd(kind, i.cmd).and_then(|(_, v)| {
                let full = v
                    .arg
                    .map(|a| a.size)
                    .unwrap_or(0)
                    .max(ioc_size(i.cmd) as usize);
                let mut arg = i.arg_in.clone();
                arg.resize(full, 0);
                v.arg
                    .map(|sd| crate::marshal::plan(sd, &arg).map(|_| ()))
                    .unwrap_or(Ok(()))
            });
            if res(&pre) != i.result {
                return Some(format!(
                    "refused by kfdmux with {} for a reason replay cannot reproduce",
                    fmt_res(i.result)
                ));
            }
        }
        if i.dev_result == -libc::EINTR {
            return Some("interrupted by a signal in the recording".into());
        }
        None
    }

    fn record(&mut self, r: &'a Record) {
        // Everything the recording finished before this record started must finish first.
        self.drain(|p| p.io.t_end_ns <= r.t_ns, Duration::from_secs(10));
        if self.verbose {
            println!("{}", super::show::fmt_record(r));
        }
        match &r.event {
            Event::Open {
                uid,
                gid,
                kind,
                result,
            } => {
                self.report.opens += 1;
                let caller = Caller {
                    pid: r.pid,
                    tgid: r.tgid,
                    uid: *uid,
                    gid: *gid,
                };
                let key = if *result == 0 {
                    r.ctx
                } else {
                    u64::MAX - r.seq
                };
                let live = self.backend.open(key, caller, *kind);
                let call = format!(
                    "open {}",
                    match kind {
                        FileKind::Kfd => "kfd".to_string(),
                        FileKind::Render(i) => format!("render{i}"),
                    }
                );
                if res(&live) != *result {
                    self.diff(
                        r,
                        call,
                        "result".into(),
                        fmt_res(*result),
                        fmt_res(res(&live)),
                    );
                }
                if *result != 0 {
                    self.backend.release(key);
                } else if live.is_err() {
                    self.dead.insert(r.ctx);
                } else {
                    self.owners.insert(r.ctx, (r.tgid, *uid, *gid));
                }
            }
            Event::Release => self.backend.release(r.ctx),
            Event::Ioctl(i) => {
                if let Some(why) = self.unreplayable(r, i) {
                    self.report.skipped.push((r.seq, call_name(i.cmd), why));
                    return;
                }
                if self.dead.contains(&r.ctx) {
                    self.report.skipped.push((
                        r.seq,
                        call_name(i.cmd),
                        "its context failed to open in the replay".into(),
                    ));
                    return;
                }
                let variant = lookup(i.cmd).map(|(_, v)| v);
                let mut arg = i.arg_in.clone();
                let mut arrays: Vec<(String, Io, u64, Vec<u8>)> = Vec::new();
                for a in &i.arrays {
                    let mut data = if a.io.is_in() {
                        a.data_in.clone()
                    } else {
                        vec![0; a.data_out.len()]
                    };
                    if let Some(sd) = variant.and_then(|v| v.arg) {
                        remap_array(&self.maps, sd, &a.field, &mut data);
                    }
                    arrays.push((a.field.clone(), a.io, a.addr, data));
                }
                if let Some(sd) = variant.and_then(|v| v.arg) {
                    remap_struct(&self.maps, sd, &mut arg);
                    if let Some(t) = sd.trailing.and_then(|t| t.elem.map(|e| (e, t.elem_size))) {
                        if t.1 > 0 && arg.len() > sd.size {
                            let tail = &mut arg[sd.size..];
                            for chunk in tail.chunks_mut(t.1) {
                                remap_struct(&self.maps, t.0, chunk);
                            }
                        }
                    }
                }
                if let Some(sd) = variant.and_then(|v| v.arg) {
                    // Fields naming the caller's process name the live caller's.
                    let len = arg.len();
                    for f in sd
                        .fields
                        .iter()
                        .filter(|f| is_pid_field(f) && f.io.is_in() && f.offset + f.size <= len)
                    {
                        let v = read_uint(&arg, f.offset, f.size);
                        if v == r.pid as u64 || v == r.tgid as u64 {
                            write_uint(
                                &mut arg,
                                f.offset,
                                f.size,
                                self.backend.live_tgid(r.tgid) as u64,
                            );
                        }
                    }
                }
                let (_, uid, gid) = self.owners.get(&r.ctx).copied().unwrap_or((r.tgid, 0, 0));
                let call = LiveCall {
                    seq: r.seq,
                    cmd: i.cmd,
                    caller: Caller {
                        pid: r.pid,
                        tgid: r.tgid,
                        uid,
                        gid,
                    },
                    arg,
                    arrays,
                    fds: i.fds.clone(),
                };
                self.pending.insert(
                    r.seq,
                    InFlight {
                        rec: r,
                        io: i,
                        variant,
                    },
                );
                self.report.calls += 1;
                let tx = self.tx.clone();
                self.backend.issue(r.ctx, call, tx);
            }
        }
    }
}

/// Replays `t` as `o` says; `Err` for what prevents replaying at all.
pub fn replay_trace(t: &Trace, o: &ReplayOptions) -> Result<Report, String> {
    let (device, gpu_ids): (Arc<dyn Device>, Vec<u32>) = match o.device {
        ReplayDevice::Sim => {
            let spec = match (&o.gpus, t.header.get("gpus")) {
                (Some(g), _) => g.clone(),
                (None, Some(g)) => g.to_string(),
                (None, None) => return Err("the trace header names no GPUs; give --gpus".into()),
            };
            let gpus = crate::topology::parse_gpus(&spec)?;
            let mut cfg = SimConfig::default();
            if let Some(m) = t.header.get("kfd_minor").and_then(|v| v.parse().ok()) {
                cfg.kfd_minor = m;
            }
            if let Some(m) = t.header.get("drm_minor").and_then(|v| v.parse().ok()) {
                cfg.drm_minor = m;
            }
            if let Some(m) = o.kfd_minor {
                cfg.kfd_minor = m;
            }
            let device = SimDevice::new(gpus, cfg);
            let ids = device.gpus().iter().map(|g| g.gpu_id).collect();
            (device, ids)
        }
        ReplayDevice::Kfd => {
            if o.gpus.is_some() || o.kfd_minor.is_some() {
                return Err(
                    "--gpus and --kfd-minor shape the sim; the kfd device is what the kernel has"
                        .into(),
                );
            }
            // Render nodes beside --kfd-path, every GPU, default polling.
            let cfg =
                crate::device::kfd::KfdConfig::new(&o.kfd_path, &o.kfd_sysfs, o.kfd_contexts)?;
            let kfd = crate::device::kfd::KfdDevice::new(cfg)?;
            let ids = kfd.gpu_list().iter().map(|g| g.0).collect();
            (kfd, ids)
        }
    };
    let recorded = t.header.gpu_ids().len();
    if gpu_ids.len() < recorded {
        return Err(format!(
            "the trace used {recorded} GPUs; the replay device has {}",
            gpu_ids.len()
        ));
    }
    let backend: Box<dyn Backend> = match o.via {
        Via::Direct => Box::new(DirectBackend {
            device,
            gpu_ids,
            userptrs: Userptrs::default(),
            ctxs: HashMap::new(),
            live: HashMap::new(),
        }),
        Via::Fuse => Box::new(FuseBackend::new(device, gpu_ids)?),
        Via::Cuse => {
            if !Path::new("/dev/cuse").exists() {
                return Err("--via cuse needs a kernel with CUSE (/dev/cuse is missing; try `modprobe cuse`); use --via fuse or direct".into());
            }
            Box::new(FuseBackend::new_cuse(device, gpu_ids)?)
        }
    };
    let mut maps = Maps::default();
    for (r, l) in t.header.gpu_ids().into_iter().zip(backend.gpu_ids()) {
        maps.learn(Class::Gpu, r as u64, l as u64);
    }
    let (tx, rx) = channel();
    let mut rp = Replayer {
        backend,
        maps,
        tx,
        rx,
        pending: HashMap::new(),
        report: Report::default(),
        verbose: o.verbose,
        owners: HashMap::new(),
        dead: HashSet::new(),
    };
    for r in t.by_seq() {
        if !o.contexts.is_empty() && !o.contexts.contains(&r.ctx) {
            continue;
        }
        rp.record(r);
    }
    rp.drain(|_| true, Duration::from_secs(10));
    rp.backend.finish();
    Ok(rp.report)
}

/// `kfdmux replay`: prints the differences and a summary; 0 when the replay matched, 1 when it
/// did not.
pub fn run(o: &ReplayOptions) -> Result<i32, String> {
    if !o.verbose {
        // The replay's own device logs every open at info level; that is noise here.
        log::set_max_level(log::LevelFilter::Warn);
    }
    let t = Trace::read(&o.path)?;
    if t.torn_tail > 0 {
        eprintln!(
            "kfdmux replay: ignoring {} bytes of an incomplete last record",
            t.torn_tail
        );
    }
    let rep = replay_trace(&t, o)?;
    for d in rep.diffs.iter().take(o.max_diffs) {
        println!("DIFF {d}");
    }
    if rep.diffs.len() > o.max_diffs {
        println!("... and {} more differences", rep.diffs.len() - o.max_diffs);
    }
    for (seq, call, why) in &rep.skipped {
        println!("skipped #{seq} {call}: {why}");
    }
    let via = format!("{:?}", o.via).to_lowercase();
    println!(
        "replayed {} calls and {} opens via {via}: {} ({} skipped)",
        rep.calls,
        rep.opens,
        if rep.matched() {
            "match".to_string()
        } else {
            format!("{} differences", rep.diffs.len())
        },
        rep.skipped.len()
    );
    Ok(if rep.matched() { 0 } else { 1 })
}
