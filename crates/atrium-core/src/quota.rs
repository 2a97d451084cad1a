//! Tenant quotas and the admission rule: a request is admitted only if what
//! the tenant already holds plus what it asks for stays within every limit.
//! The rule is pure; the store makes it atomic by evaluating it inside the
//! write transaction.

use serde::{Deserialize, Serialize};

use crate::limits::RequestLimits;
use crate::quantity::{ByteSize, CpuMillis, GpuMilli};

/// Limits on what one tenant may hold or use. A missing resource or rate
/// limit is unlimited; a missing object count has a default cap
/// ([`Counted::default_cap`]), so no tenant can make every controller pass
/// and every watcher carry an unbounded number of its objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// GPUs, whole or fractional (MIG instances count as their share).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "8")]
    pub gpus: Option<GpuMilli>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "640Gi")]
    pub gpu_memory: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "64")]
    pub cpu: Option<CpuMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "512Gi")]
    pub memory: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "1Ti")]
    pub storage: Option<ByteSize>,
    /// Deployments held at once [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployments: Option<u64>,
    /// Private models held at once [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<u64>,
    /// Volumes held at once [default: 100]; their sizes count against
    /// `storage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<u64>,
    /// Kubernetes clusters held at once [default: 10].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clusters: Option<u64>,
    /// Kubernetes objects one of its clusters holds at once, of every
    /// resource type together [default: 10000].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_objects: Option<u64>,
    /// Execs kept at once [default: 20]: the CLI deletes each one it has
    /// read; delete finished ones to run more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execs: Option<u64>,
    /// Batch API files held at once [default: 100]; their bytes count
    /// against `storage`. Results files Atrium writes are not capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Batches queued or running at once [default: 20].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<u64>,
    /// Vector collections held at once [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections: Option<u64>,
    /// Vector points held at once, all collections together
    /// [default: 1000000].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector_points: Option<u64>,
    /// Bytes of vector points held at once, all collections together:
    /// each vector's floats and each payload's JSON [default: 4Gi].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "4Gi")]
    pub vector_bytes: Option<ByteSize>,
    /// PostgreSQL databases held at once [default: 5].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub databases: Option<u64>,
    /// API keys held at once, revoked ones included [default: 100].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
    /// Watch streams open at once [default: 32].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watches: Option<u64>,
    /// Enforced by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Enforced by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Prompt + completion tokens per UTC day; enforced by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once; enforced by the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u64>,
    /// Usable beyond `gpus`, `cpu` and `memory` (the guarantee) while
    /// other tenants leave it idle: admitted like the quota, but a replica
    /// holding borrowed room is the first evicted when a tenant within its
    /// own guarantee needs it.
    #[serde(default, skip_serializing_if = "Borrowing::is_empty")]
    pub borrowing: Borrowing,
    /// The tenant's weight in the fair share among tenants of one
    /// priority: pending work goes to the smallest dominant share divided
    /// by weight first. 1 to 1000 [default: 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fair_share_weight: Option<u32>,
}

/// What a tenant may borrow beyond its guarantee; nothing when unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Borrowing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "4")]
    pub gpus: Option<GpuMilli>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "32")]
    pub cpu: Option<CpuMillis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "256Gi")]
    pub memory: Option<ByteSize>,
}

impl Borrowing {
    pub fn is_empty(&self) -> bool {
        *self == Borrowing::default()
    }
}

/// A guarantee plus what may be borrowed beyond it; unlimited stays so.
fn with_borrowing(guarantee: Option<u64>, borrowing: Option<u64>) -> Option<u64> {
    guarantee.map(|g| g.saturating_add(borrowing.unwrap_or(0)))
}

/// Resources a tenant holds (or asks for), in exact units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResourceUsage {
    #[schema(value_type = String)]
    pub gpus: GpuMilli,
    #[schema(value_type = String)]
    pub gpu_memory: ByteSize,
    #[schema(value_type = String)]
    pub cpu: CpuMillis,
    #[schema(value_type = String)]
    pub memory: ByteSize,
    #[schema(value_type = String)]
    pub storage: ByteSize,
    pub deployments: u64,
}

impl ResourceUsage {
    /// The larger of the two, resource by resource.
    pub fn max(self, o: ResourceUsage) -> ResourceUsage {
        ResourceUsage {
            gpus: GpuMilli(self.gpus.0.max(o.gpus.0)),
            gpu_memory: ByteSize(self.gpu_memory.0.max(o.gpu_memory.0)),
            cpu: CpuMillis(self.cpu.0.max(o.cpu.0)),
            memory: ByteSize(self.memory.0.max(o.memory.0)),
            storage: ByteSize(self.storage.0.max(o.storage.0)),
            deployments: self.deployments.max(o.deployments),
        }
    }

