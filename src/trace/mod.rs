//! Recording every call the daemon sees (opens, ioctls, closes), reading the recording back,
//! decoding it like strace ([`show`]) and replaying it against a device ([`replay`]).
//!
//! The file format is specified in `docs/trace-format.md`: a magic, a version and a `key=value`
//! header, then self-delimiting binary records, appended through a shared mapping of the file
//! ([`mapped`]) so a daemon killed at any moment leaves every completed record readable; the
//! reader stops at the zeros after the data and ignores a torn last record.

pub mod mapped;
pub mod replay;
pub mod show;

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::abi::table::{read_uint, Io, Kind};
use crate::device::{Caller, Env, FileKind, IoctlCall, IoctlResult};
use crate::errno::Errno;

/// The first 8 bytes of a trace file.
pub const MAGIC: &[u8; 8] = b"KFDTRACE";
/// The format version this build writes. Version 1 (FNV-1a record checksums) is still read.
pub const VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const MIN_VERSION: u32 = 1;
/// Upper bound on one record body; a length beyond it means a corrupt file.
pub const MAX_RECORD: u32 = 64 << 20;

const REC_OPEN: u8 = 1;
const REC_RELEASE: u8 = 2;
const REC_IOCTL: u8 = 3;

/// The `key=value` header: what replay needs to rebuild the device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub entries: Vec<(String, String)>,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into().replace('\n', " ");
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(e) => e.1 = value,
            None => self.entries.push((key.to_string(), value)),
        }
    }
    /// The header of a sim device serving `gpus` (from `topology::parse_gpus` of `spec`).
    pub fn for_sim(
        spec: &str,
        gpus: &[crate::topology::Gpu],
        cfg: &crate::device::sim::SimConfig,
    ) -> Header {
        let ids: Vec<(u32, u32)> = gpus.iter().map(|g| (g.gpu_id, g.render_minor)).collect();
        Header::for_device(
            "sim",
            Some(spec.to_string()),
            &ids,
            cfg.kfd_minor,
            &[("drm_minor", cfg.drm_minor.to_string())],
        )
    }

    /// The header of a trace recorded from the kfd device: the kernel's version and the GPUs
    /// it gave out, `(gpu_id, render_minor, gfx_target_version)` in device order. `gpus` is
    /// set when every GPU matches a sim preset, so the trace replays on the sim unchanged.
    pub fn for_kfd(kfd_minor: u32, gpus: &[(u32, u32, u32)]) -> Header {
        let presets: Option<Vec<&str>> = gpus
            .iter()
            .map(|g| {
                crate::topology::PRESETS
                    .iter()
                    .find(|p| p.gfx_target_version == g.2)
                    .map(|p| p.name)
            })
            .collect();
        let ids: Vec<(u32, u32)> = gpus.iter().map(|g| (g.0, g.1)).collect();
        Header::for_device("kfd", presets.map(|n| n.join(",")), &ids, kfd_minor, &[])
    }

    /// The keys every recording has: `device`, the `gpus` spec when known, `(gpu_id,
    /// render_minor)` per GPU in device order, the KFD minor, then `extra`, then the start time.
    fn for_device(
        device: &str,
        spec: Option<String>,
        gpus: &[(u32, u32)],
        kfd_minor: u32,
        extra: &[(&str, String)],
    ) -> Header {
        let mut h = Header::default();
        h.set("kfdmux", env!("CARGO_PKG_VERSION"));
        h.set("device", device);
        if let Some(spec) = spec {
            h.set("gpus", spec);
        }
        let ids: Vec<String> = gpus.iter().map(|g| format!("{:#x}", g.0)).collect();
        h.set("gpu_ids", ids.join(","));
        let minors: Vec<String> = gpus.iter().map(|g| g.1.to_string()).collect();
        h.set("render_minors", minors.join(","));
        h.set("kfd_minor", kfd_minor.to_string());
        for (k, v) in extra {
            h.set(k, v.clone());
        }
        h.set("started_unix", unix_now().to_string());
        h
    }

    /// The recorded GPU ids, in device order.
    pub fn gpu_ids(&self) -> Vec<u32> {
        self.get("gpu_ids")
            .unwrap_or("")
            .split(',')
            .filter_map(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .collect()
    }
    fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        for (k, v) in &self.entries {
            s.push_str(k);
            s.push('=');
            s.push_str(v);
            s.push('\n');
        }
        s.into_bytes()
    }
    fn decode(b: &[u8]) -> Result<Header, String> {
        let s = std::str::from_utf8(b).map_err(|_| "header is not UTF-8".to_string())?;
        let mut h = Header::default();
        for l in s.lines().filter(|l| !l.is_empty()) {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| format!("header line without '=': {l:?}"))?;
            h.entries.push((k.to_string(), v.to_string()));
        }
        Ok(h)
    }
}

