//! The mmap hand-over (docs/cuse-mmap.md): the daemon's socket server, its refusals, and the
//! preload library that gives mmap to files whose real mmap fails with ENODEV.
//!
//! The refusal tests need nothing special (an in-process server over a sim device). The mmap
//! tests mount an in-process FUSE daemon (root, /dev/fuse) and run `tests/cuse_mmap_client.c`
//! (gcc) as a separate process: with passthrough its mappings of the FUSE files must be coherent
//! with the memfd it fetches through the hand-over; without passthrough — which gives ENODEV like
//! CUSE — it must fail alone and succeed under the preload library. The CUSE path itself runs
//! in the VM tier with the same client.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{have_cmd, have_fuse, is_root, require, TempDir};
use kfdmux::device::sim::{SimConfig, SimDevice};
use kfdmux::device::Device;
use kfdmux::handover::{request_memfd, spawn_server};
use kfdmux::mux::Mux;

fn my_tgid() -> u32 {
    std::process::id()
}

fn sim_mux() -> Arc<Mux> {
    let gpus = kfdmux::topology::parse_gpus("gfx90a:1").expect("gpu spec");
    let device: Arc<dyn Device> = SimDevice::new(gpus, SimConfig::default());
    Mux::new(device)
}

/// (st_dev, st_ino) of an open file.
fn identity(fd: std::os::fd::BorrowedFd<'_>) -> (u64, u64) {
    // SAFETY: struct stat is plain old data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a valid fd into a local struct.
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
    (st.st_dev, st.st_ino)
}

fn refusal(r: std::io::Result<std::os::fd::OwnedFd>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn handover_gives_the_callers_memfd_once_and_refuses_strangers() {
    let dir = TempDir::new("kfdmux-handover");
    let sock = dir.path().join("run/handover.sock");
    let mux = sim_mux();
    spawn_server(&sock, mux.clone()).expect("spawn_server");

    // The owner gets its own process memory, the very memfd the device uses. (`mem` stands for
    // the client's open context, which keeps the process memory alive.)
    let mem = mux
        .device
        .process_memory(my_tgid())
        .expect("process memory");
    let token = mux.tokens.issue(my_tgid());
    let memfd = request_memfd(&sock, token).expect("hand-over of our own memory");
    assert_eq!(
        identity(memfd.as_fd()),
        identity(mem.backing_fd()),
        "handed-over fd is not the device's memfd"
    );

    // A token works once.
    assert_eq!(
        refusal(request_memfd(&sock, token)),
        Some(libc::EACCES),
        "token redeemed twice"
    );
    // Garbage.
    assert_eq!(
        refusal(request_memfd(&sock, 0x0123_4567_89ab_cdef)),
        Some(libc::EACCES),
        "garbage token"
    );
    // Another process's token presented by us: the peer check refuses, and the token is spent.
    let t1 = mux.tokens.issue(1);
    assert_eq!(
        refusal(request_memfd(&sock, t1)),
        Some(libc::EPERM),
        "token of pid 1 presented by us"
    );
    assert_eq!(mux.tokens.redeem(t1), None, "a refused token must be spent");
}

/// Connects to `sock` and presents `token` using only async-signal-safe calls (for a forked
/// child of this multi-threaded process); returns the status byte, or 200+ on local failures.
fn child_present(sa: &libc::sockaddr_un, token: u64) -> i32 {
    // SAFETY: raw system calls on local buffers; nothing allocates.
    unsafe {
        let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if s < 0 {
            return 201;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::connect(s, (sa as *const libc::sockaddr_un).cast(), len) != 0 {
            return 202;
        }
        let b = token.to_le_bytes();
        if libc::write(s, b.as_ptr().cast(), 8) != 8 {
            return 203;
        }
        let mut status = [0xffu8; 1];
        if libc::read(s, status.as_mut_ptr().cast(), 1) != 1 {
            return 204;
        }
        status[0] as i32
    }
}

#[test]
fn token_of_a_parent_presented_by_its_child_is_refused() {
    let dir = TempDir::new("kfdmux-handover-fork");
    let sock = dir.path().join("h.sock");
    let mux = sim_mux();
    spawn_server(&sock, mux.clone()).expect("spawn_server");
    // SAFETY: sockaddr_un is plain old data.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sa.sun_path.iter_mut().zip(sock.to_str().unwrap().bytes()) {
        *d = s as libc::c_char;
    }
    let token = mux.tokens.issue(my_tgid());
    // SAFETY: the child only makes async-signal-safe calls (child_present) and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let code = child_present(&sa, token);
        // SAFETY: leaves the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "child died: {status:#x}");
    assert_eq!(
        libc::WEXITSTATUS(status),
        libc::EPERM,
        "the child's status byte (EPERM expected)"
    );
    // The parent's token was spent by the child's attempt.
    assert_eq!(refusal(request_memfd(&sock, token)), Some(libc::EACCES));
}

#[test]
fn silent_or_broken_clients_do_not_block_others() {
    let dir = TempDir::new("kfdmux-handover-silent");
    let sock = dir.path().join("h.sock");
    let mux = sim_mux();
    spawn_server(&sock, mux.clone()).expect("spawn_server");
    // Several silent clients, a half-token client and one that hangs up at once.
    let silent: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    let mut half = UnixStream::connect(&sock).expect("connect");
    half.write_all(&[1, 2, 3]).unwrap();
    drop(UnixStream::connect(&sock).expect("connect"));
    let t0 = Instant::now();
    let token = mux.tokens.issue(my_tgid());
    request_memfd(&sock, token).expect("served while others are silent");
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "served only after {:?}",
        t0.elapsed()
    );
    // The silent clients are eventually timed out with a status byte (ETIMEDOUT), not left open.
    let mut s = silent.into_iter().next().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).expect("timeout answer"), 1);
    assert_eq!(b[0] as i32, libc::ETIMEDOUT);
}

