//! What `kubectl exec` speaks: the `v5.channel.k8s.io` (and `v4`)
//! WebSocket subprotocol. Each binary message starts with the number of
//! its stream — 0 stdin, 1 stdout, 2 stderr, 3 the outcome as a `Status`
//! object, 4 terminal resizes; v5 adds 255, closing one stream — and the
//! server sends the outcome last, then closes.
//!
//! Tenant clusters run an exec's command to completion on the pod's node
//! and send its output after (no stdin, no tty): the query options a
//! request may carry are checked here before any connection is upgraded.

use serde_json::{json, Value};

use crate::KubeError;

/// The subprotocols served, best first. Both carry the outcome as a
/// `Status`; older ones (a bare exit message) are not served.
pub const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;

/// One exec request's options, from its query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    pub container: Option<String>,
    pub stdout: bool,
    pub stderr: bool,
}

impl ExecOptions {
    /// Reads `command=…&command=…&container=…&stdout=true…`, refusing what
    /// a tenant cluster cannot do with a message that says what to drop.
    pub fn parse(query: &[(String, String)]) -> Result<ExecOptions, KubeError> {
        let flag = |name: &str| {
            query
                .iter()
                .any(|(k, v)| k == name && matches!(v.as_str(), "true" | "1"))
        };
        if flag("stdin") || flag("tty") {
            return Err(KubeError::bad_request(
                "exec in a tenant cluster runs the command to completion without stdin or a \
                 terminal: drop -i and -t (kubectl exec POD -- COMMAND)",
            ));
        }
        let command: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "command")
            .map(|(_, v)| v.clone())
            .collect();
        if command.is_empty() {
            return Err(KubeError::bad_request(
                "you must specify at least one command for the container",
            ));
        }
        let container = query
            .iter()
            .find(|(k, _)| k == "container")
            .map(|(_, v)| v.clone());
        Ok(ExecOptions {
            command,
            container,
            stdout: flag("stdout"),
            stderr: flag("stderr"),
        })
    }
}

/// A message on stream `stream`.
pub fn frame(stream: u8, data: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(data.len() + 1);
    message.push(stream);
    message.extend_from_slice(data);
    message
}

/// The outcome sent on [`ERROR`]: `Success`; a non-zero exit code the way
/// kubectl reads it (it exits with the same code); or a failure that never
/// ran to an exit code, with why.
pub fn outcome(command: &[String], exit_code: Option<i32>, why: &str) -> Value {
    match exit_code {
        Some(0) => json!({"metadata": {}, "status": "Success"}),
        Some(code) => json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        None => json!({
            "metadata": {},
            "status": "Failure",
            "message": why,
            "reason": "InternalError",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kubectls_exec_query_is_read_in_order() {
        let o = ExecOptions::parse(&query(&[
            ("command", "cat"),
            ("command", "/etc/hostname"),
            ("container", "main"),
            ("stderr", "true"),
            ("stdout", "true"),
        ]))
        .unwrap();
        assert_eq!(o.command, ["cat", "/etc/hostname"]);
        assert_eq!(o.container.as_deref(), Some("main"));
        assert!(o.stdout && o.stderr);
    }

    #[test]
    fn interactive_or_empty_execs_are_refused_with_what_to_drop() {
        let e = ExecOptions::parse(&query(&[("command", "sh"), ("stdin", "true")])).unwrap_err();
        assert_eq!(e.code, 400);
        assert!(e.message.contains("drop -i and -t"), "{}", e.message);
        assert!(ExecOptions::parse(&query(&[("command", "sh"), ("tty", "1")])).is_err());
        assert!(ExecOptions::parse(&query(&[("stdout", "true")])).is_err());
    }

    #[test]
    fn outcomes_carry_the_exit_code_kubectl_exits_with() {
        let cmd = ["sh".to_string(), "-c".to_string(), "exit 3".to_string()];
        assert_eq!(outcome(&cmd, Some(0), "")["status"], "Success");
        let failed = outcome(&cmd, Some(3), "");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let lost = outcome(&cmd, None, "the container is gone");
        assert_eq!(lost["message"], "the container is gone");
        assert_eq!(frame(STDOUT, b"hi"), b"\x01hi");
    }
}
