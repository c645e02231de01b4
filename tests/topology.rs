//! The generated KFD topology, read back with libhsakmt's parsing rule (`"%s %llu"` per line)
//! and checked against the presets.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use kfdmux::sysfs::{
    parse_properties, property, topology_command, write_amdgpu_module, write_topology, HostInfo,
    TopologyOptions, GPU_PROCESSOR_ID_BASE, SYSFS_PAGE,
};
use kfdmux::topology::{parse_gpus, preset, Gpu, HSA_CACHE_TYPE_HSACU, HSA_CAP_SVMAPI_SUPPORTED};

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        // tmpfs when available: the trees hold hundreds of small files.
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let p = base.join(format!(
            "kfdmux-topo-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn host() -> HostInfo {
    HostInfo {
        cpu_cores: 6,
        cpu_core_id_base: 4,
        mem_total_bytes: 32 << 30,
        cpu_max_mhz: 3500,
    }
}

fn opts() -> TopologyOptions {
    TopologyOptions {
        host: Some(host()),
        ..TopologyOptions::default()
    }
}

fn read(path: &Path) -> String {
    let s = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        s.len() < SYSFS_PAGE,
        "{} exceeds a sysfs page",
        path.display()
    );
    let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o444, "{}", path.display());
    s
}

fn props(path: &Path) -> BTreeMap<String, u64> {
    let text = read(path);
    let parsed = parse_properties(&text);
    // Every line but a trailing sibling_map must have been consumed by the sscanf loop.
    let lines = text
        .lines()
        .filter(|l| !l.starts_with("sibling_map"))
        .count();
    let consumed = parsed.iter().filter(|(k, _)| k != "sibling_map").count();
    assert_eq!(
        lines,
        consumed,
        "{} not fully parsed:\n{text}",
        path.display()
    );
    parsed.into_iter().collect()
}

fn count_subdirs(path: &Path) -> usize {
    fs::read_dir(path)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
        .count()
}

/// Kernel order of node property keys (kfd_topology.c), GPU nodes.
const GPU_KEYS: &[&str] = &[
    "cpu_cores_count",
    "simd_count",
    "mem_banks_count",
    "caches_count",
    "io_links_count",
    "p2p_links_count",
    "cpu_core_id_base",
    "simd_id_base",
    "max_waves_per_simd",
    "lds_size_in_kb",
    "gds_size_in_kb",
    "num_gws",
    "wave_front_size",
    "array_count",
    "simd_arrays_per_engine",
    "cu_per_simd_array",
    "simd_per_cu",
    "max_slots_scratch_cu",
    "gfx_target_version",
    "vendor_id",
    "device_id",
    "location_id",
    "domain",
    "drm_render_minor",
    "hive_id",
    "num_sdma_engines",
    "num_sdma_xgmi_engines",
    "num_sdma_queues_per_engine",
    "num_cp_queues",
    "max_engine_clk_fcompute",
    "local_mem_size",
    "fw_version",
    "capability",
    "debug_prop",
    "sdma_fw_version",
    "unique_id",
    "num_xcc",
    "max_engine_clk_ccompute",
];

