//! One open of a simulated render node (`/dev/dri/renderD<minor>`): the DRM ioctls libdrm's
//! `amdgpu_device_initialize` issues — VERSION, GET_CLIENT, AMDGPU_INFO (ACCEL_WORKING,
//! DEV_INFO, READ_MMR_REG) — answered as amdgpu answers them for the GPU's preset.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::abi::*;
use crate::device::{Caller, DeviceContext, Done, Env, IoctlCall, IoctlResult};
use crate::errno::Errno;
use crate::topology::GpuPreset;

use super::Shared;

pub const DRIVER_NAME: &str = "amdgpu";
pub const DRIVER_DATE: &str = "20150101";
pub const DRIVER_DESC: &str = "AMD GPU";
pub const DRIVER_MAJOR: i32 = 3;

/// The uid GET_CLIENT reports (the kernel answers `overflowuid`).
const OVERFLOW_UID: u64 = 65534;
/// Reserved bottom of the GPU VA space and the 48-bit VM's hole (amdgpu_vm.h / amdgpu_gmc.h).
const VA_RESERVED: u64 = 1 << 20;
const GMC_HOLE_START: u64 = 0x0000_8000_0000_0000;
const GMC_HOLE_END: u64 = 0xffff_8000_0000_0000;
const VM_SIZE: u64 = 1 << 48;

pub struct RenderCtx {
    shared: Arc<Shared>,
    gpu: usize,
    #[allow(dead_code)]
    opener: Caller,
}

impl RenderCtx {
    pub(crate) fn new(shared: Arc<Shared>, gpu: usize, opener: Caller) -> RenderCtx {
        shared.stats.render_contexts.fetch_add(1, Ordering::Relaxed);
        RenderCtx {
            shared,
            gpu,
            opener,
        }
    }

    fn preset(&self) -> &'static GpuPreset {
        self.shared.gpus[self.gpu].preset
    }
}

