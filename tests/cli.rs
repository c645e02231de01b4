//! The `kfdmux` command line: every command and subcommand documents itself, and the common
//! mistakes (no CUSE in the kernel, no mount point, unknown GPU, `run` without root) end with a
//! non-zero status and a message that says what to do.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{have_cmd, is_root, kfdmux_bin, TempDir};

fn kfdmux(args: &[&str]) -> Output {
    Command::new(kfdmux_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kfdmux")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `(name, about)` of every entry in the `Commands:` section of a clap help text.
fn commands(help: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.starts_with("Commands:") {
            inside = true;
            continue;
        }
        if inside {
            if line.trim().is_empty() || !line.starts_with("  ") {
                break;
            }
            // Continuation lines of a wrapped about are indented further than the names.
            if line.starts_with("   ") {
                continue;
            }
            let mut it = line.trim().splitn(2, char::is_whitespace);
            let name = it.next().unwrap_or_default().to_string();
            let about = it.next().unwrap_or_default().trim().to_string();
            out.push((name, about));
        }
    }
    out
}

/// Checks `kfdmux <path> --help` and recurses into its subcommands; returns how many it saw.
fn check_help(path: &[&str]) -> usize {
    let mut args = path.to_vec();
    args.push("--help");
    let o = kfdmux(&args);
    let t = text(&o);
    assert!(
        o.status.success(),
        "kfdmux {} exited {:?}:\n{t}",
        args.join(" "),
        o.status
    );
    assert!(
        t.contains("Usage: kfdmux"),
        "kfdmux {}: no usage line:\n{t}",
        args.join(" ")
    );
    // The about text is the first line of the help, before `Usage:`.
    let about = t.split("Usage:").next().unwrap_or_default().trim();
    assert!(
        !about.is_empty(),
        "kfdmux {} says nothing about what it does:\n{t}",
        args.join(" ")
    );
    let mut seen = 1;
    for (name, sub_about) in commands(&t) {
        if name == "help" {
            continue;
        }
        let mut sub = path.to_vec();
        sub.push(&name);
        assert!(
            !sub_about.is_empty(),
            "`kfdmux {}` has no description in:\n{t}",
            sub.join(" ")
        );
        seen += check_help(&sub);
    }
    seen
}

#[test]
fn every_command_has_help_that_says_what_it_does() {
    let top = kfdmux(&["--help"]);
    let t = text(&top);
    let names: Vec<String> = commands(&t).into_iter().map(|(n, _)| n).collect();
    for want in ["serve", "run", "check", "trace", "replay", "topology"] {
        assert!(
            names.iter().any(|n| n == want),
            "no `{want}` command in:\n{t}"
        );
    }
    let seen = check_help(&[]);
    assert!(seen >= 8, "only {seen} help pages");
    // The transports are documented where they are chosen.
    let serve = text(&kfdmux(&["serve", "--help"]));
    assert!(
        serve.contains("--transport") && serve.contains("cuse") && serve.contains("fuse"),
        "{serve}"
    );
}

#[test]
fn serve_cuse_without_dev_cuse_says_what_to_do() {
    if Path::new("/dev/cuse").exists() {
        eprintln!(
            "skipped: /dev/cuse exists here, so `serve --transport cuse` would start a daemon"
        );
        return;
    }
    let dir = TempDir::new("kfdmux-cli");
    let sock = dir.path().join("handover.sock");
    let o = kfdmux(&[
        "serve",
        "--transport",
        "cuse",
        "--handover-socket",
        sock.to_str().expect("utf-8"),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "exited 0:\n{t}");
    assert!(t.contains("/dev/cuse"), "names the missing device: {t}");
    assert!(t.contains("modprobe cuse"), "says how to load CUSE: {t}");
    assert!(
        t.contains("--transport fuse"),
        "names the FUSE alternative: {t}"
    );
    assert!(!sock.exists(), "nothing was left listening");
}

#[test]
fn serve_fuse_needs_a_mount_point() {
    let o = kfdmux(&["serve", "--transport", "fuse"]);
    let t = text(&o);
    assert!(!o.status.success(), "exited 0:\n{t}");
    assert!(t.contains("--mount"), "names the missing option: {t}");
}

#[test]
fn unknown_gpu_preset_names_the_known_ones() {
    let dir = TempDir::new("kfdmux-cli");
    let mnt = dir.path().join("mnt");
    let o = kfdmux(&[
        "serve",
        "--gpus",
        "gfx999",
        "--mount",
        mnt.to_str().expect("utf-8"),
    ]);
    let t = text(&o);
    assert!(!o.status.success(), "exited 0:\n{t}");
    assert!(t.contains("gfx999"), "names the bad preset: {t}");
    for p in kfdmux::topology::PRESETS {
        assert!(t.contains(p.name), "does not list preset {}: {t}", p.name);
    }
    assert!(
        !mnt.exists()
            || std::fs::read_dir(&mnt)
                .map(|mut d| d.next().is_none())
                .unwrap_or(true)
    );
}

#[test]
fn topology_writes_the_sysfs_tree() {
    let dir = TempDir::new("kfdmux-cli");
    let out = dir.path().join("sys");
    let o = kfdmux(&[
        "topology",
        "--gpus",
        "gfx90a:2",
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let nodes = out.join("kfd/topology/nodes");
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = std::fs::read_to_string(nodes.join(format!("{n}/gpu_id")))
            .unwrap_or_else(|e| panic!("node {n}: {e}"));
        ids.push(id.trim().parse::<u32>().expect("gpu_id is a number"));
        assert!(
            nodes.join(format!("{n}/properties")).is_file(),
            "node {n} has properties"
        );
    }
    assert!(
        !nodes.join("3").exists(),
        "one CPU node and two GPUs, no more"
    );
    assert_eq!(ids[0], 0, "node 0 is the CPU");
    assert!(
        ids[1] != 0 && ids[2] != 0 && ids[1] != ids[2],
        "distinct GPU ids: {ids:?}"
    );
    let want = kfdmux::topology::parse_gpus("gfx90a:2").expect("spec");
    assert_eq!(
        ids[1..],
        [want[0].gpu_id, want[1].gpu_id],
        "the ids the daemon would serve"
    );
}

#[test]
fn run_without_root_says_it_needs_root() {
    let mut cmd = if is_root() {
        if !have_cmd("setpriv") {
            eprintln!(
                "skipped: running as root and setpriv (util-linux) is missing to drop privileges"
            );
            return;
        }
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(kfdmux_bin());
        c
    } else {
        Command::new(kfdmux_bin())
    };
    let o = cmd
        .args(["run", "--", "true"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kfdmux run");
    let t = text(&o);
    assert!(!o.status.success(), "exited 0:\n{t}");
    assert!(t.contains("needs root"), "says it needs root: {t}");
}
