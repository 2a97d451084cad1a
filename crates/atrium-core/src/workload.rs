//! Workloads: a tenant's own OCI image run as containers on its
//! allocation — a `service` keeps `replicas` copies running. Images come
//! from the control plane's registry only (`<namespace>/<repo>[:tag|@digest]`,
//! the tenant's own namespace or the public `library/`): a workload never
//! makes a node fetch from an address a tenant chose.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deployment::{Resources, MAX_REPLICAS};
use crate::quota::ResourceUsage;
use crate::FieldErrors;

/// The namespace of images every tenant may run.
pub const PUBLIC_IMAGE_NAMESPACE: &str = "library";
/// Most arguments (command and args together), environment variables and
/// ports one container may have; longest single string.
pub const MAX_ARGS: usize = 256;
pub const MAX_ENV: usize = 256;
pub const MAX_PORTS: usize = 16;
pub const MAX_STRING: usize = 4096;

/// What one replica runs: an image and how to start it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// `<namespace>/<repository>[:tag|@sha256:…]` in the control plane's
    /// registry; the tag `latest` when neither is given.
    #[schema(example = "acme/busybox:1")]
    pub image: String,
    /// Replaces the image's entrypoint when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's `Cmd` when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Added to (and overriding) the image's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// TCP ports the container listens on, in its tenant's network. The
    /// first is its health check: running means it accepts connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    #[serde(flatten)]
    pub container: ContainerSpec,
    pub resources: Resources,
    /// Copies kept running; each one restarted with backoff when it exits.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Sites the replicas may run in; any permitted site when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
}

fn one() -> u32 {
    1
}

/// An image reference split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `<namespace>/<repository…>`.
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl ImageRef {
    /// Parses `ns/repo[:tag|@digest]`. A host (`registry.example:5000/…`)
    /// is refused: images come from the control plane's registry only.
    pub fn parse(image: &str) -> Result<ImageRef, String> {
        let (repository, reference) = match image.split_once('@') {
            Some((repo, digest)) => {
                let hex = digest.strip_prefix("sha256:").unwrap_or("");
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                {
                    return Err(format!(
                        "{digest:?} is not a digest: use sha256: and 64 lowercase hex digits"
                    ));
                }
                (repo, digest.to_string())
            }
            None => match image.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => {
                    let tag_ok = !tag.is_empty()
                        && tag.len() <= 128
                        && (tag.as_bytes()[0].is_ascii_alphanumeric() || tag.starts_with('_'));
                    let chars_ok = tag
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                    if !(tag_ok && chars_ok) {
                        return Err(format!(
                            "tag {tag:?} must be 1–128 letters, digits, '_', '.' or '-'"
                        ));
                    }
                    (repo, tag.to_string())
                }
                _ => (image, "latest".to_string()),
            },
        };
        let parts: Vec<&str> = repository.split('/').collect();
        if parts.len() < 2 {
            return Err(format!(
                "{image:?} names no namespace: write <tenant>/<repository> (or {PUBLIC_IMAGE_NAMESPACE}/<repository>)"
            ));
        }
        if parts[0].contains(['.', ':']) || parts[0] == "localhost" {
            return Err(format!(
                "{image:?} names another registry; images come from this control plane's \
                 registry only: push there and write <tenant>/<repository>"
            ));
        }
        for part in &parts {
            let ok = !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && part.as_bytes()[0].is_ascii_alphanumeric()
                && part.as_bytes()[part.len() - 1].is_ascii_alphanumeric();
            if !ok {
                return Err(format!(
                    "{part:?} in {image:?} must be lowercase letters and digits, \
                     separated by '.', '_' or '-'"
                ));
            }
        }
        if repository.len() > 255 {
            return Err("the repository name is longer than 255 characters".into());
        }
        Ok(ImageRef {
            repository: repository.to_string(),
            reference,
        })
    }

    pub fn namespace(&self) -> &str {
        self.repository.split('/').next().unwrap_or_default()
    }
}

