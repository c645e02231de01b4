//! The sysfs trees ROCm reads, generated for a GPU list.
//!
//! `write_topology(DIR, ..)` writes `DIR/kfd/topology/...`, so `DIR` is what gets bind-mounted
//! on `/sys/devices/virtual/kfd` (the real path is `/sys/devices/virtual/kfd/kfd/topology`).
//! Files are laid out and formatted the way the kernel's `kfd_topology.c` prints them: one
//! `name value` per line, keys in kernel order (../shared/research/kfd.md §6).
//!
//! Modes: files are 0444 like sysfs; directories stay 0755 so that an unprivileged owner can
//! replace or delete a tree (root ignores modes either way).

use std::fmt::{self, Display, Write as _};
use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::topology::{parse_gpus, CacheScope, Gpu, HSA_CAP_SVMAPI_SUPPORTED};

/// sysfs attributes are at most one page; libhsakmt reads at most one page too.
pub const SYSFS_PAGE: usize = 4096;
/// Processor ids of GPU SIMDs start here (the kernel's `gpu_processor_id_low`).
pub const GPU_PROCESSOR_ID_BASE: u32 = 0x8000_0000;
/// `generation_id` of a freshly written tree.
pub const GENERATION_ID: u32 = 1;
/// io_link `type` for PCIe (CRAT_IOLINK_TYPE_PCIEXPRESS).
pub const IOLINK_TYPE_PCIE: u32 = 2;
/// io_link `weight` of a direct CPU<->GPU PCIe link.
pub const IOLINK_WEIGHT_PCIE: u32 = 20;
/// mem bank heap types.
pub const HEAP_TYPE_SYSTEM: u32 = 0;
pub const HEAP_TYPE_FB_PRIVATE: u32 = 1;
/// `/sys/module/amdgpu/version` content written by [`write_amdgpu_module`].
pub const AMDGPU_MODULE_VERSION: &str = "6.1.0-kfdmux";

/// The host facts the CPU node (node 0) is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Online CPUs (`cpu_cores_count`).
    pub cpu_cores: u32,
    /// An apicid from /proc/cpuinfo (`cpu_core_id_base`; libhsakmt finds the model name by it).
    pub cpu_core_id_base: u32,
    /// MemTotal in bytes (the CPU node's one mem bank).
    pub mem_total_bytes: u64,
    /// Maximum CPU clock in MHz (`max_engine_clk_ccompute`), 0 if unknown.
    pub cpu_max_mhz: u32,
}

impl HostInfo {
    /// Reads the running host: /sys/devices/system/cpu/online, /proc/cpuinfo, /proc/meminfo,
    /// cpufreq. Missing sources fall back to safe values (1 core, apicid 0, 0 bytes, 0 MHz).
    pub fn probe() -> HostInfo {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_cores = fs::read_to_string("/sys/devices/system/cpu/online")
            .ok()
            .and_then(|s| count_cpu_list(&s))
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .and_then(|n| u32::try_from(n.get()).ok())
            })
            .unwrap_or(1);
        let cpu_core_id_base = cpuinfo_field(&cpuinfo, "apicid")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mem_total_bytes = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb.saturating_mul(1024));
        let cpu_max_mhz =
            fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|khz| khz / 1000)
                .or_else(|| {
                    cpuinfo_field(&cpuinfo, "cpu MHz")
                        .and_then(|v| v.parse::<f64>().ok())
                        .map(|mhz| mhz.round() as u64)
                })
                .and_then(|mhz| u32::try_from(mhz).ok())
                .unwrap_or(0);
        HostInfo {
            cpu_cores: cpu_cores.max(1),
            cpu_core_id_base,
            mem_total_bytes,
            cpu_max_mhz,
        }
    }
}

/// Counts the CPUs in a sysfs cpu list such as `0-3,8,10-11`.
fn count_cpu_list(s: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let v = part.parse::<u32>().ok()?;
                (v, v)
            }
        };
        n = n.checked_add(hi.checked_sub(lo)?.checked_add(1)?)?;
    }
    (n > 0).then_some(n)
}

