//! The CUSE transport on a real CUSE kernel: Debian's kernel under QEMU (scripts/vm-test),
//! because the host kernel has no CUSE.
//!
//! - the acceptance suite (`kfdmux check`) gives the same results over FUSE on the host and
//!   over CUSE in the VM;
//! - mmap of a CUSE node fails with ENODEV without the preload library and is coherent with it;
//!   a forked child cannot obtain the parent's mapping through the hand-over socket;
//! - a daemon killed with SIGKILL: clients get ENOTCONN/ENODEV promptly; a restarted daemon
//!   serves new opens;
//! - Debian's unmodified rocminfo lists the simulated GPUs over CUSE (with the preload library).
//! - fds going out of ioctls (EXPORT_DMABUF, SMI_EVENTS) reach a client under the preload
//!   library — from the sim, and from the kfd device stacked on a CUSE sim (secondary contexts
//!   and context hosts) — and are refused with EOPNOTSUPP without it; fds parked and never
//!   fetched are closed with the context (the daemons' /proc fd counts).
//!
//! Needs root, qemu (installed by scripts/vm-test) and gcc; skips with a message elsewhere, fails
//! under CI=true.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn vm_ok() -> bool {
    require(
        is_root(),
        "root (scripts/vm-test installs packages and caches the VM image)",
    ) && require(have_cmd("gcc"), "gcc (to build the test clients)")
}

/// Builds a C test client into the test's temp dir.
fn build_c(src: &str, out: &Path) {
    let st = Command::new("gcc")
        .args(["-O1", "-Wall", "-o"])
        .arg(out)
        .arg(root_dir().join(src))
        .status()
        .expect("gcc");
    assert!(st.success(), "compiling {src}");
}

/// The preload library beside the kfdmux binary, or built on demand.
fn preload_lib() -> PathBuf {
    let bin = kfdmux_bin();
    let beside = bin.parent().map(|d| d.join("libkfdmux_preload.so"));
    if let Some(p) = beside.filter(|p| p.is_file()) {
        return p;
    }
    let tdir = bin
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("preload-for-vm"))
        .expect("target dir");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let st = Command::new(cargo)
        .args(["build", "-q", "-p", "kfdmux-preload", "--target-dir"])
        .arg(&tdir)
        .current_dir(root_dir())
        .status()
        .expect("cargo build -p kfdmux-preload");
    assert!(st.success());
    tdir.join("debug/libkfdmux_preload.so")
}

/// Runs `script` with /bin/sh in the VM; kfdmux is /usr/bin/kfdmux there, `files` are placed
/// at the given guest paths. Returns (exit status, console text).
fn vm(script: &str, files: &[(&Path, &str)], extra: &[&str]) -> (i32, String) {
    let mut cmd = Command::new(root_dir().join("scripts/vm-test"));
    cmd.arg("-q").arg("--timeout").arg("600");
    cmd.arg("--file")
        .arg(format!("{}:/usr/bin/kfdmux", kfdmux_bin().display()));
    for (host, guest) in files {
        cmd.arg("--file").arg(format!("{}:{guest}", host.display()));
    }
    cmd.args(extra);
    cmd.arg("--").arg("sh").arg("-c").arg(script);
    let out = cmd.output().expect("scripts/vm-test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.code().unwrap_or(-1), text)
}

/// `PASS name` / `FAIL name` lines of `kfdmux check` output.
fn check_results(text: &str) -> Vec<(String, bool)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(n) = l.strip_prefix("PASS ") {
                Some((n.to_string(), true))
            } else {
                l.strip_prefix("FAIL ")
                    .map(|n| (n.split(':').next().unwrap_or(n).to_string(), false))
            }
        })
        .collect()
}

const START_DAEMON: &str = "kfdmux serve --transport cuse --name kfdmux/kfd --gpus gfx90a:2 2>/tmp/daemon.log & D=$!; \
     i=0; while [ ! -e /dev/kfdmux/dri/renderD129 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; ";

