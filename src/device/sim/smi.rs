//! SMI events (`AMDKFD_IOC_SMI_EVENTS`): a per-GPU event stream read from an fd.
//!
//! The kernel gives the caller an anonymous fd: writing 8 bytes sets the client's event mask
//! (bit `e - 1` for event `e`, plus `KFD_SMI_EVENT_ALL_PROCESS`'s bit for other processes'
//! events, honoured only for privileged clients), reading returns queued records as text
//! (`"<event in hex> <payload>\n"`) or EAGAIN when none is queued, and poll reports POLLIN while
//! records are queued. Here the fd is one end of a stream socketpair, O_NONBLOCK, whose other
//! end the device keeps: records are written to it, and mask writes are read from it when an
//! event is delivered (a mask written before an event applies to it, as in the kernel).
//!
//! Differences: a short mask write is not refused with EINVAL (it is ignored when drained); a
//! client's stream lives until its kfd context closes (then reads give 0, poll POLLHUP), where
//! the kernel's outlives the kfd file. The sim has no fault, reset, thermal or migration model,
//! so nothing emits events yet: [`emit`] is the delivery path for such sources (unit-tested).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use crate::errno::Errno;

/// `KFD_SMI_EVENT_ALL_PROCESS`: the mask bit index (event number) asking for every process's
/// events.
pub const ALL_PROCESS: u32 = 64;

/// The mask bit of event `e` (`KFD_SMI_EVENT_MASK_FROM_INDEX`).
pub fn mask_of(e: u32) -> u64 {
    if (1..=64).contains(&e) {
        1u64 << (e - 1)
    } else {
        0
    }
}

struct Client {
    /// The sim context that opened it (its streams end when that context closes).
    ctx: u64,
    gpu: usize,
    tgid: u32,
    /// May ask for other processes' events (the kernel: CAP_SYS_ADMIN; here: uid 0).
    privileged: bool,
    mask: u64,
    /// Bytes of a mask write not yet complete.
    partial: Vec<u8>,
    sock: OwnedFd,
}

/// The device's SMI clients.
#[derive(Default)]
pub struct Registry {
    clients: Mutex<Vec<Client>>,
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), Errno> {
    let mut sv = [0i32; 2];
    // SAFETY: socketpair writes two fds into `sv`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

fn set_nonblock(fd: &OwnedFd) -> Result<(), Errno> {
    // SAFETY: fcntl on an fd we own, integer arguments.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Whether the client closed its end (the daemon's end reports POLLHUP).
fn hung_up(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: polls one pollfd without waiting.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream for GPU `gpu` opened by context `ctx` of process `tgid`: the client's fd.
    pub fn open(&self, ctx: u64, gpu: usize, tgid: u32, uid: u32) -> Result<OwnedFd, Errno> {
        let (ours, theirs) = socketpair()?;
        set_nonblock(&ours)?;
        // The kernel's fd reads EAGAIN when nothing is queued.
        set_nonblock(&theirs)?;
        let mut c = self.lock();
        c.retain(|c| !hung_up(&c.sock));
        c.push(Client {
            ctx,
            gpu,
            tgid,
            privileged: uid == 0,
            mask: 0,
            partial: Vec::new(),
            sock: ours,
        });
        Ok(theirs)
    }

    /// Context `ctx` closed: its streams end.
    pub fn drop_ctx(&self, ctx: u64) {
        self.lock().retain(|c| c.ctx != ctx);
    }

    /// Open streams (for the stats file).
    pub fn live(&self) -> u64 {
        self.lock().len() as u64
    }

    /// Delivers event `event` of process `pid` on GPU `gpu` with `payload` (the text after the
    /// event number, without the newline) to every client that asked for it.
    pub fn emit(&self, gpu: usize, pid: u32, event: u32, payload: &str) {
        let record = format!("{event:x} {payload}\n");
        let mut clients = self.lock();
        clients.retain_mut(|c| {
            if c.gpu != gpu {
                return true;
            }
            if !drain_mask(c) {
                return false;
            }
            let all = c.mask & mask_of(ALL_PROCESS) != 0;
            let wanted = c.mask & mask_of(event) != 0 && (c.tgid == pid || (all && c.privileged));
            if wanted {
                // SAFETY: sends initialised bytes on our own socket; a full buffer drops the
                // record (the kernel drops records when its fifo is full).
                let n = unsafe {
                    libc::send(
                        c.sock.as_raw_fd(),
                        record.as_ptr().cast(),
                        record.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 && Errno::last() == Errno(libc::EPIPE) {
                    return false;
                }
            }
            true
        });
    }
}

/// Reads the mask writes queued by the client; false when it closed its end.
fn drain_mask(c: &mut Client) -> bool {
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: reads into a buffer of the size given, without blocking.
        let n = unsafe {
            libc::recv(
                c.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n == 0 {
            return false;
        }
        if n < 0 {
            return Errno::last() != Errno(libc::EPIPE) && Errno::last() != Errno(libc::ECONNRESET);
        }
        c.partial.extend_from_slice(&buf[..n as usize]);
        let whole = c.partial.len() / 8 * 8;
        if whole > 0 {
            let last = &c.partial[whole - 8..whole];
            c.mask = u64::from_ne_bytes(last.try_into().unwrap_or([0; 8]));
            c.partial.drain(..whole);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(fd: &OwnedFd, b: &[u8]) {
        // SAFETY: writes initialised bytes to an fd we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        assert_eq!(n, b.len() as isize);
    }

    fn read(fd: &OwnedFd) -> Result<String, Errno> {
        let mut b = [0u8; 512];
        // SAFETY: reads into a buffer of the size given.
        let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
        if n < 0 {
            return Err(Errno::last());
        }
        Ok(String::from_utf8_lossy(&b[..n as usize]).into_owned())
    }

    #[test]
    fn mask_filters_events_and_processes() {
        let r = Registry::default();
        let me = r.open(1, 0, 100, 1000).expect("open");
        assert_eq!(read(&me), Err(Errno::EAGAIN), "nothing queued");
        r.emit(0, 100, 1, "64:x");
        assert_eq!(read(&me), Err(Errno::EAGAIN), "mask 0 takes nothing");
        write(&me, &(mask_of(1) | mask_of(ALL_PROCESS)).to_ne_bytes());
        r.emit(1, 100, 1, "other gpu");
        r.emit(0, 101, 1, "other pid, unprivileged");
        r.emit(0, 100, 2, "not in the mask");
        r.emit(0, 100, 1, "64:app");
        assert_eq!(read(&me).as_deref(), Ok("1 64:app\n"));
        let root = r.open(2, 0, 200, 0).expect("open");
        write(&root, &mask_of(ALL_PROCESS).to_ne_bytes());
        write(&root, &(mask_of(9) | mask_of(ALL_PROCESS)).to_ne_bytes());
        r.emit(0, 100, 9, "1 2 3");
        assert_eq!(
            read(&root).as_deref(),
            Ok("9 1 2 3\n"),
            "the last mask wins"
        );
        assert_eq!(r.live(), 2);
        drop(me);
        r.emit(0, 100, 9, "x");
        assert_eq!(r.live(), 1, "a closed client is dropped");
        assert_eq!(read(&root).as_deref(), Ok("9 x\n"));
        r.drop_ctx(2);
        assert_eq!(
            read(&root).as_deref(),
            Ok(""),
            "EOF once the context closed"
        );
    }
}