/// The value of the first `/proc/cpuinfo` line whose key is exactly `key`.
fn cpuinfo_field<'a>(cpuinfo: &'a str, key: &str) -> Option<&'a str> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// Knobs of the generated topology.
#[derive(Debug, Clone, Default)]
pub struct TopologyOptions {
    /// Report this VRAM size (bytes) for every GPU instead of the preset's.
    pub vram_bytes_override: Option<u64>,
    /// Set capability bit 27 (SVMAPISupported). The kernel sets it when built with SVM; newer
    /// libhsakmt then uses `AMDKFD_IOC_SVM` for registered memory. Off by default.
    pub svm_capability: bool,
    /// The host facts for node 0; `None` probes the running host.
    pub host: Option<HostInfo>,
}

/// One generated file: path relative to the tree root (`kfd/topology/...`) and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsFile {
    pub path: PathBuf,
    pub content: String,
}

/// `name value\n` lines, the kernel's `sysfs_show_{32,64}bit_prop` format.
struct Props(String);

impl Props {
    fn new() -> Props {
        Props(String::with_capacity(1024))
    }
    fn kv(&mut self, key: &str, value: impl Display) -> &mut Props {
        // Writing to a String cannot fail.
        let _ = writeln!(self.0, "{key} {value}");
        self
    }
}

