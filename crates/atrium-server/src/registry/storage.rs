//! The registry's content on disk, laid out as the reference registry lays
//! it out: blobs stored once by digest, and per repository only links —
//!
//! ```text
//! blobs/sha256/<hex>                 content, written once, verified
//! uploads/<id>, uploads/<id>.repo    an upload in progress, and its repository
//! repos/<ns>/<path>/_layers/<hex>    a blob pushed to (or mounted in) the repository
//! repos/<ns>/<path>/_manifests/<hex> a manifest of it (the file holds its media type)
//! repos/<ns>/<path>/_tags/<tag>      a tag (the file holds the digest)
//! tmp/                               where files are written before they are renamed in
//! ```
//!
//! A repository reads only what it links, so a blob another tenant pushed
//! is invisible to it even though its bytes are stored once. Names reach
//! this module already checked ([`super::names`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::error::RegistryError;
use super::manifest;
use super::names::{is_namespace, new_upload_id, Digest, Reference, Repo};

pub struct Storage {
    root: PathBuf,
    /// Per upload in progress: the SHA-256 of its first `n` bytes, kept
    /// as they stream in so committing need not read the upload again.
    /// Missing or behind the file (a chunk cut off, a restart), the upload
    /// is hashed from disk instead.
    hashed: Mutex<HashMap<String, (u64, sha2::Sha256)>>,
}

/// What one garbage collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    pub links_removed: u64,
    pub uploads_removed: u64,
}

