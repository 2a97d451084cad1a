//! Sandboxes for workload processes. Every engine the agent runs as root
//! gets, from its placement and its tenant:
//!
//! - its own cgroup with the placement's CPU quota and memory limit and a
//!   pids limit (cgroup v2 when the unified hierarchy has the cpu, memory
//!   and pids controllers, else the v1 controllers);
//! - its tenant's network namespace on this node (one per tenant, created
//!   on first use): a veth pair to the host carrying a /30 from the agent's
//!   tenant network, and an nftables table that drops every packet a tenant
//!   namespace sends to the host or towards another namespace unless it
//!   answers a connection the host opened — so the gateway on the host
//!   reaches every replica, and no tenant reaches another tenant, the
//!   control plane or the gateway. The engine listens on the namespace's
//!   address only;
//! - its tenant's unprivileged uid/gid (no supplementary groups, no new
//!   privileges), a private 0700 directory as HOME and TMPDIR
//!   (`<sandboxes>/tenants/<tenant>`), and the model's files bound
//!   read-only, in a mount namespace of its own, at a root-owned mount
//!   point (`views`: the source, inside a model root, is never changed);
//! - an environment of its own (nothing of the agent's, whose environment
//!   may hold the control plane's credentials) with `CUDA_VISIBLE_DEVICES`
//!   and `NVIDIA_VISIBLE_DEVICES` naming only its GPUs, by UUID.
//!
//! The engine is started through `atrium sandbox-exec` (`exec`), which
//! joins the cgroups, enters the namespaces, binds the model, drops
//! privileges and `exec`s the engine: the engine's PID is the one the agent
//! spawned, inside every limit from its first instruction.
//!
//! Without root none of this can be done; the agent then runs engines as
//! before and says so in each replica's `isolation` report.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use atrium_core::node::Gpu;
use atrium_core::placement::PlacementSpec;

/// Why a sandbox, or a host capability it needs, is not there. Its text
/// is what an operator reads in the node's isolation summary and a tenant
/// in its replica's status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// A file or directory could not be made, changed or read.
    #[error("{path}: {why}")]
    Path { path: String, why: String },
    /// A host tool (`ip`, `nft`) is missing or refused the change.
    #[error("{0}")]
    Tool(String),
    /// Not allowed: a name, a path or a model source the sandbox will not
    /// use, or a host that cannot enforce what is asked.
    #[error("{0}")]
    Refused(String),
}

impl SandboxError {
    pub(crate) fn at(path: impl AsRef<Path>, why: impl std::fmt::Display) -> SandboxError {
        SandboxError::Path {
            path: path.as_ref().display().to_string(),
            why: why.to_string(),
        }
    }
}

/// A refusal, as `format!` words it.
macro_rules! refused {
    ($($why:tt)*) => {
        $crate::sandbox::SandboxError::Refused(format!($($why)*))
    };
}

mod cgroup;
mod exec;
mod net;
pub mod overlay;
pub mod services;
mod views;

use cgroup::{child_cgroups, enable_v2_controllers, every_hierarchy, kill_members, remove_cgroups};
pub use cgroup::{detect_cgroups, CgroupStats, Cgroups, CPU_PERIOD_US, PIDS_LIMIT};
pub use exec::{exec_sandboxed, ExecRequest};
pub use views::confine;

/// uids and gids of tenants start here: far above any distribution's
/// regular and system users.
const TENANT_ID_BASE: u32 = 2_000_000;
/// Where the agent keeps its sandboxes, and which address block its tenant
/// networks use: `10.<octet>.0.0/16`, one /30 per tenant. The octet also
/// names this agent's cgroups, namespaces, interfaces and firewall table,
/// so two agents on one host (tests, or a node split in two) stay apart.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub root: PathBuf,
    pub network_octet: u8,
    /// The host port of the agent's database relay, when it runs one:
    /// tenant networks reach it at the well-known database address.
    pub database_relay: Option<u16>,
}