impl fmt::Display for Props {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The link between a GPU node and the CPU node.
struct Link {
    from: u32,
    to: u32,
    pcie_gen: u32,
    flags: u32,
}

fn io_link_properties(l: &Link) -> String {
    // Bandwidth in MB/s as amdgpu_amdkfd_get_pcie_bandwidth_mbytes computes it:
    // min = Gen1 x1, max = x16 at the top supported generation.
    let gen_mbits = match l.pcie_gen {
        1 => 2500,
        2 => 5000,
        3 => 8000,
        4 => 16000,
        _ => 32000,
    };
    let mut p = Props::new();
    p.kv("type", IOLINK_TYPE_PCIE)
        .kv("version_major", 0)
        .kv("version_minor", 0)
        .kv("node_from", l.from)
        .kv("node_to", l.to)
        .kv("weight", IOLINK_WEIGHT_PCIE)
        .kv("min_latency", 0)
        .kv("max_latency", 0)
        .kv("min_bandwidth", 2500 / 8)
        .kv("max_bandwidth", 16 * gen_mbits / 8)
        .kv("recommended_transfer_size", 0)
        .kv("recommended_sdma_engine_id_mask", 0)
        .kv("flags", l.flags);
    p.0
}

fn mem_bank_properties(heap_type: u32, size: u64, width: u32, mem_clk_max: u32) -> String {
    let mut p = Props::new();
    p.kv("heap_type", heap_type)
        .kv("size_in_bytes", size)
        .kv("flags", 0)
        .kv("width", width)
        .kv("mem_clk_max", mem_clk_max);
    p.0
}

/// One cache instance of a GPU node.
struct CacheInst {
    processor_id_low: u32,
    level: u32,
    size_kb: u32,
    line_size: u32,
    hsa_type: u32,
    /// Sibling bits (one per CU in scope, active first), printed as `0,1,...`.
    siblings: u32,
    /// Bits printed: a multiple of 32 (4-byte map words, as the kernel keeps them for GPUs).
    map_bits: u32,
}

fn cache_properties(c: &CacheInst) -> String {
    let mut p = Props::new();
    p.kv("processor_id_low", c.processor_id_low)
        .kv("level", c.level)
        .kv("size", c.size_kb)
        .kv("cache_line_size", c.line_size)
        .kv("cache_lines_per_tag", 0)
        .kv("association", 0)
        .kv("latency", 0)
        .kv("type", c.hsa_type);
    let mut s = p.0;
    s.push_str("sibling_map ");
    for bit in 0..c.map_bits {
        s.push(if bit < c.siblings { '1' } else { '0' });
        s.push(if bit + 1 == c.map_bits { '\n' } else { ',' });
    }
    s
}

/// The caches of one GPU, instantiated the way the kernel walks XCC → shader array → CU group.
fn gpu_caches(gpu: &Gpu, simd_id_base: u32) -> Vec<CacheInst> {
    let p = gpu.preset;
    let arrays = p.cus_per_array();
    let xccs = p.num_xcc.max(1) as usize;
    let per_xcc = (arrays.len() / xccs).max(1);
    let slot = |array: usize, cu: u32| -> u32 {
        // Processor ids count physical CU slots from the node's simd_id_base.
        simd_id_base.wrapping_add(array as u32 * p.cu_per_simd_array + cu)
    };
    let round32 = |n: u32| n.div_ceil(32).max(1) * 32;
    let mut out = Vec::new();
    for kind in p.cache_kinds() {
        let mk = |processor_id_low, siblings, map_bits| CacheInst {
            processor_id_low,
            level: kind.level,
            size_kb: kind.size_kb,
            line_size: kind.line_size,
            hsa_type: kind.hsa_type,
            siblings,
            map_bits,
        };
        match kind.scope {
            CacheScope::CusInArray(shared) => {
                let shared = shared.max(1);
                for (a, &active) in arrays.iter().enumerate() {
                    let mut first = 0;
                    while first < active {
                        let n = shared.min(active - first);
                        out.push(mk(slot(a, first), n, 32));
                        first += shared;
                    }
                }
            }
            CacheScope::Xcc => {
                for x in 0..xccs {
                    let cus: u32 = arrays.iter().skip(x * per_xcc).take(per_xcc).sum();
                    out.push(mk(slot(x * per_xcc, 0), cus, round32(cus)));
                }
            }
            CacheScope::Gpu => out.push(mk(slot(0, 0), p.cu_count, round32(p.cu_count))),
        }
    }
    out
}

/// Renders the whole tree: every file under `kfd/topology/` with its content.
pub fn render_topology(gpus: &[Gpu], opts: &TopologyOptions) -> Vec<SysfsFile> {
    let host = opts.host.clone().unwrap_or_else(HostInfo::probe);
    let root = PathBuf::from("kfd/topology");
    let mut files = Vec::new();
    let mut add = |path: PathBuf, content: String| files.push(SysfsFile { path, content });

    add(root.join("generation_id"), format!("{GENERATION_ID}\n"));
    add(
        root.join("system_properties"),
        "platform_oem 0\nplatform_id 0\nplatform_rev 0\n".to_string(),
    );

    // Node 0: the CPU. Its caches come from the host's own sysfs (caches_count 0).
    let cpu = root.join("nodes/0");
    add(cpu.join("gpu_id"), "0\n".into());
    add(cpu.join("name"), "\n".into());
    let mut p = Props::new();
    p.kv("cpu_cores_count", host.cpu_cores)
        .kv("simd_count", 0)
        .kv("mem_banks_count", 1)
        .kv("caches_count", 0)
        .kv("io_links_count", gpus.len())
        .kv("p2p_links_count", 0)
        .kv("cpu_core_id_base", host.cpu_core_id_base)
        .kv("simd_id_base", 0)
        .kv("max_waves_per_simd", 0)
        .kv("lds_size_in_kb", 0)
        .kv("gds_size_in_kb", 0)
        .kv("num_gws", 0)
        .kv("wave_front_size", 0)
        .kv("array_count", 0)
        .kv("simd_arrays_per_engine", 0)
        .kv("cu_per_simd_array", 0)
        .kv("simd_per_cu", 0)
        .kv("max_slots_scratch_cu", 0)
        .kv("gfx_target_version", 0)
        .kv("vendor_id", 0)
        .kv("device_id", 0)
        .kv("location_id", 0)
        .kv("domain", 0)
        .kv("drm_render_minor", 0)
        .kv("hive_id", 0)
        .kv("num_sdma_engines", 0)
        .kv("num_sdma_xgmi_engines", 0)
        .kv("num_sdma_queues_per_engine", 0)
        .kv("num_cp_queues", 0)
        .kv("max_engine_clk_ccompute", host.cpu_max_mhz);
    add(cpu.join("properties"), p.0);
    add(
        cpu.join("mem_banks/0/properties"),
        mem_bank_properties(HEAP_TYPE_SYSTEM, host.mem_total_bytes, 0, 0),
    );
    for (i, g) in gpus.iter().enumerate() {
        let link = Link {
            from: 0,
            to: g.node_id,
            pcie_gen: g.preset.pcie_gen(),
            flags: g.preset.io_link_flags(),
        };
        add(
            cpu.join(format!("io_links/{i}/properties")),
            io_link_properties(&link),
        );
    }

    let mut simd_id_base = GPU_PROCESSOR_ID_BASE;
    for g in gpus {
        let pr = g.preset;
        let node = root.join(format!("nodes/{}", g.node_id));
        let caches = gpu_caches(g, simd_id_base);
        let mut capability = pr.capability;
        if opts.svm_capability {
            capability |= HSA_CAP_SVMAPI_SUPPORTED;
        }
        add(node.join("gpu_id"), format!("{}\n", g.gpu_id));
        add(node.join("name"), format!("{}\n", pr.kernel_name()));
        let mut p = Props::new();
        p.kv("cpu_cores_count", 0)
            .kv("simd_count", pr.simd_count())
            .kv("mem_banks_count", 1)
            .kv("caches_count", caches.len())
            .kv("io_links_count", 1)
            .kv("p2p_links_count", 0)
            .kv("cpu_core_id_base", 0)
            .kv("simd_id_base", simd_id_base)
            .kv("max_waves_per_simd", pr.max_waves_per_simd)
            .kv("lds_size_in_kb", pr.lds_size_in_kb)
            .kv("gds_size_in_kb", pr.gds_size_in_kb)
            .kv("num_gws", pr.num_gws)
            .kv("wave_front_size", pr.wave_front_size)
            .kv("array_count", pr.array_count)
            .kv("simd_arrays_per_engine", pr.simd_arrays_per_engine)
            .kv("cu_per_simd_array", pr.cu_per_simd_array)
            .kv("simd_per_cu", pr.simd_per_cu)
            .kv("max_slots_scratch_cu", pr.max_slots_scratch_cu)
            .kv("gfx_target_version", pr.gfx_target_version)
            .kv("vendor_id", 0x1002)
            .kv("device_id", pr.device_id)
            .kv("location_id", g.location_id)
            .kv("domain", g.domain)
            .kv("drm_render_minor", g.render_minor)
            .kv("hive_id", 0)
            .kv("num_sdma_engines", pr.num_sdma_engines)
            .kv("num_sdma_xgmi_engines", pr.num_sdma_xgmi_engines)
            .kv("num_sdma_queues_per_engine", pr.num_sdma_queues_per_engine)
            .kv("num_cp_queues", pr.num_cp_queues)
            .kv("max_engine_clk_fcompute", pr.max_engine_clk_fcompute)
            .kv("local_mem_size", 0)
            .kv("fw_version", pr.fw_version)
            .kv("capability", capability)
            .kv("debug_prop", pr.debug_prop())
            .kv("sdma_fw_version", pr.sdma_fw_version())
            .kv("unique_id", g.unique_id)
            .kv("num_xcc", pr.num_xcc)
            .kv("max_engine_clk_ccompute", host.cpu_max_mhz);
        add(node.join("properties"), p.0);
        let vram = opts.vram_bytes_override.unwrap_or(pr.vram_bytes);
        add(
            node.join("mem_banks/0/properties"),
            mem_bank_properties(HEAP_TYPE_FB_PRIVATE, vram, pr.vram_width, pr.mem_clk_max),
        );
        add(node.join("mem_banks/0/used_memory"), "0\n".into());
        for (i, c) in caches.iter().enumerate() {
            add(
                node.join(format!("caches/{i}/properties")),
                cache_properties(c),
            );
        }
        let link = Link {
            from: g.node_id,
            to: 0,
            pcie_gen: pr.pcie_gen(),
            flags: pr.io_link_flags(),
        };
        add(
            node.join("io_links/0/properties"),
            io_link_properties(&link),
        );
        simd_id_base = simd_id_base.wrapping_add(pr.simd_count());
    }
    files
}

/// Directories the kernel always creates for a node, also when empty.
const NODE_SUBDIRS: &[&str] = &["mem_banks", "caches", "io_links", "p2p_links"];

/// Writes `DIR/kfd/topology/...` for `gpus` (node 0 is the host CPU, GPU i is node i+1).
///
/// The tree is built in a sibling temporary directory and renamed into place, so a reader
/// sees either the old tree or the complete new one, never a half-written one. An existing
/// `DIR/kfd` is replaced.
pub fn write_topology(dir: &Path, gpus: &[Gpu], opts: &TopologyOptions) -> io::Result<()> {
    let files = render_topology(gpus, opts);
    fs::create_dir_all(dir)?;
    // Unique per process and call, so concurrent writers never share a scratch directory.
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".kfd.tmp.{}.{seq}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    let built = (|| -> io::Result<()> {
        let node_count = gpus.len() + 1;
        for n in 0..node_count {
            for sub in NODE_SUBDIRS {
                fs::create_dir_all(tmp.join(format!("kfd/topology/nodes/{n}/{sub}")))?;
            }
        }
        for f in &files {
            let path = tmp.join(&f.path);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            write_ro_file(&path, f.content.as_bytes())?;
        }
        Ok(())
    })();
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = dir.join("kfd");
    if dest.exists() {
        fs::remove_dir_all(&dest)?;
    }
    let moved = fs::rename(tmp.join("kfd"), &dest);
    let _ = fs::remove_dir_all(&tmp);
    moved
}

