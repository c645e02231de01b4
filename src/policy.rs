//! Access policy, quotas and bounds: what the daemon (running as root) enforces on untrusted
//! clients before their requests reach the device.
//!
//! [`PolicyDevice`] wraps any [`Device`]: it checks the opener against the allowed users and
//! groups (EACCES, as a permission check on the device node would), limits live kfd contexts
//! per uid (ENOSPC, what KFD answers when it runs out of PASIDs), keeps per-context quotas of
//! VRAM+GTT bytes (ENOMEM, as amdgpu's memory-limit check), queues and events (ENOSPC, as
//! KFD's per-device queue limit and full event slots), refuses operations aimed at other
//! processes (CRIU_OP, the debugger, cross-memory copy) and bounds every count a device would
//! loop over. The ledger of a context is kept from the device's own answers (an ALLOC that
//! succeeded is charged its page-aligned size; a FREE that succeeded returns it), so the wrapped
//! device needs no knowledge of quotas. See SECURITY.md for the table of guarantees and tests.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::abi::table::ioc_size;
use crate::abi::{
    KfdIoctlAllocMemoryOfGpuArgs, KfdIoctlCreateEventArgs, KfdIoctlCreateQueueArgs,
    KfdIoctlDestroyEventArgs, KfdIoctlDestroyQueueArgs, KfdIoctlFreeMemoryOfGpuArgs,
    KFD_IOC_ALLOC_MEM_FLAGS_GTT, KFD_IOC_ALLOC_MEM_FLAGS_VRAM, KFD_NR_ALLOC_MEMORY_OF_GPU,
    KFD_NR_CREATE_EVENT, KFD_NR_CREATE_PROCESS, KFD_NR_CREATE_QUEUE, KFD_NR_CRIU_OP,
    KFD_NR_CROSS_MEMORY_COPY, KFD_NR_DBG_TRAP, KFD_NR_DBG_TRAP_DEPRECATED, KFD_NR_DESTROY_EVENT,
    KFD_NR_DESTROY_QUEUE, KFD_NR_FREE_MEMORY_OF_GPU, KFD_NR_MAP_MEMORY_TO_GPU, KFD_NR_SVM,
    KFD_NR_UNMAP_MEMORY_FROM_GPU, KFD_NR_WAIT_EVENTS, KFD_SIGNAL_EVENT_LIMIT,
};
use crate::device::{
    Caller, Device, DeviceContext, Done, DoneSink, Env, FileKind, IoctlCall, IoctlResult,
    ProcessMemory,
};
use crate::errno::Errno;

/// Per-context limits; `None` is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quotas {
    /// VRAM + GTT bytes (page-aligned sizes of live buffers).
    pub mem_bytes: Option<u64>,
    /// Live user queues.
    pub queues: Option<u32>,
    /// Live events.
    pub events: Option<u32>,
}

impl Quotas {
    pub fn is_unlimited(&self) -> bool {
        *self == Quotas::default()
    }
}

/// Who may open the device and how much one context may hold.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Users allowed to open (by uid); `None` with `allow_groups` also `None`: everyone.
    pub allow_users: Option<Vec<u32>>,
    /// Groups whose members may open (primary or supplementary group).
    pub allow_groups: Option<Vec<u32>>,
    pub quotas: Quotas,
    /// Live kfd contexts one uid may hold.
    pub max_contexts_per_uid: Option<u32>,
}

/// Errno for an open refused by the allow lists (what `inode_permission` answers).
pub const DENIED_OPEN: Errno = Errno::EACCES;
/// Errno for VRAM+GTT beyond the quota (amdgpu_amdkfd_reserve_mem_limit).
pub const OVER_MEM_QUOTA: Errno = Errno::ENOMEM;
/// Errno for queues, events or contexts beyond their limit (KFD's max_queues check, full signal
/// event slots, PASID exhaustion in create_process all answer ENOSPC).
pub const OVER_COUNT_QUOTA: Errno = Errno::ENOSPC;
/// Errno for an operation naming another process (KFD's debugger: "not PTRACED").
pub const OTHER_PROCESS: Errno = Errno::EPERM;
/// Errno for CRIU_OP without CAP_CHECKPOINT_RESTORE / CAP_SYS_ADMIN (KFD_IOC_FLAG_CHECKPOINT_RESTORE).
pub const NO_CHECKPOINT_CAP: Errno = Errno::EACCES;

