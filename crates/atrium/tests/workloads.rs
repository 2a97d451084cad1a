//! Workloads through the real binary: an image pushed with skopeo runs as
//! a `service` under runc on a root agent — answering on its port through
//! the tenant's network, as the tenant's uid in the tenant's namespace and
//! cgroup, restarted when killed. Another tenant cannot run it; an image
//! that is not there says ErrImagePull; a deleted workload leaves nothing.
//! A gang `job` starts all its workers or none, each seeing only its GPU,
//! and completes; a job that keeps failing fails at its backoff limit.
//! A higher-priority job within its tenant's guarantee evicts a borrower,
//! which is requeued and completes later. A volume keeps one job's output
//! for the next, holds its size, and is zeroed when deleted. (A tenant
//! cluster's pods are `kube_pods.rs`'.)
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::cloud::{
    admin_call_status, container_pids, http_get, require_root_and_runc, uid_of, Cloud,
};
use common::oci::busybox_layout;
use common::{stop, wait_for};
use reqwest::Method;
use serde_json::{json, Value};

/// The tests' tenant network blocks, apart from the isolation tests' and
/// each other's (they run side by side).
const SERVICE_OCTET: u8 = 236;
const JOB_OCTET: u8 = 237;
const VOLUME_OCTET: u8 = 239;
const PREEMPT_OCTET: u8 = 240;