    pub fn saturating_add(self, o: ResourceUsage) -> ResourceUsage {
        ResourceUsage {
            gpus: GpuMilli(self.gpus.0.saturating_add(o.gpus.0)),
            gpu_memory: ByteSize(self.gpu_memory.0.saturating_add(o.gpu_memory.0)),
            cpu: CpuMillis(self.cpu.0.saturating_add(o.cpu.0)),
            memory: ByteSize(self.memory.0.saturating_add(o.memory.0)),
            storage: ByteSize(self.storage.0.saturating_add(o.storage.0)),
            deployments: self.deployments.saturating_add(o.deployments),
        }
    }
}

/// A refused admission: which limit, and the numbers behind the refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema, thiserror::Error)]
#[error("quota exceeded for {resource}: requested {requested}, in use {used}, limit {limit}")]
pub struct QuotaExceeded {
    pub resource: String,
    pub requested: String,
    pub used: String,
    pub limit: String,
}

/// Objects a tenant holds a counted number of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Deployments,
    Models,
    Keys,
    Watches,
    Volumes,
    Execs,
    Clusters,
    ClusterObjects,
    Files,
    Batches,
    Collections,
    VectorPoints,
    VectorBytes,
    Databases,
}

impl Counted {
    /// The quota field that sets the cap.
    pub fn field(self) -> &'static str {
        match self {
            Counted::Deployments => "deployments",
            Counted::Models => "models",
            Counted::Keys => "keys",
            Counted::Watches => "watches",
            Counted::Volumes => "volumes",
            Counted::Execs => "execs",
            Counted::Clusters => "clusters",
            Counted::ClusterObjects => "cluster_objects",
            Counted::Files => "files",
            Counted::Batches => "batches",
            Counted::Collections => "collections",
            Counted::VectorPoints => "vector_points",
            Counted::VectorBytes => "vector_bytes",
            Counted::Databases => "databases",
        }
    }

    /// The cap when the quota names none: far above what a tenant uses.
    pub fn default_cap(self) -> u64 {
        match self {
            Counted::Deployments
            | Counted::Models
            | Counted::Keys
            | Counted::Volumes
            | Counted::Files
            | Counted::Collections => 100,
            Counted::VectorPoints => 1_000_000,
            Counted::VectorBytes => 4 << 30,
            Counted::Batches => 20,
            Counted::Databases => 5,
            Counted::Watches => 32,
            Counted::Execs => 20,
            Counted::Clusters => 10,
            Counted::ClusterObjects => 10_000,
        }
    }
}

impl Quota {
    /// How many `what` the tenant may hold at once.
    pub fn cap(&self, what: Counted) -> u64 {
        let set = match what {
            Counted::Deployments => self.deployments,
            Counted::Models => self.models,
            Counted::Keys => self.keys,
            Counted::Watches => self.watches,
            Counted::Volumes => self.volumes,
            Counted::Execs => self.execs,
            Counted::Clusters => self.clusters,
            Counted::ClusterObjects => self.cluster_objects,
            Counted::Files => self.files,
            Counted::Batches => self.batches,
            Counted::Collections => self.collections,
            Counted::VectorPoints => self.vector_points,
            Counted::VectorBytes => self.vector_bytes.map(|b| b.0),
            Counted::Databases => self.databases,
        };
        set.unwrap_or(what.default_cap())
    }

    /// Admits one more `what` on top of `held`, or says the numbers.
    pub fn admit_one(&self, what: Counted, held: u64) -> Result<(), QuotaExceeded> {
        let cap = self.cap(what);
        if held.saturating_add(1) > cap {
            return Err(QuotaExceeded {
                resource: what.field().to_string(),
                requested: "1".into(),
                used: held.to_string(),
                limit: cap.to_string(),
            });
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), crate::FieldErrors> {
        let mut errors = crate::FieldErrors::new();
        self.request_limits().validate(&mut errors);
        if self
            .fair_share_weight
            .is_some_and(|w| !(1..=1000).contains(&w))
        {
            errors.push("fair_share_weight", "must be 1 to 1000");
        }
        errors.into_result()
    }

    /// Sets the limits the gateway enforces on the tenant's requests.
    pub fn set_request_limits(&mut self, limits: RequestLimits) {
        self.requests_per_minute = limits.requests_per_minute;
        self.tokens_per_minute = limits.tokens_per_minute;
        self.tokens_per_day = limits.tokens_per_day;
        self.max_concurrent_requests = limits.max_concurrent_requests;
    }

    /// The limits the gateway enforces on the tenant's requests.
    pub fn request_limits(&self) -> RequestLimits {
        RequestLimits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent_requests: self.max_concurrent_requests,
        }
    }

