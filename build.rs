//! Generates `$OUT_DIR/abi_gen.rs` from `ioctl-defs/*.toml`: the `#[repr(C)]` argument structs,
//! their `StructDef` tables, the ioctl tables, flag/enum tables and constants. The format of the
//! TOML files is described in `docs/ioctl-defs.md`. Layouts are computed here with the C (x86-64
//! SysV) alignment rules; any implicit padding is an error so that every byte is named in the
//! schema (and `zerocopy::IntoBytes` holds).

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DefFile {
    meta: Meta,
    #[serde(default, rename = "struct")]
    structs: Vec<StructT>,
    #[serde(default, rename = "ioctl")]
    ioctls: Vec<IoctlT>,
    #[serde(default)]
    flags: Vec<FlagsT>,
    #[serde(default, rename = "const")]
    consts: Vec<ConstT>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    /// "kfd" or "drm": names the tables and the C headers the test compares with.
    family: String,
    /// The ioctl type character ('K', 'd').
    ioc_type: String,
    /// Prefix of the generated command constants (`AMDKFD_IOC_`, `DRM_IOCTL_`).
    cmd_prefix: String,
    /// Prefix of the generated nr constants (`KFD_NR_`, `DRM_NR_`).
    nr_prefix: String,
    /// Name of the generated ioctl table (`KFD_IOCTLS`).
    table: String,
    /// Name of the generated lookup function (`kfd_ioctl`).
    lookup: String,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct StructT {
    name: String,
    /// The C struct name to compare with; defaults to `name`; "" when C has no such struct.
    #[serde(default)]
    c_name: Option<String>,
    #[serde(default)]
    note: Option<String>,
    fields: Vec<FieldT>,
    #[serde(default)]
    trailing: Option<TrailT>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct FieldT {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    io: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    /// Pointer: name of the count field in the same struct.
    #[serde(default)]
    count: Option<String>,
    /// Pointer: elements | bytes | bits.
    #[serde(default)]
    unit: Option<String>,
    /// Pointer: element type (primitive or struct name).
    #[serde(default)]
    elem: Option<String>,
    /// Pointer: direction of the pointed-to memory.
    #[serde(default)]
    mem: Option<String>,
    #[serde(default)]
    decode: Option<String>,
    /// C member to compare with (default: `name`; "" = none).
    #[serde(default)]
    c_name: Option<String>,
    /// An older C name of the same member (e.g. `pad` before it got a meaning).
    #[serde(default)]
    aka: Option<String>,
    /// Padding C leaves implicit; we name it so that every byte is a field.
    #[serde(default)]
    implicit: bool,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct TrailT {
    elem: String,
    count: String,
    io: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IoctlT {
    nr: u32,
    name: String,
    #[serde(default)]
    note: Option<String>,
    /// C macro name when it differs from `cmd_prefix + name`.
    #[serde(default)]
    c_macro: Option<String>,
    variants: Vec<VarT>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VarT {
    label: String,
    dir: String,
    #[serde(default)]
    arg: Option<String>,
    /// `_IOC_SIZE` when it is a prefix of `arg` (older, shorter ABI).
    #[serde(default)]
    size: Option<usize>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagsT {
    name: String,
    bits: bool,
    #[serde(default, rename = "type")]
    ty: Option<String>,
    /// Emit a `pub const` per value (default true).
    #[serde(default)]
    consts: Option<bool>,
    /// Compare the values with the C header (default true).
    #[serde(default)]
    c: Option<bool>,
    #[serde(default)]
    note: Option<String>,
    values: Vec<(String, i64)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConstT {
    name: String,
    value: i64,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    c: Option<bool>,
    #[serde(default)]
    note: Option<String>,
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
enum Base {
    Prim(&'static str, usize),
    Struct(String),
}

#[derive(Clone)]
struct FType {
    base: Base,
    dims: Vec<usize>,
}

fn prim(name: &str) -> Option<(&'static str, usize)> {
    Some(match name {
        "u8" => ("u8", 1),
        "u16" => ("u16", 2),
        "u32" => ("u32", 4),
        "u64" => ("u64", 8),
        "i32" => ("i32", 4),
        "i64" => ("i64", 8),
        _ => return None,
    })
}

fn parse_type(s: &str) -> FType {
    let s = s.trim();
    let (base, rest) = match s.find('[') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let mut dims = Vec::new();
    let mut r = rest;
    while let Some(stripped) = r.strip_prefix('[') {
        let end = stripped.find(']').unwrap_or_else(|| panic!("bad type {s}"));
        dims.push(
            stripped[..end]
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("bad dim in {s}")),
        );
        r = &stripped[end + 1..];
    }
    assert!(r.is_empty(), "bad type {s}");
    let base = match prim(base) {
        Some((n, sz)) => Base::Prim(n, sz),
        None => Base::Struct(base.to_string()),
    };
    FType { base, dims }
}

fn camel(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn screaming(name: &str) -> String {
    name.to_ascii_uppercase()
}

fn ident(name: &str) -> String {
    const KW: &[&str] = &[
        "type", "in", "fn", "mod", "match", "loop", "ref", "use", "where", "impl", "move", "box",
        "enum", "struct", "trait", "self", "super", "crate", "const", "static", "let", "mut", "as",
        "break", "continue", "else", "if", "for", "while", "return", "pub", "true", "false",
        "unsafe", "extern", "dyn", "async", "await", "abstract", "final", "override", "priv",
        "macro", "yield", "try", "virtual", "do", "typeof", "unsized", "become",
    ];
    if KW.contains(&name) {
        format!("r#{name}")
    } else {
        name.to_string()
    }
}

fn lit(s: &str) -> String {
    format!("{s:?}")
}

fn io_of(s: &str, ctx: &str) -> &'static str {
    match s {
        "in" => "Io::In",
        "out" => "Io::Out",
        "inout" => "Io::InOut",
        _ => panic!("{ctx}: io must be in|out|inout, got {s:?}"),
    }
}

struct Layout {
    size: usize,
    align: usize,
    /// (offset, size, align) per field.
    fields: Vec<(usize, usize, usize)>,
}

struct Gen {
    structs: BTreeMap<String, (String, StructT)>, // name -> (family, def)
    layouts: HashMap<String, Layout>,
    flag_names: HashSet<String>,
}

impl Gen {
    fn type_size_align(&mut self, t: &FType, ctx: &str) -> (usize, usize) {
        let (sz, al) = match &t.base {
            Base::Prim(_, s) => (*s, *s),
            Base::Struct(n) => {
                let l = self.layout(n, ctx);
                (l.size, l.align)
            }
        };
        (sz * t.dims.iter().product::<usize>(), al)
    }

    fn layout(&mut self, name: &str, ctx: &str) -> &Layout {
        if !self.layouts.contains_key(name) {
            let fields: Vec<(String, String)> = match self.structs.get(name) {
                Some((_, s)) => s
                    .fields
                    .iter()
                    .map(|f| (f.name.clone(), f.ty.clone()))
                    .collect(),
                None => panic!("{ctx}: unknown struct type {name:?}"),
            };
            let mut off = 0usize;
            let mut align = 1usize;
            let mut out = Vec::new();
            for (fname, fty) in fields {
                let t = parse_type(&fty);
                let (sz, al) = self.type_size_align(&t, &format!("{name}.{fname}"));
                if !off.is_multiple_of(al) {
                    let pad = al - off % al;
                    panic!(
                        "struct {name}: C inserts {pad} bytes of implicit padding before field \
                         {fname} at offset {off}; add an explicit `implicit = true` pad field"
                    );
                }
                out.push((off, sz, al));
                off += sz;
                align = align.max(al);
            }
            let trailing_align = match self
                .structs
                .get(name)
                .and_then(|(_, s)| s.trailing.as_ref())
            {
                Some(t) => {
                    let elem = t.elem.clone();
                    self.type_size_align(&parse_type(&elem), name).1
                }
                None => 1,
            };
            align = align.max(trailing_align);
            if !off.is_multiple_of(align) {
                panic!(
                    "struct {name}: C adds {} bytes of tail padding at offset {off}; add an explicit \
                     `implicit = true` pad field",
                    align - off % align
                );
            }
            self.layouts.insert(
                name.to_string(),
                Layout {
                    size: off,
                    align,
                    fields: out,
                },
            );
        }
        &self.layouts[name]
    }
}

fn kind_expr(g: &mut Gen, sname: &str, f: &FieldT, field_names: &HashSet<&str>) -> String {
    let ctx = format!("{sname}.{}", f.name);
    let kind = f.kind.as_deref().unwrap_or("plain");
    if kind != "pointer" {
        for (k, v) in [
            ("count", &f.count),
            ("unit", &f.unit),
            ("elem", &f.elem),
            ("mem", &f.mem),
        ] {
            assert!(v.is_none(), "{ctx}: `{k}` only belongs to pointer fields");
        }
    }
    match kind {
        "plain" => "Kind::Plain".into(),
        "pad" => "Kind::Pad".into(),
        "gpu_id" => "Kind::GpuId".into(),
        "fd" => "Kind::Fd".into(),
        "mmap_offset" => "Kind::MmapOffset".into(),
        "volatile" => "Kind::Volatile".into(),
        "address" => "Kind::Address".into(),
        "count" => "Kind::Count".into(),
        "opaque" => "Kind::Opaque".into(),
        "handle:buffer" => "Kind::Handle(HandleKind::Buffer)".into(),
        "handle:event" => "Kind::Handle(HandleKind::Event)".into(),
        "handle:queue" => "Kind::Handle(HandleKind::Queue)".into(),
        "handle:other" => "Kind::Handle(HandleKind::Other)".into(),
        "pointer" => {
            let count = f
                .count
                .as_deref()
                .unwrap_or_else(|| panic!("{ctx}: pointer needs `count`"));
            assert!(
                field_names.contains(count),
                "{ctx}: count field {count:?} is not a field of {sname}"
            );
            let unit = match f.unit.as_deref().unwrap_or("elements") {
                "elements" => "CountUnit::Elements",
                "bytes" => "CountUnit::Bytes",
                "bits" => "CountUnit::Bits",
                u => panic!("{ctx}: unit must be elements|bytes|bits, got {u:?}"),
            };
            let elem = f
                .elem
                .as_deref()
                .unwrap_or_else(|| panic!("{ctx}: pointer needs `elem`"));
            let et = parse_type(elem);
            assert!(et.dims.is_empty(), "{ctx}: elem must not be an array");
            let (esz, _) = g.type_size_align(&et, &ctx);
            let elem_def = match &et.base {
                Base::Prim(..) => "None".to_string(),
                Base::Struct(n) => format!("Some(&S_{})", screaming(n)),
            };
            let mem = io_of(
                f.mem
                    .as_deref()
                    .unwrap_or_else(|| panic!("{ctx}: pointer needs `mem`")),
                &ctx,
            );
            format!(
                "Kind::Pointer(&PtrDef {{ elem_name: {}, elem_size: {esz}, elem: {elem_def}, \
                 count_field: {}, count_unit: {unit}, io: {mem} }})",
                lit(elem),
                lit(count)
            )
        }
        k => panic!("{ctx}: unknown kind {k:?}"),
    }
}

fn ty_expr(g: &mut Gen, t: &FType, ctx: &str) -> (String, String) {
    // (schema Ty, Rust type)
    let n: usize = t.dims.iter().product();
    match &t.base {
        Base::Prim(p, _) => {
            let schema_prim = match *p {
                "u8" => "Prim::U8",
                "u16" => "Prim::U16",
                "u32" => "Prim::U32",
                "u64" => "Prim::U64",
                _ if !t.dims.is_empty() => panic!("{ctx}: arrays of {p} are not in the schema"),
                _ => "",
            };
            let mut rust = p.to_string();
            for d in t.dims.iter().rev() {
                rust = format!("[{rust}; {d}]");
            }
            let schema = if t.dims.is_empty() {
                match *p {
                    "u8" => "Ty::U8",
                    "u16" => "Ty::U16",
                    "u32" => "Ty::U32",
                    "u64" => "Ty::U64",
                    "i32" => "Ty::I32",
                    "i64" => "Ty::I64",
                    _ => unreachable!(),
                }
                .to_string()
            } else {
                format!("Ty::Array({schema_prim}, {n})")
            };
            (schema, rust)
        }
        Base::Struct(s) => {
            let (esz, _) = g.type_size_align(
                &FType {
                    base: t.base.clone(),
                    dims: vec![],
                },
                ctx,
            );
            let mut rust = camel(s);
            for d in t.dims.iter().rev() {
                rust = format!("[{rust}; {d}]");
            }
            (format!("Ty::Array(Prim::Struct({esz}), {n})"), rust)
        }
    }
}

fn main() {
    #[cfg(feature = "deviceplugin")]
    deviceplugin_proto();
    println!("cargo:rerun-if-changed=ioctl-defs");
    println!("cargo:rerun-if-changed=build.rs");
    let dir = Path::new("ioctl-defs");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .expect("ioctl-defs/ is missing")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in &paths {
        println!("cargo:rerun-if-changed={}", p.display());
        let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let f: DefFile = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        files.push(f);
    }

    let mut g = Gen {
        structs: BTreeMap::new(),
        layouts: HashMap::new(),
        flag_names: HashSet::new(),
    };
    let mut ioctl_sets = Vec::new();
    let mut flags_all = Vec::new();
    let mut consts_all = Vec::new();
    for f in files {
        for s in f.structs {
            let name = s.name.clone();
            if g.structs
                .insert(name.clone(), (f.meta.family.clone(), s))
                .is_some()
            {
                panic!("struct {name} defined twice");
            }
        }
        for fl in &f.flags {
            assert!(
                g.flag_names.insert(fl.name.clone()),
                "flags {} defined twice",
                fl.name
            );
        }
        flags_all.extend(f.flags.into_iter().map(|x| (f.meta.family.clone(), x)));
        consts_all.extend(f.consts.into_iter().map(|x| (f.meta.family.clone(), x)));
        ioctl_sets.push((f.meta, f.ioctls));
    }

    let mut out = String::new();
    out.push_str("// @generated by build.rs from ioctl-defs/*.toml. Do not edit.\n\n");

    // ----- structs ------------------------------------------------------------------------
    let names: Vec<String> = g.structs.keys().cloned().collect();
    let mut c_structs = String::new();
    let mut all_structs = String::new();
    for name in &names {
        let size = g.layout(name, name).size;
        let offsets: Vec<(usize, usize)> = g.layouts[name]
            .fields
            .iter()
            .map(|&(o, s, _)| (o, s))
            .collect();
        let (family, s) = g.structs[name].clone();
        let s = &s;
        let rust = camel(name);
        let field_names: HashSet<&str> = s.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            field_names.len(),
            s.fields.len(),
            "struct {name}: duplicate field names"
        );

        let _ = writeln!(out, "/// `struct {name}` ({size} bytes).");
        if let Some(n) = &s.note {
            let _ = writeln!(out, "///\n/// {}", n.trim().replace('\n', "\n/// "));
        }
        let _ = writeln!(
            out,
            "#[repr(C)]\n#[derive(Clone, Copy, Debug, zerocopy::FromBytes, zerocopy::IntoBytes, \
             zerocopy::Immutable, zerocopy::KnownLayout)]\npub struct {rust} {{"
        );
        let mut fdefs = String::new();
        let mut cfields = String::new();
        for (i, f) in s.fields.iter().enumerate() {
            let ctx = format!("{name}.{}", f.name);
            let t = parse_type(&f.ty);
            let (schema_ty, rust_ty) = ty_expr(&mut g, &t, &ctx);
            if let Some(n) = &f.note {
                let _ = writeln!(out, "    /// {}", n.trim().replace('\n', "\n    /// "));
            }
            let _ = writeln!(out, "    pub {}: {rust_ty},", ident(&f.name));
            let kind = kind_expr(&mut g, name, f, &field_names);
            let io = io_of(f.io.as_deref().unwrap_or("in"), &ctx);
            if let Some(d) = &f.decode {
                assert!(
                    g.flag_names.contains(d),
                    "{ctx}: decode table {d:?} is not defined"
                );
            }
            if f.kind.as_deref() == Some("count") {
                // A count must be referenced by some pointer or by the trailing array.
                let used = s.fields.iter().any(|o| o.count.as_deref() == Some(&f.name))
                    || s.trailing.as_ref().is_some_and(|t| t.count == f.name);
                assert!(
                    used,
                    "{ctx}: kind=count but no pointer/trailing array counts with it"
                );
            }
            let decode = match &f.decode {
                Some(d) => format!("Some({})", lit(d)),
                None => "None".into(),
            };
            let (off, fsz) = offsets[i];
            let _ = writeln!(
                fdefs,
                "        FieldDef {{ name: {}, offset: {off}, size: {fsz}, ty: {schema_ty}, io: {io}, \
                 kind: {kind}, decode: {decode} }},",
                lit(&f.name)
            );
            let mut cn: Vec<String> = Vec::new();
            match f.c_name.as_deref() {
                // Padding C leaves implicit has no C name.
                _ if f.implicit => {}
                Some("") => {}
                Some(c) => cn.push(c.into()),
                None => cn.push(f.name.clone()),
            }
            if let Some(a) = &f.aka {
                cn.push(a.clone());
            }
            let cn_list: Vec<String> = cn.iter().map(|c| lit(c)).collect();
            let _ = writeln!(
                cfields,
                "        CField {{ name: {}, offset: {off}, c_names: &[{}], implicit: {} }},",
                lit(&f.name),
                cn_list.join(", "),
                f.implicit
            );
        }
        out.push_str("}\n");
        let trailing = match &s.trailing {
            Some(t) => {
                assert!(
                    field_names.contains(t.count.as_str()),
                    "{name}: trailing count {:?} unknown",
                    t.count
                );
                let et = parse_type(&t.elem);
                let (esz, _) = g.type_size_align(&et, name);
                let elem_def = match &et.base {
                    Base::Prim(..) => "None".to_string(),
                    Base::Struct(n) => format!("Some(&S_{})", screaming(n)),
                };
                format!(
                    "Some(&TrailingDef {{ elem_name: {}, elem_size: {esz}, elem: {elem_def}, \
                     count_field: {}, io: {} }})",
                    lit(&t.elem),
                    lit(&t.count),
                    io_of(&t.io, name)
                )
            }
            None => "None".into(),
        };
        let sname = format!("S_{}", screaming(name));
        let _ = writeln!(
            out,
            "/// Layout table of `struct {name}`.\npub static {sname}: StructDef = StructDef {{\n    \
             name: {},\n    size: {size},\n    fields: &[\n{fdefs}    ],\n    trailing: {trailing},\n}};",
            lit(name)
        );
        // Inherent, so that callers need not import `zerocopy::FromZeros`.
        let _ = writeln!(
            out,
            "impl {rust} {{\n    /// All bytes zero.\n    pub fn new_zeroed() -> Self {{\n        \
             <Self as zerocopy::FromZeros>::new_zeroed()\n    }}\n}}"
        );
        let _ = writeln!(
            out,
            "const _: () = assert!(::core::mem::size_of::<{rust}>() == {size});"
        );
        for (i, f) in s.fields.iter().enumerate() {
            let _ = writeln!(
                out,
                "const _: () = assert!(::core::mem::offset_of!({rust}, {}) == {});",
                ident(&f.name),
                offsets[i].0
            );
        }
        out.push('\n');
        let c_name = match s.c_name.as_deref() {
            Some(c) => c.to_string(),
            None => name.clone(),
        };
        let _ = writeln!(
            c_structs,
            "    CStruct {{ family: {}, def: &{sname}, c_name: {}, fields: &[\n{cfields}    ] }},",
            lit(&family),
            lit(&c_name)
        );
        let _ = writeln!(all_structs, "    &{sname},");
    }
    let _ = writeln!(
        out,
        "/// Every struct layout of the schema (argument structs and array elements).\n\
         pub static STRUCTS: &[&StructDef] = &[\n{all_structs}];\n"
    );

    // ----- ioctls -------------------------------------------------------------------------
    let mut c_ioctls = String::new();
    for (meta, mut ioctls) in ioctl_sets {
        if ioctls.is_empty() {
            continue;
        }
        assert_eq!(meta.ioc_type.len(), 1, "ioc_type must be one character");
        let ty = meta.ioc_type.as_bytes()[0] as u32;
        ioctls.sort_by_key(|i| i.nr);
        for w in ioctls.windows(2) {
            assert_ne!(
                w[0].nr, w[1].nr,
                "{}: nr {:#x} defined twice",
                meta.family, w[0].nr
            );
        }
        if let Some(n) = &meta.note {
            let _ = writeln!(
                out,
                "// {}: {}",
                meta.family,
                n.trim().replace('\n', "\n// ")
            );
        }
        let mut table = String::new();
        for io in &ioctls {
            assert!(io.nr < 256, "{}: nr out of range", io.name);
            assert!(!io.variants.is_empty(), "{}: no variants", io.name);
            let mut labels = HashSet::new();
            let mut vars = String::new();
            let mut trailing = false;
            let mut cmds = Vec::new();
            for (vi, v) in io.variants.iter().enumerate() {
                let ctx = format!("{} variant {}", io.name, v.label);
                assert!(labels.insert(v.label.clone()), "{ctx}: duplicate label");
                let (dirbits, dir) = match v.dir.as_str() {
                    "none" => (0u32, "Dir::None"),
                    "w" => (1, "Dir::Write"),
                    "r" => (2, "Dir::Read"),
                    "rw" => (3, "Dir::ReadWrite"),
                    d => panic!("{ctx}: dir must be none|r|w|rw, got {d:?}"),
                };
                let (size, arg) = match &v.arg {
                    Some(a) => {
                        assert!(g.structs.contains_key(a), "{ctx}: unknown struct {a}");
                        let full = g.layout(a, &ctx).size;
                        if g.structs[a].1.trailing.is_some() {
                            trailing = true;
                        }
                        let size = v.size.unwrap_or(full);
                        assert!(
                            size <= full,
                            "{ctx}: size {size} exceeds struct {a} ({full})"
                        );
                        // A prefix variant must end on a field boundary.
                        assert!(
                            size == full || g.layouts[a].fields.iter().any(|&(o, _, _)| o == size),
                            "{ctx}: size {size} does not end on a field boundary of {a}"
                        );
                        (size, format!("Some(&S_{})", screaming(a)))
                    }
                    None => {
                        assert!(v.size.unwrap_or(0) == 0, "{ctx}: size without arg");
                        assert_eq!(dirbits, 0, "{ctx}: a direction needs an arg struct");
                        (0, "None".to_string())
                    }
                };
                assert!(size < (1 << 14), "{ctx}: size too large");
                let cmd = (dirbits << 30) | ((size as u32) << 16) | (ty << 8) | io.nr;
                cmds.push(cmd);
                let _ = writeln!(
                    vars,
                    "        IoctlVariant {{ cmd: {cmd:#010x}, dir: {dir}, size: {size}, arg: {arg}, label: {} }},",
                    lit(&v.label)
                );
                let cname = if vi == 0 {
                    format!("{}{}", meta.cmd_prefix, io.name)
                } else {
                    let suffix: String = v
                        .label
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() {
                                c.to_ascii_uppercase()
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    format!("{}{}_{}", meta.cmd_prefix, io.name, suffix)
                };
                let mut doc = format!("`{}` nr {:#04x}, variant `{}`", io.name, io.nr, v.label);
                if let Some(n) = &v.note {
                    let _ = write!(doc, ": {}", n.trim().replace('\n', " "));
                }
                let _ = writeln!(out, "/// {doc}.\npub const {cname}: u32 = {cmd:#010x};");
            }
            let _ = writeln!(
                out,
                "pub const {}{}: u32 = {:#04x};",
                meta.nr_prefix, io.name, io.nr
            );
            if let Some(n) = &io.note {
                let _ = writeln!(table, "    // {}", n.trim().replace('\n', "\n    // "));
            }
            let _ = writeln!(
                table,
                "    IoctlDef {{\n        nr: {:#04x},\n        name: {},\n        variants: &[\n{vars}        ],\n        trailing: {trailing},\n    }},",
                io.nr,
                lit(&io.name)
            );
            let macro_name = io
                .c_macro
                .clone()
                .unwrap_or_else(|| format!("{}{}", meta.cmd_prefix, io.name));
            let cmds: Vec<String> = cmds.iter().map(|c| format!("{c:#010x}")).collect();
            let _ = writeln!(
                c_ioctls,
                "    CIoctl {{ family: {}, macro_name: {}, nr: {:#04x}, cmds: &[{}] }},",
                lit(&meta.family),
                lit(&macro_name),
                io.nr,
                cmds.join(", ")
            );
        }
        let _ = writeln!(
            out,
            "\n/// The {} ioctls, sorted by nr.\npub static {}: &[IoctlDef] = &[\n{table}];\n",
            meta.family, meta.table
        );
        let _ = writeln!(
            out,
            "/// The {fam} ioctl with `_IOC_NR` `nr`, if the schema knows it.\n\
             pub fn {lookup}(nr: u32) -> Option<&'static IoctlDef> {{\n    \
             {table}.binary_search_by_key(&nr, |d| d.nr).ok().and_then(|i| {table}.get(i))\n}}\n",
            fam = meta.family,
            lookup = meta.lookup,
            table = meta.table
        );
    }

    // ----- flags and constants -------------------------------------------------------------
    let mut consts_seen: HashMap<String, i64> = HashMap::new();
    let mut c_consts = String::new();
    let mut flags_tab = String::new();
    for (family, fl) in &flags_all {
        let ty = fl.ty.as_deref().unwrap_or("u32");
        assert!(prim(ty).is_some(), "flags {}: bad type {ty}", fl.name);
        let mut vals = String::new();
        if let Some(n) = &fl.note {
            let _ = writeln!(out, "// {}: {}", fl.name, n.trim().replace('\n', "\n// "));
        }
        for (vn, vv) in &fl.values {
            let _ = write!(vals, "({}, {:#x}), ", lit(vn), *vv as u64);
            if fl.consts.unwrap_or(true) {
                match consts_seen.get(vn) {
                    Some(old) => assert_eq!(old, vv, "constant {vn} defined with two values"),
                    None => {
                        consts_seen.insert(vn.clone(), *vv);
                        let _ = writeln!(out, "pub const {vn}: {ty} = {};", fmt_val(ty, *vv));
                        if fl.c.unwrap_or(true) {
                            let _ = writeln!(
                                c_consts,
                                "    CConst {{ family: {}, name: {}, value: {:#x} }},",
                                lit(family),
                                lit(vn),
                                *vv as u64
                            );
                        }
                    }
                }
            }
        }
        let _ = writeln!(
            flags_tab,
            "    FlagsDef {{ name: {}, bits: {}, values: &[{vals}] }},",
            lit(&fl.name),
            fl.bits
        );
    }
    for (family, c) in &consts_all {
        assert!(prim(&c.ty).is_some(), "const {}: bad type", c.name);
        match consts_seen.get(&c.name) {
            Some(old) => assert_eq!(*old, c.value, "constant {} defined with two values", c.name),
            None => {
                consts_seen.insert(c.name.clone(), c.value);
                if let Some(n) = &c.note {
                    let _ = writeln!(out, "/// {}", n.trim().replace('\n', " "));
                }
                let _ = writeln!(
                    out,
                    "pub const {}: {} = {};",
                    c.name,
                    c.ty,
                    fmt_val(&c.ty, c.value)
                );
                if c.c.unwrap_or(true) {
                    let _ = writeln!(
                        c_consts,
                        "    CConst {{ family: {}, name: {}, value: {:#x} }},",
                        lit(family),
                        lit(&c.name),
                        c.value as u64
                    );
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "\n/// Flag and enum tables for decoding fields (`FieldDef::decode` names one).\n\
         pub static FLAGS: &[FlagsDef] = &[\n{flags_tab}];\n\n\
         /// The flag/enum table called `name`.\n\
         pub fn flags(name: &str) -> Option<&'static FlagsDef> {{\n    FLAGS.iter().find(|f| f.name == name)\n}}\n"
    );

    // ----- C comparison tables (used by tests/abi_header.rs) --------------------------------
    let _ = writeln!(
        out,
        "/// What the C headers call the schema's items; `tests/abi_header.rs` compares them.\n\
         #[doc(hidden)]\npub mod c_header {{\n\
         use crate::abi::table::StructDef;\n\
         pub struct CField {{ pub name: &'static str, pub offset: usize, pub c_names: &'static [&'static str], pub implicit: bool }}\n\
         pub struct CStruct {{ pub family: &'static str, pub def: &'static StructDef, pub c_name: &'static str, pub fields: &'static [CField] }}\n\
         pub struct CIoctl {{ pub family: &'static str, pub macro_name: &'static str, pub nr: u32, pub cmds: &'static [u32] }}\n\
         pub struct CConst {{ pub family: &'static str, pub name: &'static str, pub value: u64 }}\n\
         pub static STRUCTS: &[CStruct] = &[\n{}];\n\
         pub static IOCTLS: &[CIoctl] = &[\n{c_ioctls}];\n\
         pub static CONSTS: &[CConst] = &[\n{c_consts}];\n}}",
        c_structs.replace("def: &S_", "def: &super::S_")
    );

    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("abi_gen.rs");
    std::fs::write(&dest, out).expect("write abi_gen.rs");
}

fn fmt_val(ty: &str, v: i64) -> String {
    match ty {
        "i32" | "i64" => format!("{v}"),
        "u8" | "u16" | "u32" | "u64" => {
            let u = v as u64;
            match ty {
                "u32" => assert!(u <= u32::MAX as u64, "value {v:#x} does not fit u32"),
                "u16" => assert!(u <= u16::MAX as u64, "value {v:#x} does not fit u16"),
                "u8" => assert!(u <= u8::MAX as u64, "value {v:#x} does not fit u8"),
                _ => {}
            }
            format!("{u:#x}")
        }
        _ => unreachable!(),
    }
}

/// The kubelet device-plugin API (src/deviceplugin/api.proto) → `$OUT_DIR/v1beta1.rs`, with the
/// protoc binary of the protoc-bin-vendored crate.
#[cfg(feature = "deviceplugin")]
fn deviceplugin_proto() {
    let proto = "src/deviceplugin/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("protoc-bin-vendored: no protoc");
    // prost-build finds protoc through $PROTOC (set before any thread is started).
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .compile_protos(&[proto], &["src/deviceplugin"])
        .unwrap_or_else(|e| panic!("{proto}: {e}"));
}
