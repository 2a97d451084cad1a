//! `atrium node isolation`: checks, on this node, that the agent's sandboxes
//! hold — by reading what the kernel says of each engine process and by
//! attacking them: from inside each tenant's sandbox it tries to connect to
//! every other tenant's engine and to read its directory, and from the
//! host (where the gateway runs) it connects to every engine. Also the
//! hidden helpers the agent and these checks run: `sandbox-exec` and
//! `sandbox-probe`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use atrium_agent::sandbox::{self, Cgroups, Host, SandboxConfig};
use atrium_agent::state::{self, Assignment, RunningEngine};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::client::Output;

#[derive(Args)]
pub struct SandboxExecArgs {
    /// --cgroup-procs FILE.. --netns NAME --ro-bind SOURCE TARGET..
    /// --uid N --gid N -- PROGRAM ARGS.. (read by the agent's
    /// `ExecRequest`, which also writes them)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    args: Vec<OsString>,
}

/// Runs a command inside a sandbox; returns only on failure.
pub fn sandbox_exec(args: SandboxExecArgs) -> anyhow::Error {
    let request = match sandbox::ExecRequest::parse(args.args) {
        Ok(r) => r,
        Err(e) => return anyhow!("sandbox-exec: {e}"),
    };
    let program = request.program.clone();
    let e = sandbox::exec_sandboxed(request);
    anyhow!("sandbox-exec {}: {e}", program.to_string_lossy())
}

#[derive(Subcommand)]
pub enum ProbeCmd {
    /// Open a TCP connection (1 s timeout); exit 0 when it connects
    Connect { address: String },
    /// List a directory; exit 0 when it can
    Read { path: PathBuf },
}

/// What a probe saw: `Ok(what)` when the action succeeded.
pub fn probe(cmd: &ProbeCmd) -> std::result::Result<String, String> {
    match cmd {
        ProbeCmd::Connect { address } => {
            let addr: SocketAddr = address
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("{address:?} is not an address"))?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .map(|_| format!("connected to {addr}"))
                .map_err(|e| format!("cannot connect to {addr}: {e}"))
        }
        ProbeCmd::Read { path } => std::fs::read_dir(path)
            .map(|d| format!("listed {} entries of {}", d.count(), path.display()))
            .map_err(|e| format!("cannot list {}: {e}", path.display())),
    }
}

#[derive(Debug, Serialize)]
struct Check {
    check: String,
    subject: String,
    expected: String,
    observed: String,
    pass: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    node_enforces: String,
    /// Whether workloads' containers can run here, and with what.
    containers: String,
    /// How tenants' volumes are made, and scrubbed when deleted.
    volumes: String,
    checks: Vec<Check>,
    passed: usize,
    failed: usize,
}

struct Workload {
    id: String,
    assignment: Assignment,
    engine: RunningEngine,
    slot: u32,
    /// The process the checks read: the engine, or the container's first
    /// process (runc's child, in the container's namespaces).
    pid: u32,
}

impl Workload {
    fn name(&self) -> String {
        format!(
            "{}/{} ({})",
            self.assignment.tenant, self.assignment.spec.deployment_name, self.id
        )
    }

    fn is_container(&self) -> bool {
        self.assignment.spec.container.is_some()
    }

    /// `engine` or `container`, as the checks name what they read.
    fn what(&self) -> &'static str {
        if self.is_container() {
            "container"
        } else {
            "engine"
        }
    }

    /// Where it listens, if it does: a container without ports does not.
    fn address(&self) -> Option<String> {
        let endpoint = &self.engine.endpoint;
        let addr = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("tcp://"))
            .unwrap_or(endpoint);
        addr.contains(':').then(|| addr.to_string())
    }
}

