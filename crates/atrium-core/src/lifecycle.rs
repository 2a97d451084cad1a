//! The lifecycle every stateful resource goes through, always paired with a
//! human-readable reason so an operator never has to guess why.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleState {
    Pending,
    Provisioning,
    Running,
    Degraded,
    Stopping,
    Stopped,
    Failed,
    Deleting,
    /// A job (or one of its replicas) ran to completion.
    Succeeded,
}

/// Observed state of a resource, written by controllers, never by clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Status {
    pub state: LifecycleState,
    /// Why the resource is in this state, e.g. "waiting for placement".
    pub reason: String,
    /// A deployment's: how many replicas the autoscaler wants now
    /// (within `replicas.min`..`max`). Kept here, not in the spec, so a
    /// tenant's update never fights the autoscaler, and a restarted
    /// server resumes at the same scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<u32>,
}

impl Status {
    pub fn new(state: LifecycleState, reason: impl Into<String>) -> Self {
        Self {
            state,
            reason: reason.into(),
            desired_replicas: None,
        }
    }
}
