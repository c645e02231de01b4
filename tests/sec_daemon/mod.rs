//! A `kfdmux serve --transport fuse` daemon for the fault and policy tests: extra flags, its
//! pid (RSS, SIGKILL), restart on the same mount dir. Stopped and unmounted on drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct SecDaemon {
    pub child: Child,
    pub mount: PathBuf,
    pub log: PathBuf,
}

fn is_mounted(p: &Path) -> bool {
    kfdmux::run::is_fuse_mount(p)
}

impl SecDaemon {
    /// Starts the daemon on `mount` (created if missing) and waits until `kfd` is there.
    pub fn start(mount: &Path, gpus: &str, extra: &[&str]) -> SecDaemon {
        // A dead mount left by a killed daemon stats as ENOTCONN: the daemon detaches it.
        let _ = fs::create_dir_all(mount);
        let log = mount.with_extension("log");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kfdmux"))
            .args(["serve", "--transport", "fuse", "--mount"])
            .arg(mount)
            .args(["--gpus", gpus])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn kfdmux serve");
        let mut d = SecDaemon {
            child,
            mount: mount.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("kfdmux serve exited with {st}:\n{}", d.log_text());
            }
            if is_mounted(&d.mount) && d.mount.join("kfd").exists() {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not mount in 10 s:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn stats(&self) -> HashMap<String, u64> {
        let text = fs::read_to_string(self.mount.join("stats")).expect("read stats");
        text.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Resident memory of the daemon (kB, `VmRSS`).
    pub fn rss_kb(&self) -> u64 {
        let s = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// SIGKILL, reaped; the mount is left behind dead, as after a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SecDaemon {
    fn drop(&mut self) {
        // SAFETY: our own child (kill on a reaped pid is harmless: try_wait reaped it already
        // only when it exited, and then we skip the signal).
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = self.child.try_wait() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if is_mounted(&self.mount) || fs::metadata(&self.mount).is_err() {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}
