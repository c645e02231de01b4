//! The daemon's configuration file (`kfdmux serve --config FILE`, `kfdmux config check FILE`).
//!
//! One daemon serves several *instances*: each is a device of its own (a FUSE directory or a
//! CUSE DEVNAME) with its own subset of the node's GPUs, its own quotas, allowed users and
//! recording. Format (TOML; every key is documented in docs/containers.md and
//! deploy/kfdmux.toml):
//!
//! ```toml
//! [daemon]
//! device = "sim"                 # the only device a config can serve today
//! gpus = "gfx90a:2,gfx1030"      # the node's GPUs; instances pick from them by index
//! state_dir = "/run/kfdmux"      # per-instance FUSE mounts, sysfs trees, sockets
//! cdi_spec = "/var/run/cdi/kfdmux.json"  # written once every instance serves
//!
//! [[instance]]
//! name = "a"
//! transport = "fuse"             # or "cuse"
//! gpus = [0]                     # indices into daemon.gpus, or a preset list "gfx90a:1"
//! quota_mem = "16G"
//! allow_users = ["alice", 1000]
//! ```
//!
//! Every mistake is reported with the line it is on (`kfdmux.toml:12: instance 'a': ...`);
//! [`load`] collects all of them rather than stopping at the first.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::daemon::Transport;
use crate::policy::{parse_bytes, parse_ids, Policy, Quotas};
use crate::topology::{parse_gpus, Gpu, GpuPreset};

/// Where instances keep their run-time files unless `daemon.state_dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/run/kfdmux";
/// First render minor and node id of every instance (a container sees its GPUs from 0).
pub const FIRST_RENDER_MINOR: u32 = 128;

/// One mistake in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line, when the mistake has a place.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file, l, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// A checked configuration: everything resolved (paths, uids, GPU lists), ready to serve.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    /// `daemon.device` (only `sim` today).
    pub device: String,
    /// The node's GPUs (`daemon.gpus`), as the daemon would number them.
    pub gpus: Vec<Gpu>,
    pub state_dir: PathBuf,
    pub kfd_minor: Option<u32>,
    pub threads: Option<usize>,
    /// Host path of the preload library CUSE instances hand to containers.
    pub preload_lib: PathBuf,
    /// Where the daemon writes the CDI spec when all instances serve (removed at exit).
    pub cdi_spec: Option<PathBuf>,
    /// The kfdmux executable, as the host's container runtime sees it, that the spec's FUSE
    /// hook runs (`None`: the daemon's own executable).
    pub hook_binary: Option<PathBuf>,
    pub instances: Vec<Instance>,
}

/// One served device.
#[derive(Debug, Clone)]
pub struct Instance {
    pub name: String,
    /// Line of its `[[instance]]` table.
    pub line: usize,
    pub transport: Transport,
    /// FUSE: the directory the instance's files are mounted on.
    pub mount: PathBuf,
    /// CUSE: DEVNAME of the kfd node (`/dev/<devname>`).
    pub devname: String,
    /// Which of `Config::gpus` it serves (`None`: its own preset list).
    pub host_gpus: Option<Vec<u32>>,
    /// Its GPUs as it serves them: renumbered from index 0 / node 1 / render minor 128, VRAM
    /// no larger than its memory quota.
    pub gpus: Vec<Gpu>,
    /// Preset names of `gpus`, comma-separated (for trace headers).
    pub gpus_spec: String,
    pub policy: Policy,
    pub record: Option<PathBuf>,
    /// FUSE: also carry requests over io_uring, each queue starting with this many entries
    /// (`serve --fuse-uring --fuse-uring-depth N`).
    pub fuse_uring: Option<u32>,
    /// Its sysfs tree: `kfd/topology/...` and `module/amdgpu/...`.
    pub sysfs_dir: PathBuf,
    /// CUSE: the hand-over socket the preload library talks to (in a directory of its own so
    /// that a container can bind the directory and survive a daemon restart).
    pub handover_socket: PathBuf,
}

