//! FUSE/CUSE wire structures (`<linux/fuse.h>`, protocol 7.x), as zerocopy types.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub const FUSE_KERNEL_VERSION: u32 = 7;
/// The newest minor we speak (7.40 brought passthrough).
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 41;
/// The oldest minor we accept.
pub const FUSE_MIN_MINOR: u32 = 26;

pub const FUSE_ROOT_ID: u64 = 1;

// Opcodes.
pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_GETXATTR: u32 = 22;
pub const FUSE_LISTXATTR: u32 = 23;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_OPENDIR: u32 = 27;
pub const FUSE_READDIR: u32 = 28;
pub const FUSE_RELEASEDIR: u32 = 29;
pub const FUSE_ACCESS: u32 = 34;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_IOCTL: u32 = 39;
pub const FUSE_POLL: u32 = 40;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const CUSE_INIT: u32 = 4096;
/// `cuse_init_out.flags`: the device takes unrestricted ioctls.
pub const CUSE_UNRESTRICTED_IOCTL: u32 = 1 << 0;

// INIT flags (flags, and flags2 = bits 32..63).
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
pub const FUSE_PASSTHROUGH: u64 = 1 << 37;
/// 7.42: requests may travel over io_uring (`super::uring`).
pub const FUSE_OVER_IO_URING: u64 = 1 << 41;
/// The minor we speak when FUSE-over-io_uring is asked for.
pub const FUSE_URING_MINOR_VERSION: u32 = 42;

// OPEN reply flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_NONSEEKABLE: u32 = 1 << 2;
pub const FOPEN_NOFLUSH: u32 = 1 << 5;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

// IOCTL flags.
pub const FUSE_IOCTL_COMPAT: u32 = 1 << 0;
pub const FUSE_IOCTL_UNRESTRICTED: u32 = 1 << 1;
pub const FUSE_IOCTL_RETRY: u32 = 1 << 2;
pub const FUSE_IOCTL_32BIT: u32 = 1 << 3;
pub const FUSE_IOCTL_DIR: u32 = 1 << 4;
pub const FUSE_IOCTL_COMPAT_X32: u32 = 1 << 5;
pub const FUSE_IOCTL_MAX_IOV: usize = 256;

pub const FUSE_POLL_SCHEDULE_NOTIFY: u32 = 1 << 0;
pub const FUSE_NOTIFY_POLL: i32 = 1;

/// `FUSE_DEV_IOC_BACKING_OPEN`: `_IOW(229, 1, struct fuse_backing_map)`.
pub const FUSE_DEV_IOC_BACKING_OPEN: u32 = 0x4010_e501;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
pub const FUSE_DEV_IOC_BACKING_CLOSE: u32 = 0x4004_e502;

macro_rules! wire {
    ($($(#[$m:meta])* pub struct $name:ident { $(pub $f:ident: $t:ty),* $(,)? })*) => {$(
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
        pub struct $name { $(pub $f: $t),* }
    )*};
}

wire! {
    pub struct InHeader {
        pub len: u32, pub opcode: u32, pub unique: u64, pub nodeid: u64,
        pub uid: u32, pub gid: u32, pub pid: u32, pub total_extlen: u16, pub padding: u16,
    }
    pub struct OutHeader { pub len: u32, pub error: i32, pub unique: u64 }
    pub struct InitIn {
        pub major: u32, pub minor: u32, pub max_readahead: u32, pub flags: u32,
    }
    pub struct InitInExt { pub flags2: u32, pub unused: [u32; 11] }
    pub struct InitOut {
        pub major: u32, pub minor: u32, pub max_readahead: u32, pub flags: u32,
        pub max_background: u16, pub congestion_threshold: u16, pub max_write: u32,
        pub time_gran: u32, pub max_pages: u16, pub map_alignment: u16, pub flags2: u32,
        pub max_stack_depth: u32, pub unused: [u32; 6],
    }
    pub struct CuseInitIn { pub major: u32, pub minor: u32, pub unused: u32, pub flags: u32 }
    pub struct CuseInitOut {
        pub major: u32, pub minor: u32, pub unused: u32, pub flags: u32, pub max_read: u32,
        pub max_write: u32, pub dev_major: u32, pub dev_minor: u32, pub spare: [u32; 10],
    }
    pub struct Attr {
        pub ino: u64, pub size: u64, pub blocks: u64, pub atime: u64, pub mtime: u64,
        pub ctime: u64, pub atimensec: u32, pub mtimensec: u32, pub ctimensec: u32,
        pub mode: u32, pub nlink: u32, pub uid: u32, pub gid: u32, pub rdev: u32,
        pub blksize: u32, pub flags: u32,
    }
    pub struct EntryOut {
        pub nodeid: u64, pub generation: u64, pub entry_valid: u64, pub attr_valid: u64,
        pub entry_valid_nsec: u32, pub attr_valid_nsec: u32, pub attr: Attr,
    }
    pub struct AttrOut { pub attr_valid: u64, pub attr_valid_nsec: u32, pub dummy: u32, pub attr: Attr }
    pub struct GetattrIn { pub getattr_flags: u32, pub dummy: u32, pub fh: u64 }
    pub struct OpenIn { pub flags: u32, pub open_flags: u32 }
    pub struct OpenOut { pub fh: u64, pub open_flags: u32, pub backing_id: i32 }
    pub struct ReleaseIn { pub fh: u64, pub flags: u32, pub release_flags: u32, pub lock_owner: u64 }
    pub struct ForgetIn { pub nlookup: u64 }
    pub struct BatchForgetIn { pub count: u32, pub dummy: u32 }
    pub struct ForgetOne { pub nodeid: u64, pub nlookup: u64 }
    pub struct ReadIn {
        pub fh: u64, pub offset: u64, pub size: u32, pub read_flags: u32, pub lock_owner: u64,
        pub flags: u32, pub padding: u32,
    }
    pub struct WriteIn {
        pub fh: u64, pub offset: u64, pub size: u32, pub write_flags: u32, pub lock_owner: u64,
        pub flags: u32, pub padding: u32,
    }
    pub struct WriteOut { pub size: u32, pub padding: u32 }
    pub struct InterruptIn { pub unique: u64 }
    pub struct IoctlIn {
        pub fh: u64, pub flags: u32, pub cmd: u32, pub arg: u64, pub in_size: u32, pub out_size: u32,
    }
    pub struct IoctlOut { pub result: i32, pub flags: u32, pub in_iovs: u32, pub out_iovs: u32 }
    pub struct IoctlIovec { pub base: u64, pub len: u64 }
    pub struct PollIn { pub fh: u64, pub kh: u64, pub flags: u32, pub events: u32 }
    pub struct PollOut { pub revents: u32, pub padding: u32 }
    pub struct NotifyPollWakeupOut { pub kh: u64 }
    pub struct Kstatfs {
        pub blocks: u64, pub bfree: u64, pub bavail: u64, pub files: u64, pub ffree: u64,
        pub bsize: u32, pub namelen: u32, pub frsize: u32, pub padding: u32, pub spare: [u32; 6],
    }
    pub struct Dirent { pub ino: u64, pub off: u64, pub namelen: u32, pub typ: u32 }
    pub struct BackingMap { pub fd: i32, pub flags: u32, pub padding: u64 }
}

/// Reads a `T` from the front of `buf`, returning it and the rest.
pub fn take<T: FromBytes>(buf: &[u8]) -> Option<(T, &[u8])> {
    T::read_from_prefix(buf).ok()
}
