//! Debian's unmodified rocminfo in real containers (podman + runc) built from kfdmux's CDI spec.
//!
//! One daemon (`kfdmux serve --config`) serves two FUSE instances of the sim: `A` has the
//! node's first MI210 with a 4 GiB memory quota, `B` the second MI210 and a Navi21. The daemon
//! publishes its CDI spec in /var/run/cdi; two containers started at the same time with
//! `podman run --device kfdmux.dev/gpu=A` and `...=B` each run rocminfo and must see exactly
//! their instance's GPUs (A: one gfx90a with 4 GiB; B: gfx90a + gfx1030 with full VRAM), and
//! each instance's `stats` must show that its own container opened it.
//!
//! The image is built locally (`podman import` of a tarball of rocminfo, the libraries `ldd`
//! lists, sh, grep and libdrm's amdgpu.ids); nothing is pulled from a network.
//!
//! Runtime configuration found to work on these hosts (Debian 12, podman 4.3.1, hybrid cgroup
//! layout, no CAP_SYS_RESOURCE): `--runtime runc` (crun refuses the hybrid cgroup layout, even
//! with `--cgroups=disabled`, which runc does not support) and explicit `--ulimit nofile=…`,
//! `--ulimit nproc=…` no higher than the caller's own (podman otherwise asks the runtime to
//! raise them, which fails with EPERM without CAP_SYS_RESOURCE).
//!
//! Needs root, /dev/fuse, rocminfo, podman and runc (scripts/deps installs them); prints SKIP
//! and passes when one is missing.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn have(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}

fn skip(why: &str) -> bool {
    eprintln!("SKIP container test: {why}");
    true
}

fn missing_prerequisite() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root");
    }
    if !Path::new("/dev/fuse").exists() {
        return skip("no /dev/fuse");
    }
    for c in ["rocminfo", "podman", "runc", "ldd", "tar"] {
        if have(c).is_none() {
            return skip(&format!("{c} is not installed (scripts/deps)"));
        }
    }
    false
}

