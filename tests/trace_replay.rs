//! The checked-in traces (tests/traces/, made by scripts/record-traces) replay clean against the
//! sim — directly and through the FUSE transport — and replay catches a changed sim behaviour
//! or an edited recording with a diff naming the call and the field.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use kfdmux::trace::replay::{replay_trace, ReplayOptions, Via};
use kfdmux::trace::{Event, Trace};

fn traces() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/traces");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ktr"))
        .collect();
    v.sort();
    assert!(
        v.len() >= 2,
        "expected the rocminfo and check traces in {}",
        dir.display()
    );
    v
}

fn trace(name: &str) -> (PathBuf, Trace) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/traces")
        .join(name);
    let t = Trace::read(&p).unwrap();
    (p, t)
}

fn replay_clean(via: Via) {
    for p in traces() {
        let t = Trace::read(&p).unwrap();
        assert_eq!(t.torn_tail, 0, "{}", p.display());
        let rep = replay_trace(&t, &ReplayOptions::new(&p, via)).unwrap();
        let diffs: Vec<String> = rep.diffs.iter().map(|d| d.to_string()).collect();
        assert!(
            diffs.is_empty(),
            "{} via {via:?}:\n{}",
            p.display(),
            diffs.join("\n")
        );
        let ioctls = t.records.iter().filter(|r| r.ioctl().is_some()).count();
        assert_eq!(
            rep.calls + rep.skipped.len(),
            ioctls,
            "{}: every ioctl issued or skipped",
            p.display()
        );
        assert!(
            rep.calls >= 25,
            "{}: only {} calls replayed",
            p.display(),
            rep.calls
        );
        eprintln!(
            "{} via {via:?}: {} calls, {} opens, {} skipped",
            p.display(),
            rep.calls,
            rep.opens,
            rep.skipped.len()
        );
    }
}

#[test]
fn checked_in_traces_replay_clean_direct() {
    replay_clean(Via::Direct);
}

#[test]
fn checked_in_traces_replay_clean_through_fuse() {
    if !common::require(
        common::is_root() && common::have_fuse(),
        "root and /dev/fuse",
    ) {
        return;
    }
    replay_clean(Via::Fuse);
}

#[test]
fn check_trace_has_interleaved_contexts_and_a_blocking_wait() {
    // What makes the multi-context trace worth replaying: contexts alive at once, and a
    // WAIT_EVENTS that was still blocked when a later call (its SET_EVENT) started.
    let (_, t) = trace("check.ktr");
    let recs = t.by_seq();
    let mut live = std::collections::HashSet::new();
    let mut max_live = 0;
    for r in &recs {
        match &r.event {
            Event::Open { result: 0, .. } => {
                live.insert(r.ctx);
            }
            Event::Release => {
                live.remove(&r.ctx);
            }
            _ => {}
        }
        max_live = max_live.max(live.len());
    }
    assert!(max_live >= 3, "at most {max_live} contexts open at once");
    let overlapped = recs.iter().enumerate().any(|(i, r)| {
        r.ioctl().is_some_and(|io| {
            recs[i + 1..]
                .iter()
                .any(|n| n.ioctl().is_some() && n.t_ns < io.t_end_ns && n.seq > r.seq)
        })
    });
    assert!(overlapped, "no call started while another was blocked");
}

#[test]
fn changed_sim_behaviour_is_caught_with_call_and_field() {
    // The sim reports KFD 1.13 instead of the recorded 1.14.
    for (name, via) in [("rocminfo.ktr", Via::Direct), ("check.ktr", Via::Direct)] {
        let (p, t) = trace(name);
        let mut o = ReplayOptions::new(&p, via);
        o.kfd_minor = Some(13);
        let rep = replay_trace(&t, &o).unwrap();
        assert!(!rep.diffs.is_empty(), "{name}: replay did not notice");
        for d in &rep.diffs {
            assert_eq!(
                (d.call.as_str(), d.field.as_str()),
                ("GET_VERSION", "minor_version"),
                "{d}"
            );
            assert_eq!(
                (d.recorded.as_str(), d.replayed.as_str()),
                ("14", "13"),
                "{d}"
            );
        }
    }
}

