//! The CDI spec generated for a configuration, and the symlink hook it names.

use std::path::{Path, PathBuf};

use kfdmux::cdi::{make_link, rootfs_from_state, spec, HostFacts, CDI_KIND, CDI_VERSION};
use serde_json::Value;

const CONFIG: &str = r#"
[daemon]
gpus = "gfx90a:2,gfx1030"
state_dir = "/run/kfdmux"
preload_lib = "/usr/lib/kfdmux/libkfdmux_preload.so"

[[instance]]
name = "f"
gpus = [0, 2]

[[instance]]
name = "c"
transport = "cuse"
devname = "kfdmux/c/kfd"
gpus = [1]
"#;

fn facts(kfd: bool) -> HostFacts {
    HostFacts {
        has_kfd_sysfs: kfd,
        has_amdgpu_module: kfd,
        hook_binary: PathBuf::from("/usr/bin/kfdmux"),
    }
}

fn device<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap()
}

fn mounts(d: &Value) -> Vec<(String, String)> {
    d["containerEdits"]["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["hostPath"].as_str().unwrap().to_string(),
                m["containerPath"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn spec_has_kind_version_and_one_device_per_instance() {
    let cfg = kfdmux::config::parse(Path::new("k.toml"), CONFIG).unwrap();
    let s = spec(&cfg, &facts(false));
    assert_eq!(s["cdiVersion"], CDI_VERSION);
    assert_eq!(s["kind"], CDI_KIND);
    assert_eq!(s["devices"].as_array().unwrap().len(), 2);
}

#[test]
fn fuse_instance_binds_its_directory_and_hooks_symlinks() {
    let cfg = kfdmux::config::parse(Path::new("k.toml"), CONFIG).unwrap();
    let s = spec(&cfg, &facts(false));
    let f = device(&s, "f");
    let e = &f["containerEdits"];
    assert!(
        e.get("deviceNodes").is_none(),
        "a FUSE file is no device node"
    );
    let m = mounts(f);
    assert!(
        m.contains(&("/run/kfdmux/f/dev".into(), "/run/kfdmux/f".into())),
        "{m:?}"
    );
    assert!(
        m.contains(&(
            "/run/kfdmux/f/sys/kfd".into(),
            "/sys/devices/virtual/kfd/kfd".into()
        )),
        "{m:?}"
    );
    assert!(
        m.contains(&(
            "/run/kfdmux/f/sys/module/amdgpu".into(),
            "/sys/module/amdgpu".into()
        )),
        "{m:?}"
    );
    assert!(
        m.contains(&(
            "/run/kfdmux/bin/lsmod".into(),
            "/usr/local/bin/lsmod".into()
        )),
        "{m:?}"
    );
    // Without a host kfd sysfs, a tmpfs makes room for the mount points, before them.
    let tmp = m
        .iter()
        .position(|x| x.1 == "/sys/devices/virtual")
        .expect("tmpfs");
    let topo = m
        .iter()
        .position(|x| x.1 == "/sys/devices/virtual/kfd/kfd")
        .unwrap();
    assert!(tmp < topo);
    let hooks = e["hooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["hookName"], "createContainer");
    assert_eq!(hooks[0]["path"], "/usr/bin/kfdmux");
    let args: Vec<&str> = hooks[0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "/usr/bin/kfdmux",
            "cdi",
            "hook",
            "--symlink",
            "/run/kfdmux/f/kfd:/dev/kfd",
            "--symlink",
            "/run/kfdmux/f/renderD128:/dev/dri/renderD128",
            "--symlink",
            "/run/kfdmux/f/renderD129:/dev/dri/renderD129",
        ]
    );
    assert!(
        e.get("env").is_none(),
        "the sim needs no environment over FUSE"
    );
}

#[test]
fn cuse_instance_has_device_nodes_preload_and_socket() {
    let cfg = kfdmux::config::parse(Path::new("k.toml"), CONFIG).unwrap();
    let s = spec(&cfg, &facts(true));
    let c = device(&s, "c");
    let e = &c["containerEdits"];
    let nodes = e["deviceNodes"].as_array().unwrap();
    assert_eq!(nodes[0]["path"], "/dev/kfd");
    assert_eq!(nodes[0]["hostPath"], "/dev/kfdmux/c/kfd");
    assert_eq!(nodes[1]["path"], "/dev/dri/renderD128");
    assert_eq!(nodes[1]["hostPath"], "/dev/kfdmux/c/dri/renderD128");
    assert_eq!(nodes.len(), 2);
    let env: Vec<&str> = e["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        env.contains(&"LD_PRELOAD=/usr/lib/kfdmux/libkfdmux_preload.so"),
        "{env:?}"
    );
    assert!(
        env.contains(&"KFDMUX_HANDOVER_SOCKET=/run/kfdmux/c/handover.sock"),
        "{env:?}"
    );
    let m = mounts(c);
    assert!(
        m.contains(&("/run/kfdmux/c/handover".into(), "/run/kfdmux/c".into())),
        "{m:?}"
    );
    assert!(m.contains(&(
        "/usr/lib/kfdmux/libkfdmux_preload.so".into(),
        "/usr/lib/kfdmux/libkfdmux_preload.so".into()
    )));
    // The host has an amdgpu sysfs: bind onto it, no tmpfs over /sys.
    assert!(
        !m.iter()
            .any(|x| x.1 == "/sys/devices/virtual" || x.1 == "/sys/module"),
        "{m:?}"
    );
    assert!(e.get("hooks").is_none());
}

#[test]
fn hook_finds_rootfs_and_makes_links_safely() {
    let base = std::env::temp_dir().join(format!("kfdmux-cdi-hook-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let bundle = base.join("bundle");
    let root = bundle.join("rootfs");
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"}}"#,
    )
    .unwrap();
    let state = format!(
        r#"{{"ociVersion":"1.0.2","id":"x","status":"creating","pid":1,"bundle":"{}"}}"#,
        bundle.display()
    );
    assert_eq!(rootfs_from_state(&state).unwrap(), root);

    make_link(&root, "/run/kfdmux/f/kfd", "/dev/kfd").unwrap();
    make_link(&root, "/run/kfdmux/f/renderD128", "/dev/dri/renderD128").unwrap();
    assert_eq!(
        std::fs::read_link(root.join("dev/kfd")).unwrap(),
        Path::new("/run/kfdmux/f/kfd")
    );
    assert_eq!(
        std::fs::read_link(root.join("dev/dri/renderD128")).unwrap(),
        Path::new("/run/kfdmux/f/renderD128")
    );
    // Idempotent for the same target; a second kfdmux device in one container is refused.
    make_link(&root, "/run/kfdmux/f/kfd", "/dev/kfd").unwrap();
    let e = make_link(&root, "/run/kfdmux/g/kfd", "/dev/kfd").unwrap_err();
    assert!(e.contains("two kfdmux devices"), "{e}");
    // An image cannot redirect the hook out of its root with a symlinked directory.
    std::os::unix::fs::symlink("/tmp", root.join("evil")).unwrap();
    assert!(make_link(&root, "/x", "/evil/kfd").is_err());
    assert!(
        !Path::new("/tmp/kfd").is_symlink()
            || std::fs::read_link("/tmp/kfd").unwrap() != Path::new("/x")
    );
    assert!(make_link(&root, "/x", "/dev/../kfd").is_err());
    assert!(make_link(&root, "/x", "relative").is_err());
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn cdi_generate_command_writes_json() {
    let bin = env!("CARGO_BIN_EXE_kfdmux");
    let dir = std::env::temp_dir().join(format!("kfdmux-cdi-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfgp = dir.join("k.toml");
    std::fs::write(&cfgp, CONFIG).unwrap();
    let out = dir.join("cdi/kfdmux.json");
    let o = std::process::Command::new(bin)
        .args(["cdi", "generate", "--config"])
        .arg(&cfgp)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["kind"], CDI_KIND);
    let hook = &device(&v, "f")["containerEdits"]["hooks"][0]["path"];
    assert_eq!(
        hook.as_str().unwrap(),
        Path::new(bin).canonicalize().unwrap().to_str().unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
