//! The GPU presets and the `--gpus` list parser.
//!
//! Values follow the real parts as the kernel's KFD topology reports them (see docs/topology.md
//! for the table and where each value comes from). Everything here is data: the sysfs writer
//! (`crate::sysfs`) turns it into files, the sim device into ioctl answers.

use super::{Gpu, GpuPreset};

/// Most GPUs one list may hold (render minors 128..=191, node ids 1..=64).
pub const MAX_GPUS: usize = 64;

// HSA node capability bits (kfd_topology.h, `HSA_CAP_*`).
pub const HSA_CAP_WATCH_POINTS_SUPPORTED: u32 = 0x0000_0080;
pub const HSA_CAP_WATCH_POINTS_TOTALBITS_SHIFT: u32 = 8;
pub const HSA_CAP_DOORBELL_TYPE_SHIFT: u32 = 12;
pub const HSA_CAP_DOORBELL_TYPE_2_0: u32 = 2;
pub const HSA_CAP_TRAP_DEBUG_SUPPORT: u32 = 0x0000_8000;
pub const HSA_CAP_TRAP_DEBUG_WAVE_LAUNCH_TRAP_OVERRIDE_SUPPORTED: u32 = 0x0001_0000;
pub const HSA_CAP_TRAP_DEBUG_WAVE_LAUNCH_MODE_SUPPORTED: u32 = 0x0002_0000;
pub const HSA_CAP_TRAP_DEBUG_PRECISE_MEMORY_OPERATIONS_SUPPORTED: u32 = 0x0004_0000;
pub const HSA_CAP_MEM_EDCSUPPORTED: u32 = 0x0010_0000;
pub const HSA_CAP_RASEVENTNOTIFY: u32 = 0x0020_0000;
pub const HSA_CAP_ASIC_REVISION_SHIFT: u32 = 22;
pub const HSA_CAP_SRAM_EDCSUPPORTED: u32 = 0x0400_0000;
/// Bit 27: the SVM ioctl is available. Not part of any preset's `capability`; the sysfs writer
/// adds it when asked (`TopologyOptions::svm_capability`), as the kernel does when SVM is built.
pub const HSA_CAP_SVMAPI_SUPPORTED: u32 = 0x0800_0000;
pub const HSA_CAP_TRAP_DEBUG_FIRMWARE_SUPPORTED: u32 = 0x2000_0000;

// HSA cache type bits as sysfs `caches/N/properties` prints `type` (HsaCacheType).
pub const HSA_CACHE_TYPE_DATA: u32 = 0x1;
pub const HSA_CACHE_TYPE_INSTRUCTION: u32 = 0x2;
pub const HSA_CACHE_TYPE_CPU: u32 = 0x4;
/// The "HSA compute unit" bit; ROCr keeps only GPU caches that carry it.
pub const HSA_CACHE_TYPE_HSACU: u32 = 0x8;

// debug_prop bits (kfd_topology.h, `HSA_DBG_*`).
const DBG_WATCH_LO_GFX9: u64 = 6;
const DBG_WATCH_LO_GFX9_4_3: u64 = 7;
const DBG_WATCH_LO_GFX10: u64 = 7;
const DBG_WATCH_HI: u64 = 29 << 4;
const DBG_WATCH_HI_GFX9_4_3: u64 = 30 << 4;
const DBG_DISPATCH_INFO_ALWAYS_VALID: u64 = 0x400;

/// Capability bits every preset shares: 4 watch points (2 bits), doorbell type 2.0,
/// trap-handler debugging with wave-launch override and mode.
const CAP_COMMON: u32 = HSA_CAP_WATCH_POINTS_SUPPORTED
    | (2 << HSA_CAP_WATCH_POINTS_TOTALBITS_SHIFT)
    | (HSA_CAP_DOORBELL_TYPE_2_0 << HSA_CAP_DOORBELL_TYPE_SHIFT)
    | HSA_CAP_TRAP_DEBUG_SUPPORT
    | HSA_CAP_TRAP_DEBUG_WAVE_LAUNCH_TRAP_OVERRIDE_SUPPORTED
    | HSA_CAP_TRAP_DEBUG_WAVE_LAUNCH_MODE_SUPPORTED;