/// Checks a written tree against the GPU list; returns the topology dir.
fn check_tree(dir: &Path, gpus: &[Gpu], o: &TopologyOptions) -> PathBuf {
    let topo = dir.join("kfd/topology");
    assert_eq!(read(&topo.join("generation_id")), "1\n");
    let sys = props(&topo.join("system_properties"));
    assert_eq!(sys.len(), 3);
    for k in ["platform_oem", "platform_id", "platform_rev"] {
        assert!(sys.contains_key(k), "{k}");
    }
    let nodes = topo.join("nodes");
    assert_eq!(count_subdirs(&nodes), gpus.len() + 1);

    // CPU node.
    let h = o.host.clone().unwrap();
    let n0 = nodes.join("0");
    assert_eq!(read(&n0.join("gpu_id")), "0\n");
    let cpu = props(&n0.join("properties"));
    assert_eq!(cpu["cpu_cores_count"], u64::from(h.cpu_cores));
    assert_eq!(cpu["cpu_core_id_base"], u64::from(h.cpu_core_id_base));
    assert_eq!(cpu["simd_count"], 0);
    assert_eq!(cpu["caches_count"], 0);
    assert_eq!(cpu["mem_banks_count"], 1);
    assert_eq!(cpu["io_links_count"], gpus.len() as u64);
    assert_eq!(cpu["max_engine_clk_ccompute"], u64::from(h.cpu_max_mhz));
    let bank = props(&n0.join("mem_banks/0/properties"));
    assert_eq!(bank["heap_type"], 0);
    assert_eq!(bank["size_in_bytes"], h.mem_total_bytes);
    assert_eq!(count_subdirs(&n0.join("io_links")), gpus.len());
    for (i, g) in gpus.iter().enumerate() {
        let l = props(&n0.join(format!("io_links/{i}/properties")));
        assert_eq!(l["type"], 2);
        assert_eq!(l["node_from"], 0);
        assert_eq!(l["node_to"], u64::from(g.node_id));
        assert!(l["max_bandwidth"] > l["min_bandwidth"]);
    }

    let mut ids = Vec::new();
    let mut simd_base = u64::from(GPU_PROCESSOR_ID_BASE);
    for (i, g) in gpus.iter().enumerate() {
        let p = g.preset;
        assert_eq!(g.node_id as usize, i + 1);
        let n = nodes.join(g.node_id.to_string());
        let id: u64 = read(&n.join("gpu_id")).trim().parse().unwrap();
        assert_eq!(id, u64::from(g.gpu_id));
        assert!(id != 0 && id <= 0xffff);
        ids.push(id);
        assert_eq!(read(&n.join("name")), format!("{}\n", p.kernel_name()));

        let text = read(&n.join("properties"));
        let keys: Vec<&str> = text.lines().filter_map(|l| l.split(' ').next()).collect();
        assert_eq!(keys, GPU_KEYS, "kernel key order");
        let np = props(&n.join("properties"));
        let want: &[(&str, u64)] = &[
            ("cpu_cores_count", 0),
            ("simd_count", u64::from(p.cu_count * p.simd_per_cu)),
            ("mem_banks_count", 1),
            ("io_links_count", 1),
            ("p2p_links_count", 0),
            ("simd_id_base", simd_base),
            ("max_waves_per_simd", p.max_waves_per_simd.into()),
            ("lds_size_in_kb", p.lds_size_in_kb.into()),
            ("gds_size_in_kb", p.gds_size_in_kb.into()),
            ("num_gws", p.num_gws.into()),
            ("wave_front_size", p.wave_front_size.into()),
            ("array_count", p.array_count.into()),
            ("simd_arrays_per_engine", p.simd_arrays_per_engine.into()),
            ("cu_per_simd_array", p.cu_per_simd_array.into()),
            ("simd_per_cu", p.simd_per_cu.into()),
            ("max_slots_scratch_cu", p.max_slots_scratch_cu.into()),
            ("gfx_target_version", p.gfx_target_version.into()),
            ("vendor_id", 0x1002),
            ("device_id", p.device_id.into()),
            ("location_id", g.location_id.into()),
            ("domain", g.domain.into()),
            ("drm_render_minor", u64::from(128 + g.index)),
            ("num_sdma_engines", p.num_sdma_engines.into()),
            ("num_sdma_xgmi_engines", p.num_sdma_xgmi_engines.into()),
            (
                "num_sdma_queues_per_engine",
                p.num_sdma_queues_per_engine.into(),
            ),
            ("num_cp_queues", p.num_cp_queues.into()),
            ("max_engine_clk_fcompute", p.max_engine_clk_fcompute.into()),
            ("local_mem_size", 0),
            ("fw_version", p.fw_version.into()),
            ("unique_id", g.unique_id),
            ("num_xcc", p.num_xcc.into()),
        ];
        for &(k, v) in want {
            assert_eq!(np[k], v, "node {} key {k}", g.node_id);
        }
        simd_base += np["simd_count"];
        let cap = np["capability"] as u32;
        assert_eq!(cap & !HSA_CAP_SVMAPI_SUPPORTED, p.capability);
        assert_eq!(cap & HSA_CAP_SVMAPI_SUPPORTED != 0, o.svm_capability);

        // Memory: one FB_PRIVATE bank of the preset's (or overridden) size.
        assert_eq!(count_subdirs(&n.join("mem_banks")), 1);
        let bank = props(&n.join("mem_banks/0/properties"));
        assert_eq!(bank["heap_type"], 1);
        assert_eq!(
            bank["size_in_bytes"],
            o.vram_bytes_override.unwrap_or(p.vram_bytes)
        );
        assert_eq!(bank["width"], u64::from(p.vram_width));
        assert_eq!(bank["mem_clk_max"], u64::from(p.mem_clk_max));
        assert_eq!(read(&n.join("mem_banks/0/used_memory")), "0\n");

        // Caches: all carry the HSA CU bit; the first of each level has the preset's size.
        let caches = np["caches_count"] as usize;
        assert!(caches > 0);
        assert_eq!(count_subdirs(&n.join("caches")), caches);
        let mut first_size = BTreeMap::new();
        let mut per_level = BTreeMap::new();
        for c in 0..caches {
            let cp = props(&n.join(format!("caches/{c}/properties")));
            assert_eq!(cp["type"] & u64::from(HSA_CACHE_TYPE_HSACU), 8, "cache {c}");
            assert!(cp["processor_id_low"] >= np["simd_id_base"]);
            assert!(cp.contains_key("sibling_map"));
            // ROCr's view: data caches only (instruction caches are dropped).
            if cp["type"] & 2 == 0 {
                first_size.entry(cp["level"]).or_insert(cp["size"]);
                *per_level.entry(cp["level"]).or_insert(0u64) += 1;
            }
        }
        assert_eq!(first_size[&1], u64::from(p.l1_kb), "L1 {}", p.name);
        assert_eq!(first_size[&2], u64::from(p.l2_kb), "L2 {}", p.name);
        assert_eq!(per_level[&2], u64::from(p.num_xcc), "one L2 per XCC");
        assert_eq!(first_size.get(&3).copied().unwrap_or(0), u64::from(p.l3_kb));

        // One PCIe link to the CPU.
        assert_eq!(count_subdirs(&n.join("io_links")), 1);
        let l = props(&n.join("io_links/0/properties"));
        assert_eq!(l["type"], 2);
        assert_eq!(l["node_from"], u64::from(g.node_id));
        assert_eq!(l["node_to"], 0);
        assert_eq!(l["weight"], 20);
        assert_eq!(count_subdirs(&n.join("p2p_links")), 0);
    }
    let mut uniq = ids.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), ids.len(), "gpu_ids distinct: {ids:?}");
    topo
}

