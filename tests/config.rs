//! The configuration file: parsing, resolution and error reports with line numbers.

use std::path::Path;

use kfdmux::config::{parse, ConfigError};
use kfdmux::daemon::Transport;

fn errors(src: &str) -> Vec<ConfigError> {
    match parse(Path::new("kfdmux.toml"), src) {
        Ok(_) => panic!("accepted:\n{src}"),
        Err(e) => e,
    }
}

fn one_error(src: &str) -> String {
    let e = errors(src);
    assert_eq!(e.len(), 1, "{e:?}");
    e[0].to_string()
}

const GOOD: &str = r#"
[daemon]
gpus = "gfx90a:2,gfx1030"
state_dir = "/run/kfdmux-test"
cdi_spec = "/var/run/cdi/kfdmux.json"

[[instance]]
name = "a"
gpus = [0]
quota_mem = "4G"
allow_users = ["root", 1000]

[[instance]]
name = "b"
transport = "cuse"
gpus = [2, 1]
quota_queues = 8
quota_events = 64
max_contexts_per_uid = 2
record = "/var/log/kfdmux/b.trace"

[[instance]]
name = "own"
gpus = "gfx942"
mount = "/srv/kfdmux/own"
"#;

#[test]
fn good_config_resolves_instances() {
    let cfg = parse(Path::new("kfdmux.toml"), GOOD).expect("valid");
    assert_eq!(cfg.gpus.len(), 3);
    assert_eq!(cfg.instances.len(), 3);

    let a = &cfg.instances[0];
    assert_eq!(a.transport, Transport::Fuse);
    assert_eq!(a.mount, Path::new("/run/kfdmux-test/a/dev"));
    assert_eq!(a.sysfs_dir, Path::new("/run/kfdmux-test/a/sys"));
    assert_eq!(a.gpus.len(), 1);
    // VRAM shows the quota (4 GiB < the MI210's 64 GiB).
    assert_eq!(a.gpus[0].preset.vram_bytes, 4 << 30);
    assert_eq!(a.policy.quotas.mem_bytes, Some(4 << 30));
    assert_eq!(a.policy.allow_users, Some(vec![0, 1000]));
    assert_eq!(a.line, 7);

    let b = &cfg.instances[1];
    assert_eq!(b.transport, Transport::Cuse);
    assert_eq!(b.devname, "kfdmux/b/kfd");
    assert_eq!(b.host_gpus, Some(vec![2, 1]));
    assert_eq!(b.gpus_spec, "gfx1030,gfx90a");
    // Renumbered the way a container expects: index 0.., node 1.., render minor 128..
    for (i, g) in b.gpus.iter().enumerate() {
        assert_eq!(g.index, i as u32);
        assert_eq!(g.node_id, i as u32 + 1);
        assert_eq!(g.render_minor, 128 + i as u32);
    }
    // ... but the node's identity stays: gpu_id and PCI location of the node's GPU 2 and 1.
    assert_eq!(b.gpus[0].gpu_id, cfg.gpus[2].gpu_id);
    assert_eq!(b.gpus[1].location_id, cfg.gpus[1].location_id);
    // No memory quota: the preset's VRAM.
    assert_eq!(b.gpus[1].preset.vram_bytes, cfg.gpus[1].preset.vram_bytes);
    assert_eq!(b.policy.quotas.queues, Some(8));
    assert_eq!(b.policy.quotas.events, Some(64));
    assert_eq!(b.policy.max_contexts_per_uid, Some(2));
    assert_eq!(
        b.record.as_deref(),
        Some(Path::new("/var/log/kfdmux/b.trace"))
    );
    assert_eq!(
        b.handover_socket,
        Path::new("/run/kfdmux-test/b/handover/handover.sock")
    );

    let own = &cfg.instances[2];
    assert_eq!(own.host_gpus, None);
    assert_eq!(own.gpus[0].preset.name, "gfx942");
    assert_eq!(own.mount, Path::new("/srv/kfdmux/own"));
}

#[test]
fn unknown_preset_names_instance_and_line() {
    let src = "[[instance]]\nname = \"a\"\n\ngpus = \"gfx999\"\n";
    let e = one_error(src);
    assert!(
        e.starts_with("kfdmux.toml:4: instance 'a': unknown preset 'gfx999'"),
        "{e}"
    );
}

#[test]
fn syntax_and_unknown_keys_have_lines() {
    let e = one_error("[daemon]\ngpus = \"gfx90a\"\n\n[[instance]]\nname = \"a\"\ngpus = [0]\nquota_memory = \"1G\"\n");
    assert!(
        e.starts_with("kfdmux.toml:7:") && e.contains("quota_memory"),
        "{e}"
    );
    let e = one_error("[daemon]\ngpus = \"gfx90a\n");
    assert!(e.starts_with("kfdmux.toml:2:"), "{e}");
    let e = one_error("[[instance]]\nname = \"a\"\ngpus = \"gfx90a\"\ntransport = \"virtio\"\n");
    assert_eq!(
        e,
        "kfdmux.toml:4: instance 'a': unknown transport 'virtio' (fuse or cuse)"
    );
}

