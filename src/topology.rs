//! Simulated GPU presets and the GPU list a daemon serves (`--gpus gfx90a:2,gfx1030`).
//!
//! CONTRACT (other modules rely on these names): `GpuPreset`, `Gpu`, `parse_gpus`, `preset`.
//! The values of each preset follow the real part's KFD topology (see docs/topology.md).

/// Static description of one GPU model, as the kernel's topology would report it.
#[derive(Debug, Clone)]
pub struct GpuPreset {
    /// The preset's name and ISA, e.g. `gfx90a`.
    pub name: &'static str,
    /// A human name for docs/logs, e.g. "MI210-class".
    pub class: &'static str,
    /// `gfx_target_version` as KFD writes it (e.g. 90010 for gfx90a).
    pub gfx_target_version: u32,
    /// PCI device id (e.g. 0x740f).
    pub device_id: u32,
    /// PCI revision (selects the marketing name in amdgpu.ids).
    pub pci_rev: u32,
    /// amdgpu family id (AMDGPU_FAMILY_AI = 141, NV = 143, GC_9_4_3 ...) for DEV_INFO.
    pub family: u32,
    /// Compute units in total (all XCCs).
    pub cu_count: u32,
    pub simd_per_cu: u32,
    pub wave_front_size: u32,
    pub max_waves_per_simd: u32,
    /// Number of XCCs (accelerator complex dies); 1 for most parts.
    pub num_xcc: u32,
    pub array_count: u32,
    pub simd_arrays_per_engine: u32,
    pub cu_per_simd_array: u32,
    pub lds_size_in_kb: u32,
    pub gds_size_in_kb: u32,
    pub num_gws: u32,
    pub max_slots_scratch_cu: u32,
    /// Engine clock, MHz.
    pub max_engine_clk_fcompute: u32,
    /// VRAM size in bytes.
    pub vram_bytes: u64,
    /// VRAM bus width, bits.
    pub vram_width: u32,
    /// Memory clock, MHz.
    pub mem_clk_max: u32,
    /// Cache sizes in KiB (0 = absent): L1 per CU, L2, L3 (Infinity Cache).
    pub l1_kb: u32,
    pub l2_kb: u32,
    pub l3_kb: u32,
    pub cache_line_size: u32,
    pub fw_version: u32,
    pub capability: u32,
    pub num_sdma_engines: u32,
    pub num_sdma_xgmi_engines: u32,
    pub num_sdma_queues_per_engine: u32,
    pub num_cp_queues: u32,
    /// Is it a discrete GPU (dGPU events page is a GTT BO) — all presets are.
    pub is_dgpu: bool,
    /// GB_ADDR_CONFIG register value libdrm reads with READ_MMR_REG 0x263e.
    pub gb_addr_config: u32,
}

/// One simulated GPU in a daemon's list.
#[derive(Debug, Clone)]
pub struct Gpu {
    pub preset: &'static GpuPreset,
    /// 0-based position in the daemon's list.
    pub index: u32,
    /// Topology node id (CPU node is 0, so GPUs start at 1).
    pub node_id: u32,
    /// Stable non-zero 16-bit-ish gpu_id, derived from preset and index like the kernel's hash.
    pub gpu_id: u32,
    /// drm_render_minor (128 + index).
    pub render_minor: u32,
    /// PCI location_id (bus << 8 | devfn) and domain.
    pub location_id: u32,
    pub domain: u32,
    /// unique_id (64-bit; rocminfo prints it as the UUID).
    pub unique_id: u64,
}

pub use presets::{parse_gpus, preset, PRESETS};
pub use presets::{
    CacheKind, CacheScope, HSA_CACHE_TYPE_CPU, HSA_CACHE_TYPE_DATA, HSA_CACHE_TYPE_HSACU,
    HSA_CACHE_TYPE_INSTRUCTION, HSA_CAP_SVMAPI_SUPPORTED, MAX_GPUS,
};

mod presets;