impl Drop for RenderCtx {
    fn drop(&mut self) {
        self.shared
            .stats
            .render_contexts
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl DeviceContext for RenderCtx {
    fn ioctl(&self, _env: &dyn Env, mut call: IoctlCall, done: Done) {
        let r = if crate::abi::table::ioc_type(call.cmd) != crate::abi::table::DRM_IOC_TYPE {
            // drm_ioctl would read the nr as some DRM ioctl; the sim refuses foreign commands.
            Err(Errno::EINVAL)
        } else {
            match call.def.nr {
                0x00 => self.version(&mut call),
                0x05 => get_client(&mut call),
                0x45 => self.amdgpu_info(&mut call),
                nr => {
                    log::debug!("sim drm: ioctl nr {nr:#x} not answered: EINVAL");
                    Err(Errno::EINVAL)
                }
            }
        };
        done.complete(call, r)
    }

    fn release(&self) {}
}

/// `drm_copy_field`: copies at most the caller's length (no NUL), reports the full length.
fn copy_field(call: &mut IoctlCall, field: &str, cap: u64, value: &str) -> u64 {
    let n = (cap as usize).min(value.len());
    if let Some(buf) = call.array_mut(field) {
        let k = n.min(buf.len());
        buf[..k].copy_from_slice(&value.as_bytes()[..k]);
        // Like drm_copy_field: only the string's bytes reach the caller's buffer.
        buf.truncate(k);
    }
    value.len() as u64
}

impl RenderCtx {
    fn version(&self, call: &mut IoctlCall) -> IoctlResult {
        let mut a: DrmVersion = call.args();
        a.version_major = DRIVER_MAJOR;
        a.version_minor = self.shared.cfg.drm_minor as i32;
        a.version_patchlevel = 0;
        a.name_len = copy_field(call, "name", a.name_len, DRIVER_NAME);
        a.date_len = copy_field(call, "date", a.date_len, DRIVER_DATE);
        a.desc_len = copy_field(call, "desc", a.desc_len, DRIVER_DESC);
        call.set_args(&a);
        Ok(())
    }

    fn amdgpu_info(&self, call: &mut IoctlCall) -> IoctlResult {
        let a: DrmAmdgpuInfo = call.args();
        if a.return_size == 0 || a.return_pointer == 0 {
            return Err(Errno::EINVAL);
        }
        let bytes: Vec<u8> = match a.query {
            AMDGPU_INFO_ACCEL_WORKING => 1u32.to_le_bytes().to_vec(),
            AMDGPU_INFO_DEV_INFO => {
                zerocopy::IntoBytes::as_bytes(&dev_info(self.preset())).to_vec()
            }
            AMDGPU_INFO_READ_MMR_REG => {
                let r = a.read_mmr_reg;
                if r.count > 128 {
                    return Err(Errno::EINVAL);
                }
                let mut out = Vec::with_capacity(r.count as usize * 4);
                for i in 0..r.count {
                    let off = r.dword_offset.wrapping_add(i);
                    let Some(v) = read_register(self.preset(), off) else {
                        log::debug!("sim drm: READ_MMR_REG of unallowed offset {off:#x}: EFAULT");
                        return Err(Errno::EFAULT);
                    };
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out
            }
            q => {
                log::debug!("sim drm: AMDGPU_INFO query {q:#x} not answered: EINVAL");
                return Err(Errno::EINVAL);
            }
        };
        let buf = call.array_mut("return_pointer").ok_or(Errno::EFAULT)?;
        let n = bytes.len().min(a.return_size as usize).min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        Ok(())
    }
}

fn get_client(call: &mut IoctlCall) -> IoctlResult {
    let mut a: DrmClient = call.args();
    if a.idx != 0 {
        return Err(Errno::EINVAL);
    }
    a.auth = 1;
    a.pid = call.caller.pid as u64;
    a.uid = OVERFLOW_UID;
    a.magic = 0;
    a.iocs = 0;
    call.set_args(&a);
    Ok(())
}

/// The registers amdgpu lets user space read that libdrm asks for: GB_ADDR_CONFIG on every
/// family, and for pre-GFX9 families the raster/tiling/memory-controller registers (zero here).
fn read_register(p: &GpuPreset, dword_offset: u32) -> Option<u32> {
    match dword_offset {
        0x263e => Some(p.gb_addr_config),
        0x263d | 0xa0d4 | 0xa0d5 | 0x9d8 => Some(0),
        0x2644..=0x2673 => Some(0),
        _ => None,
    }
}

/// `external_rev - chip_rev` per ASIC (amdgpu's external_rev_id offsets).
fn external_rev_base(gfx_target_version: u32) -> u32 {
    match gfx_target_version {
        90000 => 0x01,
        90004 => 0x14,
        90006 => 0x28,
        90008 => 0x32,
        90010 => 0x3c,
        100100 => 0x01,
        100101 => 0x0a,
        100102 => 0x14,
        100300 => 0x28,
        100301 => 0x32,
        100302 => 0x3c,
        110000 => 0x01,
        _ => 0x01,
    }
}

/// `drm_amdgpu_info_device` for a preset, as amdgpu_info_ioctl fills it.
pub fn dev_info(p: &GpuPreset) -> DrmAmdgpuInfoDevice {
    let mut d = <DrmAmdgpuInfoDevice as zerocopy::FromZeros>::new_zeroed();
    let sa_per_se = p.simd_arrays_per_engine.max(1);
    let num_se = (p.array_count / sa_per_se).max(1);
    d.device_id = p.device_id;
    d.chip_rev = 0;
    d.external_rev = external_rev_base(p.gfx_target_version);
    d.pci_rev = p.pci_rev;
    d.family = p.family;
    d.num_shader_engines = num_se;
    d.num_shader_arrays_per_engine = sa_per_se;
    // 100 MHz reference clock, in kHz (xclk * 10).
    d.gpu_counter_freq = 100_000;
    d.max_engine_clock = p.max_engine_clk_fcompute as u64 * 1000;
    d.max_memory_clock = p.mem_clk_max as u64 * 1000;
    d.cu_active_number = p.cu_count;
    // Active CUs per (SE, SA), laid out as gfx_v9 get_cu_info does: [se % 4][sa + se / 4 * sa_per_se].
    let per_array = p.cus_per_array();
    for (k, &cus) in per_array.iter().enumerate() {
        let (se, sa) = (k as u32 / sa_per_se, k as u32 % sa_per_se);
        let (row, col) = ((se % 4) as usize, (sa + se / 4 * sa_per_se) as usize);
        if col < 4 {
            d.cu_bitmap[row][col] = if cus >= 32 {
                u32::MAX
            } else {
                (1u32 << cus) - 1
            };
        }
    }
    let rbs = (num_se * 4).min(32);
    d.num_rb_pipes = rbs;
    d.enabled_rb_pipes_mask = if rbs >= 32 {
        u32::MAX
    } else {
        (1u32 << rbs) - 1
    };
    d.num_hw_gfx_contexts = 8;
    d.ids_flags = if p.is_dgpu {
        0
    } else {
        AMDGPU_IDS_FLAGS_FUSION
    };
    let vm_size = VM_SIZE - VA_RESERVED;
    d.virtual_address_offset = VA_RESERVED;
    d.virtual_address_max = vm_size.min(GMC_HOLE_START);
    d.high_va_offset = GMC_HOLE_END;
    d.high_va_max = GMC_HOLE_END | vm_size;
    d.virtual_address_alignment = 4096;
    d.pte_fragment_size = 2 << 20;
    d.gart_page_size = 4096;
    d.vram_type = if p.vram_width >= 1024 {
        AMDGPU_VRAM_TYPE_HBM
    } else {
        AMDGPU_VRAM_TYPE_GDDR6
    };
    d.vram_bit_width = p.vram_width;
    d.wave_front_size = p.wave_front_size;
    d.num_shader_visible_vgprs = 256;
    d.num_cu_per_sh = p.cu_per_simd_array;
    d.num_tcc_blocks = 16;
    d.gs_vgt_table_depth = 32;
    d.gs_prim_buffer_depth = 1792;
    d.max_gs_waves_per_vgt = 32;
    d
}
