//! `atrium bench kube`: what a tenant cluster costs and how fast its API
//! answers, with many clusters and many objects in one control plane.
//!
//! - memory: the control plane's resident set before and after making N
//!   clusters, per cluster (an idle cluster is its rows in the store);
//!   beside the figures published for the peers (kcp's logical clusters
//!   7.4 MiB each, vCluster 256 MiB requested, k0smotron 210–560 MiB): no
//!   peer runs here, so they are constants of the table, not a race;
//! - create → ready: `POST /v1/clusters` until the cluster's API lists its
//!   default namespace;
//! - with M config maps spread over the clusters: list latency of one
//!   namespace, and watch latency (a create until its ADDED event).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use atrium_api::Cluster;
use atrium_client::{Api, ControlPlane};
use atrium_core::cluster::ClusterSpec;
use futures::StreamExt;
use serde_json::{json, Value};
use std::process::Command;

use crate::bench_gateway::peers::{start_control_plane, Children, TempDir};
use crate::bench_registry::bench_tenant;
use crate::bench_workloads::percentile;
use crate::client::Output;

pub struct Args {
    pub clusters: u32,
    pub objects: u32,
    pub out: PathBuf,
    pub output: Output,
}

/// What the peers publish per cluster, MiB (see the sources).
const KCP_MIB: f64 = 7.4;
const VCLUSTER_MIB: f64 = 256.0;

pub(crate) fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
}

/// A client of the cluster APIs, with the tenant's key.
struct Kube {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Kube {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            return Err(anyhow!("{path}: {}", resp.status()));
        }
        Ok(resp)
    }
}

fn configmap(i: u32) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": format!("cm-{i}"), "labels": {"bench": "yes"}},
           "data": {"index": i.to_string(), "payload": "x".repeat(200)}})
}

