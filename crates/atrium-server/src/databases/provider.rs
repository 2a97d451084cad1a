//! The provider's PostgreSQL, as the database service drives it: one
//! superuser connection pool, and for each tenant database a login role,
//! a tablespace on a disk of the database's size and the database itself,
//! all named `atrium_<object id>`.
//!
//! Security, in order of the attacks it answers:
//! - Every name and literal in the DDL below is made by this server (the
//!   object id, a path under the volumes directory, a SCRAM verifier), and
//!   checked again before it is spliced: PostgreSQL takes no bound
//!   parameters in DDL, so nothing a tenant typed may reach it.
//! - `REVOKE ALL … FROM PUBLIC` on each database: another tenant's role
//!   is refused at connect (`permission denied for database`), whatever
//!   password it holds. The service refuses to start on a server that
//!   trusts TCP clients without a password (pg_hba `trust`).
//! - The size is a disk, not a measurement: the tablespace is an ext4 image
//!   of that size, so a write past it fails with ENOSPC in that tenant's
//!   statement while the server and every other database carry on. The
//!   role may not put tables anywhere else (no CREATE on other tablespaces;
//!   temporary files follow the database's default tablespace).
//! - The statement timeout is set on the role, which a session may unset
//!   (`SET statement_timeout = 0`): a watchdog therefore also cancels any
//!   tenant statement running past its database's timeout.
//! - Roles are created `NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
//!   NOBYPASSRLS` with a connection limit.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use atrium_core::database::DatabaseSpec;
use atrium_volume::VolumeStore;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::secret;

/// How the service reaches the provider's PostgreSQL.
#[derive(Debug, Clone)]
pub struct DatabasesConfig {
    /// A superuser's URL (CREATE TABLESPACE needs one).
    pub admin_url: String,
    /// Where the databases' disks are made and mounted; PostgreSQL's user
    /// must be able to pass through every directory above it.
    pub volumes: PathBuf,
}

/// A statement may overrun its timeout by this much before the watchdog
/// cancels it (PostgreSQL's own timer, when still set, fires first).
const WATCHDOG_GRACE_MS: i64 = 500;

pub struct Provider {
    pool: PgPool,
    volumes: Arc<VolumeStore>,
    /// PostgreSQL's user and group: the disks' roots are theirs.
    owner: (u32, u32),
    /// Where tenants connect.
    pub host: String,
    pub port: u16,
}

/// What a tenant gets to connect with, shown once.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub database: String,
}

/// `atrium_<id>` for a server-made `db_…` id: lowercase letters, digits
/// and underscores only, so it is the same name quoted or not.
pub fn pg_name(id: &str) -> Result<String, String> {
    if crate::crud::made_by_new_id("db_", id) {
        Ok(format!("atrium_{id}"))
    } else {
        Err(format!("{id:?} is not a database id"))
    }
}

