//! Tenant overlays across nodes and sites, as real processes: a control
//! plane and three root agents — two nodes in site eu-a, one in us-east —
//! on this host's loopback (127.0.7.1–3 are their underlay addresses).
//! A tenant's containers on the three nodes reach each other on its
//! overlay (VXLAN, its own VNI); another tenant's container reaches none of
//! them; and a capture of the underlay finds the tenant's page in the
//! clear between the two eu-a nodes but nowhere in what crosses between
//! sites, which is sealed. Needs root, runc and tcpdump (scripts/test.sh
//! installs them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::cloud::{require_root_and_runc, Cloud};
use common::oci::busybox_layout;
use common::{stop, wait_for, Proc, BIN};
use reqwest::Method;
use serde_json::{json, Value};

/// The agents' tenant network blocks (apart from the other tests').
const OCTETS: [u8; 3] = [174, 175, 176];
const SITES: [&str; 3] = ["eu-a", "eu-a", "us-east"];
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

fn vxlan_port(i: usize) -> u16 {
    47801 + i as u16
}

fn sealed_port(i: usize) -> u16 {
    47811 + i as u16
}

/// `tcpdump` writing what `filter` matches on loopback to a file, until
/// dropped (it flushes each packet: `-U`).
struct Capture {
    proc: Proc,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(dir: &std::path::Path, name: &str, filter: &str) -> Capture {
        let file = dir.join(format!("{name}.pcap"));
        let mut child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "-nn", "-w"])
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

    /// Stops capturing; the packets' count and the raw file.
    fn finish(self) -> (usize, Vec<u8>) {
        drop(self.proc);
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()
            .unwrap();
        let packets = String::from_utf8_lossy(&out.stdout).lines().count();
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
    let cloud = Cloud::start(OCTETS[0]);
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
        let child = Command::new(BIN)
            .args(["agent", "--simulate-gpus", "1xH100-80GB", "--log", "warn"])
            .args(["--tenant-network", &format!("10.{}.0.0/16", OCTETS[i])])
            .args(["--overlay-address", &format!("127.0.7.{}", i + 1)])
            .args(["--overlay-port", &vxlan_port(i).to_string()])
            .args(["--overlay-sealed-port", &sealed_port(i).to_string()])
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
        // busybox-static's wget crashes (static NSS); nc speaks HTTP/1.0.
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
    let sealed_filter = format!(
        "udp and (port {} or port {} or port {})",
        sealed_port(0),
        sealed_port(1),
        sealed_port(2)
    );
    let clear_filter = format!(
        "udp and src net 127.0.7.0/24 and (dst port {} or dst port {} or dst port {})",
        vxlan_port(0),
        vxlan_port(1),
        vxlan_port(2)
    );
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

    // A host on the underlay that is no node of the site forges VXLAN
    // frames with acme's VNI for the us-east node: dropped, and counted,
    // before its VXLAN port.
    let vni = cloud.placements("acme")[0]["spec"]["overlay_vni"]
        .as_u64()
        .expect("acme's placements carry its VNI") as u32;
    let forger = std::net::UdpSocket::bind("127.0.8.1:0").unwrap();
    let [_, a, b, c] = vni.to_be_bytes();
    let mut forged = vec![0x08, 0, 0, 0, a, b, c, 0];
    forged.extend_from_slice(&[0xff; 14]);
    forged.extend_from_slice(b"forged frame");
    for _ in 0..5 {
        forger
            .send_to(&forged, ("127.0.7.3", vxlan_port(2)))
            .unwrap();
    }
    let table = Command::new("nft")
        .args([
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

    let (sealed_packets, sealed_bytes) = sealed.finish();
    let (clear_packets, clear_bytes) = clear.finish();
    eprintln!(
        "underlay capture: {sealed_packets} packets between sites, {clear_packets} within eu-a"
    );
    assert!(
        clear_packets > 0 && contains(&clear_bytes, MARKER),
        "within eu-a the overlay runs in the clear: the capture must see the page ({clear_packets} packets)"
    );
    assert!(
        sealed_packets > 0,
        "acme's traffic between eu-a and us-east crossed no sealed endpoint"
    );
    assert!(
        !contains(&sealed_bytes, MARKER),
        "acme's page crossed between sites in the clear"
    );
    drop(agents);
}
