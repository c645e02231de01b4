//! The fuzz targets' bodies, as plain functions of the input bytes: the libFuzzer binaries in
//! `fuzz_targets/` call them, and `tests/fuzz_regressions.rs` replays saved inputs through them
//! on the stable test runner. Each ends with an oracle (no leak, well-formed replies, answers
//! within the kernel's limits) that panics when broken.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kfdmux::abi::table::{ioc_size, Kind, DRM_IOC_TYPE, KFD_IOC_TYPE};
use kfdmux::device::sim::{SimConfig, SimDevice};
use kfdmux::device::{
    ArrayBuf, Caller, Device, DeviceContext, Done, DoneSink, Env, FileKind, IoctlCall, IoctlResult,
};
use kfdmux::errno::Errno;
use kfdmux::mux::Mux;
use kfdmux::policy::{Policy, PolicyDevice, Quotas};
use kfdmux::transport::cuse::{CuseEnv, CuseFs};
use kfdmux::transport::fusefs::FuseFs;
use kfdmux::transport::wire::*;
use zerocopy::IntoBytes;

use crate::kernel::*;

/// Reads the input front to back; past the end everything reads as zero.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data, pos: 0 }
    }
    pub fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    /// Up to `max` bytes, length-prefixed by one u16.
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = (self.u16() as usize).min(max);
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        &self.data[start..end]
    }
}

/// Every command the schema knows (all variants of all KFD and DRM ioctls).
pub fn known_cmds() -> &'static [u32] {
    static CMDS: OnceLock<Vec<u32>> = OnceLock::new();
    CMDS.get_or_init(|| {
        let mut v = Vec::new();
        for d in kfdmux::abi::KFD_IOCTLS
            .iter()
            .chain(kfdmux::abi::DRM_IOCTLS.iter())
        {
            for var in d.variants {
                v.push(var.cmd);
            }
        }
        v.push(kfdmux::handover::KFDMUX_IOC_HANDOVER_TOKEN);
        v
    })
}

/// A command: mostly one the schema knows (so the fuzzer reaches handlers), sometimes raw.
fn pick_cmd(inp: &mut Input) -> u32 {
    let sel = inp.u8();
    if sel >= 0xF0 {
        return inp.u32();
    }
    let cmds = known_cmds();
    let c = cmds[(sel as usize * 256 + inp.u8() as usize) % cmds.len()];
    // Sometimes another size for the same nr (the kernel dispatches on nr, sizes vary).
    if sel & 0x0F == 0x0F {
        let size = inp.u16() as u32 & 0x3FFF;
        return (c & !(0x3FFF << 16)) | (size << 16);
    }
    c
}

fn ignore_sigpipe() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // SAFETY: setting a signal disposition; no handler code runs.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// A child process that only sleeps: the pid restricted ioctls name, so that
/// `process_vm_writev` at fuzzer-chosen addresses lands in its copy of our memory, never ours.
/// Forked before any thread of ours touches it; it dies with us (PDEATHSIG).
pub fn client_pid() -> u32 {
    static PID: OnceLock<u32> = OnceLock::new();
    *PID.get_or_init(|| {
        // SAFETY: the child calls only async-signal-safe functions (prctl, pause, _exit).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                loop {
                    libc::pause();
                }
            }
        }
        assert!(pid > 0, "fork failed");
        pid as u32
    })
}

fn sim(gpus: &str) -> Arc<SimDevice> {
    let g = kfdmux::topology::parse_gpus(gpus).unwrap_or_default();
    SimDevice::new(
        g,
        SimConfig {
            memfd_size: 1 << 32,
            ..Default::default()
        },
    )
}

fn assert_no_leak(text: &str, what: &str) {
    let m = stats_map(text);
    let l = leaked(&m);
    assert!(
        l.is_empty(),
        "{what}: resources left after every context was released: {l:?}\n{text}"
    );
}

/// Open file handles listed by the stats text (`context N fh F ...`).
fn open_fhs(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.starts_with("context "))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.iter()
                .position(|x| *x == "fh")
                .and_then(|i| w.get(i + 1))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

fn check_replies(k: &mut FakeKernel) {
    for r in k.drain() {
        // Well-formed (FakeKernel checks header length); an error reply carries no body.
        assert!(
            r.hdr.error <= 0,
            "positive error {} in a reply",
            r.hdr.error
        );
        if r.hdr.error < 0 && r.hdr.unique != 0 {
            assert!(r.body.is_empty(), "error reply with a body");
        }
    }
}

// ---- target 1: the FUSE request parser -------------------------------------------------------