impl ContainerSpec {
    pub fn validate(&self, errors: &mut FieldErrors) {
        errors.check("image", ImageRef::parse(&self.image));
        let long = |s: &String| s.len() > MAX_STRING || s.contains('\0');
        if self.command.len() + self.args.len() > MAX_ARGS {
            errors.push(
                "args",
                format!("command and args hold at most {MAX_ARGS} strings"),
            );
        }
        for (field, list) in [("command", &self.command), ("args", &self.args)] {
            if let Some(i) = list.iter().position(long) {
                errors.push(
                    format!("{field}[{i}]"),
                    format!("must be at most {MAX_STRING} bytes, without NUL"),
                );
            }
        }
        if self.env.len() > MAX_ENV {
            errors.push("env", format!("at most {MAX_ENV} variables"));
        }
        for (name, value) in &self.env {
            let name_ok = !name.is_empty()
                && name.len() <= 256
                && !name.as_bytes()[0].is_ascii_digit()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                errors.push(
                    format!("env.{name}"),
                    "names are letters, digits and '_', not starting with a digit",
                );
            } else if long(value) {
                errors.push(
                    format!("env.{name}"),
                    format!("must be at most {MAX_STRING} bytes, without NUL"),
                );
            }
        }
        if self.ports.len() > MAX_PORTS {
            errors.push("ports", format!("at most {MAX_PORTS} ports"));
        }
        for (i, port) in self.ports.iter().enumerate() {
            if *port == 0 {
                errors.push(format!("ports[{i}]"), "must be 1–65535");
            } else if self.ports[..i].contains(port) {
                errors.push(
                    format!("ports[{i}]"),
                    format!("port {port} is listed twice"),
                );
            }
        }
    }
}

impl WorkloadSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        self.container.validate(&mut errors);
        if self.replicas > MAX_REPLICAS {
            errors.push("replicas", format!("must be at most {MAX_REPLICAS}"));
        }
        if self.resources.memory.0 == 0 {
            errors.push("resources.memory", "must be more than zero");
        }
        if self.resources.cpu.0 == 0 {
            errors.push("resources.cpu", "must be more than zero");
        }
        if self.resources.gpu.is_none() && self.resources.gpu_memory.is_some() {
            errors.push("resources.gpu_memory", "needs resources.gpu");
        }
        for (i, site) in self.sites.iter().enumerate() {
            errors.check(&format!("sites[{i}]"), crate::name::validate_name(site));
        }
        errors.into_result()
    }

    /// What this workload holds against its tenant's quota: its replicas,
    /// or what its placements still hold when that is more (as a
    /// deployment's, see `DeploymentSpec::quota_usage_holding`).
    pub fn quota_usage_holding<'a>(
        &self,
        placed: impl IntoIterator<Item = &'a Resources>,
    ) -> ResourceUsage {
        self.resources
            .times(u64::from(self.replicas))
            .max(Resources::sum(placed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_name_this_registry_only() {
        let ok = ImageRef::parse("acme/busybox:1").unwrap();
        assert_eq!(
            (ok.repository.as_str(), ok.reference.as_str()),
            ("acme/busybox", "1")
        );
        assert_eq!(
            ImageRef::parse("acme/tools/busybox").unwrap().reference,
            "latest"
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        let pinned = ImageRef::parse(&format!("library/python@{digest}")).unwrap();
        assert_eq!(pinned.reference, digest);
        assert_eq!(pinned.namespace(), "library");
        for bad in [
            "busybox",
            "registry.example.com/acme/busybox",
            "localhost/acme/x",
            "10.0.0.1:5000/acme/x",
            "acme/../etc",
            "acme//x",
            "Acme/x",
            "acme/x:",
            "acme/x:bad tag",
            "acme/x@sha256:abc",
            "acme/x@md5:00",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_spec_reports_every_bad_field() {
        let spec: WorkloadSpec = serde_json::from_value(serde_json::json!({
            "image": "evil.example/x/y", "command": ["a\u{0}b"],
            "env": {"1X": "v", "OK": "v"}, "ports": [0, 80, 80],
            "resources": {"cpu": "0", "memory": "0"}, "replicas": 5000
        }))
        .unwrap();
        let errors = spec.validate().unwrap_err();
        let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "image",
            "command[0]",
            "env.1X",
            "ports[0]",
            "ports[2]",
            "replicas",
            "resources.memory",
            "resources.cpu",
        ] {
            assert!(fields.contains(&f), "{f} not reported in {fields:?}");
        }
    }
}
