//! kfdmux: a userspace `/dev/kfd` that gives every open its own GPU context.
//!
//! See `README.md` for use and `../shared/DESIGN.md` (mirrored in `docs/`) for the architecture:
//! `transport` speaks FUSE, `abi` is the generated ioctl schema, `marshal` moves pointed-to
//! memory, `mux` maps open files to device contexts, `device` is the kernel below.

pub mod abi;
pub mod cdi;
pub mod check;
pub mod config;
pub mod daemon;
pub mod device;
#[cfg(feature = "deviceplugin")]
pub mod deviceplugin;
pub mod errno;
pub mod handover;
pub mod marshal;
pub mod mux;
pub mod policy;
pub mod run;
pub mod sysfs;
pub mod topology;
pub mod trace;
pub mod transport;