#[test]
fn acceptance_suite_same_over_fuse_and_cuse() {
    if !vm_ok() || !require(have_fuse(), "/dev/fuse (the FUSE half of the comparison)") {
        return;
    }
    let d = Daemon::start("gfx90a:2");
    let host = Command::new(kfdmux_bin())
        .arg("check")
        .arg("--kfd")
        .arg(d.mount.join("kfd"))
        .output()
        .expect("kfdmux check");
    let host_text = String::from_utf8_lossy(&host.stdout).to_string();
    println!("host (FUSE):\n{host_text}");
    let (code, vm_text) = vm(
        &format!("{START_DAEMON} kfdmux check --kfd /dev/kfdmux/kfd; r=$?; kill $D; exit $r"),
        &[],
        &[],
    );
    let fuse = check_results(&host_text);
    let cuse = check_results(&vm_text);
    assert!(fuse.len() >= 8, "the suite ran on the host: {fuse:?}");
    assert!(fuse.iter().all(|(_, ok)| *ok), "FUSE failures: {fuse:?}");
    assert_eq!(code, 0, "kfdmux check in the VM");
    assert_eq!(fuse, cuse, "same cases, same results over FUSE and CUSE");
}

#[test]
fn cuse_mmap_needs_preload_and_is_coherent_with_it() {
    if !vm_ok() {
        return;
    }
    let t = TempDir::new("vm-mmap");
    let client = t.path().join("cuse_mmap_client");
    build_c("tests/cuse_mmap_client.c", &client);
    let lib = preload_lib();
    let script = format!(
        "{START_DAEMON} echo '--- without preload'; cuse_mmap_client /dev/kfdmux/kfd /dev/kfdmux/dri/renderD128; \
         echo '--- with preload'; LD_PRELOAD=/usr/lib/libkfdmux_preload.so KFDMUX_HANDOVER_SOCKET=/run/kfdmux/handover.sock \
         cuse_mmap_client /dev/kfdmux/kfd /dev/kfdmux/dri/renderD128 /run/kfdmux/handover.sock; r=$?; kill $D; exit $r"
    );
    let (code, text) = vm(
        &script,
        &[
            (&client, "/usr/bin/cuse_mmap_client"),
            (&lib, "/usr/lib/libkfdmux_preload.so"),
        ],
        &[],
    );
    let (without, with) = text
        .split_once("--- with preload")
        .expect("both runs printed");
    assert!(
        without.contains("mmap-errno 19"),
        "without the library mmap of a CUSE node is ENODEV"
    );
    assert!(
        with.contains("COHERENT"),
        "with the library the mapping is coherent both ways"
    );
    assert!(
        with.contains("child mmap refused"),
        "a forked child cannot obtain the parent's mapping"
    );
    assert_eq!(code, 0);
}

#[test]
fn daemon_sigkill_gives_enotconn_and_restart_serves() {
    if !vm_ok() {
        return;
    }
    let t = TempDir::new("vm-kill");
    let client = t.path().join("kill_client");
    build_c("tests/vm/kill_client.c", &client);
    let script = format!(
        "{START_DAEMON} kill_client /dev/kfdmux/kfd /tmp/ready /tmp/go & C=$!; \
         i=0; while [ ! -e /tmp/ready ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
         kill -9 $D; wait $D 2>/dev/null; touch /tmp/go; wait $C; c=$?; echo client=$c; \
         {START_DAEMON} kfdmux check --kfd /dev/kfdmux/kfd --only version; r=$?; kill $D; \
         [ $c -eq 0 ] && exit $r; exit 1"
    );
    let (code, text) = vm(&script, &[(&client, "/usr/bin/kill_client")], &[]);
    assert!(
        text.contains("before kill: version 1."),
        "the client worked before the kill"
    );
    assert!(
        text.contains("DEAD-DAEMON-OK"),
        "the client saw ENOTCONN/ENODEV after the kill"
    );
    assert!(
        text.contains("PASS version_and_apertures"),
        "a restarted daemon serves new opens"
    );
    assert_eq!(code, 0);
}

#[test]
fn rocminfo_over_cuse_with_the_preload_library() {
    if !vm_ok() {
        return;
    }
    let lib = preload_lib();
    // `kfdmux run --transport cuse` starts a CUSE daemon, finds the preload library beside its
    // own binary and puts it in LD_PRELOAD; HSA_ENABLE_INTERRUPT stays unset, so the events
    // page is really mapped (through the hand-over).
    let script = "unset HSA_ENABLE_INTERRUPT; kfdmux run --transport cuse --gpus gfx90a:2 -- rocminfo > /tmp/r.out 2>&1; r=$?; \
                  cat /tmp/r.out; exit $r";
    let (code, text) = vm(
        script,
        &[(&lib, "/usr/bin/libkfdmux_preload.so")],
        &["--with-rocm"],
    );
    assert_eq!(code, 0, "rocminfo over CUSE");
    let p = kfdmux::topology::preset("gfx90a").expect("preset");
    let agents = text
        .lines()
        .filter(|l| l.trim() == format!("Name:                    {}", p.name).trim())
        .count();
    assert_eq!(agents, 2, "two gfx90a agents listed");
    assert!(
        text.contains(&format!("Compute Unit:            {}", p.cu_count)),
        "the preset's compute units"
    );
}

