//! The FUSE-file transport: a one-directory filesystem holding `kfd`, one `renderD<minor>` per
//! GPU and a `stats` text file.
//!
//! Isolation of mappings (see docs/fuse-transport.md): the kernel lets all opens of one FUSE inode share
//! a single passthrough backing file, so every client process gets inodes of its own — LOOKUP
//! answers with an inode keyed by (file, caller's tgid) and a zero entry timeout, so each path
//! walk asks again — and that inode's backing file is the memfd holding only that process's
//! buffers. OPEN of an inode by any other process is refused (EACCES). Clients therefore reach
//! the files by path (`/dev/kfd` is a symlink into the mount, not a bind mount).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use super::engine::{Filesystem, IoctlArgs, IoctlReply, Opened, Request};
use super::wire::*;
use crate::device::{Caller, Env, FileKind, ProcessMemory};
use crate::errno::Errno;
use crate::mux::{tgid_of, Mux};

/// File handles of the stats file live above this bit (context handles are slab keys).
const STATS_FH: u64 = 1 << 62;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Name {
    Kfd,
    Render(u32),
    Stats,
}

struct Node {
    name: Name,
    tgid: u32,
    nlookup: u64,
    /// Passthrough backing id and the memory it maps (kept alive with the inode).
    backing: Option<(i32, Arc<dyn ProcessMemory>)>,
}

#[derive(Default)]
struct Nodes {
    by_key: HashMap<(Name, u32), u64>,
    by_id: HashMap<u64, Node>,
    next: u64,
}

pub struct FuseFs {
    pub mux: Arc<Mux>,
    nodes: Mutex<Nodes>,
    chan: Mutex<Option<Arc<super::engine::Channel>>>,
    /// st_dev of the mount, to recognise our files among a client's fds.
    dev: Mutex<Option<u64>>,
    uid: u32,
    gid: u32,
}

impl FuseFs {
    pub fn new(mux: Arc<Mux>) -> Arc<FuseFs> {
        Arc::new(FuseFs {
            mux,
            nodes: Mutex::new(Nodes {
                next: 2,
                ..Default::default()
            }),
            chan: Mutex::new(None),
            dev: Mutex::new(None),
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
        })
    }

    /// Gives the filesystem its channel (for backing files) once the session exists.
    pub fn set_channel(&self, chan: Arc<super::engine::Channel>) {
        if let Ok(mut c) = self.chan.lock() {
            *c = Some(chan);
        }
    }

    /// Records the mount's device number (after mounting).
    pub fn set_dev(&self, dev: u64) {
        if let Ok(mut d) = self.dev.lock() {
            *d = Some(dev);
        }
    }

    fn names(&self) -> Vec<(Name, String)> {
        let mut v = vec![(Name::Kfd, "kfd".to_string())];
        for i in 0..self.mux.device.gpu_count() {
            v.push((
                Name::Render(i),
                format!("renderD{}", self.mux.device.render_minor(i)),
            ));
        }
        v.push((Name::Stats, "stats".to_string()));
        v
    }

    fn attr(&self, ino: u64, name: Option<Name>) -> Attr {
        let mode = match name {
            None => libc::S_IFDIR | 0o755,
            Some(Name::Stats) => libc::S_IFREG | 0o444,
            Some(_) => libc::S_IFREG | 0o666,
        };
        Attr {
            ino,
            mode,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            blksize: 4096,
            ..Default::default()
        }
    }

    fn node_name(&self, nodeid: u64) -> Result<(Name, u32), Errno> {
        let n = self.nodes.lock().map_err(|_| Errno::EIO)?;
        n.by_id
            .get(&nodeid)
            .map(|n| (n.name, n.tgid))
            .ok_or(Errno::ENOENT)
    }

    fn caller(req: &Request) -> Result<Caller, Errno> {
        let tgid = tgid_of(req.pid).ok_or(Errno::ESRCH)?;
        Ok(Caller {
            pid: req.pid,
            tgid,
            uid: req.uid,
            gid: req.gid,
        })
    }

