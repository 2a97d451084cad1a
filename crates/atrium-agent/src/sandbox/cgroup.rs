//! Workloads' cgroups: which hierarchy this host offers (v2 with cpu,
//! memory and pids, else the v1 controllers), each workload's CPU quota,
//! memory limit, pids limit and — under v1 — the devices it may open,
//! its accounting, and emptying it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use atrium_core::node::Gpu;
use atrium_core::placement::PlacementSpec;

use super::{kill, Host};

use super::SandboxError;

/// Processes one workload may have at once (threads count too).
pub const PIDS_LIMIT: u32 = 1024;

pub const CPU_PERIOD_US: u64 = 100_000;
/// Character-device major of `/dev/nvidia<minor>`; the driver numbers GPU
/// device files by minor, which is the GPU's index on a node whose
/// `nvidia-smi` order is the PCI order (the default).
const NVIDIA_MAJOR: u32 = 195;

#[derive(Debug, Clone, PartialEq)]
pub enum Cgroups {
    V2 { base: PathBuf },
    V1 { bases: Vec<(&'static str, PathBuf)> },
    Unavailable(String),
}

/// Finds the cgroup hierarchy to use: v2 when its root offers cpu, memory
/// and pids, else the v1 mounts of those three (cpuacct too when mounted).
pub fn detect_cgroups(octet: u8) -> Cgroups {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let name = format!("atrium-{octet}");
    let mut v1: Vec<(&'static str, PathBuf)> = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, mountpoint, fstype, options, ..] = f[..] else {
            continue;
        };
        if fstype == "cgroup2" {
            let controllers =
                std::fs::read_to_string(Path::new(mountpoint).join("cgroup.controllers"))
                    .unwrap_or_default();
            let have: Vec<&str> = controllers.split_whitespace().collect();
            if ["cpu", "memory", "pids"].iter().all(|c| have.contains(c)) {
                return Cgroups::V2 {
                    base: Path::new(mountpoint).join(&name),
                };
            }
        } else if fstype == "cgroup" {
            for controller in ["cpu", "cpuacct", "memory", "pids", "devices"] {
                if options.split(',').any(|o| o == controller)
                    && !v1.iter().any(|(c, _)| *c == controller)
                {
                    v1.push((controller, Path::new(mountpoint).join(&name)));
                }
            }
        }
    }
    let missing: Vec<&str> = ["cpu", "memory", "pids"]
        .into_iter()
        .filter(|c| !v1.iter().any(|(have, _)| have == c))
        .collect();
    if missing.is_empty() {
        Cgroups::V1 { bases: v1 }
    } else {
        Cgroups::Unavailable(format!(
            "no cgroup v2 with cpu, memory and pids, and no v1 {}",
            missing.join(", ")
        ))
    }
}

/// This agent's directory in every mounted cgroup hierarchy where there
/// is one: runc makes its containers' cgroups in all of them, not only in
/// the controllers the agent sets limits with.
pub(super) fn every_hierarchy(octet: u8) -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [_, mountpoint, fstype, ..] = f[..] else {
                return None;
            };
            let dir = Path::new(mountpoint).join(format!("atrium-{octet}"));
            (matches!(fstype, "cgroup" | "cgroup2") && dir.is_dir()).then_some(dir)
        })
        .collect()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupStats {
    pub cpu_usage_us: Option<u64>,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_us: u64,
    pub oom_kills: u64,
}