#[test]
fn checked_in_traces_replay_clean_over_cuse() {
    if !vm_ok() {
        return;
    }
    let check = root_dir().join("tests/traces/check.ktr");
    let rocminfo = root_dir().join("tests/traces/rocminfo.ktr");
    let script = "kfdmux replay /tmp/check.ktr --via cuse; a=$?; kfdmux replay /tmp/rocminfo.ktr --via cuse; b=$?; \
                  echo replay-status $a $b; [ $a -eq 0 ] && [ $b -eq 0 ]";
    let (code, text) = vm(
        script,
        &[(&check, "/tmp/check.ktr"), (&rocminfo, "/tmp/rocminfo.ktr")],
        &[],
    );
    assert!(
        text.contains("replay-status 0 0"),
        "both traces replay clean over CUSE"
    );
    assert_eq!(text.matches("via cuse: match").count(), 2);
    assert_eq!(code, 0);
}

/// Waits for a CUSE node (in a VM script).
fn wait_node(path: &str) -> String {
    format!("i=0; while [ ! -e {path} ] && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done; ")
}

/// The fd checks of tests/kfd_fd_client.c against the CUSE nodes `dir/kfd` and
/// `dir/dri/renderD128`, whose daemon(s) have pids `$pids`: without the preload library,
/// with it, and parked fds never fetched (fd counts of each daemon before, while parked, after).
fn fd_checks(tag: &str, dir: &str, pids: &str) -> String {
    let (k, r) = (format!("{dir}/kfd"), format!("{dir}/dri/renderD128"));
    format!(
        "echo '--- {tag} without preload'; kfd_fd_client {k} {r} noch; \
         echo '--- {tag} with preload'; LD_PRELOAD=/usr/lib/libkfdmux_preload.so KFDMUX_HANDOVER_SOCKET=/run/kfdmux/handover.sock \
         kfd_fd_client {k} {r} fds; \
         echo '--- {tag} parked'; rm -f /tmp/ready /tmp/go; \
         b=''; for p in {pids}; do b=\"$b $(ls /proc/$p/fd | wc -l)\"; done; \
         kfd_fd_client {k} {r} park 4 /tmp/ready /tmp/go & C=$!; \
         i=0; while [ ! -e /tmp/ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
         m=''; for p in {pids}; do m=\"$m $(ls /proc/$p/fd | wc -l)\"; done; \
         touch /tmp/go; wait $C; sleep 1; \
         a=''; for p in {pids}; do a=\"$a $(ls /proc/$p/fd | wc -l)\"; done; \
         echo \"{tag} fd-counts before$b parked$m after$a\"; "
    )
}

/// `before X.. parked Y.. after Z..` of one tag: (before, parked, after) per daemon.
fn fd_counts(text: &str, tag: &str) -> Vec<(usize, usize, usize)> {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{tag} fd-counts")))
        .unwrap_or_else(|| panic!("{tag}: no fd-counts line"));
    let nums = |key: &str, next: &str| -> Vec<usize> {
        let a = line.split(key).nth(1).unwrap_or("");
        let a = if next.is_empty() {
            a
        } else {
            a.split(next).next().unwrap_or("")
        };
        a.split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let (b, m, a) = (
        nums(" before", " parked"),
        nums(" parked", " after"),
        nums(" after", ""),
    );
    assert!(
        !b.is_empty() && b.len() == m.len() && m.len() == a.len(),
        "{line}"
    );
    b.into_iter()
        .zip(m)
        .zip(a)
        .map(|((b, m), a)| (b, m, a))
        .collect()
}

fn section<'a>(text: &'a str, from: &str, to: &str) -> &'a str {
    let s = text.split(from).nth(1).unwrap_or("");
    s.split(to).next().unwrap_or(s)
}

