//! A PostgreSQL store on a replicated cluster: the URL may name several
//! hosts as libpq writes them
//! (`postgres://user:pw@h1:5432,h2:5432/db?target_session_attrs=read-write`)
//! and the store keeps its pool on whichever of them is the primary now,
//! so a failover (Patroni promoting a standby) is followed without
//! restarting the server.
//!
//! sqlx connects to one host, so the store's pool opens its connections
//! on one host at a time, and a watcher checks every `CHECK_EVERY` that
//! it is still the writable primary; when it is not (unreachable, or
//! demoted to a standby), the watcher asks each host in turn and points
//! the pool's connect options at the one that is. The pool stays: a
//! statement waiting for a connection during the failover gets one on
//! the new primary at its next try, rather than waiting out its timeout
//! on a pool of the dead host. Every connection is checked as it is
//! made, so the pool never hands out one to a standby; connections to
//! the old primary die with it (Patroni restarts a demoted primary) and
//! are dropped when their ping fails. Statements in flight on the old
//! primary fail and their callers see an error: none is retried here,
//! because only the caller knows whether its statement is safe to repeat.
//!
//! Passwords never appear in what this module reports: hosts are named
//! as `host:port`.

use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Connection, Row};

use crate::{Inner, StoreError};

/// How often the watcher checks that the pool is on the primary.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a host may take to answer whether it is the primary.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the pool may take to lend a connection for the check: a dead
/// host keeps it retrying, and a busy pool past this only costs a probe
/// of the hosts that finds the same primary.
const POOL_CHECK_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a statement waits for a connection before failing: a caller
/// during a failover gets an error in seconds rather than hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// More hosts than a cluster of PostgreSQL servers has in practice.
const MAX_HOSTS: usize = 16;

/// A PostgreSQL URL split into one URL per host, in the order given:
/// (a single-host URL sqlx can connect to, its `host:port` for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PostgresTargets(Vec<(String, String)>);

impl PostgresTargets {
    /// Splits `url`. A URL naming one host comes back as it was, less
    /// `target_session_attrs` (sqlx has no such option).
    pub(crate) fn parse(url: &str) -> Result<PostgresTargets, StoreError> {
        let bad = |why: &str| StoreError::BadUrl(why.to_string());
        let (scheme, rest) = ["postgres://", "postgresql://"]
            .iter()
            .find_map(|s| url.strip_prefix(s).map(|r| (*s, r)))
            .ok_or_else(|| bad("must start with postgres:// or postgresql://"))?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (path, query) = match tail.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (tail, None),
        };
        let mut kept = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("target_session_attrs", "read-write" | "primary")) => {}
                Some(("target_session_attrs", v)) => {
                    return Err(bad(&format!(
                        "target_session_attrs={v}: Atrium writes, so it needs the primary \
                         (read-write or primary)"
                    )));
                }
                _ if !pair.is_empty() => kept.push(pair),
                _ => {}
            }
        }
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let hosts: Vec<&str> = hosts.split(',').collect();
        if hosts.len() > MAX_HOSTS {
            return Err(bad(&format!("at most {MAX_HOSTS} hosts")));
        }
        let mut targets = Vec::new();
        for host in hosts {
            if host.is_empty() && targets.is_empty() && authority.is_empty() {
                // No host at all (`postgres:///db?host=/run/...`): sqlx's
                // own defaults decide.
            } else if host.is_empty() {
                return Err(bad("an empty host between commas"));
            } else {
                check_host(host).map_err(|why| bad(&format!("{host:?}: {why}")))?;
            }
            let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
            let name = if host.is_empty() {
                "the default host".into()
            } else {
                host.to_string()
            };
            targets.push((format!("{scheme}{user}{host}{path}{query}"), name));
        }
        Ok(PostgresTargets(targets))
    }

    /// Whether the store must follow a primary among several hosts.
    pub(crate) fn several(&self) -> bool {
        self.0.len() > 1
    }

    /// The first host's URL (the only one when there is one; `parse`
    /// never makes an empty list).
    pub(crate) fn first(&self) -> &str {
        self.0.first().map_or("", |(url, _)| url.as_str())
    }

    /// `host:port` of every host, comma-separated, for messages.
    pub(crate) fn describe(&self) -> String {
        let names: Vec<&str> = self.0.iter().map(|(_, name)| name.as_str()).collect();
        names.join(", ")
    }

    /// The `host:port` of `url`, one of these.
    fn name_of(&self, url: &str) -> &str {
        self.0
            .iter()
            .find(|(u, _)| u == url)
            .map_or("", |(_, name)| name.as_str())
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, with a numeric port.
fn check_host(host: &str) -> Result<(), &'static str> {
    let port = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((_, "")) => None,
            Some((_, rest)) => Some(rest.strip_prefix(':').ok_or("junk after the address")?),
            None => return Err("an unclosed ["),
        },
        None => host.split_once(':').map(|(_, p)| p),
    };
    match port {
        Some(p) if p.parse::<u16>().is_err() => Err("the port is not a number"),
        _ => Ok(()),
    }
}

