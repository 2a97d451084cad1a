//! Containers: a workload's replica runs its tenant's OCI image with
//! `runc`, in the sandbox the agent built for it (the cgroup under the
//! agent's, the tenant's network namespace and uid). The engine process
//! driver in `supervisor` runs everything else; a placement with a
//! `container` comes here.

mod bundle;
pub mod image;
mod seccomp;
mod unpack;

use std::path::{Path, PathBuf};

pub use atrium_volume as volume;
pub use atrium_volume::VolumeStore;
pub use bundle::{gpu_devices, process_args, Bundle, VolumeBind};
pub use image::{ImageCache, Pulled};

/// The runc binary, and where it keeps its containers' state (per agent).
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    pub state_dir: PathBuf,
}

impl Runc {
    pub fn for_data_dir(data_dir: &Path) -> Runc {
        Runc {
            binary: PathBuf::from("runc"),
            state_dir: data_dir.join("runc"),
        }
    }

    /// The arguments that run container `id` from `bundle` in the
    /// foreground: runc's PID is the replica's, its exit the container's.
    pub fn run_args(&self, id: &str, bundle: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "--root".into(),
            self.state_dir.clone().into(),
            "run".into(),
            "--bundle".into(),
            bundle.into(),
            id.into(),
        ]
    }

    /// The arguments that run `command` in container `id`, as its own
    /// process's user and privileges. The command follows the id: runc
    /// takes nothing after it as an option of its own.
    pub fn exec_args(&self, id: &str, command: &[String]) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--root".into(),
            self.state_dir.clone().into(),
            "exec".into(),
            id.into(),
        ];
        args.extend(command.iter().map(Into::into));
        args
    }

    /// Forgets container `id` (killed or exited): its state under runc's
    /// root would refuse the next run of the same id.
    pub fn delete(&self, id: &str) {
        let out = std::process::Command::new(&self.binary)
            .arg("--root")
            .arg(&self.state_dir)
            .args(["delete", "--force", id])
            .stdin(std::process::Stdio::null())
            .output();
        if let Ok(o) = out {
            if !o.status.success() {
                let why = String::from_utf8_lossy(&o.stderr);
                if !why.contains("does not exist") {
                    tracing::debug!(container = id, %why, "runc delete");
                }
            }
        }
    }

    /// What containers on this node get, or why they cannot run (for the
    /// isolation report and the agent's start).
    pub fn summary(&self) -> String {
        let out = std::process::Command::new(&self.binary)
            .arg("--version")
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let version = String::from_utf8_lossy(&o.stdout);
                format!(
                    "{} (tenant uid, read-only root, no capabilities, no new privileges, \
                     image layers confined on unpack)",
                    version.lines().next().unwrap_or("runc").trim()
                )
            }
            _ => "no: runc is not installed (apt-get install runc); workloads fail to start".into(),
        }
    }
}