/// Where a descriptor named in an ioctl pointed when the call was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdTarget {
    /// One of this daemon's kfd files, opened by process `tgid`.
    Kfd { tgid: u32 },
    /// This daemon's render node of GPU `index`, opened by process `tgid`.
    Render { index: u32, tgid: u32 },
    /// An open file that is not ours.
    Other,
    /// Resolving the descriptor failed with this errno (e.g. EBADF: not open).
    Bad(i32),
}

/// A descriptor-valued input field and what it referred to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdRec {
    pub field: String,
    pub fd: i32,
    pub target: FdTarget,
}

/// A pointed-to array: what the caller passed and what went back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArrayRec {
    pub field: String,
    pub io: Io,
    /// The caller's address.
    pub addr: u64,
    /// The caller's bytes (`In`/`InOut`; empty for `Out`).
    pub data_in: Vec<u8>,
    /// The bytes the device left (`Out`/`InOut`; empty for `In`).
    pub data_out: Vec<u8>,
}

/// Where an ioctl ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The device answered it.
    Device,
    /// The mux refused it before the device saw it (unknown command, size, pointer fault,
    /// another process's file).
    Mux,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoctlRec {
    pub cmd: u32,
    /// Nanoseconds since the trace started at which the answer was ready.
    pub t_end_ns: u64,
    pub stage: Stage,
    /// What the device answered: 0 or -errno (equal to `result` for [`Stage::Mux`]).
    pub dev_result: i32,
    /// What the caller got: 0 or -errno (differs from `dev_result` when writing back faulted).
    pub result: i32,
    /// The argument struct as the caller passed it (the bytes the kernel copied in).
    pub arg_in: Vec<u8>,
    /// The argument struct as the device left it (empty for [`Stage::Mux`]).
    pub arg_out: Vec<u8>,
    pub arrays: Vec<ArrayRec>,
    pub fds: Vec<FdRec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An open; `result` 0 or -errno (then `ctx` is 0).
    Open {
        uid: u32,
        gid: u32,
        kind: FileKind,
        result: i32,
    },
    /// The last close (FUSE RELEASE) of a context.
    Release,
    Ioctl(IoctlRec),
}

/// One record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Start order across the whole daemon (records are written in completion order).
    pub seq: u64,
    /// Nanoseconds since the trace started at which the call arrived.
    pub t_ns: u64,
    /// The context (the mux's open-file id; 0 when none).
    pub ctx: u64,
    pub pid: u32,
    pub tgid: u32,
    pub event: Event,
}

impl Record {
    pub fn ioctl(&self) -> Option<&IoctlRec> {
        match &self.event {
            Event::Ioctl(i) => Some(i),
            _ => None,
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---- encoding -------------------------------------------------------------------------------

fn res(r: &Result<(), Errno>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => -e.0,
    }
}

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("record shorter than its fields".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(read_uint(self.take(4)?, 0, 4) as u32)
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(self.u32()? as i32)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(read_uint(self.take(8)?, 0, 8))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "field name is not UTF-8".into())
    }
}

fn io_code(io: Io) -> u8 {
    match io {
        Io::In => 0,
        Io::Out => 1,
        Io::InOut => 2,
    }
}

fn io_from(c: u8) -> Result<Io, String> {
    Ok(match c {
        0 => Io::In,
        1 => Io::Out,
        2 => Io::InOut,
        _ => return Err(format!("bad direction code {c}")),
    })
}

