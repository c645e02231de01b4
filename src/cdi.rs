//! Container Device Interface (CDI) spec for a configuration's instances, and the OCI hook the
//! spec names (`kfdmux cdi generate`, `kfdmux cdi hook`).
//!
//! CDI (the spec podman, containerd and CRI-O read from `/etc/cdi` and `/var/run/cdi`) turns
//! `--device kfdmux.dev/gpu=NAME` into edits of the container's OCI spec. Per instance:
//!
//! - **CUSE** instances are real character devices: `deviceNodes` put `/dev/<devname>` at
//!   `/dev/kfd` and its render nodes at `/dev/dri/renderD<minor>`; CUSE has no mmap, so the
//!   preload library is bind-mounted at [`CONTAINER_PRELOAD`] with `LD_PRELOAD` and
//!   `KFDMUX_HANDOVER_SOCKET` pointing at the instance's hand-over socket (its directory is
//!   bound at `/run/kfdmux/<name>`).
//! - **FUSE** instances are files, and a FUSE file cannot be bind-mounted onto `/dev/kfd`: the
//!   transport gives every client process its own inode per path walk (mmap isolation, see
//!   docs/fuse-transport.md), and a bind mount pins the one inode its creator looked up, which
//!   every other process is refused (`EACCES`). So the whole FUSE directory is bound at
//!   `/run/kfdmux/<name>` (path walks go through it) and a `createContainer` hook
//!   (`kfdmux cdi hook`) makes `/dev/kfd` and `/dev/dri/renderD*` symlinks into it. CDI has no
//!   symlink edit; the hook runs in the container's mount namespace before `pivot_root`, after
//!   the runtime mounted the container's `/dev`.
//! - Both: the instance's topology at `/sys/devices/virtual/kfd/kfd` and `amdgpu` at
//!   `/sys/module/amdgpu` (where the host has neither, a small tmpfs is mounted on
//!   `/sys/devices/virtual` resp. `/sys/module` first, because a read-only sysfs cannot grow
//!   mount points), and a fake `lsmod` at `/usr/local/bin/lsmod` (rocminfo 5.2.3 runs
//!   `lsmod | grep amdgpu`).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde_json::{json, Value};

use crate::config::{Config, Instance};
use crate::daemon::Transport;

/// The CDI kind: devices are named `kfdmux.dev/gpu=<instance>`.
pub const CDI_KIND: &str = "kfdmux.dev/gpu";
/// The spec version written: the oldest that has every edit used (mounts, deviceNodes, env,
/// hooks), so that older CDI readers (podman 4.3 in Debian 12) accept it too.
pub const CDI_VERSION: &str = "0.5.0";
/// Where the preload library appears in a container.
pub const CONTAINER_PRELOAD: &str = "/usr/lib/kfdmux/libkfdmux_preload.so";
/// Where an instance's FUSE directory (or hand-over socket directory) appears in a container.
pub const CONTAINER_DIR: &str = "/run/kfdmux";
/// Where the fake lsmod appears (first in the default PATH of podman, docker and CRI-O).
pub const CONTAINER_LSMOD: &str = "/usr/local/bin/lsmod";

/// The host facts a spec depends on.
#[derive(Debug, Clone)]
pub struct HostFacts {
    /// `/sys/devices/virtual/kfd/kfd` exists (an amdgpu host): the topology binds onto it.
    pub has_kfd_sysfs: bool,
    /// `/sys/module/amdgpu` exists.
    pub has_amdgpu_module: bool,
    /// The `kfdmux` executable the FUSE hook runs (absolute).
    pub hook_binary: PathBuf,
}

impl HostFacts {
    pub fn probe(hook_binary: Option<&Path>) -> HostFacts {
        let hook_binary = hook_binary
            .map(Path::to_path_buf)
            .or_else(|| std::env::current_exe().ok())
            .unwrap_or_else(|| PathBuf::from("/usr/bin/kfdmux"));
        HostFacts {
            has_kfd_sysfs: Path::new("/sys/devices/virtual/kfd/kfd").is_dir(),
            has_amdgpu_module: Path::new("/sys/module/amdgpu").is_dir(),
            hook_binary,
        }
    }
}

fn bind(host: &Path, container: &str, ro: bool) -> Value {
    json!({
        "hostPath": host.to_string_lossy(),
        "containerPath": container,
        "options": ["rbind", if ro { "ro" } else { "rw" }, "nosuid"],
    })
}

