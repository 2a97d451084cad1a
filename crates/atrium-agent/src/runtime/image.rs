//! Pulling an image from the control plane's registry into the node's
//! cache: the manifest (an index is resolved to its linux/amd64 entry),
//! the config and every layer, each checked against its digest before it
//! is kept. Blobs are stored once by digest; a rootfs is unpacked once per
//! manifest and shared, read-only, by every workload that runs it.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use atrium_client::ControlPlane;
use atrium_core::workload::ImageRef;
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::unpack;

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";
/// Longest a manifest or config may be; the registry holds them to 4 MiB.
const MAX_DOCUMENT: usize = 4 << 20;
/// Longest wait for the next piece of a blob: a registry that stops
/// sending fails the pull instead of hanging it.
const STALL: Duration = Duration::from_secs(30);
/// Longest wait for a manifest.
const DOCUMENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    digest: String,
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// What the image says about running it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ImageConfig>,
}

/// An image ready to run: its unpacked root and what its config says.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub digest: String,
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// Bytes fetched from the registry for this pull (0 when cached).
    pub fetched: u64,
}

/// The node's image cache (root only: `<data-dir>/images`, 0700).
#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
}

fn digest_hex(digest: &str) -> Result<&str, String> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("{digest:?} is not a sha256 digest"))
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl ImageCache {
    pub fn new(dir: PathBuf) -> ImageCache {
        ImageCache { dir }
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.dir.join("blobs").join(digest_hex(digest)?))
    }

    fn rootfs_path(&self, digest: &str) -> Result<PathBuf, String> {
        Ok(self.dir.join("rootfs").join(digest_hex(digest)?))
    }

    fn make_dirs(&self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt as _;
        for d in ["blobs", "rootfs", "tmp"] {
            let dir = self.dir.join(d);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", self.dir.display()))
    }

    /// Pulls `image` (checked by the control plane at admission, parsed
    /// again here) through `cp`, the node's own credential, and unpacks it
    /// unless it is cached already.
    pub async fn pull(&self, cp: &ControlPlane, image: &str) -> Result<Pulled, String> {
        let image = ImageRef::parse(image)?;
        self.make_dirs()?;
        let repo = &image.repository;
        let mut reference = image.reference.clone();
        let mut fetched = 0u64;
        // An index names one manifest per platform; one level deep.
        for _ in 0..2 {
            let path = format!("/v2/{repo}/manifests/{reference}");
            let bytes = document(cp, &path, MANIFEST_TYPES).await?;
            fetched += bytes.len() as u64;
            let digest = sha256(&bytes);
            if reference.starts_with("sha256:") && digest != reference {
                return Err(format!(
                    "the registry sent a manifest with digest {digest} for {reference}"
                ));
            }
            let manifest: Manifest = serde_json::from_slice(&bytes)
                .map_err(|e| format!("the manifest of {repo}:{reference} does not parse: {e}"))?;
            if !manifest.manifests.is_empty() {
                let chosen = manifest
                    .manifests
                    .iter()
                    .find(|m| {
                        m.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                    })
                    .ok_or_else(|| format!("{repo}:{reference} has no linux/amd64 image"))?;
                reference = chosen.digest.clone();
                continue;
            }
            let config = manifest
                .config
                .ok_or_else(|| format!("the manifest of {repo}:{reference} names no config"))?;
            let config_bytes =
                document(cp, &format!("/v2/{repo}/blobs/{}", config.digest), "*/*").await?;
            fetched += config_bytes.len() as u64;
            if sha256(&config_bytes) != config.digest {
                return Err(format!("the config blob does not match {}", config.digest));
            }
            let config: ConfigFile = serde_json::from_slice(&config_bytes)
                .map_err(|e| format!("the image config does not parse: {e}"))?;
            let rootfs = self.rootfs_path(&digest)?;
            // One unpacking of a manifest at a time; whoever waited finds
            // it done.
            let _unpacking = held(&rootfs).await;
            if !rootfs.is_dir() {
                let mut layers = Vec::new();
                for layer in &manifest.layers {
                    let (path, got) = self.blob(cp, repo, &layer.digest).await?;
                    fetched += got;
                    layers.push((path, layer.media_type.clone()));
                }
                let tmp = self.dir.join("tmp").join(digest_hex(&digest)?);
                let target = rootfs.clone();
                tokio::task::spawn_blocking(move || unpack::unpack_image(&layers, &tmp, &target))
                    .await
                    .map_err(|e| format!("unpacking: {e}"))??;
            }
            return Ok(Pulled {
                digest,
                rootfs,
                config: config.config.unwrap_or_default(),
                fetched,
            });
        }
        Err(format!("{repo}:{} is an index of indexes", image.reference))
    }

    /// Layer `digest` of `repo` in the cache, fetched and checked first if
    /// it is not there; returns its path and the bytes fetched.
    async fn blob(
        &self,
        cp: &ControlPlane,
        repo: &str,
        digest: &str,
    ) -> Result<(PathBuf, u64), String> {
        let path = self.blob_path(digest)?;
        // One download of a blob at a time on this node: two replicas
        // starting together would write the same partial file.
        let _fetching = held(&path).await;
        if path.is_file() {
            return Ok((path, 0));
        }
        let resp = tokio::time::timeout(
            DOCUMENT_TIMEOUT,
            cp.get_streamed(&format!("/v2/{repo}/blobs/{digest}"), "*/*"),
        )
        .await
        .map_err(|_| format!("the registry did not answer for layer {digest}"))?
        .map_err(|e| format!("layer {digest}: {e}"))?;
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}.part", digest_hex(digest)?));
        let mut file =
            std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut hash = Sha256::new();
        let mut got = 0u64;
        let mut stream = resp.bytes_stream();
        loop {
            let next = tokio::time::timeout(STALL, stream.next())
                .await
                .map_err(|_| format!("layer {digest}: the registry stopped sending"))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| format!("layer {digest}: {e}"))?;
            hash.update(&chunk);
            got = got.saturating_add(chunk.len() as u64);
            file.write_all(&chunk)
                .map_err(|e| format!("{}: {e}", tmp.display()))?;
        }
        let actual = format!("sha256:{}", hex::encode(hash.finalize()));
        if actual != digest {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "layer {digest} arrived with digest {actual}; not kept"
            ));
        }
        file.sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((path, got))
    }
}

