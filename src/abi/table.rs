//! The contract types of the ABI schema. `build.rs` turns `ioctl-defs/*.toml` into `static`
//! tables of these types (and `#[repr(C)]` Rust structs); everything that needs to know what an
//! ioctl looks like — marshalling, validation, devices, tracing — reads these tables.

/// `_IOC_DIR` of a command, from the caller's point of view as in `<asm-generic/ioctl.h>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// `_IO`: no argument.
    None,
    /// `_IOR`: the kernel writes the struct back.
    Read,
    /// `_IOW`: the kernel only reads the struct.
    Write,
    /// `_IOWR`.
    ReadWrite,
}

/// Which way a field (or pointed-to array) travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    In,
    Out,
    InOut,
}

impl Io {
    pub fn is_in(self) -> bool {
        matches!(self, Io::In | Io::InOut)
    }
    pub fn is_out(self) -> bool {
        matches!(self, Io::Out | Io::InOut)
    }
}

/// Kinds of opaque handles a device hands out; replay remaps values of the same kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandleKind {
    Buffer,
    Event,
    Queue,
    Other,
}

/// How a count field counts the elements of the array it sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountUnit {
    /// The count is a number of elements.
    Elements,
    /// The count is a number of bytes.
    Bytes,
    /// The count is a number of bits, rounded up to whole elements (SET_CU_MASK).
    Bits,
}

/// A pointer field: a user address of an array whose length another field gives.
#[derive(Debug)]
pub struct PtrDef {
    /// Name of the element type (`u32`, or a struct name).
    pub elem_name: &'static str,
    /// Size of one element in bytes.
    pub elem_size: usize,
    /// The element's struct layout when it is a struct.
    pub elem: Option<&'static StructDef>,
    /// Name of the field (in the same struct) that holds the count.
    pub count_field: &'static str,
    pub count_unit: CountUnit,
    /// Which way the pointed-to memory travels.
    pub io: Io,
}

/// The role of a field beyond its direction.
#[derive(Debug)]
pub enum Kind {
    /// A plain value.
    Plain,
    /// Padding or reserved bytes.
    Pad,
    /// A GPU id (as in the topology's `gpu_id`).
    GpuId,
    /// An opaque handle of a kind.
    Handle(HandleKind),
    /// A file descriptor in the caller's table.
    Fd,
    /// An mmap offset on the kfd file or a render node (in or out).
    MmapOffset,
    /// A value that differs from run to run (clocks); not compared by replay.
    Volatile,
    /// A user address (GPU VA or CPU VA) used as a value, not followed.
    Address,
    /// The count of a pointer or trailing array.
    Count,
    /// A pointer to an array in the caller's memory.
    Pointer(&'static PtrDef),
    /// Bytes whose meaning depends on another field (a union); not decoded.
    Opaque,
}

/// Primitive type of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    U8,
    U16,
    U32,
    U64,
    I32,
    I64,
    /// An inline array: element type and length.
    Array(Prim, usize),
}

/// Element type of an inline array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prim {
    U8,
    U16,
    U32,
    U64,
    /// An inline array of structs (e.g. GET_PROCESS_APERTURES' 7 entries): size of one.
    Struct(usize),
}

#[derive(Debug)]
pub struct FieldDef {
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
    pub ty: Ty,
    pub io: Io,
    pub kind: Kind,
    /// Name of a flags/enum table in the schema that decodes this field, if any.
    pub decode: Option<&'static str>,
}

/// A trailing flexible array (SVM's `attrs[]`): its elements follow the fixed part.
#[derive(Debug)]
pub struct TrailingDef {
    pub elem_name: &'static str,
    pub elem_size: usize,
    pub elem: Option<&'static StructDef>,
    pub count_field: &'static str,
    pub io: Io,
}

#[derive(Debug)]
pub struct StructDef {
    pub name: &'static str,
    pub size: usize,
    pub fields: &'static [FieldDef],
    pub trailing: Option<&'static TrailingDef>,
}

/// One ABI variant of an ioctl number: a full command value and the layout it carries.
#[derive(Debug)]
pub struct IoctlVariant {
    /// The full 32-bit request value.
    pub cmd: u32,
    pub dir: Dir,
    /// `_IOC_SIZE(cmd)`; for trailing-array ioctls the size of the fixed part.
    pub size: usize,
    /// The argument struct; `None` for `_IO`.
    pub arg: Option<&'static StructDef>,
    /// A short label for the variant ("upstream", "rocm-5.2", "flags", …).
    pub label: &'static str,
}

