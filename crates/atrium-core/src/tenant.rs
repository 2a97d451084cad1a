//! Tenants: the customers of the cloud, with their residency policy,
//! isolation tier, quota and priority.

use serde::{Deserialize, Serialize};

use crate::quota::Quota;
use crate::site::validate_jurisdiction;
use crate::FieldErrors;

/// Where a tenant's requests, replicas and bytes may be processed and kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum Residency {
    /// Any site.
    Any,
    /// Only sites whose jurisdiction is in this set.
    Only { jurisdictions: Vec<String> },
}

impl Residency {
    /// Whether a site in `jurisdiction` may serve this tenant.
    pub fn allows(&self, jurisdiction: &str) -> bool {
        match self {
            Residency::Any => true,
            Residency::Only { jurisdictions } => jurisdictions.iter().any(|j| j == jurisdiction),
        }
    }
}

/// How much hardware a tenant shares with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationTier {
    /// May share nodes and GPUs (fractions, MIG) with other tenants.
    Shared,
    /// No other tenant on the same physical GPU.
    DedicatedGpu,
    /// No other tenant on the same node.
    DedicatedNode,
}

/// How the gateways record a tenant's usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageRecords {
    /// One record per (deployment, site, replica, minute, batch, flag)
    /// with its request count and token sums: what billing needs, at a
    /// cost to the control plane that does not grow with the requests.
    #[default]
    Aggregated,
    /// Also one record per request, with its `x-request-id`: for a tenant
    /// that reconciles requests one by one.
    PerRequest,
}

impl UsageRecords {
    fn is_default(&self) -> bool {
        *self == UsageRecords::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    #[serde(default = "default_residency")]
    pub residency: Residency,
    #[serde(default = "default_isolation")]
    pub isolation: IsolationTier,
    #[serde(default)]
    pub quota: Quota,
    /// Higher runs first and may preempt lower; 0 to 1000.
    #[serde(default)]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "UsageRecords::is_default")]
    pub usage_records: UsageRecords,
}

impl Default for TenantSpec {
    /// Anywhere, sharing hardware, no quota, priority 0: what a tenant
    /// created with a name alone gets.
    fn default() -> TenantSpec {
        TenantSpec {
            display_name: String::new(),
            residency: default_residency(),
            isolation: default_isolation(),
            quota: Quota::default(),
            priority: 0,
            usage_records: UsageRecords::default(),
        }
    }
}

fn default_residency() -> Residency {
    Residency::Any
}

fn default_isolation() -> IsolationTier {
    IsolationTier::Shared
}

impl TenantSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if self.display_name.len() > 256 {
            errors.push("display_name", "must be at most 256 characters");
        }
        if let Residency::Only { jurisdictions } = &self.residency {
            if jurisdictions.is_empty() {
                errors.push(
                    "residency.jurisdictions",
                    "must name at least one jurisdiction; use {\"policy\":\"any\"} for none",
                );
            }
            for (i, j) in jurisdictions.iter().enumerate() {
                errors.check(
                    &format!("residency.jurisdictions[{i}]"),
                    validate_jurisdiction(j),
                );
            }
        }
        if let Err(e) = self.quota.validate() {
            errors.extend(e.nest("quota"));
        }
        if !(0..=1000).contains(&self.priority) {
            errors.push(
                "priority",
                format!("must be between 0 and 1000, got {}", self.priority),
            );
        }
        errors.into_result()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn usage_records_are_aggregated_unless_asked_and_nothing_else_is_taken() {
        let spec: TenantSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec.usage_records, UsageRecords::Aggregated);
        assert_eq!(
            serde_json::to_string(&spec.usage_records).unwrap(),
            "\"aggregated\""
        );
        assert!(!serde_json::to_string(&spec)
            .unwrap()
            .contains("usage_records"));
        let spec: TenantSpec = serde_json::from_str(r#"{"usage_records":"per_request"}"#).unwrap();
        assert_eq!(spec.usage_records, UsageRecords::PerRequest);
        for bad in [r#"{"usage_records":"all"}"#, r#"{"usage_records":1}"#] {
            assert!(serde_json::from_str::<TenantSpec>(bad).is_err(), "{bad}");
        }
    }
}