/// The URL of the host the pool connects to now.
pub(crate) fn current_url(inner: &Inner) -> String {
    // A panic while holding the lock cannot leave a half-written String
    // (it is replaced whole), so a poisoned lock is still good to read.
    inner
        .primary_url
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Whether the server behind `conn` takes writes.
async fn is_primary(conn: &mut AnyConnection) -> Result<bool, sqlx::Error> {
    let row = sqlx::query("SELECT CAST(pg_is_in_recovery() AS INTEGER)")
        .fetch_one(&mut *conn)
        .await?;
    Ok(row.try_get::<i32, _>(0)? == 0)
}

/// A pool on `url` whose connections are each checked to be on the
/// primary as they are made.
pub(crate) fn pool_on(url: &str) -> Result<AnyPool, StoreError> {
    Ok(AnyPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|conn, _| {
            Box::pin(async move {
                if !is_primary(conn).await? {
                    return Err(sqlx::Error::Protocol(
                        "this PostgreSQL server is a standby, not the primary".into(),
                    ));
                }
                // A server stopped mid-transaction (SIGSTOP, a stalled
                // host) would hold the revision row's lock, and so every
                // other server's writes, for as long as it stays stopped:
                // PostgreSQL ends such a session after this long instead.
                // Atrium never leaves a transaction idle on purpose.
                sqlx::Executor::execute(
                    &mut *conn,
                    "SET idle_in_transaction_session_timeout = '10s'",
                )
                .await?;
                Ok(())
            })
        })
        .connect_lazy(url)?)
}

/// The URL of the first host, in order, that answers as the primary.
pub(crate) async fn find_primary(targets: &PostgresTargets) -> Result<String, StoreError> {
    let mut seen = Vec::new();
    for (url, name) in &targets.0 {
        let probe = async {
            let mut conn = AnyConnection::connect(url).await?;
            let primary = is_primary(&mut conn).await;
            let _ = conn.close().await;
            primary
        };
        match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
            Ok(Ok(true)) => return Ok(url.clone()),
            Ok(Ok(false)) => seen.push(format!("{name}: a standby")),
            Ok(Err(e)) => seen.push(format!("{name}: {e}")),
            Err(_) => seen.push(format!("{name}: no answer in {PROBE_TIMEOUT:?}")),
        }
    }
    Err(StoreError::NoPrimary(seen.join("; ")))
}

/// Keeps the store's pool on the primary while the store lives.
pub(crate) fn follow(inner: Weak<Inner>, targets: Arc<PostgresTargets>) {
    tracing::info!(hosts = %targets.describe(), "store: following the primary among the database's hosts");
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            let Some(inner) = inner.upgrade() else { return };
            let still = tokio::time::timeout(POOL_CHECK_TIMEOUT, async {
                let mut conn = inner.pool.acquire().await?;
                is_primary(&mut conn).await
            })
            .await;
            if matches!(still, Ok(Ok(true))) {
                continue;
            }
            let url = match find_primary(&targets).await {
                Ok(url) => url,
                Err(e) => {
                    tracing::warn!(error = %e, "store: no primary among the database's hosts yet");
                    continue;
                }
            };
            if url == current_url(&inner) {
                continue;
            }
            match AnyConnectOptions::from_str(&url) {
                Ok(options) => inner.pool.set_connect_options(options),
                Err(e) => {
                    tracing::warn!(error = %e, "store: cannot connect to the new primary");
                    continue;
                }
            }
            let host = targets.name_of(&url).to_string();
            *inner.primary_url.write().unwrap_or_else(|e| e.into_inner()) = url;
            tracing::warn!(%host, "store: the primary moved; new connections go there");
        }
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn several_hosts_become_one_url_each_without_the_session_attribute() {
        let t = PostgresTargets::parse(
            "postgres://u:p%40w@10.0.0.1:5432,db2:5433,[::1]:5434/atrium?sslmode=disable&target_session_attrs=read-write",
        )
        .unwrap();
        let urls: Vec<&str> = t.0.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(
            urls,
            [
                "postgres://u:p%40w@10.0.0.1:5432/atrium?sslmode=disable",
                "postgres://u:p%40w@db2:5433/atrium?sslmode=disable",
                "postgres://u:p%40w@[::1]:5434/atrium?sslmode=disable",
            ]
        );
        assert!(t.several());
        assert_eq!(t.describe(), "10.0.0.1:5432, db2:5433, [::1]:5434");
        assert!(!t.describe().contains("p%40w"), "a password in a message");
    }

    #[test]
    fn one_host_is_kept_as_given() {
        let url = "postgresql://atrium@127.0.0.1:55432/postgres";
        let t = PostgresTargets::parse(url).unwrap();
        assert_eq!(t.first(), url);
        assert!(!t.several());
        let t = PostgresTargets::parse("postgres://h/db?target_session_attrs=primary").unwrap();
        assert_eq!(t.first(), "postgres://h/db");
    }

    #[test]
    fn what_cannot_reach_a_primary_is_refused_with_the_reason() {
        for (url, says) in [
            (
                "postgres://a,b/db?target_session_attrs=any",
                "needs the primary",
            ),
            (
                "postgres://a,b/db?target_session_attrs=read-only",
                "needs the primary",
            ),
            ("postgres://a,,b/db", "empty host"),
            ("postgres://a:54x32,b/db", "port is not a number"),
            ("mysql://a/db", "must start with"),
        ] {
            let e = PostgresTargets::parse(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
        let many = format!("postgres://{}/db", vec!["h"; 17].join(","));
        assert!(PostgresTargets::parse(&many).is_err());
    }
}
