//! Unpacking a tenant's image layers into a rootfs on the host, as root.
//!
//! Security: every layer is hostile input written to the host's disk by
//! root. So: a path in a layer is cleaned to plain components, and `..`
//! refuses the layer; every parent directory is resolved inside the rootfs
//! being built, a symlink in it followed as the container would follow it
//! (absolute targets from the rootfs, `..` never above it), so no entry
//! lands outside; a hard link may only name a regular file inside; device
//! nodes and FIFOs are not made (runc provides `/dev`); setuid, setgid
//! and sticky bits are dropped; the unpacked size and entry count are
//! bounded, so a compressed bomb fills no disk. The tree is built in a
//! directory only root can reach (the cache is 0700) and renamed into
//! place when whole, so nothing races the checks and a half-unpacked
//! image is never run.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

/// Directories every rootfs gets, for runc's mounts and the scratch bind:
/// made here so that runc never writes into the shared, cached tree.
pub const MOUNT_POINTS: [&str; 6] = ["proc", "dev", "sys", "tmp", "scratch", "volumes"];
/// The file each container's host name is bound over, made empty here
/// for the same reason.
pub const HOSTNAME_FILE: &str = "etc/hostname";
/// Most bytes and entries one image may unpack to.
const MAX_UNPACKED: u64 = 64 << 30;
const MAX_ENTRIES: u64 = 1_000_000;
/// Unpacked bytes allowed per compressed byte (beyond a fixed 256 MiB).
const MAX_RATIO: u64 = 100;
/// Most symlinks followed while resolving one path, as Linux's limit.
const MAX_HOPS: usize = 40;

struct Budget {
    bytes: u64,
    entries: u64,
    max_bytes: u64,
}

/// Unpacks `layers` (path, media type), lowest first, into `tmp`, then
/// renames it to `target`.
pub fn unpack_image(layers: &[(PathBuf, String)], tmp: &Path, target: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let compressed: u64 = layers
        .iter()
        .map(|(p, _)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let mut budget = Budget {
        bytes: 0,
        entries: 0,
        max_bytes: compressed
            .saturating_mul(MAX_RATIO)
            .saturating_add(256 << 20)
            .min(MAX_UNPACKED),
    };
    let result = (|| {
        for (path, media_type) in layers {
            let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            if media_type.contains("zstd") {
                return Err(format!(
                    "layer media type {media_type} (zstd) is not supported; push gzip layers"
                ));
            }
            if media_type.ends_with("gzip") || media_type.is_empty() && is_gzip(path) {
                // Several gzip members in one layer (pgzip, as umoci writes) are one stream.
                unpack_layer(flate2::read::MultiGzDecoder::new(file), tmp, &mut budget)?;
            } else {
                unpack_layer(file, tmp, &mut budget)?;
            }
        }
        for dir in MOUNT_POINTS {
            let at = tmp.join(dir);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| !m.is_dir()) {
                remove(&at)?;
            }
            std::fs::create_dir_all(&at).map_err(|e| format!("{}: {e}", at.display()))?;
        }
        hostname_mount_point(tmp)?;
        std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("{}: {e}", tmp.display()))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(e);
    }
    match std::fs::rename(tmp, target) {
        Ok(()) => Ok(()),
        // Another pull of the same image finished first: same content.
        Err(_) if target.is_dir() => {
            let _ = std::fs::remove_dir_all(tmp);
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", target.display())),
    }
}

/// Makes `etc/hostname` an empty regular file, when `etc` is a plain
/// directory (or absent): a layer's `etc` symlink could point anywhere,
/// even out of the tree, so it is never followed.
fn hostname_mount_point(root: &Path) -> Result<(), String> {
    let etc = root.join("etc");
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if !m.is_dir() => return Ok(()),
        Ok(_) => {}
        Err(_) => std::fs::create_dir(&etc).map_err(|e| format!("{}: {e}", etc.display()))?,
    }
    let file = root.join(HOSTNAME_FILE);
    if std::fs::symlink_metadata(&file).is_ok_and(|m| !m.is_file()) {
        remove(&file)?;
    }
    std::fs::write(&file, b"").map_err(|e| format!("{}: {e}", file.display()))
}

fn is_gzip(path: &Path) -> bool {
    let mut magic = [0u8; 2];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == [0x1f, 0x8b]
}

/// A layer's path as plain components; `..` refuses the layer.
fn clean(path: &Path) -> Result<Vec<OsString>, String> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_os_string()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                return Err(format!(
                    "layer entry {} climbs out with '..'",
                    path.display()
                ))
            }
        }
    }
    Ok(parts)
}

