//! KFD events (kfd_events.c semantics): signal events with slots in an events page, other
//! event types with ids in the upper half of the id space, auto/manual reset, event age, and
//! `WAIT_EVENTS` with any/all and timeouts.
//!
//! A wait that cannot be answered at once is *parked*: the call and its `Done` sit in the
//! context's waiter table and whoever removes the waiter from the table answers it exactly once
//! — SET_EVENT (complete), the device's timer thread (timeout), the interrupt canceller (EINTR),
//! DESTROY_EVENT (EIO, wait_result FAIL) or release (EINTR).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::abi::*;
use crate::device::{Done, Env, IoctlCall, IoctlResult};
use crate::errno::Errno;

use super::kfd::{BoKind, Completion, Cx, IdAlloc, KfdInner};
use super::timer::TimerKey;

/// The value of a slot nobody has signalled.
pub const UNSIGNALED_EVENT_SLOT: u64 = u64::MAX;
/// Slots of a full events page (and the page size / 8).
pub const SIGNAL_EVENT_LIMIT: u64 = KFD_SIGNAL_EVENT_LIMIT as u64;
/// Non-signal events use the upper half of the id space.
pub const FIRST_NONSIGNAL_EVENT_ID: u32 = (i32::MAX as u32 >> 1) + 1;
const LAST_NONSIGNAL_EVENT_ID: u32 = i32::MAX as u32;
/// `timeout` value meaning "forever".
pub const TIMEOUT_INFINITE: u32 = 0xFFFF_FFFF;
/// Size of the union at the start of `kfd_event_data`.
const EVENT_DATA_UNION: usize = 32;

#[derive(Debug)]
pub(crate) struct Event {
    pub ty: u32,
    pub auto_reset: bool,
    pub signaled: bool,
    /// Starts at 1, bumped by every set; 0 is reserved for "age not used".
    pub age: u64,
    /// memory_exception_data / hw_exception_data handed to waiters of MEMORY / HW_EXCEPTION
    /// events; None is all zeroes. Boxed: a wait reads the other fields of every event named,
    /// which then share fewer cache lines.
    pub data: Option<Box<[u8; EVENT_DATA_UNION]>>,
}

impl Event {
    fn is_signal_type(&self) -> bool {
        self.ty == KFD_IOC_EVENT_SIGNAL || self.ty == KFD_IOC_EVENT_DEBUG_EVENT
    }
}

/// The events page: a GTT/VRAM buffer of the context (dGPU) or a range the sim allocated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignalPage {
    pub off: u64,
    pub size: u64,
    /// The buffer handle when user space supplied the page.
    pub handle: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Item {
    id: u32,
    activated: bool,
    /// On the event's wait queue (not activated when the wait began).
    queued: bool,
    age_enabled: bool,
    /// Its entry is written when it completes activated: a MEMORY or HW_EXCEPTION event, or a
    /// SIGNAL event waited on with an age (an event's type never changes).
    copies_out: bool,
}

struct Waiter {
    items: Vec<Item>,
    all: bool,
    /// The parked call; `None` while the waiter is being parked (its canceller registered).
    slot: Option<(IoctlCall, Done)>,
    /// An outcome decided while `slot` was still `None`.
    pending: Option<Outcome>,
    timer: Option<TimerKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Complete,
    Timeout,
    /// An event waited on was destroyed.
    Failed,
    Interrupted,
}

/// Events by id, indexed directly: signal-type ids (`0..SIGNAL_EVENT_LIMIT`) index `signal`,
/// the others (`FIRST_NONSIGNAL_EVENT_ID + k`) index `other` by `k`. Both id allocators hand out
/// the lowest free id (as the kernel's IDR does), so each table is only as long as its highest
/// live id; WAIT_EVENTS looks up every event of every call, which a hashed map made a visible
/// part of its cost.
#[derive(Default)]
pub(crate) struct EventTable {
    signal: Vec<Option<Event>>,
    other: Vec<Option<Event>>,
    len: usize,
}

impl EventTable {
    /// The table and index an id lives at (`None` for ids no event can have).
    fn place(&self, id: u32) -> (bool, usize) {
        match id.checked_sub(FIRST_NONSIGNAL_EVENT_ID) {
            Some(k) => (true, k as usize),
            None => (false, id as usize),
        }
    }