/// Instinct parts add precise memory ops (GC >= 9.4.2), ECC/RAS and debugger firmware support.
const CAP_INSTINCT: u32 = CAP_COMMON
    | HSA_CAP_TRAP_DEBUG_PRECISE_MEMORY_OPERATIONS_SUPPORTED
    | HSA_CAP_MEM_EDCSUPPORTED
    | HSA_CAP_RASEVENTNOTIFY
    | HSA_CAP_SRAM_EDCSUPPORTED
    | HSA_CAP_TRAP_DEBUG_FIRMWARE_SUPPORTED;

const GIB: u64 = 1 << 30;

/// The presets `--gpus` accepts.
pub static PRESETS: &[GpuPreset] = &[
    // AMD Instinct MI210: Aldebaran, one GCD, 104 of 112 CUs, 64 GiB HBM2e.
    GpuPreset {
        name: "gfx90a",
        class: "MI210-class",
        gfx_target_version: 90010,
        device_id: 0x740f,
        pci_rev: 0x02,
        family: 141, // AMDGPU_FAMILY_AI
        cu_count: 104,
        simd_per_cu: 4,
        wave_front_size: 64,
        max_waves_per_simd: 8,
        num_xcc: 1,
        array_count: 8,
        simd_arrays_per_engine: 1,
        cu_per_simd_array: 14,
        lds_size_in_kb: 64,
        gds_size_in_kb: 0, // Aldebaran has no GDS memory, only GWS
        num_gws: 64,
        max_slots_scratch_cu: 32,
        max_engine_clk_fcompute: 1700,
        vram_bytes: 64 * GIB,
        vram_width: 4096,
        mem_clk_max: 1600,
        l1_kb: 16,
        l2_kb: 8192,
        l3_kb: 0,
        cache_line_size: 128,
        fw_version: 78,
        capability: CAP_INSTINCT | (1 << HSA_CAP_ASIC_REVISION_SHIFT),
        num_sdma_engines: 2,
        num_sdma_xgmi_engines: 3,
        num_sdma_queues_per_engine: 8,
        num_cp_queues: 24,
        is_dgpu: true,
        gb_addr_config: 0x2a11_4042,
    },
    // AMD Instinct MI300X: 8 XCCs (38 of 40 CUs each), 192 GiB HBM3, 256 MiB Infinity Cache.
    GpuPreset {
        name: "gfx942",
        class: "MI300X-class",
        gfx_target_version: 90402,
        device_id: 0x74a1,
        pci_rev: 0x00,
        family: 141, // GC 9.4.3 reports AMDGPU_FAMILY_AI in DEV_INFO
        cu_count: 304,
        simd_per_cu: 4,
        wave_front_size: 64,
        max_waves_per_simd: 8,
        num_xcc: 8,
        array_count: 32,
        simd_arrays_per_engine: 1,
        cu_per_simd_array: 10,
        lds_size_in_kb: 64,
        gds_size_in_kb: 0,
        num_gws: 64,
        max_slots_scratch_cu: 32,
        max_engine_clk_fcompute: 2100,
        vram_bytes: 192 * GIB,
        vram_width: 8192,
        mem_clk_max: 1300,
        l1_kb: 32,
        l2_kb: 4096, // per XCC
        l3_kb: 262_144,
        cache_line_size: 128,
        fw_version: 177,
        capability: CAP_INSTINCT | (1 << HSA_CAP_ASIC_REVISION_SHIFT),
        num_sdma_engines: 2,
        num_sdma_xgmi_engines: 14,
        num_sdma_queues_per_engine: 8,
        num_cp_queues: 24,
        is_dgpu: true,
        gb_addr_config: 0x2a11_4042,
    },
    // AMD Radeon RX 6900 XT: Navi 21 XTX, 80 CUs, wave32, 16 GiB GDDR6, 128 MiB Infinity Cache.
    GpuPreset {
        name: "gfx1030",
        class: "RX 6900 XT-class",
        gfx_target_version: 100300,
        device_id: 0x73bf,
        pci_rev: 0xc0,
        family: 143, // AMDGPU_FAMILY_NV
        cu_count: 80,
        simd_per_cu: 2,
        wave_front_size: 32,
        max_waves_per_simd: 16,
        num_xcc: 1,
        array_count: 8,
        simd_arrays_per_engine: 2,
        cu_per_simd_array: 10,
        lds_size_in_kb: 64,
        gds_size_in_kb: 64,
        num_gws: 64,
        max_slots_scratch_cu: 32,
        max_engine_clk_fcompute: 2660,
        vram_bytes: 16 * GIB,
        vram_width: 256,
        mem_clk_max: 1000,
        l1_kb: 16,
        l2_kb: 4096,
        l3_kb: 131_072,
        cache_line_size: 128,
        fw_version: 118,
        capability: CAP_COMMON | (1 << HSA_CAP_ASIC_REVISION_SHIFT),
        num_sdma_engines: 4,
        num_sdma_xgmi_engines: 0,
        num_sdma_queues_per_engine: 8,
        num_cp_queues: 24,
        is_dgpu: true,
        gb_addr_config: 0x0000_0444,
    },
];

