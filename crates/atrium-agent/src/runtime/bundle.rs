//! The OCI runtime bundle of one container: `config.json` beside a root
//! that is the cached image, read-only. What it grants is the least a
//! workload needs: the tenant's uid and gid with no supplementary groups,
//! no capabilities at all (ports below 1024 are opened by lowering the
//! namespace's unprivileged-port floor instead), no new privileges, its
//! own pid/ipc/uts/mount namespaces in the tenant's network namespace, the
//! agent's cgroup for the replica with its CPU, memory and pids limits,
//! only the default device nodes, the kernel's sensitive paths masked,
//! and a seccomp filter (`seccomp.rs`) over what an unprivileged process
//! could still reach.
//! `/etc/hostname` holds the container's host name (read-only).
//! Writable: a tmpfs `/tmp` (counted in its memory) and `/scratch`, the
//! replica's own directory, and the tenant's volumes it mounts (`nosuid`,
//! `nodev`; those under `/volumes` sit on a tmpfs of their own, so no
//! mount point is ever made in the shared image).

use std::path::PathBuf;

use atrium_core::volume::VOLUMES_DIR;

use super::unpack::HOSTNAME_FILE;
use serde_json::{json, Value};

/// Everything one container's `config.json` is made from.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub rootfs: PathBuf,
    pub hostname: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    /// `/var/run/netns/<name>` of the tenant's namespace, when there is one.
    pub netns: Option<PathBuf>,
    /// The replica's cgroup, relative to each hierarchy's root.
    pub cgroup: Option<String>,
    pub memory: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub pids: u64,
    pub scratch: PathBuf,
    /// Character devices the container may open: the GPUs its placement
    /// holds (and the driver's control nodes), nothing else.
    pub devices: Vec<Device>,
    /// The tenant's volumes, bound in.
    pub volumes: Vec<VolumeBind>,
}

/// A volume mounted on the host at `source`, bound at `destination`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeBind {
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

/// A character device node passed into a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    pub major: u64,
    pub minor: u64,
}

/// The device nodes of `gpus` (indices on this node) and, when there is
/// any, the NVIDIA driver's control nodes, as they exist on this host
/// (simulated GPUs have none).
pub fn gpu_devices(gpus: &[u32]) -> Vec<Device> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    if gpus.is_empty() {
        return Vec::new();
    }
    let paths = gpus
        .iter()
        .map(|g| PathBuf::from(format!("/dev/nvidia{g}")))
        .chain(["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"].map(PathBuf::from));
    paths
        .filter_map(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            meta.file_type().is_char_device().then(|| {
                let rdev = meta.rdev();
                Device {
                    major: rustix::fs::major(rdev).into(),
                    minor: rustix::fs::minor(rdev).into(),
                    path,
                }
            })
        })
        .collect()
}

const MASKED: [&str; 9] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
];
const READ_ONLY: [&str; 6] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/scsi",
];