fn sql_error(what: &str) -> impl Fn(sqlx::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Provider {
    /// Connects and checks that this PostgreSQL can host tenants'
    /// databases safely; every refusal says what to change.
    pub async fn connect(config: &DatabasesConfig) -> Result<Provider, String> {
        let options: PgConnectOptions = config
            .admin_url
            .parse()
            .map_err(|e| format!("databases-url: {e}"))?;
        let (host, port) = (options.get_host().to_string(), options.get_port());
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| format!("databases-url: cannot connect: {e}"))?;
        let superuser: bool =
            sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                .fetch_one(&pool)
                .await
                .map_err(sql_error("databases-url"))?;
        if !superuser {
            return Err(
                "databases-url: its role must be a superuser (tablespaces need one)".into(),
            );
        }
        let trusting: Vec<i32> = sqlx::query_scalar(
            "SELECT line_number FROM pg_hba_file_rules \
             WHERE type LIKE 'host%' AND auth_method = 'trust'",
        )
        .fetch_all(&pool)
        .await
        .map_err(sql_error("databases-url: reading pg_hba rules"))?;
        if !trusting.is_empty() {
            return Err(format!(
                "databases: PostgreSQL at {host}:{port} trusts TCP clients without a password \
                 (pg_hba.conf lines {trusting:?}): tenants' passwords would not be checked; \
                 use scram-sha-256 for host lines"
            ));
        }
        let data_dir: String = sqlx::query_scalar("SHOW data_directory")
            .fetch_one(&pool)
            .await
            .map_err(sql_error("databases-url"))?;
        let meta = std::fs::metadata(&data_dir).map_err(|e| {
            format!(
                "databases: PostgreSQL's data directory {data_dir} is not readable on this host \
                 ({e}): run the server on PostgreSQL's host, which holds the databases' disks"
            )
        })?;
        if !rustix::process::geteuid().is_root() {
            return Err(
                "databases: the server must run as root to mount the databases' disks".into(),
            );
        }
        let owner = (meta.uid(), meta.gid());
        reachable_by_others(&config.volumes)?;
        let volumes = Arc::new(VolumeStore::new(config.volumes.clone(), "db_", 0o711));
        Ok(Provider {
            pool,
            volumes,
            owner,
            host,
            port,
        })
    }

    /// Makes (or completes) the database for object `id`: its disk, role,
    /// tablespace and database, each only where missing, then sets its
    /// limits. A new role gets `password` (or, when completing one whose
    /// password was never shown, a random one the tenant rotates).
    pub async fn provision(
        &self,
        id: &str,
        spec: &DatabaseSpec,
        password: Option<&str>,
    ) -> Result<(), String> {
        let name = pg_name(id)?;
        let location = self.disk(id, spec.size.0).await?;
        let limit = spec.connection_limit;
        let exists = |catalog: &'static str, column: &'static str| {
            let name = name.clone();
            async move {
                let q = format!("SELECT count(*) FROM {catalog} WHERE {column} = $1");
                sqlx::query_scalar::<_, i64>(&q)
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await
                    .map(|n| n > 0)
                    .map_err(sql_error("reading the catalog"))
            }
        };
        if !exists("pg_roles", "rolname").await? {
            let made = password.map_or_else(secret::new_password, str::to_string);
            self.execute(&format!(
                "CREATE ROLE \"{name}\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
                 NOBYPASSRLS CONNECTION LIMIT {limit} PASSWORD '{}'",
                checked_verifier(&secret::scram_verifier(&made))?
            ))
            .await?;
        }
        self.execute(&format!("ALTER ROLE \"{name}\" CONNECTION LIMIT {limit}"))
            .await?;
        self.execute(&format!(
            "ALTER ROLE \"{name}\" SET statement_timeout = {}",
            spec.statement_timeout_ms
        ))
        .await?;
        if !exists("pg_tablespace", "spcname").await? {
            self.execute(&format!(
                "CREATE TABLESPACE \"{name}\" LOCATION '{}'",
                checked_path(&location)?
            ))
            .await?;
        }
        if !exists("pg_database", "datname").await? {
            self.execute(&format!(
                "CREATE DATABASE \"{name}\" OWNER \"{name}\" TABLESPACE \"{name}\" \
                 CONNECTION LIMIT {limit}"
            ))
            .await?;
        }
        self.execute(&format!(
            "ALTER DATABASE \"{name}\" CONNECTION LIMIT {limit}"
        ))
        .await?;
        self.execute(&format!("REVOKE ALL ON DATABASE \"{name}\" FROM PUBLIC"))
            .await
    }

    /// A new password for the database's role; sessions opened with the
    /// old one are ended.
    pub async fn rotate(&self, id: &str) -> Result<Credentials, String> {
        let name = pg_name(id)?;
        let password = secret::new_password();
        self.execute(&format!(
            "ALTER ROLE \"{name}\" PASSWORD '{}'",
            checked_verifier(&secret::scram_verifier(&password))?
        ))
        .await?;
        self.end_sessions(&name).await?;
        Ok(Credentials {
            user: name.clone(),
            password,
            database: name,
        })
    }

    /// Drops the database (ending its sessions), its role and tablespace,
    /// then zeroes and removes its disk. Each step tolerates an earlier
    /// attempt having done it.
    pub async fn remove(&self, id: &str) -> Result<(), String> {
        let name = pg_name(id)?;
        self.execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await?;
        self.end_sessions(&name).await?;
        self.execute(&format!("DROP ROLE IF EXISTS \"{name}\""))
            .await?;
        self.execute(&format!("DROP TABLESPACE IF EXISTS \"{name}\""))
            .await?;
        let (volumes, id) = (self.volumes.clone(), id.to_string());
        tokio::task::spawn_blocking(move || {
            if volumes.image(&id).exists() {
                volumes.scrub(&id)
            } else {
                Ok(())
            }
        })
        .await
        .map_err(|e| format!("disk task: {e}"))?
    }

    /// Cancels every tenant statement running past its database's timeout
    /// (`timeouts`: role name → milliseconds); how many it cancelled.
    pub async fn cancel_overrunning(
        &self,
        timeouts: &HashMap<String, u64>,
    ) -> Result<usize, String> {
        let rows = sqlx::query(
            "SELECT pid, usename::text AS usename, \
             (extract(epoch FROM clock_timestamp() - query_start) * 1000)::bigint AS ms \
             FROM pg_stat_activity WHERE state = 'active' AND usename LIKE 'atrium\\_db\\_%'",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(sql_error("reading pg_stat_activity"))?;
        let mut cancelled = 0;
        for row in rows {
            let (pid, user, ms): (i32, String, Option<i64>) = (
                row.try_get("pid").map_err(sql_error("pid"))?,
                row.try_get("usename").map_err(sql_error("usename"))?,
                row.try_get("ms").map_err(sql_error("ms"))?,
            );
            let Some(limit) = timeouts.get(&user) else {
                continue;
            };
            let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
            if ms.unwrap_or(0) > limit.saturating_add(WATCHDOG_GRACE_MS) {
                sqlx::query("SELECT pg_cancel_backend($1)")
                    .bind(pid)
                    .execute(&self.pool)
                    .await
                    .map_err(sql_error("cancelling a statement"))?;
                tracing::info!(role = %user, pid, ms, "databases: statement past its timeout cancelled");
                cancelled += 1;
            }
        }
        Ok(cancelled)
    }

    async fn end_sessions(&self, role: &str) -> Result<(), String> {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
            .bind(role)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(sql_error("ending sessions"))
    }

    async fn execute(&self, statement: &str) -> Result<(), String> {
        sqlx::raw_sql(statement)
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(|e| format!("PostgreSQL refused ({}): {e}", first_words(statement)))
    }

    /// The database's disk, made and mounted if need be, with the empty
    /// directory PostgreSQL's user owns for the tablespace.
    async fn disk(&self, id: &str, size: u64) -> Result<PathBuf, String> {
        let (volumes, id, owner) = (self.volumes.clone(), id.to_string(), self.owner);
        tokio::task::spawn_blocking(move || {
            let root = volumes.ensure(&id, size, owner.0)?;
            // The filesystem's root holds lost+found; a tablespace wants an
            // empty directory of its own.
            let dir = root.join("pg");
            let at = |e: std::io::Error| format!("{}: {e}", dir.display());
            if !dir.exists() {
                std::fs::create_dir(&dir).map_err(at)?;
            }
            std::os::unix::fs::chown(&dir, Some(owner.0), Some(owner.1)).map_err(at)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(at)?;
            Ok(dir)
        })
        .await
        .map_err(|e| format!("disk task: {e}"))?
    }
}

/// The statement's first words, for an error that must not carry a
/// password verifier.
fn first_words(statement: &str) -> String {
    statement
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn checked_verifier(v: &str) -> Result<&str, String> {
    let ok = v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+/=$:-".contains(&b));
    ok.then_some(v)
        .ok_or_else(|| "a password verifier with unexpected characters".to_string())
}

fn checked_path(p: &Path) -> Result<&str, String> {
    let s = p
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", p.display()))?;
    let ok = p.is_absolute() && !s.contains(['\'', '\\', '\0', '\n']);
    ok.then_some(s)
        .ok_or_else(|| format!("{s:?} cannot be a tablespace location"))
}

/// Refuses a volumes directory PostgreSQL's user could not reach: every
/// directory above it must let others pass (`o+x`).
fn reachable_by_others(volumes: &Path) -> Result<(), String> {
    let absolute = if volumes.is_absolute() {
        volumes.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("current directory: {e}"))?
            .join(volumes)
    };
    for dir in absolute.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(format!(
                "database-volumes: PostgreSQL's user cannot pass through {} (mode {:o}) to reach \
                 {}: choose a directory under paths others may traverse, e.g. \
                 /var/lib/atrium/databases",
                dir.display(),
                meta.permissions().mode() & 0o7777,
                absolute.display()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_only_from_server_made_ids() {
        assert_eq!(
            pg_name("db_1m977edrwjmww6jk").unwrap(),
            "atrium_db_1m977edrwjmww6jk"
        );
        for bad in [
            "db_",
            "db_1m977edrwjmww6jkx",
            "db_A",
            "db_a\"b",
            "db_a;drop",
            "vol_a",
            "db_a b",
            "db_é",
        ] {
            assert!(pg_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nothing_but_verifier_and_path_characters_reach_the_ddl() {
        assert!(checked_verifier(&secret::scram_verifier("x")).is_ok());
        assert!(checked_verifier("a'; DROP ROLE x; --").is_err());
        assert!(checked_path(Path::new("/var/lib/a/db_x/pg")).is_ok());
        assert!(checked_path(Path::new("/tmp/it's")).is_err());
        assert!(checked_path(Path::new("relative")).is_err());
    }

    #[test]
    fn a_volumes_dir_behind_a_private_directory_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let private = top.path().join("private");
        std::fs::create_dir(&private).unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = reachable_by_others(&private.join("databases")).unwrap_err();
        assert!(
            e.contains("cannot pass through") && e.contains("private"),
            "{e}"
        );
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert!(reachable_by_others(&private.join("databases")).is_ok());
    }
}