/// One kind of GPU cache; the sysfs writer instantiates it once per group of
/// `cus_shared` CUs (per shader array for L1-class caches, per XCC or per GPU for L2/L3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheKind {
    pub level: u32,
    pub size_kb: u32,
    pub line_size: u32,
    /// HSA cache type bits as sysfs prints them (always includes `HSA_CACHE_TYPE_HSACU`).
    pub hsa_type: u32,
    pub scope: CacheScope,
}

/// Which CUs one instance of a cache serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheScope {
    /// Groups of this many consecutive CUs inside one shader array (TCP 1, SQC 2, GL1 = array).
    CusInArray(u32),
    /// All CUs of one XCC (L2 on multi-XCC parts; the whole GPU when `num_xcc` is 1).
    Xcc,
    /// All CUs of the GPU (L3 / Infinity Cache).
    Gpu,
}

const DATA_CU: u32 = HSA_CACHE_TYPE_DATA | HSA_CACHE_TYPE_HSACU;
const INST_CU: u32 = HSA_CACHE_TYPE_INSTRUCTION | HSA_CACHE_TYPE_HSACU;

impl GpuPreset {
    /// `simd_count` as KFD reports it: every SIMD of every CU.
    pub fn simd_count(&self) -> u32 {
        self.cu_count * self.simd_per_cu
    }

    /// GC IP major version (9 for gfx9xx, 10 for gfx10xx), from `gfx_target_version`.
    pub fn gfx_major(&self) -> u32 {
        self.gfx_target_version / 10000
    }

