//! `atrium bench workloads`: how fast a tenant's container comes up, beside
//! runc on its own. Two measures, each with its peer in the same run:
//!
//! - create → running, for N workloads of a cached busybox image (each an
//!   httpd on its own port, running once the port accepts): the API call,
//!   the controller's placement, the agent's watch, the sandbox, the bundle
//!   and runc — beside `runc run -d` of a prepared bundle on the same
//!   rootfs until its httpd accepts (the floor any runc-based runtime has).
//! - pull + unpack of a 50 MB image: the agent's own image cache pulling
//!   from the control plane's registry (digests checked, layers unpacked
//!   with the confinement rules) beside `skopeo copy` to an OCI layout
//!   followed by `umoci unpack`, the Debian tools' way.
//!
//! Needs root (runc), runc, skopeo and umoci.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use atrium_agent::runtime::ImageCache;
use atrium_api::{Placement, Site, Workload};
use atrium_client::{Api, ControlPlane};
use atrium_core::deployment::Resources;
use atrium_core::lifecycle::LifecycleState;
use atrium_core::quantity::{ByteSize, CpuMillis};
use atrium_core::site::SiteSpec;
use atrium_core::workload::{ContainerSpec, WorkloadSpec};
use serde_json::json;

use crate::bench_gateway::peers::{start_control_plane, Children, TempDir};
use crate::bench_registry::{bench_tenant, layout, layout_of, require, sh};
use crate::client::Output;

pub struct Args {
    pub workloads: u32,
    pub megabytes: u64,
    pub out: PathBuf,
    pub output: Output,
}

/// The tenant network block of the bench's agent.
const OCTET: u8 = 238;
const FIRST_PORT: u16 = 20000;

/// The `p` quantile of `xs` (unsorted), nearest rank.
pub(crate) fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// An OCI layout at `dir/oci` holding busybox (`/bin/busybox`) as image `1`.
fn busybox_layout(dir: &Path) -> Result<()> {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("/bin/busybox is needed: apt-get install busybox-static")?;
    layout_of(dir, &rootfs, "bin").map(|_| ())
}

fn push(layout: &Path, host: &str, image: &str, key: &str) -> Result<()> {
    sh(Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false", "--dest-creds"])
        .arg(format!("bench:{key}"))
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{host}/{image}")))
}

fn accepts(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(200)).ok())
        .is_some()
}

