//! What this node has: CPUs, memory and disk from the OS, GPUs from
//! `nvidia-smi` (the NVIDIA driver's own tool, present wherever NVML is), or
//! simulated GPUs for development and tests.

use std::path::Path;
use std::process::Command;

use atrium_core::node::Gpu;
use atrium_core::quantity::{ByteSize, CpuMillis};

use crate::AgentError;

#[derive(Debug, Clone)]
pub struct Inventory {
    pub cpu: CpuMillis,
    pub memory: ByteSize,
    pub disk: ByteSize,
    pub gpus: Vec<Gpu>,
}

fn memory_total() -> ByteSize {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| ByteSize(kb * 1024))
        .unwrap_or_default()
}

/// Size of the filesystem holding `dir`, from `df` (no unsafe statvfs call).
fn disk_total(dir: &Path) -> ByteSize {
    let _ = std::fs::create_dir_all(dir);
    let out = Command::new("df").args(["-Pk"]).arg(dir).output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| {
            t.lines()
                .nth(1)
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| ByteSize(kb * 1024))
        .unwrap_or_default()
}

/// Real GPUs, when the NVIDIA driver is installed.
fn nvidia_gpus() -> Vec<Gpu> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,uuid,name,memory.total,mig.mode.current",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    if !out.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `nvidia-smi --query-gpu=index,uuid,name,memory.total,mig.mode.current
/// --format=csv,noheader,nounits` output (memory in MiB).
pub fn parse_nvidia_smi(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            if f.len() < 4 {
                return None;
            }
            let mib: u64 = f[3].parse().ok()?;
            Some(Gpu {
                index: f[0].parse().ok()?,
                uuid: Some(f[1].to_string()),
                model: f[2].replace("NVIDIA ", "").replace(' ', "-"),
                memory: ByteSize(mib << 20),
                mig_capable: f
                    .get(4)
                    .is_some_and(|m| *m == "Enabled" || *m == "Disabled"),
                nvlink_domain: None,
                rail: None,
            })
        })
        .collect()
}

/// `COUNTxMODEL` with the memory taken from the model name (`H100-80GB`),
/// e.g. `8xH100-80GB`: GPUs in one NVLink domain, MIG-capable for H100/H200.
pub fn parse_simulated_gpus(spec: &str) -> Result<Vec<Gpu>, AgentError> {
    let err =
        || AgentError::SimulatedGpus(format!("{spec:?}: use COUNTxMODEL-MEMGB, e.g. 8xH100-80GB"));
    let (count, model) = spec.split_once('x').ok_or_else(err)?;
    let count: u32 = count.parse().map_err(|_| err())?;
    let gb: u64 = model
        .rsplit_once('-')
        .and_then(|(_, m)| m.strip_suffix("GB"))
        .and_then(|m| m.parse().ok())
        .ok_or_else(err)?;
    let mig = model.starts_with("H100") || model.starts_with("H200") || model.starts_with("A100");
    Ok((0..count)
        .map(|index| Gpu {
            index,
            uuid: Some(format!("GPU-simulated-{index:04}")),
            model: model.to_string(),
            memory: ByteSize(gb << 30),
            mig_capable: mig,
            nvlink_domain: Some("nvl0".into()),
            rail: Some(index),
        })
        .collect())
}

pub fn discover(data_dir: &Path, simulate_gpus: Option<&str>) -> Result<Inventory, AgentError> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let gpus = match simulate_gpus {
        Some(spec) => parse_simulated_gpus(spec)?,
        None => nvidia_gpus(),
    };
    Ok(Inventory {
        cpu: CpuMillis::cores(cores),
        memory: memory_total(),
        disk: disk_total(data_dir),
        gpus,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi_and_simulated_gpus() {
        let gpus = parse_nvidia_smi("0, GPU-abc, NVIDIA H100 80GB HBM3, 81559, Disabled\n1, GPU-def, NVIDIA H100 80GB HBM3, 81559, [N/A]\n");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].model, "H100-80GB-HBM3");
        assert_eq!(gpus[0].memory, ByteSize(81559 << 20));
        assert!(gpus[0].mig_capable && !gpus[1].mig_capable);
        let sim = parse_simulated_gpus("8xH100-80GB").unwrap();
        assert_eq!(sim.len(), 8);
        assert_eq!(sim[7].memory, ByteSize::gib(80));
        assert!(parse_simulated_gpus("8H100").is_err());
        assert!(parse_simulated_gpus("xH100-80GB").is_err());
    }
}