pub async fn run(args: Args) -> Result<()> {
    let dir =
        TempDir(std::env::temp_dir().join(format!("atrium-bench-kube-{}", std::process::id())));
    std::fs::create_dir_all(dir.path())?;
    let mut children = Children(Vec::new());
    let exe = std::env::current_exe()?;
    let (url, pid, cp): (String, u32, ControlPlane) = start_control_plane(
        Command::new(&exe),
        &dir.path().join("server"),
        &mut children,
    )
    .await?;
    let key = bench_tenant(&cp).await?;
    let quota = json!({"quota": {"clusters": args.clusters + 10}});
    cp.request::<_, Value>(reqwest::Method::PUT, "/v1/quotas/bench", Some(&quota))
        .await?;
    let tenant_cp = ControlPlane::new(&url, &key);
    let kube = Kube {
        http: reqwest::Client::new(),
        base: url.clone(),
        key: key.clone(),
    };
    let clusters = Api::<Cluster>::of_tenant(&tenant_cp, None);
    // Warm: the store, the allocator, the connection pool.
    for i in 0..5 {
        clusters
            .create(&format!("warm{i}"), &ClusterSpec {})
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let mut ids = Vec::with_capacity(args.clusters as usize);
    let mut ready = Vec::with_capacity(args.clusters as usize);
    for i in 0..args.clusters {
        let started = Instant::now();
        let c = clusters.create(&format!("c{i}"), &ClusterSpec {}).await?;
        kube.call(
            reqwest::Method::GET,
            &format!("/k8s/{}/api/v1/namespaces/default", c.id),
            None,
        )
        .await?;
        ready.push(started.elapsed().as_secs_f64());
        ids.push(c.id);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid)?;
    let per_cluster_mib =
        (after.saturating_sub(before)) as f64 / 1024.0 / f64::from(args.clusters.max(1));

    // Objects, spread over the clusters' default namespaces, 8 in flight.
    let started = Instant::now();
    let jobs = futures::stream::iter(0..args.objects).map(|i| {
        let (kube, id) = (&kube, &ids[i as usize % ids.len()]);
        async move {
            kube.call(
                reqwest::Method::POST,
                &format!("/k8s/{id}/api/v1/namespaces/default/configmaps"),
                Some(configmap(i)),
            )
            .await
            .map(|_| ())
        }
    });
    let made: Vec<Result<()>> = jobs.buffer_unordered(8).collect().await;
    made.into_iter().collect::<Result<Vec<()>>>()?;
    let load_s = started.elapsed().as_secs_f64();

    let mut list = Vec::new();
    for i in 0..200u32 {
        let id = &ids[(i as usize * 7) % ids.len()];
        let t = Instant::now();
        let resp = kube
            .call(
                reqwest::Method::GET,
                &format!("/k8s/{id}/api/v1/namespaces/default/configmaps"),
                None,
            )
            .await?;
        let body: Value = resp.json().await?;
        list.push(t.elapsed().as_secs_f64());
        if body["items"].as_array().is_none() {
            return Err(anyhow!("a list answered no items"));
        }
    }
    let mut watch = Vec::new();
    for i in 0..100u32 {
        let id = &ids[(i as usize * 13) % ids.len()];
        let resp = kube
            .call(
                reqwest::Method::GET,
                &format!("/k8s/{id}/api/v1/namespaces/default/configmaps?watch=true&resourceVersion=0&fieldSelector=metadata.name=w-{i}"),
                None,
            )
            .await?;
        let mut events = resp.bytes_stream();
        let t = Instant::now();
        let mut obj = configmap(i);
        obj["metadata"]["name"] = json!(format!("w-{i}"));
        kube.call(
            reqwest::Method::POST,
            &format!("/k8s/{id}/api/v1/namespaces/default/configmaps"),
            Some(obj),
        )
        .await?;
        let mut seen = Vec::new();
        loop {
            let chunk = tokio::time::timeout(Duration::from_secs(10), events.next())
                .await
                .context("no watch event within 10 s")?
                .ok_or_else(|| anyhow!("the watch ended"))??;
            seen.extend_from_slice(&chunk);
            if seen.windows(7).any(|w| w == b"\"ADDED\"") {
                break;
            }
        }
        watch.push(t.elapsed().as_secs_f64());
    }
    let ms = |x: f64| x * 1000.0;
    let doc = json!({
        "clusters": args.clusters,
        "objects": args.objects,
        "rss_kib": {"before": before, "after": after},
        "rss_per_idle_cluster_mib": per_cluster_mib,
        "peers_published_mib_per_cluster": {"kcp_logical_cluster": KCP_MIB, "vcluster_requested": VCLUSTER_MIB},
        "create_to_ready_ms": {"p50": ms(percentile(&ready, 0.5)), "p99": ms(percentile(&ready, 0.99))},
        "object_load_s": load_s,
        "list_one_namespace_ms": {"p50": ms(percentile(&list, 0.5)), "p99": ms(percentile(&list, 0.99))},
        "watch_create_to_event_ms": {"p50": ms(percentile(&watch, 0.5)), "p99": ms(percentile(&watch, 0.99))},
    });
    if crate::bench::write_results(&args.out, &doc, args.output)? {
        println!("{} clusters, {} config maps", args.clusters, args.objects);
        println!(
            "{:<34} {:>10}",
            "MiB per idle cluster (atrium)",
            format!("{per_cluster_mib:.3}")
        );
        println!(
            "{:<34} {:>10}",
            "  kcp logical cluster (published)", KCP_MIB
        );
        println!(
            "{:<34} {:>10}",
            "  vCluster (requested, published)", VCLUSTER_MIB
        );
        println!("{:<34} {:>10} {:>10}", "", "P50 ms", "P99 ms");
        for (name, xs) in [
            ("create → ready", &ready),
            ("list one namespace", &list),
            ("watch: create → event", &watch),
        ] {
            println!(
                "{:<34} {:>10.2} {:>10.2}",
                name,
                ms(percentile(xs, 0.5)),
                ms(percentile(xs, 0.99))
            );
        }
        println!("{:<34} {:>10.1}", "loading the objects, s", load_s);
        println!("wrote {}", args.out.display());
    }
    Ok(())
}