/// Seconds from `runc run -d` of a bundle over `rootfs` to its httpd
/// accepting on loopback, `rounds` times.
fn bare_runc(dir: &Path, rootfs: &Path, rounds: u32) -> Result<Vec<f64>> {
    let state = dir.join("runc-state");
    let mut times = Vec::new();
    for i in 0..rounds {
        let bundle = dir.join(format!("bundle-{i}"));
        std::fs::create_dir_all(&bundle)?;
        sh(Command::new("runc").args(["spec", "--bundle"]).arg(&bundle))?;
        let path = bundle.join("config.json");
        let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        let port = FIRST_PORT - 1 - i as u16;
        spec["root"] = json!({"path": rootfs, "readonly": true});
        spec["process"]["terminal"] = json!(false);
        spec["process"]["args"] = json!([
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            format!("127.0.0.1:{port}")
        ]);
        // The host's network, so loopback reaches it.
        if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
            ns.retain(|n| n["type"] != "network");
        }
        std::fs::write(&path, serde_json::to_vec(&spec)?)?;
        let id = format!("atrium-bench-{}-{i}", std::process::id());
        let started = Instant::now();
        sh(Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg(&id)
            .stdout(Stdio::null())
            .stderr(Stdio::null()))?;
        let addr = format!("127.0.0.1:{port}");
        while !accepts(&addr) {
            if started.elapsed() > Duration::from_secs(10) {
                bail!("bare runc: httpd did not accept on {addr}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        times.push(started.elapsed().as_secs_f64());
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&state)
            .args(["delete", "--force", &id])
            .output();
    }
    Ok(times)
}

/// Creates `n` workloads one at a time, each waiting until it runs;
/// returns the seconds each took.
async fn create_to_running(tenant: &ControlPlane, cp: &ControlPlane, n: u32) -> Result<Vec<f64>> {
    let workloads = Api::<Workload>::of_tenant(tenant, None);
    let mut times = Vec::new();
    for i in 0..n {
        let port = FIRST_PORT + i as u16;
        let spec = WorkloadSpec::service(
            ContainerSpec {
                image: "bench/busybox:1".into(),
                command: vec!["/bin/busybox".into()],
                args: vec!["httpd".into(), "-f".into(), "-p".into(), port.to_string()],
                env: Default::default(),
                ports: vec![port],
                hostname: None,
            },
            Resources {
                cpu: CpuMillis(1000),
                memory: ByteSize(16 << 20),
                gpu: None,
                gpu_memory: None,
                gpu_models: Vec::new(),
                storage: ByteSize::default(),
            },
        );
        let name = format!("w{i}");
        let started = Instant::now();
        workloads.create(&name, &spec).await?;
        loop {
            let w = Api::<Workload>::of_tenant(cp, Some("bench"))
                .get(&name)
                .await?;
            match w.status.as_ref().map(|s| s.state) {
                Some(LifecycleState::Running) => break,
                Some(LifecycleState::Degraded) => {
                    bail!(
                        "workload {name}: {}",
                        w.status.map(|s| s.reason).unwrap_or_default()
                    )
                }
                _ => {}
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("workload {name} did not run within a minute");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(started.elapsed().as_secs_f64());
        // Gone before the next is created (not timed): each gets a whole
        // core, as bare runc does, on a node of any size.
        workloads.delete(&name).await?;
        let placements = Api::<Placement>::of_tenant(cp, Some("bench"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !placements.list().await?.0.is_empty() {
            if Instant::now() > deadline {
                bail!("workload {name}'s replica was not removed within a minute");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(times)
}

pub async fn run(args: Args) -> Result<()> {
    for (tool, install) in [
        ("runc", "apt-get install runc"),
        ("skopeo", "apt-get install skopeo"),
        ("umoci", "apt-get install umoci"),
        ("tar", "apt-get install tar"),
    ] {
        require(tool, install)?;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Uid:\t0\t")) {
        bail!("containers run under runc as root: run the bench as root");
    }
    if args.workloads == 0 || args.workloads > 1000 || args.megabytes == 0 || args.megabytes > 4096
    {
        bail!("--workloads is 1 to 1000 and --megabytes 1 to 4096");
    }
    let dir = TempDir(
        std::env::temp_dir().join(format!("atrium-bench-workloads-{}", std::process::id())),
    );
    std::fs::create_dir_all(dir.path())?;
    let exe = std::env::current_exe().context("cannot find the atrium binary")?;
    let mut children = Children(Vec::new());
    let (url, _, cp) = start_control_plane(
        Command::new(&exe),
        &dir.path().join("server"),
        &mut children,
    )
    .await?;
    Api::<Site>::all(&cp)
        .create(
            "local",
            &serde_json::from_value::<SiteSpec>(json!({"kind": "edge", "jurisdiction": "LOCAL"}))?,
        )
        .await?;
    let key = bench_tenant(&cp).await?;
    let tenant = ControlPlane::new(&url, &key);
    let host = url.trim_start_matches("http://").to_string();

    let small = dir.path().join("busybox");
    busybox_layout(&small)?;
    push(&small.join("oci"), &host, "bench/busybox:1", &key)?;
    let big = dir.path().join("big");
    let bytes = layout(&big, args.megabytes)?;
    push(&big.join("oci"), &host, "bench/big:1", &key)?;

    // Pull + unpack, cold each time, alternating which goes first.
    let mb = bytes as f64 / f64::from(1u32 << 20);
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let cache = ImageCache::new(dir.path().join(format!("cache-{round}")));
        let started = Instant::now();
        cache
            .pull(&tenant, "bench/big:1")
            .await
            .map_err(|e| anyhow!(e))?;
        ours.push(mb / started.elapsed().as_secs_f64());
        let layout_dir = dir.path().join(format!("peer-{round}"));
        std::fs::create_dir_all(&layout_dir)?;
        let started = Instant::now();
        sh(Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", "--src-creds"])
            .arg(format!("bench:{key}"))
            .arg(format!("docker://{host}/bench/big:1"))
            .arg(format!("oci:{}:1", layout_dir.join("oci").display())))?;
        sh(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:1", layout_dir.join("oci").display()))
            .arg(layout_dir.join("bundle")))?;
        peer.push(mb / started.elapsed().as_secs_f64());
    }

    // Create → running, through the agent.
    let token =
        crate::planes::join_token(&cp, atrium_core::plane::Plane::Node, "n1", "local", 600, 1)
            .await?
            .secret;
    let agent = Command::new(&exe)
        .args([
            "agent",
            "--log",
            "warn",
            "--server",
            &url,
            "--join-token",
            &token,
        ])
        .args(["--tenant-network", &format!("10.{OCTET}.0.0/16")])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the agent")?;
    children.0.push(agent);
    // One warm-up workload pulls busybox into the node's cache.
    create_to_running(&tenant, &cp, 1).await?;
    let atrium = create_to_running(&tenant, &cp, args.workloads).await?;
    let rootfs = dir.path().join("agent/images/rootfs");
    let rootfs = std::fs::read_dir(&rootfs)?
        .flatten()
        .next()
        .map(|e| e.path())
        .ok_or_else(|| anyhow!("no unpacked image in {}", rootfs.display()))?;
    let bare = bare_runc(dir.path(), &rootfs, args.workloads.min(50))?;

    let ms = |x: f64| x * 1000.0;
    let doc = json!({
        "workloads": args.workloads,
        "create_to_running_s": {"atrium": atrium, "bare_runc": bare},
        "create_to_running_ms": {
            "atrium": {"p50": ms(percentile(&atrium, 0.5)), "p99": ms(percentile(&atrium, 0.99))},
            "bare_runc": {"p50": ms(percentile(&bare, 0.5)), "p99": ms(percentile(&bare, 0.99))},
            "atrium_over_bare_runc_p50": percentile(&atrium, 0.5) / percentile(&bare, 0.5),
        },
        "pull_unpack": {
            "megabytes": mb,
            "atrium_mb_s": ours, "skopeo_umoci_mb_s": peer,
            "atrium_over_peer_median": percentile(&ours, 0.5) / percentile(&peer, 0.5),
        },
    });
    if crate::bench::write_results(&args.out, &doc, args.output)? {
        println!(
            "{} workloads (busybox httpd, image cached), one at a time",
            args.workloads
        );
        println!(
            "{:<22} {:>10} {:>10}",
            "CREATE → RUNNING", "P50 ms", "P99 ms"
        );
        for (name, xs) in [("atrium workload", &atrium), ("bare runc run -d", &bare)] {
            println!(
                "{:<22} {:>10.1} {:>10.1}",
                name,
                ms(percentile(xs, 0.5)),
                ms(percentile(xs, 0.99))
            );
        }
        println!(
            "{:<22} {:>10.2}",
            "atrium / runc (p50)",
            percentile(&atrium, 0.5) / percentile(&bare, 0.5)
        );
        println!("\n{mb:.1} MB image, cold cache, 3 rounds (median MB/s)");
        println!(
            "{:<22} {:>10.1}",
            "atrium pull+unpack",
            percentile(&ours, 0.5)
        );
        println!("{:<22} {:>10.1}", "skopeo + umoci", percentile(&peer, 0.5));
        println!(
            "{:<22} {:>10.2}",
            "atrium / peer",
            percentile(&ours, 0.5) / percentile(&peer, 0.5)
        );
        println!("wrote {}", args.out.display());
    }
    Ok(())
}