#[test]
fn every_mistake_is_reported_in_line_order() {
    let src = r#"[daemon]
gpus = "gfx90a:2"
state_dir = "relative/dir"

[[instance]]
name = "a"
gpus = [0, 5]
quota_mem = "12X"

[[instance]]
name = "a"
gpus = [1]

[[instance]]
name = "c"
transport = "cuse"
devname = "../kfd"
gpus = [1]
allow_users = ["no-such-user-kfdmux"]
mount = "/x"
"#;
    let errs = errors(src);
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let lines: Vec<usize> = errs.iter().filter_map(|e| e.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "{text:#?}");
    let has = |l: usize, s: &str| {
        text.iter()
            .any(|t| t.starts_with(&format!("kfdmux.toml:{l}:")) && t.contains(s))
    };
    assert!(has(3, "state_dir must be an absolute path"), "{text:#?}");
    assert!(has(7, "gpu 5 does not exist"), "{text:#?}");
    assert!(has(8, "quota_mem"), "{text:#?}");
    assert!(
        has(10, "already used by the instance on line 5"),
        "{text:#?}"
    );
    assert!(has(17, "devname '../kfd'"), "{text:#?}");
    assert!(has(19, "unknown user"), "{text:#?}");
    assert!(has(20, "mount is for fuse instances"), "{text:#?}");
}

#[test]
fn conflicts_between_instances() {
    let e = one_error("[[instance]]\nname = \"a\"\ngpus = \"gfx90a\"\nmount = \"/m\"\n[[instance]]\nname = \"b\"\ngpus = \"gfx90a\"\nmount = \"/m\"\n");
    assert_eq!(
        e,
        "kfdmux.toml:5: instance 'b': mount /m is already instance 'a''s"
    );
    let e = one_error("[[instance]]\nname = \"a\"\ngpus = [0]\n");
    assert!(
        e.starts_with("kfdmux.toml:3: instance 'a': gpus by index need daemon.gpus"),
        "{e}"
    );
    let e = one_error("[daemon]\ngpus = \"gfx90a:2\"\n[[instance]]\nname = \"a\"\ngpus = [1, 1]\n");
    assert!(e.contains("gpu 1 (gfx90a) is listed twice"), "{e}");
    let e =
        one_error("[daemon]\ndevice = \"kfd\"\n[[instance]]\nname = \"a\"\ngpus = \"gfx90a\"\n");
    assert!(e.starts_with("kfdmux.toml:2: daemon: device 'kfd'"), "{e}");
    let e = one_error("[[instance]]\nname = \"bad/name\"\ngpus = \"gfx90a\"\n");
    assert!(
        e.starts_with("kfdmux.toml:2: instance name 'bad/name'"),
        "{e}"
    );
    let e = one_error("[daemon]\ngpus = \"gfx90a\"\n");
    assert!(e.contains("no [[instance]]"), "{e}");
}

#[test]
fn example_config_in_deploy_is_valid() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kfdmux.toml");
    let cfg = kfdmux::config::load(&p).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(cfg.instances.len() >= 2);
    assert_eq!(
        cfg.cdi_spec.as_deref(),
        Some(Path::new("/var/run/cdi/kfdmux.json"))
    );
}

#[test]
fn config_check_command_exit_codes() {
    let bin = env!("CARGO_BIN_EXE_kfdmux");
    let dir = std::env::temp_dir().join(format!("kfdmux-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[instance]]\nname = \"a\"\ngpus = \"gfx999\"\n").unwrap();
    let out = std::process::Command::new(bin)
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3: instance 'a': unknown preset 'gfx999'",
            bad.display()
        )),
        "{err}"
    );
    let good = dir.join("good.toml");
    std::fs::write(&good, GOOD).unwrap();
    let out = std::process::Command::new(bin)
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("3 instance(s)")
            && text.contains("instance 'a': fuse /run/kfdmux-test/a/dev, gpus gfx90a"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fuse_uring_per_instance() {
    let src = "[[instance]]\nname = \"a\"\ngpus = \"gfx90a\"\nfuse_uring = true\nfuse_uring_depth = 4\n\n[[instance]]\nname = \"b\"\ngpus = \"gfx90a\"\nfuse_uring = true\n\n[[instance]]\nname = \"c\"\ngpus = \"gfx90a\"\n";
    let cfg = parse(Path::new("kfdmux.toml"), src).expect("valid");
    let depths: Vec<_> = cfg.instances.iter().map(|i| i.fuse_uring).collect();
    assert_eq!(depths, [Some(4), Some(16), None]);
    let lines = kfdmux::config::describe(&cfg);
    assert!(lines[0].contains("fuse_uring depth 4"), "{lines:?}");
    assert!(!lines[2].contains("fuse_uring"), "{lines:?}");

    let e = one_error(
        "[[instance]]\nname = \"a\"\ngpus = \"gfx90a\"\ntransport = \"cuse\"\nfuse_uring = true\n",
    );
    assert_eq!(
        e,
        "kfdmux.toml:5: instance 'a': fuse_uring is for fuse instances"
    );
    let e = one_error("[[instance]]\nname = \"a\"\ngpus = \"gfx90a\"\nfuse_uring_depth = 8\n");
    assert_eq!(
        e,
        "kfdmux.toml:4: instance 'a': fuse_uring_depth needs fuse_uring = true"
    );
    for bad in [0, 257] {
        let e = one_error(&format!(
            "[[instance]]\nname = \"a\"\ngpus = \"gfx90a\"\nfuse_uring = true\nfuse_uring_depth = {bad}\n"
        ));
        assert_eq!(
            e,
            "kfdmux.toml:5: instance 'a': fuse_uring_depth must be 1..=256"
        );
    }
}