impl Instance {
    /// The render minors it serves.
    pub fn render_minors(&self) -> Vec<u32> {
        self.gpus.iter().map(|g| g.render_minor).collect()
    }
}

impl Config {
    /// The fake `lsmod` every instance's containers get (rocminfo 5.2.3 gates on it).
    pub fn lsmod_path(&self) -> PathBuf {
        self.state_dir.join("bin/lsmod")
    }

    pub fn instance(&self, name: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.name == name)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Option<Spanned<RawDaemon>>,
    #[serde(default)]
    instance: Vec<Spanned<RawInstance>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    device: Option<Spanned<String>>,
    gpus: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    kfd_minor: Option<Spanned<u32>>,
    threads: Option<Spanned<u32>>,
    preload_lib: Option<Spanned<String>>,
    cdi_spec: Option<Spanned<String>>,
    hook_binary: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawGpus {
    Indices(Vec<i64>),
    Spec(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IdOrName {
    Id(i64),
    Name(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawBytes {
    N(i64),
    S(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Option<Spanned<String>>,
    transport: Option<Spanned<String>>,
    gpus: Option<Spanned<RawGpus>>,
    mount: Option<Spanned<String>>,
    devname: Option<Spanned<String>>,
    allow_users: Option<Spanned<Vec<Spanned<IdOrName>>>>,
    allow_groups: Option<Spanned<Vec<Spanned<IdOrName>>>>,
    quota_mem: Option<Spanned<RawBytes>>,
    quota_queues: Option<Spanned<u32>>,
    quota_events: Option<Spanned<u32>>,
    max_contexts_per_uid: Option<Spanned<u32>>,
    record: Option<Spanned<String>>,
    fuse_uring: Option<Spanned<bool>>,
    fuse_uring_depth: Option<Spanned<u32>>,
}

/// Collects mistakes with their lines.
struct Report<'a> {
    file: String,
    src: &'a str,
    errors: Vec<ConfigError>,
}

impl Report<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn at(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let line = Some(self.line_of(span.start));
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line,
            message: message.into(),
        });
    }

    fn nowhere(&mut self, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: None,
            message: message.into(),
        });
    }
}

/// Reads and checks `path`.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            line: None,
            message: format!("cannot read: {e}"),
        }]
    })?;
    parse(path, &src)
}

/// Checks configuration text `src` (named `path` in messages; relative paths in it are errors).
pub fn parse(path: &Path, src: &str) -> Result<Config, Vec<ConfigError>> {
    let mut r = Report {
        file: path.display().to_string(),
        src,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(src) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.message().trim().to_string();
            match e.span() {
                Some(s) => r.at(s, msg),
                None => r.nowhere(msg),
            }
            return Err(r.errors);
        }
    };
    let cfg = check(path, raw, &mut r);
    if r.errors.is_empty() {
        if let Some(c) = cfg {
            return Ok(c);
        }
    }
    r.errors.sort_by_key(|e| e.line.unwrap_or(0));
    Err(r.errors)
}

fn abs_path(r: &mut Report, v: &Spanned<String>, what: &str) -> Option<PathBuf> {
    let p = PathBuf::from(v.get_ref());
    if v.get_ref().is_empty() || !p.is_absolute() {
        r.at(
            v.span(),
            format!("{what} must be an absolute path, not '{}'", v.get_ref()),
        );
        return None;
    }
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        r.at(v.span(), format!("{what} must not contain '..'"));
        return None;
    }
    Some(p)
}

/// CDI device names: `[A-Za-z0-9][A-Za-z0-9_.:-]*`; we also keep them usable as file names.
fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphanumeric())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | '-'))
        && n.len() <= 64
}

/// A CUSE DEVNAME: relative to /dev, no empty, `.` or `..` components.
fn valid_devname(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 128
        && n.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && n.chars().all(|ch| ch.is_ascii_graphic())
}

