//! Workloads: a tenant's own OCI image run as containers on its
//! allocation — a `service` keeps `replicas` copies running, a `job` runs
//! `completions` copies to a successful exit, `parallelism` at a time,
//! all at once when it is a `gang`. Images come
//! from the control plane's registry only (`<namespace>/<repo>[:tag|@digest]`,
//! the tenant's own namespace or the public `library/`): a workload never
//! makes a node fetch from an address a tenant chose.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::deployment::{Resources, MAX_REPLICAS};
use crate::lifecycle::{LifecycleState, Status};
use crate::quota::ResourceUsage;
use crate::volume::{validate_mounts, VolumeMount};
use crate::FieldErrors;

/// The namespace of images every tenant may run.
pub const PUBLIC_IMAGE_NAMESPACE: &str = "library";
/// Most completions a job may ask for: each one keeps its replica's record
/// (and log) until the job is deleted.
pub const MAX_COMPLETIONS: u32 = 1000;
/// Most retries of one completion, and longest deadline or time to live
/// (a year), in seconds.
pub const MAX_BACKOFF_LIMIT: u32 = 100;
pub const MAX_SECONDS: u64 = 366 * 24 * 3600;
/// Lowest priority a workload may ask for; the highest is its tenant's.
pub const MIN_PRIORITY: i32 = -1_000_000;
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
    /// The container's host name (and its `/etc/hostname`): lowercase
    /// letters, digits, '-' and '.', at most 63; the workload's name
    /// when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// Whether a workload runs for good or to completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// `replicas` copies kept running, each restarted with backoff.
    #[default]
    Service,
    /// Copies run until `job.completions` of them exit 0.
    Job,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    #[serde(flatten)]
    pub container: ContainerSpec,
    pub resources: Resources,
    #[serde(default)]
    pub kind: WorkloadKind,
    /// A service's copies kept running; each one restarted with backoff
    /// when it exits. A job runs `job.completions` instead.
    #[serde(default = "one")]
    pub replicas: u32,
    /// How a job runs; only for `kind: job` (its defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    /// Placement priority: a workload of a higher priority may evict ones
    /// of a lower (and, within its tenant's guarantee, another tenant's
    /// borrowed ones). At most the tenant's own priority, its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Sites the replicas may run in; any permitted site when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// The tenant's volumes each replica mounts. Every replica then runs
    /// on the node holding them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
}

/// A job's run: like Kubernetes' indexed jobs, each completion index is
/// one replica, run (and retried) until it exits 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Successful exits the job needs, one per index.
    #[serde(default = "one")]
    pub completions: u32,
    /// Indexes run at once; all of them for a gang, else 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// Retries of one index after it fails before the job fails.
    #[serde(default = "six")]
    pub backoff_limit: u32,
    /// The job fails when it has not completed this long after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<u64>,
    /// A finished job (and its replicas' records and logs) is deleted this
    /// long after it finished; kept until deleted when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
    /// Every index starts at once or none does (distributed training):
    /// the job waits, pending with the reason, until all of them fit.
    #[serde(default)]
    pub gang: bool,
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            completions: 1,
            parallelism: None,
            backoff_limit: six(),
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            gang: false,
        }
    }
}

impl JobSpec {
    /// Indexes run at once.
    pub fn parallelism(&self) -> u32 {
        match self.parallelism {
            Some(p) => p.min(self.completions),
            None if self.gang => self.completions,
            None => 1,
        }
    }

    fn validate(&self, errors: &mut FieldErrors) {
        if self.completions == 0 || self.completions > MAX_COMPLETIONS {
            errors.push("job.completions", format!("must be 1 to {MAX_COMPLETIONS}"));
        }
        match self.parallelism {
            Some(p) if p == 0 || p > MAX_REPLICAS => errors.push(
                "job.parallelism",
                format!("must be 1 to {MAX_REPLICAS}"),
            ),
            Some(p) if self.gang && p != self.completions => errors.push(
                "job.parallelism",
                "a gang runs every index at once: leave parallelism out or make it equal completions",
            ),
            None if self.gang && self.completions > MAX_REPLICAS => errors.push(
                "job.completions",
                format!("a gang runs every index at once: at most {MAX_REPLICAS}"),
            ),
            _ => {}
        }
        if self.backoff_limit > MAX_BACKOFF_LIMIT {
            errors.push(
                "job.backoff_limit",
                format!("must be at most {MAX_BACKOFF_LIMIT}"),
            );
        }
        for (field, value) in [
            ("job.active_deadline_seconds", self.active_deadline_seconds),
            (
                "job.ttl_seconds_after_finished",
                self.ttl_seconds_after_finished,
            ),
        ] {
            if value.is_some_and(|s| s > MAX_SECONDS) {
                errors.push(field, format!("must be at most {MAX_SECONDS} (a year)"));
            }
        }
        if self.active_deadline_seconds == Some(0) {
            errors.push("job.active_deadline_seconds", "must be at least 1");
        }
    }
}

/// Whether a job's status is its last: it succeeded or failed. (A
/// service's replicas fail and recover; only a job ends.)
pub fn job_finished(status: &Status) -> bool {
    matches!(
        status.state,
        LifecycleState::Succeeded | LifecycleState::Failed
    )
}

fn one() -> u32 {
    1
}

