//! `pods/{name}/exec` (`kubectl exec POD -- COMMAND`): everything that can
//! be refused — no such pod, no running container, options a tenant
//! cluster does not serve — is refused before the WebSocket upgrade, as
//! an ordinary `Status`; after it, the command runs on the pod's node
//! through the agent, the way `atrium exec` does, and its output and
//! outcome go back on the `remotecommand` streams.
//!
//! Running a command is a write: a viewer key, which may read the pod,
//! may not exec into it (`serve` asks for write access).

use atrium_core::exec::{ExecRequest, MAX_EXEC_SECONDS};
use atrium_kube::remotecommand::{self, ExecOptions, ERROR, STDERR, STDOUT};
use atrium_kube::KubeError;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde_json::Value;

use super::objects::Call;
use super::subresources::pod_workload;
use super::KubeResponse;
use crate::exec::{on_node, running_replica, Ask};

pub(super) async fn pod_exec(call: &Call<'_>) -> Result<KubeResponse, KubeError> {
    let (state, scope, at, req) = call.parts();
    let name = call.name();
    let options = ExecOptions::parse(&req.query)?;
    // The same rules as `atrium exec`: argv of bounded strings, no NUL,
    // a program first (never something runc could read as an option).
    ExecRequest {
        command: options.command.clone(),
        replica: None,
        timeout_seconds: MAX_EXEC_SECONDS,
    }
    .validate()
    .map_err(|e| KubeError::bad_request(format!("the command cannot run: {e}")))?;
    let (pod, workload) = pod_workload(state, scope, at, name).await?;
    let container = pod
        .body
        .pointer("/spec/containers/0/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if let Some(asked) = options.container.as_deref().filter(|c| *c != container) {
        return Err(KubeError::bad_request(format!(
            "container {asked:?} is not valid for pod {name:?}: its one container is {container:?}"
        )));
    }
    let (placement, node) = running_replica(state, &scope.tenant, &workload, None)
        .await
        .map_err(|_| {
            KubeError::bad_request(format!(
                "container {container:?} in pod {name:?} is not running"
            ))
        })?;
    let Some(upgrade) = req.take_upgrade() else {
        return Err(KubeError::bad_request(
            "exec is served over WebSocket (v5.channel.k8s.io), which kubectl 1.30 and newer \
             speak; SPDY is not served",
        ));
    };
    let (state, tenant) = (state.clone(), scope.tenant.clone());
    let audit = req.audit("kube.pod.exec".into());
    let upgraded =
        upgrade
            .protocols(remotecommand::PROTOCOLS)
            .on_upgrade(move |socket| async move {
                let ask = Ask {
                    tenant: &tenant,
                    workload: &workload,
                    placement: &placement,
                    node: &node,
                    command: options.command.clone(),
                    timeout_seconds: MAX_EXEC_SECONDS,
                };
                let ran = on_node(&state, ask, audit).await;
                // A client that went away has nothing left to be told.
                let _ = answer(socket, &options, ran).await;
            });
    Ok(KubeResponse::Stream(
        axum::response::IntoResponse::into_response(upgraded),
    ))
}

/// Sends the command's output and outcome, then closes.
async fn answer(
    mut socket: WebSocket,
    options: &ExecOptions,
    ran: Result<atrium_core::exec::ExecStatus, crate::error::ApiError>,
) -> Result<(), axum::Error> {
    let send = |stream: u8, data: &[u8]| Message::Binary(remotecommand::frame(stream, data).into());
    let outcome = match ran {
        Ok(status) => {
            if options.stdout && !status.stdout.is_empty() {
                socket.send(send(STDOUT, status.stdout.as_bytes())).await?;
            }
            if options.stderr && !status.stderr.is_empty() {
                socket.send(send(STDERR, status.stderr.as_bytes())).await?;
            }
            remotecommand::outcome(&options.command, status.exit_code, &status.reason)
        }
        Err(e) => remotecommand::outcome(&options.command, None, &e.to_string()),
    };
    socket
        .send(send(ERROR, outcome.to_string().as_bytes()))
        .await?;
    socket
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: "".into(),
        })))
        .await
}
