//! Atrium on Kubernetes (`deploy/kubernetes`): every object parses as its
//! Kubernetes v1.37 type (k8s-openapi 0.29) with no field lost on the way
//! (a misspelt field fails), the kustomization names every file, and the
//! real kubectl applies the kinds Atrium's own tenant Kubernetes API serves
//! (Namespace, ServiceAccount, Deployment, Service, and CloudNativePG's
//! `Cluster` through its definition) with `--dry-run=server` against it.
//! PersistentVolumeClaim and DaemonSet are checked by type only: a tenant
//! cluster serves neither. No real cluster is reachable here.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Service, ServiceAccount};
use serde_json::Value;

mod common;

use common::kubectl::{fixture, kubectl, write, Kube};

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// Every YAML document of `file`, as JSON (PyYAML, which the tests'
/// Python packages bring).
fn documents(file: &Path) -> Vec<Value> {
    let docs = common::python_json(
        "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        &[file.as_os_str()],
    );
    serde_json::from_value(docs).unwrap()
}

/// `doc` read as `T` and written back: the same document, or a field of it
/// is not one of `T`'s.
fn round_trips<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{}: {e}", doc["metadata"]["name"]));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, doc, "a field was lost: not part of its type");
}

fn all_documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(manifests())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        for d in documents(&f) {
            docs.push((name.clone(), d));
        }
    }
    docs
}

#[test]
fn every_object_is_its_kubernetes_type_and_the_kustomization_names_every_file() {
    let docs = all_documents();
    let mut kinds = Vec::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap();
        kinds.push(kind.to_string());
        match kind {
            "Namespace" => round_trips::<Namespace>(doc),
            "ServiceAccount" => round_trips::<ServiceAccount>(doc),
            "Deployment" => round_trips::<Deployment>(doc),
            "DaemonSet" => round_trips::<DaemonSet>(doc),
            "Service" => round_trips::<Service>(doc),
            "PersistentVolumeClaim" => round_trips::<PersistentVolumeClaim>(doc),
            "Cluster" => {
                assert_eq!(doc["apiVersion"], "postgresql.cnpg.io/v1");
                assert_eq!(doc["spec"]["instances"], 3, "{file}");
                assert_eq!(doc["spec"]["minSyncReplicas"], 1, "synchronous standby");
            }
            "Kustomization" => {
                let mut named: Vec<String> = doc["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect();
                named.sort();
                let mut present: Vec<String> = docs
                    .iter()
                    .map(|(f, _)| f.clone())
                    .filter(|f| f != "kustomization.yaml")
                    .collect();
                present.dedup();
                assert_eq!(named, present);
            }
            other => panic!("{file}: unexpected kind {other}"),
        }
        if kind != "Kustomization" && kind != "Namespace" {
            assert_eq!(
                doc["metadata"]["namespace"], "atrium-system",
                "{file} {kind}"
            );
        }
    }
    for want in ["Deployment", "DaemonSet", "Service", "Cluster"] {
        assert!(kinds.iter().any(|k| k == want), "no {want}");
    }
    // Three servers, each with the database URL and probes.
    let server = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "atrium-server")
        .unwrap();
    assert_eq!(server["spec"]["replicas"], 3);
    let container = &server["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["env"][0]["name"], "ATRIUM_DATABASE_URL");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    // Agents join under their node's name; privileged, with reasons in the file.
    let agent = docs
        .iter()
        .map(|(_, d)| d)
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let agent_container = &agent["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(agent_container["env"][0]["name"], "ATRIUM_NODE_NAME");
    assert_eq!(
        agent_container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let text = std::fs::read_to_string(manifests().join("agent.yaml")).unwrap();
    assert!(text.contains("Why it is privileged"));
}

const CNPG_DEFINITION: &str = "\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: clusters.postgresql.cnpg.io
spec:
  group: postgresql.cnpg.io
  scope: Namespaced
  names:
    plural: clusters
    singular: cluster
    kind: Cluster
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
";

#[test]
fn kubectl_applies_what_a_tenant_cluster_serves_with_a_server_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path());
    let kube = Kube::new(&kubectl(), dir.path(), "acme.kubeconfig", &f.config);
    kube.ok(&[
        "apply",
        "-f",
        manifests().join("namespace.yaml").to_str().unwrap(),
    ]);
    let definition = write(dir.path(), "cnpg.yaml", CNPG_DEFINITION);
    kube.ok(&["apply", "-f", definition.to_str().unwrap()]);
    kube.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/clusters.postgresql.cnpg.io",
    ]);
    // Built-in kinds, then the custom one: kubectl validates each against
    // the schema the cluster publishes for it.
    let docs: Vec<Value> = all_documents().into_iter().map(|(_, d)| d).collect();
    let mut outputs = String::new();
    for kinds in [
        &["ServiceAccount", "Deployment", "Service"][..],
        &["Cluster"][..],
    ] {
        let items: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"].as_str().is_some_and(|k| kinds.contains(&k)))
            .collect();
        assert!(!items.is_empty(), "{kinds:?}");
        // JSON documents in one YAML stream (YAML takes JSON as it is).
        let stream: Vec<String> = items.iter().map(|d| d.to_string()).collect();
        let list = write(dir.path(), "served.yaml", &stream.join("\n---\n"));
        outputs.push_str(&kube.ok(&["apply", "--dry-run=server", "-f", list.to_str().unwrap()]));
    }
    for name in ["atrium-server", "atrium-gateway-eu-1", "atrium-db"] {
        assert!(outputs.contains(name), "{outputs}");
    }
    assert!(outputs.contains("(server dry run)"), "{outputs}");
    // A dry run writes nothing.
    let (ok, text) = kube.run(&["-n", "atrium-system", "get", "deployment", "atrium-server"]);
    assert!(!ok && text.contains("NotFound"), "{text}");
}
