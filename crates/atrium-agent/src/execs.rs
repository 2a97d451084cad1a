//! Execs: commands tenants run in their containers on this node. The agent
//! follows the execs the control plane addressed to this node and runs
//! each once with `runc exec` in the replica's container — as the
//! container's own user, with no capabilities and no new privileges, in
//! its namespaces and cgroup, so it is held by the replica's limits — then
//! reports the exit code and up to `MAX_EXEC_OUTPUT` bytes of each
//! stream. The command is argv, never a shell line; it follows the
//! container id, where runc reads no more options of its own.
//!
//! An exec that asks for the replica's log (`log: true`, `kubectl logs`)
//! reads the end of its log file instead of running anything.
//!
//! An exec pending when the agent restarts is run then (at least once).

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_api::{Exec, Object};
use atrium_client::{Api, Update};
use atrium_core::exec::{ExecSpec, ExecStatus, MAX_EXEC_OUTPUT};
use atrium_core::lifecycle::LifecycleState;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::runtime::Runc;
use crate::supervisor::Shared;

/// Follows this node's execs and runs each new one, until dropped.
pub async fn run(shared: Arc<Shared>) {
    let started: Arc<Mutex<HashSet<String>>> = Arc::default();
    let node = shared.config.node_name().to_string();
    let api = Api::<Exec>::all(&shared.cp);
    api.follow(move |update| {
        let mut started = started.lock().unwrap_or_else(|p| p.into_inner());
        let new: Vec<Object<Exec>> = match update {
            Update::Snapshot(items) => items,
            Update::Added(e) | Update::Modified(e) => vec![e],
            Update::Deleted(e) => {
                started.remove(&e.id);
                Vec::new()
            }
        };
        for exec in new {
            let done = exec.status.as_ref().is_some_and(ExecStatus::done);
            if exec.spec.node != node || done || !started.insert(exec.id.clone()) {
                continue;
            }
            tokio::spawn(run_one(shared.clone(), exec));
        }
    })
    .await
}

async fn run_one(shared: Arc<Shared>, exec: Object<Exec>) {
    let status = execute(&shared, &exec.spec).await;
    tracing::info!(exec = %exec.id, placement = %exec.spec.placement, state = ?status.state,
        exit_code = ?status.exit_code, "agent: exec ran");
    let api = Api::<Exec>::all(&shared.cp);
    let mut backoff = Duration::from_millis(200);
    for _ in 0..10 {
        match api.replace_status(&exec.id, &status).await {
            Ok(_) => return,
            // Deleted meanwhile: nobody waits for it.
            Err(e) if e.status() == Some(404) => return,
            Err(e) => {
                tracing::warn!(exec = %exec.id, error = %e, "agent: exec report failed; retrying")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn failed(reason: String) -> ExecStatus {
    ExecStatus {
        state: LifecycleState::Failed,
        reason,
        ..ExecStatus::pending()
    }
}

/// The end of replica `id`'s log on this node, as a finished exec.
fn read_log(shared: &Shared, id: &str) -> ExecStatus {
    // An id from the control plane, checked before it becomes a path.
    let safe = id
        .strip_prefix("rep_")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric()));
    if !safe {
        return failed(format!("{id:?} is not a replica id"));
    }
    let path = shared
        .config
        .data_dir
        .join("logs")
        .join(format!("{id}.log"));
    match std::fs::read(&path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(MAX_EXEC_OUTPUT);
            ExecStatus {
                state: LifecycleState::Succeeded,
                reason: String::new(),
                exit_code: Some(0),
                stdout: String::from_utf8_lossy(&bytes[start..]).into_owned(),
                stderr: String::new(),
                truncated: start > 0,
            }
        }
        Err(_) => failed(format!("replica {id} has written no log on this node")),
    }
}

/// Runs the exec in its replica's container and says what came of it.
async fn execute(shared: &Shared, spec: &ExecSpec) -> ExecStatus {
    let id = &spec.placement;
    if spec.log {
        return read_log(shared, id);
    }
    let here = shared.state.read(|s| {
        s.assigned
            .get(id)
            .is_some_and(|a| a.spec.container.is_some())
            && s.running.contains_key(id)
    });
    if !here {
        return failed(format!(
            "replica {id} no longer runs a container on this node"
        ));
    }
    let runc = Runc::for_data_dir(&shared.config.data_dir);
    let child = tokio::process::Command::new(&runc.binary)
        .args(runc.exec_args(id, &spec.command))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return failed(format!("runc: {e}")),
    };
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        return failed("runc's output could not be read".into());
    };
    let limit = Duration::from_secs(u64::from(spec.timeout_seconds));
    let ran = tokio::time::timeout(limit, async {
        let (out, err, exit) = tokio::join!(bounded(out), bounded(err), child.wait());
        (out, err, exit)
    })
    .await;
    let Ok((stdout, stderr, exit)) = ran else {
        // runc passes SIGTERM on to the command; a command that ignores
        // it ends with its container.
        let pid = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(i32::try_from(p).ok()?));
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        return failed(format!("timed out after {}s", spec.timeout_seconds));
    };
    let code = match exit {
        Ok(status) => status.code().unwrap_or(-1),
        Err(e) => return failed(format!("runc: {e}")),
    };
    ExecStatus {
        state: if code == 0 {
            LifecycleState::Succeeded
        } else {
            LifecycleState::Failed
        },
        reason: if code == 0 {
            String::new()
        } else {
            format!("exited with {code}")
        },
        exit_code: Some(code),
        truncated: stdout.1 || stderr.1,
        stdout: stdout.0,
        stderr: stderr.0,
    }
}

/// Reads `stream` to its end, keeping its first `MAX_EXEC_OUTPUT` bytes
/// (as text) and whether more came.
async fn bounded(mut stream: impl AsyncRead + Unpin) -> (String, bool) {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut more = false;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_EXEC_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                more |= n > room;
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), more)
}