    /// The passthrough backing id for `nodeid`, opening it on first use.
    fn backing(&self, nodeid: u64, tgid: u32) -> Option<i32> {
        let chan = self.chan.lock().ok()?.clone()?;
        if !chan.passthrough() {
            return None;
        }
        let mut nodes = self.nodes.lock().ok()?;
        let node = nodes.by_id.get_mut(&nodeid)?;
        if let Some((id, _)) = &node.backing {
            return Some(*id);
        }
        let mem = match self.mux.device.process_memory(tgid) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("no process memory for pid {tgid}: {e}");
                return None;
            }
        };
        match chan.backing_open(mem.backing_fd().as_raw_fd()) {
            Ok(id) => {
                node.backing = Some((id, mem));
                Some(id)
            }
            Err(e) => {
                log::warn!("FUSE passthrough backing for pid {tgid}: {e}; mmap will fail");
                None
            }
        }
    }
}

impl Filesystem for FuseFs {
    fn single_reader(&self) -> bool {
        self.mux.device.answers_in_place()
    }

    fn init(&self, passthrough: bool) {
        if !passthrough {
            log::warn!("the kernel does not offer FUSE passthrough (needs ≥ 6.9): mmap of kfdmux files will fail with ENODEV");
        }
    }

    fn lookup(&self, req: &Request, parent: u64, name: &[u8]) -> Result<EntryOut, Errno> {
        if parent != FUSE_ROOT_ID {
            return Err(Errno::ENOENT);
        }
        let name = std::str::from_utf8(name).map_err(|_| Errno::ENOENT)?;
        let (n, _) = self
            .names()
            .into_iter()
            .find(|(_, s)| s == name)
            .ok_or(Errno::ENOENT)?;
        // Stats is shared; device files are per process.
        let tgid = if n == Name::Stats {
            0
        } else {
            Self::caller(req)?.tgid
        };
        let mut nodes = self.nodes.lock().map_err(|_| Errno::EIO)?;
        let id = match nodes.by_key.get(&(n, tgid)) {
            Some(id) => *id,
            None => {
                let id = nodes.next;
                nodes.next += 1;
                nodes.by_key.insert((n, tgid), id);
                nodes.by_id.insert(
                    id,
                    Node {
                        name: n,
                        tgid,
                        nlookup: 0,
                        backing: None,
                    },
                );
                id
            }
        };
        if let Some(node) = nodes.by_id.get_mut(&id) {
            node.nlookup += 1;
        }
        drop(nodes);
        Ok(EntryOut {
            nodeid: id,
            attr: self.attr(id, Some(n)),
            ..Default::default()
        })
    }

    fn forget(&self, nodeid: u64, nlookup: u64) {
        let Ok(mut nodes) = self.nodes.lock() else {
            return;
        };
        let Some(node) = nodes.by_id.get_mut(&nodeid) else {
            return;
        };
        node.nlookup = node.nlookup.saturating_sub(nlookup);
        if node.nlookup > 0 {
            return;
        }
        if let Some(node) = nodes.by_id.remove(&nodeid) {
            nodes.by_key.remove(&(node.name, node.tgid));
            if let Some((id, _mem)) = node.backing {
                if let Some(chan) = self.chan.lock().ok().and_then(|c| c.clone()) {
                    chan.backing_close(id);
                }
            }
        }
    }

    fn getattr(&self, _req: &Request, nodeid: u64) -> Result<AttrOut, Errno> {
        let name = if nodeid == FUSE_ROOT_ID {
            None
        } else {
            Some(self.node_name(nodeid)?.0)
        };
        Ok(AttrOut {
            attr: self.attr(nodeid, name),
            ..Default::default()
        })
    }