/// The checksum of a record body in format `version`: detects a torn or overwritten record.
/// Version 2 uses CRC-32 (IEEE; hardware-assisted, a few bytes per cycle — it runs on every
/// recorded call); version 1 used FNV-1a 32, a byte per multiply.
pub fn checksum(version: u32, b: &[u8]) -> u32 {
    if version >= 2 {
        return crc32fast::hash(b);
    }
    let mut h: u32 = 0x811c_9dc5;
    for &x in b {
        h ^= x as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

impl Record {
    /// The record as it is stored: length, checksum, body.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode_into(&mut v);
        v
    }

    /// [`Record::encode`] into `out` (cleared first), reusing its allocation.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Sized up front: a growing Vec would reallocate for every record with arrays.
        let cap = match &self.event {
            Event::Ioctl(i) => {
                128 + i.arg_in.len()
                    + i.arg_out.len()
                    + i.arrays
                        .iter()
                        .map(|a| 32 + a.field.len() + a.data_in.len() + a.data_out.len())
                        .sum::<usize>()
                    + i.fds.iter().map(|f| 24 + f.field.len()).sum::<usize>()
            }
            _ => 64,
        };
        out.clear();
        out.reserve(cap);
        let mut e = Enc(std::mem::take(out));
        e.0.extend_from_slice(&[0; 8]); // length and checksum, filled in below
        e.u8(match self.event {
            Event::Open { .. } => REC_OPEN,
            Event::Release => REC_RELEASE,
            Event::Ioctl(_) => REC_IOCTL,
        });
        e.u64(self.seq);
        e.u64(self.t_ns);
        e.u64(self.ctx);
        e.u32(self.pid);
        e.u32(self.tgid);
        match &self.event {
            Event::Open {
                uid,
                gid,
                kind,
                result,
            } => {
                e.u32(*uid);
                e.u32(*gid);
                match kind {
                    FileKind::Kfd => {
                        e.u8(0);
                        e.u32(0)
                    }
                    FileKind::Render(i) => {
                        e.u8(1);
                        e.u32(*i)
                    }
                }
                e.i32(*result);
            }
            Event::Release => {}
            Event::Ioctl(i) => {
                e.u32(i.cmd);
                e.u64(i.t_end_ns);
                e.u8(match i.stage {
                    Stage::Device => 0,
                    Stage::Mux => 1,
                });
                e.i32(i.dev_result);
                e.i32(i.result);
                e.bytes(&i.arg_in);
                e.bytes(&i.arg_out);
                e.u32(i.arrays.len() as u32);
                for a in &i.arrays {
                    e.bytes(a.field.as_bytes());
                    e.u8(io_code(a.io));
                    e.u64(a.addr);
                    e.bytes(&a.data_in);
                    e.bytes(&a.data_out);
                }
                e.u32(i.fds.len() as u32);
                for f in &i.fds {
                    e.bytes(f.field.as_bytes());
                    e.i32(f.fd);
                    let (k, a, b) = match f.target {
                        FdTarget::Kfd { tgid } => (0, 0, tgid),
                        FdTarget::Render { index, tgid } => (1, index, tgid),
                        FdTarget::Other => (2, 0, 0),
                        FdTarget::Bad(e) => (3, e as u32, 0),
                    };
                    e.u8(k);
                    e.u32(a);
                    e.u32(b);
                }
            }
        }
        let body_len = (e.0.len() - 8) as u32;
        let sum = checksum(VERSION, &e.0[8..]);
        e.0[0..4].copy_from_slice(&body_len.to_le_bytes());
        e.0[4..8].copy_from_slice(&sum.to_le_bytes());
        *out = e.0;
    }

    /// Decodes one record body (without length and checksum).
    pub fn decode(body: &[u8]) -> Result<Record, String> {
        let mut d = Dec(body);
        let ty = d.u8()?;
        let seq = d.u64()?;
        let t_ns = d.u64()?;
        let ctx = d.u64()?;
        let pid = d.u32()?;
        let tgid = d.u32()?;
        let event = match ty {
            REC_OPEN => {
                let uid = d.u32()?;
                let gid = d.u32()?;
                let k = d.u8()?;
                let idx = d.u32()?;
                let kind = match k {
                    0 => FileKind::Kfd,
                    1 => FileKind::Render(idx),
                    _ => return Err(format!("bad file kind {k}")),
                };
                Event::Open {
                    uid,
                    gid,
                    kind,
                    result: d.i32()?,
                }
            }
            REC_RELEASE => Event::Release,
            REC_IOCTL => {
                let cmd = d.u32()?;
                let t_end_ns = d.u64()?;
                let stage = match d.u8()? {
                    0 => Stage::Device,
                    1 => Stage::Mux,
                    s => return Err(format!("bad stage {s}")),
                };
                let dev_result = d.i32()?;
                let result = d.i32()?;
                let arg_in = d.bytes()?;
                let arg_out = d.bytes()?;
                let n = d.u32()?;
                let mut arrays = Vec::new();
                for _ in 0..n {
                    let field = d.string()?;
                    let io = io_from(d.u8()?)?;
                    let addr = d.u64()?;
                    let data_in = d.bytes()?;
                    let data_out = d.bytes()?;
                    arrays.push(ArrayRec {
                        field,
                        io,
                        addr,
                        data_in,
                        data_out,
                    });
                }
                let n = d.u32()?;
                let mut fds = Vec::new();
                for _ in 0..n {
                    let field = d.string()?;
                    let fd = d.i32()?;
                    let k = d.u8()?;
                    let a = d.u32()?;
                    let b = d.u32()?;
                    let target = match k {
                        0 => FdTarget::Kfd { tgid: b },
                        1 => FdTarget::Render { index: a, tgid: b },
                        2 => FdTarget::Other,
                        3 => FdTarget::Bad(a as i32),
                        _ => return Err(format!("bad fd target {k}")),
                    };
                    fds.push(FdRec { field, fd, target });
                }
                Event::Ioctl(IoctlRec {
                    cmd,
                    t_end_ns,
                    stage,
                    dev_result,
                    result,
                    arg_in,
                    arg_out,
                    arrays,
                    fds,
                })
            }
            _ => return Err(format!("unknown record type {ty}")),
        };
        if !d.0.is_empty() {
            return Err(format!("{} unexpected bytes after the record", d.0.len()));
        }
        Ok(Record {
            seq,
            t_ns,
            ctx,
            pid,
            tgid,
            event,
        })
    }
}

