//! `atrium bench registry`: push and pull throughput of the control
//! plane's image registry beside Debian's `docker-registry` (the reference
//! distribution implementation), with skopeo as the client of both. Each
//! push sends a fresh incompressible gzip layer (so no client cache or
//! cross-repository mount skips the transfer), rounds alternate which
//! registry goes first, and the table gives medians and their ratio. The
//! peer runs without authentication or quotas; Atrium's numbers include
//! its key check, quota accounting and digest verification.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use atrium_api::{CreatedKey, Key, Tenant};
use atrium_client::{Api, ControlPlane};
use atrium_core::key::{KeySpec, Scope};
use atrium_core::limits::RequestLimits;
use atrium_core::tenant::TenantSpec;
use serde_json::json;
use sha2::Digest as _;

use crate::bench_gateway::peers::{free_port, start_control_plane, wait_http, Children, TempDir};
use crate::client::Output;

pub struct Args {
    pub megabytes: u64,
    pub rounds: u32,
    pub out: PathBuf,
    pub output: Output,
}

/// One registry under test: where to push, and the credentials for it.
struct Target {
    name: &'static str,
    host: String,
    repo_prefix: &'static str,
    creds: Option<String>,
    push_mb_s: Vec<f64>,
    pull_mb_s: Vec<f64>,
}

pub(crate) fn require(program: &str, install: &str) -> Result<()> {
    match Command::new(program).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("{program} is needed: {install}"),
    }
}

pub(crate) fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(&bytes))
    ))
}

/// An OCI layout at `dir` whose one layer is `megabytes` of random data,
/// tarred and gzipped (gzip leaves random data at its size).
pub(crate) fn layout(dir: &Path, megabytes: u64) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    let data = dir.join("data");
    sh(Command::new("head")
        .args(["-c", &(megabytes << 20).to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&data)?))?;
    let size = layout_of(dir, dir, "data")?;
    std::fs::remove_file(&data)?;
    Ok(size)
}

/// An OCI layout at `dir/oci` (image `1`) whose one layer is `entry` of
/// directory `from`, tarred and gzipped; returns the layer's size.
pub(crate) fn layout_of(dir: &Path, from: &Path, entry: &str) -> Result<u64> {
    std::fs::create_dir_all(dir.join("oci/blobs/sha256"))?;
    sh(Command::new("tar")
        .arg("-C")
        .arg(from)
        .arg("-cf")
        .arg(dir.join("layer.tar"))
        .arg(entry))?;
    let diff_id = sha256_file(&dir.join("layer.tar"))?;
    sh(Command::new("gzip")
        .args(["-1", "-n"])
        .arg(dir.join("layer.tar")))?;
    let layer = dir.join("layer.tar.gz");
    let layer_digest = sha256_file(&layer)?;
    let layer_size = std::fs::metadata(&layer)?.len();
    let blobs = dir.join("oci/blobs/sha256");
    std::fs::rename(&layer, blobs.join(&layer_digest[7..]))?;
    let put = |bytes: &[u8]| -> Result<String> {
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
        std::fs::write(blobs.join(&digest[7..]), bytes)?;
        Ok(digest)
    };
    let config = json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    .to_string();
    let config_digest = put(config.as_bytes())?;
    let manifest = json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest, "size": layer_size}]})
    .to_string();
    let manifest_digest = put(manifest.as_bytes())?;
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "1"}}]});
    std::fs::write(dir.join("oci/index.json"), index.to_string())?;
    std::fs::write(
        dir.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(layer_size)
}

/// `skopeo copy` from `from` to `to`, timed.
fn copy(from: &str, to: &str, creds: Option<&str>, pushing: bool) -> Result<Duration> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--src-tls-verify=false", "--dest-tls-verify=false"]);
    if let Some(c) = creds {
        cmd.arg(if pushing {
            "--dest-creds"
        } else {
            "--src-creds"
        })
        .arg(c);
    }
    cmd.arg(from).arg(to);
    let started = Instant::now();
    sh(&mut cmd)?;
    Ok(started.elapsed())
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn start_atrium(dir: &Path, children: &mut Children) -> Result<(String, String)> {
    let exe = std::env::current_exe().context("cannot find the atrium binary")?;
    let (url, _, cp) =
        start_control_plane(Command::new(exe), &dir.join("server"), children).await?;
    let key = bench_tenant(&cp).await?;
    Ok((url.trim_start_matches("http://").to_string(), key))
}

