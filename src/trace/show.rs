//! `kfdmux trace show`: one line per call, decoded from the schema like strace would print it if
//! it knew KFD, or one JSON object per line (`--json`).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::abi::table::{
    ioc_nr, ioc_size, ioc_type, read_uint, FieldDef, IoctlDef, IoctlVariant, Kind, Prim, StructDef,
    Ty, DRM_IOC_TYPE, KFD_IOC_TYPE,
};
use crate::device::FileKind;

use super::{errno_name, ArrayRec, Event, IoctlRec, Record, Stage, Trace};

/// Elements of an array printed before `...`.
const MAX_ELEMS: usize = 8;

#[derive(clap::Args, Debug, Clone)]
pub struct ShowOptions {
    /// The trace file (`kfdmux serve --record PATH`).
    pub path: PathBuf,
    /// Only these contexts (repeatable).
    #[arg(long = "context", value_name = "N")]
    pub contexts: Vec<u64>,
    /// Only calls made by this process id (pid or tgid).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Only these ioctls, by schema name (`GET_VERSION`, case-insensitive; repeatable).
    #[arg(long = "call", value_name = "NAME")]
    pub calls: Vec<String>,
    /// Only calls that failed.
    #[arg(long)]
    pub failed: bool,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The schema entry and variant of `cmd` (dispatched on the ioctl type as the mux does).
pub fn lookup(cmd: u32) -> Option<(&'static IoctlDef, &'static IoctlVariant)> {
    let def = match ioc_type(cmd) {
        KFD_IOC_TYPE => crate::abi::kfd_ioctl(ioc_nr(cmd)),
        DRM_IOC_TYPE => crate::abi::drm_ioctl(ioc_nr(cmd)),
        _ => None,
    }?;
    Some((def, def.variant_for(cmd)?))
}

/// The ioctl's name, or `ioctl(0x...)` when the schema does not know it.
pub fn call_name(cmd: u32) -> String {
    match lookup(cmd) {
        Some((d, _)) if ioc_type(cmd) == DRM_IOC_TYPE => format!("DRM_{}", d.name),
        Some((d, _)) => d.name.to_string(),
        None => format!("ioctl({cmd:#010x})"),
    }
}

fn signed(v: u64, size: usize) -> i64 {
    match size {
        4 => v as u32 as i32 as i64,
        _ => v as i64,
    }
}

/// A value decoded with a flags/enum table.
pub fn decode_flags(table: &str, v: u64) -> String {
    let Some(t) = crate::abi::flags(table) else {
        return format!("{v:#x}");
    };
    if !t.bits {
        return match t.values.iter().find(|(_, x)| *x == v) {
            Some((n, _)) => n.to_string(),
            None => v.to_string(),
        };
    }
    if v == 0 {
        return "0".into();
    }
    let mut parts = Vec::new();
    let mut rest = v;
    for (n, bit) in t.values {
        if *bit != 0 && rest & bit == *bit {
            parts.push(n.to_string());
            rest &= !bit;
        }
    }
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    parts.join("|")
}

fn hex_bytes(b: &[u8]) -> String {
    let end = b.iter().rposition(|&x| x != 0).map(|i| i + 1).unwrap_or(0);
    if end == 0 {
        return "0".into();
    }
    let mut s = String::from("x\"");
    for x in &b[..end.min(32)] {
        let _ = write!(s, "{x:02x}");
    }
    if end > 32 {
        s.push_str("...");
    }
    s.push('"');
    s
}

fn prim_size(p: Prim) -> usize {
    match p {
        Prim::U8 => 1,
        Prim::U16 => 2,
        Prim::U32 => 4,
        Prim::U64 => 8,
        Prim::Struct(n) => n,
    }
}

/// One field's value as text: handles, ids, offsets and addresses in hex, flags by name.
pub fn fmt_field(f: &FieldDef, b: &[u8]) -> String {
    if let Ty::Array(p, n) = f.ty {
        let es = prim_size(p);
        let bytes = b.get(f.offset..f.offset + f.size).unwrap_or(&[]);
        if matches!(p, Prim::Struct(_)) || matches!(f.kind, Kind::Opaque) {
            return hex_bytes(bytes);
        }
        let mut v: Vec<String> = (0..n.min(MAX_ELEMS))
            .map(|i| read_uint(bytes, i * es, es).to_string())
            .collect();
        if n > MAX_ELEMS {
            v.push("...".into());
        }
        return format!("[{}]", v.join(", "));
    }
    let v = read_uint(b, f.offset, f.size);
    match f.kind {
        Kind::Opaque => hex_bytes(b.get(f.offset..f.offset + f.size).unwrap_or(&[])),
        Kind::GpuId | Kind::Handle(_) | Kind::MmapOffset | Kind::Address | Kind::Pointer(_) => {
            format!("{v:#x}")
        }
        Kind::Fd => signed(v, f.size).to_string(),
        _ => match f.decode {
            Some(t) => decode_flags(t, v),
            None if matches!(f.ty, Ty::I32 | Ty::I64) => signed(v, f.size).to_string(),
            None => v.to_string(),
        },
    }
}

/// Whether a field is shown: not padding, and inside the bytes the caller passed.
fn visible(f: &FieldDef, len: usize) -> bool {
    !matches!(f.kind, Kind::Pad) && f.offset + f.size <= len
}

/// An element of a pointed-to array (a struct or an integer).
fn fmt_elem(elem: Option<&StructDef>, elem_size: usize, b: &[u8]) -> String {
    match elem {
        Some(sd) => {
            let parts: Vec<String> = sd
                .fields
                .iter()
                .filter(|f| visible(f, b.len()))
                .map(|f| format!("{}={}", f.name, fmt_field(f, b)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        None => format!("{:#x}", read_uint(b, 0, elem_size.min(8))),
    }
}

/// `[e0, e1, ...]` of an array's bytes.
pub fn fmt_array(sd: &StructDef, a: &ArrayRec, data: &[u8]) -> String {
    let (elem, es) = match sd.field(&a.field).map(|f| &f.kind) {
        Some(Kind::Pointer(p)) => (p.elem, p.elem_size),
        _ => (None, 0),
    };
    if es == 0 {
        return hex_bytes(data);
    }
    if es == 1 && elem.is_none() {
        // Byte arrays holding text are strings (DRM_VERSION's name, date, desc).
        let end = data.iter().position(|&c| c == 0).unwrap_or(data.len());
        if end > 0
            && data[..end]
                .iter()
                .all(|c| c.is_ascii_graphic() || *c == b' ')
        {
            return format!("{:?}", String::from_utf8_lossy(&data[..end]));
        }
        return hex_bytes(data);
    }
    // Trailing unused (all-zero) elements are counted, not printed.
    let used = data
        .chunks(es)
        .rposition(|c| c.iter().any(|&x| x != 0))
        .map(|i| i + 1)
        .unwrap_or(0);
    let data = &data[..used * es];
    let mut v: Vec<String> = data
        .chunks(es)
        .take(MAX_ELEMS)
        .map(|c| fmt_elem(elem, es, c))
        .collect();
    if data.len() / es > MAX_ELEMS {
        v.push(format!("... {} more", data.len() / es - MAX_ELEMS));
    }
    format!("[{}]", v.join(", "))
}

/// `{a=1, b=0x2}` of the struct fields travelling in (or out), with pointed-to arrays; `fields`
/// false prints only the out arrays (the struct is not copied back).
fn fmt_struct(sd: &StructDef, b: &[u8], out: bool, arrays: &[ArrayRec], fields: bool) -> String {
    let mut parts = Vec::new();
    for f in sd.fields.iter().filter(|f| visible(f, b.len())) {
        let out_array = out && arrays.iter().any(|a| a.field == f.name && a.io.is_out());
        if (out && !out_array && (!f.io.is_out() || !fields)) || (!out && !f.io.is_in()) {
            continue;
        }
        let mut s = format!("{}={}", f.name, fmt_field(f, b));
        if let Some(a) = arrays.iter().find(|a| a.field == f.name) {
            let data = if out { &a.data_out } else { &a.data_in };
            if (out && a.io.is_out()) || (!out && a.io.is_in()) {
                s = if out {
                    format!("{}={}", f.name, fmt_array(sd, a, data))
                } else {
                    format!("{s}→{}", fmt_array(sd, a, data))
                };
            } else if out {
                continue;
            }
        }
        parts.push(s);
    }
    if let Some(t) = sd.trailing {
        if t.elem_size > 0 && b.len() > sd.size {
            let v: Vec<String> = b[sd.size..]
                .chunks(t.elem_size)
                .take(MAX_ELEMS)
                .map(|c| fmt_elem(t.elem, t.elem_size, c))
                .collect();
            parts.push(format!("{}[]=[{}]", t.elem_name, v.join(", ")));
        }
    }
    format!("{{{}}}", parts.join(", "))
}

fn fmt_result(r: i32) -> String {
    if r == 0 {
        "0".into()
    } else {
        format!(
            "-1 {} ({})",
            errno_name(-r),
            std::io::Error::from_raw_os_error(-r)
                .to_string()
                .split(" (os error")
                .next()
                .unwrap_or("")
        )
    }
}

fn kind_name(kind: FileKind) -> String {
    match kind {
        FileKind::Kfd => "kfd".into(),
        FileKind::Render(i) => format!("render{i}"),
    }
}

/// The text line of one ioctl record (without time and context prefix).
pub fn fmt_ioctl(i: &IoctlRec) -> String {
    let name = call_name(i.cmd);
    let sd = lookup(i.cmd).and_then(|(_, v)| v.arg);
    let mut s = match sd {
        Some(sd) if i.stage == Stage::Device || !i.arg_in.is_empty() => {
            match fmt_struct(sd, &i.arg_in, false, &i.arrays, true) {
                e if e == "{}" => format!("{name}()"),
                a => format!("{name}({a})"),
            }
        }
        _ if lookup(i.cmd).is_none() => format!("{name}(size {})", ioc_size(i.cmd)),
        _ => format!("{name}()"),
    };
    let _ = write!(s, " = {}", fmt_result(i.result));
    if i.dev_result != i.result {
        let _ = write!(s, " [device: {}]", fmt_result(i.dev_result));
    }
    if let (Some(sd), Stage::Device) = (sd, i.stage) {
        let writes = lookup(i.cmd).is_some_and(|(_, v)| {
            matches!(
                v.dir,
                crate::abi::table::Dir::Read | crate::abi::table::Dir::ReadWrite
            )
        });
        let out = fmt_struct(
            sd,
            &i.arg_out,
            true,
            if i.dev_result == 0 { &i.arrays } else { &[] },
            writes,
        );
        if out != "{}" {
            let _ = write!(s, " => {out}");
        }
    }
    if i.stage == Stage::Mux {
        s.push_str(" [refused by kfdmux]");
    }
    for f in &i.fds {
        let _ = write!(s, " [{}={} is {:?}]", f.field, f.fd, f.target);
    }
    s
}

/// One strace-like line.
pub fn fmt_record(r: &Record) -> String {
    let t = r.t_ns as f64 / 1e9;
    let who = if r.pid == r.tgid {
        format!("{}", r.pid)
    } else {
        format!("{}/{}", r.tgid, r.pid)
    };
    let body = match &r.event {
        Event::Open {
            kind, result: 0, ..
        } => format!("open {} = ctx {}", kind_name(*kind), r.ctx),
        Event::Open { kind, result, .. } => {
            format!("open {} = {}", kind_name(*kind), fmt_result(*result))
        }
        Event::Release => "close".to_string(),
        Event::Ioctl(i) => format!(
            "{} <{:.6}>",
            fmt_ioctl(i),
            i.t_end_ns.saturating_sub(r.t_ns) as f64 / 1e9
        ),
    };
    format!("{t:12.6} ctx {:<3} pid {who:<7} {body}", r.ctx)
}

// ---- JSON -----------------------------------------------------------------------------------

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// A field's JSON value: numbers for plain values (as strings beyond 2^53), decoded text for
/// flags, hex strings for handles, ids, addresses and offsets.
fn json_field(f: &FieldDef, b: &[u8]) -> String {
    let plain = matches!(
        f.kind,
        Kind::Plain | Kind::Count | Kind::Volatile | Kind::Fd
    ) && f.decode.is_none()
        && !matches!(f.ty, Ty::Array(..));
    if plain {
        let v = read_uint(b, f.offset, f.size);
        if matches!(f.ty, Ty::I32 | Ty::I64) || matches!(f.kind, Kind::Fd) {
            return signed(v, f.size).to_string();
        }
        return if v < (1 << 53) {
            v.to_string()
        } else {
            json_str(&v.to_string())
        };
    }
    json_str(&fmt_field(f, b))
}

fn json_struct(sd: &StructDef, b: &[u8], out: bool) -> String {
    let parts: Vec<String> = sd
        .fields
        .iter()
        .filter(|f| visible(f, b.len()) && if out { f.io.is_out() } else { f.io.is_in() })
        .map(|f| format!("{}:{}", json_str(f.name), json_field(f, b)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn json_bytes(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2 + 2);
    s.push('"');
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s.push('"');
    s
}

/// One record as a JSON object.
pub fn json_record(r: &Record) -> String {
    let mut s = format!(
        "{{\"seq\":{},\"t_ns\":{},\"ctx\":{},\"pid\":{},\"tgid\":{}",
        r.seq, r.t_ns, r.ctx, r.pid, r.tgid
    );
    match &r.event {
        Event::Open {
            uid,
            gid,
            kind,
            result,
        } => {
            let _ = write!(
                s,
                ",\"type\":\"open\",\"file\":{},\"uid\":{uid},\"gid\":{gid},\"result\":{result}",
                json_str(&kind_name(*kind))
            );
        }
        Event::Release => s.push_str(",\"type\":\"close\""),
        Event::Ioctl(i) => {
            let _ = write!(
                s,
                ",\"type\":\"ioctl\",\"name\":{},\"cmd\":\"{:#010x}\",\"t_end_ns\":{},\"stage\":\"{}\",\"result\":{},\"dev_result\":{}",
                json_str(&call_name(i.cmd)),
                i.cmd,
                i.t_end_ns,
                if i.stage == Stage::Device { "device" } else { "mux" },
                i.result,
                i.dev_result
            );
            if i.result != 0 {
                let _ = write!(s, ",\"errno\":{}", json_str(&errno_name(-i.result)));
            }
            match lookup(i.cmd).and_then(|(_, v)| v.arg) {
                Some(sd) => {
                    let _ = write!(s, ",\"in\":{}", json_struct(sd, &i.arg_in, false));
                    if i.stage == Stage::Device {
                        let _ = write!(s, ",\"out\":{}", json_struct(sd, &i.arg_out, true));
                    }
                }
                None => {
                    let _ = write!(s, ",\"arg\":{}", json_bytes(&i.arg_in));
                }
            }
            let arrays: Vec<String> = i
                .arrays
                .iter()
                .map(|a| {
                    format!(
                        "{{\"field\":{},\"addr\":\"{:#x}\",\"in\":{},\"out\":{}}}",
                        json_str(&a.field),
                        a.addr,
                        json_bytes(&a.data_in),
                        json_bytes(&a.data_out)
                    )
                })
                .collect();
            let _ = write!(s, ",\"arrays\":[{}]", arrays.join(","));
            let fds: Vec<String> = i
                .fds
                .iter()
                .map(|f| {
                    format!(
                        "{{\"field\":{},\"fd\":{},\"target\":{}}}",
                        json_str(&f.field),
                        f.fd,
                        json_str(&format!("{:?}", f.target))
                    )
                })
                .collect();
            let _ = write!(s, ",\"fds\":[{}]", fds.join(","));
        }
    }
    s.push('}');
    s
}

fn selected(o: &ShowOptions, r: &Record) -> bool {
    if !o.contexts.is_empty() && !o.contexts.contains(&r.ctx) {
        return false;
    }
    if o.pid.is_some_and(|p| p != r.pid && p != r.tgid) {
        return false;
    }
    match &r.event {
        Event::Ioctl(i) => {
            if o.failed && i.result == 0 {
                return false;
            }
            o.calls.is_empty() || {
                let n = call_name(i.cmd);
                o.calls.iter().any(|c| {
                    c.eq_ignore_ascii_case(&n) || format!("DRM_{c}").eq_ignore_ascii_case(&n)
                })
            }
        }
        Event::Open { result, .. } => o.calls.is_empty() && (!o.failed || *result != 0),
        Event::Release => o.calls.is_empty() && !o.failed,
    }
}

/// The lines `trace show` prints, in start order.
pub fn render(o: &ShowOptions, t: &Trace) -> Vec<String> {
    let mut out = Vec::new();
    if o.json {
        let h: Vec<String> = t
            .header
            .entries
            .iter()
            .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
            .collect();
        out.push(format!(
            "{{\"type\":\"header\",\"version\":{},{}}}",
            t.version,
            h.join(",")
        ));
    } else {
        for (k, v) in &t.header.entries {
            out.push(format!("# {k}={v}"));
        }
    }
    for r in t.by_seq() {
        if selected(o, r) {
            out.push(if o.json {
                json_record(r)
            } else {
                fmt_record(r)
            });
        }
    }
    if t.torn_tail > 0 && !o.json {
        out.push(format!(
            "# {} bytes of an incomplete last record ignored",
            t.torn_tail
        ));
    }
    out
}

/// `kfdmux trace show`.
pub fn run(o: &ShowOptions) -> Result<i32, String> {
    use std::io::Write;
    let t = Trace::read(&o.path)?;
    let stdout = std::io::stdout();
    let mut w = std::io::BufWriter::new(stdout.lock());
    for l in render(o, &t) {
        if writeln!(w, "{l}").is_err() {
            return Ok(0); // a closed pipe (`| head`)
        }
    }
    let _ = w.flush();
    Ok(0)
}
