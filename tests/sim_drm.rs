//! The sim device's render node: the DRM ioctls libdrm's amdgpu_device_initialize issues.

#[path = "sim_helpers.rs"]
mod sim_helpers;

use kfdmux::abi::*;
use kfdmux::errno::Errno;
use sim_helpers::*;
use zerocopy::{FromBytes, IntoBytes};

fn version(
    h: &Harness,
    ctx: &dyn kfdmux::device::DeviceContext,
    lens: (u64, u64, u64),
) -> (DrmVersion, Vec<Vec<u8>>) {
    let mut a = DrmVersion::new_zeroed();
    a.name_len = lens.0;
    a.date_len = lens.1;
    a.desc_len = lens.2;
    a.name = 0x1000;
    a.date = 0x2000;
    a.desc = 0x3000;
    let (r, call) = h.io(ctx, DRM_IOCTL_VERSION, &mut a, vec![]);
    assert_eq!(r, Ok(()));
    let bufs = ["name", "date", "desc"]
        .iter()
        .map(|f| call.array(f).unwrap().to_vec())
        .collect();
    (a, bufs)
}

#[test]
fn version_strings_and_lengths() {
    let h = Harness::new("gfx90a");
    let ctx = h.open_render(0);
    // First call: lengths only.
    let (a, _) = version(&h, &*ctx, (0, 0, 0));
    assert_eq!(
        (a.version_major, a.version_minor, a.version_patchlevel),
        (3, 54, 0)
    );
    assert_eq!((a.name_len, a.date_len, a.desc_len), (6, 8, 7));
    // Second call with room: the strings only — no NUL, and the rest of the caller's buffer
    // is not written (only the bytes handed back are copied out).
    let (a, b) = version(&h, &*ctx, (7, 8, 16));
    assert_eq!(&b[0], b"amdgpu");
    assert_eq!(&b[1], b"20150101");
    assert_eq!(&b[2][..], b"AMD GPU");
    assert_eq!((a.name_len, a.date_len, a.desc_len), (6, 8, 7));
    // Short buffers: truncated, full lengths reported.
    let (a, b) = version(&h, &*ctx, (3, 2, 1));
    assert_eq!(
        (&b[0][..], &b[1][..], &b[2][..]),
        (&b"amd"[..], &b"20"[..], &b"A"[..])
    );
    assert_eq!(a.name_len, 6);
}

#[test]
fn get_client() {
    let h = Harness::new("gfx90a");
    let ctx = h.open_render(0);
    let mut c = DrmClient::new_zeroed();
    assert_eq!(h.io0(&*ctx, DRM_IOCTL_GET_CLIENT, &mut c), Ok(()));
    assert_eq!((c.auth, c.pid, c.uid), (1, tgid() as u64, 65534));
    let mut c = DrmClient::new_zeroed();
    c.idx = 1;
    assert_eq!(
        h.io0(&*ctx, DRM_IOCTL_GET_CLIENT, &mut c),
        Err(Errno::EINVAL)
    );
}

fn info(
    h: &Harness,
    ctx: &dyn kfdmux::device::DeviceContext,
    query: u32,
    size: u32,
    reg: (u32, u32),
) -> (Result<(), Errno>, Vec<u8>) {
    let mut a = DrmAmdgpuInfo::new_zeroed();
    a.return_pointer = 0x1000;
    a.return_size = size;
    a.query = query;
    a.read_mmr_reg.dword_offset = reg.0;
    a.read_mmr_reg.count = reg.1;
    a.read_mmr_reg.instance = 0xffff_ffff;
    let (r, call) = h.io(ctx, DRM_IOCTL_AMDGPU_INFO, &mut a, vec![]);
    (r, call.array("return_pointer").unwrap().to_vec())
}