/// Largest SVM attribute count: what fits in the command's 14-bit size field after the
/// 24-byte header (the kernel copies no more than `_IOC_SIZE`).
pub const MAX_SVM_ATTRS: u64 = ((1 << 14) - 24) / 8;

impl Policy {
    /// True when the policy restricts nothing (the daemon then does not wrap its device).
    pub fn is_open(&self) -> bool {
        self.allow_users.is_none()
            && self.allow_groups.is_none()
            && self.quotas.is_unlimited()
            && self.max_contexts_per_uid.is_none()
    }

    /// May `caller` open the device? Root always may (as CAP_DAC_OVERRIDE on a device node).
    pub fn check_open(&self, caller: &Caller) -> Result<(), Errno> {
        if self.allow_users.is_none() && self.allow_groups.is_none() {
            return Ok(());
        }
        if caller.uid == 0 {
            return Ok(());
        }
        if self
            .allow_users
            .as_ref()
            .is_some_and(|u| u.contains(&caller.uid))
        {
            return Ok(());
        }
        if let Some(groups) = &self.allow_groups {
            if groups.contains(&caller.gid)
                || process_groups(caller.pid)
                    .iter()
                    .any(|g| groups.contains(g))
            {
                return Ok(());
            }
        }
        log::warn!(
            "policy: uid {} gid {} (pid {}) may not open the device: EACCES",
            caller.uid,
            caller.gid,
            caller.tgid
        );
        Err(DENIED_OPEN)
    }
}

/// Supplementary groups of `pid` (`Groups:` of /proc/<pid>/status); empty when unreadable.
pub fn process_groups(pid: u32) -> Vec<u32> {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Effective capability set of `pid` (`CapEff:`); 0 when unreadable.
pub fn process_caps(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// Parses `--allow-users`/`--allow-groups`: comma-separated numeric ids or names.
pub fn parse_ids(list: &str, groups: bool) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Ok(n) = item.parse::<u32>() {
            out.push(n);
            continue;
        }
        let id = if groups {
            lookup_group(item)
        } else {
            lookup_user(item)
        };
        out.push(id.ok_or_else(|| {
            format!("unknown {} `{item}`", if groups { "group" } else { "user" })
        })?);
    }
    if out.is_empty() {
        return Err("an empty list allows nobody but root; give at least one id".into());
    }
    Ok(out)
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024): `512M`, `4G`, `4096`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("`{s}`: unknown suffix {c} (K, M, G, T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = num.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` overflows 64 bits"))
}

fn lookup_user(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: called at start-up from the main thread; the result is read before any other
    // getpw* call could overwrite the static buffer.
    let p = unsafe { libc::getpwnam(c.as_ptr()) };
    // SAFETY: non-null getpwnam results point at a valid passwd entry.
    (!p.is_null()).then(|| unsafe { (*p).pw_uid })
}

fn lookup_group(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: as in lookup_user, for the group database.
    let p = unsafe { libc::getgrnam(c.as_ptr()) };
    // SAFETY: non-null getgrnam results point at a valid group entry.
    (!p.is_null()).then(|| unsafe { (*p).gr_gid })
}

/// Counters for the stats file.
#[derive(Default)]
struct PolicyStats {
    denied_opens: AtomicU64,
    context_limit_rejects: AtomicU64,
    quota_rejects: AtomicU64,
    bound_rejects: AtomicU64,
    other_process_rejects: AtomicU64,
}

struct PolicyState {
    policy: Policy,
    gpu_count: u32,
    per_uid: Mutex<HashMap<u32, u32>>,
    stats: PolicyStats,
}

/// A device with the policy in front of it.
pub struct PolicyDevice {
    inner: Arc<dyn Device>,
    st: Arc<PolicyState>,
}

