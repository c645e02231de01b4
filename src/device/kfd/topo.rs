//! The topology clients of the kfd device see: the host's real one, filtered to the GPUs this
//! daemon gives out, with the SVM capability cleared (forwarded contexts refuse SVM).

use std::fs;
use std::path::Path;

use crate::sysfs::{parse_properties, property};
use crate::topology::HSA_CAP_SVMAPI_SUPPORTED;

/// One GPU node of the host's topology.
#[derive(Debug, Clone)]
pub struct GpuNode {
    /// The node's number in the host's topology.
    pub node: usize,
    pub gpu_id: u32,
    pub render_minor: u32,
    pub gfx_target_version: u32,
}

fn node_dirs(topology: &Path) -> Result<Vec<usize>, String> {
    let nodes = topology.join("nodes");
    let rd = fs::read_dir(&nodes).map_err(|e| format!("reading {}: {e}", nodes.display()))?;
    let mut v: Vec<usize> = rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The GPU nodes of `sysfs/topology`, the `allowed` ones (indices among GPU nodes) only.
pub fn read_gpus(sysfs: &Path, allowed: Option<&[usize]>) -> Result<Vec<GpuNode>, String> {
    let topology = sysfs.join("topology");
    let mut gpus = Vec::new();
    for n in node_dirs(&topology)? {
        let dir = topology.join("nodes").join(n.to_string());
        let gpu_id: u32 = fs::read_to_string(dir.join("gpu_id"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if gpu_id == 0 {
            continue;
        }
        let props =
            parse_properties(&fs::read_to_string(dir.join("properties")).unwrap_or_default());
        gpus.push(GpuNode {
            node: n,
            gpu_id,
            render_minor: property(&props, "drm_render_minor").unwrap_or(0) as u32,
            gfx_target_version: property(&props, "gfx_target_version").unwrap_or(0) as u32,
        });
    }
    if let Some(a) = allowed {
        if let Some(bad) = a.iter().find(|&&i| i >= gpus.len()) {
            return Err(format!(
                "--kfd-gpus: GPU {bad} does not exist ({} GPU nodes in {})",
                gpus.len(),
                topology.display()
            ));
        }
        gpus = gpus
            .into_iter()
            .enumerate()
            .filter(|(i, _)| a.contains(i))
            .map(|(_, g)| g)
            .collect();
    }
    if gpus.is_empty() {
        return Err(format!("no GPU node to give out in {}", topology.display()));
    }
    Ok(gpus)
}

fn rewrite_props(text: &str, f: impl Fn(&str, u64) -> Option<u64>) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) {
            (Some(k), Some(v)) => match f(k, v) {
                Some(nv) => out.push_str(&format!("{k} {nv}\n")),
                None => out.push_str(&format!("{line}\n")),
            },
            _ => out.push_str(&format!("{line}\n")),
        }
    }
    out
}

fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    fs::create_dir_all(dst)?;
    for e in fs::read_dir(src)? {
        let e = e?;
        let to = dst.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &to)?;
        } else if let Ok(data) = fs::read(e.path()) {
            fs::write(&to, data)?;
        }
    }
    Ok(())
}

/// Writes `dst/topology`: CPU nodes and the given GPU nodes, renumbered from 0; links to removed
/// nodes dropped; `capability` without SVMAPISupported.
pub fn write_filtered(sysfs: &Path, dst: &Path, gpus: &[GpuNode]) -> Result<(), String> {
    let src = sysfs.join("topology");
    let out = dst.join("topology");
    let _ = fs::remove_dir_all(&out);
    let err = |e: std::io::Error| format!("writing {}: {e}", out.display());
    fs::create_dir_all(out.join("nodes")).map_err(err)?;
    for f in ["generation_id", "system_properties"] {
        if let Ok(d) = fs::read(src.join(f)) {
            fs::write(out.join(f), d).map_err(err)?;
        }
    }
    // Old node number → new.
    let mut keep = Vec::new();
    for n in node_dirs(&src)? {
        let gpu_id: u32 = fs::read_to_string(src.join(format!("nodes/{n}/gpu_id")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if gpu_id == 0 || gpus.iter().any(|g| g.node == n) {
            keep.push(n);
        }
    }
    let new_of = |old: u64| keep.iter().position(|&k| k as u64 == old).map(|p| p as u64);
    for (new, &old) in keep.iter().enumerate() {
        let s = src.join(format!("nodes/{old}"));
        let d = out.join(format!("nodes/{new}"));
        copy_dir(&s, &d).map_err(err)?;
        let mut link_counts = Vec::new();
        for links in ["io_links", "p2p_links"] {
            let ld = d.join(links);
            let _ = fs::remove_dir_all(&ld);
            let mut count = 0;
            if let Ok(rd) = fs::read_dir(s.join(links)) {
                let mut ids: Vec<usize> = rd
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect();
                ids.sort_unstable();
                for id in ids {
                    let text = fs::read_to_string(s.join(format!("{links}/{id}/properties")))
                        .unwrap_or_default();
                    let props = parse_properties(&text);
                    let to = property(&props, "node_to").and_then(new_of);
                    let Some(_) = to else { continue };
                    let text = rewrite_props(&text, |k, v| match k {
                        "node_from" | "node_to" => new_of(v),
                        _ => None,
                    });
                    fs::create_dir_all(ld.join(count.to_string())).map_err(err)?;
                    fs::write(ld.join(format!("{count}/properties")), text).map_err(err)?;
                    count += 1;
                }
            }
            if count > 0 || s.join(links).is_dir() {
                fs::create_dir_all(&ld).map_err(err)?;
            }
            link_counts.push(count);
        }
        let props = fs::read_to_string(s.join("properties")).unwrap_or_default();
        let props = rewrite_props(&props, |k, v| match k {
            "capability" => Some(v & !(HSA_CAP_SVMAPI_SUPPORTED as u64)),
            "io_links_count" => Some(link_counts[0] as u64),
            "p2p_links_count" => Some(link_counts[1] as u64),
            _ => None,
        });
        fs::write(d.join("properties"), props).map_err(err)?;
    }
    Ok(())
}