/// The directory `parts` names inside `root`, made when missing, with each
/// symlink on the way followed inside `root` (never out of it).
fn resolve_dir(root: &Path, parts: &[OsString]) -> Result<PathBuf, String> {
    let mut queue: VecDeque<OsString> = parts.iter().cloned().collect();
    let mut at: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = queue.pop_front() {
        let here = at.iter().fold(root.to_path_buf(), |p, c| p.join(c));
        let next = here.join(&part);
        match std::fs::symlink_metadata(&next) {
            Err(_) => {
                std::fs::create_dir(&next).map_err(|e| format!("{}: {e}", next.display()))?;
                at.push(part);
            }
            Ok(m) if m.is_dir() => at.push(part),
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(format!("too many symlinks under {}", next.display()));
                }
                let target =
                    std::fs::read_link(&next).map_err(|e| format!("{}: {e}", next.display()))?;
                if target.is_absolute() {
                    at.clear();
                }
                let mut ahead: VecDeque<OsString> = VecDeque::new();
                for c in target.components() {
                    match c {
                        Component::Normal(s) => ahead.push_back(s.to_os_string()),
                        // `..` of the root is the root, as in the container.
                        Component::ParentDir if ahead.pop_back().is_none() => {
                            at.pop();
                        }
                        _ => {}
                    }
                }
                while let Some(c) = ahead.pop_back() {
                    queue.push_front(c);
                }
            }
            Ok(_) => return Err(format!("{} is not a directory", next.display())),
        }
    }
    Ok(at.iter().fold(root.to_path_buf(), |p, c| p.join(c)))
}

/// Removes whatever is at `path`, without following a symlink there.
fn remove(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    }
    .map_err(|e| format!("{}: {e}", path.display()))
}

