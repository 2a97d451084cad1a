//! Execs: a command a tenant runs inside one of its running containers
//! (`atrium exec WORKLOAD -- CMD`, like `kubectl exec` without a
//! terminal). The control plane resolves the replica and node; that node's
//! agent runs it in the container, as the container's own user, with its
//! limits, and reports the exit code and the output (bounded).

use serde::{Deserialize, Serialize};

use crate::lifecycle::LifecycleState;
use crate::workload::{MAX_ARGS, MAX_STRING};
use crate::FieldErrors;

/// Bytes of stdout, and of stderr, an exec keeps; the rest is dropped and
/// the status says so.
pub const MAX_EXEC_OUTPUT: usize = 64 * 1024;
/// Longest an exec may run, in seconds.
pub const MAX_EXEC_SECONDS: u32 = 600;

/// What a tenant asks: `POST /v1/workloads/{workload}/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments, run directly (no shell).
    pub command: Vec<String>,
    /// The replica (job index) to run in; the lowest-numbered running one
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<u32>,
    /// Killed after this many seconds [default: 30].
    #[serde(default = "thirty")]
    pub timeout_seconds: u32,
}

fn thirty() -> u32 {
    30
}

impl ExecRequest {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if self.command.is_empty() || self.command.len() > MAX_ARGS {
            errors.push("command", format!("must hold 1 to {MAX_ARGS} strings"));
        }
        if let Some(i) = self
            .command
            .iter()
            .position(|s| s.len() > MAX_STRING || s.contains('\0'))
        {
            errors.push(
                format!("command[{i}]"),
                format!("must be at most {MAX_STRING} bytes, without NUL"),
            );
        }
        if self
            .command
            .first()
            .is_some_and(|c| c.is_empty() || c.starts_with('-'))
        {
            errors.push(
                "command[0]",
                "must name a program (not empty, not an option)",
            );
        }
        if !(1..=MAX_EXEC_SECONDS).contains(&self.timeout_seconds) {
            errors.push(
                "timeout_seconds",
                format!("must be 1 to {MAX_EXEC_SECONDS}"),
            );
        }
        errors.into_result()
    }
}

/// An exec as the control plane resolved it: where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// The workload's id, and the placement (replica) and node it runs on.
    pub workload: String,
    pub placement: String,
    pub node: String,
    pub command: Vec<String>,
    pub timeout_seconds: u32,
    /// Instead of running a command, read the replica's log on its node
    /// (its last `MAX_EXEC_OUTPUT` bytes, as stdout).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log: bool,
}

impl ExecSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        if self.log {
            let mut errors = FieldErrors::new();
            if !self.command.is_empty() {
                errors.push("command", "a log read runs no command");
            }
            return errors.into_result();
        }
        ExecRequest {
            command: self.command.clone(),
            replica: None,
            timeout_seconds: self.timeout_seconds,
        }
        .validate()
    }
}

/// What came of it: `pending` until the node runs it, then `succeeded`
/// (exit 0) or `failed` (another exit, a timeout, or no container to run
/// it in, with the reason).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecStatus {
    pub state: LifecycleState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
    /// Output past [`MAX_EXEC_OUTPUT`] bytes (of either stream) was dropped.
    #[serde(default)]
    pub truncated: bool,
}

impl ExecStatus {
    pub fn pending() -> ExecStatus {
        ExecStatus {
            state: LifecycleState::Pending,
            reason: "waiting for the node's agent".into(),
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
        }
    }

    /// Whether the node has run it (or given up).
    pub fn done(&self) -> bool {
        matches!(
            self.state,
            LifecycleState::Succeeded | LifecycleState::Failed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_checked_before_it_reaches_a_node() {
        let ask = |command: &[&str], timeout_seconds| ExecRequest {
            command: command.iter().map(|s| s.to_string()).collect(),
            replica: None,
            timeout_seconds,
        };
        assert!(ask(&["ls", "-l"], 30).validate().is_ok());
        for bad in [
            ask(&[], 30),
            ask(&[""], 30),
            ask(&["--user=0", "id"], 30),
            ask(&["a\0b"], 30),
            ask(&["ls"], 0),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(ask(&["ls"], MAX_EXEC_SECONDS + 1).validate().is_err());
    }
}