    fn open(&self, req: &Request, nodeid: u64, flags: u32) -> Result<Opened, Errno> {
        if nodeid == FUSE_ROOT_ID {
            return Ok(Opened::default());
        }
        let (name, tgid) = self.node_name(nodeid)?;
        let kind = match name {
            Name::Stats => {
                return Ok(Opened {
                    fh: STATS_FH,
                    open_flags: FOPEN_DIRECT_IO,
                    backing_id: 0,
                })
            }
            Name::Kfd => FileKind::Kfd,
            Name::Render(i) => FileKind::Render(i),
        };
        let caller = Self::caller(req)?;
        if caller.tgid != tgid {
            log::warn!(
                "pid {} tried to open pid {tgid}'s inode of {name:?}: EACCES",
                caller.tgid
            );
            return Err(Errno::EACCES);
        }
        if flags & libc::O_ACCMODE as u32 != libc::O_RDWR as u32 && name == Name::Kfd {
            log::debug!("kfd opened without O_RDWR by pid {}", caller.tgid);
        }
        let fh = self.mux.open(caller, kind)?;
        match self.backing(nodeid, tgid) {
            // NOFLUSH: closing a dup of a client fd (ACQUIRE_VM's check) must not wait on a FLUSH.
            Some(id) => Ok(Opened {
                fh,
                open_flags: FOPEN_PASSTHROUGH | FOPEN_NOFLUSH,
                backing_id: id,
            }),
            None => Ok(Opened {
                fh,
                open_flags: FOPEN_DIRECT_IO | FOPEN_NOFLUSH,
                backing_id: 0,
            }),
        }
    }

    fn release(&self, _req: &Request, nodeid: u64, fh: u64) {
        if nodeid != FUSE_ROOT_ID && fh != STATS_FH {
            self.mux.release(fh);
        }
    }

    fn read(&self, _req: &Request, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if fh != STATS_FH {
            return Err(Errno::EINVAL);
        }
        let mut text = self.mux.stats_text();
        if let Some(chan) = self.chan.lock().ok().and_then(|c| c.clone()) {
            // Which path requests took (`--fuse-uring`: ring vs /dev/fuse).
            text.push_str(&chan.transport_stats());
        }
        let text = text.into_bytes();
        let start = (offset as usize).min(text.len());
        let end = (start + size as usize).min(text.len());
        Ok(text[start..end].to_vec())
    }

    fn ioctl(&self, req: &Request, args: IoctlArgs, in_data: &[u8], reply: IoctlReply) {
        if args.fh == STATS_FH || req.nodeid == FUSE_ROOT_ID {
            return reply.error(Errno::ENOTTY);
        }
        if args.flags & (FUSE_IOCTL_COMPAT | FUSE_IOCTL_32BIT) != 0 {
            // KFD refuses 32-bit callers.
            return reply.error(Errno::EPERM);
        }
        self.mux.ioctl_restricted(
            self,
            req.pid,
            args.fh,
            args.cmd,
            in_data,
            args.out_size,
            reply,
        );
    }

    fn poll(&self, _req: &Request, _fh: u64, _kh: Option<u64>, _events: u32) -> Result<u32, Errno> {
        // kfd has no poll: the VFS default mask.
        Ok((libc::POLLIN | libc::POLLOUT | libc::POLLRDNORM | libc::POLLWRNORM) as u32)
    }

    fn readdir(&self, _req: &Request, nodeid: u64) -> Result<Vec<(u64, u32, Vec<u8>)>, Errno> {
        if nodeid != FUSE_ROOT_ID {
            return Err(Errno::ENOTDIR);
        }
        let mut v = vec![
            (1, libc::DT_DIR as u32, b".".to_vec()),
            (1, libc::DT_DIR as u32, b"..".to_vec()),
        ];
        for (i, (_, s)) in self.names().into_iter().enumerate() {
            v.push((1000 + i as u64, libc::DT_REG as u32, s.into_bytes()));
        }
        Ok(v)
    }
}

impl Env for FuseFs {
    fn file_of_fd(&self, caller: &Caller, fd: i32) -> Result<Option<(FileKind, u32)>, Errno> {
        let file = crate::transport::sys::take_fd(caller.tgid, fd)?;
        // Not fstat: on our own files that sends GETATTR to this daemon and waits for a worker
        // — with every worker here, a deadlock. The cached identity is all we need.
        let (st_dev, st_ino) = crate::transport::sys::fd_identity(file.as_raw_fd())?;
        let dev = self.dev.lock().ok().and_then(|d| *d);
        if dev != Some(st_dev) {
            return Ok(None);
        }
        let nodes = self.nodes.lock().map_err(|_| Errno::EIO)?;
        Ok(nodes.by_id.get(&st_ino).and_then(|n| match n.name {
            Name::Kfd => Some((FileKind::Kfd, n.tgid)),
            Name::Render(i) => Some((FileKind::Render(i), n.tgid)),
            Name::Stats => None,
        }))
    }
}