/// The file header bytes.
pub fn encode_header(h: &Header) -> Vec<u8> {
    let hb = h.encode();
    let mut v = Vec::with_capacity(16 + hb.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(hb.len() as u32).to_le_bytes());
    v.extend_from_slice(&hb);
    v
}

// ---- reading --------------------------------------------------------------------------------

/// A whole trace read back.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The format version the file was written in.
    pub version: u32,
    pub header: Header,
    /// Records in file (completion) order.
    pub records: Vec<Record>,
    /// Bytes at the end that did not form a complete record (a write cut short by a crash),
    /// not counting the zero-filled space mapped ahead of the data.
    pub torn_tail: usize,
    /// Where the complete records end (the header and records occupy `[0, data_end)`).
    pub data_end: usize,
}

/// Length of `b` without its trailing zero bytes.
fn trimmed(b: &[u8]) -> usize {
    b.iter().rposition(|&x| x != 0).map_or(0, |i| i + 1)
}

impl Trace {
    pub fn read(path: &Path) -> Result<Trace, String> {
        let mut b = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut b))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Trace::parse(&b).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(b: &[u8]) -> Result<Trace, String> {
        if b.len() < 16 || &b[..8] != MAGIC {
            return Err("not a kfdmux trace (bad magic)".into());
        }
        let version = read_uint(b, 8, 4) as u32;
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(format!(
                "trace format version {version}; this kfdmux reads versions {MIN_VERSION} to {VERSION}"
            ));
        }
        let hlen = read_uint(b, 12, 4) as usize;
        let hb = b.get(16..16 + hlen).ok_or("header cut short")?;
        let header = Header::decode(hb)?;
        let mut off = 16 + hlen;
        let mut records = Vec::new();
        let mut torn_tail = 0;
        while off < b.len() {
            let rest = &b[off..];
            let len = read_uint(rest, 0, 4) as usize;
            let sum = read_uint(rest, 4, 4) as u32;
            if len == 0 && rest.iter().all(|&x| x == 0) {
                // The zero-filled space a recorder maps ahead of its data (killed before it
                // could trim the file): the end of the records.
                break;
            }
            if rest.len() < 8 || rest.len() < 8 + len {
                // A record whose write did not complete: only possible at the very end.
                torn_tail = rest.len();
                break;
            }
            if len as u32 > MAX_RECORD {
                return Err(format!("record at byte {off} claims {len} bytes"));
            }
            let body = &rest[8..8 + len];
            if checksum(version, body) != sum {
                if b[off + 8 + len..].iter().all(|&x| x == 0) {
                    torn_tail = trimmed(rest);
                    break;
                }
                return Err(format!("record at byte {off}: checksum mismatch"));
            }
            records.push(Record::decode(body).map_err(|e| format!("record at byte {off}: {e}"))?);
            off += 8 + len;
        }
        Ok(Trace {
            version,
            header,
            records,
            torn_tail,
            data_end: off,
        })
    }

    /// Records in start order (`seq`), the order replay issues them in.
    pub fn by_seq(&self) -> Vec<&Record> {
        let mut v: Vec<&Record> = self.records.iter().collect();
        v.sort_by_key(|r| r.seq);
        v
    }
}