impl Storage {
    pub fn open(root: PathBuf) -> std::io::Result<Storage> {
        for dir in ["blobs/sha256", "uploads", "repos", "tmp"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        Ok(Storage {
            root,
            hashed: Mutex::default(),
        })
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn repo_dir(&self, repo: &Repo) -> PathBuf {
        repo.components()
            .fold(self.root.join("repos"), |dir, c| dir.join(c))
    }

    pub fn upload_path(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    fn upload_owner(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(format!("{id}.repo"))
    }

    /// Writes `bytes` to `path` whole or not at all.
    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = self.root.join("tmp").join(new_upload_id());
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }

    /// Whether the repository exists (something was pushed to it).
    pub fn repo_exists(&self, repo: &Repo) -> bool {
        self.repo_dir(repo).is_dir()
    }

    /// The size of `digest` when `repo` links it (as a layer or a manifest).
    pub fn blob_in(&self, repo: &Repo, digest: &Digest) -> Option<(PathBuf, u64)> {
        let dir = self.repo_dir(repo);
        let linked = dir.join("_layers").join(digest.hex()).exists()
            || dir.join("_manifests").join(digest.hex()).exists();
        let path = self.blob_path(digest);
        let size = std::fs::metadata(&path).ok()?.len();
        linked.then_some((path, size))
    }

    fn link_layer(&self, repo: &Repo, digest: &Digest) -> std::io::Result<()> {
        let dir = self.repo_dir(repo).join("_layers");
        std::fs::create_dir_all(&dir)?;
        std::fs::File::create(dir.join(digest.hex())).map(drop)
    }

    /// Links a blob `from` holds into `repo` (a cross-repository mount).
    /// False when `from` does not hold it.
    pub fn mount(&self, repo: &Repo, from: &Repo, digest: &Digest) -> std::io::Result<bool> {
        if self.blob_in(from, digest).is_none() {
            return Ok(false);
        }
        self.link_layer(repo, digest)?;
        Ok(true)
    }

    pub fn start_upload(&self, repo: &Repo) -> std::io::Result<String> {
        let id = new_upload_id();
        std::fs::File::create(self.upload_path(&id))?;
        std::fs::write(self.upload_owner(&id), repo.as_str())?;
        Ok(id)
    }

    /// The size so far of upload `id`, if it is `repo`'s.
    pub fn upload_size(&self, repo: &Repo, id: &str) -> Result<u64, RegistryError> {
        let unknown = || RegistryError::upload_unknown(format!("no upload {id} in {repo}"));
        let owner = std::fs::read_to_string(self.upload_owner(id)).map_err(|_| unknown())?;
        if owner != repo.as_str() {
            return Err(unknown());
        }
        Ok(std::fs::metadata(self.upload_path(id))
            .map_err(|_| unknown())?
            .len())
    }

    /// The running hash of upload `id` if it covers exactly its first
    /// `size` bytes; taken out until [`Storage::keep_hash`] puts it back.
    pub fn take_hash(&self, id: &str, size: u64) -> Option<sha2::Sha256> {
        let mut hashed = self.hashed.lock().ok()?;
        match hashed.remove(id) {
            Some((n, hasher)) if n == size => Some(hasher),
            None if size == 0 => Some(sha2::Sha256::default()),
            _ => None,
        }
    }

    /// Keeps the hash of upload `id`'s first `size` bytes.
    pub fn keep_hash(&self, id: &str, size: u64, hasher: sha2::Sha256) {
        if let Ok(mut hashed) = self.hashed.lock() {
            hashed.insert(id.to_string(), (size, hasher));
        }
    }

    pub fn cancel_upload(&self, id: &str) {
        if let Ok(mut hashed) = self.hashed.lock() {
            hashed.remove(id);
        }
        let _ = std::fs::remove_file(self.upload_path(id));
        let _ = std::fs::remove_file(self.upload_owner(id));
    }

    /// Ends upload `id`: its content must hash to `digest`, or it is
    /// discarded and refused. Then the blob is stored (once) and linked.
    pub fn commit_upload(
        &self,
        repo: &Repo,
        id: &str,
        digest: &Digest,
    ) -> Result<u64, RegistryError> {
        let size = self.upload_size(repo, id)?;
        let path = self.upload_path(id);
        let actual = match self.take_hash(id, size) {
            Some(hasher) => Digest::from_hasher(hasher),
            None => hash_file(&path)?,
        };
        if actual != *digest {
            self.cancel_upload(id);
            return Err(RegistryError::digest_invalid(format!(
                "the uploaded content hashes to {actual}, not {digest}: upload discarded"
            )));
        }
        let blob = self.blob_path(digest);
        if blob.exists() {
            let _ = std::fs::remove_file(&path);
        } else {
            std::fs::File::open(&path)?.sync_all()?;
            std::fs::rename(&path, &blob)?;
        }
        let _ = std::fs::remove_file(self.upload_owner(id));
        self.link_layer(repo, digest)?;
        Ok(size)
    }

    /// Stores a manifest whose references `repo` must already hold, under
    /// its digest and, for a tag, the tag.
    pub fn put_manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
        media_type: &str,
        bytes: &[u8],
        references: &manifest::References,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(bytes);
        if let Reference::Digest(named) = reference {
            if *named != digest {
                return Err(RegistryError::digest_invalid(format!(
                    "the manifest hashes to {digest}, not {named}"
                )));
            }
        }
        let dir = self.repo_dir(repo);
        for blob in &references.blobs {
            if self.blob_in(repo, blob).is_none() {
                return Err(RegistryError::manifest_blob_unknown(blob));
            }
        }
        for child in &references.manifests {
            if !dir.join("_manifests").join(child.hex()).exists() {
                return Err(RegistryError::manifest_blob_unknown(child));
            }
        }
        let blob = self.blob_path(&digest);
        if !blob.exists() {
            self.write_atomically(&blob, bytes)?;
        }
        self.write_atomically(
            &dir.join("_manifests").join(digest.hex()),
            media_type.as_bytes(),
        )?;
        if let Reference::Tag(tag) = reference {
            self.write_atomically(&dir.join("_tags").join(tag), digest.to_string().as_bytes())?;
        }
        Ok(digest)
    }

    fn resolve(&self, repo: &Repo, reference: &Reference) -> Option<Digest> {
        match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(tag) => {
                let named =
                    std::fs::read_to_string(self.repo_dir(repo).join("_tags").join(tag)).ok()?;
                Digest::parse(named.trim()).ok()
            }
        }
    }

    /// A manifest: its media type, digest and bytes.
    pub fn get_manifest(
        &self,
        repo: &Repo,
        reference: &Reference,
    ) -> Option<(String, Digest, Vec<u8>)> {
        let digest = self.resolve(repo, reference)?;
        let media_type =
            std::fs::read_to_string(self.repo_dir(repo).join("_manifests").join(digest.hex()))
                .ok()?;
        let bytes = std::fs::read(self.blob_path(&digest)).ok()?;
        Some((media_type, digest, bytes))
    }

    /// Deletes a tag, or a manifest with every tag naming it. False when
    /// there was nothing to delete.
    pub fn delete_manifest(&self, repo: &Repo, reference: &Reference) -> std::io::Result<bool> {
        let dir = self.repo_dir(repo);
        match reference {
            Reference::Tag(tag) => remove_if_present(&dir.join("_tags").join(tag)),
            Reference::Digest(digest) => {
                let named = digest.to_string();
                for tag in self.tags(repo) {
                    let path = dir.join("_tags").join(&tag);
                    if std::fs::read_to_string(&path).is_ok_and(|d| d.trim() == named) {
                        remove_if_present(&path)?;
                    }
                }
                remove_if_present(&dir.join("_manifests").join(digest.hex()))
            }
        }
    }