/// Creates `path` with mode 0444 and writes `data`.
fn write_ro_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)?;
    f.write_all(data)
}

/// Writes the `/sys/module/amdgpu` look-alike into `dir` (`initstate` = "live", `version`),
/// which rocminfo >= 6 and rocm-smi check before anything else.
pub fn write_amdgpu_module(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for (name, content) in [
        ("initstate", "live\n".to_string()),
        ("version", format!("{AMDGPU_MODULE_VERSION}\n")),
    ] {
        let path = dir.join(name);
        if path.exists() {
            fs::remove_file(&path)?;
        }
        write_ro_file(&path, content.as_bytes())?;
    }
    Ok(())
}

/// Parses a sysfs properties file the way libhsakmt does: `sscanf(p, "%s %llu\n%n")` in a
/// loop over at most one page, stopping at the first place that does not yield a name and a
/// number. Values follow `strtoull` (saturating; a leading `-` wraps). Unknown keys are the
/// caller's to ignore. A `sibling_map 1,0,...` line yields `("sibling_map", 1)` and ends the
/// parse, as it does in libhsakmt.
pub fn parse_properties(text: &str) -> Vec<(String, u64)> {
    let b = text.as_bytes();
    let b = &b[..b.len().min(SYSFS_PAGE)];
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == start {
            break; // end of input: sscanf returns EOF
        }
        let key = String::from_utf8_lossy(&b[start..i]).into_owned();
        skip_ws(&mut i);
        let mut neg = false;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            neg = b[i] == b'-';
            i += 1;
        }
        let digits_start = i;
        let mut v: u64 = 0;
        let mut overflow = false;
        while i < b.len() && b[i].is_ascii_digit() {
            match v
                .checked_mul(10)
                .and_then(|x| x.checked_add(u64::from(b[i] - b'0')))
            {
                Some(x) => v = x,
                None => overflow = true,
            }
            i += 1;
        }
        if i == digits_start {
            break; // no number: sscanf returns 1
        }
        let v = if overflow {
            u64::MAX
        } else if neg {
            v.wrapping_neg()
        } else {
            v
        };
        out.push((key, v));
    }
    out
}