// ---- recording ------------------------------------------------------------------------------

/// Appends records to a trace file through a shared mapping (see [`mapped`]).
pub struct Recorder {
    file: mapped::MappedAppender,
    start: Instant,
    seq: AtomicU64,
    failed: AtomicBool,
    records: AtomicU64,
}

impl Recorder {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path, header: &Header) -> io::Result<Arc<Recorder>> {
        // Read as well: a shared writable mapping needs a file opened for both.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let head = encode_header(header);
        file.write_all(&head)?;
        let file = mapped::MappedAppender::new(file, head.len() as u64)?;
        Ok(Arc::new(Recorder {
            file,
            start: Instant::now(),
            seq: AtomicU64::new(1),
            failed: AtomicBool::new(false),
            records: AtomicU64::new(0),
        }))
    }

    /// Trims the file to its records (also done on drop); later records are still appended.
    pub fn finish(&self) -> io::Result<()> {
        self.file.finish()
    }

    /// Records written so far.
    pub fn records(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn stamp(&self) -> (u64, u64) {
        (self.seq.fetch_add(1, Ordering::Relaxed), self.now())
    }

    /// Appends one record (a copy into the mapped file under the lock).
    pub fn write_record(&self, r: &Record) {
        thread_local! {
            // One encoding buffer per worker thread: no allocation per record.
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let appended = BUF.with(|b| {
            let mut buf = b.borrow_mut();
            r.encode_into(&mut buf);
            // Appends are serialised: a crash can cut only the last record.
            let res = self.file.append(&[&buf]);
            // Do not keep a huge buffer around after one big record.
            if buf.capacity() > 1 << 20 {
                *buf = Vec::new();
            }
            res
        });
        match appended {
            Ok(()) => {
                self.records.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "trace: writing a record failed: {e}; later failures are not logged"
                    );
                }
            }
        }
    }

    /// An open of `kind` by `caller`: context `ctx` (0 when it failed).
    pub fn open(&self, ctx: u64, caller: &Caller, kind: FileKind, result: &Result<u64, Errno>) {
        let (seq, t_ns) = self.stamp();
        let result = match result {
            Ok(_) => 0,
            Err(e) => -e.0,
        };
        self.write_record(&Record {
            seq,
            t_ns,
            ctx,
            pid: caller.pid,
            tgid: caller.tgid,
            event: Event::Open {
                uid: caller.uid,
                gid: caller.gid,
                kind,
                result,
            },
        });
    }

    /// The release of context `ctx` opened by `owner`.
    pub fn release(&self, ctx: u64, owner: &Caller) {
        let (seq, t_ns) = self.stamp();
        self.write_record(&Record {
            seq,
            t_ns,
            ctx,
            pid: owner.pid,
            tgid: owner.tgid,
            event: Event::Release,
        });
    }

    /// An ioctl the mux refused before the device saw it.
    pub fn refused(&self, ctx: u64, pid: u32, cmd: u32, in_data: &[u8], e: Errno) {
        let (seq, t_ns) = self.stamp();
        let tgid = crate::mux::tgid_of(pid).unwrap_or(pid);
        self.write_record(&Record {
            seq,
            t_ns,
            ctx,
            pid,
            tgid,
            event: Event::Ioctl(IoctlRec {
                cmd,
                t_end_ns: t_ns,
                stage: Stage::Mux,
                dev_result: -e.0,
                result: -e.0,
                arg_in: in_data.to_vec(),
                arg_out: Vec::new(),
                arrays: Vec::new(),
                fds: Vec::new(),
            }),
        });
    }

    /// An ioctl about to reach the device: its inputs are copied now (the device may overwrite
    /// them); [`PendingIoctl::finish`] adds the outputs and writes the record.
    pub fn begin_ioctl(
        self: &Arc<Self>,
        ctx: u64,
        env: &dyn Env,
        call: &IoctlCall,
    ) -> PendingIoctl {
        let (seq, t_ns) = self.stamp();
        let size = (crate::abi::table::ioc_size(call.cmd) as usize).min(call.arg.len());
        let arrays = call
            .arrays
            .iter()
            .map(|a| ArrayRec {
                field: a.field.to_string(),
                io: a.io,
                addr: a.addr,
                data_in: if a.io.is_in() {
                    a.data.clone()
                } else {
                    Vec::new()
                },
                data_out: Vec::new(),
            })
            .collect();
        let mut fds = Vec::new();
        if let Some(sd) = call.variant.arg {
            for f in sd
                .fields
                .iter()
                .filter(|f| matches!(f.kind, Kind::Fd) && f.io.is_in())
            {
                if f.offset + f.size > size {
                    continue;
                }
                let fd = read_uint(&call.arg, f.offset, f.size) as u32 as i32;
                let target = match env.file_of_fd(&call.caller, fd) {
                    Ok(Some((FileKind::Kfd, tgid))) => FdTarget::Kfd { tgid },
                    Ok(Some((FileKind::Render(index), tgid))) => FdTarget::Render { index, tgid },
                    Ok(None) => FdTarget::Other,
                    Err(e) => FdTarget::Bad(e.0),
                };
                fds.push(FdRec {
                    field: f.name.to_string(),
                    fd,
                    target,
                });
            }
        }
        PendingIoctl {
            rec: self.clone(),
            seq,
            t_ns,
            ctx,
            pid: call.caller.pid,
            tgid: call.caller.tgid,
            cmd: call.cmd,
            arg_in: call.arg[..size].to_vec(),
            arrays,
            fds,
        }
    }
}

