//! Every input the fuzzers ever crashed on (fuzz/regressions/<target>/) and the committed corpus
//! (fuzz/corpus/<target>/), replayed through the very same target functions the libFuzzer
//! binaries run (`fuzz/src/targets.rs`), on the stable test runner. A crash found by
//! `scripts/fuzz` is fixed, then its input is copied into fuzz/regressions/<target>/ with a
//! name saying what it found (docs/fuzzing.md).

#[path = "../fuzz/src/kernel.rs"]
mod kernel;
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn inputs(dir: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&root)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let mut n = 0;
    for kind in ["regressions", "corpus"] {
        for (name, data) in inputs(&format!("{kind}/{target}")) {
            eprintln!("{target}: {kind}/{name} ({} bytes)", data.len());
            f(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn fuse_request_inputs() {
    let n = replay("fuse_request", targets::fuse_request);
    println!("fuse_request: {n} inputs replayed");
}

#[test]
fn cuse_retry_inputs() {
    let n = replay("cuse_retry", targets::cuse_retry);
    println!("cuse_retry: {n} inputs replayed");
}

#[test]
fn marshal_inputs() {
    let n = replay("marshal", targets::marshal);
    println!("marshal: {n} inputs replayed");
}

/// Includes `apertures-array-shrunk`, the first sim_ioctl find: GET_PROCESS_APERTURES_NEW hands
/// back a shorter out array than the client named (only filled entries are copied out, as the
/// kernel does). Shrinking is safe for the last out array only (the CUSE reply packs arrays back
/// to back); the oracle checks exactly that and this input keeps it covered.
#[test]
fn sim_ioctl_inputs() {
    let n = replay("sim_ioctl", targets::sim_ioctl);
    assert!(inputs("regressions/sim_ioctl")
        .iter()
        .any(|(n, _)| n == "apertures-array-shrunk"));
    println!("sim_ioctl: {n} inputs replayed");
}

/// Empty and truncated inputs: every target reads past the end as zeros.
#[test]
fn empty_and_tiny_inputs_are_harmless() {
    for t in [
        targets::fuse_request,
        targets::cuse_retry,
        targets::marshal,
        targets::sim_ioctl,
    ] {
        t(&[]);
        t(&[0]);
        t(&[0xFF; 7]);
    }
}
