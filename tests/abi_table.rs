//! Consistency of the generated ABI tables (`ioctl-defs/*.toml` → `kfdmux::abi`).

use kfdmux::abi::table::*;
use kfdmux::abi::*;
use zerocopy::{FromBytes, IntoBytes};

fn all_ioctls() -> impl Iterator<Item = (u32, &'static IoctlDef)> {
    KFD_IOCTLS
        .iter()
        .map(|d| (KFD_IOC_TYPE, d))
        .chain(DRM_IOCTLS.iter().map(|d| (DRM_IOC_TYPE, d)))
}

#[test]
fn variants_encode_their_nr_type_dir_and_size() {
    for (ty, def) in all_ioctls() {
        assert!(!def.variants.is_empty(), "{}", def.name);
        for v in def.variants {
            let ctx = format!("{} {}", def.name, v.label);
            assert_eq!(ioc_nr(v.cmd), def.nr, "{ctx}: nr");
            assert_eq!(ioc_type(v.cmd), ty, "{ctx}: type");
            assert_eq!(ioc_size(v.cmd) as usize, v.size, "{ctx}: size");
            let dir = match v.dir {
                Dir::None => IOC_NONE,
                Dir::Read => IOC_READ,
                Dir::Write => IOC_WRITE,
                Dir::ReadWrite => IOC_READ | IOC_WRITE,
            };
            assert_eq!(ioc_dir(v.cmd), dir, "{ctx}: dir");
            assert_eq!(ioc(dir, ty, def.nr, v.size as u32), v.cmd, "{ctx}: ioc()");
            match v.arg {
                None => {
                    assert_eq!(v.dir, Dir::None, "{ctx}");
                    assert_eq!(v.size, 0, "{ctx}");
                }
                Some(arg) => {
                    assert_ne!(v.dir, Dir::None, "{ctx}");
                    assert!(
                        v.size <= arg.size && v.size > 0,
                        "{ctx}: size vs {}",
                        arg.name
                    );
                    // A shorter (older) variant ends on a field boundary.
                    assert!(
                        v.size == arg.size || arg.fields.iter().any(|f| f.offset == v.size),
                        "{ctx}: prefix size {} splits a field",
                        v.size
                    );
                    assert_eq!(def.trailing, arg.trailing.is_some(), "{ctx}: trailing flag");
                }
            }
        }
        let cmds: std::collections::HashSet<u32> = def.variants.iter().map(|v| v.cmd).collect();
        assert_eq!(
            cmds.len(),
            def.variants.len(),
            "{}: two variants share a command",
            def.name
        );
    }
}

#[test]
fn fields_tile_every_struct_exactly() {
    assert!(STRUCTS.len() > 60, "only {} structs", STRUCTS.len());
    for s in STRUCTS {
        let mut off = 0;
        for f in s.fields {
            assert_eq!(f.offset, off, "{}.{}: gap or overlap", s.name, f.name);
            let want = match f.ty {
                Ty::U8 => 1,
                Ty::U16 => 2,
                Ty::U32 | Ty::I32 => 4,
                Ty::U64 | Ty::I64 => 8,
                Ty::Array(p, n) => {
                    n * match p {
                        Prim::U8 => 1,
                        Prim::U16 => 2,
                        Prim::U32 => 4,
                        Prim::U64 => 8,
                        Prim::Struct(sz) => sz,
                    }
                }
            };
            assert_eq!(f.size, want, "{}.{}: size vs type", s.name, f.name);
            off += f.size;
            if let Some(d) = f.decode {
                assert!(
                    flags(d).is_some(),
                    "{}.{}: decode table {d} missing",
                    s.name,
                    f.name
                );
            }
        }
        assert_eq!(off, s.size, "{}: fields do not add up to the size", s.name);
    }
}

#[test]
fn pointer_and_trailing_counts_name_count_fields() {
    let mut pointers = 0;
    for s in STRUCTS {
        for f in s.fields {
            if let Kind::Pointer(p) = &f.kind {
                pointers += 1;
                let c = s.field(p.count_field).unwrap_or_else(|| {
                    panic!("{}.{}: count {} missing", s.name, f.name, p.count_field)
                });
                assert!(
                    matches!(c.kind, Kind::Count),
                    "{}.{}: not kind=count",
                    s.name,
                    c.name
                );
                assert_eq!(f.size, 8, "{}.{}: pointers are 64-bit", s.name, f.name);
                assert!(p.elem_size > 0);
                if let Some(e) = p.elem {
                    assert_eq!(e.size, p.elem_size, "{}.{}", s.name, f.name);
                    assert_eq!(e.name, p.elem_name);
                }
            }
        }
        if let Some(t) = s.trailing {
            let c = s.field(t.count_field).expect("trailing count field");
            assert!(matches!(c.kind, Kind::Count));
        }
    }
    assert!(pointers >= 20, "only {pointers} pointer fields");
}