    /// The node `name` file: the kernel prints amdgpu's ASIC name
    /// ("ip discovery" for parts that only have IP-discovery tables).
    pub fn kernel_name(&self) -> &'static str {
        match self.name {
            "gfx90a" => "aldebaran",
            "gfx1030" => "sienna_cichlid",
            _ => "ip discovery",
        }
    }

    /// SDMA firmware version (`sdma_fw_version` node property).
    pub fn sdma_fw_version(&self) -> u32 {
        match self.name {
            "gfx90a" => 8,
            "gfx942" => 19,
            _ => 83,
        }
    }

    /// `debug_prop` node property: watch-address mask bits (+ dispatch info always valid on
    /// GC 9.4.3, whose trap handler always sets up TTMPs).
    pub fn debug_prop(&self) -> u64 {
        match (self.gfx_major(), self.gfx_target_version) {
            (9, 90402) => {
                DBG_WATCH_LO_GFX9_4_3 | DBG_WATCH_HI_GFX9_4_3 | DBG_DISPATCH_INFO_ALWAYS_VALID
            }
            (9, _) => DBG_WATCH_LO_GFX9 | DBG_WATCH_HI,
            _ => DBG_WATCH_LO_GFX10 | DBG_WATCH_HI,
        }
    }

    /// PCIe generation of the host link (for io_link bandwidths): Gen5 on MI300, else Gen4.
    pub fn pcie_gen(&self) -> u32 {
        if self.gfx_target_version >= 90402 && self.gfx_major() == 9 {
            5
        } else {
            4
        }
    }

    /// io_link `flags` toward the CPU: ENABLED, plus NON_COHERENT for GC 9.4.x over PCIe.
    pub fn io_link_flags(&self) -> u32 {
        if self.gfx_major() == 9 {
            0x3
        } else {
            0x1
        }
    }

    /// The GPU caches, the way the kernel's cache tables describe this part.
    pub fn cache_kinds(&self) -> Vec<CacheKind> {
        let mut v = Vec::with_capacity(6);
        let tcp_line = if self.gfx_major() == 9 && self.gfx_target_version < 90402 {
            64
        } else {
            128
        };
        if self.l1_kb > 0 {
            v.push(CacheKind {
                level: 1,
                size_kb: self.l1_kb,
                line_size: tcp_line,
                hsa_type: DATA_CU,
                scope: CacheScope::CusInArray(1),
            });
        }
        // Scalar caches, one per SQC shared by two CUs.
        let sqc_inst_kb = if self.gfx_major() == 9 { 64 } else { 32 };
        v.push(CacheKind {
            level: 1,
            size_kb: sqc_inst_kb,
            line_size: 64,
            hsa_type: INST_CU,
            scope: CacheScope::CusInArray(2),
        });
        v.push(CacheKind {
            level: 1,
            size_kb: 16,
            line_size: 64,
            hsa_type: DATA_CU,
            scope: CacheScope::CusInArray(2),
        });
        if self.gfx_major() >= 10 {
            // GL1: 128 KiB per shader array on RDNA2.
            v.push(CacheKind {
                level: 1,
                size_kb: 128,
                line_size: 128,
                hsa_type: DATA_CU,
                scope: CacheScope::CusInArray(self.cu_per_simd_array),
            });
        }
        if self.l2_kb > 0 {
            v.push(CacheKind {
                level: 2,
                size_kb: self.l2_kb,
                line_size: self.cache_line_size,
                hsa_type: DATA_CU,
                scope: CacheScope::Xcc,
            });
        }
        if self.l3_kb > 0 {
            v.push(CacheKind {
                level: 3,
                size_kb: self.l3_kb,
                line_size: 64,
                hsa_type: DATA_CU,
                scope: CacheScope::Gpu,
            });
        }
        v
    }

    /// Active CUs in each shader array, in order XCC-major, then SE, then SA. CUs are spread
    /// evenly over XCCs, then over each XCC's arrays (the first arrays get the remainder),
    /// e.g. MI300X: 38 CUs per XCC as 10, 10, 9, 9.
    pub fn cus_per_array(&self) -> Vec<u32> {
        let xccs = self.num_xcc.max(1);
        let arrays_per_xcc = (self.array_count / xccs).max(1);
        let mut out = Vec::with_capacity((xccs * arrays_per_xcc) as usize);
        for x in 0..xccs {
            let in_xcc = self.cu_count / xccs + u32::from(x < self.cu_count % xccs);
            for a in 0..arrays_per_xcc {
                out.push(in_xcc / arrays_per_xcc + u32::from(a < in_xcc % arrays_per_xcc));
            }
        }
        out
    }
}

/// Looks a preset up by name (`gfx90a`, `gfx942`, `gfx1030`).
pub fn preset(name: &str) -> Option<&'static GpuPreset> {
    PRESETS.iter().find(|p| p.name == name)
}