/// The value of `key` in parsed properties (first occurrence, as libhsakmt's if-chain keeps
/// the last one only when keys repeat, which the kernel never does).
pub fn property(props: &[(String, u64)], key: &str) -> Option<u64> {
    props.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
}

/// `kfdmux topology --gpus SPEC --out DIR`: parse the list and write the tree. Prints nothing.
pub fn topology_command(spec: &str, out: &Path) -> Result<(), String> {
    let gpus = parse_gpus(spec)?;
    write_topology(out, &gpus, &TopologyOptions::default())
        .map_err(|e| format!("writing topology to {}: {e}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_counts() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list(""), None);
    }

    #[test]
    fn sscanf_rules() {
        let p = parse_properties("a 1\nb -1\nc 99999999999999999999999\nd 0x10\ne 5\n");
        assert_eq!(
            p,
            vec![
                ("a".into(), 1),
                ("b".into(), u64::MAX),
                ("c".into(), u64::MAX),
                ("d".into(), 0),
            ]
        );
        // `x10` after `d 0` is read as the next name, then `e` is not a number: stop.
        let p = parse_properties("level 2\nsibling_map 1,1,0\n");
        assert_eq!(p, vec![("level".into(), 2), ("sibling_map".into(), 1)]);
        assert!(parse_properties("").is_empty());
        assert!(parse_properties("novalue\n").is_empty());
    }

    #[test]
    fn cpuinfo_exact_key() {
        let c = "initial apicid\t: 7\napicid\t\t: 3\n";
        assert_eq!(cpuinfo_field(c, "apicid"), Some("3"));
    }
}
