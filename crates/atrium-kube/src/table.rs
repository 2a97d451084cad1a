//! `Table` output: what `kubectl get` prints, with the columns upstream
//! prints for each kind.

use serde_json::{json, Value};

use crate::meta::age;
use crate::resource::ResourceType;

/// How a row carries its object: `includeObject=None|Metadata|Object`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

fn column(name: &str, ty: &str, format: &str, description: &str) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": 0})
}

fn count(obj: &Value, field: &str) -> usize {
    let len = |f: &str| obj.get(f).and_then(Value::as_object).map_or(0, |m| m.len());
    if field == "data" {
        len("data") + len("binaryData")
    } else {
        obj.get(field).and_then(Value::as_array).map_or(0, Vec::len)
    }
}

/// The kind's own columns between Name and Age, and each object's cells
/// for them.
fn middle(r: &ResourceType, obj: &Value) -> Vec<(Value, Value)> {
    let text = |p: &str| json!(obj.pointer(p).and_then(Value::as_str).unwrap_or(""));
    match r.builtin_kind() {
        "Namespace" => vec![(
            column("Status", "string", "", "The status of the namespace"),
            text("/status/phase"),
        )],
        "ConfigMap" => vec![(
            column("Data", "integer", "", "Number of entries in the data"),
            json!(count(obj, "data")),
        )],
        "Secret" => vec![
            (
                column("Type", "string", "", "The type of the secret"),
                text("/type"),
            ),
            (
                column("Data", "integer", "", "Number of entries in the data"),
                json!(count(obj, "data")),
            ),
        ],
        "Pod" => {
            let ready = obj
                .pointer("/status/containerStatuses/0/ready")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let restarts = obj
                .pointer("/status/containerStatuses/0/restartCount")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            vec![
                (
                    column(
                        "Ready",
                        "string",
                        "",
                        "The aggregate readiness state of this pod for accepting traffic.",
                    ),
                    json!(format!("{}/1", u8::from(ready))),
                ),
                (
                    column(
                        "Status",
                        "string",
                        "",
                        "The aggregate status of the containers in this pod.",
                    ),
                    json!(crate::pod::status_word(obj)),
                ),
                (
                    column(
                        "Restarts",
                        "string",
                        "",
                        "The number of times the containers in this pod have been restarted.",
                    ),
                    json!(restarts.to_string()),
                ),
            ]
        }
        "Deployment" => {
            let n = |p: &str| obj.pointer(p).and_then(Value::as_u64).unwrap_or(0);
            vec![
                (
                    column("Ready", "string", "", "Number of the pod with ready state"),
                    json!(format!("{}/{}", n("/status/readyReplicas"), n("/spec/replicas"))),
                ),
                (
                    column("Up-to-date", "integer", "", "Total number of non-terminated pods targeted by this deployment that have the desired template spec."),
                    json!(n("/status/updatedReplicas")),
                ),
                (
                    column("Available", "integer", "", "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment."),
                    json!(n("/status/availableReplicas")),
                ),
            ]
        }
        "ReplicaSet" => {
            let n = |p: &str| obj.pointer(p).and_then(Value::as_u64).unwrap_or(0);
            vec![
                (
                    column("Desired", "integer", "", "Number of desired pods"),
                    json!(n("/spec/replicas")),
                ),
                (
                    column("Current", "integer", "", "Number of actual replicas"),
                    json!(n("/status/replicas")),
                ),
                (
                    column("Ready", "integer", "", "Number of ready replicas"),
                    json!(n("/status/readyReplicas")),
                ),
            ]
        }
        "Job" => {
            let n = |p: &str| obj.pointer(p).and_then(Value::as_u64);
            let condition = |kind: &str| {
                obj.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|c| c.iter().any(|c| c["type"] == kind && c["status"] == "True"))
            };
            let status = if condition("Complete") {
                "Complete"
            } else if condition("Failed") {
                "Failed"
            } else {
                "Running"
            };
            vec![
                (column("Status", "string", "", "Status of the job."), json!(status)),
                (
                    column("Completions", "string", "", "The desired number of successfully finished pods the job should be run with."),
                    json!(format!(
                        "{}/{}",
                        n("/status/succeeded").unwrap_or(0),
                        n("/spec/completions").unwrap_or(1)
                    )),
                ),
            ]
        }
        "Service" => {
            let ip = |p: &str| {
                let v = obj.pointer(p).and_then(Value::as_str).unwrap_or("");
                json!(if v.is_empty() { "<none>" } else { v })
            };
            vec![
                (
                    column("Type", "string", "", "The type of service."),
                    text("/spec/type"),
                ),
                (
                    column(
                        "Cluster-IP",
                        "string",
                        "",
                        "The cluster IP address of the service.",
                    ),
                    ip("/spec/clusterIP"),
                ),
                (
                    column(
                        "External-IP",
                        "string",
                        "",
                        "The external IP addresses of the service.",
                    ),
                    json!("<none>"),
                ),
                (
                    column("Port(s)", "string", "", "The ports the service listens on."),
                    json!(crate::service::ports_column(obj)),
                ),
            ]
        }
        "Endpoints" => vec![(
            column("Endpoints", "string", "", "Endpoints of the service."),
            json!(crate::service::endpoints_column(obj)),
        )],
        "InferenceService" => vec![
            (
                column(
                    "Model",
                    "string",
                    "",
                    "The model name a client asks the gateway for.",
                ),
                text("/status/model"),
            ),
            (
                column("Ready", "string", "", "Whether the deployment serves."),
                text("/status/conditions/0/status"),
            ),
            (
                column("State", "string", "", "The deployment's state."),
                text("/status/state"),
            ),
        ],
        "Node" => vec![
            (
                column("Status", "string", "", "The status of the node"),
                json!(crate::node::status_word(obj)),
            ),
            (
                column("Roles", "string", "", "The roles of the node"),
                json!("<none>"),
            ),
        ],
        "StatefulSet" => {
            let n = |p: &str| obj.pointer(p).and_then(Value::as_u64).unwrap_or(0);
            vec![(
                column("Ready", "string", "", "Number of the pod with ready state"),
                json!(format!(
                    "{}/{}",
                    n("/status/readyReplicas"),
                    n("/spec/replicas")
                )),
            )]
        }
        "ServiceAccount" => vec![(
            column("Secrets", "integer", "", "Number of secrets"),
            json!(count(obj, "secrets")),
        )],
        _ => Vec::new(),
    }
}

