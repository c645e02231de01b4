//! Debian's unmodified rocminfo 5.2.3 under `kfdmux run` against the simulated GPUs.
//! Needs root, /dev/fuse and rocminfo (scripts/deps installs it).

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{have_cmd, have_fuse, is_root, kfdmux_bin, require, Daemon};

fn prerequisites() -> bool {
    require(is_root(), "root")
        && require(have_fuse(), "/dev/fuse")
        && require(have_cmd("rocminfo"), "rocminfo")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// rocminfo's output split into agents: each is the lines after an `Agent N` header.
fn agents(stdout: &str) -> Vec<Vec<String>> {
    let mut agents: Vec<Vec<String>> = Vec::new();
    for line in stdout.lines() {
        let t = line.trim();
        if t.strip_prefix("Agent ")
            .is_some_and(|n| n.parse::<u32>().is_ok())
        {
            agents.push(Vec::new());
        } else if let Some(a) = agents.last_mut() {
            a.push(t.to_string());
        }
    }
    agents
}

/// Values of `key:` lines of an agent, in order (`Name:` does not match `Marketing Name:`).
fn values<'a>(agent: &'a [String], key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}:");
    agent
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::trim)
        .collect()
}

/// The leading decimal number of a value such as `16(0x10) KB`.
fn leading_number(v: &str) -> Option<u64> {
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn gpu_agents(stdout: &str) -> Vec<Vec<String>> {
    agents(stdout)
        .into_iter()
        .filter(|a| values(a, "Device Type").first() == Some(&"GPU"))
        .collect()
}

#[test]
fn rocminfo_lists_two_simulated_gfx90a() {
    if !prerequisites() {
        return;
    }
    let p = kfdmux::topology::preset("gfx90a").expect("gfx90a preset");
    let out = Command::new(kfdmux_bin())
        .args(["run", "--gpus", "gfx90a:2", "--", "rocminfo"])
        .env_remove("HSA_ENABLE_INTERRUPT")
        .output()
        .expect("spawn kfdmux run");
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let gpus = gpu_agents(&stdout);
    assert_eq!(gpus.len(), 2, "expected two GPU agents\n{all}");
    for gpu in &gpus {
        assert_eq!(values(gpu, "Name").first(), Some(&p.name), "{all}");
        assert_eq!(
            values(gpu, "Compute Unit")
                .first()
                .and_then(|v| leading_number(v)),
            Some(u64::from(p.cu_count)),
            "{all}"
        );
        assert_eq!(
            values(gpu, "L1").first().and_then(|v| leading_number(v)),
            Some(u64::from(p.l1_kb)),
            "{all}"
        );
        assert_eq!(
            values(gpu, "L2").first().and_then(|v| leading_number(v)),
            Some(u64::from(p.l2_kb)),
            "{all}"
        );
        let vram_kb = p.vram_bytes / 1024;
        assert!(
            values(gpu, "Size")
                .iter()
                .any(|v| leading_number(v) == Some(vram_kb)),
            "no pool of {vram_kb} KB\n{all}"
        );
    }
}

#[test]
fn two_rocminfos_share_one_daemon_with_separate_contexts() {
    if !prerequisites() {
        return;
    }
    let daemon = Daemon::start("gfx1030:1");
    let before = daemon.stats();
    let spawn = || {
        Command::new(kfdmux_bin())
            .arg("run")
            .arg("--daemon")
            .arg(&daemon.mount)
            .args(["--", "rocminfo"])
            .env_remove("HSA_ENABLE_INTERRUPT")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn kfdmux run")
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        let all = text(&out);
        assert!(
            out.status.success(),
            "{all}\n--- daemon\n{}",
            daemon.log_text()
        );
        let gpus = gpu_agents(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(gpus.len(), 1, "{all}");
        assert_eq!(values(&gpus[0], "Name").first(), Some(&"gfx1030"), "{all}");
    }
    // Each rocminfo opens /dev/kfd twice (its own check, then libhsakmt): four opens, each
    // its own context; all released once the processes are gone (RELEASE may lag close).
    let key = |s: &std::collections::HashMap<String, u64>, k: &str| {
        *s.get(k)
            .unwrap_or_else(|| panic!("stats have no {k}: {s:?}"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let s = daemon.stats();
        if key(&s, "contexts") == 0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        key(&after, "opens_total") >= key(&before, "opens_total") + 4,
        "before {before:?} after {after:?}"
    );
    assert_eq!(
        key(&after, "contexts"),
        0,
        "contexts not released: {after:?}"
    );
}