/// Copies `file` (following symlinks) to the same path under `root`.
fn copy_in(root: &Path, file: &Path) {
    let dst = root.join(file.strip_prefix("/").unwrap());
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(file, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
}

/// A minimal image: the programs, every library `ldd` lists for them, libdrm's ids file.
fn build_image(dir: &Path, tag: &str) {
    let root = dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("tmp")).unwrap();
    let progs: Vec<PathBuf> = ["rocminfo", "sh", "grep", "cat", "ls"]
        .iter()
        .map(|p| have(p).unwrap_or_else(|| panic!("{p}")))
        .collect();
    for p in &progs {
        let target = Path::new("/usr/bin").join(p.file_name().unwrap());
        let dst = root.join(target.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(p, &dst).unwrap();
        let out = Command::new("ldd").arg(p).output().unwrap();
        for tok in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if tok.starts_with('/') && Path::new(tok).exists() {
                copy_in(&root, Path::new(tok));
            }
        }
    }
    // /bin/sh for popen(); Debian's /bin is /usr/bin, so a symlink does it.
    std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
    for f in ["/etc/passwd", "/etc/group"] {
        copy_in(&root, Path::new(f));
    }
    if let Ok(rd) = std::fs::read_dir("/usr/share/libdrm") {
        for e in rd.flatten() {
            copy_in(&root, &e.path());
        }
    }
    let tar = dir.join("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("podman")
        .arg("import")
        .arg(&tar)
        .arg(tag)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "podman import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn limit(res: libc::__rlimit_resource_t, cap: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a valid rlimit to fill.
    unsafe { libc::getrlimit(res, &mut r) };
    r.rlim_cur.min(cap)
}

fn podman_run(device: &str, image: &str) -> Child {
    let nofile = limit(libc::RLIMIT_NOFILE, 1024);
    let nproc = limit(libc::RLIMIT_NPROC, 4096);
    let mut c = Command::new("podman");
    c.args(["run", "--rm", "--runtime", "runc", "--network", "none"])
        .arg(format!("--ulimit=nofile={nofile}:{nofile}"))
        .arg(format!("--ulimit=nproc={nproc}:{nproc}"))
        .arg(format!("--device=kfdmux.dev/gpu={device}"))
        .arg(image)
        .arg("/usr/bin/rocminfo")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec: our own process group, so a
    // timeout can kill podman and everything it started.
    unsafe {
        c.pre_exec(|| {
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    c.spawn().unwrap()
}

fn finish(mut child: Child, what: &str, deadline: Instant) -> String {
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut out = String::new();
            let mut err = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            assert!(st.success(), "{what}: {st}\nstdout:\n{out}\nstderr:\n{err}");
            return out;
        }
        if Instant::now() > deadline {
            // SAFETY: killing the process group we made for the child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!("{what}: timed out");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (name, marketing name, memory pool sizes in KB) of every GPU agent rocminfo printed.
fn gpu_agents(out: &str) -> Vec<(String, String, Vec<u64>)> {
    let mut agents = Vec::new();
    for block in out.split("*******").skip(1) {
        if !block.contains("Device Type:             GPU") {
            continue;
        }
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.trim().strip_prefix(k).map(|v| v.trim().to_string()))
                .unwrap_or_default()
        };
        let sizes = block
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Size:"))
            .filter_map(|v| v.split_whitespace().next()?.split('(').next()?.parse().ok())
            .collect();
        agents.push((field("Name:"), field("Marketing Name:"), sizes));
    }
    agents
}

fn stat_value(stats: &str, key: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn rocminfo_in_two_podman_containers_sees_each_instances_gpus() {
    if missing_prerequisite() {
        return;
    }
    let started = Instant::now();
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("kfdmux-container-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (format!("t{pid}a"), format!("t{pid}b"));
    let spec = PathBuf::from(format!("/var/run/cdi/kfdmux-test-{pid}.json"));
    let state = dir.join("state");
    let cfg = dir.join("kfdmux.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\ngpus = \"gfx90a:2,gfx1030\"\nstate_dir = \"{}\"\ncdi_spec = \"{}\"\nthreads = 2\n\n\
             [[instance]]\nname = \"{a}\"\ngpus = [0]\nquota_mem = \"4G\"\n\n\
             [[instance]]\nname = \"{b}\"\ngpus = [1, 2]\n",
            state.display(),
            spec.display()
        ),
    )
    .unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_kfdmux"))
        .args(["config", "check"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let tag = format!("localhost/kfdmux-test-rocminfo:{pid}");
    build_image(&dir, &tag);

    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    let daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_kfdmux"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spec.exists() {
        assert!(
            Instant::now() < deadline,
            "no CDI spec: {}",
            std::fs::read_to_string(dir.join("daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Both containers at once, each with its own instance.
    let ca = podman_run(&a, &tag);
    let cb = podman_run(&b, &tag);
    let deadline = Instant::now() + Duration::from_secs(90);
    let out_a = finish(ca, "container A", deadline);
    let out_b = finish(cb, "container B", deadline);

    let ga = gpu_agents(&out_a);
    assert_eq!(ga.len(), 1, "A sees exactly its one GPU:\n{out_a}");
    assert_eq!(ga[0].0, "gfx90a");
    assert_eq!(ga[0].1, "AMD Instinct MI210");
    // Its VRAM pool is the 4 GiB quota, not the MI210's 64 GiB.
    assert_eq!(
        ga[0].2.first(),
        Some(&(4 << 20)),
        "A's pools: {:?}",
        ga[0].2
    );

    let gb = gpu_agents(&out_b);
    let names: Vec<&str> = gb.iter().map(|g| g.0.as_str()).collect();
    assert_eq!(
        names,
        ["gfx90a", "gfx1030"],
        "B sees its two GPUs:\n{out_b}"
    );
    assert_eq!(
        gb[0].2.first(),
        Some(&(64 << 20)),
        "B's MI210 has its full 64 GiB"
    );
    assert!(
        out_b.contains("Node:                    2"),
        "B's second GPU is node 2"
    );

    // Each container went through its own instance.
    let stats = |n: &str| std::fs::read_to_string(state.join(n).join("dev/stats")).unwrap();
    let (sa, sb) = (stats(&a), stats(&b));
    assert!(
        stat_value(&sa, "opens_total") > 0 && stat_value(&sa, "ioctls_total") > 0,
        "{sa}"
    );
    assert!(
        stat_value(&sb, "opens_total") > 0 && stat_value(&sb, "ioctls_total") > 0,
        "{sb}"
    );
    assert_eq!(
        stat_value(&sa, "contexts"),
        0,
        "every context released: {sa}"
    );

    drop(daemon);
    assert!(
        !spec.exists(),
        "the daemon removes its CDI spec when it stops"
    );
    let _ = Command::new("podman").args(["rmi", "-f", &tag]).output();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("container test took {:?}", started.elapsed());
}