#[test]
fn two_mi210() {
    let t = TempDir::new("90a");
    let gpus = parse_gpus("gfx90a:2").unwrap();
    assert_eq!(gpus.len(), 2);
    write_topology(&t.0, &gpus, &opts()).unwrap();
    let topo = check_tree(&t.0, &gpus, &opts());
    let np = props(&topo.join("nodes/1/properties"));
    assert_eq!(np["simd_count"], 416);
    assert_eq!(np["gfx_target_version"], 90010);
    assert_eq!(np["device_id"], 0x740f);
    assert_eq!(np["wave_front_size"], 64);
    let bank = props(&topo.join("nodes/2/mem_banks/0/properties"));
    assert_eq!(bank["size_in_bytes"], 64 << 30);
    assert_eq!(bank["width"], 4096);
    assert_ne!(gpus[0].location_id, gpus[1].location_id);
    assert_ne!(gpus[0].unique_id, gpus[1].unique_id);
    assert_eq!([gpus[0].render_minor, gpus[1].render_minor], [128, 129]);
}

#[test]
fn mi300x_has_eight_xccs() {
    let t = TempDir::new("942");
    let gpus = parse_gpus("gfx942").unwrap();
    write_topology(&t.0, &gpus, &opts()).unwrap();
    let topo = check_tree(&t.0, &gpus, &opts());
    let np = props(&topo.join("nodes/1/properties"));
    assert_eq!(np["num_xcc"], 8);
    assert_eq!(np["simd_count"], 1216);
    assert_eq!(np["gfx_target_version"], 90402);
    assert_eq!(np["device_id"], 0x74a1);
    let bank = props(&topo.join("nodes/1/mem_banks/0/properties"));
    assert_eq!(bank["size_in_bytes"], 192 << 30);
    assert_eq!(bank["width"], 8192);
    // 304 per-CU L1s, L2 per XCC, one 256 MiB L3.
    let mut l3 = 0;
    for c in 0..np["caches_count"] {
        let cp = props(&topo.join(format!("nodes/1/caches/{c}/properties")));
        if cp["level"] == 3 {
            assert_eq!(cp["size"], 262_144);
            l3 += 1;
        }
    }
    assert_eq!(l3, 1);
}