/// A small document (manifest, config) read whole, bounded in size and time.
/// Holds the lock of `path` (a blob or a rootfs) for as long as the guard
/// lives. Locks nobody holds are dropped as the next one is taken.
async fn held(path: &std::path::Path) -> tokio::sync::OwnedMutexGuard<()> {
    type Locks = std::collections::HashMap<PathBuf, std::sync::Weak<tokio::sync::Mutex<()>>>;
    static LOCKS: std::sync::LazyLock<std::sync::Mutex<Locks>> =
        std::sync::LazyLock::new(Default::default);
    let lock = {
        let mut locks = LOCKS.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|_, l| l.strong_count() > 0);
        match locks.get(path).and_then(std::sync::Weak::upgrade) {
            Some(l) => l,
            None => {
                let l = std::sync::Arc::new(tokio::sync::Mutex::new(()));
                locks.insert(path.to_path_buf(), std::sync::Arc::downgrade(&l));
                l
            }
        }
    };
    lock.lock_owned().await
}

async fn document(cp: &ControlPlane, path: &str, accept: &str) -> Result<Vec<u8>, String> {
    let read = async {
        let resp = cp
            .get_streamed(path, accept)
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(format!("more than {MAX_DOCUMENT} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    tokio::time::timeout(DOCUMENT_TIMEOUT, read)
        .await
        .map_err(|_| format!("{path}: the registry did not answer in {DOCUMENT_TIMEOUT:?}"))?
        .map_err(|e| format!("{path}: {e}"))
}