impl SandboxConfig {
    /// Sandboxes live in `<data-dir>/sandboxes` when other users can pass
    /// through the data directory's path (tenants' uids must reach their
    /// directories), else — a root user's default data directory under
    /// `/root`, say — in `/var/lib/atrium/sandboxes-<octet>`.
    pub fn for_data_dir(data_dir: &Path, network_octet: u8) -> SandboxConfig {
        // Directories not made yet will be made searchable (umask 022).
        let searchable = data_dir
            .ancestors()
            .all(|d| std::fs::metadata(d).map_or(true, |m| m.permissions().mode() & 0o001 != 0));
        let root = if searchable {
            data_dir.join("sandboxes")
        } else {
            PathBuf::from(format!("/var/lib/atrium/sandboxes-{network_octet}"))
        };
        SandboxConfig {
            root,
            network_octet,
            database_relay: None,
        }
    }
}

/// What this host lets the agent enforce, found once at start.
#[derive(Debug, Clone)]
pub struct Host {
    pub config: SandboxConfig,
    pub root: bool,
    pub cgroups: Cgroups,
    /// `Err(why)` when tenant network namespaces cannot be made.
    pub netns: Result<(), SandboxError>,
    /// `Err(why)` when there is no firewall tool.
    pub firewall: Result<(), SandboxError>,
    /// `Err(why)` when a tenant's uid could not reach the engine binary.
    pub uid: Result<(), SandboxError>,
    /// The `atrium` binary as a tenant's uid can run it: the agent's own
    /// when every directory above it lets others through, else a copy in
    /// the sandbox directory (`cargo install` puts it under `/root`).
    pub tenant_binary: PathBuf,
}

/// A tenant's place on this node.
#[derive(Debug, Clone)]
pub struct TenantSlot {
    pub tenant: String,
    pub slot: u32,
}

/// Everything needed to start one workload in its sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Arguments of `atrium` that come before the engine's own, empty when
    /// the engine runs unsandboxed.
    pub launcher: Vec<OsString>,
    pub env: Vec<(String, String)>,
    /// Address the engine listens on.
    pub listen_ip: String,
    pub isolation: String,
    /// What a container runtime needs of the same sandbox: the tenant's
    /// namespace (`/var/run/netns/…`), uid, the replica's own directory
    /// and its cgroup relative to each hierarchy's root.
    pub netns_path: Option<PathBuf>,
    pub uid: Option<u32>,
    pub work_dir: Option<PathBuf>,
    pub cgroup: Option<String>,
}

/// An nftables script that replaces table `family name` whole, in one
/// transaction, with `chains` (each `chain NAME { … }`).
fn replacing_table(family: &str, name: &str, chains: &str) -> String {
    format!(
        "add table {family} {name}\ndelete table {family} {name}\ntable {family} {name} {{\n{chains}}}\n"
    )
}

/// An `input` filter chain, ahead of the host's own (priority -10).
fn input_chain(rules: &str) -> String {
    format!("chain input {{\ntype filter hook input priority -10; policy accept;\n{rules}}}\n")
}

fn run(cmd: &str, args: &[&str]) -> Result<(), SandboxError> {
    run_with_input(cmd, args, "")
}

fn run_with_input(cmd: &str, args: &[&str], input: &str) -> Result<(), SandboxError> {
    run_capturing(cmd, args, input).map(|_| ())
}