const OPCODES: &[u32] = &[
    FUSE_LOOKUP,
    FUSE_FORGET,
    FUSE_GETATTR,
    FUSE_SETATTR,
    FUSE_OPEN,
    FUSE_READ,
    FUSE_WRITE,
    FUSE_STATFS,
    FUSE_RELEASE,
    FUSE_FSYNC,
    FUSE_FLUSH,
    FUSE_INIT,
    FUSE_OPENDIR,
    FUSE_READDIR,
    FUSE_RELEASEDIR,
    FUSE_ACCESS,
    FUSE_INTERRUPT,
    FUSE_IOCTL,
    FUSE_POLL,
    FUSE_BATCH_FORGET,
    CUSE_INIT,
];

/// Arbitrary FUSE requests (raw, or with a chosen opcode/node/body, or well-formed ioctls) to
/// the FUSE-file filesystem over the real engine, then every context released: no panic, every
/// reply well-formed, nothing left in the device.
pub fn fuse_request(data: &[u8]) {
    ignore_sigpipe();
    let pid = client_pid();
    let dev = sim("gfx90a:2");
    let mux = Mux::new(dev.clone());
    let fs = FuseFs::new(mux.clone());
    let mut k = FakeKernel::fuse(fs);
    let ids = (1000, 1000, pid);
    let mut nodes = vec![1u64];
    for name in ["kfd", "renderD128", "renderD129", "stats"] {
        let mut b = name.as_bytes().to_vec();
        b.push(0);
        let r = k.call(FUSE_LOOKUP, 1, ids, &b);
        if let Some((e, _)) = zerocopy::FromBytes::read_from_prefix(&r.body)
            .ok()
            .map(|(e, rest): (EntryOut, &[u8])| (e, rest))
        {
            nodes.push(e.nodeid);
        }
    }
    let mut fhs: Vec<u64> = Vec::new();
    let mut inp = Input::new(data);
    let mut steps = 0;
    while !inp.done() && steps < 64 {
        steps += 1;
        match inp.u8() % 6 {
            0 => {
                // Raw bytes; the pid is always our sleeping child (never a real process).
                let mut m = inp.bytes(8192).to_vec();
                if m.len() >= 40 {
                    m[32..36].copy_from_slice(&pid.to_le_bytes());
                }
                k.send_raw(&m);
            }
            1 => {
                let op = OPCODES[inp.u8() as usize % OPCODES.len()];
                let node = nodes[inp.u8() as usize % nodes.len()];
                let body = inp.bytes(4096).to_vec();
                let lie = inp.u8();
                let mut m = request(
                    op,
                    k.next_unique(),
                    node,
                    (inp.u32(), inp.u32(), pid),
                    &body,
                );
                if lie == 0xFF {
                    // A header whose length disagrees with the message.
                    let l = inp.u32();
                    m[0..4].copy_from_slice(&l.to_le_bytes());
                }
                k.send_raw(&m);
            }
            2 => {
                let node = nodes[1 + inp.u8() as usize % (nodes.len() - 1).max(1)];
                if let Ok(fh) = k.open(node, ids) {
                    fhs.push(fh);
                }
            }
            3 => {
                if !fhs.is_empty() {
                    let fh = fhs.remove(inp.u8() as usize % fhs.len());
                    k.release(nodes[1], fh, ids);
                }
            }
            _ => {
                let fh = if fhs.is_empty() {
                    inp.u64()
                } else {
                    fhs[inp.u8() as usize % fhs.len()]
                };
                let cmd = pick_cmd(&mut inp);
                let arg = inp.bytes(4096).to_vec();
                let node = nodes[inp.u8() as usize % nodes.len()];
                let out_size = ioc_size(cmd).min(inp.u16() as u32);
                let flags = if inp.u8() == 0xFF { inp.u32() } else { 0 };
                k.send_ioctl(node, ids, fh, flags, cmd, 0x7000_0000, &arg, out_size);
            }
        }
        check_replies(&mut k);
    }
    for fh in open_fhs(&mux.stats_text()) {
        mux.release(fh);
    }
    std::thread::sleep(Duration::from_millis(0));
    check_replies(&mut k);
    assert_no_leak(&mux.stats_text(), "fuse_request");
}

// ---- target 2: the CUSE retry state machine ---------------------------------------------------

/// Where the CUSE target's client memory lives (structs at STRUCT_BASE, arrays at ARRAY_BASE+).
pub const STRUCT_BASE: u64 = 0x1000_0000;
pub const ARRAY_BASE: u64 = 0x2000_0000;
pub const ARRAY_SPAN: u64 = 0x1_0000;