fn tmpfs(container: &str) -> Value {
    json!({
        "hostPath": "tmpfs",
        "containerPath": container,
        "type": "tmpfs",
        "options": ["nosuid", "nodev", "noexec", "mode=755", "size=64k"],
    })
}

/// Where the instance's files appear in a container (`/run/kfdmux/<name>`).
pub fn container_dir(inst: &Instance) -> String {
    format!("{CONTAINER_DIR}/{}", inst.name)
}

/// The `/dev` symlinks a FUSE instance needs: (target, link).
pub fn fuse_links(inst: &Instance) -> Vec<(String, String)> {
    let dir = container_dir(inst);
    let mut v = vec![(format!("{dir}/kfd"), "/dev/kfd".to_string())];
    for m in inst.render_minors() {
        v.push((format!("{dir}/renderD{m}"), format!("/dev/dri/renderD{m}")));
    }
    v
}

/// The container edits of one instance.
pub fn device_edits(cfg: &Config, inst: &Instance, host: &HostFacts) -> Value {
    let mut mounts = Vec::new();
    let mut env: Vec<String> = Vec::new();
    let mut nodes = Vec::new();
    let mut hooks = Vec::new();
    match inst.transport {
        Transport::Fuse => {
            mounts.push(bind(&inst.mount, &container_dir(inst), false));
            let mut args = vec![
                host.hook_binary.to_string_lossy().into_owned(),
                "cdi".into(),
                "hook".into(),
            ];
            for (target, link) in fuse_links(inst) {
                args.push("--symlink".into());
                args.push(format!("{target}:{link}"));
            }
            hooks.push(json!({
                "hookName": "createContainer",
                "path": host.hook_binary.to_string_lossy(),
                "args": args,
            }));
        }
        Transport::Cuse => {
            nodes.push(json!({
                "path": "/dev/kfd",
                "hostPath": format!("/dev/{}", inst.devname),
                "permissions": "rw",
            }));
            for m in inst.render_minors() {
                nodes.push(json!({
                    "path": format!("/dev/dri/renderD{m}"),
                    "hostPath": format!("/dev/{}", crate::transport::cuse::render_devname(&inst.devname, m)),
                    "permissions": "rw",
                }));
            }
            if let Some(dir) = inst.handover_socket.parent() {
                mounts.push(bind(dir, &container_dir(inst), false));
            }
            mounts.push(bind(&cfg.preload_lib, CONTAINER_PRELOAD, true));
            let sock = inst
                .handover_socket
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            env.push(format!("LD_PRELOAD={CONTAINER_PRELOAD}"));
            env.push(format!(
                "{}={}/{sock}",
                crate::handover::SOCKET_ENV,
                container_dir(inst)
            ));
        }
    }
    if !host.has_kfd_sysfs {
        mounts.push(tmpfs("/sys/devices/virtual"));
    }
    mounts.push(bind(
        &inst.sysfs_dir.join("kfd"),
        "/sys/devices/virtual/kfd/kfd",
        true,
    ));
    if !host.has_amdgpu_module {
        mounts.push(tmpfs("/sys/module"));
    }
    mounts.push(bind(
        &inst.sysfs_dir.join("module/amdgpu"),
        "/sys/module/amdgpu",
        true,
    ));
    mounts.push(json!({
        "hostPath": cfg.lsmod_path().to_string_lossy(),
        "containerPath": CONTAINER_LSMOD,
        "options": ["bind", "ro"],
    }));
    if cfg.device == "kfd" {
        // Secondary KFD contexts refuse USERPTR (DESIGN.md §1.6).
        env.push("HSA_USERPTR_FOR_PAGED_MEM=0".into());
    }
    let mut edits = serde_json::Map::new();
    if !env.is_empty() {
        edits.insert("env".into(), json!(env));
    }
    if !nodes.is_empty() {
        edits.insert("deviceNodes".into(), Value::Array(nodes));
    }
    edits.insert("mounts".into(), Value::Array(mounts));
    if !hooks.is_empty() {
        edits.insert("hooks".into(), Value::Array(hooks));
    }
    Value::Object(edits)
}

/// The CDI spec of every instance in `cfg`.
pub fn spec(cfg: &Config, host: &HostFacts) -> Value {
    let devices: Vec<Value> = cfg
        .instances
        .iter()
        .map(|i| json!({ "name": i.name, "containerEdits": device_edits(cfg, i, host) }))
        .collect();
    json!({ "cdiVersion": CDI_VERSION, "kind": CDI_KIND, "devices": devices })
}

