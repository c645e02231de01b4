//! The KFD and DRM ioctl ABI, generated at build time from `ioctl-defs/*.toml`.

pub mod table;

#[allow(
    clippy::all,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    non_upper_case_globals
)]
mod generated {
    use super::table::*;
    include!(concat!(env!("OUT_DIR"), "/abi_gen.rs"));
}
pub use generated::*;