#[test]
fn fds_going_out_reach_preload_clients_and_are_refused_without() {
    if !vm_ok() {
        return;
    }
    let t = TempDir::new("vm-fds");
    let client = t.path().join("kfd_fd_client");
    build_c("tests/kfd_fd_client.c", &client);
    let lib = preload_lib();
    let lower = |mode: &str, minor: &str| {
        format!(
            "kfdmux serve --transport cuse --name kfdmux-lower/kfd --gpus gfx90a:1 --kernel-mode {mode} --kfd-minor {minor} \
             --handover-socket /run/kfdmux/lower.sock --sysfs-out /tmp/lsys 2>/tmp/lower-{mode}.log & L=$!; {}",
            wait_node("/dev/kfdmux-lower/dri/renderD128")
        )
    };
    // The upper daemon maps and exports through the lower's CUSE nodes: it runs under the
    // preload library too, talking to the lower's socket.
    let upper = |mode: &str| {
        format!(
            "LD_PRELOAD=/usr/lib/libkfdmux_preload.so KFDMUX_HANDOVER_SOCKET=/run/kfdmux/lower.sock \
             kfdmux serve --transport cuse --name kfdmux/kfd --device kfd --kfd-path /dev/kfdmux-lower/kfd \
             --kfd-render-dir /dev/kfdmux-lower/dri --kfd-sysfs /tmp/lsys/kfd 2>/tmp/upper-{mode}.log & U=$!; {}",
            wait_node("/dev/kfdmux/dri/renderD128")
        )
    };
    let script = format!(
        "{START_DAEMON} {sim} kill $D; wait $D; \
         {l1} {u1} {k1} kill $U; wait $U; kill $L; wait $L; \
         {l2} {u2} {k2} kill $U; wait $U; kill $L; wait $L; \
         echo '--- logs'; grep -E -h 'EOPNOTSUPP|never fetched|context host pid|secondary contexts via' /tmp/daemon.log /tmp/lower-*.log /tmp/upper-*.log | tail -n 40; exit 0",
        sim = fd_checks("sim", "/dev/kfdmux", "$D"),
        l1 = lower("v119", "19"),
        u1 = upper("v119"),
        k1 = fd_checks("kfd119", "/dev/kfdmux", "$U $L"),
        l2 = lower("shared", "14"),
        u2 = upper("shared"),
        k2 = fd_checks("kfdhosts", "/dev/kfdmux", "$U $L"),
    );
    let (code, text) = vm(
        &script,
        &[
            (&client, "/usr/bin/kfd_fd_client"),
            (&lib, "/usr/lib/libkfdmux_preload.so"),
        ],
        &[],
    );
    assert_eq!(code, 0);
    for tag in ["sim", "kfd119", "kfdhosts"] {
        let without = section(&text, &format!("--- {tag} without preload"), "---");
        assert!(
            without.contains("NO-CHANNEL EOPNOTSUPP"),
            "{tag}: without the preload library both ioctls give EOPNOTSUPP"
        );
        let with = section(&text, &format!("--- {tag} with preload"), "---");
        assert!(
            with.contains("FDS OK"),
            "{tag}: with it the dma-buf fd works in a second context and the SMI fd reads"
        );
        assert!(
            with.contains("info size 8192"),
            "{tag}: GET_DMABUF_INFO size"
        );
        let parked = section(&text, &format!("--- {tag} parked"), "---");
        assert!(parked.contains("PARKED 5"), "{tag}: 5 fds parked");
        for (i, (b, m, a)) in fd_counts(&text, tag).into_iter().enumerate() {
            if i == 0 {
                assert!(
                    m >= b + 5,
                    "{tag}: the serving daemon held the 5 parked fds ({b} -> {m})"
                );
            }
            assert_eq!(
                a, b,
                "{tag}: daemon {i}'s fds are back to {b} after the client closed"
            );
        }
    }
    let logs = text.split("--- logs").nth(1).unwrap_or("");
    assert!(
        logs.contains("kfdmux run --transport cuse"),
        "the refusal names the way out"
    );
    assert!(
        logs.contains("secondary contexts via") && logs.contains("context host pid"),
        "both ways of making kernel contexts were exercised"
    );
    assert!(
        logs.contains("never fetched"),
        "parked fds were closed with their context"
    );
    // The sim's dma-buf holds the bytes written through the client's mapping (one memfd).
    assert!(section(&text, "--- sim with preload", "---").contains("dmabuf content same"));
}