fn ids(
    r: &mut Report,
    list: &Spanned<Vec<Spanned<IdOrName>>>,
    groups: bool,
    who: &str,
) -> Option<Vec<u32>> {
    let key = if groups {
        "allow_groups"
    } else {
        "allow_users"
    };
    if list.get_ref().is_empty() {
        r.at(list.span(), format!("{who}: {key} is empty (nobody but root could open); leave it out to allow everyone"));
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for item in list.get_ref() {
        let res = match item.get_ref() {
            IdOrName::Id(n) => u32::try_from(*n).map_err(|_| format!("{n} is not a valid id")),
            IdOrName::Name(s) if s.contains(',') => {
                Err(format!("'{s}': one name per array element"))
            }
            IdOrName::Name(s) => parse_ids(s, groups).map(|v| v[0]),
        };
        match res {
            Ok(id) => out.push(id),
            Err(e) => {
                r.at(item.span(), format!("{who}: {key}: {e}"));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// A preset with `vram_bytes` lowered to `limit` (page aligned), kept for the daemon's
/// lifetime: the sim then accounts and reports the instance's share, and the topology shows it.
fn clamp_vram(p: &'static GpuPreset, limit: u64) -> &'static GpuPreset {
    let limit = limit & !0xfff;
    if limit == 0 || limit >= p.vram_bytes {
        return p;
    }
    let mut c = p.clone();
    c.vram_bytes = limit;
    // One small allocation per instance GPU, made once when the configuration is loaded.
    Box::leak(Box::new(c))
}

/// Renumbers `gpus` the way a container expects them: index 0.., node 1.., render minor 128..
/// (the PCI location, unique_id and gpu_id stay those of the node's GPU).
pub fn renumber(gpus: &[Gpu], vram_limit: Option<u64>) -> Vec<Gpu> {
    gpus.iter()
        .enumerate()
        .map(|(i, g)| {
            let i = i as u32; // at most MAX_GPUS
            let mut g = g.clone();
            g.index = i;
            g.node_id = i + 1;
            g.render_minor = FIRST_RENDER_MINOR + i;
            if let Some(l) = vram_limit {
                g.preset = clamp_vram(g.preset, l);
            }
            g
        })
        .collect()
}

fn check(path: &Path, raw: RawConfig, r: &mut Report) -> Option<Config> {
    let mut ok = true;
    let mut device = "sim".to_string();
    let mut node_gpus: Option<Vec<Gpu>> = None;
    let mut state_dir = PathBuf::from(DEFAULT_STATE_DIR);
    let mut kfd_minor = None;
    let mut threads = None;
    let mut preload_lib = None;
    let mut cdi_spec = None;
    let mut hook_binary = None;
    if let Some(d) = raw.daemon.map(Spanned::into_inner) {
        if let Some(v) = d.device {
            if v.get_ref() != "sim" {
                r.at(
                    v.span(),
                    format!(
                        "daemon: device '{}' cannot be served from a config file (only \"sim\")",
                        v.get_ref()
                    ),
                );
                ok = false;
            }
            device = v.into_inner();
        }
        if let Some(v) = d.gpus {
            match parse_gpus(v.get_ref()) {
                Ok(g) => node_gpus = Some(g),
                Err(e) => {
                    r.at(v.span(), format!("daemon: gpus: {e}"));
                    ok = false;
                }
            }
        }
        if let Some(v) = d.state_dir {
            match abs_path(r, &v, "daemon: state_dir") {
                Some(p) => state_dir = p,
                None => ok = false,
            }
        }
        kfd_minor = d.kfd_minor.map(Spanned::into_inner);
        if let Some(t) = d.threads {
            if !(1..=64).contains(t.get_ref()) {
                r.at(t.span(), "daemon: threads must be 1..=64");
                ok = false;
            }
            threads = Some(*t.get_ref() as usize);
        }
        if let Some(v) = d.preload_lib {
            preload_lib = abs_path(r, &v, "daemon: preload_lib");
            ok &= preload_lib.is_some();
        }
        if let Some(v) = d.cdi_spec {
            cdi_spec = abs_path(r, &v, "daemon: cdi_spec");
            ok &= cdi_spec.is_some();
        }
        if let Some(v) = d.hook_binary {
            hook_binary = abs_path(r, &v, "daemon: hook_binary");
            ok &= hook_binary.is_some();
        }
    }
    let preload_lib = preload_lib
        .or_else(crate::handover::find_preload_lib)
        .unwrap_or_else(|| Path::new("/usr/lib/kfdmux").join(crate::handover::PRELOAD_LIB));

    if raw.instance.is_empty() {
        r.nowhere("no [[instance]]: a daemon serves at least one instance");
        return None;
    }
    let mut instances: Vec<Instance> = Vec::new();
    let mut names: Vec<(String, usize)> = Vec::new();
    for inst in raw.instance {
        let span = inst.span();
        let line = r.line_of(span.start);
        if let Some(n) = &inst.get_ref().name {
            if let Some((_, prev)) = names.iter().find(|(p, _)| p == n.get_ref()) {
                let msg = format!(
                    "instance '{}': the name is already used by the instance on line {prev}",
                    n.get_ref()
                );
                r.at(span.clone(), msg);
                ok = false;
            }
            names.push((n.get_ref().clone(), line));
        }
        match check_instance(
            inst.into_inner(),
            span.clone(),
            line,
            node_gpus.as_deref(),
            &state_dir,
            r,
        ) {
            Some(i) => {
                if instances.iter().any(|p| p.name == i.name) {
                    // Reported above.
                } else if let Some(prev) = instances.iter().find(|p| {
                    p.transport == Transport::Fuse
                        && i.transport == Transport::Fuse
                        && p.mount == i.mount
                }) {
                    r.at(
                        span.clone(),
                        format!(
                            "instance '{}': mount {} is already instance '{}''s",
                            i.name,
                            i.mount.display(),
                            prev.name
                        ),
                    );
                    ok = false;
                } else if let Some(prev) = instances.iter().find(|p| {
                    p.transport == Transport::Cuse
                        && i.transport == Transport::Cuse
                        && p.devname == i.devname
                }) {
                    r.at(
                        span.clone(),
                        format!(
                            "instance '{}': devname {} is already instance '{}''s",
                            i.name, i.devname, prev.name
                        ),
                    );
                    ok = false;
                } else if let Some(prev) = instances
                    .iter()
                    .find(|p| p.record.is_some() && p.record == i.record)
                {
                    r.at(
                        span.clone(),
                        format!(
                            "instance '{}': record file is already instance '{}''s",
                            i.name, prev.name
                        ),
                    );
                    ok = false;
                }
                instances.push(i);
            }
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    Some(Config {
        file: path.to_path_buf(),
        device,
        gpus: node_gpus.unwrap_or_default(),
        state_dir,
        kfd_minor,
        threads,
        preload_lib,
        cdi_spec,
        hook_binary,
        instances,
    })
}

fn check_instance(
    raw: RawInstance,
    span: std::ops::Range<usize>,
    line: usize,
    node_gpus: Option<&[Gpu]>,
    state_dir: &Path,
    r: &mut Report,
) -> Option<Instance> {
    let mut ok = true;
    let name = match raw.name {
        Some(n) if valid_name(n.get_ref()) => n.into_inner(),
        Some(n) => {
            r.at(n.span(), format!("instance name '{}' must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit", n.get_ref()));
            return None;
        }
        None => {
            r.at(span, "instance without a name");
            return None;
        }
    };
    let who = format!("instance '{name}'");
    let transport = match raw.transport {
        None => Transport::Fuse,
        Some(t) => match t.get_ref().as_str() {
            "fuse" => Transport::Fuse,
            "cuse" => Transport::Cuse,
            other => {
                r.at(
                    t.span(),
                    format!("{who}: unknown transport '{other}' (fuse or cuse)"),
                );
                ok = false;
                Transport::Fuse
            }
        },
    };
    let quota_mem = match raw.quota_mem {
        None => None,
        Some(q) => {
            let v = match q.get_ref() {
                RawBytes::N(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
                RawBytes::S(s) => parse_bytes(s),
            };
            match v {
                Ok(0) => {
                    r.at(q.span(), format!("{who}: quota_mem must be more than 0"));
                    ok = false;
                    None
                }
                Ok(b) => Some(b),
                Err(e) => {
                    r.at(q.span(), format!("{who}: quota_mem: {e}"));
                    ok = false;
                    None
                }
            }
        }
    };
    let mut host_gpus = None;
    let gpus = match raw.gpus {
        None => {
            r.at(span.clone(), format!("{who}: no gpus (indices into daemon.gpus, e.g. [0], or presets, e.g. \"gfx90a:1\")"));
            None
        }
        Some(g) => match g.get_ref() {
            RawGpus::Spec(s) => match parse_gpus(s) {
                Ok(v) => Some(v),
                Err(e) => {
                    r.at(
                        g.span(),
                        format!(
                            "{who}: {}",
                            e.replace("unknown GPU preset '", "unknown preset '")
                        ),
                    );
                    None
                }
            },
            RawGpus::Indices(ix) => match node_gpus {
                None => {
                    r.at(
                        g.span(),
                        format!("{who}: gpus by index need daemon.gpus (the node's GPU list)"),
                    );
                    None
                }
                Some(_) if ix.is_empty() => {
                    r.at(g.span(), format!("{who}: gpus is empty"));
                    None
                }
                Some(node) => {
                    let mut picked = Vec::new();
                    let mut seen = Vec::new();
                    for &i in ix {
                        match usize::try_from(i).ok().and_then(|u| node.get(u)) {
                            Some(gpu) if seen.contains(&i) => {
                                r.at(
                                    g.span(),
                                    format!("{who}: gpu {i} ({}) is listed twice", gpu.preset.name),
                                );
                                ok = false;
                            }
                            Some(gpu) => {
                                seen.push(i);
                                picked.push(gpu.clone());
                            }
                            None => {
                                r.at(g.span(), format!("{who}: gpu {i} does not exist (daemon.gpus has {}: 0..={})", node.len(), node.len().saturating_sub(1)));
                                ok = false;
                            }
                        }
                    }
                    host_gpus = Some(seen.iter().map(|&i| i as u32).collect());
                    Some(picked)
                }
            },
        },
    };
    let gpus = match gpus {
        Some(g) => renumber(&g, quota_mem),
        None => return None,
    };
    let inst_dir = state_dir.join(&name);
    let mount = match raw.mount {
        Some(m) => {
            if transport == Transport::Cuse {
                r.at(
                    m.span(),
                    format!("{who}: mount is for fuse instances (cuse ones have a devname)"),
                );
                ok = false;
            }
            abs_path(r, &m, &format!("{who}: mount")).unwrap_or_else(|| {
                ok = false;
                PathBuf::new()
            })
        }
        None => inst_dir.join("dev"),
    };
    let devname = match raw.devname {
        Some(d) => {
            if transport == Transport::Fuse {
                r.at(
                    d.span(),
                    format!("{who}: devname is for cuse instances (fuse ones have a mount)"),
                );
                ok = false;
            }
            if !valid_devname(d.get_ref()) {
                r.at(d.span(), format!("{who}: devname '{}' must be a path under /dev without '.', '..' or empty parts (e.g. kfdmux/{name}/kfd)", d.get_ref()));
                ok = false;
            }
            d.into_inner()
        }
        None => format!("kfdmux/{name}/kfd"),
    };
    let allow_users = raw.allow_users.as_ref().and_then(|l| {
        let v = ids(r, l, false, &who);
        ok &= v.is_some();
        v
    });
    let allow_groups = raw.allow_groups.as_ref().and_then(|l| {
        let v = ids(r, l, true, &who);
        ok &= v.is_some();
        v
    });
    let record = raw.record.as_ref().and_then(|p| {
        let v = abs_path(r, p, &format!("{who}: record"));
        ok &= v.is_some();
        v
    });
    let uring = crate::transport::uring::UringOptions::default();
    let fuse_uring = match (&raw.fuse_uring, &raw.fuse_uring_depth) {
        (Some(u), _) if *u.get_ref() && transport == Transport::Cuse => {
            r.at(u.span(), format!("{who}: fuse_uring is for fuse instances"));
            ok = false;
            None
        }
        (Some(u), depth) if *u.get_ref() => {
            match depth.as_ref().map(|d| (d.span(), *d.get_ref())) {
                Some((span, d)) if !(1..=uring.max_depth).contains(&d) => {
                    let max = uring.max_depth;
                    r.at(span, format!("{who}: fuse_uring_depth must be 1..={max}"));
                    ok = false;
                    None
                }
                Some((_, d)) => Some(d),
                None => Some(uring.depth),
            }
        }
        (_, Some(d)) => {
            r.at(
                d.span(),
                format!("{who}: fuse_uring_depth needs fuse_uring = true"),
            );
            ok = false;
            None
        }
        _ => None,
    };
    if !ok {
        return None;
    }
    let gpus_spec = gpus
        .iter()
        .map(|g| g.preset.name)
        .collect::<Vec<_>>()
        .join(",");
    Some(Instance {
        line,
        transport,
        mount,
        devname,
        host_gpus,
        gpus_spec,
        gpus,
        policy: Policy {
            allow_users,
            allow_groups,
            quotas: Quotas {
                mem_bytes: quota_mem,
                queues: raw.quota_queues.map(Spanned::into_inner),
                events: raw.quota_events.map(Spanned::into_inner),
            },
            max_contexts_per_uid: raw.max_contexts_per_uid.map(Spanned::into_inner),
        },
        record,
        fuse_uring,
        sysfs_dir: inst_dir.join("sys"),
        handover_socket: inst_dir.join("handover/handover.sock"),
        name,
    })
}

/// A one-line summary per instance, for `config check` and the daemon's log.
pub fn describe(cfg: &Config) -> Vec<String> {
    cfg.instances
        .iter()
        .map(|i| {
            let at = match i.transport {
                Transport::Fuse => format!("fuse {}", i.mount.display()),
                Transport::Cuse => format!("cuse /dev/{}", i.devname),
            };
            let from = match &i.host_gpus {
                Some(h) => format!(" (node GPUs {h:?})"),
                None => String::new(),
            };
            let vram: Vec<String> = i
                .gpus
                .iter()
                .map(|g| format!("{}M", g.preset.vram_bytes >> 20))
                .collect();
            let q = &i.policy.quotas;
            let mut extra = Vec::new();
            if let Some(m) = q.mem_bytes {
                extra.push(format!("quota_mem {m}"));
            }
            if let Some(n) = q.queues {
                extra.push(format!("quota_queues {n}"));
            }
            if let Some(n) = q.events {
                extra.push(format!("quota_events {n}"));
            }
            if let Some(u) = &i.policy.allow_users {
                extra.push(format!("users {u:?}"));
            }
            if let Some(g) = &i.policy.allow_groups {
                extra.push(format!("groups {g:?}"));
            }
            if let Some(p) = &i.record {
                extra.push(format!("record {}", p.display()));
            }
            if let Some(d) = i.fuse_uring {
                extra.push(format!("fuse_uring depth {d}"));
            }
            format!(
                "instance '{}': {at}, gpus {}{from}, vram [{}]{}{}",
                i.name,
                i.gpus_spec,
                vram.join(","),
                if extra.is_empty() { "" } else { ", " },
                extra.join(", ")
            )
        })
        .collect()
}

/// `kfdmux config check FILE`: prints every mistake (exit 1) or a summary (exit 0).
pub fn check_command(path: &Path) -> i32 {
    match load(path) {
        Ok(cfg) => {
            println!(
                "{}: ok, {} instance(s)",
                path.display(),
                cfg.instances.len()
            );
            for l in describe(&cfg) {
                println!("  {l}");
            }
            0
        }
        Err(errs) => {
            for e in &errs {
                eprintln!("{e}");
            }
            1
        }
    }
}