/// An ioctl in flight (see [`Recorder::begin_ioctl`]).
pub struct PendingIoctl {
    rec: Arc<Recorder>,
    seq: u64,
    t_ns: u64,
    ctx: u64,
    pid: u32,
    tgid: u32,
    cmd: u32,
    arg_in: Vec<u8>,
    arrays: Vec<ArrayRec>,
    fds: Vec<FdRec>,
}

impl PendingIoctl {
    /// Completes the record with the device's answer `dev` and what the caller got (`result`),
    /// stamping its end time; [`FinishedIoctl::write`] stores it (before the reply is sent).
    pub fn finish(
        mut self,
        call: &IoctlCall,
        dev: &IoctlResult,
        result: &IoctlResult,
    ) -> FinishedIoctl {
        let size = self.arg_in.len().min(call.arg.len());
        for a in self.arrays.iter_mut().filter(|a| a.io.is_out()) {
            if let Some(b) = call.arrays.iter().find(|b| b.field == a.field) {
                a.data_out = b.data.clone();
            }
        }
        let rec = Record {
            seq: self.seq,
            t_ns: self.t_ns,
            ctx: self.ctx,
            pid: self.pid,
            tgid: self.tgid,
            event: Event::Ioctl(IoctlRec {
                cmd: self.cmd,
                t_end_ns: self.rec.now(),
                stage: Stage::Device,
                dev_result: res(dev),
                result: res(result),
                arg_in: std::mem::take(&mut self.arg_in),
                arg_out: call.arg[..size].to_vec(),
                arrays: std::mem::take(&mut self.arrays),
                fds: std::mem::take(&mut self.fds),
            }),
        };
        FinishedIoctl {
            rec: self.rec,
            record: rec,
        }
    }
}

