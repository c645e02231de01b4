//! `AMDKFD_IOC_SVM`: shared-virtual-memory ranges with attributes (kfd_svm.c semantics).
//!
//! A context keeps its SVM ranges as non-overlapping page intervals, each with the kernel's
//! attributes (preferred/prefetch location, flags, granularity, per-GPU access / access in
//! place). SET_ATTR splits the ranges it partly covers, applies the attributes to every piece
//! inside `[start, start+size)` and creates ranges with default attributes for the gaps.
//! GET_ATTR folds the ranges inside the interval the way svm_range_get_attr does: a location
//! that differs between ranges reads as UNDEFINED, SET_FLAGS is the AND and CLR_FLAGS the
//! complement of the OR of the flags, granularity the minimum, access the intersection; an
//! interval without any range reads the defaults. No memory migrates: the sim has no GPU.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::abi::*;
use crate::device::IoctlCall;
use crate::errno::Errno;

use super::kfd::Cx;
use super::mem::PAGE_SIZE;
use super::procmaps;

const PAGE_SHIFT: u32 = 12;
/// `svm_default_granularity`: 2^9 pages.
pub const DEFAULT_GRANULARITY: u32 = 9;
/// Granularity values are clamped to this.
const MAX_GRANULARITY: u32 = 0x3F;
/// The kernel's per-process GPU limit (bitmaps are this wide).
const MAX_GPU_INSTANCE: usize = 64;
/// Size of the fixed part of `kfd_ioctl_svm_args`; attributes follow it.
const SVM_ARGS_SIZE: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attrs {
    pub preferred: u32,
    pub prefetch: u32,
    pub flags: u32,
    pub granularity: u32,
    /// GPU indexes (bits) with ACCESS / ACCESS_IN_PLACE.
    pub access: u64,
    pub aip: u64,
}

#[derive(Debug, Clone, Copy)]
struct Range {
    /// Last page (inclusive).
    last: u64,
    attrs: Attrs,
}

/// A context's SVM ranges, keyed by first page.
#[derive(Debug, Default)]
pub(crate) struct SvmState {
    ranges: BTreeMap<u64, Range>,
}

impl SvmState {
    /// Does any range intersect pages `[first, last]`?
    pub fn overlaps(&self, first: u64, last: u64) -> bool {
        self.ranges
            .range(..=last)
            .next_back()
            .is_some_and(|(_, r)| r.last >= first)
    }