#[derive(Debug)]
pub struct IoctlDef {
    /// `_IOC_NR`.
    pub nr: u32,
    /// Upper-case name without prefix, e.g. `GET_VERSION`.
    pub name: &'static str,
    /// Known variants, newest first.
    pub variants: &'static [IoctlVariant],
    /// Whether the size field may exceed the fixed size by whole trailing elements.
    pub trailing: bool,
}

/// A named set of flag bits or enum values, for decoding.
#[derive(Debug)]
pub struct FlagsDef {
    pub name: &'static str,
    /// true: bit flags (values OR-ed); false: enum values.
    pub bits: bool,
    pub values: &'static [(&'static str, u64)],
}

impl StructDef {
    pub fn field(&self, name: &str) -> Option<&'static FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Reads an unsigned field (1, 2, 4 or 8 bytes, little-endian) from `bytes`; zero when
    /// `bytes` is shorter than the field (the kernel zero-fills short user structs).
    pub fn get(&self, bytes: &[u8], name: &str) -> Option<u64> {
        let f = self.field(name)?;
        Some(read_uint(bytes, f.offset, f.size))
    }

    /// Writes an unsigned field; ignored where `bytes` is too short.
    pub fn set(&self, bytes: &mut [u8], name: &str, value: u64) -> bool {
        let Some(f) = self.field(name) else {
            return false;
        };
        write_uint(bytes, f.offset, f.size, value)
    }
}

/// Little-endian unsigned read of `size` bytes at `offset`; missing bytes read as zero.
pub fn read_uint(bytes: &[u8], offset: usize, size: usize) -> u64 {
    let mut v = [0u8; 8];
    let n = size.min(8);
    for (i, b) in v.iter_mut().enumerate().take(n) {
        *b = bytes.get(offset + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(v)
}

/// Little-endian unsigned write; false when it does not fit.
pub fn write_uint(bytes: &mut [u8], offset: usize, size: usize, value: u64) -> bool {
    let n = size.min(8);
    match bytes.get_mut(offset..offset + n) {
        Some(dst) => {
            dst.copy_from_slice(&value.to_le_bytes()[..n]);
            true
        }
        None => false,
    }
}

impl IoctlDef {
    /// The variant a caller's command selects: exact command first, then same size (the kernel
    /// dispatches on nr and takes any size; kfdmux accepts the sizes it knows).
    pub fn variant_for(&self, cmd: u32) -> Option<&'static IoctlVariant> {
        if let Some(v) = self.variants.iter().find(|v| v.cmd == cmd) {
            return Some(v);
        }
        let size = ioc_size(cmd) as usize;
        if self.trailing {
            return self.variants.iter().find(|v| {
                let elem = v
                    .arg
                    .and_then(|a| a.trailing)
                    .map(|t| t.elem_size)
                    .unwrap_or(0);
                size >= v.size && elem > 0 && (size - v.size).is_multiple_of(elem)
            });
        }
        self.variants.iter().find(|v| v.size == size)
    }
}

// `_IOC` field layout (asm-generic).
pub const IOC_NRBITS: u32 = 8;
pub const IOC_TYPEBITS: u32 = 8;
pub const IOC_SIZEBITS: u32 = 14;
pub const IOC_NRSHIFT: u32 = 0;
pub const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
pub const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
pub const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
pub const IOC_NONE: u32 = 0;
pub const IOC_WRITE: u32 = 1;
pub const IOC_READ: u32 = 2;

pub const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << IOC_DIRSHIFT) | (ty << IOC_TYPESHIFT) | (nr << IOC_NRSHIFT) | (size << IOC_SIZESHIFT)
}
pub const fn ioc_nr(cmd: u32) -> u32 {
    (cmd >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)
}
pub const fn ioc_type(cmd: u32) -> u32 {
    (cmd >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)
}
pub const fn ioc_size(cmd: u32) -> u32 {
    (cmd >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)
}
pub const fn ioc_dir(cmd: u32) -> u32 {
    cmd >> IOC_DIRSHIFT
}

/// `'K'`, the KFD ioctl type.
pub const KFD_IOC_TYPE: u32 = b'K' as u32;
/// `'d'`, the DRM ioctl type.
pub const DRM_IOC_TYPE: u32 = b'd' as u32;