/// A complete ioctl record not yet written.
pub struct FinishedIoctl {
    rec: Arc<Recorder>,
    record: Record,
}

impl FinishedIoctl {
    pub fn write(self) {
        self.rec.write_record(&self.record);
    }
}

/// `EINVAL`-style name of an errno value (positive), or its number.
pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENFILE => "ENFILE",
        libc::EMFILE => "EMFILE",
        libc::ENOTTY => "ENOTTY",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTCONN => "ENOTCONN",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ETIME => "ETIME",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EPROTO => "EPROTO",
        libc::EDEADLK => "EDEADLK",
        libc::ECANCELED => "ECANCELED",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        vec![
            Record {
                seq: 1,
                t_ns: 10,
                ctx: 1,
                pid: 7,
                tgid: 7,
                event: Event::Open {
                    uid: 0,
                    gid: 0,
                    kind: FileKind::Render(1),
                    result: 0,
                },
            },
            Record {
                seq: 2,
                t_ns: 20,
                ctx: 1,
                pid: 8,
                tgid: 7,
                event: Event::Ioctl(IoctlRec {
                    cmd: 0xc0184b18,
                    t_end_ns: 25,
                    stage: Stage::Device,
                    dev_result: -22,
                    result: -22,
                    arg_in: vec![1, 2, 3],
                    arg_out: vec![4, 5, 6],
                    arrays: vec![ArrayRec {
                        field: "ids".into(),
                        io: Io::InOut,
                        addr: 9,
                        data_in: vec![1],
                        data_out: vec![2],
                    }],
                    fds: vec![FdRec {
                        field: "drm_fd".into(),
                        fd: 3,
                        target: FdTarget::Render { index: 1, tgid: 7 },
                    }],
                }),
            },
            Record {
                seq: 3,
                t_ns: 30,
                ctx: 1,
                pid: 7,
                tgid: 7,
                event: Event::Release,
            },
        ]
    }

    fn file(recs: &[Record]) -> Vec<u8> {
        let mut h = Header::default();
        h.set("gpus", "gfx90a:2");
        let mut b = encode_header(&h);
        for r in recs {
            b.extend_from_slice(&r.encode());
        }
        b
    }

    #[test]
    fn records_round_trip() {
        let recs = sample();
        let t = Trace::parse(&file(&recs)).unwrap();
        assert_eq!(t.records, recs);
        assert_eq!(t.header.get("gpus"), Some("gfx90a:2"));
        assert_eq!(t.torn_tail, 0);
    }

    #[test]
    fn torn_tail_is_ignored_at_every_cut() {
        let recs = sample();
        let b = file(&recs);
        let last = recs[2].encode().len();
        for cut in 1..last {
            let t = Trace::parse(&b[..b.len() - cut]).unwrap();
            assert_eq!(t.records, recs[..2], "cut {cut}");
            assert_eq!(t.torn_tail, last - cut);
        }
    }

    #[test]
    fn corruption_in_the_middle_is_an_error() {
        let recs = sample();
        let mut b = file(&recs);
        let first = encode_header(&{
            let mut h = Header::default();
            h.set("gpus", "gfx90a:2");
            h
        })
        .len();
        b[first + 12] ^= 0xff;
        assert!(Trace::parse(&b).unwrap_err().contains("checksum"));
        let mut bad = file(&recs);
        bad[8] = 9;
        assert!(Trace::parse(&bad).unwrap_err().contains("version 9"));
    }
}