/// Creates the benches' tenant, `bench`, and returns an admin key of it.
pub(crate) async fn bench_tenant(cp: &ControlPlane) -> Result<String> {
    Api::<Tenant>::all(cp)
        .create("bench", &TenantSpec::default())
        .await?;
    let spec = KeySpec::new(vec![Scope::Admin], None, RequestLimits::default());
    let key: CreatedKey = Api::<Key>::of_tenant(cp, Some("bench"))
        .create_as("bench", &spec)
        .await?;
    Ok(key.secret)
}

async fn start_peer(dir: &Path, children: &mut Children) -> Result<String> {
    let port = free_port()?;
    let config = dir.join("docker-registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("distribution").display()
        ),
    )?;
    let mut peer = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_http(
        &format!("http://127.0.0.1:{port}/v2/"),
        &mut peer,
        "docker-registry",
        Duration::from_secs(30),
    )
    .await?;
    children.0.push(peer);
    Ok(format!("127.0.0.1:{port}"))
}

pub async fn run(args: Args) -> Result<()> {
    require("skopeo", "apt-get install skopeo")?;
    require("docker-registry", "apt-get install docker-registry")?;
    if args.megabytes == 0 || args.megabytes > 4096 || args.rounds == 0 || args.rounds > 50 {
        bail!("--megabytes is 1 to 4096 and --rounds 1 to 50");
    }
    let dir =
        TempDir(std::env::temp_dir().join(format!("atrium-bench-registry-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;
    let mut children = Children(Vec::new());
    let (atrium_host, key) = start_atrium(dir.path(), &mut children).await?;
    let peer_host = start_peer(dir.path(), &mut children).await?;
    let mut targets = [
        Target {
            name: "atrium",
            host: atrium_host,
            repo_prefix: "bench/",
            creds: Some(format!("bench:{key}")),
            push_mb_s: Vec::new(),
            pull_mb_s: Vec::new(),
        },
        Target {
            name: "docker-registry",
            host: peer_host,
            repo_prefix: "",
            creds: None,
            push_mb_s: Vec::new(),
            pull_mb_s: Vec::new(),
        },
    ];
    for round in 0..args.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let t = &mut targets[i];
            let work = dir.path().join(format!("{}-{round}", t.name));
            let bytes = layout(&work, args.megabytes)?;
            let mb = bytes as f64 / f64::from(1u32 << 20);
            let image = format!("docker://{}/{}image{round}:1", t.host, t.repo_prefix);
            let oci = format!("oci:{}:1", work.join("oci").display());
            let push = copy(&oci, &image, t.creds.as_deref(), true)?;
            let pulled = format!("oci:{}:1", work.join("pulled").display());
            let pull = copy(&image, &pulled, t.creds.as_deref(), false)?;
            t.push_mb_s.push(mb / push.as_secs_f64());
            t.pull_mb_s.push(mb / pull.as_secs_f64());
            std::fs::remove_dir_all(&work)?;
        }
    }
    let [atrium, peer] = &targets;
    let ratio = |a: &[f64], p: &[f64]| median(a) / median(p);
    let doc = json!({
        "megabytes": args.megabytes,
        "rounds": args.rounds,
        "client": "skopeo copy (oci layout <-> registry), fresh gzip layer per push",
        "targets": targets.iter().map(|t| json!({
            "name": t.name,
            "push_mb_s": t.push_mb_s, "pull_mb_s": t.pull_mb_s,
            "push_mb_s_median": median(&t.push_mb_s), "pull_mb_s_median": median(&t.pull_mb_s),
        })).collect::<Vec<_>>(),
        "atrium_over_docker_registry": {
            "push": ratio(&atrium.push_mb_s, &peer.push_mb_s),
            "pull": ratio(&atrium.pull_mb_s, &peer.pull_mb_s),
        },
    });
    if crate::bench::write_results(&args.out, &doc, args.output)? {
        println!(
            "{} MB layer, {} rounds, skopeo; medians (MB/s)",
            args.megabytes, args.rounds
        );
        println!("{:<16} {:>10} {:>10}", "REGISTRY", "PUSH", "PULL");
        for t in &targets {
            println!(
                "{:<16} {:>10.1} {:>10.1}",
                t.name,
                median(&t.push_mb_s),
                median(&t.pull_mb_s)
            );
        }
        println!(
            "{:<16} {:>10.2} {:>10.2}",
            "atrium / peer",
            ratio(&atrium.push_mb_s, &peer.push_mb_s),
            ratio(&atrium.pull_mb_s, &peer.pull_mb_s)
        );
        println!("wrote {}", args.out.display());
    }
    Ok(())
}
