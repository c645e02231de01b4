//! FUSE-over-io_uring (protocol 7.42, Linux ≥ 6.14): `serve --transport fuse --fuse-uring`.
//!
//! After INIT has negotiated `FUSE_OVER_IO_URING`, one queue per possible CPU registers ring
//! entries on the `/dev/fuse` fd with `IORING_OP_URING_CMD` (SQE128,
//! `FUSE_IO_URING_CMD_REGISTER`). Each entry is a header buffer (`fuse_uring_req_header`: the
//! in/out header, the opcode's first argument, `fuse_uring_ent_in_out`) and a payload buffer.
//! The kernel puts a request into a free entry of the queue of the CPU the caller runs on and
//! completes that entry's command; we rebuild the request as `read(/dev/fuse)` would have given
//! it, hand it to the same [`Session::dispatch`] as the `/dev/fuse` workers, and answer by
//! writing the reply into the entry and submitting `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which
//! also hands the entry back for the next request. The kernel switches the connection to the
//! ring only when every queue has an entry; until then (and forever for INIT, INTERRUPT and
//! FORGET, which the kernel keeps on `/dev/fuse`) the legacy workers serve.
//!
//! Replies may come from any thread (a parked WAIT_EVENTS answered by SET_EVENT on another
//! CPU, its deadline, an INTERRUPT): [`Channel::send`](super::engine::Channel::send) asks the
//! [`Router`] first, which writes the reply into the entry, queues the commit for the entry's
//! queue thread and, if the caller is not that thread, wakes it through an eventfd the thread
//! keeps a read on in its own ring. Only queue threads submit to their rings (SINGLE_ISSUER,
//! DEFER_TASKRUN: the kernel copies requests into the entries in the queue thread's context).
//!
//! Depth: a parked request keeps its entry until answered, so a fixed depth could be used up by
//! waiters and starve the CPU's other callers. Each queue starts with `depth` entries and
//! registers `GROW` more whenever fewer than `LOW_WATER` are left with the kernel, up to
//! `max_depth`; only past `max_depth - LOW_WATER` parked requests on one CPU do callers on it
//! wait for a waiter to finish.

use std::cell::Cell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::engine::{RingReply, Session, BUFFER_SIZE};
use super::wire::{InHeader, OutHeader, FUSE_BATCH_FORGET, FUSE_FORGET};
use crate::errno::Errno;

/// The module parameter that gates FUSE-over-io_uring.
pub const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// `fuse_uring_req_header`: in_out[128], op_in[128], `fuse_uring_ent_in_out` (32 bytes).
const IN_OUT_SZ: usize = 128;
const OP_IN_SZ: usize = 128;
const ENT_IN_OUT_OFF: usize = IN_OUT_SZ + OP_IN_SZ;
const HEADER_SZ: usize = ENT_IN_OUT_OFF + 32;
/// Header buffers are laid out on this stride (a cache line multiple).
const HEADER_STRIDE: usize = 320;
/// At least the kernel's `max_payload_sz` (max of 8 KiB, `max_write`, `max_pages` pages:
/// 128 KiB with our INIT answer).
const PAYLOAD_SZ: usize = BUFFER_SIZE;
const IN_HEADER_SZ: usize = 40;
/// `user_data` of the eventfd read; entries use their index.
const EVENTFD_TAG: u64 = u64::MAX;
/// Entries kept with the kernel per queue before more are registered, and how many at once.
const LOW_WATER: u32 = 4;
const GROW: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `fuse_uring_cmd_req`, in the SQE's command area.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct CmdReq {
    flags: u64,
    commit_id: u64,
    qid: u16,
    padding: [u8; 6],
}

/// Queue sizing (`--fuse-uring-depth`).
#[derive(Clone, Copy, Debug)]
pub struct UringOptions {
    /// Entries each queue registers at start.
    pub depth: u32,
    /// The most entries a queue grows to while requests are parked.
    pub max_depth: u32,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            depth: 16,
            max_depth: 256,
        }
    }
}

