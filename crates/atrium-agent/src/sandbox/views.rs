//! Model files as a tenant's engine sees them.
//!
//! A model's files live on the node, in a model root — the agent's model
//! cache, or a directory the provider configures (`--model-root`). A
//! `path:` source names any path; the agent serves it only when it
//! resolves (links followed) inside a root, so a source can never name a
//! host file such as a key or a database. The engine reads the files
//! through a read-only bind mount in its own mount namespace (see `exec`)
//! onto a mount point the agent makes for the purpose, in a root-owned
//! directory of the tenant's (`<sandboxes>/views/<tenant>`: outside the
//! tenant's own writable directory, so no tenant process can swap a mount
//! point for a link). The agent changes the owner or mode of nothing it
//! did not create, and follows no link out of the source (the mount shows
//! the source's own tree; a link inside it is read, if at all, with the
//! tenant's uid and permissions).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::SandboxError;

/// Where `source` resolves to, if that is inside one of `roots`.
pub fn confine(source: &str, roots: &[PathBuf]) -> Result<PathBuf, SandboxError> {
    let resolved =
        std::fs::canonicalize(source).map_err(|e| refused!("model path {source}: {e}"))?;
    let inside = roots
        .iter()
        .filter_map(|r| std::fs::canonicalize(r).ok())
        .any(|root| resolved.starts_with(&root) && resolved != root);
    if inside {
        return Ok(resolved);
    }
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    Err(refused!(
        "model path {source} (resolved to {}) is outside this node's model roots ({}): \
         the provider places models under a root, or adds one with --model-root",
        resolved.display(),
        roots.join(", ")
    ))
}

/// Checks that a tenant's uid can read what will be mounted: the source
/// and, for a directory, everything directly in it. The files are not
/// changed to make them readable; the provider makes them so.
fn readable_by_tenants(source: &Path) -> Result<(), SandboxError> {
    let check = |path: &Path| -> Result<(), SandboxError> {
        let meta = std::fs::symlink_metadata(path).map_err(|e| SandboxError::at(path, e))?;
        let need = if meta.is_dir() { 0o005 } else { 0o004 };
        if meta.file_type().is_symlink() || meta.mode() & need == need {
            return Ok(());
        }
        Err(refused!(
            "model file {} (mode {:o}) is not readable by tenants' processes; make it \
             world-readable",
            path.display(),
            meta.permissions().mode() & 0o7777
        ))
    };
    check(source)?;
    if source.is_dir() {
        for entry in std::fs::read_dir(source).map_err(|e| SandboxError::at(source, e))? {
            let entry = entry.map_err(|e| SandboxError::at(source, e))?;
            check(&entry.path())?;
        }
    }
    Ok(())
}

/// Makes the mount point for `source` in `views` (the tenant's): an empty
/// root-owned file or directory under a directory named by the source's
/// path (models of one name from different places must not share one).
/// Returns the mount point, canonical: the path the engine is given.
pub fn mount_point(views: &Path, source: &Path) -> Result<PathBuf, SandboxError> {
    readable_by_tenants(source)?;
    let name = source
        .file_name()
        .ok_or_else(|| refused!("model path {} has no file name", source.display()))?;
    let fnv = source
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    let holder = views.join(format!("{fnv:016x}"));
    let point = holder.join(name);
    let err = |p: &Path, e: std::io::Error| SandboxError::at(p, e);
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).map_err(|e| err(p, e))
    };
    // Made once; the same point serves every replica of the tenant.
    if std::fs::symlink_metadata(&point).is_err() {
        for dir in [views, &holder] {
            if dir.exists() {
                mode(dir, 0o755)?;
            }
        }
        std::fs::create_dir_all(&holder).map_err(|e| err(&holder, e))?;
        if source.is_dir() {
            std::fs::create_dir(&point).map_err(|e| err(&point, e))?;
        } else {
            std::fs::File::create(&point).map_err(|e| err(&point, e))?;
        }
        for dir in [&holder, views] {
            mode(dir, 0o555)?;
        }
    }
    std::fs::canonicalize(&point).map_err(|e| err(&point, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_resolve_inside_a_root_or_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("m")).unwrap();
        std::fs::write(root.join("m/w.gguf"), "w").unwrap();
        let outside = dir.path().join("secret");
        std::fs::write(&outside, "s").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("m/link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        let roots = [root.clone()];
        let inside = confine(&root.join("m/w.gguf").display().to_string(), &roots).unwrap();
        assert_eq!(
            inside,
            std::fs::canonicalize(root.join("m/w.gguf")).unwrap()
        );
        for escape in [
            outside.display().to_string(),
            root.join("m/link").display().to_string(),
            root.join("up/secret").display().to_string(),
            format!("{}/m/../../secret", root.display()),
            root.display().to_string(),
            "/etc/shadow".to_string(),
        ] {
            let e = confine(escape.as_str(), &roots).unwrap_err();
            assert!(
                e.to_string().contains("model root") || e.to_string().contains("No such file"),
                "{escape}: {e}"
            );
        }
    }

    #[test]
    fn mount_points_are_made_without_touching_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("cache/minilm");
        std::fs::create_dir_all(&source).unwrap();
        std::fs::write(source.join("model.safetensors"), "weights").unwrap();
        let before = std::fs::metadata(source.join("model.safetensors")).unwrap();
        let models = dir.path().join("views/t");
        let point = mount_point(&models, &source).unwrap();
        assert!(
            point.starts_with(std::fs::canonicalize(&models).unwrap())
                && point.ends_with("minilm")
                && point.is_dir()
        );
        assert_eq!(
            std::fs::read_dir(&point).unwrap().count(),
            0,
            "an empty mount point"
        );
        let after = std::fs::metadata(source.join("model.safetensors")).unwrap();
        assert_eq!(
            (before.mode(), before.uid(), before.nlink()),
            (after.mode(), after.uid(), after.nlink())
        );
        assert_eq!(mount_point(&models, &source).unwrap(), point, "made once");
        let file = dir.path().join("cache/model.gguf");
        std::fs::write(&file, "gguf").unwrap();
        assert!(mount_point(&models, &file).unwrap().is_file());
        // A file its tenant could not read is refused with what to fix.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = mount_point(&models, &file).unwrap_err();
        assert!(e.to_string().contains("world-readable"), "{e}");
        for d in [models.clone(), point.parent().unwrap().to_path_buf()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}