/// Writes the spec to `path` atomically (a reader never sees half a spec), mode 0644.
pub fn write_spec(path: &Path, spec: &Value) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        let text = serde_json::to_string_pretty(spec).map_err(std::io::Error::other)?;
        f.write_all(text.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, path)
}

#[derive(clap::Args, Debug, Clone)]
pub struct GenerateOptions {
    /// The daemon's configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Write the spec here (e.g. /etc/cdi/kfdmux.json; JSON is valid YAML) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The kfdmux executable the FUSE symlink hook runs (default: daemon.hook_binary, else
    /// this executable).
    #[arg(long)]
    pub hook_binary: Option<PathBuf>,
}

/// `kfdmux cdi generate`.
pub fn generate_command(o: &GenerateOptions) -> Result<i32, String> {
    let cfg = match crate::config::load(&o.config) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs {
                eprintln!("{e}");
            }
            return Ok(1);
        }
    };
    let hook = o.hook_binary.as_deref().or(cfg.hook_binary.as_deref());
    let s = spec(&cfg, &HostFacts::probe(hook));
    match &o.out {
        Some(p) => {
            write_spec(p, &s).map_err(|e| format!("{}: {e}", p.display()))?;
            eprintln!(
                "wrote {} ({} device(s) of kind {CDI_KIND})",
                p.display(),
                cfg.instances.len()
            );
        }
        None => println!(
            "{}",
            serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
        ),
    }
    Ok(0)
}

#[derive(clap::Args, Debug, Clone)]
pub struct HookOptions {
    /// `TARGET:LINK`: create symlink LINK (absolute, inside the container) pointing to TARGET.
    #[arg(long = "symlink", value_name = "TARGET:LINK")]
    pub symlinks: Vec<String>,
}

/// The container's root directory from the OCI state (stdin of a hook) and its config.json.
pub fn rootfs_from_state(state: &str) -> Result<PathBuf, String> {
    let st: Value = serde_json::from_str(state).map_err(|e| format!("OCI state on stdin: {e}"))?;
    let bundle = st
        .get("bundle")
        .and_then(Value::as_str)
        .ok_or("OCI state has no bundle")?;
    let cfg_path = Path::new(bundle).join("config.json");
    let text =
        std::fs::read_to_string(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let root = cfg
        .get("root")
        .and_then(|r| r.get("path"))
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{}: no root.path", cfg_path.display()))?;
    Ok(Path::new(bundle).join(root)) // join keeps an absolute root as is
}

/// Creates `link` (absolute container path) → `target` under `root`. Intermediate directories
/// are created; none may be a symlink (the container's image must not redirect us to the
/// host), and an existing `link` is accepted only if it already points to `target`.
pub fn make_link(root: &Path, target: &str, link: &str) -> Result<(), String> {
    let rel = Path::new(link)
        .strip_prefix("/")
        .map_err(|_| format!("{link}: not an absolute path"))?;
    let parts: Vec<Component> = rel.components().collect();
    if parts.is_empty() || parts.iter().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("{link}: must be a plain absolute path"));
    }
    let mut dir = root.to_path_buf();
    for c in &parts[..parts.len() - 1] {
        dir.push(c);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{}: exists and is not a directory", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?
            }
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        }
    }
    let path = dir.join(parts[parts.len() - 1]);
    match std::fs::read_link(&path) {
        Ok(t) if t == Path::new(target) => return Ok(()),
        Ok(t) => {
            return Err(format!(
                "{link} already points to {} (two kfdmux devices in one container?)",
                t.display()
            ))
        }
        Err(_) if std::fs::symlink_metadata(&path).is_ok() => {
            return Err(format!("{link} already exists in the container"))
        }
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, &path)
        .map_err(|e| format!("symlink {}: {e}", path.display()))
}

/// `kfdmux cdi hook`: an OCI `createContainer` hook; reads the container state on stdin.
pub fn hook_command(o: &HookOptions) -> Result<i32, String> {
    let mut state = String::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_string(&mut state)
        .map_err(|e| format!("reading the OCI state: {e}"))?;
    let root = rootfs_from_state(&state)?;
    for s in &o.symlinks {
        let (target, link) = s
            .split_once(':')
            .ok_or_else(|| format!("--symlink {s}: expected TARGET:LINK"))?;
        make_link(&root, target, link)?;
    }
    Ok(0)
}