// ---- mmap through FUSE files, with and without passthrough, and the preload library ----------

/// An in-process FUSE daemon (sim device) plus the hand-over server.
struct InProcDaemon {
    mount: PathBuf,
    sock: PathBuf,
    dev: Option<u64>,
    _dir: TempDir,
}

impl InProcDaemon {
    fn start(passthrough: bool) -> InProcDaemon {
        use kfdmux::transport::engine::{Protocol, Session};
        use kfdmux::transport::{fusefs::FuseFs, mount};
        let dir = TempDir::new("kfdmux-handover-fuse");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let sock = dir.path().join("h.sock");
        let mux = sim_mux();
        let fs = FuseFs::new(mux.clone());
        let (fd, _) = mount::mount_fuse(&mnt).expect("mount");
        let session = Session::new(fd, fs.clone(), Protocol::Fuse, passthrough);
        fs.set_channel(session.chan.clone());
        std::thread::spawn(move || session.run(2));
        let dev = mount::mount_dev(&mnt);
        if let Some(d) = dev {
            fs.set_dev(d);
        }
        spawn_server(&sock, mux).expect("spawn_server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !mnt.join("kfd").exists() {
            assert!(Instant::now() < deadline, "FUSE mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        InProcDaemon {
            mount: mnt,
            sock,
            dev,
            _dir: dir,
        }
    }

    fn render(&self) -> PathBuf {
        std::fs::read_dir(&self.mount)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("renderD"))
            })
            .expect("a renderD file")
    }
}

impl Drop for InProcDaemon {
    fn drop(&mut self) {
        kfdmux::transport::mount::unmount(&self.mount);
        if let Some(d) = self.dev {
            let _ = std::fs::write(
                format!("/sys/fs/fuse/connections/{}/abort", libc::minor(d)),
                "1",
            );
        }
    }
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target dir>/tmp.
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

/// The C client, compiled once.
fn client() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuse_mmap_client");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuse_mmap_client.c");
        let st = Command::new("gcc")
            .args(["-O1", "-Wall", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("gcc");
        assert!(st.success(), "compiling {}", src.display());
        out
    })
}

/// The preload library, built by cargo into a target dir of its own (the outer cargo may still
/// hold the main one).
fn preload_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let tdir = target_dir().join("preload-for-tests");
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "kfdmux-preload", "--target-dir"])
            .arg(&tdir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo build -p kfdmux-preload");
        assert!(st.success(), "building the preload library");
        let lib = tdir.join("debug/libkfdmux_preload.so");
        assert!(lib.is_file(), "{} missing", lib.display());
        lib
    })
}

