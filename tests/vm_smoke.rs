//! Smoke tests of `scripts/vm-test`, the QEMU VM whose kernel has CUSE (the host's has not).
//!
//! Needs root (apt installs, the cache in /var/cache/kfdmux-vm) and qemu or apt-get. Without
//! them the tests print "skipped: ..." and pass, except under CI=true where they fail.
//! The first run downloads the kernel (about 30 s); later boots take a few seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn in_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
        || Path::new("/usr/sbin").join(prog).is_file()
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `Some(reason)` when the VM cannot run here.
fn vm_unavailable_reason() -> Option<String> {
    if effective_uid() != Some(0) {
        return Some("scripts/vm-test needs root (apt installs, /var/cache/kfdmux-vm)".into());
    }
    if !in_path("qemu-system-x86_64") && !in_path("apt-get") {
        return Some("neither qemu-system-x86_64 nor apt-get is available".into());
    }
    None
}

/// True if the test may go on; otherwise skips (prints why) or, under CI, fails.
fn require(extra: Option<String>) -> bool {
    let Some(reason) = vm_unavailable_reason().or(extra) else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("VM test cannot run under CI: {reason}");
    }
    println!("skipped: {reason}");
    false
}

/// Runs `scripts/vm-test ARGS`; returns its output and prints it (shown on failure).
fn vm_test(args: &[&str]) -> (Output, String) {
    let script = root_dir().join("scripts/vm-test");
    let start = Instant::now();
    let out = Command::new(&script)
        .args(args)
        .current_dir(root_dir())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("--- guest console:\n{stdout}");
    println!(
        "--- vm-test stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("vm-test took {secs:.2} s (boot + command, incl. any first-run setup)");
    (out, stdout)
}

#[test]
fn vm_runs_command_propagates_status_and_has_cuse() {
    if !require(None) {
        return;
    }
    let (out, stdout) = vm_test(&[
        "--",
        "sh",
        "-c",
        "ls -l /dev/cuse && grep -w cuse /proc/misc && grep -w fuse /proc/filesystems \
         && test -d /sys/module/cuse && echo guest-ok && exit 7",
    ]);
    assert!(
        stdout.contains("guest-ok"),
        "guest command did not run to the end"
    );
    // /dev/cuse: misc char device 10:203
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("crw") && l.contains("10, 203") && l.ends_with("/dev/cuse")),
        "no /dev/cuse char device 10:203 in the listing"
    );
    assert!(
        stdout.lines().any(|l| l.trim() == "203 cuse"),
        "/proc/misc lacks cuse"
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "guest exit status not propagated"
    );
}

#[test]
fn vm_cuse_device_with_subdirectory_name_appears() {
    let gcc = (!in_path("gcc")).then(|| "gcc is not installed (scripts/deps)".to_string());
    if !require(gcc) {
        return;
    }
    // Build the raw-protocol CUSE probe on the host; vm-test copies it and its libc in.
    let dir = std::env::temp_dir().join(format!("kfdmux-vm-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let probe = dir.join("cuse_probe");
    let src = root_dir().join("tests/vm/cuse_probe.c");
    let cc = Command::new("gcc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&probe)
        .arg(&src)
        .output()
        .expect("run gcc");
    assert!(
        cc.status.success(),
        "gcc failed: {}",
        String::from_utf8_lossy(&cc.stderr)
    );

    let probe_str = probe.to_str().expect("utf-8 temp path");
    let (out, stdout) = vm_test(&["--file", probe_str, "--", probe_str, "kfdmux/kfd"]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        stdout.contains("cuse-probe: node /dev/kfdmux/kfd char"),
        "CUSE node with a sub-directory name did not appear under /dev"
    );
    assert!(stdout.contains("sysfs /sys/class/cuse/kfdmux!kfd present"));
    assert!(stdout.contains("cuse-probe: client ioctl GET_VERSION -> 1.14"));
    assert!(
        stdout.contains("/dev/kfdmux/kfd is gone"),
        "node not removed with its server"
    );
    assert!(stdout.contains("cuse-probe: OK"));
    assert_eq!(out.status.code(), Some(0));
}