/// Unrestricted ioctls over a CUSE session, the fuzzer playing the kernel's retry rounds: it may
/// follow them faithfully, change the client's memory between rounds, interrupt, or abandon a
/// call (the client died) and release the file. Oracles: every retry within CUSE's limits,
/// every final answer within the bytes the round allowed, nothing left after release.
pub fn cuse_retry(data: &[u8]) {
    ignore_sigpipe();
    let dev = sim("gfx90a:2");
    let mux = Mux::new(dev.clone());
    let fs = Arc::new(CuseFs {
        mux: mux.clone(),
        kind: FileKind::Kfd,
        env: Arc::new(CuseEnv::default()),
    });
    let mut k = FakeKernel::cuse(fs, "kfdmux-fuzz/kfd");
    let pid = std::process::id();
    let ids = (1000, 1000, pid);
    let mut inp = Input::new(data);
    let mut mem = ClientMem::default();
    mem.map(STRUCT_BASE, inp.bytes(4096).to_vec());
    for i in 0..3 {
        let mut a = inp.bytes(ARRAY_SPAN as usize).to_vec();
        a.resize(4096.max(a.len()), 0);
        mem.map(ARRAY_BASE + i * ARRAY_SPAN, a);
    }
    let mut fhs = Vec::new();
    for _ in 0..2 {
        if let Ok(fh) = k.open(1, ids) {
            fhs.push(fh);
        }
    }
    let mut parked: Vec<u64> = Vec::new();
    let mut steps = 0;
    while !inp.done() && steps < 48 && !fhs.is_empty() {
        steps += 1;
        let op = inp.u8();
        if op % 8 == 7 {
            // The client is killed mid-way: release one file with whatever is pending.
            let fh = fhs.remove(inp.u8() as usize % fhs.len());
            k.release(1, fh, ids);
            continue;
        }
        if op % 8 == 6 && !parked.is_empty() {
            let u = parked.remove(0);
            k.send(FUSE_INTERRUPT, 0, ids, InterruptIn { unique: u }.as_bytes());
            continue;
        }
        let fh = fhs[inp.u8() as usize % fhs.len()];
        let cmd = pick_cmd(&mut inp);
        let arg = match inp.u8() % 8 {
            0 => 0,
            1 => inp.u64(),
            _ => STRUCT_BASE + (inp.u8() as u64 & 0xF8),
        };
        let mut in_data: Vec<u8> = Vec::new();
        let mut out_size = 0u32;
        for round in 0..12 {
            let u = k.send_ioctl(
                1,
                ids,
                fh,
                FUSE_IOCTL_UNRESTRICTED,
                cmd,
                arg,
                &in_data,
                out_size,
            );
            let Some(r) = k.wait_for(u, Duration::ZERO) else {
                parked.push(u);
                break;
            };
            let ans = parse_ioctl_reply(&r)
                .unwrap_or_else(|e| panic!("round {round}: malformed reply: {e}"));
            match ans {
                IoctlAnswer::Error(_) => break,
                IoctlAnswer::Done(_, data) => {
                    // The real kernel fails a reply longer than the round's out_size.
                    assert!(
                        data.len() <= out_size as usize,
                        "cmd {cmd:#x}: {} bytes answered, the round allowed {out_size}",
                        data.len()
                    );
                    break;
                }
                IoctlAnswer::Retry(ins, outs) => {
                    match kernel_next_round(&mem, &ins, &outs) {
                        Ok((d, o)) => {
                            in_data = d;
                            out_size = o;
                        }
                        Err(_) => break, // the kernel fails the ioctl: the daemon hears nothing
                    }
                    match inp.u8() {
                        // The client rewrites memory between rounds (the next round carries it).
                        0xF0..=0xFD => {
                            let at = inp.u16() as u64 % 4096;
                            let b = inp.bytes(64).to_vec();
                            mem.write(STRUCT_BASE + at, &b);
                            if let Ok((d, o)) = kernel_next_round(&mem, &ins, &outs) {
                                in_data = d;
                                out_size = o;
                            }
                        }
                        // Abandoned between rounds: the client died.
                        0xFE | 0xFF => break,
                        _ => {}
                    }
                }
            }
        }
        check_replies(&mut k);
    }
    for fh in fhs.drain(..) {
        k.release(1, fh, ids);
    }
    check_replies(&mut k);
    assert_no_leak(&mux.stats_text(), "cuse_retry");
}

// ---- target 3: the schema-driven marshaller ---------------------------------------------------