fn six() -> u32 {
    6
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

/// Whether `h` may name a host: what the UTS namespace and
/// `/etc/hostname` are given, so never a path or a control character.
pub fn is_hostname(h: &str) -> bool {
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    (1..=63).contains(&h.len())
        && edge(h.as_bytes().first())
        && edge(h.as_bytes().last())
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
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
        if let Some(h) = self.hostname.as_deref().filter(|h| !is_hostname(h)) {
            errors.push(
                "hostname",
                format!("{h:?}: must be 1 to 63 lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"),
            );
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
        match (self.kind, &self.job) {
            (WorkloadKind::Service, Some(_)) => {
                errors.push("job", "only a workload of kind job has job settings")
            }
            (WorkloadKind::Job, job) => {
                if self.replicas != 1 {
                    errors.push(
                        "replicas",
                        "a job runs job.completions copies: leave replicas out",
                    );
                }
                job.clone().unwrap_or_default().validate(&mut errors);
            }
            (WorkloadKind::Service, None) => {}
        }
        if self.priority.is_some_and(|p| p < MIN_PRIORITY) {
            errors.push("priority", format!("must be at least {MIN_PRIORITY}"));
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
        validate_mounts(&self.volumes, &mut errors);
        errors.into_result()
    }

    /// One replica of `container` kept running, anywhere.
    pub fn service(container: ContainerSpec, resources: Resources) -> WorkloadSpec {
        WorkloadSpec {
            container,
            resources,
            kind: WorkloadKind::Service,
            replicas: 1,
            job: None,
            priority: None,
            sites: Vec::new(),
            volumes: Vec::new(),
        }
    }

    /// The job's settings, when it is one.
    pub fn job(&self) -> Option<JobSpec> {
        (self.kind == WorkloadKind::Job).then(|| self.job.clone().unwrap_or_default())
    }

    /// Replicas that run at once: a service's replicas, a job's
    /// parallelism.
    pub fn running_at_once(&self) -> u32 {
        self.job().map_or(self.replicas, |j| j.parallelism())
    }

    /// What this workload holds against its tenant's quota: its replicas
    /// running at once, or what its placements still hold when that is
    /// more (as a deployment's, see `DeploymentSpec::quota_usage_holding`).
    pub fn quota_usage_holding<'a>(
        &self,
        placed: impl IntoIterator<Item = &'a Resources>,
    ) -> ResourceUsage {
        self.resources
            .times(u64::from(self.running_at_once()))
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
    fn job_settings_are_checked_and_defaulted_as_kubernetes_does() {
        let job = |v: serde_json::Value| -> WorkloadSpec {
            let mut spec = serde_json::json!({
                "image": "acme/x", "resources": {"cpu": "1", "memory": "64Mi"}
            });
            spec.as_object_mut()
                .unwrap()
                .extend(v.as_object().unwrap().clone());
            serde_json::from_value(spec).unwrap()
        };
        let plain = job(serde_json::json!({"kind": "job"}));
        assert_eq!(plain.job().unwrap().completions, 1);
        assert_eq!(plain.job().unwrap().backoff_limit, 6);
        assert_eq!(plain.running_at_once(), 1);
        let gang = job(serde_json::json!({"kind": "job", "job": {"completions": 4, "gang": true}}));
        assert!(gang.validate().is_ok());
        assert_eq!(gang.running_at_once(), 4);
        let batch =
            job(serde_json::json!({"kind": "job", "job": {"completions": 10, "parallelism": 3}}));
        assert_eq!(batch.running_at_once(), 3);
        assert!(
            job(serde_json::json!({"job": {}})).job().is_none(),
            "a service"
        );

        let fields = |v| -> Vec<String> {
            job(v)
                .validate()
                .unwrap_err()
                .0
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(fields(serde_json::json!({"job": {}})), ["job"]);
        assert_eq!(
            fields(serde_json::json!({"kind": "job", "replicas": 3})),
            ["replicas"]
        );
        let bad = fields(
            serde_json::json!({"kind": "job", "priority": i32::MIN, "job": {
            "completions": 0, "parallelism": 0, "backoff_limit": 101,
            "active_deadline_seconds": 0, "ttl_seconds_after_finished": u64::MAX}}),
        );
        for f in [
            "job.completions",
            "job.parallelism",
            "job.backoff_limit",
            "job.active_deadline_seconds",
            "job.ttl_seconds_after_finished",
            "priority",
        ] {
            assert!(bad.iter().any(|b| b == f), "{f} not reported in {bad:?}");
        }
        assert_eq!(
            fields(
                serde_json::json!({"kind": "job", "job": {"completions": 4, "parallelism": 2, "gang": true}})
            ),
            ["job.parallelism"]
        );
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

    #[test]
    fn a_hostname_is_a_name_never_a_path_or_a_line() {
        for ok in ["web", "api-7d9f8-x2k", "db.internal", "0"] {
            assert!(is_hostname(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "../../etc",
            "a/b",
            "Web",
            "-a",
            "a-",
            "a\nb",
            "a b",
            &long,
        ] {
            assert!(!is_hostname(bad), "{bad:?}");
        }
        let spec: WorkloadSpec = serde_json::from_value(serde_json::json!({
            "image": "acme/x:1", "hostname": "x\n127.0.0.1 bank",
            "resources": {"cpu": "1", "memory": "64Mi"}
        }))
        .unwrap();
        let errors = spec.validate().unwrap_err();
        assert_eq!(errors.0[0].field, "hostname", "{errors:?}");
    }
}