/// The first process of container `id`, as runc records it.
fn container_pid(data_dir: &Path, id: &str) -> Option<u32> {
    let runc = atrium_agent::runtime::Runc::for_data_dir(data_dir);
    let out = Command::new(&runc.binary)
        .arg("--root")
        .arg(&runc.state_dir)
        .args(["state", id])
        .output()
        .ok()?;
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    state["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

/// Runs the checks against the agent whose data directory is `data_dir`;
/// fails (after printing) when any check fails.
pub fn report(data_dir: &Path, network_octet: u8, output: Output) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the atrium binary")?;
    let host = Host::detect(SandboxConfig::for_data_dir(data_dir, network_octet), &exe);
    let agent_state = state::StateFile::open(&data_dir.join("agent"))
        .with_context(|| format!("cannot read the agent's state in {}", data_dir.display()))?;
    let (assigned, running, slots) = agent_state.read(|s| {
        (
            s.assigned.clone(),
            s.running.clone(),
            s.tenant_slots.clone(),
        )
    });
    let workloads: Vec<Workload> = running
        .into_iter()
        .filter(|(_, e)| state::is_alive(e))
        .filter_map(|(id, engine)| {
            let assignment = assigned.get(&id)?.clone();
            let slot = *slots.get(&assignment.tenant)?;
            let pid = match assignment.spec.container {
                Some(_) => container_pid(data_dir, &id)?,
                None => engine.pid,
            };
            Some(Workload {
                id,
                assignment,
                engine,
                slot,
                pid,
            })
        })
        .collect();

    let mut checks = Vec::new();
    let mut check = |check: &str, subject: String, expected: &str, observed: String, pass: bool| {
        checks.push(Check {
            check: check.into(),
            subject,
            expected: expected.into(),
            observed,
            pass,
        });
    };
    let node = "this node".to_string();
    check(
        "running as root",
        node.clone(),
        "yes",
        yes_no(host.root),
        host.root,
    );
    let (cgroup_ok, cgroup_seen) = match &host.cgroups {
        Cgroups::V2 { base } => (true, format!("v2 at {}", base.display())),
        Cgroups::V1 { bases } => (
            true,
            format!(
                "v1 ({})",
                bases.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
            ),
        ),
        Cgroups::Unavailable(why) => (false, why.clone()),
    };
    check(
        "cgroup hierarchy",
        node.clone(),
        "v2 or v1 with cpu, memory, pids",
        cgroup_seen,
        cgroup_ok,
    );
    let table = format!("atrium_{network_octet}");
    let firewall = Command::new("nft")
        .args(["list", "table", "inet", &table])
        .output()
        .is_ok_and(|o| o.status.success());
    check(
        "tenant firewall installed",
        node.clone(),
        &format!("nft table inet {table}"),
        yes_no(firewall),
        firewall,
    );
    check(
        "tenant uids usable",
        node,
        "yes",
        match &host.uid {
            Ok(()) => "yes".into(),
            Err(why) => why.to_string(),
        },
        host.uid.is_ok(),
    );

    for w in &workloads {
        let pid = w.pid;
        let subject = w.name();
        let what = w.what();
        // cgroup: the process is in the workload's cgroup, whose limits are
        // the placement's.
        let cg = cgroup_of(&host, &w.id, pid);
        check(
            &format!("{what} in its own cgroup"),
            subject.clone(),
            "yes",
            yes_no(cg.holds_engine),
            cg.holds_engine,
        );
        let want = w.assignment.spec.resources.memory.0;
        let shown = |v: Option<u64>| v.map_or("unreadable".to_string(), |v| v.to_string());
        check(
            "memory limit",
            subject.clone(),
            &want.to_string(),
            shown(cg.memory_limit),
            // The kernel rounds a limit down to whole pages.
            cg.memory_limit.is_some_and(|m| m.abs_diff(want) < 1 << 20),
        );
        let want_cpu = w.assignment.spec.resources.cpu.0 * 100;
        check(
            "CPU quota per 100 ms (µs)",
            subject.clone(),
            &want_cpu.to_string(),
            shown(cg.cpu_quota_us),
            cg.cpu_quota_us == Some(want_cpu),
        );
        check(
            "pids limit",
            subject.clone(),
            &sandbox::PIDS_LIMIT.to_string(),
            shown(cg.pids_limit),
            cg.pids_limit == Some(u64::from(sandbox::PIDS_LIMIT)),
        );
        let ns = host.netns_name(&w.assignment.tenant);
        let same_ns = inode(&format!("/proc/{pid}/ns/net")).is_some()
            && inode(&format!("/proc/{pid}/ns/net")) == inode(&format!("/run/netns/{ns}"));
        check(
            &format!("{what} in its tenant's network namespace"),
            subject.clone(),
            &ns,
            yes_no(same_ns),
            same_ns,
        );
        let want_uid = host.tenant_id(w.slot);
        let uid = process_uid(pid);
        check(
            &format!("{what} runs as its tenant's uid"),
            subject.clone(),
            &want_uid.to_string(),
            uid.map_or("unreadable".into(), |u| u.to_string()),
            uid == Some(want_uid),
        );
        let dir = host.tenant_dir(&w.assignment.tenant);
        let meta = std::fs::metadata(&dir).ok();
        let private = meta
            .as_ref()
            .is_some_and(|m| m.permissions().mode() & 0o777 == 0o700 && m.uid() == want_uid);
        check(
            "tenant directory private",
            subject.clone(),
            "0700, owned by the tenant",
            meta.map_or("missing".into(), |m| {
                format!("{:o}, owner {}", m.permissions().mode() & 0o777, m.uid())
            }),
            private,
        );
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let visible = env
            .split(|b| *b == 0)
            .find_map(|kv| kv.strip_prefix(b"CUDA_VISIBLE_DEVICES="))
            .map(|v| String::from_utf8_lossy(v).to_string());
        let want_gpus = sandbox::visible_devices(&w.assignment.spec, &[]);
        let gpu_ok = visible.as_deref().is_some_and(|v| {
            v.split(',').filter(|s| !s.is_empty()).count()
                == want_gpus.split(',').filter(|s| !s.is_empty()).count()
        });
        check(
            "GPU visibility only its own",
            subject.clone(),
            &format!("{} device(s)", w.assignment.spec.gpus.len()),
            visible.unwrap_or_else(|| "unset".into()),
            gpu_ok,
        );
        if w.is_container() {
            for (name, expected, observed, pass) in container_checks(pid) {
                check(name, subject.clone(), expected, observed, pass);
            }
        }
        if let Some(address) = w.address() {
            let reach = probe(&ProbeCmd::Connect { address });
            check(
                &format!("host (gateway) reaches {what}"),
                subject.clone(),
                "connects",
                outcome(&reach),
                reach.is_ok(),
            );
        }
    }
    // Every tenant's sandbox against every other tenant's engine and data.
    // Each tenant is represented by a workload that listens, if it has one.
    let mut by_tenant: BTreeMap<&str, &Workload> = BTreeMap::new();
    for w in &workloads {
        let entry = by_tenant.entry(w.assignment.tenant.as_str()).or_insert(w);
        if entry.address().is_none() {
            *entry = w;
        }
    }
    // And against the host: a service listening on every address (as the
    // control plane or an operator's tool might), reached through the
    // tenant's own gateway address — only the firewall stands between.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0")?;
    let service_port = host_service.local_addr()?.port();
    let mut attacks: Vec<(&str, String, &str, &Workload, [String; 2])> = Vec::new();
    for (tenant, from) in &by_tenant {
        // Controls: from inside, the probe reaches what is the tenant's own;
        // without them a broken probe would pass every attack below.
        let own_dir = host.tenant_dir(tenant).display().to_string();
        let mut controls = vec![(
            "sandbox reads its own directory".to_string(),
            ["read".to_string(), own_dir],
        )];
        if let Some(address) = from.address() {
            let name = format!("sandbox reaches its own {}", from.what());
            controls.insert(0, (name, ["connect".into(), address]));
        }
        for (name, probe) in controls {
            let seen = in_sandbox(&exe, &host, from, &[&probe[0], &probe[1]]);
            let pass = matches!(seen, Probe::Succeeded(_));
            check(&name, tenant.to_string(), "works", seen.said(), pass);
        }
        let host_side = host.addresses(from.slot).0;
        attacks.push((
            "host services unreachable",
            format!("{tenant} -> {host_side}:{service_port}"),
            "blocked",
            from,
            ["connect".into(), format!("{host_side}:{service_port}")],
        ));
    }
    for (a, from) in &by_tenant {
        for (b, to) in &by_tenant {
            if a != b {
                let dir = host.tenant_dir(b).display().to_string();
                if let Some(address) = to.address() {
                    attacks.push((
                        "cross-tenant TCP blocked",
                        format!("{a} -> {}", to.name()),
                        "blocked",
                        from,
                        ["connect".into(), address],
                    ));
                }
                attacks.push((
                    "cross-tenant data unreadable",
                    format!("{a} -> {dir}"),
                    "denied",
                    from,
                    ["read".into(), dir],
                ));
            }
        }
    }
    // Each attack passes only when the probe ran and was refused.
    for (name, subject, expected, from, probe) in attacks {
        let seen = in_sandbox(&exe, &host, from, &[&probe[0], &probe[1]]);
        let pass = matches!(seen, Probe::Refused(_));
        check(name, subject, expected, seen.said(), pass);
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    let report = Report {
        node_enforces: host.summary(),
        containers: atrium_agent::runtime::Runc::for_data_dir(data_dir).summary(),
        volumes: atrium_agent::runtime::volume::summary(),
        passed: checks.len() - failed,
        failed,
        checks,
    };
    print(&report, output);
    if failed > 0 {
        return Err(anyhow!("{failed} isolation check(s) failed"));
    }
    Ok(())
}

fn print(report: &Report, output: Output) {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(report).unwrap_or_default(),
        Output::Table => {
            let rows: Vec<serde_json::Value> = report
                .checks
                .iter()
                .filter_map(|c| {
                    let mut row = serde_json::to_value(c).ok()?;
                    row["result"] = (if c.pass { "pass" } else { "FAIL" }).into();
                    Some(row)
                })
                .collect();
            format!(
                "node enforces: {}\ncontainers: {}\nvolumes: {}\n{}\n{} passed, {} failed",
                report.node_enforces,
                report.containers,
                report.volumes,
                crate::client::render_table(
                    &rows,
                    &[
                        ("CHECK", "/check"),
                        ("SUBJECT", "/subject"),
                        ("EXPECTED", "/expected"),
                        ("OBSERVED", "/observed"),
                        ("RESULT", "/result"),
                    ],
                ),
                report.passed,
                report.failed
            )
        }
    };
    println!("{text}");
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn outcome(r: &std::result::Result<String, String>) -> String {
    match r {
        Ok(s) | Err(s) => s.clone(),
    }
}

fn inode(path: &str) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // Real, effective, saved and filesystem uids must all be the tenant's.
    let ids: Vec<u32> = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let first = *ids.first()?;
    ids.iter().all(|i| *i == first).then_some(first)
}

/// Whether `pid` is in workload `id`'s cgroup(s), and the memory limit
/// that cgroup has.
/// What the kernel says of workload `id`'s cgroups.
struct CgroupView {
    /// `pid` is in every one of them.
    holds_engine: bool,
    memory_limit: Option<u64>,
    /// CPU time allowed per 100 ms period, in µs (none: unlimited).
    cpu_quota_us: Option<u64>,
    pids_limit: Option<u64>,
}

fn cgroup_of(host: &Host, id: &str, pid: u32) -> CgroupView {
    let dirs = host.cgroup_dirs(Some(id));
    let read = |files: &[&str]| -> Option<String> {
        dirs.iter().find_map(|d| {
            files
                .iter()
                .find_map(|f| std::fs::read_to_string(d.join(f)).ok())
        })
    };
    let number = |files: &[&str]| read(files).and_then(|t| t.trim().parse().ok());
    // v2 `cpu.max` is "<quota> <period>"; v1 keeps the quota alone (-1:
    // none); both are per 100 ms period as the agent sets them.
    let cpu_quota_us = read(&["cpu.max", "cpu.cfs_quota_us"])
        .and_then(|t| t.split_whitespace().next()?.parse().ok());
    CgroupView {
        holds_engine: !dirs.is_empty()
            && dirs.iter().all(|d| {
                std::fs::read_to_string(d.join("cgroup.procs"))
                    .is_ok_and(|p| p.lines().any(|l| l.trim() == pid.to_string()))
            }),
        memory_limit: number(&["memory.max", "memory.limit_in_bytes"]),
        cpu_quota_us,
        pids_limit: number(&["pids.max"]),
    }
}

/// How a probe run inside a sandbox went.
enum Probe {
    /// The action worked.
    Succeeded(String),
    /// The action was refused (what an attack should get).
    Refused(String),
    /// The probe itself could not run: proves nothing either way.
    Broken(String),
}

impl Probe {
    fn said(&self) -> String {
        match self {
            Probe::Succeeded(s) | Probe::Refused(s) => s.clone(),
            Probe::Broken(s) => format!("probe could not run: {s}"),
        }
    }
}

/// Runs `atrium sandbox-probe …` inside `from`'s sandbox: its tenant's
/// network namespace and uid, as any process of that tenant would be.
fn in_sandbox(exe: &Path, host: &Host, from: &Workload, probe: &[&str]) -> Probe {
    let id = host.tenant_id(from.slot).to_string();
    let out = Command::new(exe)
        .arg("sandbox-exec")
        .args(["--netns", &host.netns_name(&from.assignment.tenant)])
        .args(["--uid", &id, "--gid", &id, "--"])
        .arg(&host.tenant_binary)
        .arg("sandbox-probe")
        .args(probe)
        .env_clear()
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return Probe::Broken(e.to_string()),
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    // `sandbox-probe` exits 0 or 1; anything else (126: `sandbox-exec`
    // could not enter the sandbox or run the probe) is not an answer.
    match out.status.code() {
        Some(0) => Probe::Succeeded(said),
        Some(1) => Probe::Refused(said),
        _ => Probe::Broken(said),
    }
}

/// What the kernel says of a container's first process beyond what every
/// workload gets: no capabilities in any set, no new privileges, a
/// seccomp filter, a read-only root, a mount namespace of its own.
fn container_checks(pid: u32) -> Vec<(&'static str, &'static str, String, bool)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let caps: Vec<String> = ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
        .iter()
        .map(|c| field(c).unwrap_or_else(|| "unreadable".into()))
        .collect();
    let no_caps = caps
        .iter()
        .all(|c| c.chars().all(|d| d == '0') && !c.is_empty());
    let nnp = field("NoNewPrivs:");
    let seccomp = field("Seccomp:");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let root_options = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.get(4) == Some(&"/")).then(|| f.get(5).map(|o| o.to_string()))?
    });
    let read_only = root_options
        .as_deref()
        .is_some_and(|o| o.split(',').any(|x| x == "ro"));
    let own_mounts = inode(&format!("/proc/{pid}/ns/mnt")).is_some()
        && inode(&format!("/proc/{pid}/ns/mnt")) != inode("/proc/self/ns/mnt");
    vec![
        (
            "container has no capabilities",
            "all sets 0",
            caps.join(" "),
            no_caps,
        ),
        (
            "container has no new privileges",
            "NoNewPrivs 1",
            nnp.clone().unwrap_or_else(|| "unreadable".into()),
            nnp.as_deref() == Some("1"),
        ),
        (
            "container under a seccomp filter",
            "Seccomp 2",
            seccomp.clone().unwrap_or_else(|| "unreadable".into()),
            seccomp.as_deref() == Some("2"),
        ),
        (
            "container root read-only",
            "ro",
            root_options.unwrap_or_else(|| "no root mount".into()),
            read_only,
        ),
        (
            "container in its own mount namespace",
            "yes",
            yes_no(own_mounts),
            own_mounts,
        ),
    ]
}