/// `marshal::plan` over every schema struct with arbitrary bytes, and command lookup with
/// arbitrary commands: no panic, regions bounded, non-null, within the struct's pointer fields.
pub fn marshal(data: &[u8]) {
    let mut inp = Input::new(data);
    let structs = kfdmux::abi::STRUCTS;
    while !inp.done() {
        let sd = structs[inp.u16() as usize % structs.len()];
        let mut arg = inp.bytes(1024).to_vec();
        if inp.u8() & 1 == 0 {
            arg.resize(sd.size, 0);
        }
        let ptrs = sd
            .fields
            .iter()
            .filter(|f| matches!(f.kind, Kind::Pointer(_)))
            .count();
        if let Ok(regions) = kfdmux::marshal::plan(sd, &arg) {
            assert!(regions.len() <= ptrs);
            for r in &regions {
                assert!(
                    r.addr != 0 && r.len > 0 && r.len <= kfdmux::marshal::MAX_ARRAY_BYTES,
                    "{}: bad region {r:?}",
                    sd.name
                );
            }
        }
        for f in sd.fields {
            let v = sd.get(&arg, f.name).unwrap_or(0);
            let mut copy = arg.clone();
            if sd.set(&mut copy, f.name, v) {
                assert_eq!(
                    copy, arg,
                    "{}.{}: set(get()) changed the bytes",
                    sd.name, f.name
                );
            }
        }
        let cmd = inp.u32();
        for kind in [FileKind::Kfd, FileKind::Render(0)] {
            if let Ok((def, v)) = Mux::lookup_cmd(kind, cmd) {
                let ty = kfdmux::abi::table::ioc_type(cmd);
                assert!(ty == KFD_IOC_TYPE || ty == DRM_IOC_TYPE);
                assert_eq!(def.nr, kfdmux::abi::table::ioc_nr(cmd));
                let size = ioc_size(cmd) as usize;
                assert!(
                    size == v.size || def.trailing,
                    "{}: size {size} accepted for variant of {}",
                    def.name,
                    v.size
                );
            }
        }
    }
}

// ---- target 4: the sim's ioctl dispatch -------------------------------------------------------

/// The fd table the sim target's client has: fds 3 and 4 are the render nodes of GPUs 0 and 1.
struct FuzzEnv;
impl Env for FuzzEnv {
    fn file_of_fd(&self, _caller: &Caller, fd: i32) -> Result<Option<(FileKind, u32)>, Errno> {
        match fd {
            3 => Ok(Some((FileKind::Render(0), 7))),
            4 => Ok(Some((FileKind::Render(1), 7))),
            0..=2 => Ok(None),
            _ => Err(Errno::EBADF),
        }
    }
}

type Cancels = Arc<Mutex<Vec<Box<dyn FnOnce() + Send>>>>;

struct CountSink {
    done: Arc<AtomicUsize>,
    arg_len: usize,
    array_lens: Vec<usize>,
    cancels: Cancels,
}

impl DoneSink for CountSink {
    fn complete(self: Box<Self>, call: IoctlCall, result: IoctlResult) {
        self.done.fetch_add(1, Ordering::SeqCst);
        if call.def.name == "DROPPED" {
            return;
        }
        // The transport writes these back to the client at the addresses it named: a device
        // that resized them would write past what the client gave.
        assert_eq!(
            call.arg.len(),
            self.arg_len,
            "{}: argument resized",
            call.def.name
        );
        // Arrays may shrink (the kernel copies out only what it filled) but never grow. A
        // shrunk out array may be followed by another: the CUSE reply zero-pads it to its
        // iovec (UnrestrictedDone), so the next one still lands in its own client buffer.
        assert_eq!(
            call.arrays.len(),
            self.array_lens.len(),
            "{}: arrays added or removed",
            call.def.name
        );
        let outs: Vec<(usize, usize)> = call
            .arrays
            .iter()
            .zip(&self.array_lens)
            .filter(|(a, _)| a.io.is_out())
            .map(|(a, n)| (a.data.len(), *n))
            .collect();
        for (now, was) in &outs {
            assert!(
                now <= was,
                "{}: array grew from {was} to {now} bytes",
                call.def.name
            );
        }
        for (a, n) in call.arrays.iter().zip(&self.array_lens) {
            assert!(
                a.io.is_out() || a.data.len() == *n,
                "{}: in array resized",
                call.def.name
            );
        }
        let _ = result;
    }
    fn on_interrupt(&mut self, cancel: Box<dyn FnOnce() + Send>) -> bool {
        self.cancels.lock().map(|mut c| c.push(cancel)).is_ok()
    }
}