/// Wraps `device` in `policy` (returns `device` itself when the policy restricts nothing).
pub fn wrap(device: Arc<dyn Device>, policy: Policy) -> Arc<dyn Device> {
    if policy.is_open() {
        return device;
    }
    Arc::new(PolicyDevice::new(device, policy))
}

impl PolicyDevice {
    pub fn new(inner: Arc<dyn Device>, policy: Policy) -> PolicyDevice {
        let gpu_count = inner.gpu_count();
        PolicyDevice {
            inner,
            st: Arc::new(PolicyState {
                policy,
                gpu_count,
                per_uid: Mutex::default(),
                stats: PolicyStats::default(),
            }),
        }
    }

    /// Live kfd contexts of `uid`.
    pub fn contexts_of(&self, uid: u32) -> u32 {
        self.st
            .per_uid
            .lock()
            .map(|m| m.get(&uid).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Device for PolicyDevice {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn answers_in_place(&self) -> bool {
        self.inner.answers_in_place()
    }
    fn gpu_count(&self) -> u32 {
        self.inner.gpu_count()
    }
    fn render_minor(&self, index: u32) -> u32 {
        self.inner.render_minor(index)
    }

    fn open(&self, caller: &Caller, kind: FileKind) -> Result<Box<dyn DeviceContext>, Errno> {
        if let Err(e) = self.st.policy.check_open(caller) {
            self.st.stats.denied_opens.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let counted = kind == FileKind::Kfd;
        if counted {
            let mut m = self.st.per_uid.lock().map_err(|_| Errno::EIO)?;
            let n = m.entry(caller.uid).or_insert(0);
            if self
                .st
                .policy
                .max_contexts_per_uid
                .is_some_and(|max| *n >= max)
            {
                self.st
                    .stats
                    .context_limit_rejects
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "policy: uid {} already holds {} kfd contexts: ENOSPC",
                    caller.uid,
                    *n
                );
                return Err(OVER_COUNT_QUOTA);
            }
            *n += 1;
        }
        let ctx = match self.inner.open(caller, kind) {
            Ok(c) => c,
            Err(e) => {
                if counted {
                    uncount(&self.st, caller.uid);
                }
                return Err(e);
            }
        };
        Ok(Box::new(PolicyCtx {
            inner: ctx,
            st: self.st.clone(),
            uid: caller.uid,
            counted,
            released: AtomicBool::new(false),
            ledger: Arc::new(Mutex::new(Ledger::default())),
        }))
    }

    fn process_memory(&self, tgid: u32) -> Result<Arc<dyn ProcessMemory>, Errno> {
        self.inner.process_memory(tgid)
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.inner.stats();
        let s = &self.st.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        v.push(("policy_denied_opens", l(&s.denied_opens)));
        v.push(("policy_context_limit_rejects", l(&s.context_limit_rejects)));
        v.push(("policy_quota_rejects", l(&s.quota_rejects)));
        v.push(("policy_bound_rejects", l(&s.bound_rejects)));
        v.push(("policy_other_process_rejects", l(&s.other_process_rejects)));
        v
    }
}

fn uncount(st: &PolicyState, uid: u32) {
    if let Ok(mut m) = st.per_uid.lock() {
        if let Some(n) = m.get_mut(&uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&uid);
            }
        }
    }
}

/// What one context holds, from the device's successful answers, plus reservations of calls
/// in flight (so that two concurrent ALLOCs cannot both pass the check).
#[derive(Default, Debug)]
struct Ledger {
    bos: HashMap<u64, u64>,
    mem: u64,
    mem_pending: u64,
    queues: HashSet<u32>,
    queues_pending: u32,
    events: HashSet<u32>,
    events_pending: u32,
}

struct PolicyCtx {
    inner: Box<dyn DeviceContext>,
    st: Arc<PolicyState>,
    uid: u32,
    counted: bool,
    released: AtomicBool,
    ledger: Arc<Mutex<Ledger>>,
}

/// What a completion must settle in the ledger.
#[derive(Clone, Copy, Debug)]
enum Track {
    Alloc { reserved: u64 },
    Free { handle: u64 },
    CreateQueue { reserved: bool },
    DestroyQueue { id: u32 },
    CreateEvent { reserved: bool },
    DestroyEvent { id: u32 },
    Reset,
}

struct TrackSink {
    done: Option<Done>,
    ledger: Arc<Mutex<Ledger>>,
    track: Track,
}

impl DoneSink for TrackSink {
    fn complete(mut self: Box<Self>, call: IoctlCall, result: IoctlResult) {
        {
            let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
            settle(&mut l, self.track, &call, result.is_ok());
        }
        if let Some(d) = self.done.take() {
            d.complete(call, result);
        }
    }
    fn on_interrupt(&mut self, cancel: Box<dyn FnOnce() + Send>) -> bool {
        match self.done.as_mut() {
            Some(d) => d.on_interrupt(cancel),
            None => false,
        }
    }
}

fn settle(l: &mut Ledger, track: Track, call: &IoctlCall, ok: bool) {
    match track {
        Track::Alloc { reserved } => {
            l.mem_pending = l.mem_pending.saturating_sub(reserved);
            if ok {
                let a: KfdIoctlAllocMemoryOfGpuArgs = call.args();
                if l.bos.insert(a.handle, reserved).is_none() {
                    l.mem += reserved;
                }
            }
        }
        Track::Free { handle } => {
            if ok {
                if let Some(n) = l.bos.remove(&handle) {
                    l.mem = l.mem.saturating_sub(n);
                }
            }
        }
        Track::CreateQueue { reserved } => {
            if reserved {
                l.queues_pending = l.queues_pending.saturating_sub(1);
            }
            if ok {
                let a: KfdIoctlCreateQueueArgs = call.args();
                l.queues.insert(a.queue_id);
            }
        }
        Track::DestroyQueue { id } => {
            if ok {
                l.queues.remove(&id);
            }
        }
        Track::CreateEvent { reserved } => {
            if reserved {
                l.events_pending = l.events_pending.saturating_sub(1);
            }
            if ok {
                let a: KfdIoctlCreateEventArgs = call.args();
                l.events.insert(a.event_id);
            }
        }
        Track::DestroyEvent { id } => {
            if ok {
                l.events.remove(&id);
            }
        }
        Track::Reset => {
            if ok {
                l.bos.clear();
                l.mem = 0;
                l.queues.clear();
                l.events.clear();
            }
        }
    }
}

/// Bytes an ALLOC charges against the memory quota: page-aligned VRAM/GTT sizes, 0 otherwise.
fn charged_bytes(a: &KfdIoctlAllocMemoryOfGpuArgs) -> u64 {
    if a.flags & (KFD_IOC_ALLOC_MEM_FLAGS_VRAM | KFD_IOC_ALLOC_MEM_FLAGS_GTT) == 0 {
        return 0;
    }
    a.size
        .checked_add(4095)
        .map(|s| s & !4095)
        .unwrap_or(u64::MAX)
}

/// Refuses counts no device should loop over: n_devices beyond the GPUs present, more events
/// than a process can have, SVM attributes beyond what the command carries.
pub fn check_bounds(call: &IoctlCall, gpu_count: u32) -> Result<(), Errno> {
    let Some(sd) = call.variant.arg else {
        return Ok(());
    };
    let field = |n: &str| sd.get(&call.arg, n).unwrap_or(0);
    match call.def.nr {
        // MAP/UNMAP_MEMORY_TO_GPU: one id per GPU at most.
        KFD_NR_MAP_MEMORY_TO_GPU | KFD_NR_UNMAP_MEMORY_FROM_GPU
            if field("n_devices") > gpu_count as u64 =>
        {
            log::debug!(
                "policy: n_devices {} > {gpu_count} GPUs: EINVAL",
                field("n_devices")
            );
            Err(Errno::EINVAL)
        }
        // WAIT_EVENTS: a process has at most KFD_SIGNAL_EVENT_LIMIT signal events.
        KFD_NR_WAIT_EVENTS if field("num_events") > KFD_SIGNAL_EVENT_LIMIT as u64 => {
            log::debug!(
                "policy: num_events {} > {KFD_SIGNAL_EVENT_LIMIT}: EINVAL",
                field("num_events")
            );
            Err(Errno::EINVAL)
        }
        // SVM: the attributes trail the header inside the command's size.
        KFD_NR_SVM => {
            let carried = (ioc_size(call.cmd) as u64).saturating_sub(sd.size as u64) / 8;
            let n = field("nattr");
            if n > carried || n > MAX_SVM_ATTRS {
                log::debug!("policy: SVM nattr {n} but the command carries {carried}: EINVAL");
                return Err(Errno::EINVAL);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Refuses operations aimed at a process other than the caller's.
pub fn check_other_process(call: &IoctlCall) -> Result<(), Errno> {
    let Some(sd) = call.variant.arg else {
        return Ok(());
    };
    let nr = call.def.nr;
    // CRIU_OP, DBG_TRAP, DBG_TRAP_DEPRECATED, CROSS_MEMORY_COPY name a target pid.
    if !matches!(
        nr,
        KFD_NR_CRIU_OP | KFD_NR_DBG_TRAP | KFD_NR_DBG_TRAP_DEPRECATED | KFD_NR_CROSS_MEMORY_COPY
    ) {
        return Ok(());
    }
    if nr == KFD_NR_CRIU_OP {
        let caps = process_caps(call.caller.pid);
        let has = |c: u32| caps & (1u64 << c) != 0;
        if !has(CAP_CHECKPOINT_RESTORE) && !has(CAP_SYS_ADMIN) {
            log::info!(
                "policy: CRIU_OP by pid {} without CAP_CHECKPOINT_RESTORE: EACCES",
                call.caller.tgid
            );
            return Err(NO_CHECKPOINT_CAP);
        }
    }
    let pid = sd.get(&call.arg, "pid").unwrap_or(0) as u32;
    if pid != 0 && pid != call.caller.tgid && pid != call.caller.pid {
        log::warn!(
            "policy: {} by pid {} names pid {pid}: EPERM",
            call.def.name,
            call.caller.tgid
        );
        return Err(OTHER_PROCESS);
    }
    Ok(())
}

impl PolicyCtx {
    /// The checks and reservations before the device sees `call`; `Ok(None)`: nothing to track.
    fn admit(&self, call: &IoctlCall) -> Result<Option<Track>, Errno> {
        let st = &self.st;
        check_bounds(call, st.gpu_count).inspect_err(|_| {
            st.stats.bound_rejects.fetch_add(1, Ordering::Relaxed);
        })?;
        check_other_process(call).inspect_err(|_| {
            st.stats
                .other_process_rejects
                .fetch_add(1, Ordering::Relaxed);
        })?;
        let q = &st.policy.quotas;
        if q.is_unlimited() || self.counted.then_some(()).is_none() {
            return Ok(None);
        }
        let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let over = || {
            st.stats.quota_rejects.fetch_add(1, Ordering::Relaxed);
        };
        // A count quota (queues, events): refuse at the limit, else reserve one until the device
        // answers.
        let reserve = |max: Option<u32>, held: usize, pending: &mut u32, what: &str| {
            if max.is_some_and(|max| held as u64 + *pending as u64 >= max as u64) {
                over();
                log::info!("policy: {what} quota reached: ENOSPC");
                return Err(OVER_COUNT_QUOTA);
            }
            *pending += 1;
            Ok(())
        };
        Ok(Some(match call.def.nr {
            KFD_NR_ALLOC_MEMORY_OF_GPU => {
                let a: KfdIoctlAllocMemoryOfGpuArgs = call.args();
                let n = charged_bytes(&a);
                if let Some(max) = q.mem_bytes {
                    let used = l.mem.saturating_add(l.mem_pending);
                    if n > 0 && used.saturating_add(n) > max {
                        over();
                        log::info!(
                            "policy: context holds {used} of {max} bytes; {n} more refused: ENOMEM"
                        );
                        return Err(OVER_MEM_QUOTA);
                    }
                }
                l.mem_pending = l.mem_pending.saturating_add(n);
                Track::Alloc { reserved: n }
            }
            KFD_NR_FREE_MEMORY_OF_GPU => Track::Free {
                handle: call.args::<KfdIoctlFreeMemoryOfGpuArgs>().handle,
            },
            KFD_NR_CREATE_QUEUE => {
                let held = l.queues.len();
                reserve(q.queues, held, &mut l.queues_pending, "queue")?;
                Track::CreateQueue { reserved: true }
            }
            KFD_NR_DESTROY_QUEUE => Track::DestroyQueue {
                id: call.args::<KfdIoctlDestroyQueueArgs>().queue_id,
            },
            KFD_NR_CREATE_EVENT => {
                let held = l.events.len();
                reserve(q.events, held, &mut l.events_pending, "event")?;
                Track::CreateEvent { reserved: true }
            }
            KFD_NR_DESTROY_EVENT => Track::DestroyEvent {
                id: call.args::<KfdIoctlDestroyEventArgs>().event_id,
            },
            KFD_NR_CREATE_PROCESS => Track::Reset,
            _ => return Ok(None),
        }))
    }
}

impl DeviceContext for PolicyCtx {
    fn ioctl(&self, env: &dyn Env, call: IoctlCall, done: Done) {
        match self.admit(&call) {
            Err(e) => done.complete(call, Err(e)),
            Ok(None) => self.inner.ioctl(env, call, done),
            Ok(Some(track)) => {
                let sink = TrackSink {
                    done: Some(done),
                    ledger: self.ledger.clone(),
                    track,
                };
                self.inner.ioctl(env, call, Done::new(Box::new(sink)))
            }
        }
    }

    fn release(&self) {
        self.inner.release();
        if !self.released.swap(true, Ordering::AcqRel) && self.counted {
            uncount(&self.st, self.uid);
        }
    }
}

impl Drop for PolicyCtx {
    fn drop(&mut self) {
        // A context dropped without RELEASE still gives its slot back (the device frees itself).
        if !self.released.swap(true, Ordering::AcqRel) && self.counted {
            uncount(&self.st, self.uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gid: u32) -> Caller {
        Caller {
            pid: std::process::id(),
            tgid: std::process::id(),
            uid,
            gid,
        }
    }

    #[test]
    fn allow_lists() {
        let p = Policy {
            allow_users: Some(vec![1000]),
            allow_groups: Some(vec![44]),
            ..Default::default()
        };
        assert_eq!(p.check_open(&caller(1000, 1000)), Ok(()));
        assert_eq!(p.check_open(&caller(1001, 44)), Ok(()));
        assert_eq!(
            p.check_open(&caller(0, 0)),
            Ok(()),
            "root passes as with CAP_DAC_OVERRIDE"
        );
        assert_eq!(
            p.check_open(&caller(1001, 1001)).map(|_| ()),
            Err(Errno::EACCES).or_else(|e| {
                // Our own supplementary groups might include 44; then the open is allowed.
                if process_groups(std::process::id()).contains(&44) {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        );
        assert!(Policy::default().is_open());
        assert_eq!(Policy::default().check_open(&caller(12345, 12345)), Ok(()));
    }

    #[test]
    fn parse_id_lists() {
        assert_eq!(parse_ids("0, 1000,65534", false), Ok(vec![0, 1000, 65534]));
        assert_eq!(parse_ids("root", false), Ok(vec![0]));
        assert_eq!(parse_ids("root", true), Ok(vec![0]));
        assert!(parse_ids("no-such-user-kfdmux", false).is_err());
        assert!(parse_ids(" , ", false).is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("64M"), Ok(64 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("12Q").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn charged_bytes_page_aligned_vram_gtt_only() {
        let mut a: KfdIoctlAllocMemoryOfGpuArgs = zerocopy::FromZeros::new_zeroed();
        a.size = 1;
        a.flags = KFD_IOC_ALLOC_MEM_FLAGS_VRAM;
        assert_eq!(charged_bytes(&a), 4096);
        a.flags = KFD_IOC_ALLOC_MEM_FLAGS_GTT;
        a.size = u64::MAX;
        assert_eq!(charged_bytes(&a), u64::MAX);
        a.flags = crate::abi::KFD_IOC_ALLOC_MEM_FLAGS_USERPTR;
        assert_eq!(charged_bytes(&a), 0);
    }
}