thread_local! {
    /// The queue this thread serves (u32::MAX: none); its own replies need no wake-up.
    static ON_QUEUE: Cell<u32> = const { Cell::new(u32::MAX) };
}

/// Anonymous memory the kernel reads and writes through the registered iovecs.
struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory; each entry's part of it is touched by one party at a
// time (the kernel while the entry is registered, then whoever holds its request), and the
// hand-over between threads goes through a mutex (`Queue::pending`) or the ring.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize) -> Result<Region, String> {
        // SAFETY: a fresh private anonymous mapping; NORESERVE so unused entries cost nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mapping {len} bytes of ring buffers: {}",
                Errno::last()
            ));
        }
        Ok(Region {
            ptr: p as *mut u8,
            len,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

/// One per possible CPU.
struct Queue {
    qid: u16,
    max_depth: u32,
    headers: Region,
    payloads: Region,
    /// Two iovecs per entry (header, payload), read by REGISTER.
    iovecs: Region,
    /// The eventfd's 8-byte read buffer.
    efd_buf: Region,
    /// Replies written into their entries, waiting for the queue thread to commit them.
    pending: Mutex<Vec<(u32, u64)>>,
    efd: OwnedFd,
}

impl Queue {
    fn new(qid: u16, max_depth: u32) -> Result<Queue, String> {
        let n = max_depth as usize;
        let headers = Region::new(n * HEADER_STRIDE)?;
        let payloads = Region::new(n * PAYLOAD_SZ)?;
        let iovecs = Region::new(2 * n * std::mem::size_of::<libc::iovec>())?;
        let efd_buf = Region::new(4096)?;
        for i in 0..n {
            let pair = [
                libc::iovec {
                    // SAFETY: within the headers mapping (i < max_depth).
                    iov_base: unsafe { headers.ptr.add(i * HEADER_STRIDE) } as *mut _,
                    iov_len: HEADER_SZ,
                },
                libc::iovec {
                    // SAFETY: within the payloads mapping.
                    iov_base: unsafe { payloads.ptr.add(i * PAYLOAD_SZ) } as *mut _,
                    iov_len: PAYLOAD_SZ,
                },
            ];
            // SAFETY: the iovec region holds 2 * max_depth iovecs; it is only written here.
            unsafe {
                let dst = (iovecs.ptr as *mut libc::iovec).add(2 * i);
                std::ptr::copy_nonoverlapping(pair.as_ptr(), dst, 2);
            }
        }
        // SAFETY: eventfd with no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("eventfd: {}", Errno::last()));
        }
        Ok(Queue {
            qid,
            max_depth,
            headers,
            payloads,
            iovecs,
            efd_buf,
            pending: Mutex::new(Vec::new()),
            // SAFETY: a fresh fd we own.
            efd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn header_ptr(&self, idx: u32) -> *mut u8 {
        debug_assert!(idx < self.max_depth);
        // SAFETY: idx < max_depth, so the offset stays inside the mapping.
        unsafe { self.headers.ptr.add(idx as usize * HEADER_STRIDE) }
    }

    fn payload_ptr(&self, idx: u32) -> *mut u8 {
        debug_assert!(idx < self.max_depth);
        // SAFETY: as for header_ptr.
        unsafe { self.payloads.ptr.add(idx as usize * PAYLOAD_SZ) }
    }

    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd.
        let r = unsafe { libc::write(self.efd.as_raw_fd(), &one as *const u64 as *const _, 8) };
        if r < 0 {
            log::warn!("waking ring queue {}: {}", self.qid, Errno::last());
        }
    }
}

/// Finds the ring entry of a request and commits its reply (the channel's [`RingReply`]).
pub struct Router {
    queues: Vec<Arc<Queue>>,
    /// unique → (queue, entry) for every request handed out by a ring and not yet answered.
    routes: Mutex<HashMap<u64, (u16, u32)>>,
}

impl RingReply for Router {
    fn try_send(&self, unique: u64, error: i32, parts: &[&[u8]]) -> bool {
        let route = match self.routes.lock() {
            Ok(mut m) => m.remove(&unique),
            Err(_) => None,
        };
        let Some((qid, idx)) = route else {
            return false;
        };
        let Some(q) = self.queues.get(qid as usize) else {
            return false;
        };
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let (error, total) = if total > PAYLOAD_SZ {
            log::warn!("reply to request {unique} is {total} bytes, more than a ring payload");
            (-Errno::EIO.0, 0)
        } else {
            (error, total)
        };
        let oh = OutHeader {
            len: (16 + total) as u32,
            error,
            unique,
        };
        let eio = EntInOut {
            commit_id: unique,
            payload_sz: if error == 0 { total as u32 } else { 0 },
            ..Default::default()
        };
        let hdr = q.header_ptr(idx);
        let payload = q.payload_ptr(idx);
        // SAFETY: the route was removed under the lock, so this thread alone answers the
        // request and owns the entry's buffers until the commit is submitted; every copy stays
        // within the entry (16 + 32 header bytes, `total` ≤ PAYLOAD_SZ payload bytes).
        unsafe {
            std::ptr::copy_nonoverlapping(oh.as_bytes().as_ptr(), hdr, 16);
            std::ptr::copy_nonoverlapping(eio.as_bytes().as_ptr(), hdr.add(ENT_IN_OUT_OFF), 32);
            if error == 0 {
                let mut off = 0;
                for p in parts {
                    std::ptr::copy_nonoverlapping(p.as_ptr(), payload.add(off), p.len());
                    off += p.len();
                }
            }
        }
        if let Ok(mut p) = q.pending.lock() {
            p.push((idx, unique));
        }
        if ON_QUEUE.with(|c| c.get()) != qid as u32 {
            q.wake();
        }
        true
    }
}

/// Whether this kernel can serve FUSE over io_uring right now; the error says what to do.
pub fn preflight() -> Result<(), String> {
    let v = std::fs::read_to_string(ENABLE_PARAM).map_err(|_| {
        format!(
            "--fuse-uring: this kernel has no FUSE-over-io_uring ({ENABLE_PARAM} is missing; \
             it needs Linux >= 6.14 built with CONFIG_FUSE_IO_URING)"
        )
    })?;
    if !matches!(v.trim(), "Y" | "y" | "1") {
        return Err(format!(
            "--fuse-uring: FUSE-over-io_uring is disabled in this kernel; enable it with \
             `echo Y > {ENABLE_PARAM}` (as root) and start again"
        ));
    }
    if let Ok(d) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        if d.trim() == "2" {
            return Err(
                "--fuse-uring: io_uring is disabled (/proc/sys/kernel/io_uring_disabled = 2)"
                    .to_string(),
            );
        }
    }
    Ok(())
}

/// The kernel's number of queues: one per possible CPU (highest possible CPU + 1).
pub fn possible_cpus() -> Result<usize, String> {
    let path = "/sys/devices/system/cpu/possible";
    let s = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut max = None;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let last = part.rsplit('-').next().unwrap_or(part);
        let n: usize = last
            .parse()
            .map_err(|_| format!("{path}: unexpected {s:?}"))?;
        max = Some(max.map_or(n, |m: usize| m.max(n)));
    }
    max.map(|m| m + 1)
        .ok_or_else(|| format!("{path}: no CPUs in {s:?}"))
}

/// Asks `session` for io_uring at INIT. The receiver gets, once INIT is done, the number of
/// queues registered or why the ring could not be set up (the kernel then keeps serving the
/// connection through `/dev/fuse`). Call before the session runs.
pub fn enable(
    session: &Arc<Session>,
    opts: UringOptions,
) -> Result<mpsc::Receiver<Result<usize, String>>, String> {
    preflight()?;
    let (tx, rx) = mpsc::channel();
    // Weak: the session holds the hook; the hook must not keep the session alive.
    let weak = Arc::downgrade(session);
    session.request_uring(Box::new(move |accepted| {
        let r = if !accepted {
            Err(
                "the kernel did not accept FUSE_OVER_IO_URING at INIT (is enable_uring Y, \
                 and the kernel's protocol >= 7.42?)"
                    .to_string(),
            )
        } else {
            match weak.upgrade() {
                Some(s) => start(&s, opts),
                None => Err("session ended before INIT".to_string()),
            }
        };
        let _ = tx.send(r);
    }));
    Ok(rx)
}

fn start(session: &Arc<Session>, opts: UringOptions) -> Result<usize, String> {
    let n = possible_cpus()?;
    if n > u16::MAX as usize {
        return Err(format!("{n} possible CPUs: too many queues"));
    }
    let max_depth = opts.max_depth.max(opts.depth).max(LOW_WATER + 1);
    let mut queues = Vec::with_capacity(n);
    for qid in 0..n {
        queues.push(Arc::new(Queue::new(qid as u16, max_depth)?));
    }
    let router = Arc::new(Router {
        queues: queues.clone(),
        routes: Mutex::new(HashMap::new()),
    });
    // Before any registration: requests flow as soon as the last queue has an entry.
    session.chan.set_ring(router.clone());
    let (rtx, rrx) = mpsc::channel();
    for q in queues {
        let s = Arc::clone(session);
        let r = Arc::clone(&router);
        let tx = rtx.clone();
        let depth = opts.depth.clamp(1, max_depth);
        std::thread::Builder::new()
            .name(format!("fuse-uring-{}", q.qid))
            .spawn(move || run_queue(s, r, q, depth, tx))
            .map_err(|e| format!("starting a ring queue thread: {e}"))?;
    }
    drop(rtx);
    for _ in 0..n {
        match rrx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a ring queue did not register in 10 s".to_string()),
        }
    }
    log::info!(
        "FUSE over io_uring: {n} queue(s), {} entries each (up to {max_depth})",
        opts.depth
    );
    Ok(n)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed by pointer with its size.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        // An offline CPU: its queue still has to exist for the ring to become ready.
        log::debug!("pinning ring queue thread to CPU {cpu}: {}", Errno::last());
    }
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

