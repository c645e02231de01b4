#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kfdmux_fuzz::targets::fuse_request(data));
