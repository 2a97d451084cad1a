//! Tenant overlays across nodes and sites, as real processes on a real
//! underlay: three network namespaces made by the test are the nodes —
//! n1 and n2 in site eu-a, n3 in us-east — each with one address on a
//! bridge (172.31.250.0/24, in a fourth namespace) that the host, running
//! the control plane, is on too; a root agent runs in each. A tenant's
//! containers on the three nodes reach each other on its overlay (VXLAN,
//! its own VNI); another tenant's container reaches none of them; a
//! capture on the bridge finds the tenant's page in the clear between the
//! two eu-a nodes, no VXLAN frame of n3's at all, and nothing of the page
//! in the sealed datagrams between sites; VXLAN frames forged by a host on
//! the bridge that is no node of the site are dropped; and the tenant's
//! cluster's service reaches its pod on another node. Needs root, runc and
//! tcpdump (scripts/test.sh installs them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::cloud::{require_root_and_runc, Cloud};
use common::kubectl::{kubectl, write, Kube};
use common::oci::busybox_layout;
use common::{stop, wait_for, Proc, BIN};
use reqwest::Method;
use serde_json::{json, Value};

/// The agents' tenant network blocks (apart from the other tests').
const OCTETS: [u8; 3] = [174, 175, 176];
const SITES: [&str; 3] = ["eu-a", "eu-a", "us-east"];
/// The underlay: nodes are .1–.3, the host .254.
const UNDERLAY: &str = "172.31.250";
const HOST: &str = "172.31.250.254";
const VXLAN_PORT: u16 = 4789;
const SEALED_PORT: u16 = 4790;
const MARKER: &str = "atrium-overlay-marker-5e1f";

/// An agent, stopped with SIGTERM when dropped: it then stops its
/// containers and removes its namespaces (killed, it would leave them
/// running, as it must).
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}

fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn node_ns(i: usize) -> String {
    format!("atovl-n{}", i + 1)
}

/// The nodes' namespaces and the bridge between them and the host;
/// removed when dropped (after the agents stop).
struct Underlay;

impl Underlay {
    fn make() -> Underlay {
        Underlay::remove();
        sh(&format!(
            "ip netns add atovl-under && ip -n atovl-under link add br0 type bridge && \
             ip -n atovl-under link set br0 up && \
             ip link add atovl-h type veth peer name host netns atovl-under && \
             ip addr add {HOST}/24 dev atovl-h && ip link set atovl-h up && \
             ip -n atovl-under link set host master br0 up"
        ));
        for i in 0..3 {
            let (ns, n) = (node_ns(i), i + 1);
            sh(&format!(
                "ip netns add {ns} && \
                 ip link add eth0 netns {ns} type veth peer name n{n} netns atovl-under && \
                 ip -n {ns} addr add {UNDERLAY}.{n}/24 dev eth0 && \
                 ip -n {ns} link set eth0 up && ip -n {ns} link set lo up && \
                 ip -n atovl-under link set n{n} master br0 up"
            ));
        }
        Underlay
    }

    fn remove() {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(
                "for ns in atovl-n1 atovl-n2 atovl-n3 atovl-under; do ip netns del $ns; done; \
                 ip link del atovl-h",
            )
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        Underlay::remove();
    }
}