fn new_ring(entries: u32) -> std::io::Result<Ring> {
    let cq = entries * 2;
    match IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(cq)
        .build(entries)
    {
        Ok(r) => Ok(r),
        // Older kernels without DEFER_TASKRUN: the plain ring works too.
        Err(_) => IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_cqsize(cq)
            .build(entries),
    }
}

fn cmd_sqe(fuse_fd: i32, op: u32, qid: u16, commit_id: u64, user_data: u64) -> squeue::Entry128 {
    let req = CmdReq {
        commit_id,
        qid,
        ..Default::default()
    };
    let mut cmd = [0u8; 80];
    cmd[..24].copy_from_slice(req.as_bytes());
    opcode::UringCmd80::new(types::Fd(fuse_fd), op)
        .cmd(cmd)
        .build()
        .user_data(user_data)
}

/// Pushes one SQE, submitting first if the queue is full.
fn push(ring: &mut Ring, sqe: &squeue::Entry128) -> std::io::Result<()> {
    loop {
        // SAFETY: every buffer an SQE points to (entry iovecs, the eventfd buffer) lives in the
        // queue's mappings, which outlive the ring (the queue is shared with the router).
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

fn register(ring: &mut Ring, fuse_fd: i32, q: &Queue, from: u32, to: u32) -> std::io::Result<()> {
    for idx in from..to {
        // SAFETY: within the iovec mapping (idx < max_depth).
        let iov = unsafe { (q.iovecs.ptr as *const libc::iovec).add(2 * idx as usize) };
        let req = CmdReq {
            qid: q.qid,
            ..Default::default()
        };
        let mut cmd = [0u8; 80];
        cmd[..24].copy_from_slice(req.as_bytes());
        let sqe = opcode::UringCmd80::new(types::Fd(fuse_fd), CMD_REGISTER)
            .cmd(cmd)
            .addr(Some(iov as u64))
            .build()
            .user_data(idx as u64);
        // The kernel reads the iovec count from `len`.
        let sqe = set_len(sqe, 2);
        push(ring, &sqe)?;
    }
    Ok(())
}

/// Sets the SQE's `len` field (offset 24), which UringCmd80 does not expose.
fn set_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: Entry128 is a repr(C) 128-byte SQE; `len` is the u32 at byte offset 24 of the
    // first 64-byte half (struct io_uring_sqe).
    unsafe {
        let mut sqe = sqe;
        let p = &mut sqe as *mut squeue::Entry128 as *mut u8;
        std::ptr::write_unaligned(p.add(24) as *mut u32, len);
        sqe
    }
}

fn arm_eventfd(ring: &mut Ring, q: &Queue) -> std::io::Result<()> {
    let sqe: squeue::Entry128 = opcode::Read::new(types::Fd(q.efd.as_raw_fd()), q.efd_buf.ptr, 8)
        .build()
        .user_data(EVENTFD_TAG)
        .into();
    push(ring, &sqe)
}

fn run_queue(
    session: Arc<Session>,
    router: Arc<Router>,
    q: Arc<Queue>,
    depth: u32,
    ready: mpsc::Sender<Result<(), String>>,
) {
    let qid = q.qid;
    pin_to_cpu(qid as usize);
    ON_QUEUE.with(|c| c.set(qid as u32));
    let fuse_fd = session.chan.raw_fd();
    let ring_size = (q.max_depth + 8).next_power_of_two();
    let mut ring = match new_ring(ring_size) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(format!("io_uring_setup for queue {qid}: {e}")));
            return;
        }
    };
    let mut registered = depth;
    // Entries registered or committed whose command has not completed yet.
    let mut in_kernel = depth;
    let setup = register(&mut ring, fuse_fd, &q, 0, depth)
        .and_then(|_| arm_eventfd(&mut ring, &q))
        .and_then(|_| ring.submit().map(|_| ()));
    if let Err(e) = setup {
        let _ = ready.send(Err(format!("registering ring queue {qid}: {e}")));
        return;
    }
    // A refused REGISTER completes at once; a good one stays pending until a request comes.
    let mut backlog: Vec<(u64, i32)> = ring
        .completion()
        .map(|c| (c.user_data(), c.result()))
        .collect();
    if let Some((_, res)) = backlog
        .iter()
        .find(|(ud, res)| *ud != EVENTFD_TAG && *res < 0)
    {
        let _ = ready.send(Err(format!(
            "FUSE_IO_URING_CMD_REGISTER on queue {qid}: {}",
            Errno(-res)
        )));
        return;
    }
    let _ = ready.send(Ok(()));
    let mut scratch = vec![0u8; IN_HEADER_SZ + OP_IN_SZ + PAYLOAD_SZ];
    let mut stopping = false;
    // Reused every round (no allocation on the request path).
    let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(ring_size as usize);
    let mut done: Vec<(u32, u64)> = Vec::with_capacity(ring_size as usize);
    loop {
        cqes.clear();
        if backlog.is_empty() {
            cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        } else {
            cqes.append(&mut backlog);
        }
        for &(ud, res) in &cqes {
            if ud == EVENTFD_TAG {
                if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
                    log::debug!("ring queue {qid}: eventfd read: {}", Errno(-res));
                }
                if !stopping {
                    if let Err(e) = arm_eventfd(&mut ring, &q) {
                        log::error!("ring queue {qid}: re-arming the eventfd: {e}");
                    }
                }
                continue;
            }
            in_kernel = in_kernel.saturating_sub(1);
            if res < 0 {
                // ENOTCONN/ECONNABORTED: unmounted or aborted; anything else is logged.
                if !stopping && res != -libc::ENOTCONN && res != -libc::ECONNABORTED {
                    log::warn!("ring queue {qid}: entry {ud}: {}", Errno(-res));
                }
                stopping = true;
                continue;
            }
            handle_entry(&session, &router, &q, ud as u32, &mut scratch);
        }
        // Replies written by this thread or, after a wake-up, by others.
        if let Ok(mut p) = q.pending.lock() {
            std::mem::swap(&mut *p, &mut done);
        }
        for (idx, unique) in done.drain(..) {
            let sqe = cmd_sqe(fuse_fd, CMD_COMMIT_AND_FETCH, qid, unique, idx as u64);
            if let Err(e) = push(&mut ring, &sqe) {
                log::error!("ring queue {qid}: commit of request {unique}: {e}");
                continue;
            }
            in_kernel += 1;
        }
        if !stopping && in_kernel < LOW_WATER && registered < q.max_depth {
            let to = (registered + GROW).min(q.max_depth);
            match register(&mut ring, fuse_fd, &q, registered, to) {
                Ok(()) => {
                    log::debug!("ring queue {qid}: {to} entries ({} in use)", to - in_kernel);
                    in_kernel += to - registered;
                    registered = to;
                }
                Err(e) => log::warn!("ring queue {qid}: adding entries: {e}"),
            }
        }
        if stopping && in_kernel == 0 {
            break;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                log::error!("ring queue {qid}: io_uring_enter: {e}");
                break;
            }
        }
    }
    log::debug!("ring queue {qid} stopped");
}