impl Bundle {
    /// The runtime spec, as runc 1.1 reads it.
    pub fn config(&self) -> Value {
        let mut namespaces = vec![
            json!({"type": "pid"}),
            json!({"type": "ipc"}),
            json!({"type": "uts"}),
            json!({"type": "mount"}),
        ];
        namespaces.push(match &self.netns {
            Some(path) => json!({"type": "network", "path": path}),
            // No tenant namespace on this host: a private, empty one
            // rather than the host's.
            None => json!({"type": "network"}),
        });
        let none: [&str; 0] = [];
        let mut allowed = vec![json!({"allow": false, "access": "rwm"})];
        allowed.extend(self.devices.iter().map(|d| {
            json!({"allow": true, "type": "c", "major": d.major, "minor": d.minor, "access": "rwm"})
        }));
        let nodes: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                json!({"path": d.path, "type": "c", "major": d.major, "minor": d.minor,
                       "fileMode": 0o666, "uid": 0, "gid": 0})
            })
            .collect();
        let mut linux = json!({
            "namespaces": namespaces,
            "devices": nodes,
            "resources": {
                "devices": allowed,
                "memory": {"limit": self.memory, "swap": self.memory},
                "cpu": {"quota": self.cpu_quota_us, "period": self.cpu_period_us},
                "pids": {"limit": self.pids},
            },
            "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0"},
            "maskedPaths": MASKED,
            "readonlyPaths": READ_ONLY,
        });
        if let Some(cgroup) = &self.cgroup {
            linux["cgroupsPath"] = json!(cgroup);
        }
        linux["seccomp"] = super::seccomp::profile();
        let mut mounts = json!([
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=262144k"]},
            {"destination": "/scratch", "type": "bind", "source": self.scratch,
             "options": ["rbind", "rw", "nosuid", "nodev"]},
        ]);
        if let Some(list) = mounts.as_array_mut() {
            // Over the empty file unpacking made; an image whose /etc is
            // not a plain directory goes without.
            let plain = |p: &str, dir: bool| {
                self.rootfs.join(p).symlink_metadata().is_ok_and(|m| {
                    if dir {
                        m.is_dir()
                    } else {
                        m.is_file()
                    }
                })
            };
            if plain("etc", true) && plain(HOSTNAME_FILE, false) {
                list.push(
                    json!({"destination": format!("/{HOSTNAME_FILE}"), "type": "bind",
                    "source": self.dir.join("hostname"),
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}),
                );
            }
            let under = format!("{VOLUMES_DIR}/");
            if self
                .volumes
                .iter()
                .any(|v| v.destination.starts_with(&under))
            {
                list.push(
                    json!({"destination": VOLUMES_DIR, "type": "tmpfs", "source": "tmpfs",
                    "options": ["nosuid", "nodev", "noexec", "mode=755", "size=64k"]}),
                );
            }
            list.extend(self.volumes.iter().map(|v| {
                let mode = if v.read_only { "ro" } else { "rw" };
                json!({"destination": v.destination, "type": "bind", "source": v.source,
                       "options": ["rbind", mode, "nosuid", "nodev"]})
            }));
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": self.uid, "gid": self.uid, "additionalGids": none},
                "args": self.args,
                "env": self.env,
                "cwd": self.cwd,
                "capabilities": {
                    "bounding": none, "effective": none, "inheritable": none,
                    "permitted": none, "ambient": none
                },
                "noNewPrivileges": true
            },
            "root": {"path": self.rootfs, "readonly": true},
            "hostname": self.hostname,
            "mounts": mounts,
            "linux": linux,
        })
    }

    /// Writes `config.json` into the bundle directory (root only).
    pub fn write(&self) -> Result<PathBuf, String> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let hostname = self.dir.join("hostname");
        std::fs::write(&hostname, format!("{}\n", self.hostname))
            .map_err(|e| format!("{}: {e}", hostname.display()))?;
        let path = self.dir.join("config.json");
        let text = serde_json::to_vec_pretty(&self.config()).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(self.dir.clone())
    }
}