    /// Does any range intersect the byte interval `[start, start+size)` (size > 0)?
    pub fn overlaps_bytes(&self, start: u64, size: u64) -> bool {
        if size == 0 {
            return false;
        }
        let last = start.saturating_add(size - 1) >> PAGE_SHIFT;
        self.overlaps(start >> PAGE_SHIFT, last)
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Splits the range containing page `at` (if it starts before `at`) into two at `at`.
    fn split_at(&mut self, at: u64) {
        let Some((&s, &r)) = self.ranges.range(..at).next_back() else {
            return;
        };
        if r.last < at {
            return;
        }
        self.ranges.insert(s, Range { last: at - 1, ..r });
        self.ranges.insert(at, r);
    }
}

/// Bit of GPU index `gi` in the 64-wide bitmaps.
fn bit(gi: usize) -> u64 {
    if gi < MAX_GPU_INSTANCE {
        1 << gi
    } else {
        0
    }
}

/// GPUs that can take part in SVM: GFX9 and newer (`svms->bitmap_supported`).
fn supported(cx: &Cx) -> u64 {
    cx.shared()
        .gpus
        .iter()
        .enumerate()
        .filter(|(_, g)| g.preset.gfx_target_version >= 90000)
        .fold(0, |m, (i, _)| m | bit(i))
}

/// `svm_range_set_default_attributes` (access: every supported GPU when XNACK is on).
fn defaults(cx: &Cx) -> Attrs {
    Attrs {
        preferred: KFD_IOCTL_SVM_LOCATION_UNDEFINED,
        prefetch: KFD_IOCTL_SVM_LOCATION_UNDEFINED,
        flags: KFD_IOCTL_SVM_FLAG_HOST_ACCESS | KFD_IOCTL_SVM_FLAG_COHERENT,
        granularity: DEFAULT_GRANULARITY,
        access: if cx.st.xnack { supported(cx) } else { 0 },
        aip: 0,
    }
}

/// The attribute array trailing the arguments: (type, value) pairs.
fn read_attrs(call: &IoctlCall, n: usize) -> Result<Vec<(u32, u32)>, Errno> {
    let end = n
        .checked_mul(8)
        .and_then(|b| b.checked_add(SVM_ARGS_SIZE))
        .ok_or(Errno::EINVAL)?;
    let Some(raw) = call.arg.get(SVM_ARGS_SIZE..end) else {
        log::debug!("sim kfd: SVM nattr {n} exceeds the attributes the command carries: EINVAL");
        return Err(Errno::EINVAL);
    };
    Ok(raw
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect())
}

fn write_attrs(call: &mut IoctlCall, attrs: &[(u32, u32)]) {
    for (i, (t, v)) in attrs.iter().enumerate() {
        let o = SVM_ARGS_SIZE + 8 * i;
        if let Some(d) = call.arg.get_mut(o..o + 8) {
            d[..4].copy_from_slice(&t.to_le_bytes());
            d[4..].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// GPU index of `gpu_id` (`kfd_process_gpuidx_from_gpuid`).
fn gpuidx(cx: &Cx, gpu_id: u32) -> Option<usize> {
    cx.shared().gpu_index(gpu_id)
}

/// `svm_range_check_attr`: types known, GPU ids exist and support SVM (EINVAL).
fn check_attrs(cx: &Cx, attrs: &[(u32, u32)]) -> Result<(), Errno> {
    let sup = supported(cx);
    for &(t, v) in attrs {
        let gpu = match t {
            KFD_IOCTL_SVM_ATTR_PREFERRED_LOC => (v != KFD_IOCTL_SVM_LOCATION_SYSMEM
                && v != KFD_IOCTL_SVM_LOCATION_UNDEFINED)
                .then_some(v),
            KFD_IOCTL_SVM_ATTR_PREFETCH_LOC => (v != KFD_IOCTL_SVM_LOCATION_SYSMEM).then_some(v),
            KFD_IOCTL_SVM_ATTR_ACCESS
            | KFD_IOCTL_SVM_ATTR_ACCESS_IN_PLACE
            | KFD_IOCTL_SVM_ATTR_NO_ACCESS => Some(v),
            KFD_IOCTL_SVM_ATTR_SET_FLAGS
            | KFD_IOCTL_SVM_ATTR_CLR_FLAGS
            | KFD_IOCTL_SVM_ATTR_GRANULARITY => None,
            _ => {
                log::debug!("sim kfd: SVM: unknown attribute type {t:#x}: EINVAL");
                return Err(Errno::EINVAL);
            }
        };
        if let Some(id) = gpu {
            match gpuidx(cx, id) {
                None => {
                    log::debug!("sim kfd: SVM: no GPU {id:#x}: EINVAL");
                    return Err(Errno::EINVAL);
                }
                Some(gi) if bit(gi) & sup == 0 => {
                    log::debug!("sim kfd: SVM: GPU {id:#x} does not support SVM: EINVAL");
                    return Err(Errno::EINVAL);
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// `svm_range_apply_attrs`.
fn apply(cx: &Cx, a: &mut Attrs, attrs: &[(u32, u32)]) {
    for &(t, v) in attrs {
        match t {
            KFD_IOCTL_SVM_ATTR_PREFERRED_LOC => a.preferred = v,
            KFD_IOCTL_SVM_ATTR_PREFETCH_LOC => a.prefetch = v,
            KFD_IOCTL_SVM_ATTR_ACCESS
            | KFD_IOCTL_SVM_ATTR_ACCESS_IN_PLACE
            | KFD_IOCTL_SVM_ATTR_NO_ACCESS => {
                let b = gpuidx(cx, v).map(bit).unwrap_or(0);
                a.access &= !b;
                a.aip &= !b;
                if t == KFD_IOCTL_SVM_ATTR_ACCESS {
                    a.access |= b;
                } else if t == KFD_IOCTL_SVM_ATTR_ACCESS_IN_PLACE {
                    a.aip |= b;
                }
            }
            KFD_IOCTL_SVM_ATTR_SET_FLAGS => a.flags |= v,
            KFD_IOCTL_SVM_ATTR_CLR_FLAGS => a.flags &= !v,
            KFD_IOCTL_SVM_ATTR_GRANULARITY => a.granularity = v.min(MAX_GRANULARITY),
            _ => {}
        }
    }
}

/// `svm_range_is_valid`: mapped in the caller's mm (EFAULT) and not overlapping a buffer
/// mapped in any of the context's GPU VMs (EADDRINUSE, "already TTM mapped").
fn range_valid(cx: &Cx, call: &IoctlCall, start: u64, size: u64) -> Result<(), Errno> {
    procmaps::require_mapped(call.caller.pid, start, size, "SVM range")?;
    let end = start + size;
    for (gi, p) in cx.st.pdds.iter().enumerate() {
        if let Some((s, (e, h))) = p.vm.range(..end).next_back() {
            if *e > start {
                log::debug!(
                    "sim kfd: SVM range {start:#x}-{end:#x} overlaps buffer {h:#x} at {s:#x}-{e:#x} on GPU {gi}: EADDRINUSE"
                );
                return Err(Errno(libc::EADDRINUSE));
            }
        }
    }
    Ok(())
}

pub(crate) fn svm_ioctl(cx: &mut Cx, call: &mut IoctlCall) -> Result<(), Errno> {
    if cx.st.secondary {
        log::debug!("sim kfd: SVM only on the primary kfd process: EOPNOTSUPP");
        return Err(Errno::EOPNOTSUPP);
    }
    if !cx.shared().cfg.svm {
        // As a kernel built without CONFIG_HSA_AMD_SVM.
        log::debug!("sim kfd: SVM is switched off: EPERM");
        return Err(Errno::EPERM);
    }
    let a: KfdIoctlSvmArgs = call.args();
    if !a.start_addr.is_multiple_of(PAGE_SIZE)
        || !a.size.is_multiple_of(PAGE_SIZE)
        || a.start_addr == 0
        || a.size == 0
    {
        log::debug!(
            "sim kfd: SVM range {:#x}+{:#x} not page aligned or empty: EINVAL",
            a.start_addr,
            a.size
        );
        return Err(Errno::EINVAL);
    }
    if a.start_addr.checked_add(a.size).is_none() {
        return Err(Errno::EINVAL);
    }
    let mut attrs = read_attrs(call, a.nattr as usize)?;
    let first = a.start_addr >> PAGE_SHIFT;
    let last = first + (a.size >> PAGE_SHIFT) - 1;
    match a.op {
        KFD_IOCTL_SVM_OP_SET_ATTR => {
            check_attrs(cx, &attrs)?;
            range_valid(cx, call, a.start_addr, a.size)?;
            set_attr(cx, first, last, &attrs);
            Ok(())
        }
        KFD_IOCTL_SVM_OP_GET_ATTR => {
            range_valid(cx, call, a.start_addr, a.size)?;
            let r = get_attr(cx, first, last, &mut attrs);
            write_attrs(call, &attrs);
            r
        }
        op => {
            log::debug!("sim kfd: SVM op {op}: EINVAL");
            Err(Errno::EINVAL)
        }
    }
}

/// `svm_range_add` + `svm_range_apply_attrs` over pages `[first, last]`.
fn set_attr(cx: &mut Cx, first: u64, last: u64, attrs: &[(u32, u32)]) {
    let before = cx.st.svm.len();
    cx.st.svm.split_at(first);
    if let Some(next) = last.checked_add(1) {
        cx.st.svm.split_at(next);
    }
    let dflt = defaults(cx);
    // Pieces inside [first, last] after the splits, and the gaps between them.
    let mut pieces: Vec<(u64, Range)> = cx
        .st
        .svm
        .ranges
        .range(first..=last)
        .map(|(s, r)| (*s, *r))
        .collect();
    let mut gaps = Vec::new();
    let mut at = first;
    for (s, r) in &pieces {
        if *s > at {
            gaps.push((at, s - 1));
        }
        at = r.last.saturating_add(1);
    }
    if at <= last {
        gaps.push((at, last));
    }
    for (s, l) in gaps {
        pieces.push((
            s,
            Range {
                last: l,
                attrs: dflt,
            },
        ));
    }
    for (s, mut r) in pieces {
        apply(cx, &mut r.attrs, attrs);
        cx.st.svm.ranges.insert(s, r);
    }
    let after = cx.st.svm.len();
    let st = &cx.shared().stats.svm_ranges;
    if after >= before {
        st.fetch_add((after - before) as u64, Ordering::Relaxed);
    }
}

/// `svm_range_get_attr`.
fn get_attr(cx: &Cx, first: u64, last: u64, attrs: &mut [(u32, u32)]) -> Result<(), Errno> {
    let (mut want_pref, mut want_fetch, mut want_access, mut want_flags, mut want_gran) =
        (false, false, false, false, false);
    for &(t, _) in attrs.iter() {
        match t {
            KFD_IOCTL_SVM_ATTR_PREFERRED_LOC => want_pref = true,
            KFD_IOCTL_SVM_ATTR_PREFETCH_LOC => want_fetch = true,
            KFD_IOCTL_SVM_ATTR_ACCESS => want_access = true,
            KFD_IOCTL_SVM_ATTR_SET_FLAGS | KFD_IOCTL_SVM_ATTR_CLR_FLAGS => want_flags = true,
            KFD_IOCTL_SVM_ATTR_GRANULARITY => want_gran = true,
            _ => {
                log::debug!("sim kfd: SVM GET_ATTR of attribute type {t:#x}: EINVAL");
                return Err(Errno::EINVAL);
            }
        }
    }
    let inside: Vec<&Range> = cx
        .st
        .svm
        .ranges
        .range(..=last)
        .filter(|(_, r)| r.last >= first)
        .map(|(_, r)| r)
        .collect();
    let mut location = KFD_IOCTL_SVM_LOCATION_UNDEFINED;
    let mut prefetch = KFD_IOCTL_SVM_LOCATION_UNDEFINED;
    let mut granularity = 0xFFu32;
    let mut flags_and = u32::MAX;
    let mut flags_or = 0u32;
    let (mut access, mut aip);
    if inside.is_empty() {
        let d = defaults(cx);
        location = d.preferred;
        prefetch = d.prefetch;
        granularity = d.granularity;
        flags_and = d.flags;
        flags_or = d.flags;
        access = d.access;
        aip = 0;
    } else {
        access = supported(cx);
        aip = access;
        for r in inside {
            let ra = &r.attrs;
            if want_pref {
                if ra.preferred == KFD_IOCTL_SVM_LOCATION_UNDEFINED
                    || (location != KFD_IOCTL_SVM_LOCATION_UNDEFINED && location != ra.preferred)
                {
                    location = KFD_IOCTL_SVM_LOCATION_UNDEFINED;
                    want_pref = false;
                } else {
                    location = ra.preferred;
                }
            }
            if want_fetch {
                if ra.prefetch == KFD_IOCTL_SVM_LOCATION_UNDEFINED
                    || (prefetch != KFD_IOCTL_SVM_LOCATION_UNDEFINED && prefetch != ra.prefetch)
                {
                    prefetch = KFD_IOCTL_SVM_LOCATION_UNDEFINED;
                    want_fetch = false;
                } else {
                    prefetch = ra.prefetch;
                }
            }
            if want_access {
                access &= ra.access;
                aip &= ra.aip;
            }
            if want_flags {
                flags_and &= ra.flags;
                flags_or |= ra.flags;
            }
            if want_gran && ra.granularity < granularity {
                granularity = ra.granularity;
            }
        }
    }
    for (t, v) in attrs.iter_mut() {
        match *t {
            KFD_IOCTL_SVM_ATTR_PREFERRED_LOC => *v = location,
            KFD_IOCTL_SVM_ATTR_PREFETCH_LOC => *v = prefetch,
            KFD_IOCTL_SVM_ATTR_ACCESS => {
                let Some(gi) = gpuidx(cx, *v) else {
                    log::debug!("sim kfd: SVM GET_ATTR: no GPU {:#x}: EINVAL", *v);
                    return Err(Errno::EINVAL);
                };
                *t = if access & bit(gi) != 0 {
                    KFD_IOCTL_SVM_ATTR_ACCESS
                } else if aip & bit(gi) != 0 {
                    KFD_IOCTL_SVM_ATTR_ACCESS_IN_PLACE
                } else {
                    KFD_IOCTL_SVM_ATTR_NO_ACCESS
                };
            }
            KFD_IOCTL_SVM_ATTR_SET_FLAGS => *v = flags_and,
            KFD_IOCTL_SVM_ATTR_CLR_FLAGS => *v = !flags_or,
            KFD_IOCTL_SVM_ATTR_GRANULARITY => *v = granularity,
            _ => {}
        }
    }
    Ok(())
}

/// Drops every range (release, CREATE_PROCESS).
pub(crate) fn free_all(cx: &mut Cx) {
    let n = cx.st.svm.len() as u64;
    cx.st.svm.ranges.clear();
    cx.shared().stats.svm_ranges.fetch_sub(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(last: u64) -> Range {
        Range {
            last,
            attrs: Attrs {
                preferred: 0,
                prefetch: 0,
                flags: 0,
                granularity: 9,
                access: 0,
                aip: 0,
            },
        }
    }

    #[test]
    fn split_and_overlap() {
        let mut s = SvmState::default();
        s.ranges.insert(10, r(19));
        assert!(s.overlaps(19, 30) && s.overlaps(0, 10) && !s.overlaps(20, 30));
        s.split_at(15);
        s.split_at(10); // at a boundary: no change
        s.split_at(25); // outside: no change
        let v: Vec<(u64, u64)> = s.ranges.iter().map(|(k, r)| (*k, r.last)).collect();
        assert_eq!(v, vec![(10, 14), (15, 19)]);
        assert!(s.overlaps_bytes(19 << 12, 1) && !s.overlaps_bytes(20 << 12, 4096));
    }
}