#[test]
fn kfd_table_is_sorted_and_complete() {
    let nrs: Vec<u32> = KFD_IOCTLS.iter().map(|d| d.nr).collect();
    let mut sorted = nrs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(nrs, sorted, "KFD_IOCTLS not sorted/unique");
    for nr in (0x01..=0x28).chain(0x80..=0x87) {
        let d = kfd_ioctl(nr).unwrap_or_else(|| panic!("nr {nr:#x} missing"));
        assert_eq!(d.nr, nr);
    }
    assert!(kfd_ioctl(0x00).is_none());
    assert!(kfd_ioctl(0x29).is_none());
    assert!(kfd_ioctl(0x88).is_none());
    assert_eq!(drm_ioctl(0x00).map(|d| d.name), Some("VERSION"));
    assert_eq!(drm_ioctl(0x05).map(|d| d.name), Some("GET_CLIENT"));
    assert_eq!(drm_ioctl(0x45).map(|d| d.name), Some("AMDGPU_INFO"));
    assert!(drm_ioctl(0x01).is_none());
}

/// Command values from the research table (../shared/research/kfd.md §2.1, gcc-computed there).
#[test]
fn commands_match_independently_computed_values() {
    let known: &[(u32, u32)] = &[
        (AMDKFD_IOC_GET_VERSION, 0x80084B01),
        (AMDKFD_IOC_CREATE_EVENT, 0xC0204B08),
        (AMDKFD_IOC_DESTROY_EVENT, 0x40084B09),
        (AMDKFD_IOC_SET_EVENT, 0x40084B0A),
        (AMDKFD_IOC_RESET_EVENT, 0x40084B0B),
        (AMDKFD_IOC_WAIT_EVENTS, 0xC0184B0C),
        (AMDKFD_IOC_DBG_ADDRESS_WATCH_DEPRECATED, 0x40104B0F),
        (AMDKFD_IOC_SET_SCRATCH_BACKING_VA, 0xC0104B11),
        (AMDKFD_IOC_GET_TILE_CONFIG, 0xC0284B12),
        (AMDKFD_IOC_SET_TRAP_HANDLER, 0x40184B13),
        (AMDKFD_IOC_GET_PROCESS_APERTURES_NEW, 0xC0104B14),
        (AMDKFD_IOC_ACQUIRE_VM, 0x40084B15),
        (AMDKFD_IOC_ALLOC_MEMORY_OF_GPU, 0xC0284B16),
        (AMDKFD_IOC_FREE_MEMORY_OF_GPU, 0x40084B17),
        (AMDKFD_IOC_MAP_MEMORY_TO_GPU, 0xC0184B18),
        (AMDKFD_IOC_UNMAP_MEMORY_FROM_GPU, 0xC0184B19),
        (AMDKFD_IOC_SET_CU_MASK, 0x40104B1A),
        (AMDKFD_IOC_GET_QUEUE_WAVE_STATE, 0xC0184B1B),
        (AMDKFD_IOC_GET_DMABUF_INFO, 0xC0204B1C),
        (AMDKFD_IOC_IMPORT_DMABUF, 0xC0184B1D),
        (AMDKFD_IOC_ALLOC_QUEUE_GWS, 0xC0104B1E),
        (AMDKFD_IOC_SMI_EVENTS, 0xC0084B1F),
        (AMDKFD_IOC_SVM, 0xC0184B20),
        (AMDKFD_IOC_SET_XNACK_MODE, 0xC0044B21),
        (AMDKFD_IOC_CRIU_OP, 0xC0384B22),
        (AMDKFD_IOC_AVAILABLE_MEMORY, 0xC0104B23),
        (AMDKFD_IOC_EXPORT_DMABUF, 0xC0104B24),
        (AMDKFD_IOC_RUNTIME_ENABLE, 0xC0104B25),
        (AMDKFD_IOC_DBG_TRAP, 0xC0204B26),
        (AMDKFD_IOC_CREATE_PROCESS, 0x00004B27),
        (AMDKFD_IOC_CREATE_PROCESS_ROCM, 0xC0084B27),
        (AMDKFD_IOC_CREATE_PROCESS_DRAFT, 0x80084B27),
        (AMDKFD_IOC_PROFILER, 0xC0104B28),
        (AMDKFD_IOC_IPC_IMPORT_HANDLE, 0xC0304B80),
        (AMDKFD_IOC_IPC_EXPORT_HANDLE, 0xC0204B81),
        (AMDKFD_IOC_DBG_TRAP_DEPRECATED, 0xC0284B82),
        (AMDKFD_IOC_CROSS_MEMORY_COPY, 0xC0304B83),
        (AMDKFD_IOC_RLC_SPM, 0xC0204B84),
        (AMDKFD_IOC_PC_SAMPLE, 0xC0204B85),
        (AMDKFD_IOC_CREATE_QUEUE, 0xC0604B02),
        (AMDKFD_IOC_CREATE_QUEUE_V1, 0xC0584B02),
        (DRM_IOCTL_VERSION, 0xC0406400),
        (DRM_IOCTL_GET_CLIENT, 0xC0286405),
        (DRM_IOCTL_AMDGPU_INFO, 0x40206445),
    ];
    for &(got, want) in known {
        assert_eq!(got, want, "{got:#x} != {want:#x}");
    }
    assert_eq!(KFD_NR_SVM, 0x20);
    assert_eq!(DRM_NR_AMDGPU_INFO, DRM_COMMAND_BASE + DRM_AMDGPU_INFO);
}