    pub fn get(&self, id: u32) -> Option<&Event> {
        let (hi, i) = self.place(id);
        let t = if hi { &self.other } else { &self.signal };
        t.get(i)?.as_ref()
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut Event> {
        let (hi, i) = self.place(id);
        let t = if hi {
            &mut self.other
        } else {
            &mut self.signal
        };
        t.get_mut(i)?.as_mut()
    }

    /// Stores `ev` under `id` (an id its allocator just handed out); returns an event the id
    /// still held, which would be a bookkeeping bug.
    pub fn insert(&mut self, id: u32, ev: Event) -> Option<Event> {
        let (hi, i) = self.place(id);
        let t = if hi {
            &mut self.other
        } else {
            &mut self.signal
        };
        if t.len() <= i {
            t.resize_with(i + 1, || None);
        }
        let old = t[i].replace(ev);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub fn remove(&mut self, id: u32) -> Option<Event> {
        let (hi, i) = self.place(id);
        let t = if hi {
            &mut self.other
        } else {
            &mut self.signal
        };
        let ev = t.get_mut(i)?.take()?;
        self.len -= 1;
        // Keep the table as long as the highest live id; give memory back once it is mostly
        // empty (a context that once had thousands of events).
        while t.last().is_some_and(|e| e.is_none()) {
            t.pop();
        }
        if t.capacity() > 64 && t.capacity() > 4 * t.len() {
            t.shrink_to_fit();
        }
        Some(ev)
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

#[derive(Default)]
pub(crate) struct EventState {
    events: EventTable,
    page: Option<SignalPage>,
    /// The events page the sim allocated itself (freed with the context).
    owned_page: Option<SignalPage>,
    signal_count: u64,
    signal_ids: IdAlloc,
    other_ids: IdAlloc,
    waiters: HashMap<u64, Waiter>,
    /// The item list of the last wait answered at once, reused by the next one (one allocation
    /// less per WAIT_EVENTS); only kept while small.
    scratch: Vec<Item>,
}

/// The largest item list [`EventState::scratch`] keeps (4 KiB).
const SCRATCH_ITEMS: usize = 256;

impl EventState {
    /// The handle of the buffer holding the events page (it may not be freed).
    pub fn signal_handle(&self) -> Option<u64> {
        self.page.and_then(|p| p.handle)
    }
}

fn write_slot(cx: &Cx, page: &SignalPage, id: u32, v: u64) {
    if let Err(e) = cx
        .inner
        .mem
        .write_at(page.off + 8 * id as u64, &v.to_le_bytes())
    {
        log::warn!("sim kfd: writing event slot {id}: {e}");
    }
}

/// Fills the first `len` bytes of a page with "unsignaled".
fn init_page(cx: &Cx, off: u64, len: u64) {
    let buf = vec![0xFFu8; len as usize];
    if let Err(e) = cx.inner.mem.write_at(off, &buf) {
        log::warn!("sim kfd: initializing the events page: {e}");
    }
}

/// `kfd_kmap_event_page`: the buffer `handle` becomes the events page.
fn set_event_page(cx: &mut Cx, handle: u64) -> Result<(), Errno> {
    if cx.st.ev.page.is_some() {
        log::debug!("sim kfd: event page is already set: EINVAL");
        return Err(Errno::EINVAL);
    }
    let gi = cx.pdd_index((handle >> 32) as u32)?;
    cx.bound(gi)?;
    let bo = cx.st.bos.get(&handle).ok_or(Errno::EINVAL)?;
    let (Some(off), BoKind::Vram | BoKind::Gtt) = (bo.mem_off, bo.kind) else {
        log::debug!("sim kfd: buffer {handle:#x} cannot be the events page: EINVAL");
        return Err(Errno::EINVAL);
    };
    let page = SignalPage {
        off,
        size: bo.size,
        handle: Some(handle),
    };
    init_page(cx, off, page.size.min(SIGNAL_EVENT_LIMIT * 8));
    cx.st.ev.page = Some(page);
    Ok(())
}

pub(crate) fn create_event(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let mut a: KfdIoctlCreateEventArgs = call.args();
    if a.event_page_offset != 0 {
        set_event_page(cx, a.event_page_offset)?;
    }
    a.event_page_offset = 0;
    let ev = Event {
        ty: a.event_type,
        auto_reset: a.auto_reset != 0,
        signaled: false,
        age: 1,
        data: None,
    };
    let id = if ev.is_signal_type() {
        let page = match cx.st.ev.page {
            Some(p) => p,
            None => {
                // No page from user space (APU style): the sim provides one in the memfd.
                let size = SIGNAL_EVENT_LIMIT * 8;
                let off = cx.inner.mem.alloc(size)?;
                init_page(cx, off, size);
                let p = SignalPage {
                    off,
                    size,
                    handle: None,
                };
                cx.st.ev.page = Some(p);
                cx.st.ev.owned_page = Some(p);
                p
            }
        };
        let limit = (page.size / 8).min(SIGNAL_EVENT_LIMIT);
        if cx.st.ev.signal_count >= limit {
            log::debug!("sim kfd: signal event limit ({limit}) reached: ENOSPC");
            return Err(Errno::ENOSPC);
        }
        let id = cx
            .st
            .ev
            .signal_ids
            .alloc(limit as u32)
            .ok_or(Errno::ENOSPC)?;
        write_slot(cx, &page, id, UNSIGNALED_EVENT_SLOT);
        cx.st.ev.signal_count += 1;
        a.event_page_offset = page.off;
        a.event_slot_index = id;
        id
    } else {
        let span = LAST_NONSIGNAL_EVENT_ID - FIRST_NONSIGNAL_EVENT_ID + 1;
        FIRST_NONSIGNAL_EVENT_ID + cx.st.ev.other_ids.alloc(span).ok_or(Errno::ENOSPC)?
    };
    if cx.st.ev.events.insert(id, ev).is_some() {
        log::warn!("sim kfd: event id {id} was handed out while still in use");
    }
    cx.shared().stats.events.fetch_add(1, Ordering::Relaxed);
    a.event_id = id;
    a.event_trigger_data = id;
    call.set_args(&a);
    Ok(())
}

fn remove_event(cx: &mut Cx, id: u32) -> Option<Event> {
    let ev = cx.st.ev.events.remove(id)?;
    if ev.is_signal_type() {
        cx.st.ev.signal_count = cx.st.ev.signal_count.saturating_sub(1);
        cx.st.ev.signal_ids.free(id);
    } else {
        cx.st.ev.other_ids.free(id - FIRST_NONSIGNAL_EVENT_ID);
    }
    cx.shared().stats.events.fetch_sub(1, Ordering::Relaxed);
    Some(ev)
}

pub(crate) fn destroy_event(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlDestroyEventArgs = call.args();
    remove_event(cx, a.event_id).ok_or(Errno::EINVAL)?;
    // Waiters on a destroyed event fail (wait_result FAIL, EIO).
    let hit: Vec<u64> = cx
        .st
        .ev
        .waiters
        .iter()
        .filter(|(_, w)| w.items.iter().any(|i| i.id == a.event_id))
        .map(|(k, _)| *k)
        .collect();
    for wid in hit {
        resolve(cx, wid, Outcome::Failed);
    }
    Ok(())
}

/// `set_event`: activates the waiters queued on `id` and answers those now satisfied.
pub(crate) fn signal(cx: &mut Cx, id: u32) {
    let queued = cx
        .st
        .ev
        .waiters
        .values()
        .any(|w| w.items.iter().any(|i| i.id == id && i.queued));
    let Some(ev) = cx.st.ev.events.get_mut(id) else {
        return;
    };
    // Auto-reset events stay unsignaled when the set wakes someone.
    ev.signaled = !ev.auto_reset || !queued;
    ev.age = ev.age.wrapping_add(1);
    if ev.age == 0 {
        ev.age = 2;
    }
    let mut ready = Vec::new();
    for (wid, w) in cx.st.ev.waiters.iter_mut() {
        let mut touched = false;
        for it in w.items.iter_mut().filter(|i| i.id == id && i.queued) {
            it.activated = true;
            touched = true;
        }
        if touched && satisfied(&w.items, w.all) {
            ready.push(*wid);
        }
    }
    for wid in ready {
        resolve(cx, wid, Outcome::Complete);
    }
}

pub(crate) fn set_event(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlSetEventArgs = call.args();
    match cx.st.ev.events.get(a.event_id) {
        // Only signal events can be signalled by the CPU.
        Some(ev) if ev.ty == KFD_IOC_EVENT_SIGNAL => {}
        _ => return Err(Errno::EINVAL),
    }
    signal(cx, a.event_id);
    Ok(())
}

pub(crate) fn reset_event(cx: &mut Cx, call: &mut IoctlCall) -> IoctlResult {
    let a: KfdIoctlResetEventArgs = call.args();
    match cx.st.ev.events.get_mut(a.event_id) {
        Some(ev) if ev.ty == KFD_IOC_EVENT_SIGNAL => {
            ev.signaled = false;
            Ok(())
        }
        _ => Err(Errno::EINVAL),
    }
}

fn satisfied(items: &[Item], all: bool) -> bool {
    if all {
        items.iter().all(|i| i.activated)
    } else {
        items.is_empty() || items.iter().any(|i| i.activated)
    }
}

/// Writes the result of a wait into the call (`copy_signaled_event_data` for COMPLETE).
///
/// The kernel writes into the client's event array only for activated events: the
/// memory-exception data of MEMORY events, the hw-exception data of HW_EXCEPTION events and the
/// age of SIGNAL events waited on with an age; after a timeout or failure it writes nothing.
/// The array is cut after the last entry written (to nothing when none is), so the marshaller
/// copies back no more than that — for the common wait on signal events, nothing at all.
fn finish_wait(cx: &Cx, items: &[Item], call: &mut IoctlCall, outcome: Outcome) -> IoctlResult {
    let mut a: KfdIoctlWaitEventsArgs = call.args();
    let mut written = 0;
    let r = match outcome {
        Outcome::Complete => {
            a.wait_result = KFD_IOC_WAIT_RESULT_COMPLETE;
            let esz = std::mem::size_of::<KfdEventData>();
            let events = &cx.st.ev.events;
            if let Some(buf) = call.array_mut("events_ptr") {
                let writes = |(_, it): &(usize, &Item)| it.activated && it.copies_out;
                for (i, it) in items.iter().enumerate().filter(writes) {
                    let (Some(ev), Some(dst)) =
                        (events.get(it.id), buf.get_mut(i * esz..(i + 1) * esz))
                    else {
                        continue;
                    };
                    let data = ev.data.as_deref().unwrap_or(&[0; EVENT_DATA_UNION]);
                    match ev.ty {
                        KFD_IOC_EVENT_MEMORY => dst[..EVENT_DATA_UNION].copy_from_slice(data),
                        KFD_IOC_EVENT_HW_EXCEPTION => dst[..16].copy_from_slice(&data[..16]),
                        KFD_IOC_EVENT_SIGNAL if it.age_enabled => {
                            dst[..8].copy_from_slice(&ev.age.to_le_bytes())
                        }
                        _ => continue,
                    }
                    written = (i + 1) * esz;
                }
            }
            Ok(())
        }
        Outcome::Timeout => {
            a.wait_result = KFD_IOC_WAIT_RESULT_TIMEOUT;
            Ok(())
        }
        Outcome::Failed => {
            a.wait_result = KFD_IOC_WAIT_RESULT_FAIL;
            Err(Errno::EIO)
        }
        Outcome::Interrupted => {
            a.wait_result = KFD_IOC_WAIT_RESULT_FAIL;
            Err(Errno::EINTR)
        }
    };
    if let Some(buf) = call.array_mut("events_ptr") {
        buf.truncate(written);
    }
    call.set_args(&a);
    r
}

/// Ends waiter `wid` with `outcome`: answers it if parked, else records the outcome for the
/// thread that is parking it.
pub(crate) fn resolve(cx: &mut Cx, wid: u64, outcome: Outcome) {
    let Some(w) = cx.st.ev.waiters.get_mut(&wid) else {
        return;
    };
    if w.slot.is_none() {
        w.pending.get_or_insert(outcome);
        return;
    }
    let Some(w) = cx.st.ev.waiters.remove(&wid) else {
        return;
    };
    cx.shared().stats.waiters.fetch_sub(1, Ordering::Relaxed);
    if let Some(k) = w.timer {
        cx.disarm.push(k);
    }
    if let Some((mut call, done)) = w.slot {
        let result = finish_wait(cx, &w.items, &mut call, outcome);
        cx.wake.push(Completion { call, done, result });
    }
}

pub(crate) fn on_timeout(cx: &mut Cx, wid: u64) {
    let Some(w) = cx.st.ev.waiters.get(&wid) else {
        return;
    };
    let outcome = if satisfied(&w.items, w.all) {
        Outcome::Complete
    } else {
        Outcome::Timeout
    };
    resolve(cx, wid, outcome);
}

/// Frees all events and the sim-owned events page; parked waiters get EINTR.
pub(crate) fn free_all(cx: &mut Cx) {
    let wids: Vec<u64> = cx.st.ev.waiters.keys().copied().collect();
    for wid in wids {
        resolve(cx, wid, Outcome::Interrupted);
    }
    let n = cx.st.ev.events.len() as u64;
    cx.shared().stats.events.fetch_sub(n, Ordering::Relaxed);
    if let Some(p) = cx.st.ev.owned_page.take() {
        cx.inner.mem.free(p.off, p.size);
    }
    // Waiters still being parked keep their entries (with EINTR pending) for their parker.
    let waiters = std::mem::take(&mut cx.st.ev.waiters);
    cx.st.ev = EventState {
        waiters,
        ..EventState::default()
    };
}

/// `WAIT_EVENTS`: answers at once when it can, otherwise parks the call.
pub(crate) fn wait_events(
    inner: &Arc<KfdInner>,
    _env: &dyn Env,
    mut call: IoctlCall,
    mut done: Done,
) {
    let a: KfdIoctlWaitEventsArgs = call.args();
    let n = a.num_events as usize;
    let esz = std::mem::size_of::<KfdEventData>();
    let all = a.wait_for_all != 0;
    let timeout = a.timeout;

    let mut st = inner.lock();
    if st.released {
        drop(st);
        return fail(call, done, Errno::EINTR);
    }
    let wanted: &[u8] = match call.array("events_ptr") {
        Some(b) if b.len() >= n * esz => &b[..n * esz],
        _ if n == 0 => &[],
        _ => {
            drop(st);
            return fail(call, done, Errno::EFAULT);
        }
    };
    // init_event_waiter for each event; an auto-reset event is consumed as the wait begins.
    let mut items = std::mem::take(&mut st.ev.scratch);
    items.clear();
    items.reserve(n);
    // Counted on the way, so an immediate answer needs no second and third pass over `items`.
    let (mut n_activated, mut any_copies) = (0, false);
    for e in wanted.chunks_exact(esz) {
        let id = u32::from_le_bytes([e[40], e[41], e[42], e[43]]);
        let last_age = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
        let Some(ev) = st.ev.events.get_mut(id) else {
            drop(st);
            return fail(call, done, Errno::EINVAL);
        };
        let mut activated = ev.signaled;
        if activated && ev.auto_reset {
            ev.signaled = false;
        }
        let age_enabled = ev.ty == KFD_IOC_EVENT_SIGNAL && last_age != 0;
        if age_enabled && ev.age != last_age {
            activated = true;
        }
        let copies_out =
            age_enabled || ev.ty == KFD_IOC_EVENT_MEMORY || ev.ty == KFD_IOC_EVENT_HW_EXCEPTION;
        n_activated += activated as usize;
        any_copies |= activated && copies_out;
        items.push(Item {
            id,
            activated,
            queued: !activated,
            age_enabled,
            copies_out,
        });
    }
    let cx = Cx {
        inner,
        env: &NoFd,
        st: &mut st,
        wake: Vec::new(),
        disarm: Vec::new(),
    };
    let now = if all {
        n_activated == items.len()
    } else {
        items.is_empty() || n_activated > 0
    };
    debug_assert_eq!(now, satisfied(&items, all));
    if now || timeout == 0 {
        let outcome = if now {
            Outcome::Complete
        } else {
            Outcome::Timeout
        };
        // Nothing activated copies out: the same answer without looking at the items again.
        let visit: &[Item] = if any_copies { &items } else { &[] };
        let r = finish_wait(&cx, visit, &mut call, outcome);
        if items.capacity() <= SCRATCH_ITEMS {
            cx.st.ev.scratch = items;
        }
        drop(st);
        return done.complete(call, r);
    }
    // The timeout counts from here: a wait answered at once never reads the clock.
    let started = Instant::now();
    let wid = inner.next_wid.fetch_add(1, Ordering::Relaxed);
    cx.st.ev.waiters.insert(
        wid,
        Waiter {
            items,
            all,
            slot: None,
            pending: None,
            timer: None,
        },
    );
    inner.shared.stats.waiters.fetch_add(1, Ordering::Relaxed);
    drop(st);

    // Register the canceller without holding the context lock (it takes that lock).
    let weak = Arc::downgrade(inner);
    let registered = done.on_interrupt(Box::new(move || {
        if let Some(c) = weak.upgrade() {
            c.waiter_interrupt(wid);
        }
    }));

    let mut st = inner.lock();
    let cx = Cx {
        inner,
        env: &NoFd,
        st: &mut st,
        wake: Vec::new(),
        disarm: Vec::new(),
    };
    let Some(w) = cx.st.ev.waiters.get_mut(&wid) else {
        // Taken away meanwhile (the context was reset): nothing left to wait for.
        drop(st);
        return fail(call, done, Errno::EINTR);
    };
    let decided = if !registered {
        Some(Outcome::Interrupted)
    } else if let Some(o) = w.pending.take() {
        Some(o)
    } else if satisfied(&w.items, w.all) {
        Some(Outcome::Complete)
    } else {
        None
    };
    match decided {
        Some(outcome) => {
            let w = cx.st.ev.waiters.remove(&wid);
            inner.shared.stats.waiters.fetch_sub(1, Ordering::Relaxed);
            let items = w.map(|w| w.items).unwrap_or_default();
            let r = finish_wait(&cx, &items, &mut call, outcome);
            drop(st);
            done.complete(call, r);
        }
        None => {
            if timeout != TIMEOUT_INFINITE {
                // The kernel caps finite timeouts at 2^31-1 ms.
                let ms = timeout.min(0x7FFF_FFFF) as u64;
                let at = started + Duration::from_millis(ms);
                w.timer = Some(inner.shared.timer.arm(at, Arc::downgrade(inner), wid));
            }
            w.slot = Some((call, done));
            drop(st);
        }
    }

    fn fail(mut call: IoctlCall, done: Done, e: Errno) {
        let mut a: KfdIoctlWaitEventsArgs = call.args();
        a.wait_result = KFD_IOC_WAIT_RESULT_FAIL;
        call.set_args(&a);
        done.complete(call, Err(e))
    }
}

/// Env stand-in for paths that never resolve fds.
struct NoFd;
impl Env for NoFd {
    fn file_of_fd(
        &self,
        _: &crate::device::Caller,
        _: i32,
    ) -> Result<Option<(crate::device::FileKind, u32)>, Errno> {
        Err(Errno::EBADF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(ty: u32) -> Event {
        Event {
            ty,
            auto_reset: false,
            signaled: false,
            age: 1,
            data: None,
        }
    }

    #[test]
    fn event_table_indexes_both_halves_and_gives_memory_back() {
        let mut t = EventTable::default();
        for id in 0..1000 {
            assert!(t.insert(id, ev(KFD_IOC_EVENT_SIGNAL)).is_none());
        }
        let hi = FIRST_NONSIGNAL_EVENT_ID + 2;
        assert!(t.insert(hi, ev(KFD_IOC_EVENT_MEMORY)).is_none());
        assert_eq!(t.len(), 1001);
        assert_eq!(t.get(hi).map(|e| e.ty), Some(KFD_IOC_EVENT_MEMORY));
        // Unknown ids: holes, past either end, the gap between the halves.
        for id in [
            hi - 1,
            hi + 1,
            1000,
            4096,
            FIRST_NONSIGNAL_EVENT_ID - 1,
            u32::MAX,
        ] {
            assert!(t.get(id).is_none(), "{id:#x}");
            assert!(t.remove(id).is_none(), "{id:#x}");
        }
        assert!(
            t.insert(7, ev(KFD_IOC_EVENT_SIGNAL)).is_some(),
            "id 7 was live"
        );
        assert_eq!(t.len(), 1001);
        // Removing the highest ids trims the table; a mostly empty one is shrunk.
        for id in (1..1000).rev() {
            assert!(t.remove(id).is_some());
        }
        assert_eq!(t.len(), 2);
        assert!(t.signal.len() == 1 && t.signal.capacity() <= 64);
        assert!(t.get(0).is_some());
        assert!(t.remove(hi).is_some());
        assert!(t.other.is_empty());
        assert_eq!(t.len(), 1);
    }
}