#[test]
fn replay_cli_exit_status_and_diff_text() {
    let (p, _) = trace("rocminfo.ktr");
    let ok = Command::new(common::kfdmux_bin())
        .arg("replay")
        .arg(&p)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(text.contains("match"), "{text}");

    let bad = Command::new(common::kfdmux_bin())
        .arg("replay")
        .arg(&p)
        .args(["--kfd-minor", "13"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&bad.stdout);
    assert_eq!(bad.status.code(), Some(1), "{text}");
    assert!(
        text.contains("GET_VERSION: minor_version: recorded 14, replayed 13"),
        "{text}"
    );

    for (args, why) in [
        (
            vec!["--device", "kfd", "--kfd-path", "/nonexistent/kfd"],
            "/nonexistent/kfd does not exist",
        ),
        (vec!["--via", "cuse"], "cuse"),
    ] {
        let r = Command::new(common::kfdmux_bin())
            .arg("replay")
            .arg(&p)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains(why),
            "{args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
}

#[test]
fn edited_recording_is_caught_errno_and_output_field() {
    let (p, mut t) = trace("check.ktr");
    // 1. A recorded errno: the SET_EVENT on the other context failed with EINVAL; claim success.
    let set = t
        .records
        .iter_mut()
        .find(|r| {
            r.ioctl().is_some_and(|i| {
                kfdmux::trace::show::call_name(i.cmd) == "SET_EVENT" && i.result == -libc::EINVAL
            })
        })
        .expect("a failed SET_EVENT");
    let seq = set.seq;
    if let Event::Ioctl(i) = &mut set.event {
        i.result = 0;
        i.dev_result = 0;
    }
    // 2. An output field: the first AVAILABLE_MEMORY answer.
    let avail = t
        .records
        .iter_mut()
        .find(|r| {
            r.ioctl()
                .is_some_and(|i| kfdmux::trace::show::call_name(i.cmd) == "AVAILABLE_MEMORY")
        })
        .expect("an AVAILABLE_MEMORY");
    let aseq = avail.seq;
    if let Event::Ioctl(i) = &mut avail.event {
        i.arg_out[0] ^= 0x10;
    }
    let rep = replay_trace(&t, &ReplayOptions::new(&p, Via::Direct)).unwrap();
    let d: Vec<String> = rep.diffs.iter().map(|d| d.to_string()).collect();
    assert_eq!(rep.diffs.len(), 2, "{}", d.join("\n"));
    assert!(
        d.iter().any(|d| d.starts_with(&format!("#{seq} "))
            && d.contains("SET_EVENT: errno: recorded 0, replayed EINVAL")),
        "{}",
        d.join("\n")
    );
    assert!(
        d.iter().any(|d| d.starts_with(&format!("#{aseq} "))
            && d.contains("AVAILABLE_MEMORY: available: recorded")),
        "{}",
        d.join("\n")
    );
}

#[test]
fn trace_show_decodes_by_schema() {
    let (p, _) = trace("check.ktr");
    let out = Command::new(common::kfdmux_bin())
        .args(["trace", "show"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "# gpus=gfx90a:2",
        "open kfd = ctx 1",
        "GET_VERSION() = 0 => {major_version=1, minor_version=14}",
        "SET_EVENT({event_id=0x0}) = -1 EINVAL (Invalid argument)",
        "flags=KFD_IOC_ALLOC_MEM_FLAGS_VRAM|KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE",
        "event_type=KFD_IOC_EVENT_SIGNAL",
        "wait_result=KFD_IOC_WAIT_RESULT_TIMEOUT",
        "device_ids_array_ptr=0x",
        "→[0x35bf, 0xdeadbeef]",
        "= -1 EFAULT (Bad address) [device: 0]",
        "GET_VERSION() = -1 EBADF (Bad file descriptor) [refused by kfdmux]",
        "[drm_fd=",
        "close",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // Filters: one context; one call name; failures only.
    let ctx = Command::new(common::kfdmux_bin())
        .args(["trace", "show", "--context", "5"])
        .arg(&p)
        .output()
        .unwrap();
    let ctx = String::from_utf8_lossy(&ctx.stdout);
    let lines: Vec<&str> = ctx.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        lines.len() >= 5 && lines.iter().all(|l| l.contains(" ctx 5 ")),
        "{ctx}"
    );
    let failed = Command::new(common::kfdmux_bin())
        .args(["trace", "show", "--failed", "--call", "set_event"])
        .arg(&p)
        .output()
        .unwrap();
    let failed = String::from_utf8_lossy(&failed.stdout);
    let lines: Vec<&str> = failed.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 1, "{failed}");
    assert!(
        lines[0].contains("SET_EVENT") && lines[0].contains("EINVAL"),
        "{failed}"
    );
}

#[test]
fn trace_show_json_lines() {
    let (p, t) = trace("rocminfo.ktr");
    let out = Command::new(common::kfdmux_bin())
        .args(["trace", "show", "--json"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.len(),
        t.records.len() + 1,
        "header + one object per record"
    );
    assert!(
        lines[0].starts_with("{\"type\":\"header\",\"version\":1,"),
        "{}",
        lines[0]
    );
    for l in &lines {
        assert!(l.starts_with('{') && l.ends_with('}'), "{l}");
        assert_eq!(l.matches('{').count(), l.matches('}').count(), "{l}");
    }
    assert!(
        text.contains("\"name\":\"GET_VERSION\"")
            && text.contains("\"out\":{\"major_version\":1,\"minor_version\":14}"),
        "{text}"
    );
    assert!(text.contains("\"name\":\"ALLOC_MEMORY_OF_GPU\""));
    assert!(text.contains("\"type\":\"open\",\"file\":\"render0\""));
}