#[test]
fn a_service_runs_its_tenants_image_under_runc_in_the_tenants_sandbox() {
    require_root_and_runc();
    const OCTET: u8 = SERVICE_OCTET;
    let mut cloud = Cloud::start(OCTET);
    let acme = cloud.tenant("acme");
    let globex = cloud.tenant("globex");
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "acme/busybox:1", &acme);
    cloud.push(&build.path().join("oci"), "globex/private:1", &globex);
    cloud.start_agent("2xH100-80GB");
    wait_for("the agent's credential", 30, || {
        cloud.dir.path().join("agent/node.credential").exists()
    });
    // A node pulls only what is placed on it: nothing yet.
    let manifest = "/v2/acme/busybox/manifests/1";
    assert_eq!(
        cloud.node_get(manifest),
        403,
        "a node read an image nothing runs"
    );

    // Another tenant may not name acme's image at all.
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "steal",
            "--image",
            "acme/busybox:1",
            "--",
            "/bin/busybox",
            "true",
        ],
        &globex,
    );
    assert!(!ok && said.contains("spec.image"), "{said}");

    let script = "echo serving as $(/bin/busybox id -u) && \
                  echo hello-from-$(/bin/busybox id -u) > /scratch/index.html && \
                  exec /bin/busybox httpd -f -p 8080 -h /scratch";
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "web",
            "--image",
            "acme/busybox:1",
            "--port",
            "8080",
            "--memory",
            "64Mi",
            "--cpu",
            "0.5",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ],
        &acme,
    );
    assert!(ok, "{said}");
    let mut running = Value::Null;
    wait_for("the service to run", 60, || {
        running = cloud.workload("acme", "web");
        running["status"]["state"] == "running"
    });
    let placement = cloud.placements("acme").into_iter().next().unwrap();
    let status = &placement["status"];
    let isolation = status["isolation"].as_str().unwrap();
    assert!(
        isolation.contains("runtime=runc") && isolation.contains("netns="),
        "{isolation}"
    );
    let addr = status["endpoint"]
        .as_str()
        .unwrap()
        .strip_prefix("tcp://")
        .unwrap()
        .to_string();
    assert!(addr.starts_with(&format!("10.{OCTET}.")), "{addr}");

    // Now that a replica of it is placed there, the node may pull it; still
    // nothing else of any tenant's.
    assert_eq!(cloud.node_get(manifest), 200);
    assert_eq!(cloud.node_get("/v2/globex/private/manifests/1"), 403);
    assert_eq!(cloud.node_get("/v2/acme/busybox/tags/list"), 200);
    let push = cloud.node_call(Method::POST, "/v2/acme/busybox/blobs/uploads/");
    assert_eq!(push, 403, "a node may never push");

    // It answers through the tenant network, as the tenant's uid.
    let page = http_get(&addr, "/index.html").expect("the service answers on its port");
    let id = placement["id"].as_str().unwrap().to_string();
    let pids = container_pids(OCTET, &id);
    assert!(
        !pids.is_empty(),
        "the container runs in the replica's cgroup"
    );
    let uid = uid_of(pids[0]).unwrap();
    assert!(uid >= 2_000_000, "uid {uid} is not a tenant's");
    assert_eq!(page.trim(), format!("hello-from-{uid}"));

    // A command runs in it through its node's agent, as the tenant's uid,
    // its argv untouched (runc takes the command's `-u` for none of its own).
    let exec = |args: &[&str], key: &str| {
        let mut all = vec!["exec", "web", "--tenant", "acme", "--"];
        all.extend_from_slice(args);
        cloud.cli(&all, key)
    };
    let (ok, out) = exec(&["/bin/busybox", "id", "-u"], &acme);
    assert!(ok && out.trim() == uid.to_string(), "{out}");
    let (ok, out) = exec(&["/bin/busybox", "cat", "/scratch/index.html"], &acme);
    assert!(ok && out.contains(&format!("hello-from-{uid}")), "{out}");
    let (ok, out) = exec(
        &["/bin/busybox", "sh", "-c", "echo oops >&2; exit 3"],
        &acme,
    );
    assert!(
        !ok && out.contains("oops"),
        "a failing command fails the CLI: {out}"
    );
    let (ok, said) = exec(&["/bin/busybox", "true"], &globex);
    assert!(!ok && said.contains("not_found"), "{said}");
    let (ok, said) = exec(&["--user=0", "id"], &acme);
    assert!(!ok && said.contains("command[0]"), "{said}");
    // No user namespace for it (the host's unprivileged users may make
    // one, and in it a process holds every capability over new kernel
    // objects): seccomp refuses unshare and clone with namespace flags.
    for attempt in [
        vec!["/bin/busybox", "unshare", "-U", "/bin/busybox", "true"],
        vec!["/bin/busybox", "unshare", "-r", "/bin/busybox", "id"],
    ] {
        let (ok, said) = exec(&attempt, &acme);
        assert!(!ok && said.contains("not permitted"), "{attempt:?}: {said}");
    }

    // The node's own report covers containers: what the kernel says of
    // each, and attacks between two tenants' containers.
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "other",
            "--image",
            "globex/private:1",
            "--port",
            "8080",
            "--memory",
            "64Mi",
            "--",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "8080",
        ],
        &globex,
    );
    assert!(ok, "{said}");
    wait_for("the other tenant's service", 60, || {
        cloud.workload("globex", "other")["status"]["state"] == "running"
    });
    let (_, report) = common::isolation_report(&cloud.dir.path().join("agent"), OCTET);
    assert_eq!(report["failed"], 0, "{report:#}");
    let passed = |name: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["check"] == name && c["pass"] == true)
            .count()
    };
    for name in [
        "container runs as its tenant's uid",
        "container in its tenant's network namespace",
        "container in its own cgroup",
        "container has no capabilities",
        "container has no new privileges",
        "container under a seccomp filter",
        "container root read-only",
        "container in its own mount namespace",
        "host (gateway) reaches container",
        "cross-tenant TCP blocked",
        "cross-tenant data unreadable",
    ] {
        assert_eq!(passed(name), 2, "{name}: {report:#}");
    }
    let (ok, said) = cloud.cli(&["workload", "delete", "other"], &globex);
    assert!(ok, "{said}");
    let netns = std::fs::read_link(format!("/proc/{}/ns/net", pids[0])).unwrap();
    assert_ne!(
        netns,
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "not the host's network"
    );
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/atrium-{OCTET}/{id}/memory.limit_in_bytes"
    ))
    .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());

    // What it printed is in its log, by name.
    let agent_dir = cloud.dir.path().join("agent");
    let (ok, logs) = cloud.cli(
        &["logs", "web", "--data-dir", agent_dir.to_str().unwrap()],
        &acme,
    );
    assert!(ok && logs.contains(&format!("serving as {uid}")), "{logs}");

    // Killed, it is restarted, and answers again.
    for pid in &pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    wait_for("the service to be restarted", 60, || {
        let p = cloud.placements("acme").into_iter().next().unwrap();
        p["status"]["restarts"].as_u64().unwrap_or(0) >= 1
            && p["status"]["state"] == "running"
            && http_get(&addr, "/index.html").is_some()
    });

    // An image that is not there: the reason says so, and nothing hangs.
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "ghost",
            "--image",
            "acme/nothing:1",
            "--",
            "/bin/true",
        ],
        &acme,
    );
    assert!(ok, "{said}");
    wait_for("ErrImagePull", 60, || {
        cloud.placements("acme").iter().any(|p| {
            p["status"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("ErrImagePull"))
        })
    });

    // Deleted, it leaves no process and no cgroup.
    for name in ["web", "ghost"] {
        let (ok, said) = cloud.cli(&["workload", "delete", name], &acme);
        assert!(ok, "{said}");
    }
    wait_for("the replicas to go", 30, || {
        container_pids(OCTET, &id).is_empty()
            && !Path::new(&format!("/sys/fs/cgroup/memory/atrium-{OCTET}/{id}")).exists()
    });
    assert!(pids
        .iter()
        .all(|p| !Path::new(&format!("/proc/{p}")).exists()));

    // Stopped, the agent leaves no cgroup in any hierarchy, runc's included.
    stop(cloud.agent.as_mut().unwrap());
    cloud.agent = None;
    let left: Vec<String> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| h.path().join(format!("atrium-{OCTET}")))
        .filter(|d| d.exists())
        .map(|d| d.display().to_string())
        .collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