    pub fn tags(&self, repo: &Repo) -> Vec<String> {
        let mut tags = file_names(&self.repo_dir(repo).join("_tags"));
        tags.sort();
        tags
    }

    /// Every repository, sorted.
    pub fn repositories(&self) -> Vec<Repo> {
        self.repositories_from(self.root.join("repos"), String::new())
    }

    /// The repositories of namespace `ns` (a tenant's name or `library`),
    /// sorted; none when `ns` is not a namespace.
    pub fn namespace_repositories(&self, ns: &str) -> Vec<Repo> {
        if !is_namespace(ns) {
            return Vec::new();
        }
        self.repositories_from(self.root.join("repos").join(ns), ns.to_string())
    }

    /// The repositories at or below `dir`, whose name is `name`.
    fn repositories_from(&self, dir: PathBuf, name: String) -> Vec<Repo> {
        let mut found = Vec::new();
        let mut pending = vec![(dir, name)];
        while let Some((dir, name)) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let child = entry.file_name().to_string_lossy().into_owned();
                if child.starts_with('_') {
                    if let Ok(repo) = Repo::parse(&name) {
                        found.push(repo);
                    }
                    continue;
                }
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let joined = if name.is_empty() {
                        child
                    } else {
                        format!("{name}/{child}")
                    };
                    pending.push((entry.path(), joined));
                }
            }
        }
        found.sort();
        found.dedup();
        found
    }

    /// Bytes held by namespace `ns`: each blob its repositories link counted
    /// once, plus its uploads in progress.
    pub fn namespace_bytes(&self, ns: &str) -> u64 {
        let mut digests = HashSet::new();
        for repo in self.namespace_repositories(ns) {
            let dir = self.repo_dir(&repo);
            for sub in ["_layers", "_manifests"] {
                digests.extend(file_names(&dir.join(sub)));
            }
        }
        let stored: u64 = digests
            .iter()
            .filter_map(|hex| std::fs::metadata(self.root.join("blobs/sha256").join(hex)).ok())
            .map(|m| m.len())
            .sum();
        let prefix = format!("{ns}/");
        let uploading: u64 = file_names(&self.root.join("uploads"))
            .iter()
            .filter_map(|f| f.strip_suffix(".repo"))
            .filter(|id| {
                std::fs::read_to_string(self.upload_owner(id)).is_ok_and(|r| r.starts_with(&prefix))
            })
            .filter_map(|id| std::fs::metadata(self.upload_path(id)).ok())
            .map(|m| m.len())
            .sum();
        stored.saturating_add(uploading)
    }

    /// Removes what no manifest uses and is older than `grace` (layers are
    /// pushed before the manifest that names them: the grace keeps a push
    /// in progress whole): layer links no manifest of their repository
    /// references, blobs no repository links, abandoned uploads.
    pub fn collect_garbage(&self, grace: Duration) -> std::io::Result<GcReport> {
        let old = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() >= grace)
        };
        let mut report = GcReport::default();
        let mut linked: BTreeSet<String> = BTreeSet::new();
        for repo in self.repositories() {
            let dir = self.repo_dir(&repo);
            let manifests = file_names(&dir.join("_manifests"));
            let mut used: HashSet<String> = manifests.iter().cloned().collect();
            for hex in &manifests {
                let media = std::fs::read_to_string(dir.join("_manifests").join(hex))?;
                let Ok(bytes) = std::fs::read(self.root.join("blobs/sha256").join(hex)) else {
                    continue;
                };
                if let Ok((_, refs)) = manifest::parse(Some(&media), &bytes) {
                    used.extend(refs.blobs.iter().map(|d| d.hex().to_string()));
                }
            }
            for hex in file_names(&dir.join("_layers")) {
                let link = dir.join("_layers").join(&hex);
                if !used.contains(&hex) && old(&link) {
                    remove_if_present(&link)?;
                    report.links_removed += 1;
                } else {
                    linked.insert(hex);
                }
            }
            if manifests.is_empty()
                && file_names(&dir.join("_layers")).is_empty()
                && self.tags(&repo).is_empty()
            {
                self.remove_repo(&dir);
            }
            linked.extend(manifests);
        }
        for hex in file_names(&self.root.join("blobs/sha256")) {
            let path = self.root.join("blobs/sha256").join(&hex);
            if !linked.contains(&hex) && old(&path) {
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if remove_if_present(&path)? {
                    report.blobs_removed += 1;
                    report.bytes_freed += size;
                }
            }
        }
        for name in file_names(&self.root.join("uploads")) {
            if let Some(id) = name.strip_suffix(".repo") {
                if old(&self.upload_owner(id)) {
                    self.cancel_upload(id);
                    report.uploads_removed += 1;
                }
            }
        }
        Ok(report)
    }

    /// Removes an emptied repository's directories, and its parents up to
    /// `repos/` while they hold nothing else.
    fn remove_repo(&self, dir: &Path) {
        for sub in ["_layers", "_manifests", "_tags"] {
            let _ = std::fs::remove_dir(dir.join(sub));
        }
        let top = self.root.join("repos");
        let mut at = Some(dir);
        while let Some(d) = at.filter(|d| *d != top && d.starts_with(&top)) {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
            at = d.parent();
        }
    }
}