#[test]
fn amdgpu_info_queries() {
    let h = Harness::new("gfx90a,gfx1030");
    let ctx = h.open_render(1);
    let p = h.dev.gpus()[1].preset;
    let (r, b) = info(&h, &*ctx, AMDGPU_INFO_ACCEL_WORKING, 4, (0, 0));
    assert_eq!(r, Ok(()));
    assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 1);
    let size = std::mem::size_of::<DrmAmdgpuInfoDevice>() as u32;
    let (r, b) = info(&h, &*ctx, AMDGPU_INFO_DEV_INFO, size, (0, 0));
    assert_eq!(r, Ok(()));
    let d = DrmAmdgpuInfoDevice::read_from_bytes(&b).unwrap();
    assert_eq!(
        (d.device_id, d.pci_rev, d.family),
        (p.device_id, p.pci_rev, p.family)
    );
    assert_eq!(
        d.num_shader_engines * d.num_shader_arrays_per_engine,
        p.array_count
    );
    assert_eq!(d.cu_active_number, p.cu_count);
    assert_eq!(
        d.cu_bitmap
            .iter()
            .flatten()
            .map(|m| m.count_ones())
            .sum::<u32>(),
        p.cu_count
    );
    assert_eq!(d.max_engine_clock, p.max_engine_clk_fcompute as u64 * 1000);
    assert_eq!(d.gpu_counter_freq, 100_000);
    assert_eq!(d.wave_front_size, p.wave_front_size);
    assert_eq!(d.vram_bit_width, p.vram_width);
    assert_eq!(d.vram_type, AMDGPU_VRAM_TYPE_GDDR6);
    assert_eq!(d.virtual_address_max, 1 << 47);
    assert_eq!(d.external_rev, 0x28);
    // The HBM part on render node 0.
    let ctx0 = h.open_render(0);
    let (_, b) = info(&h, &*ctx0, AMDGPU_INFO_DEV_INFO, size, (0, 0));
    let d0 = DrmAmdgpuInfoDevice::read_from_bytes(&b).unwrap();
    assert_eq!(
        (d0.device_id, d0.vram_type),
        (h.dev.gpus()[0].preset.device_id, AMDGPU_VRAM_TYPE_HBM)
    );
    // A short return buffer gets a prefix only.
    let (r, b) = info(&h, &*ctx, AMDGPU_INFO_DEV_INFO, 8, (0, 0));
    assert_eq!(r, Ok(()));
    assert_eq!(b.len(), 8);
    assert_eq!(&b[..], &d.as_bytes()[..8]);
    // GB_ADDR_CONFIG.
    let (r, b) = info(&h, &*ctx, AMDGPU_INFO_READ_MMR_REG, 4, (0x263e, 1));
    assert_eq!(r, Ok(()));
    assert_eq!(
        u32::from_le_bytes(b[..4].try_into().unwrap()),
        p.gb_addr_config
    );
    assert_eq!(
        info(&h, &*ctx, AMDGPU_INFO_READ_MMR_REG, 4, (0x1234, 1)).0,
        Err(Errno::EFAULT)
    );
    assert_eq!(
        info(&h, &*ctx, AMDGPU_INFO_READ_MMR_REG, 1024, (0x2644, 129)).0,
        Err(Errno::EINVAL)
    );
    let (r, b) = info(&h, &*ctx, AMDGPU_INFO_READ_MMR_REG, 128, (0x2644, 32));
    assert_eq!(r, Ok(()));
    assert!(b.iter().all(|x| *x == 0));
    // Refusals.
    assert_eq!(
        info(&h, &*ctx, AMDGPU_INFO_ACCEL_WORKING, 0, (0, 0)).0,
        Err(Errno::EINVAL)
    );
    assert_eq!(
        info(&h, &*ctx, AMDGPU_INFO_VBIOS, 64, (0, 0)).0,
        Err(Errno::EINVAL)
    );
}

#[test]
fn drm_minor_is_configurable_and_stats_count_render_opens() {
    let h = Harness::with_config(
        "gfx90a",
        kfdmux::device::sim::SimConfig {
            drm_minor: 49,
            ..Default::default()
        },
    );
    let ctx = h.open_render(0);
    assert_eq!(h.stat("render_contexts"), 1);
    let (a, _) = version(&h, &*ctx, (0, 0, 0));
    assert_eq!(a.version_minor, 49);
    drop(ctx);
    assert_eq!(h.stat("render_contexts"), 0);
    use kfdmux::device::{Device, FileKind};
    assert!(
        h.dev.open(&h.caller, FileKind::Render(1)).is_err(),
        "no second GPU"
    );
}