/// `tcpdump` writing what `filter` matches on the underlay's bridge to a
/// file, until dropped (it flushes each packet: `-U`).
struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(dir: &std::path::Path, name: &str, filter: &str) -> Capture {
        let file = dir.join(format!("{name}.pcap"));
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                "atovl-under",
                "tcpdump",
                "-i",
                "br0",
                "-U",
                "-nn",
                "-w",
            ])
            .arg(&file)
            .arg(filter)
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (scripts/test.sh installs it)");
        // It says so once it is capturing.
        let mut line = String::new();
        BufReader::new(child.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("listening"), "tcpdump: {line}");
        Capture {
            proc: Proc(child),
            file,
        }
    }

    /// Stops capturing; the packets as tcpdump prints them, and the raw
    /// file.
    fn finish(self) -> (Vec<String>, Vec<u8>) {
        drop(self.proc);
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .unwrap();
        let packets = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        (packets, std::fs::read(&self.file).unwrap())
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn a_tenants_workloads_reach_each_other_across_nodes_and_sites_and_no_one_else() {
    require_root_and_runc();
    let _underlay = Underlay::make();
    // The tenant cluster API (kubectl, from the host) on loopback, which
    // its certificate names.
    let tls = format!("127.0.0.1:{}", common::free_port());
    let cloud = Cloud::start_at(HOST, OCTETS[0], &["--tls-listen", &tls]);
    for (site, jurisdiction) in [("eu-a", "EU"), ("us-east", "US")] {
        cloud.call(
            Method::POST,
            "/v1/sites",
            json!({"name": site, "spec": {"kind": "core", "jurisdiction": jurisdiction}}),
        );
    }
    let acme = cloud.tenant("acme");
    let globex = cloud.tenant("globex");
    let build = tempfile::tempdir().unwrap();
    busybox_layout(build.path());
    cloud.push(&build.path().join("oci"), "acme/busybox:1", &acme);
    cloud.push(&build.path().join("oci"), "globex/busybox:1", &globex);

    let mut agents = Vec::new();
    for (i, site) in SITES.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let token = cloud.call(
            Method::POST,
            "/v1/join-tokens",
            json!({"plane": "node", "name": name, "site": site}),
        )["secret"]
            .as_str()
            .unwrap()
            .to_string();
        // In the node's network namespace only (nsenter): `ip netns exec`
        // would mount a /sys without the cgroups.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node_ns(i)))
            .args([
                BIN,
                "agent",
                "--simulate-gpus",
                "1xH100-80GB",
                "--log",
                "warn",
            ])
            .args(["--tenant-network", &format!("10.{}.0.0/16", OCTETS[i])])
            .args(["--overlay-address", &format!("{UNDERLAY}.{}", i + 1)])
            .args(["--server", &cloud.url, "--join-token", &token])
            .arg("--data-dir")
            .arg(cloud.dir.path().join(&name))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        agents.push(Agent(child));
    }

    // One replica per node (each has one GPU), serving a page on 8080.
    let page = format!(
        "echo {MARKER} > /scratch/index.html && exec /bin/busybox httpd -f -p 8080 -h /scratch"
    );
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "mesh",
            "--image",
            "acme/busybox:1",
            "--port",
            "8080",
            "--gpu",
            "1",
            "--replicas",
            "3",
            "--memory",
            "64Mi",
            "--cpu",
            "0.25",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            &page,
        ],
        &acme,
    );
    assert!(ok, "{said}");
    let (ok, said) = cloud.cli(
        &[
            "workload",
            "run",
            "probe",
            "--image",
            "globex/busybox:1",
            "--memory",
            "64Mi",
            "--cpu",
            "0.25",
            "--",
            "/bin/busybox",
            "sleep",
            "3600",
        ],
        &globex,
    );
    assert!(ok, "{said}");

    // Each replica's node and its address on acme's overlay.
    let mut replicas: Vec<(u32, String, String)> = Vec::new();
    wait_for(
        "acme's three replicas running, with overlay addresses",
        90,
        || {
            replicas = cloud
                .placements("acme")
                .iter()
                .filter(|p: &&Value| p["status"]["state"] == "running")
                .filter_map(|p| {
                    Some((
                        p["spec"]["replica"].as_u64()? as u32,
                        p["spec"]["node"].as_str()?.to_string(),
                        p["status"]["overlay_address"].as_str()?.to_string(),
                    ))
                })
                .collect();
            replicas.len() == 3
        },
    );
    replicas.sort();
    let nodes: std::collections::BTreeSet<&str> = replicas.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(nodes.len(), 3, "one replica per node: {replicas:?}");
    wait_for("globex's probe running", 60, || {
        cloud.workload("globex", "probe")["status"]["state"] == "running"
    });

    let fetch = |tenant: &str, key: &str, workload: &str, replica: u32, address: &str| {
        // Debian's busybox wget crashes on -T; nc bounds its own wait.
        let get = format!(
            "printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | /bin/busybox nc -w 3 {address} 8080"
        );
        let replica = replica.to_string();
        cloud.cli(
            &[
                "exec",
                workload,
                "--tenant",
                tenant,
                "--replica",
                &replica,
                "--",
                "/bin/busybox",
                "sh",
                "-c",
                &get,
            ],
            key,
        )
    };

    // The overlays join within a few seconds of the namespaces' making.
    let (_, from, to) = (&replicas[0], &replicas[0], &replicas[1]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (ok, out) = fetch("acme", &acme, "mesh", from.0, &to.2);
        if ok && out.contains(MARKER) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the overlay between the first two nodes did not come up: {out}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    let dir = tempfile::tempdir().unwrap();
    let sealed_filter = format!("udp port {SEALED_PORT}");
    let clear_filter = format!("udp port {VXLAN_PORT}");
    let sealed = Capture::start(dir.path(), "sealed", &sealed_filter);
    let clear = Capture::start(dir.path(), "clear", &clear_filter);

    // Every replica fetches every other's page, within the site and across.
    for from in &replicas {
        for to in replicas.iter().filter(|to| to.1 != from.1) {
            let (ok, out) = fetch("acme", &acme, "mesh", from.0, &to.2);
            assert!(
                ok && out.contains(MARKER),
                "acme's replica on {} did not reach {} ({}) on its overlay: {out}",
                from.1,
                to.1,
                to.2
            );
        }
    }
    // Another tenant's container reaches none of them.
    for to in &replicas {
        let (ok, out) = fetch("globex", &globex, "probe", 0, &to.2);
        assert!(
            !ok && !out.contains(MARKER),
            "globex reached acme's replica on {} at {}: {out}",
            to.1,
            to.2
        );
    }

    let (sealed_packets, sealed_bytes) = sealed.finish();
    let (clear_packets, clear_bytes) = clear.finish();
    eprintln!(
        "underlay capture: {} sealed datagrams between sites, {} VXLAN frames within eu-a",
        sealed_packets.len(),
        clear_packets.len()
    );
    assert!(
        !clear_packets.is_empty() && contains(&clear_bytes, MARKER),
        "within eu-a the overlay runs in the clear: the capture must see the page"
    );
    let us = format!("{UNDERLAY}.3.");
    let leaked: Vec<&String> = clear_packets.iter().filter(|p| p.contains(&us)).collect();
    assert!(
        leaked.is_empty(),
        "VXLAN in the clear to or from us-east: {leaked:?}"
    );
    assert!(
        sealed_packets.iter().any(|p| p.contains(&us)),
        "acme's traffic between eu-a and us-east crossed no sealed endpoint"
    );
    assert!(
        !contains(&sealed_bytes, MARKER),
        "acme's page crossed between sites in the clear"
    );

    // The host, on the underlay but no node of us-east's site, forges
    // VXLAN frames with acme's VNI for n3: dropped, and counted, before
    // its VXLAN port.
    let vni = cloud.placements("acme")[0]["spec"]["overlay_vni"]
        .as_u64()
        .expect("acme's placements carry its VNI") as u32;
    let forger = std::net::UdpSocket::bind((HOST, 0)).unwrap();
    let [_, a, b, c] = vni.to_be_bytes();
    let mut forged = vec![0x08, 0, 0, 0, a, b, c, 0];
    forged.extend_from_slice(&[0xff; 14]);
    forged.extend_from_slice(b"forged frame");
    for _ in 0..5 {
        forger
            .send_to(&forged, (format!("{UNDERLAY}.3").as_str(), VXLAN_PORT))
            .unwrap();
    }
    let table = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node_ns(2)))
        .args([
            "nft",
            "list",
            "table",
            "inet",
            &format!("atrium_{}_overlay", OCTETS[2]),
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let dropped: u64 = table
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 5, "forged frames were not dropped: {table}");

    // A tenant cluster's service reaches its pod on another node: a pod's
    // IP is its overlay address, and the service's rules in the client's
    // namespace translate to it. Two pods of one GPU each, on nodes of one
    // GPU each, are on two nodes.
    let (ok, said) = cloud.cli(&["workload", "delete", "mesh"], &acme);
    assert!(ok, "{said}");
    wait_for("mesh's replicas to go", 60, || {
        cloud
            .placements("acme")
            .iter()
            .all(|p| p["spec"]["deployment_name"] != "mesh")
    });
    let (ok, said) = cloud.cli(&["cluster", "create", "dev"], &acme);
    assert!(ok, "{said}");
    let (ok, config) = cloud.cli(&["cluster", "kubeconfig", "dev"], &acme);
    assert!(ok, "{config}");
    let kube = Kube::new(&kubectl(), dir.path(), "kubeconfig", &config);
    let manifest = write(
        dir.path(),
        "pods.yaml",
        "apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  containers:
  - name: main
    image: acme/busybox:1
    command: [/bin/busybox, httpd, -f, -p, \"8080\", -h, /bin]
    ports: [{containerPort: 8080}]
    resources: {limits: {cpu: 250m, memory: 32Mi, nvidia.com/gpu: 1}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default}
spec:
  containers:
  - name: main
    image: acme/busybox:1
    command: [/bin/busybox, sleep, \"3600\"]
    resources: {limits: {cpu: 250m, memory: 32Mi, nvidia.com/gpu: 1}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
",
    );
    kube.ok(&["apply", "-f", manifest.to_str().unwrap()]);
    let pod_ip = |name: &str| {
        kube.run(&["get", "pod", name, "-o", "jsonpath={.status.podIP}"])
            .1
            .trim()
            .to_string()
    };
    wait_for("both pods running on the overlay", 90, || {
        pod_ip("web").starts_with("100.64.") && pod_ip("client").starts_with("100.64.")
    });
    assert_ne!(pod_ip("web"), pod_ip("client"), "the pods share a node");
    let cluster_ip = kube.ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"]);
    let url = format!("http://{}:80/busybox", cluster_ip.trim());
    wait_for("the service to reach the pod on the other node", 60, || {
        kube.fetch_from("client", &url).0
    });
    drop(agents);
}