/// The command line a container starts with: the workload's `command`
/// (else the image's entrypoint) followed by its `args` (else, when it
/// gave no command either, the image's `Cmd`), as Kubernetes does.
pub fn process_args(
    command: &[String],
    args: &[String],
    entrypoint: Option<&[String]>,
    cmd: Option<&[String]>,
) -> Vec<String> {
    let head: Vec<String> = if command.is_empty() {
        entrypoint.unwrap_or_default().to_vec()
    } else {
        command.to_vec()
    };
    let tail: Vec<String> = if !args.is_empty() {
        args.to_vec()
    } else if command.is_empty() {
        cmd.unwrap_or_default().to_vec()
    } else {
        Vec::new()
    };
    head.into_iter().chain(tail).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// A tenant's container with no network or cgroup of its own.
    fn bundle(devices: Vec<Device>) -> Bundle {
        Bundle {
            dir: "/b".into(),
            rootfs: "/r".into(),
            hostname: "w-0".into(),
            args: s(&["/bin/sh"]),
            env: vec![],
            cwd: "/".into(),
            uid: 2_000_001,
            netns: None,
            cgroup: None,
            memory: 1 << 30,
            cpu_quota_us: 0,
            cpu_period_us: 100_000,
            pids: 512,
            scratch: "/s".into(),
            devices,
            volumes: vec![],
        }
    }

    #[test]
    fn command_and_args_combine_as_kubernetes_does() {
        let (ep, cmd) = (s(&["/ep"]), s(&["default"]));
        assert_eq!(
            process_args(&[], &[], Some(&ep), Some(&cmd)),
            s(&["/ep", "default"])
        );
        assert_eq!(
            process_args(&[], &s(&["x"]), Some(&ep), Some(&cmd)),
            s(&["/ep", "x"])
        );
        assert_eq!(
            process_args(&s(&["/c"]), &[], Some(&ep), Some(&cmd)),
            s(&["/c"])
        );
        assert_eq!(
            process_args(&s(&["/c"]), &s(&["y"]), None, None),
            s(&["/c", "y"])
        );
    }

    #[test]
    fn the_spec_grants_no_capability_and_no_new_privileges() {
        let b = Bundle {
            netns: Some("/var/run/netns/t".into()),
            cgroup: Some("/atrium-1/rep".into()),
            cpu_quota_us: 50_000,
            ..bundle(vec![])
        };
        let c = b.config();
        assert_eq!(c["process"]["noNewPrivileges"], true);
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            assert_eq!(c["process"]["capabilities"][set], json!([]), "{set}");
        }
        assert_eq!(c["process"]["user"]["uid"], 2_000_001);
        assert_eq!(c["root"]["readonly"], true);
        assert_eq!(c["linux"]["namespaces"][4]["path"], "/var/run/netns/t");
        assert_eq!(
            c["linux"]["resources"]["devices"],
            json!([{"allow": false, "access": "rwm"}])
        );
        assert_eq!(c["linux"]["devices"], json!([]));
    }

    #[test]
    fn volumes_are_bound_nosuid_and_those_under_volumes_sit_on_a_fresh_tmpfs() {
        let bind = |dest: &str, read_only| VolumeBind {
            source: format!("/host{dest}").into(),
            destination: dest.into(),
            read_only,
        };
        let b = Bundle {
            volumes: vec![bind("/volumes/data", false), bind("/srv", true)],
            ..bundle(vec![])
        };
        let c = b.config();
        let mounts = c["mounts"].as_array().unwrap();
        let at = |dest: &str| {
            mounts
                .iter()
                .position(|m| m["destination"] == dest)
                .unwrap()
        };
        assert_eq!(mounts[at("/volumes")]["type"], "tmpfs");
        assert!(at("/volumes") < at("/volumes/data"), "the tmpfs first");
        assert_eq!(
            mounts[at("/volumes/data")]["options"],
            json!(["rbind", "rw", "nosuid", "nodev"])
        );
        assert_eq!(mounts[at("/srv")]["options"][1], "ro");
        assert_eq!(mounts[at("/srv")]["source"], "/host/srv");
        // Without volumes under /volumes, no tmpfs there.
        let plain = Bundle {
            volumes: vec![bind("/srv", false)],
            ..bundle(vec![])
        }
        .config();
        let dests: Vec<&Value> = plain["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| &m["destination"])
            .collect();
        assert!(!dests.contains(&&json!("/volumes")));
    }

    #[test]
    fn a_gpu_placement_opens_its_own_gpu_device_and_no_other() {
        let gpu = Device {
            path: "/dev/nvidia3".into(),
            major: 195,
            minor: 3,
        };
        let b = bundle(vec![gpu]);
        let c = b.config();
        let rules = c["linux"]["resources"]["devices"].as_array().unwrap();
        assert_eq!(
            rules[0],
            json!({"allow": false, "access": "rwm"}),
            "deny all first"
        );
        assert_eq!(rules[1]["minor"], 3);
        assert_eq!(rules.len(), 2);
        assert_eq!(c["linux"]["devices"][0]["path"], "/dev/nvidia3");
        // Only nodes that exist are passed (simulated GPUs have none).
        let node = std::path::Path::new("/dev/nvidia7");
        let passed = gpu_devices(&[7]).iter().any(|d| d.path == node);
        assert_eq!(passed, node.exists());
        assert!(gpu_devices(&[]).is_empty());
    }
}