/// Quotas the sim target runs under (its ledger must never exceed them).
pub const FUZZ_QUOTA_MEM: u64 = 64 << 20;

/// Arbitrary commands, argument bytes and pointed-to memory straight into the sim's contexts
/// (behind the policy layer): every call answered exactly once (parked ones by release at the
/// latest), argument and arrays never resized, VRAM within the quota, nothing left after release.
pub fn sim_ioctl(data: &[u8]) {
    let dev = sim("gfx90a:2");
    let policy = Policy {
        quotas: Quotas {
            mem_bytes: Some(FUZZ_QUOTA_MEM),
            queues: Some(4),
            events: Some(64),
        },
        max_contexts_per_uid: Some(8),
        ..Default::default()
    };
    let pdev: Arc<dyn Device> = Arc::new(PolicyDevice::new(dev.clone(), policy));
    let caller = Caller {
        pid: 4242,
        tgid: 4242,
        uid: 1000,
        gid: 1000,
    };
    let env = FuzzEnv;
    let kinds = [
        FileKind::Kfd,
        FileKind::Kfd,
        FileKind::Render(0),
        FileKind::Render(1),
    ];
    let ctxs: Vec<Box<dyn DeviceContext>> = kinds
        .iter()
        .filter_map(|k| pdev.open(&caller, *k).ok())
        .collect();
    assert_eq!(ctxs.len(), kinds.len());
    let started = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let cancels: Cancels = Arc::default();
    let mut inp = Input::new(data);
    let mut steps = 0;
    while !inp.done() && steps < 96 {
        steps += 1;
        let sel = inp.u8();
        if sel == 0xFF {
            let c = cancels.lock().ok().and_then(|mut v| v.pop());
            if let Some(c) = c {
                c();
            }
            continue;
        }
        let ci = sel as usize % ctxs.len();
        let cmd = pick_cmd(&mut inp);
        let Ok((def, variant)) = Mux::lookup_cmd(kinds[ci], cmd) else {
            continue;
        };
        let full = variant
            .arg
            .map(|a| a.size)
            .unwrap_or(0)
            .max(ioc_size(cmd) as usize);
        let mut arg = inp.bytes(full).to_vec();
        arg.resize(full, 0);
        // Fewer parked forever: a WAIT_EVENTS timeout above 50 ms is cut to 0..50 ms.
        if def.nr == 0x0C && def.name == "WAIT_EVENTS" {
            if let Some(sd) = variant.arg {
                let t = sd.get(&arg, "timeout").unwrap_or(0);
                if t > 50 && t != u32::MAX as u64 {
                    sd.set(&mut arg, "timeout", t % 50);
                }
            }
        }
        let regions = match variant.arg {
            Some(sd) => match kfdmux::marshal::plan(sd, &arg) {
                Ok(r) => r,
                Err(_) => continue,
            },
            None => Vec::new(),
        };
        let arrays: Vec<ArrayBuf> = regions
            .iter()
            .map(|r| {
                let mut d = vec![0u8; r.len];
                if r.io.is_in() {
                    let src = inp.bytes(r.len);
                    d[..src.len()].copy_from_slice(src);
                }
                ArrayBuf {
                    field: r.field,
                    addr: r.addr,
                    io: r.io,
                    data: d,
                }
            })
            .collect();
        let sink = CountSink {
            done: done.clone(),
            arg_len: arg.len(),
            array_lens: arrays.iter().map(|a| a.data.len()).collect(),
            cancels: cancels.clone(),
        };
        let call = IoctlCall {
            cmd,
            def,
            variant,
            arg,
            arrays,
            caller,
        };
        started.fetch_add(1, Ordering::SeqCst);
        ctxs[ci].ioctl(&env, call, Done::new(Box::new(sink)));
        let vram: u64 = dev
            .stats()
            .iter()
            .filter(|(n, _)| n.starts_with("vram_used"))
            .map(|(_, v)| *v)
            .sum();
        assert!(
            vram <= 2 * FUZZ_QUOTA_MEM,
            "VRAM {vram} beyond two contexts' quota"
        );
    }
    for c in &ctxs {
        c.release();
    }
    drop(ctxs);
    // Timer-driven answers may be on their way; they must all arrive.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while done.load(Ordering::SeqCst) < started.load(Ordering::SeqCst)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        done.load(Ordering::SeqCst),
        started.load(Ordering::SeqCst),
        "calls left unanswered after release"
    );
    let stats: HashMap<&str, u64> = pdev.stats().into_iter().collect();
    let text: String = stats.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
    assert_no_leak(&text, "sim_ioctl");
}