#[test]
fn variant_for_picks_by_command_then_size() {
    let cq = kfd_ioctl(KFD_NR_CREATE_QUEUE).expect("CREATE_QUEUE");
    let new = cq.variant_for(AMDKFD_IOC_CREATE_QUEUE).expect("0x60");
    assert_eq!((new.size, new.label), (0x60, "upstream"));
    let old = cq.variant_for(AMDKFD_IOC_CREATE_QUEUE_V1).expect("0x58");
    assert_eq!((old.size, old.label), (0x58, "v1"));
    // Same size, other direction bits: the kernel ignores them, so do we.
    let odd = ioc(IOC_WRITE, KFD_IOC_TYPE, KFD_NR_CREATE_QUEUE, 0x58);
    assert_eq!(cq.variant_for(odd).map(|v| v.size), Some(0x58));
    assert!(cq
        .variant_for(ioc(IOC_READ | IOC_WRITE, KFD_IOC_TYPE, 2, 0x5c))
        .is_none());

    let svm = kfd_ioctl(KFD_NR_SVM).expect("SVM");
    assert!(svm.trailing);
    let three = AMDKFD_IOC_SVM + ((3 * 8) << IOC_SIZESHIFT);
    let v = svm.variant_for(three).expect("SVM with 3 attrs");
    assert_eq!(v.size, 24);
    let t = v.arg.and_then(|a| a.trailing).expect("trailing attrs");
    assert_eq!((t.elem_size, t.count_field, t.io), (8, "nattr", Io::InOut));
    assert!(svm
        .variant_for(AMDKFD_IOC_SVM + (5 << IOC_SIZESHIFT))
        .is_none());
    assert!(svm.variant_for(ioc(3, KFD_IOC_TYPE, 0x20, 16)).is_none());

    let cp = kfd_ioctl(KFD_NR_CREATE_PROCESS).expect("CREATE_PROCESS");
    assert_eq!(
        cp.variant_for(AMDKFD_IOC_CREATE_PROCESS).map(|v| v.label),
        Some("upstream")
    );
    assert_eq!(
        cp.variant_for(AMDKFD_IOC_CREATE_PROCESS_ROCM)
            .map(|v| v.label),
        Some("rocm")
    );
    assert_eq!(
        cp.variant_for(AMDKFD_IOC_CREATE_PROCESS_DRAFT)
            .map(|v| v.label),
        Some("draft")
    );
    let draft = cp
        .variant_for(AMDKFD_IOC_CREATE_PROCESS_DRAFT)
        .and_then(|v| v.arg);
    assert_eq!(
        draft.and_then(|a| a.field("pasid")).map(|f| f.io),
        Some(Io::Out)
    );
}

