//! `kfdmux run`'s namespace against a stand-in daemon: a plain directory with plain files
//! where the FUSE mount would be, and a hand-made sysfs tree beside it (`--daemon DIR` takes
//! any directory that has a `kfd` file and a `DIR.sysfs/kfd/topology`). Needs root.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::{is_root, kfdmux_bin, require, TempDir};
use kfdmux::run::{run_command, RunOptions};

/// run_command changes process-wide signal dispositions while CMD runs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct FakeDaemon {
    dir: TempDir,
    mount: PathBuf,
}

impl FakeDaemon {
    fn new() -> FakeDaemon {
        let dir = TempDir::new("kfdmux-test-ns");
        let mount = dir.path().join("mnt");
        fs::create_dir(&mount).unwrap();
        fs::write(mount.join("kfd"), "fake-kfd\n").unwrap();
        fs::write(mount.join("renderD128"), "fake-render-128\n").unwrap();
        fs::write(mount.join("renderD129"), "fake-render-129\n").unwrap();
        let sys = dir.path().join("mnt.sysfs");
        for n in 0..3 {
            fs::create_dir_all(sys.join(format!("kfd/topology/nodes/{n}"))).unwrap();
            fs::write(
                sys.join(format!("kfd/topology/nodes/{n}/gpu_id")),
                format!("{}\n", n * 7),
            )
            .unwrap();
        }
        fs::write(sys.join("kfd/topology/generation_id"), "42\n").unwrap();
        fs::create_dir_all(sys.join("module/amdgpu")).unwrap();
        fs::write(sys.join("module/amdgpu/initstate"), "live\n").unwrap();
        fs::write(sys.join("module/amdgpu/version"), "kfdmux\n").unwrap();
        FakeDaemon { dir, mount }
    }

    fn opts(&self, cmd: &[&str]) -> RunOptions {
        RunOptions {
            daemon: Some(self.mount.clone()),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..RunOptions::default()
        }
    }
}

/// What of kfdmux's may exist on the host: none of it may appear because of a run.
fn host_state() -> Vec<bool> {
    [
        "/dev/kfd",
        "/dev/dri/renderD128",
        "/sys/class/kfd",
        "/sys/devices/virtual/kfd",
        "/sys/module/amdgpu",
    ]
    .iter()
    .map(|p| Path::new(p).symlink_metadata().is_ok())
    .collect()
}

#[test]
fn namespace_shows_kfdmux_files_and_keeps_the_host_untouched() {
    if !require(is_root(), "root") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fake = FakeDaemon::new();
    let before = host_state();
    let dev_before: Vec<_> = fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    let report = fake.dir.path().join("report");
    let m = fake.mount.display().to_string();
    let script = format!(
        r#"exec > {report} 2>&1
echo "kfd_link=$(readlink /dev/kfd)"
echo "kfd=$(cat /dev/kfd)"
echo "r129_link=$(readlink /dev/dri/renderD129)"
echo "r128=$(cat /dev/dri/renderD128)"
echo "nodes=$(ls /sys/devices/virtual/kfd/kfd/topology/nodes | tr '\n' ' ')"
echo "class_gen=$(cat /sys/class/kfd/kfd/topology/generation_id)"
echo "class_gpu_id2=$(cat /sys/class/kfd/kfd/topology/nodes/2/gpu_id)"
echo "initstate=$(cat /sys/module/amdgpu/initstate)"
echo "lsmod=$(lsmod | grep -c amdgpu)"
echo "null=$(echo x > /dev/null && echo ok)"
echo "tty_kept=$(test -d /sys/devices/virtual/tty && echo yes)"
echo "lo_kept=$(test -e /sys/class/net/lo && echo yes)"
echo "module_kept=$(ls /sys/module | grep -c -x -e fuse -e kernel)"
echo "uid=$(id -u)"
"#,
        report = report.display()
    );
    let status = run_command(&fake.opts(&["sh", "-c", &script])).expect("run_command");
    let out = fs::read_to_string(&report).unwrap_or_default();
    assert_eq!(status, 0, "{out}");
    let expect = [
        format!("kfd_link={m}/kfd"),
        "kfd=fake-kfd".into(),
        format!("r129_link={m}/renderD129"),
        "r128=fake-render-128".into(),
        "nodes=0 1 2 ".into(),
        "class_gen=42".into(),
        "class_gpu_id2=14".into(),
        "initstate=live".into(),
        "lsmod=1".into(),
        "null=ok".into(),
        "tty_kept=yes".into(),
        "lo_kept=yes".into(),
        "uid=0".into(),
    ];
    for line in expect {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
    // Every module directory of the host is still there beside amdgpu.
    assert!(!out.contains("module_kept=0"), "{out}");
    assert_eq!(host_state(), before, "the host's /dev or /sys changed");
    let dev_after: Vec<_> = fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(dev_before.len(), dev_after.len(), "host /dev changed");
}

#[test]
fn exit_status_is_cmds_and_signals_map_to_128_plus() {
    if !require(is_root(), "root") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fake = FakeDaemon::new();
    assert_eq!(run_command(&fake.opts(&["sh", "-c", "exit 7"])).unwrap(), 7);
    assert_eq!(run_command(&fake.opts(&["true"])).unwrap(), 0);
    assert_eq!(
        run_command(&fake.opts(&["sh", "-c", "kill -TERM $$"])).unwrap(),
        128 + 15
    );
}

#[test]
fn runs_as_the_requested_user() {
    if !require(is_root(), "root") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fake = FakeDaemon::new();
    let report = fake.dir.path().join("report");
    fs::write(&report, "").unwrap();
    fs::set_permissions(&report, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let script = format!(
        "echo \"$(id -u):$(id -g):$(id -G) $(cat /dev/kfd) $(lsmod | grep -c amdgpu)\" > {}",
        report.display()
    );
    let opts = RunOptions {
        user: Some("65534:65534".into()),
        ..fake.opts(&["sh", "-c", &script])
    };
    assert_eq!(run_command(&opts).unwrap(), 0);
    assert_eq!(
        fs::read_to_string(&report).unwrap().trim(),
        "65534:65534:65534 fake-kfd 1"
    );
}

#[test]
fn sudo_caller_gets_its_ids_back() {
    if !require(is_root(), "root") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fake = FakeDaemon::new();
    let out = Command::new(kfdmux_bin())
        .arg("run")
        .arg("--daemon")
        .arg(&fake.mount)
        .args([
            "--",
            "sh",
            "-c",
            "echo $(id -u) $(id -g) $USER; cat /dev/kfd",
        ])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = text.lines();
    let who = lines.next().unwrap_or("");
    assert!(who.starts_with("65534 65534"), "{text}");
    assert_eq!(lines.next(), Some("fake-kfd"));
}

#[test]
fn clear_errors() {
    if !require(is_root(), "root") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fake = FakeDaemon::new();
    let e = run_command(&fake.opts(&["no-such-command-kfdmux"])).unwrap_err();
    assert!(e.contains("command not found"), "{e}");
    let empty = TempDir::new("kfdmux-test-empty");
    let opts = RunOptions {
        daemon: Some(empty.path().to_path_buf()),
        ..RunOptions::default()
    };
    let e = run_command(&opts).unwrap_err();
    assert!(e.contains("no kfd file"), "{e}");
    fs::remove_dir_all(fake.dir.path().join("mnt.sysfs")).unwrap();
    let e = run_command(&fake.opts(&["true"])).unwrap_err();
    assert!(e.contains("no topology"), "{e}");
}