fn run_client(args: &[&Path], env: &[(&str, &Path)], extra_env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(client());
    cmd.args(args).env_remove("LD_PRELOAD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("client {args:?} exited {:?}:\n{text}", out.status.code());
    (out.status.code().unwrap_or(-1), text)
}

fn fuse_prereqs() -> bool {
    require(is_root(), "root")
        && require(have_fuse(), "/dev/fuse")
        && require(have_cmd("gcc"), "gcc")
}

#[test]
fn passthrough_mappings_are_coherent_with_the_handed_over_memfd() {
    if !fuse_prereqs() {
        return;
    }
    let d = InProcDaemon::start(true);
    let (code, out) = run_client(&[&d.mount.join("kfd"), &d.render(), &d.sock], &[], &[]);
    assert_eq!(code, 0, "client output:\n{out}");
    for line in [
        "coherent kfd->render",
        "coherent render->kfd",
        "coherent kfd->memfd",
        "coherent memfd->kfd",
        "COHERENT",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

#[test]
fn without_passthrough_mmap_fails_with_enodev_and_the_preload_fixes_it() {
    if !fuse_prereqs() {
        return;
    }
    let lib = preload_lib();
    // No passthrough: the kernel refuses shared mmaps of the FUSE files with ENODEV, as CUSE does.
    let d = InProcDaemon::start(false);
    let kfd = d.mount.join("kfd");
    let render = d.render();
    let (code, out) = run_client(&[&kfd, &render], &[], &[]);
    assert_eq!(code, 2, "without the preload the mmap must fail:\n{out}");
    assert!(
        out.contains(&format!("mmap-errno {}", libc::ENODEV)),
        "{out}"
    );

    // With the preload, the same mmaps land on the hand-over memfd; a forked child (not the
    // opener) is refused.
    let env = [
        ("LD_PRELOAD", lib),
        ("KFDMUX_HANDOVER_SOCKET", d.sock.as_path()),
    ];
    let (code, out) = run_client(
        &[&kfd, &render, &d.sock],
        &env,
        &[("EXPECT_CHILD_REFUSED", "1"), ("KFDMUX_PRELOAD_DEBUG", "1")],
    );
    assert_eq!(code, 0, "client output under the preload:\n{out}");
    assert!(
        out.contains("coherent memfd->kfd") && out.contains("child mmap refused"),
        "{out}"
    );
    assert!(
        out.contains("through the hand-over"),
        "the preload did not redirect:\n{out}"
    );

    // A wrong socket path: the preload gives the original ENODEV back.
    let nowhere = d.sock.with_file_name("nowhere.sock");
    let env = [
        ("LD_PRELOAD", lib),
        ("KFDMUX_HANDOVER_SOCKET", nowhere.as_path()),
    ];
    let (code, out) = run_client(&[&kfd, &render], &env, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("mmap-errno {}", libc::ENODEV)),
        "{out}"
    );
}

#[test]
fn preload_leaves_ordinary_mappings_alone() {
    if !require(have_cmd("gcc"), "gcc") {
        return;
    }
    let lib = preload_lib();
    let dir = TempDir::new("kfdmux-preload-plain");
    let file = dir.path().join("f");
    std::fs::write(&file, b"Xyz").unwrap();
    let (code, out) = run_client(
        &[Path::new("--plain"), &file],
        &[("LD_PRELOAD", lib)],
        &[("KFDMUX_PRELOAD_DEBUG", "1")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("file first byte X")
            && out.contains("/dev/null ENODEV")
            && out.contains("PLAIN OK"),
        "{out}"
    );
    // /dev/null was asked for a token (and refused it): the preload noticed and stepped back.
    assert!(out.contains("not a kfdmux file"), "{out}");
}

/// The fd channel (docs/cuse-mmap.md): an fd parked for this process on a file is handed over
/// once, for a token from `issue_parked`, as the very file parked; a token for another process
/// is refused (EPERM) and spends nothing but itself.
#[test]
fn parked_fd_is_handed_to_its_process_through_the_socket() {
    let dir = TempDir::new("kfdmux-handover-parked");
    let sock = dir.path().join("h.sock");
    let mux = sim_mux();
    spawn_server(&sock, mux.clone()).expect("spawn_server");
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two new fds into `p`, owned below.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds nobody else owns.
    let (r, mut w) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::os::fd::OwnedFd::from_raw_fd(p[0]),
            std::fs::File::from_raw_fd(p[1]),
        )
    };
    let want = identity(r.as_fd());
    mux.tokens.enable_channel(77);
    let slot = mux.tokens.park(77, my_tgid(), r).expect("park");
    // Parked for another process: its token is refused to us.
    let (r2, _w2) = {
        let mut q = [0; 2];
        // SAFETY: as above.
        assert_eq!(unsafe { libc::pipe2(q.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: as above.
        unsafe {
            use std::os::fd::FromRawFd;
            (
                std::os::fd::OwnedFd::from_raw_fd(q[0]),
                std::os::fd::OwnedFd::from_raw_fd(q[1]),
            )
        }
    };
    let other = mux.tokens.park(77, 1, r2).expect("park for pid 1");
    let t_other = mux
        .tokens
        .issue_parked(77, 1, other)
        .expect("token for pid 1");
    assert_eq!(refusal(request_memfd(&sock, t_other)), Some(libc::EPERM));
    let token = mux.tokens.issue_parked(77, my_tgid(), slot).expect("token");
    let got = request_memfd(&sock, token).expect("our parked fd");
    assert_eq!(identity(got.as_fd()), want, "the very file that was parked");
    w.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    std::fs::File::from(got).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
    assert_eq!(
        refusal(request_memfd(&sock, token)),
        Some(libc::EACCES),
        "one-time"
    );
    assert_eq!(mux.tokens.parked_count(), 1, "pid 1's fd is still parked");
    mux.tokens.file_closed(77);
    assert_eq!(mux.tokens.parked_count(), 0);
}