    /// Admits `requested` on top of `used`, or names the first limit it
    /// would break.
    pub fn admit(
        &self,
        used: &ResourceUsage,
        requested: &ResourceUsage,
    ) -> Result<(), QuotaExceeded> {
        fn check<T: Copy + std::fmt::Display>(
            resource: &str,
            limit: Option<T>,
            used: T,
            requested: T,
            value: impl Fn(T) -> u64,
        ) -> Result<(), QuotaExceeded> {
            match limit {
                Some(limit) if value(used).saturating_add(value(requested)) > value(limit) => {
                    Err(QuotaExceeded {
                        resource: resource.to_string(),
                        requested: requested.to_string(),
                        used: used.to_string(),
                        limit: limit.to_string(),
                    })
                }
                _ => Ok(()),
            }
        }
        check(
            "deployments",
            Some(self.cap(Counted::Deployments)),
            used.deployments,
            requested.deployments,
            |v| v,
        )?;
        let b = &self.borrowing;
        let gpus = with_borrowing(self.gpus.map(|g| g.0), b.gpus.map(|g| g.0)).map(GpuMilli);
        let cpu = with_borrowing(self.cpu.map(|c| c.0), b.cpu.map(|c| c.0)).map(CpuMillis);
        let memory = with_borrowing(self.memory.map(|m| m.0), b.memory.map(|m| m.0)).map(ByteSize);
        check("gpus", gpus, used.gpus, requested.gpus, |v| v.0)?;
        check(
            "gpu_memory",
            self.gpu_memory,
            used.gpu_memory,
            requested.gpu_memory,
            |v| v.0,
        )?;
        check("cpu", cpu, used.cpu, requested.cpu, |v| v.0)?;
        check("memory", memory, used.memory, requested.memory, |v| v.0)?;
        check(
            "storage",
            self.storage,
            used.storage,
            requested.storage,
            |v| v.0,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_names_the_broken_one() {
        let quota = Quota {
            gpus: Some(GpuMilli(4000)),
            ..Quota::default()
        };
        let one = ResourceUsage {
            gpus: GpuMilli(1000),
            deployments: 1,
            ..Default::default()
        };
        let three = ResourceUsage {
            gpus: GpuMilli(3000),
            deployments: 3,
            ..Default::default()
        };
        assert_eq!(quota.admit(&three, &one), Ok(()));
        let four = three.saturating_add(one);
        let err = quota.admit(&four, &one).unwrap_err();
        assert_eq!(err.resource, "gpus");
        assert_eq!(
            (
                err.requested.as_str(),
                err.used.as_str(),
                err.limit.as_str()
            ),
            ("1", "4", "4")
        );
        assert_eq!(Quota::default().admit(&four, &four), Ok(()));
    }

    #[test]
    fn borrowing_is_admitted_on_top_of_the_guarantee() {
        let gpus = |n: u64| ResourceUsage {
            gpus: GpuMilli(n * 1000),
            ..Default::default()
        };
        let quota = Quota {
            gpus: Some(GpuMilli(2000)),
            borrowing: Borrowing {
                gpus: Some(GpuMilli(2000)),
                ..Borrowing::default()
            },
            ..Quota::default()
        };
        assert_eq!(quota.admit(&gpus(2), &gpus(2)), Ok(()));
        let err = quota.admit(&gpus(2), &gpus(3)).unwrap_err();
        assert_eq!(err.limit, GpuMilli(4000).to_string());
        // Borrowing alone does not limit a tenant with no guarantee set.
        let open = Quota {
            borrowing: quota.borrowing.clone(),
            ..Quota::default()
        };
        assert_eq!(open.admit(&gpus(100), &gpus(100)), Ok(()));
        let heavy = Quota {
            fair_share_weight: Some(0),
            ..Quota::default()
        };
        assert!(heavy.validate().is_err());
    }

    #[test]
    fn object_counts_have_default_caps_the_quota_can_raise() {
        let quota = Quota::default();
        assert_eq!(quota.admit_one(Counted::Models, 99), Ok(()));
        let err = quota.admit_one(Counted::Models, 100).unwrap_err();
        assert_eq!(
            (err.resource.as_str(), err.used.as_str(), err.limit.as_str()),
            ("models", "100", "100")
        );
        assert!(quota.admit_one(Counted::Watches, 32).is_err());
        let raised = Quota {
            keys: Some(1000),
            ..Quota::default()
        };
        assert_eq!(raised.admit_one(Counted::Keys, 500), Ok(()));
        let many = ResourceUsage {
            deployments: 100,
            ..Default::default()
        };
        let one = ResourceUsage {
            deployments: 1,
            ..Default::default()
        };
        assert_eq!(
            quota.admit(&many, &one).unwrap_err().resource,
            "deployments"
        );
    }
}