fn hash_file(path: &Path) -> std::io::Result<Digest> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest::from_hasher(hasher))
}

fn file_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_if_present(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(bytes: &[u8]) -> sha2::Sha256 {
        sha2::Digest::new_with_prefix(bytes)
    }

    /// A hostile tenant admin who learns another tenant's upload id, or the
    /// digest of a blob another tenant stored, gets neither: uploads belong
    /// to their repository, and a manifest may only name blobs its own
    /// repository links, though the bytes are stored once for all.
    #[test]
    fn uploads_and_blobs_of_one_repository_are_not_reachable_from_another() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_path_buf()).unwrap();
        let (acme, globex) = (
            Repo::parse("acme/x").unwrap(),
            Repo::parse("globex/x").unwrap(),
        );

        let id = storage.start_upload(&acme).unwrap();
        std::fs::write(storage.upload_path(&id), b"secret").unwrap();
        assert!(storage.upload_size(&globex, &id).is_err());
        assert!(storage
            .commit_upload(&globex, &id, &Digest::of(b"secret"))
            .is_err());
        storage
            .commit_upload(&acme, &id, &Digest::of(b"secret"))
            .unwrap();

        let secret = Digest::of(b"secret");
        assert!(storage.blob_in(&globex, &secret).is_none());
        let refs = manifest::References {
            blobs: vec![secret.clone()],
            manifests: Vec::new(),
        };
        let claimed = storage.put_manifest(
            &globex,
            &Reference::Tag("1".into()),
            manifest::OCI_MANIFEST,
            b"{}",
            &refs,
        );
        assert!(claimed.is_err());
        assert!(storage.blob_in(&globex, &secret).is_none());
        assert_eq!(storage.namespace_bytes("globex"), 0);
        assert_eq!(storage.namespace_bytes("acme"), 6);
        assert_eq!(storage.namespace_bytes("../acme"), 0);
    }

    /// A running hash that does not cover the whole upload (a chunk was cut
    /// off after part of it was written) is not trusted: the upload is
    /// hashed from disk, and what was really uploaded decides.
    #[test]
    fn a_running_hash_behind_the_upload_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path().to_path_buf()).unwrap();
        let repo = Repo::parse("acme/x").unwrap();

        let id = storage.start_upload(&repo).unwrap();
        std::fs::write(storage.upload_path(&id), b"abcdef").unwrap();
        storage.keep_hash(&id, 3, hash_of(b"abc"));
        assert!(storage
            .commit_upload(&repo, &id, &Digest::of(b"abc"))
            .is_err());

        let id = storage.start_upload(&repo).unwrap();
        std::fs::write(storage.upload_path(&id), b"abcdef").unwrap();
        storage.keep_hash(&id, 3, hash_of(b"abc"));
        assert_eq!(
            storage
                .commit_upload(&repo, &id, &Digest::of(b"abcdef"))
                .unwrap(),
            6
        );

        let id = storage.start_upload(&repo).unwrap();
        std::fs::write(storage.upload_path(&id), b"xyz").unwrap();
        storage.keep_hash(&id, 3, hash_of(b"xyz"));
        storage
            .commit_upload(&repo, &id, &Digest::of(b"xyz"))
            .unwrap();
        assert!(storage.blob_in(&repo, &Digest::of(b"xyz")).is_some());
    }
}