/// Runs `cmd` with `input` on its stdin; its stdout, or its stderr as the
/// refusal.
fn run_capturing(cmd: &str, args: &[&str], input: &str) -> Result<String, SandboxError> {
    use std::io::Write;
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| SandboxError::Tool(format!("{cmd}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| SandboxError::Tool(format!("{cmd}: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| SandboxError::Tool(format!("{cmd}: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(refused!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn found(tool: &str) -> Result<(), SandboxError> {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|_| ())
        .map_err(|_| refused!("{tool} not found"))
}

/// Makes the sandbox directory: root's, searchable by all (tenants pass
/// through to their own 0700 directories), listable by none.
fn make_sandbox_root(root: &Path) -> Result<(), SandboxError> {
    std::fs::create_dir_all(root).map_err(|e| SandboxError::at(root, e))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| SandboxError::at(root, e))?;
    for dir in root.ancestors() {
        let searchable = dir.as_os_str().is_empty()
            || std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0);
        if !searchable {
            return Err(refused!(
                "{} is not searchable by other users",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// The engine binary a tenant's uid can run: `binary` itself if it can,
/// else a root-owned 0755 copy in `<sandbox root>/bin`, replaced by rename
/// (engines running the old one keep it).
fn binary_for_tenants(root: &Path, binary: &Path) -> Result<PathBuf, SandboxError> {
    if reachable_by_others(binary).is_ok() {
        return Ok(binary.to_path_buf());
    }
    let bin = root.join("bin");
    let err = |p: &Path, e: io::Error| SandboxError::at(p, e);
    std::fs::create_dir_all(&bin).map_err(|e| err(&bin, e))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| err(&bin, e))?;
    let copy = bin.join("atrium");
    let tmp = bin.join(".atrium.new");
    std::fs::copy(binary, &tmp).map_err(|e| err(&tmp, e))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, &copy).map_err(|e| err(&copy, e))?;
    Ok(copy)
}

/// Whether every directory above `path` lets other users through, and
/// `path` itself is readable by them: what a tenant's uid needs to run it.
fn reachable_by_others(path: &Path) -> Result<(), SandboxError> {
    let meta = std::fs::metadata(path).map_err(|e| SandboxError::at(path, e))?;
    if meta.permissions().mode() & 0o005 != 0o005 {
        return Err(refused!(
            "{} is not readable by other users",
            path.display()
        ));
    }
    for dir in path.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        let mode = std::fs::metadata(dir)
            .map_err(|e| SandboxError::at(dir, e))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(refused!(
                "{} is not searchable by other users",
                dir.display()
            ));
        }
    }
    Ok(())
}

impl Host {
    pub fn detect(config: SandboxConfig, engine_binary: &Path) -> Host {
        let root = rustix::process::geteuid().is_root();
        if !root {
            let why = "not running as root".to_string();
            return Host {
                config,
                root,
                cgroups: Cgroups::Unavailable(why.clone()),
                netns: Err(SandboxError::Refused(why.clone())),
                firewall: Err(SandboxError::Refused(why.clone())),
                uid: Err(SandboxError::Refused(why)),
                tenant_binary: engine_binary.to_path_buf(),
            };
        }
        let reachable = make_sandbox_root(&config.root)
            .and_then(|()| binary_for_tenants(&config.root, engine_binary));
        let (uid, tenant_binary) = match reachable {
            Ok(binary) => (Ok(()), binary),
            Err(e) => (
                Err(refused!(
                    "{e}; tenants' processes would not reach their files"
                )),
                engine_binary.to_path_buf(),
            ),
        };
        Host {
            cgroups: detect_cgroups(config.network_octet),
            netns: found("ip"),
            firewall: found("nft"),
            uid,
            tenant_binary,
            root,
            config,
        }
    }

    /// One line saying what this host enforces, for the agent's log and
    /// `atrium node isolation`.
    pub fn summary(&self) -> String {
        let cgroup = match &self.cgroups {
            Cgroups::V2 { .. } => "v2".to_string(),
            Cgroups::V1 { .. } => "v1".to_string(),
            Cgroups::Unavailable(why) => format!("none ({why})"),
        };
        let yes = |r: &Result<(), SandboxError>| match r {
            Ok(()) => "yes".to_string(),
            Err(why) => format!("no ({why})"),
        };
        format!(
            "cgroup={cgroup} netns={} firewall={} uid={}",
            yes(&self.netns),
            yes(&self.firewall),
            yes(&self.uid)
        )
    }

    fn octet(&self) -> u8 {
        self.config.network_octet
    }

    pub fn tenant_id(&self, slot: u32) -> u32 {
        TENANT_ID_BASE + u32::from(self.octet()) * 16_384 + slot
    }

    /// The tenant's own directory on this node. Tenants live under
    /// `tenants/`, the agent's own directories (`bin`, `views`) beside it:
    /// no tenant name — `bin` included — can be one of the agent's.
    pub fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.config.root.join("tenants").join(tenant)
    }

    /// Where the tenant's model mount points live: root's, outside the
    /// tenant's own (writable) directory.
    fn views_dir(&self, tenant: &str) -> PathBuf {
        self.config.root.join("views").join(tenant)
    }

    /// Installs this agent's firewall table (replacing an older one in the
    /// same transaction) and its cgroup parents.
    pub fn prepare(&self) -> Result<(), SandboxError> {
        if !self.root {
            return Ok(());
        }
        if self.firewall.is_ok() && self.netns.is_ok() {
            self.install_firewall()?;
        }
        match &self.cgroups {
            Cgroups::V2 { base } => {
                let parent = base.parent().unwrap_or(base);
                enable_v2_controllers(parent)?;
                std::fs::create_dir_all(base).map_err(|e| SandboxError::at(base, e))?;
                enable_v2_controllers(base)?;
            }
            Cgroups::V1 { bases } => {
                for (_, base) in bases {
                    std::fs::create_dir_all(base).map_err(|e| SandboxError::at(base, e))?;
                }
            }
            Cgroups::Unavailable(_) => {}
        }
        Ok(())
    }

    /// Removes what `prepare` installed (the agent stops with no workload).
    pub fn teardown(&self) {
        if !self.root {
            return;
        }
        if self.firewall.is_ok() {
            self.remove_firewall();
            self.remove_overlay_firewall();
        }
        // Called with no workload running: whatever is still below the
        // parents (a workload whose cgroup would not go when it stopped)
        // is stale and goes first, or the parents cannot.
        let mut bases = self.cgroup_dirs(None);
        for dir in every_hierarchy(self.octet()) {
            if !bases.contains(&dir) {
                bases.push(dir);
            }
        }
        let stale: Vec<PathBuf> = bases.iter().flat_map(|b| child_cgroups(b)).collect();
        for (dir, e) in remove_cgroups(&stale)
            .into_iter()
            .chain(remove_cgroups(&bases))
        {
            tracing::warn!(cgroup = %dir.display(), error = %e, "agent: a cgroup was left behind");
        }
        let bin = self.config.root.join("bin");
        let _ = std::fs::remove_file(bin.join("atrium"));
        let _ = std::fs::remove_dir(bin);
        // Only if empty: every workload's directory went with it.
        for dir in ["tenants", "views"] {
            let _ = std::fs::remove_dir(self.config.root.join(dir));
        }
        let _ = std::fs::remove_dir(&self.config.root);
    }

    /// A directory owned by the tenant, private to it.
    fn private_dir(&self, dir: &Path, id: u32) -> Result<(), SandboxError> {
        std::fs::create_dir_all(dir).map_err(|e| SandboxError::at(dir, e))?;
        chown(dir, Some(id), Some(id)).map_err(|e| refused!("chown {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| refused!("chmod {}: {e}", dir.display()))
    }

    /// Prepares the sandbox of workload `id`; `model` is the model path the
    /// engine would open, replaced in the returned arguments by its view.
    pub fn enter(
        &self,
        id: &str,
        tenant: &TenantSlot,
        spec: &PlacementSpec,
        gpus: &[Gpu],
        engine_args: &mut [String],
    ) -> Result<Sandbox, SandboxError> {
        let visible = visible_devices(spec, gpus);
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            ),
            ("CUDA_VISIBLE_DEVICES".to_string(), visible.clone()),
            (
                "NVIDIA_VISIBLE_DEVICES".to_string(),
                if visible.is_empty() {
                    "void".into()
                } else {
                    visible.clone()
                },
            ),
        ];
        let gpu_report = if visible.is_empty() {
            "none".to_string()
        } else {
            visible
        };
        if !self.root {
            return Ok(Sandbox {
                launcher: Vec::new(),
                env,
                listen_ip: "127.0.0.1".into(),
                netns_path: None,
                uid: None,
                work_dir: None,
                cgroup: None,
                isolation: format!(
                    "none: not running as root (gpus={gpu_report} by environment only)"
                ),
            });
        }
        // Both become path components, cgroup and namespace names: the
        // control plane validated them, and so does the agent.
        check_names(id, &tenant.tenant)?;
        let mut exec = ExecRequest::default();
        let mut report = Vec::new();
        // Whatever still runs in the workload's cgroup was started by an
        // agent that died before recording it (a recorded live engine is
        // adopted, never restarted): a duplicate, holding its port.
        kill_members(&self.cgroup_dirs(Some(id)));
        let procs = self.make_cgroup(id, spec, gpus)?;
        match &self.cgroups {
            Cgroups::V2 { .. } => report.push("cgroup=v2".to_string()),
            Cgroups::V1 { .. } => report.push("cgroup=v1".to_string()),
            Cgroups::Unavailable(why) => report.push(format!("cgroup=no ({why})")),
        }
        exec.cgroup_procs = procs;
        let mut listen_ip = "127.0.0.1".to_string();
        match &self.netns {
            Ok(()) => {
                self.ensure_network(tenant)?;
                let ns = self.netns_name(&tenant.tenant);
                exec.netns = Some(ns.clone());
                listen_ip = self.addresses(tenant.slot).1;
                report.push(format!("netns={ns}"));
                report.push(match &self.firewall {
                    Ok(()) => "firewall=yes".into(),
                    Err(why) => format!("firewall=no ({why})"),
                });
            }
            Err(why) => report.push(format!("netns=no ({why})")),
        }
        let tenant_dir = self.tenant_dir(&tenant.tenant);
        let work_dir = tenant_dir.join("work").join(id);
        match &self.uid {
            Ok(()) => {
                let uid = self.tenant_id(tenant.slot);
                for dir in [
                    self.config.root.join("tenants"),
                    self.config.root.join("views"),
                ] {
                    root_dir(&dir, 0o711)?;
                }
                self.private_dir(&tenant_dir, uid)?;
                self.private_dir(&tenant_dir.join("work"), uid)?;
                self.private_dir(&work_dir, uid)?;
                let models = match model_argument(engine_args) {
                    Some(model) => {
                        let source = PathBuf::from(model.as_str());
                        let point = views::mount_point(&self.views_dir(&tenant.tenant), &source)?;
                        *model = point.display().to_string();
                        exec.binds.push((source, point));
                        "read-only bind"
                    }
                    None => "none",
                };
                (exec.uid, exec.gid) = (Some(uid), Some(uid));
                report.push(format!("uid={uid} dir=0700 models={models}"));
                let home = work_dir.display().to_string();
                env.push(("HOME".into(), home.clone()));
                env.push(("TMPDIR".into(), home));
            }
            Err(why) => report.push(format!("uid=no ({why})")),
        }
        let devices = match &self.cgroups {
            Cgroups::V1 { bases } if bases.iter().any(|(c, _)| *c == "devices") => {
                "others denied by the devices cgroup"
            }
            _ => "by environment only",
        };
        report.push(format!("pids={PIDS_LIMIT} gpus={gpu_report} ({devices})"));
        let launcher = std::iter::once("sandbox-exec".into())
            .chain(exec.flags())
            .collect();
        let cgroup = (!matches!(self.cgroups, Cgroups::Unavailable(_)))
            .then(|| format!("/atrium-{}/{id}", self.octet()));
        Ok(Sandbox {
            launcher,
            env,
            listen_ip,
            isolation: report.join(" "),
            netns_path: exec
                .netns
                .as_ref()
                .map(|ns| Path::new("/var/run/netns").join(ns)),
            uid: exec.uid,
            work_dir: exec.uid.map(|_| work_dir),
            cgroup,
        })
    }

    /// Kills every process of workload `id`, removes its cgroups and its
    /// scratch directory; when `tenant_done`, also the tenant's namespace
    /// and directory on this node.
    pub fn release(&self, id: &str, tenant: &TenantSlot, pid: Option<u32>, tenant_done: bool) {
        if let Some(pid) = pid {
            kill(pid);
        }
        if !self.root {
            return;
        }
        for (dir, e) in remove_cgroups(&self.cgroup_dirs(Some(id))) {
            tracing::warn!(placement = %id, cgroup = %dir.display(), error = %e,
                "agent: a workload's cgroup would not go; the agent removes it when it stops");
        }
        if check_names(id, &tenant.tenant).is_err() {
            return;
        }
        let tenant_dir = self.tenant_dir(&tenant.tenant);
        let _ = std::fs::remove_dir_all(tenant_dir.join("work").join(id));
        if tenant_done {
            let _ = std::fs::remove_dir_all(&tenant_dir);
            let _ = std::fs::remove_dir_all(self.views_dir(&tenant.tenant));
            if self.netns.is_ok() {
                self.remove_network(tenant);
            }
        }
    }
}

/// Refuses a workload id or tenant name that could name anything but one
/// path component, cgroup or namespace of its own.
fn check_names(id: &str, tenant: &str) -> Result<(), SandboxError> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    if !plain(id) || atrium_core::name::validate_name(tenant).is_err() {
        return Err(refused!(
            "workload {id:?} of tenant {tenant:?}: not a name the agent uses in paths"
        ));
    }
    Ok(())
}

/// The engine's `--model` value, if it has one.
fn model_argument(args: &mut [String]) -> Option<&mut String> {
    let i = args.iter().position(|a| a == "--model")?;
    args.get_mut(i + 1)
}

/// A directory of the agent's: root-owned, with `mode`.
fn root_dir(dir: &Path, mode: u32) -> Result<(), SandboxError> {
    std::fs::create_dir_all(dir).map_err(|e| SandboxError::at(dir, e))?;
    chown(dir, Some(0), Some(0)).map_err(|e| refused!("chown {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| refused!("chmod {}: {e}", dir.display()))
}

pub fn kill(pid: u32) {
    signal(pid, rustix::process::Signal::KILL);
}

/// Asks `pid` to end (SIGTERM): an engine then finishes the requests it
/// has and exits.
pub fn terminate(pid: u32) {
    signal(pid, rustix::process::Signal::TERM);
}

fn signal(pid: u32, signal: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// `CUDA_VISIBLE_DEVICES` for the placement: the UUIDs of its GPUs, MIG
/// instances named `MIG-<GPU UUID>/<first memory slice>`; empty for none.
pub fn visible_devices(spec: &PlacementSpec, gpus: &[Gpu]) -> String {
    let mut seen = Vec::new();
    for slot in &spec.gpus {
        let uuid = gpus
            .iter()
            .find(|g| g.index == slot.gpu)
            .and_then(|g| g.uuid.clone())
            .unwrap_or_else(|| slot.gpu.to_string());
        let name = match slot.mig_start {
            Some(start) => format!("MIG-{uuid}/{start}"),
            None => uuid,
        };
        if !seen.contains(&name) {
            seen.push(name);
        }
    }
    seen.join(",")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use atrium_core::placement::GpuSlot;

    fn host(octet: u8) -> Host {
        Host {
            config: SandboxConfig {
                root: PathBuf::from("/nonexistent"),
                network_octet: octet,
                database_relay: None,
            },
            root: false,
            cgroups: Cgroups::Unavailable("test".into()),
            netns: Err(SandboxError::Refused("test".into())),
            firewall: Err(SandboxError::Refused("test".into())),
            uid: Err(SandboxError::Refused("test".into())),
            tenant_binary: PathBuf::from("/nonexistent/atrium"),
        }
    }

    /// A workload whose cgroup would not go when it stopped (still busy,
    /// still holding a process) must not outlive the agent: stopping with
    /// nothing running removes it, what it held, and the parents.
    #[test]
    fn teardown_removes_a_stale_workload_cgroup_and_what_it_holds() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test makes cgroups: run the tests as root, as CI does"
        );
        let dir = tempfile::tempdir().unwrap();
        let octet = 240;
        let h = Host {
            config: SandboxConfig {
                root: dir.path().join("sandboxes"),
                network_octet: octet,
                database_relay: None,
            },
            root: true,
            cgroups: cgroup::detect_cgroups(octet),
            ..host(octet)
        };
        h.prepare().unwrap();
        let mut held = Command::new("sleep").arg("600").spawn().unwrap();
        for stale in h.cgroup_dirs(Some("rep_stale")) {
            std::fs::create_dir(&stale).unwrap();
            std::fs::write(stale.join("cgroup.procs"), held.id().to_string()).unwrap();
        }

        h.teardown();

        let bases = h.cgroup_dirs(None);
        let left: Vec<&PathBuf> = bases.iter().filter(|b| b.exists()).collect();
        let mut exited = false;
        for _ in 0..20 {
            exited = held.try_wait().unwrap().is_some();
            if exited {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        if !exited || !left.is_empty() {
            let _ = held.kill();
            let _ = held.wait();
            for dir in h.cgroup_dirs(Some("rep_stale")).iter().chain(&bases) {
                let _ = std::fs::remove_dir(dir);
            }
        }
        assert!(!bases.is_empty());
        assert!(left.is_empty(), "left behind: {left:?}");
        assert!(exited, "the stale cgroup's process outlived the agent");
    }

    #[test]
    fn names_and_addresses_stay_within_kernel_limits_and_apart() {
        let h = host(201);
        assert_eq!(h.addresses(0), ("10.201.0.1".into(), "10.201.0.2".into()));
        assert_eq!(h.addresses(1), ("10.201.0.5".into(), "10.201.0.6".into()));
        assert_eq!(h.addresses(64), ("10.201.1.1".into(), "10.201.1.2".into()));
        let (host_if, ns_if) = h.veth_names(16_383);
        assert!(host_if.len() <= 15 && ns_if.len() <= 15, "{host_if}");
        assert_ne!(h.tenant_id(0), host(202).tenant_id(0));
        assert_ne!(h.tenant_id(0), h.tenant_id(1));
    }

    #[test]
    fn only_the_assigned_gpus_are_visible() {
        let gpu = |index: u32| Gpu {
            index,
            uuid: Some(format!("GPU-{index}")),
            ..serde_json::from_value(
                serde_json::json!({"index": index, "model": "H100-80GB", "memory": "80Gi"}),
            )
            .unwrap()
        };
        let mut spec: PlacementSpec = serde_json::from_value(serde_json::json!({
            "deployment": "d", "deployment_name": "d", "replica": 0, "node": "n",
            "engine": "simulated", "model": "m", "model_source": "path:/m", "model_task": "chat",
            "resources": {"cpu": "1", "memory": "1Gi"}
        }))
        .unwrap();
        let gpus = [gpu(0), gpu(1), gpu(2)];
        assert_eq!(visible_devices(&spec, &gpus), "");
        spec.gpus = vec![
            GpuSlot {
                gpu: 2,
                share_milli: None,
                mig_start: None,
            },
            GpuSlot {
                gpu: 0,
                share_milli: Some(500),
                mig_start: None,
            },
        ];
        assert_eq!(visible_devices(&spec, &gpus), "GPU-2,GPU-0");
        spec.gpus = vec![GpuSlot {
            gpu: 1,
            share_milli: None,
            mig_start: Some(4),
        }];
        assert_eq!(visible_devices(&spec, &gpus), "MIG-GPU-1/4");
    }
}