#[test]
fn a_gang_job_starts_all_its_workers_or_none_and_each_sees_only_its_gpu() {
    require_root_and_runc();
    let mut cloud = Cloud::start(JOB_OCTET);
    let acme = cloud.tenant("acme");
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "acme/busybox:1", &acme);
    cloud.start_agent("4xH100-80GB");
    let run = |args: &[&str]| {
        let mut all = vec!["workload", "run"];
        all.extend_from_slice(args);
        let (ok, said) = cloud.cli(&all, &acme);
        assert!(ok, "{said}");
    };
    // One GPU held by a service: three free, the gang of four must wait.
    run(&[
        "hold",
        "--image",
        "acme/busybox:1",
        "--gpu",
        "1",
        "--",
        "/bin/busybox",
        "sleep",
        "3600",
    ]);
    wait_for("the service to run", 60, || {
        cloud.workload("acme", "hold")["status"]["state"] == "running"
    });
    run(&[
        "train",
        "--image",
        "acme/busybox:1",
        "--gpu",
        "1",
        "--cpu",
        "0.25",
        "--job",
        "--completions",
        "4",
        "--gang",
        "--",
        "/bin/busybox",
        "sh",
        "-c",
        "echo worker $JOB_COMPLETION_INDEX sees $CUDA_VISIBLE_DEVICES",
    ]);
    let mut train = Value::Null;
    wait_for("the gang to wait with a reason", 30, || {
        train = cloud.workload("acme", "train");
        train["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("gang"))
    });
    assert_eq!(train["status"]["state"], "pending", "{train}");
    let workers = |cloud: &Cloud| {
        cloud
            .placements("acme")
            .into_iter()
            .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("train-")))
            .count()
    };
    assert_eq!(workers(&cloud), 0, "no worker starts before all can");

    // The fourth GPU frees: all four start, and the job completes.
    let (ok, said) = cloud.cli(&["workload", "delete", "hold"], &acme);
    assert!(ok, "{said}");
    wait_for("the gang to complete", 90, || {
        train = cloud.workload("acme", "train");
        train["status"]["state"] == "succeeded"
    });
    assert_eq!(workers(&cloud), 4, "finished workers keep their records");
    assert_eq!(train["status"]["reason"], "4/4 completions");
    let agent_dir = cloud.dir.path().join("agent");
    let (ok, logs) = cloud.cli(
        &["logs", "train", "--data-dir", agent_dir.to_str().unwrap()],
        &acme,
    );
    assert!(ok, "{logs}");
    let mut seen: Vec<(String, String)> = logs
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("] worker ")?.1;
            let (index, gpu) = rest.split_once(" sees ")?;
            Some((index.to_string(), gpu.to_string()))
        })
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 4, "{logs}");
    for (i, (index, gpu)) in seen.iter().enumerate() {
        assert_eq!(index, &i.to_string(), "{logs}");
        assert!(
            gpu.starts_with("GPU-") && !gpu.contains(','),
            "one GPU each: {logs}"
        );
    }
    seen.dedup_by(|a, b| a.1 == b.1);
    assert_eq!(seen.len(), 4, "each worker sees its own GPU: {logs}");

    // A job that keeps failing fails at its backoff limit, and says why.
    run(&[
        "flaky",
        "--image",
        "acme/busybox:1",
        "--job",
        "--backoff-limit",
        "1",
        "--",
        "/bin/busybox",
        "false",
    ]);
    let mut flaky = Value::Null;
    wait_for("the job to fail", 60, || {
        flaky = cloud.workload("acme", "flaky");
        flaky["status"]["state"] == "failed"
    });
    let reason = flaky["status"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("0/1 completions") && reason.contains("backoff limit 1"),
        "{reason}"
    );

    // A workload may not outrank its tenant.
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "vip",
            "--image",
            "acme/busybox:1",
            "--priority",
            "5",
            "--",
            "/bin/busybox",
            "true",
        ],
        &acme,
    );
    assert!(!ok && said.contains("spec.priority"), "{said}");

    // A job's spec does not change once created.
    let mut spec = flaky["spec"].clone();
    spec["job"]["backoff_limit"] = json!(3);
    let (status, said) = admin_call_status(
        &cloud,
        Method::PUT,
        "/v1/workloads/flaky?tenant=acme",
        json!({"spec": spec}),
    );
    assert_eq!(status, 400, "{said}");
    assert!(said.contains("create it anew"), "{said}");
}