fn known_names() -> String {
    PRESETS
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `gfx90a:2,gfx1030` into the daemon's GPU list.
///
/// Each entry is `NAME[:COUNT]` (count defaults to 1, must be 1..=64); at most 64 GPUs in all.
/// GPUs get index, node_id (index + 1), render minor (128 + index), a distinct PCI location,
/// a unique_id and a stable, non-zero, unique 16-bit gpu_id.
pub fn parse_gpus(spec: &str) -> Result<Vec<Gpu>, String> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Err(format!(
            "empty GPU list; expected NAME[:COUNT][,...] with NAME one of: {}",
            known_names()
        ));
    }
    let mut picked: Vec<&'static GpuPreset> = Vec::new();
    for entry in spec.split(',') {
        let entry = entry.trim();
        if entry.is_empty() {
            return Err(format!("empty entry in GPU list '{spec}'"));
        }
        let (name, count) = match entry.split_once(':') {
            Some((n, c)) => {
                let c = c.trim();
                let count: usize = c.parse().map_err(|_| {
                    format!(
                        "invalid GPU count '{c}' in '{entry}' (expected a number 1..={MAX_GPUS})"
                    )
                })?;
                (n.trim(), count)
            }
            None => (entry, 1),
        };
        let p = preset(name).ok_or_else(|| {
            format!(
                "unknown GPU preset '{name}' (known presets: {})",
                known_names()
            )
        })?;
        if count == 0 {
            return Err(format!("GPU count must be at least 1 in '{entry}'"));
        }
        if count > MAX_GPUS || picked.len() + count > MAX_GPUS {
            return Err(format!(
                "too many GPUs in '{spec}': at most {MAX_GPUS} in total"
            ));
        }
        picked.extend(std::iter::repeat_n(p, count));
    }

    let mut gpus: Vec<Gpu> = Vec::with_capacity(picked.len());
    for (i, p) in picked.into_iter().enumerate() {
        let index = i as u32; // i < MAX_GPUS
        let domain: u32 = 0;
        // Bus 0x03 upward, device 0 function 0: distinct per GPU, like slots on one root.
        let location_id = (0x03 + index) << 8;
        let seed = fnv1a(&[
            p.name.as_bytes(),
            &domain.to_le_bytes(),
            &location_id.to_le_bytes(),
            &p.device_id.to_le_bytes(),
            &p.vram_bytes.to_le_bytes(),
            &p.simd_count().to_le_bytes(),
        ]);
        let gpu_id = unique_gpu_id(seed, &gpus);
        let unique_id = match fnv1a(&[b"unique_id", &seed.to_le_bytes()]) {
            0 => 1,
            u => u,
        };
        gpus.push(Gpu {
            preset: p,
            index,
            node_id: index + 1,
            gpu_id,
            render_minor: 128 + index,
            location_id,
            domain,
            unique_id,
        });
    }
    Ok(gpus)
}

/// 64-bit FNV-1a over the parts, in order.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Folds the hash to 16 bits (the kernel's KFD_GPU_ID_HASH_WIDTH) and, like the kernel,
/// steps past 0 and ids already taken.
fn unique_gpu_id(seed: u64, taken: &[Gpu]) -> u32 {
    let folded = (seed ^ (seed >> 16) ^ (seed >> 32) ^ (seed >> 48)) & 0xffff;
    let mut id = folded as u32;
    // At most MAX_GPUS ids are taken, so this ends within MAX_GPUS + 1 steps.
    while id == 0 || taken.iter().any(|g| g.gpu_id == id) {
        id = (id + 1) & 0xffff;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cus_per_array_sums_to_cu_count() {
        for p in PRESETS {
            let v = p.cus_per_array();
            assert_eq!(v.iter().sum::<u32>(), p.cu_count, "{}", p.name);
            assert_eq!(v.len() as u32, p.array_count, "{}", p.name);
            assert!(v.iter().all(|&c| c <= p.cu_per_simd_array), "{}", p.name);
        }
        assert_eq!(
            &preset("gfx942").unwrap().cus_per_array()[..4],
            &[10, 10, 9, 9]
        );
    }

    #[test]
    fn gpu_ids_are_unique_for_a_full_list() {
        let gpus = parse_gpus("gfx90a:22,gfx942:21,gfx1030:21").unwrap();
        assert_eq!(gpus.len(), 64);
        let mut ids: Vec<u32> = gpus.iter().map(|g| g.gpu_id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 64);
        assert!(ids.iter().all(|&id| id != 0 && id <= 0xffff));
    }

    #[test]
    fn unique_gpu_id_skips_zero_and_taken() {
        assert_eq!(unique_gpu_id(0, &[]), 1);
        let g = parse_gpus("gfx90a").unwrap();
        let seed_for_same = {
            // Reconstruct a seed that folds to g[0].gpu_id: fold(x) = x for x < 2^16.
            u64::from(g[0].gpu_id)
        };
        assert_ne!(unique_gpu_id(seed_for_same, &g), g[0].gpu_id);
    }
}