#[test]
fn mixed_list_keeps_order_and_processor_ids() {
    let t = TempDir::new("mixed");
    let gpus = parse_gpus("gfx1030,gfx90a").unwrap();
    assert_eq!(gpus[0].preset.name, "gfx1030");
    assert_eq!(gpus[1].preset.name, "gfx90a");
    write_topology(&t.0, &gpus, &opts()).unwrap();
    let topo = check_tree(&t.0, &gpus, &opts());
    let n1 = props(&topo.join("nodes/1/properties"));
    assert_eq!(n1["wave_front_size"], 32);
    assert_eq!(n1["simd_count"], 160);
    assert_eq!(n1["simd_id_base"], 0x8000_0000);
    let n2 = props(&topo.join("nodes/2/properties"));
    assert_eq!(n2["simd_id_base"], 0x8000_0000 + 160);
    assert_eq!(read(&topo.join("nodes/1/name")), "sienna_cichlid\n");
    assert_eq!(n1["drm_render_minor"], 128);
    assert_eq!(n2["drm_render_minor"], 129);
}

#[test]
fn options_override_vram_and_set_svm_bit() {
    let t = TempDir::new("opts");
    let gpus = parse_gpus("gfx1030").unwrap();
    let o = TopologyOptions {
        vram_bytes_override: Some(4 << 30),
        svm_capability: true,
        host: Some(host()),
    };
    write_topology(&t.0, &gpus, &o).unwrap();
    let topo = check_tree(&t.0, &gpus, &o);
    let cap = property(
        &parse_properties(&read(&topo.join("nodes/1/properties"))),
        "capability",
    )
    .unwrap();
    assert_ne!(cap & (1 << 27), 0);
}

#[test]
fn rewriting_replaces_the_tree() {
    let t = TempDir::new("rewrite");
    write_topology(&t.0, &parse_gpus("gfx90a:3").unwrap(), &opts()).unwrap();
    let gpus = parse_gpus("gfx942").unwrap();
    write_topology(&t.0, &gpus, &opts()).unwrap();
    check_tree(&t.0, &gpus, &opts());
    // No temporary directory is left behind.
    let leftovers: Vec<_> = fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("kfd")]);
}

#[test]
fn host_probe_is_sane() {
    let h = HostInfo::probe();
    assert!(h.cpu_cores >= 1);
    assert!(h.mem_total_bytes > 0);
}

#[test]
fn command_writes_default_tree() {
    let t = TempDir::new("cmd");
    topology_command("gfx90a:2", &t.0).unwrap();
    let o = TopologyOptions {
        host: Some(HostInfo::probe()),
        ..TopologyOptions::default()
    };
    check_tree(&t.0, &parse_gpus("gfx90a:2").unwrap(), &o);
    let err = topology_command("gfx999", &t.0).unwrap_err();
    assert!(err.contains("gfx999"), "{err}");
}

#[test]
fn amdgpu_module_files() {
    let t = TempDir::new("module");
    write_amdgpu_module(&t.0).unwrap();
    write_amdgpu_module(&t.0).unwrap(); // idempotent
    assert_eq!(read(&t.0.join("initstate")), "live\n");
    assert!(!read(&t.0.join("version")).trim().is_empty());
}

#[test]
fn bad_specs_are_rejected_with_clear_errors() {
    let e = parse_gpus("gfx999").unwrap_err();
    assert!(
        e.contains("gfx999")
            && e.contains("gfx90a")
            && e.contains("gfx942")
            && e.contains("gfx1030"),
        "{e}"
    );
    let e = parse_gpus("gfx90a:0").unwrap_err();
    assert!(e.contains("at least 1"), "{e}");
    let e = parse_gpus("gfx90a:x").unwrap_err();
    assert!(e.contains("'x'"), "{e}");
    let e = parse_gpus("gfx90a:65").unwrap_err();
    assert!(e.contains("64"), "{e}");
    let e = parse_gpus("gfx90a:40,gfx1030:25").unwrap_err();
    assert!(e.contains("64"), "{e}");
    assert!(parse_gpus("").is_err());
    assert!(parse_gpus("gfx90a,").is_err());
    assert!(parse_gpus("gfx90a:-1").is_err());
    assert_eq!(parse_gpus("gfx90a:40,gfx1030:24").unwrap().len(), 64);
    assert_eq!(parse_gpus(" gfx90a : 2 , gfx1030 ").unwrap().len(), 3);
}

#[test]
fn gpu_ids_are_stable() {
    let a = parse_gpus("gfx90a:2,gfx1030").unwrap();
    let b = parse_gpus("gfx90a:2,gfx1030").unwrap();
    let ids = |v: &[Gpu]| {
        v.iter()
            .map(|g| (g.gpu_id, g.unique_id))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&b));
    assert!(preset("gfx90a").is_some() && preset("gfx9000").is_none());
}
