//! Volumes: a tenant's persistent disk of a hard size, kept on one node
//! (an ext4 image there) from the first workload that mounts it until it
//! is deleted, and mounted into that tenant's workloads only.
//!
//! A volume is bound to a node when the first replica that mounts it is
//! placed (as Kubernetes' `WaitForFirstConsumer`): it then lies where its
//! first user's GPUs are, and every later user runs on that node.

use serde::{Deserialize, Serialize};

use crate::quantity::ByteSize;
use crate::FieldErrors;

/// Smallest and largest volume: ext4 with a journal needs a few MiB, and
/// no node holds more than this.
pub const MIN_VOLUME_BYTES: u64 = 16 << 20;
pub const MAX_VOLUME_BYTES: u64 = 64 << 40;
/// Most volumes one container mounts.
pub const MAX_MOUNTS: usize = 16;
/// Where volumes are mounted unless a workload says otherwise: a fresh
/// tmpfs in each container, so no mount point is ever made in the image
/// (which other tenants may share).
pub const VOLUMES_DIR: &str = "/volumes";
/// Paths a volume may not cover: what the runtime mounts itself.
const RESERVED: &[&str] = &["/proc", "/sys", "/dev", "/tmp", "/scratch"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    /// Its hard size: writes past it fail with ENOSPC inside the
    /// workload. Counts against the tenant's storage quota; fixed once
    /// created.
    #[schema(value_type = String, example = "10Gi")]
    pub size: ByteSize,
}

impl VolumeSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if !(MIN_VOLUME_BYTES..=MAX_VOLUME_BYTES).contains(&self.size.0) {
            errors.push(
                "size",
                format!(
                    "must be {} to {}",
                    ByteSize(MIN_VOLUME_BYTES),
                    ByteSize(MAX_VOLUME_BYTES)
                ),
            );
        }
        errors.into_result()
    }
}

/// Where a volume lies, written by the placement controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeStatus {
    /// The node holding it; none until a workload mounting it is placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub reason: String,
}

impl VolumeStatus {
    pub fn unbound() -> VolumeStatus {
        VolumeStatus {
            node: None,
            reason: "made on the node of the first workload that mounts it".into(),
        }
    }
}

/// A volume of the workload's tenant, mounted into each of its containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    /// The volume's name.
    pub volume: String,
    /// Where it appears in the container: `/volumes/<volume>` when
    /// absent. Another path must be a directory the image has (no mount
    /// point is made in a shared image) or lie under `/volumes/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

impl VolumeMount {
    pub fn mount_path(&self) -> String {
        self.path
            .clone()
            .unwrap_or_else(|| format!("{VOLUMES_DIR}/{}", self.volume))
    }
}

/// Checks a workload's mounts: existing names, sound and distinct paths,
/// none inside another.
pub fn validate_mounts(mounts: &[VolumeMount], errors: &mut FieldErrors) {
    if mounts.len() > MAX_MOUNTS {
        errors.push("volumes", format!("at most {MAX_MOUNTS} volumes"));
    }
    let paths: Vec<String> = mounts.iter().map(VolumeMount::mount_path).collect();
    for (i, m) in mounts.iter().enumerate() {
        let field = format!("volumes[{i}]");
        errors.check(
            &format!("{field}.volume"),
            crate::name::validate_name(&m.volume),
        );
        if mounts[..i].iter().any(|o| o.volume == m.volume) {
            errors.push(
                format!("{field}.volume"),
                format!("volume {:?} is mounted twice", m.volume),
            );
        }
        if let Err(why) = check_path(&paths[i]) {
            errors.push(format!("{field}.path"), why);
        } else if let Some(other) = paths[..i]
            .iter()
            .find(|p| nested(p, &paths[i]) || nested(&paths[i], p))
        {
            errors.push(
                format!("{field}.path"),
                format!(
                    "{} and {other} overlap: give each volume its own directory",
                    paths[i]
                ),
            );
        }
    }
}

/// Whether `inner` is `outer` or lies under it.
fn nested(outer: &str, inner: &str) -> bool {
    inner == outer || inner.starts_with(&format!("{outer}/"))
}

/// An absolute, normalised path (no `.`, `..` or empty parts) outside what
/// the runtime mounts itself.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.len() > 256 || path.contains('\0') {
        return Err(format!(
            "{path:?} must be an absolute path of at most 256 bytes"
        ));
    }
    let parts: Vec<&str> = path[1..].split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return Err(format!(
            "{path:?} must be normalised: no empty, '.' or '..' parts, no trailing '/'"
        ));
    }
    if path == VOLUMES_DIR {
        return Err(format!("mount under {VOLUMES_DIR}/, not on it"));
    }
    if let Some(r) = RESERVED.iter().find(|r| nested(r, path) || nested(path, r)) {
        return Err(format!(
            "{path} would cover {r}, which the runtime provides"
        ));
    }
    Ok(())
}

/// A volume as a placement carries it to the node: resolved by the
/// controller, so the agent needs nothing else to make and mount it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeAttachment {
    /// The volume's id: what the node names its image by.
    pub id: String,
    pub name: String,
    #[schema(value_type = String)]
    pub size: ByteSize,
    pub path: String,
    #[serde(default)]
    pub read_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(volume: &str, path: Option<&str>) -> VolumeMount {
        VolumeMount {
            volume: volume.into(),
            path: path.map(str::to_string),
            read_only: false,
        }
    }

    fn errors_of(mounts: &[VolumeMount]) -> Vec<String> {
        let mut errors = FieldErrors::new();
        validate_mounts(mounts, &mut errors);
        errors.into_result().err().map_or(vec![], |e| {
            e.0.iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect()
        })
    }

    #[test]
    fn hostile_mount_paths_are_refused() {
        for path in [
            "data",
            "/",
            "/data/../etc",
            "/data/",
            "//data",
            "/a/./b",
            "/proc",
            "/proc/1",
            "/sys/fs",
            "/dev",
            "/tmp/x",
            "/scratch",
            "/volumes",
            "/a\0b",
        ] {
            assert_eq!(
                errors_of(&[mount("v", Some(path))]).len(),
                1,
                "{path:?} was accepted"
            );
        }
        for path in ["/data", "/volumes/v", "/var/lib/db", "/temp"] {
            assert!(errors_of(&[mount("v", Some(path))]).is_empty(), "{path}");
        }
    }

    #[test]
    fn mounts_are_distinct_and_never_nested() {
        assert!(errors_of(&[mount("a", None), mount("b", None)]).is_empty());
        let twice = errors_of(&[mount("a", None), mount("a", Some("/data"))]);
        assert!(twice[0].contains("mounted twice"), "{twice:?}");
        let nested = errors_of(&[mount("a", Some("/data")), mount("b", Some("/data/b"))]);
        assert!(nested[0].contains("overlap"), "{nested:?}");
        let bad_name = errors_of(&[mount("../x", None)]);
        assert!(bad_name[0].starts_with("volumes[0].volume"), "{bad_name:?}");
    }

    #[test]
    fn sizes_are_bounded() {
        let spec = |b| VolumeSpec { size: ByteSize(b) };
        assert!(spec(MIN_VOLUME_BYTES - 1).validate().is_err());
        assert!(spec(MIN_VOLUME_BYTES).validate().is_ok());
        assert!(spec(MAX_VOLUME_BYTES + 1).validate().is_err());
    }
}