/// The kind's columns after Age (a node's version).
fn after_age(r: &ResourceType, obj: &Value) -> Vec<(Value, Value)> {
    match r.builtin_kind() {
        "Node" => vec![(
            column(
                "Version",
                "string",
                "",
                "Kubelet Version reported by the node.",
            ),
            json!(obj
                .pointer("/status/nodeInfo/kubeletVersion")
                .and_then(Value::as_str)
                .unwrap_or("")),
        )],
        "ResourceQuota" => {
            // `used/hard` of each limit, as upstream prints them.
            let pairs = |limits: bool| {
                let hard = obj.pointer("/status/hard").and_then(Value::as_object);
                hard.into_iter()
                    .flatten()
                    .filter(|(k, _)| k.starts_with("limits.") == limits)
                    .map(|(k, h)| {
                        let used = obj
                            .pointer(&format!("/status/used/{}", k.replace('/', "~1")))
                            .and_then(Value::as_str)
                            .unwrap_or("0");
                        format!("{k}: {used}/{}", h.as_str().unwrap_or(""))
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                (
                    column(
                        "Request",
                        "string",
                        "",
                        "Quota requests and what is used of them.",
                    ),
                    json!(pairs(false)),
                ),
                (
                    column(
                        "Limit",
                        "string",
                        "",
                        "Quota limits and what is used of them.",
                    ),
                    json!(pairs(true)),
                ),
            ]
        }
        _ => Vec::new(),
    }
}

/// Seconds from an RFC 3339 time to `now` (Unix seconds).
fn seconds_since(created: &str, now: i64) -> i64 {
    time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
        .map_or(0, |t| now - t.unix_timestamp())
}

/// The Table of `objects` (each already carrying its resourceVersion).
pub fn table(
    r: &ResourceType,
    objects: &[Value],
    resource_version: i64,
    continue_token: Option<&str>,
    include: Include,
    now: i64,
) -> Value {
    if let Some(custom) = r.custom.as_ref().filter(|c| !c.columns.is_empty()) {
        return with_rows(
            custom_table(&custom.columns, objects, include, now),
            resource_version,
            continue_token,
        );
    }
    let sample = objects.first().cloned().unwrap_or(json!({}));
    let mut columns = vec![column(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
    )];
    columns.extend(middle(r, &sample).into_iter().map(|(c, _)| c));
    columns.push(column(
        "Age",
        "string",
        "",
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    ));
    columns.extend(after_age(r, &sample).into_iter().map(|(c, _)| c));
    let rows: Vec<Value> = objects
        .iter()
        .map(|obj| {
            let mut cells = vec![json!(obj
                .pointer("/metadata/name")
                .cloned()
                .unwrap_or(json!("")))];
            cells.extend(middle(r, obj).into_iter().map(|(_, v)| v));
            let created = obj
                .pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or("");
            cells.push(json!(age(seconds_since(created, now))));
            cells.extend(after_age(r, obj).into_iter().map(|(_, v)| v));
            json!({"cells": cells, "object": row_object(obj, include)})
        })
        .collect();
    with_rows((columns, rows), resource_version, continue_token)
}

/// What a row carries of its object.
fn row_object(obj: &Value, include: Include) -> Value {
    match include {
        Include::None => Value::Null,
        Include::Metadata => json!({"kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}),
        Include::Object => obj.clone(),
    }
}

/// A custom type's own columns, as its definition's printer columns say:
/// Name, then each (a `date` shown as an age), as upstream prints them.
fn custom_table(
    printer: &[crate::crd::Column],
    objects: &[Value],
    include: Include,
    now: i64,
) -> (Vec<Value>, Vec<Value>) {
    let mut columns = vec![column(
        "Name",
        "string",
        "name",
        "Name must be unique within a namespace.",
    )];
    for c in printer {
        let mut def = column(&c.name, &c.kind, &c.format, &c.description);
        def["priority"] = json!(c.priority);
        columns.push(def);
    }
    let rows = objects
        .iter()
        .map(|obj| {
            let mut cells = vec![obj.pointer("/metadata/name").cloned().unwrap_or(json!(""))];
            for c in printer {
                let v = crate::crd::at_path(obj, &c.json_path).cloned();
                cells.push(match (c.kind.as_str(), v) {
                    ("date", Some(Value::String(t))) => json!(age(seconds_since(&t, now))),
                    (_, Some(v)) => v,
                    (_, None) => Value::Null,
                });
            }
            json!({"cells": cells, "object": row_object(obj, include)})
        })
        .collect();
    (columns, rows)
}

fn with_rows(
    (columns, rows): (Vec<Value>, Vec<Value>),
    resource_version: i64,
    continue_token: Option<&str>,
) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::find;

    #[test]
    fn configmaps_show_their_data_count_and_age() {
        let cm = find("", "v1", "configmaps").unwrap();
        let obj = json!({"metadata": {"name": "cfg", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "data": {"a": "1", "b": "2"}});
        let now = 1_767_225_600 + 90;
        let t = table(cm, &[obj], 7, None, Include::Metadata, now);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Data", "Age"]);
        assert_eq!(t["rows"][0]["cells"], json!(["cfg", 2, "90s"]));
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