#[test]
fn roles_of_key_fields() {
    let ap = &S_KFD_IOCTL_GET_PROCESS_APERTURES_NEW_ARGS;
    let Some(FieldDef {
        kind: Kind::Pointer(p),
        ..
    }) = ap.field("kfd_process_device_apertures_ptr")
    else {
        panic!("apertures ptr is not a pointer")
    };
    assert_eq!(
        (p.count_field, p.elem_size, p.io),
        ("num_of_nodes", 56, Io::Out)
    );

    let Some(FieldDef {
        kind: Kind::Pointer(p),
        ..
    }) = S_KFD_IOCTL_WAIT_EVENTS_ARGS.field("events_ptr")
    else {
        panic!("events_ptr")
    };
    assert_eq!(
        (p.count_field, p.elem_size, p.io),
        ("num_events", 48, Io::InOut)
    );

    let Some(FieldDef {
        kind: Kind::Pointer(p),
        ..
    }) = S_KFD_IOCTL_SET_CU_MASK_ARGS.field("cu_mask_ptr")
    else {
        panic!("cu_mask_ptr")
    };
    assert_eq!((p.count_unit, p.elem_size), (CountUnit::Bits, 4));

    let a = &S_KFD_IOCTL_ALLOC_MEMORY_OF_GPU_ARGS;
    assert!(matches!(
        a.field("handle").map(|f| (&f.kind, f.io)),
        Some((Kind::Handle(HandleKind::Buffer), Io::Out))
    ));
    assert!(matches!(
        a.field("mmap_offset").map(|f| &f.kind),
        Some(Kind::MmapOffset)
    ));
    assert!(matches!(
        a.field("gpu_id").map(|f| &f.kind),
        Some(Kind::GpuId)
    ));
    assert!(matches!(
        S_KFD_IOCTL_ACQUIRE_VM_ARGS.field("drm_fd").map(|f| &f.kind),
        Some(Kind::Fd)
    ));
    assert!(matches!(
        S_KFD_IOCTL_GET_CLOCK_COUNTERS_ARGS
            .field("gpu_clock_counter")
            .map(|f| &f.kind),
        Some(Kind::Volatile)
    ));
    assert!(matches!(
        S_KFD_IOCTL_CREATE_EVENT_ARGS
            .field("event_id")
            .map(|f| &f.kind),
        Some(Kind::Handle(HandleKind::Event))
    ));
    let Some(FieldDef {
        kind: Kind::Pointer(p),
        ..
    }) = S_DRM_VERSION.field("name")
    else {
        panic!("drm_version.name")
    };
    assert_eq!(
        (p.count_field, p.count_unit, p.io),
        ("name_len", CountUnit::Bytes, Io::Out)
    );
    assert_eq!(S_DRM_VERSION.size, 64);
    assert_eq!(S_DRM_CLIENT.size, 40);
    assert_eq!(S_DRM_AMDGPU_INFO.size, 32);
    assert_eq!(S_DRM_AMDGPU_INFO_DEVICE.size, 368);
    assert_eq!(S_KFD_EVENT_DATA.size, 48);
}

#[test]
fn rust_structs_agree_with_tables() {
    let mut q = KfdIoctlCreateQueueArgs::new_zeroed();
    q.gpu_id = 0x1234;
    q.queue_id = 7;
    q.metadata_ring_size = 9;
    let b = q.as_bytes();
    assert_eq!(b.len(), S_KFD_IOCTL_CREATE_QUEUE_ARGS.size);
    let s = &S_KFD_IOCTL_CREATE_QUEUE_ARGS;
    assert_eq!(s.get(b, "gpu_id"), Some(0x1234));
    assert_eq!(s.get(b, "queue_id"), Some(7));
    assert_eq!(s.get(b, "metadata_ring_size"), Some(9));
    // A short (0x58-byte) caller struct reads the newer fields as zero.
    assert_eq!(s.get(&b[..0x58], "metadata_ring_size"), Some(0));

    let mut bytes = [0u8; 48];
    assert!(S_KFD_EVENT_DATA.set(&mut bytes, "event_id", 42));
    let ev = KfdEventData::read_from_bytes(&bytes[..]).expect("48 bytes");
    assert_eq!(ev.event_id, 42);
    let age = KfdHsaSignalEventData::read_from_prefix(ev.memory_exception_data.as_bytes())
        .map(|(s, _)| s.last_event_age);
    assert_eq!(age.ok(), Some(0));

    let attr = KfdIoctlSvmAttribute {
        r#type: KFD_IOCTL_SVM_ATTR_ACCESS,
        value: 5,
    };
    assert_eq!(attr.as_bytes(), &[2, 0, 0, 0, 5, 0, 0, 0]);
}

#[test]
fn flags_tables_and_constants() {
    let alloc = flags("KFD_IOC_ALLOC_MEM_FLAGS").expect("alloc flags");
    assert!(alloc.bits);
    assert!(alloc
        .values
        .contains(&("KFD_IOC_ALLOC_MEM_FLAGS_USERPTR", 4)));
    assert_eq!(KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE, 1 << 31);
    assert_eq!(KFD_IOC_EVENT_MEMORY, 8);
    assert_eq!(KFD_IOC_WAIT_RESULT_FAIL, 2);
    assert_eq!(KFD_SIGNAL_EVENT_LIMIT, 4096);
    assert_eq!(AMDGPU_INFO_DEV_INFO, 0x16);
    assert_eq!(AMDGPU_INFO_READ_MMR_REG, 0x15);
    assert!(!flags("AMDGPU_INFO").expect("query enum").bits);
    assert!(flags("NO_SUCH_TABLE").is_none());
}