fn unpack_layer(reader: impl Read, root: &Path, budget: &mut Budget) -> Result<(), String> {
    let mut archive = tar::Archive::new(reader);
    // What this layer wrote: an opaque whiteout hides the layers below
    // only, whatever order the entries come in.
    let mut written: HashSet<Vec<OsString>> = HashSet::new();
    let entries = archive.entries().map_err(|e| format!("layer: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("layer: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("layer entry: {e}"))?
            .into_owned();
        let parts = clean(&raw)?;
        let Some((name, parent)) = parts.split_last() else {
            continue;
        };
        budget.entries += 1;
        if budget.entries > MAX_ENTRIES {
            return Err(format!("the image has more than {MAX_ENTRIES} files"));
        }
        let dir = resolve_dir(root, parent)?;
        let name_str = name.to_string_lossy();
        if name_str == ".wh..wh..opq" {
            let listing = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            for child in listing.flatten() {
                let mut key = parent.to_vec();
                key.push(child.file_name());
                if !written.contains(&key) {
                    remove(&child.path())?;
                }
            }
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(".wh.") {
            remove(&dir.join(hidden))?;
            continue;
        }
        let dest = dir.join(name);
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644) & 0o777;
        let kind = header.entry_type();
        if kind.is_dir() {
            if !std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
                remove(&dest)?;
                std::fs::create_dir(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", dest.display()))?;
        } else if kind.is_file() {
            remove(&dest)?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .mode(mode)
                .open(&dest)
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            let room = budget.max_bytes.saturating_sub(budget.bytes);
            let copied = std::io::copy(&mut (&mut entry).take(room.saturating_add(1)), &mut file)
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            budget.bytes = budget.bytes.saturating_add(copied);
            if budget.bytes > budget.max_bytes {
                return Err(format!(
                    "the image unpacks to more than {} bytes",
                    budget.max_bytes
                ));
            }
            file.flush()
                .map_err(|e| format!("{}: {e}", dest.display()))?;
            // `mode` is masked by the umask at creation; set it exactly.
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", dest.display()))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| format!("{}: {e}", dest.display()))?
                .ok_or_else(|| format!("symlink {} has no target", dest.display()))?;
            remove(&dest)?;
            // Kept as written: it is read inside the container's root.
            std::os::unix::fs::symlink(&target, &dest)
                .map_err(|e| format!("{}: {e}", dest.display()))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| format!("{}: {e}", dest.display()))?
                .ok_or_else(|| format!("hard link {} has no target", dest.display()))?;
            let target = clean(&target)?;
            let Some((target_name, target_parent)) = target.split_last() else {
                return Err(format!("hard link {} names the root", dest.display()));
            };
            let source = resolve_dir(root, target_parent)?.join(target_name);
            if !std::fs::symlink_metadata(&source).is_ok_and(|m| m.is_file()) {
                return Err(format!(
                    "hard link {} names {}, not a file of the image",
                    raw.display(),
                    source.display()
                ));
            }
            remove(&dest)?;
            std::fs::hard_link(&source, &dest).map_err(|e| format!("{}: {e}", dest.display()))?;
        } else {
            // Devices, FIFOs, and whatever else: not made on the host.
            continue;
        }
        written.insert(parts);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A layer from (path, kind, content or link target) entries.
    fn layer(
        dir: &Path,
        name: &str,
        entries: &[(&str, tar::EntryType, &str, u32)],
    ) -> (PathBuf, String) {
        let path = dir.join(name);
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        for (p, kind, data, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            // Written raw: `set_path` itself refuses `..`, a hostile
            // layer's writer does not.
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..p.len()].copy_from_slice(p.as_bytes());
            if kind.is_symlink() || kind.is_hard_link() {
                gnu.linkname[..data.len()].copy_from_slice(data.as_bytes());
                h.set_size(0);
                h.set_cksum();
                builder.append(&h, std::io::empty()).unwrap();
            } else {
                h.set_size(if kind.is_file() { data.len() as u64 } else { 0 });
                h.set_cksum();
                builder.append(&h, data.as_bytes()).unwrap();
            }
        }
        builder.finish().unwrap();
        (path, "application/vnd.oci.image.layer.v1.tar".into())
    }

    use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};

    #[test]
    fn layers_apply_in_order_with_whiteouts() {
        let t = tempfile::tempdir().unwrap();
        let lower = layer(
            t.path(),
            "1.tar",
            &[
                ("etc/", D, "", 0o755),
                ("etc/keep", F, "k", 0o644),
                ("etc/gone", F, "g", 0o644),
                ("opq/", D, "", 0o755),
                ("opq/old", F, "o", 0o644),
                ("bin/su", F, "x", 0o4755),
            ],
        );
        let upper = layer(
            t.path(),
            "2.tar",
            &[
                ("etc/.wh.gone", F, "", 0o644),
                ("opq/new", F, "n", 0o644),
                ("opq/.wh..wh..opq", F, "", 0o644),
                ("etc/link", H, "etc/keep", 0o644),
            ],
        );
        let target = t.path().join("rootfs");
        unpack_image(&[lower, upper], &t.path().join("tmp"), &target).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("etc/keep")).unwrap(),
            "k"
        );
        assert!(!target.join("etc/gone").exists());
        assert!(
            !target.join("opq/old").exists(),
            "the opaque dir hides the lower layer"
        );
        assert_eq!(
            std::fs::read_to_string(target.join("opq/new")).unwrap(),
            "n"
        );
        assert_eq!(
            std::fs::read_to_string(target.join("etc/link")).unwrap(),
            "k"
        );
        let su = std::fs::metadata(target.join("bin/su"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(su & 0o7777, 0o755, "setuid is dropped");
        for dir in MOUNT_POINTS {
            assert!(target.join(dir).is_dir());
        }
        assert_eq!(std::fs::read(target.join(HOSTNAME_FILE)).unwrap(), b"");
    }

    #[test]
    fn an_etc_symlink_is_never_followed_to_make_the_hostname_file() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let evil = layer(
            t.path(),
            "1.tar",
            &[("etc", S, outside.to_str().unwrap(), 0o777)],
        );
        let target = t.path().join("rootfs");
        unpack_image(&[evil], &t.path().join("tmp"), &target).unwrap();
        assert!(!outside.join("hostname").exists());
        assert!(target.join("etc").symlink_metadata().unwrap().is_symlink());
    }

    #[test]
    fn no_entry_lands_outside_the_rootfs() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        // A symlink to a host directory, then a write through it: resolved
        // inside the rootfs, where `/<outside>` is a fresh directory.
        let through_symlink = layer(
            t.path(),
            "a.tar",
            &[
                ("escape", S, outside.to_str().unwrap(), 0o777),
                ("up", S, "../../../../..", 0o777),
            ],
        );
        let writes = layer(
            t.path(),
            "b.tar",
            &[
                ("escape/pwned", F, "x", 0o644),
                ("up/pwned2", F, "x", 0o644),
            ],
        );
        let target = t.path().join("rootfs");
        unpack_image(&[through_symlink, writes], &t.path().join("tmp"), &target).unwrap();
        assert!(!outside.join("pwned").exists());
        assert!(!t.path().join("pwned2").exists());
        let inner = target
            .join(outside.strip_prefix("/").unwrap())
            .join("pwned");
        assert!(inner.exists(), "the write stayed in the rootfs");
        assert!(
            target.join("pwned2").exists(),
            "`..` of the root is the root"
        );

        for (name, bad) in [
            (
                "dotdot.tar",
                layer(t.path(), "dotdot.tar", &[("../evil", F, "x", 0o644)]),
            ),
            (
                "hard.tar",
                layer(t.path(), "hard.tar", &[("h", H, "/etc/passwd", 0o644)]),
            ),
        ] {
            let err = unpack_image(
                &[bad],
                &t.path().join("tmp2"),
                &t.path().join(format!("{name}.rootfs")),
            )
            .unwrap_err();
            assert!(err.contains("..") || err.contains("not a file"), "{err}");
            assert!(
                !t.path().join(format!("{name}.rootfs")).exists(),
                "a refused image leaves nothing"
            );
        }
        assert!(!t.path().join("evil").exists());
    }

    #[test]
    fn a_bomb_stops_at_the_budget() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("bomb.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            File::create(&path).unwrap(),
            flate2::Compression::best(),
        );
        let mut builder = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        let size: u64 = 300 << 20;
        h.set_path("zeros").unwrap();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append(&h, std::io::repeat(0).take(size)).unwrap();
        builder.into_inner().unwrap().finish().unwrap();
        let layers = [(
            path,
            "application/vnd.oci.image.layer.v1.tar+gzip".to_string(),
        )];
        let err = unpack_image(&layers, &t.path().join("tmp"), &t.path().join("r")).unwrap_err();
        assert!(err.contains("unpacks to more than"), "{err}");
    }
}
