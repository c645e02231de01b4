//! The client's address space as the kernel's mm would see it: `/proc/<pid>/maps`.
//!
//! USERPTR allocations (amdgpu_ttm_tt_get_user_pages: no VMA at the start, or a hole that
//! hmm_range_fault cannot fault in → EFAULT) and SVM ranges (svm_range_is_valid → EFAULT) must
//! lie in memory the client has mapped. The sim reads the caller's maps file for that.

use crate::errno::Errno;

/// One mapping: `[start, end)` and whether it can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
}

/// Parses the text of a maps file (lines `start-end perms offset dev inode path`).
pub fn parse(text: &str) -> Vec<Vma> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let perms = it.next()?;
            let (s, e) = range.split_once('-')?;
            Some(Vma {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                readable: perms.starts_with('r'),
            })
        })
        .collect()
}

/// Is every byte of `[start, end)` inside a readable mapping of `vmas` (sorted by start)?
pub fn covered(vmas: &[Vma], start: u64, end: u64) -> bool {
    let mut at = start;
    for v in vmas {
        if at >= end {
            break;
        }
        if v.end <= at {
            continue;
        }
        if v.start > at || !v.readable {
            return false;
        }
        at = v.end;
    }
    at >= end
}

/// What the check concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Mapped,
    NotMapped,
    /// The maps file could not be read for another reason than the process being gone
    /// (e.g. a daemon without the right to read it): the range is not judged.
    Unknown,
}

/// Checks that `[start, start+len)` is mapped readable in process `pid`.
pub fn check_range(pid: u32, start: u64, len: u64) -> Check {
    let Some(end) = start.checked_add(len) else {
        return Check::NotMapped;
    };
    match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(t) => {
            if covered(&parse(&t), start, end) {
                Check::Mapped
            } else {
                Check::NotMapped
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::NotMapped,
        Err(e) => {
            log::warn!("sim: cannot read /proc/{pid}/maps ({e}); address range not checked");
            Check::Unknown
        }
    }
}

/// The errno the kernel gives for an unmapped range (both USERPTR and SVM): EFAULT.
pub fn require_mapped(pid: u32, start: u64, len: u64, what: &str) -> Result<(), Errno> {
    match check_range(pid, start, len) {
        Check::NotMapped => {
            log::debug!(
                "sim kfd: {what} {start:#x}+{len:#x} is not mapped in process {pid}: EFAULT"
            );
            Err(Errno::EFAULT)
        }
        Check::Mapped | Check::Unknown => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_across_adjacent_mappings_and_holes() {
        let v = parse(
            "1000-3000 rw-p 00000000 00:00 0\n\
             3000-4000 r--p 00000000 00:00 0 /x\n\
             5000-6000 ---p 00000000 00:00 0\n\
             7000-8000 rw-s 00000000 00:05 12 /memfd:x (deleted)\n",
        );
        assert_eq!(v.len(), 4);
        assert!(covered(&v, 0x1000, 0x4000), "adjacent mappings join");
        assert!(covered(&v, 0x2000, 0x2008));
        assert!(!covered(&v, 0x3000, 0x5000), "a hole");
        assert!(!covered(&v, 0x5000, 0x5001), "no access");
        assert!(
            !covered(&v, 0x800, 0x1800),
            "starts before the first mapping"
        );
        assert!(covered(&v, 0x7000, 0x8000));
        assert!(!covered(&v, 0x7000, 0x9000));
    }

    #[test]
    fn own_stack_is_mapped_and_page_zero_is_not() {
        let x = 5u64;
        let a = &x as *const u64 as u64;
        assert_eq!(check_range(std::process::id(), a, 8), Check::Mapped);
        assert_eq!(check_range(std::process::id(), 0, 4096), Check::NotMapped);
    }
}