/// Rebuilds the request in entry `idx` as `read(/dev/fuse)` would give it and dispatches it.
fn handle_entry(session: &Session, router: &Router, q: &Queue, idx: u32, scratch: &mut [u8]) {
    if idx >= q.max_depth {
        log::warn!("ring queue {}: completion for unknown entry {idx}", q.qid);
        return;
    }
    let mut hb = [0u8; HEADER_SZ];
    // SAFETY: the entry's command completed, so the kernel has filled it and will not touch it
    // until we commit; the copy stays inside the entry's header buffer.
    unsafe { std::ptr::copy_nonoverlapping(q.header_ptr(idx), hb.as_mut_ptr(), HEADER_SZ) };
    let Ok((h, _)) = InHeader::read_from_prefix(&hb[..]) else {
        return;
    };
    let Ok((ent, _)) = EntInOut::read_from_prefix(&hb[ENT_IN_OUT_OFF..]) else {
        return;
    };
    session.chan.ring_requests.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut m) = router.routes.lock() {
        m.insert(h.unique, (q.qid, idx));
    }
    let payload = ent.payload_sz as usize;
    // The kernel sets `len` to the header plus every argument; the first argument is in op_in.
    let op_len = (h.len as usize).checked_sub(IN_HEADER_SZ + payload);
    let op_len = match op_len {
        Some(n) if n <= OP_IN_SZ && payload <= PAYLOAD_SZ => n,
        _ => {
            log::warn!(
                "ring request {} (opcode {}): len {} does not fit payload {}",
                h.unique,
                h.opcode,
                h.len,
                payload
            );
            session.chan.send(h.unique, -Errno::EINVAL.0, &[]);
            return;
        }
    };
    let total = IN_HEADER_SZ + op_len + payload;
    scratch[..IN_HEADER_SZ].copy_from_slice(&hb[..IN_HEADER_SZ]);
    scratch[IN_HEADER_SZ..IN_HEADER_SZ + op_len]
        .copy_from_slice(&hb[IN_OUT_SZ..IN_OUT_SZ + op_len]);
    // SAFETY: as above, for the payload buffer; `payload` ≤ PAYLOAD_SZ was checked and the
    // scratch buffer holds header + op_in + PAYLOAD_SZ.
    unsafe {
        std::ptr::copy_nonoverlapping(
            q.payload_ptr(idx),
            scratch[IN_HEADER_SZ + op_len..].as_mut_ptr(),
            payload,
        )
    };
    session.dispatch(&scratch[..total]);
    if h.opcode == FUSE_FORGET || h.opcode == FUSE_BATCH_FORGET {
        // No reply is due, but the entry must go back to the kernel.
        session.chan.send(h.unique, 0, &[]);
    }
}