/// Kills every process in the cgroups `dirs`, until they are empty (or 5 s
/// have passed).
pub(super) fn kill_members(dirs: &[PathBuf]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for dir in dirs {
        loop {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<u32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() || std::time::Instant::now() > deadline {
                break;
            }
            pids.into_iter().for_each(kill);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Kills what is left in each cgroup of `dirs` and removes it. An emptied
/// cgroup can stay busy for a while after its last process is gone (the
/// kernel unlinks an exiting task after it has switched out, later under
/// load), so removal is retried for up to 5 s. Returns the cgroups that
/// would not go, with why.
pub(super) fn remove_cgroups(dirs: &[PathBuf]) -> Vec<(PathBuf, std::io::Error)> {
    kill_members(dirs);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut left = Vec::new();
    for dir in dirs {
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if std::time::Instant::now() > deadline => {
                    left.push((dir.clone(), e));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    left
}

/// The cgroups directly below `dir`.
pub(super) fn child_cgroups(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn enable_v2_controllers(dir: &Path) -> Result<(), SandboxError> {
    let file = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&file).unwrap_or_default();
    for c in ["cpu", "memory", "pids"] {
        if !on.split_whitespace().any(|x| x == c) {
            std::fs::write(&file, format!("+{c}"))
                .map_err(|e| refused!("{}: +{c}: {e}", file.display()))?;
        }
    }
    Ok(())
}

impl Host {
    /// The cgroup directories of a workload (`Some(id)`) or the agent's
    /// parents of them (`None`).
    pub fn cgroup_dirs(&self, workload: Option<&str>) -> Vec<PathBuf> {
        let at = |base: &PathBuf| match workload {
            Some(id) => base.join(id),
            None => base.clone(),
        };
        match &self.cgroups {
            Cgroups::V2 { base } => vec![at(base)],
            Cgroups::V1 { bases } => bases.iter().map(|(_, b)| at(b)).collect(),
            Cgroups::Unavailable(_) => Vec::new(),
        }
    }

    pub(super) fn make_cgroup(
        &self,
        id: &str,
        spec: &PlacementSpec,
        gpus: &[Gpu],
    ) -> Result<Vec<PathBuf>, SandboxError> {
        let cpu_quota_us = spec.resources.cpu.0 * CPU_PERIOD_US / 1000;
        let memory = spec.resources.memory.0;
        let write = |dir: &Path, file: &str, value: String| -> Result<(), SandboxError> {
            std::fs::write(dir.join(file), &value)
                .map_err(|e| refused!("{}/{file} = {value}: {e}", dir.display()))
        };
        let mut procs = Vec::new();
        match &self.cgroups {
            Cgroups::V2 { base } => {
                let dir = base.join(id);
                std::fs::create_dir_all(&dir).map_err(|e| SandboxError::at(&dir, e))?;
                if cpu_quota_us > 0 {
                    write(&dir, "cpu.max", format!("{cpu_quota_us} {CPU_PERIOD_US}"))?;
                }
                if memory > 0 {
                    write(&dir, "memory.max", memory.to_string())?;
                    // No swap: the limit is the memory it gets.
                    let _ = write(&dir, "memory.swap.max", "0".into());
                }
                write(&dir, "pids.max", PIDS_LIMIT.to_string())?;
                procs.push(dir.join("cgroup.procs"));
            }
            Cgroups::V1 { bases } => {
                for (controller, base) in bases {
                    let dir = base.join(id);
                    std::fs::create_dir_all(&dir).map_err(|e| SandboxError::at(&dir, e))?;
                    match *controller {
                        "cpu" if cpu_quota_us > 0 => {
                            write(&dir, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                            write(&dir, "cpu.cfs_quota_us", cpu_quota_us.to_string())?;
                        }
                        "memory" if memory > 0 => {
                            write(&dir, "memory.limit_in_bytes", memory.to_string())?;
                            // Only where swap accounting is on.
                            let _ = write(&dir, "memory.memsw.limit_in_bytes", memory.to_string());
                        }
                        "pids" => write(&dir, "pids.max", PIDS_LIMIT.to_string())?,
                        // The node's other GPUs cannot be opened at all,
                        // whatever the environment says.
                        "devices" => {
                            for gpu in gpus
                                .iter()
                                .filter(|g| !spec.gpus.iter().any(|s| s.gpu == g.index))
                            {
                                write(
                                    &dir,
                                    "devices.deny",
                                    format!("c {NVIDIA_MAJOR}:{} rwm", gpu.index),
                                )?;
                            }
                        }
                        _ => {}
                    }
                    procs.push(dir.join("cgroup.procs"));
                }
            }
            Cgroups::Unavailable(_) => {}
        }
        Ok(procs)
    }

    /// CPU and memory accounting of workload `id`.
    pub fn stats(&self, id: &str) -> CgroupStats {
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let field = |text: &str, key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
                .unwrap_or(0)
        };
        let mut s = CgroupStats::default();
        match &self.cgroups {
            Cgroups::V2 { base } => {
                let dir = base.join(id);
                let cpu = read(dir.join("cpu.stat"));
                s.cpu_usage_us = Some(field(&cpu, "usage_usec"));
                s.nr_periods = field(&cpu, "nr_periods");
                s.nr_throttled = field(&cpu, "nr_throttled");
                s.throttled_us = field(&cpu, "throttled_usec");
                s.oom_kills = field(&read(dir.join("memory.events")), "oom_kill");
            }
            Cgroups::V1 { bases } => {
                for (controller, base) in bases {
                    let dir = base.join(id);
                    match *controller {
                        "cpu" => {
                            let cpu = read(dir.join("cpu.stat"));
                            s.nr_periods = field(&cpu, "nr_periods");
                            s.nr_throttled = field(&cpu, "nr_throttled");
                            s.throttled_us = field(&cpu, "throttled_time") / 1000;
                        }
                        "cpuacct" => {
                            s.cpu_usage_us = read(dir.join("cpuacct.usage"))
                                .trim()
                                .parse::<u64>()
                                .ok()
                                .map(|ns| ns / 1000);
                        }
                        "memory" => {
                            s.oom_kills = field(&read(dir.join("memory.oom_control")), "oom_kill");
                        }
                        _ => {}
                    }
                }
            }
            Cgroups::Unavailable(_) => {}
        }
        s
    }
}