#[test]
fn a_volume_keeps_one_jobs_output_for_the_next_holds_its_size_and_is_zeroed_when_deleted() {
    require_root_and_runc();
    let mut cloud = Cloud::start(VOLUME_OCTET);
    let acme = cloud.tenant("acme");
    let globex = cloud.tenant("globex");
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "acme/busybox:1", &acme);
    cloud.push(&build.path().join("oci"), "globex/busybox:1", &globex);
    cloud.start_agent("1xH100-80GB");
    let cli_ok = |args: &[&str], key: &str| {
        let (ok, said) = cloud.cli(args, key);
        assert!(ok, "{args:?}: {said}");
    };
    cli_ok(&["volume", "create", "data", "--size", "32Mi"], &acme);
    cli_ok(&["volume", "create", "mine", "--size", "32Mi"], &globex);
    // Sizes count against the storage quota, with the images.
    cloud.call(
        Method::PUT,
        "/v1/quotas/globex",
        json!({"quota": {"storage": "40Mi"}}),
    );
    let (ok, said) = cloud.cli(&["volume", "create", "more", "--size", "16Mi"], &globex);
    assert!(!ok && said.contains("quota exceeded for storage"), "{said}");
    // Another tenant cannot name acme's volume.
    let job = |name: &str, image: &str, volume: &str, script: &str| -> Vec<String> {
        [
            "workload",
            "run",
            name,
            "--image",
            image,
            "--job",
            "--backoff-limit",
            "0",
            "--memory",
            "64Mi",
            "--volume",
            volume,
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ]
        .map(str::to_string)
        .to_vec()
    };
    let steal = job("steal", "globex/busybox:1", "data", "cat /volumes/data/*");
    let (ok, said) = cloud.cli(&args(&steal), &globex);
    assert!(!ok && said.contains("spec.volumes[0].volume"), "{said}");

    // A job writes its result, then writes past the volume's size.
    let write = "echo result-42 > /volumes/data/out.txt && \
                 /bin/busybox dd if=/dev/urandom of=/volumes/data/fill bs=1M count=64; \
                 echo dd-exit=$?";
    cli_ok(
        &args(&job("writer", "acme/busybox:1", "data", write)),
        &acme,
    );
    let finished = |name: &str, tenant: &str| {
        let mut w = Value::Null;
        wait_for(&format!("job {name} to finish"), 90, || {
            w = cloud.workload(tenant, name);
            matches!(w["status"]["state"].as_str(), Some("succeeded" | "failed"))
        });
        w
    };
    let w = finished("writer", "acme");
    assert_eq!(w["status"]["state"], "succeeded", "{w}");
    let agent_dir = cloud.dir.path().join("agent");
    let logs = |name: &str, key: &str| {
        let (ok, logs) = cloud.cli(
            &["logs", name, "--data-dir", agent_dir.to_str().unwrap()],
            key,
        );
        assert!(ok, "{logs}");
        logs
    };
    let wrote = logs("writer", &acme);
    assert!(
        wrote.contains("No space left on device") && wrote.contains("dd-exit=1"),
        "{wrote}"
    );
    // Another tenant's volume on the same node is untouched by it.
    let other = "/bin/busybox dd if=/dev/urandom of=/volumes/mine/f bs=1M count=8 && echo wrote-8";
    cli_ok(
        &args(&job("fill", "globex/busybox:1", "mine", other)),
        &globex,
    );
    assert_eq!(finished("fill", "globex")["status"]["state"], "succeeded");
    assert!(logs("fill", &globex).contains("wrote-8"));

    // The next job of the tenant reads the first one's output, read-only.
    let read = "cat /volumes/in/out.txt; touch /volumes/in/x 2>/dev/null || echo read-only";
    cli_ok(
        &args(&job(
            "reader",
            "acme/busybox:1",
            "data:/volumes/in:ro",
            read,
        )),
        &acme,
    );
    assert_eq!(finished("reader", "acme")["status"]["state"], "succeeded");
    let read = logs("reader", &acme);
    assert!(
        read.contains("result-42") && read.contains("read-only"),
        "{read}"
    );
    // A mount point the image lacks is refused, not made in the shared image.
    cli_ok(
        &args(&job("odd", "acme/busybox:1", "data:/nowhere", "true")),
        &acme,
    );
    let odd = finished("odd", "acme");
    assert!(
        odd["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not a directory of the image")),
        "{odd}"
    );

    // It lies on the node, and is not deleted while workloads mount it.
    let volume = cloud.call(Method::GET, "/v1/volumes/data?tenant=acme", Value::Null);
    assert_eq!(volume["status"]["node"], "n1", "{volume}");
    let (ok, said) = cloud.cli(&["volume", "delete", "data"], &acme);
    assert!(!ok && said.contains("in_use"), "{said}");

    // Its blocks held the tenant's bytes; after the delete they are zeros.
    let id = volume["id"].as_str().unwrap();
    let image = agent_dir.join(format!("volumes/{id}.ext4"));
    let mut held = std::fs::File::open(&image).unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut bytes).unwrap();
    assert!(
        bytes.windows(9).any(|w| w == b"result-42"),
        "the image holds the job's output"
    );
    for name in ["writer", "reader", "odd"] {
        cli_ok(&["workload", "delete", name], &acme);
    }
    wait_for("the volume's delete", 30, || {
        cloud.cli(&["volume", "delete", "data"], &acme).0
    });
    wait_for("the image to be scrubbed and removed", 30, || {
        !image.exists()
    });
    std::io::Seek::rewind(&mut held).unwrap();
    let mut after = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut after).unwrap();
    assert_eq!(after.len(), bytes.len());
    assert!(
        after.iter().all(|b| *b == 0),
        "a byte of the volume survived its delete"
    );
    // The other tenant's volume stays, mounted.
    let mine = cloud.call(Method::GET, "/v1/volumes/mine?tenant=globex", Value::Null);
    let mine = agent_dir.join(format!("volumes/{}.ext4", mine["id"].as_str().unwrap()));
    assert!(mine.exists());

    // Stopped, the agent unmounts every volume and keeps their data.
    stop(cloud.agent.as_mut().unwrap());
    cloud.agent = None;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(agent_dir.join("volumes").to_str().unwrap()),
        "{mounts}"
    );
    assert!(mine.exists());
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_job_within_its_guarantee_preempts_a_borrower_which_completes_later() {
    require_root_and_runc();
    let mut cloud = Cloud::start(PREEMPT_OCTET);
    let low = cloud.tenant("low");
    cloud.call(
        Method::POST,
        "/v1/tenants",
        json!({"name": "high", "spec": {"priority": 10}}),
    );
    let high = cloud.call(
        Method::POST,
        "/v1/keys",
        json!({"name": "k", "tenant": "high", "spec": {"scopes": ["admin"]}}),
    )["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "library/busybox:1", &cloud.admin);
    cloud.start_agent("1xH100-80GB");
    let mut node = Value::Null;
    wait_for("the node", 30, || {
        node = cloud.call(Method::GET, "/v1/nodes", Value::Null)["items"][0].clone();
        !node.is_null()
    });
    // Each job asks three quarters of the node's CPUs: two never fit.
    let cpus: f64 = node["spec"]["capacity"]["cpu"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let share = format!("{}m", (cpus * 750.0) as u64);
    // low is guaranteed a tenth of a CPU and borrows the rest; high is
    // guaranteed all of it.
    for (tenant, quota) in [
        (
            "low",
            json!({"cpu": "100m", "borrowing": {"cpu": format!("{cpus}")}}),
        ),
        ("high", json!({"cpu": format!("{cpus}")})),
    ] {
        cloud.call(
            Method::PUT,
            &format!("/v1/quotas/{tenant}"),
            json!({"quota": quota}),
        );
    }
    let job = |name: &str, key: &str, seconds: u32| {
        let script = format!("sleep {seconds}; echo {name}-done");
        let (ok, said) = cloud.cli(
            &[
                "workload",
                "run",
                name,
                "--image",
                "library/busybox:1",
                "--job",
                "--cpu",
                &share,
                "--memory",
                "32Mi",
                "--",
                "/bin/busybox",
                "sh",
                "-c",
                &script,
            ],
            key,
        );
        assert!(ok, "{said}");
    };
    job("batch", &low, 3);
    wait_for("the borrower to run", 60, || {
        cloud.workload("low", "batch")["status"]["state"] == "running"
    });
    job("urgent", &high, 3);
    let mut batch = Value::Null;
    wait_for("the borrower to be preempted", 30, || {
        batch = cloud.workload("low", "batch");
        batch["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("preempted by high/urgent (priority 10)"))
    });
    assert_eq!(batch["status"]["state"], "pending", "{batch}");
    wait_for("the urgent job to run", 60, || {
        cloud.workload("high", "urgent")["status"]["state"] == "running"
    });
    // Requeued, the borrower waits: it never evicts the higher priority.
    assert_eq!(cloud.workload("low", "batch")["status"]["state"], "pending");
    assert!(
        cloud.placements("low").is_empty(),
        "no replica of the borrower runs"
    );
    wait_for("the urgent job to complete", 60, || {
        cloud.workload("high", "urgent")["status"]["state"] == "succeeded"
    });
    wait_for("the borrower to complete later", 90, || {
        cloud.workload("low", "batch")["status"]["state"] == "succeeded"
    });
    let agent_dir = cloud.dir.path().join("agent");
    let (ok, logs) = cloud.cli(
        &["logs", "batch", "--data-dir", agent_dir.to_str().unwrap()],
        &low,
    );
    assert!(ok && logs.contains("batch-done"), "{logs}");
}
