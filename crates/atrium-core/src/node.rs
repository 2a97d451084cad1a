//! Nodes: machines at a site, with their capacity and GPU inventory
//! (model, memory, MIG capability, NVLink domain, network rail).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::quantity::{ByteSize, CpuMillis};
use crate::FieldErrors;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeCapacity {
    #[schema(value_type = String, example = "64")]
    pub cpu: CpuMillis,
    #[schema(value_type = String, example = "512Gi")]
    pub memory: ByteSize,
    #[serde(default)]
    #[schema(value_type = String, example = "2Ti")]
    pub disk: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// Index of the device on the node (as NVML numbers it).
    pub index: u32,
    /// Device UUID, when known (`GPU-...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Marketing model name, e.g. `H100-80GB`.
    pub model: String,
    #[schema(value_type = String, example = "80Gi")]
    pub memory: ByteSize,
    #[serde(default)]
    pub mig_capable: bool,
    /// GPUs sharing an NVLink domain can run one multi-GPU replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvlink_domain: Option<String>,
    /// Network rail (leaf group) the GPU's NIC attaches to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rail: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Accepts new work.
    Ready,
    /// Keeps what it runs, accepts nothing new.
    Cordoned,
    /// Moving its work elsewhere.
    Draining,
    /// Not reachable or not reporting.
    Offline,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Name of the site the node is in.
    pub site: String,
    pub capacity: NodeCapacity,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_node_state")]
    pub state: NodeState,
    /// How it carries its tenants' overlays; absent: it carries none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<crate::overlay::NodeOverlay>,
}

fn default_node_state() -> NodeState {
    NodeState::Ready
}

impl NodeSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        errors.check("site", crate::name::validate_name(&self.site));
        if self.capacity.cpu.0 == 0 {
            errors.push("capacity.cpu", "must be more than zero");
        }
        if self.capacity.memory.0 == 0 {
            errors.push("capacity.memory", "must be more than zero");
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, gpu) in self.gpus.iter().enumerate() {
            if !seen.insert(gpu.index) {
                errors.push(
                    format!("gpus[{i}].index"),
                    format!("index {} repeats", gpu.index),
                );
            }
            if gpu.model.trim().is_empty() {
                errors.push(format!("gpus[{i}].model"), "must not be empty");
            }
            if gpu.memory.0 == 0 {
                errors.push(format!("gpus[{i}].memory"), "must be more than zero");
            }
        }
        for key in self.labels.keys() {
            if key.is_empty() || key.len() > 63 {
                errors.push(
                    format!("labels.{key}"),
                    "label keys must be 1 to 63 characters",
                );
            }
        }
        if let Some(overlay) = &self.overlay {
            overlay.validate(&mut errors);
        }
        errors.into_result()
    }
}
