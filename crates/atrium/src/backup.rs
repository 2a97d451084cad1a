//! `atrium admin backup` and `atrium admin restore`: the control plane's
//! whole state — objects with their revisions, the change log, the audit
//! trail — copied out of its database and back.
//!
//! SQLite is copied while the server runs (`VACUUM INTO` reads one
//! snapshot); a restore replaces the database file and needs every server
//! on it stopped. PostgreSQL is copied with its own tools, `pg_dump` in its
//! custom format and `pg_restore --clean`, which drop and recreate Atrium's
//! tables; its password goes to them through `PGPASSWORD`, never on a
//! command line other users of the host can read.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use atrium_store::Store;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum AdminCmd {
    /// Copy the control plane's database to a file (SQLite: while it runs)
    Backup(BackupArgs),
    /// Replace the control plane's database with a backup; stop every
    /// server on it first, start them after
    Restore(RestoreArgs),
}

#[derive(Args)]
pub struct BackupArgs {
    /// sqlite://PATH or postgres://... [default: SQLite in the data dir]
    #[arg(long, env = "ATRIUM_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The backup file to write; it must not exist
    #[arg(long)]
    to: PathBuf,
}

#[derive(Args)]
pub struct RestoreArgs {
    /// sqlite://PATH or postgres://... [default: SQLite in the data dir]
    #[arg(long, env = "ATRIUM_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// A file `atrium admin backup` wrote
    #[arg(long)]
    from: PathBuf,
}

fn url_of(given: Option<String>, data_dir: &Path) -> String {
    given.unwrap_or_else(|| atrium_server::default_database_url(data_dir))
}

fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    Some(PathBuf::from(rest.split('?').next().unwrap_or(rest)))
}

pub async fn run(cmd: AdminCmd, data_dir: &Path) -> Result<()> {
    match cmd {
        AdminCmd::Backup(a) => backup(&url_of(a.database_url, data_dir), &a.to).await,
        AdminCmd::Restore(a) => restore(&url_of(a.database_url, data_dir), &a.from).await,
    }
}

async fn backup(url: &str, to: &Path) -> Result<()> {
    if to.exists() {
        bail!("{}: already exists; name a new file", to.display());
    }
    if let Some(path) = sqlite_path(url) {
        if !path.exists() {
            bail!(
                "{}: no database there (is this the server's data dir?)",
                path.display()
            );
        }
        let store = Store::open(url).await?;
        let head = store.head();
        store
            .backup_sqlite(to)
            .await
            .with_context(|| format!("copying {} to {}", path.display(), to.display()))?;
        report("backed up", to, head);
        return Ok(());
    }
    let (conninfo, password) = without_password(url)?;
    postgres_tool(
        Command::new("pg_dump")
            .args(["--format=custom", "--no-owner", "--file"])
            .arg(to)
            .arg(&conninfo),
        password.as_deref(),
    )?;
    let head = Store::open(url).await?.head();
    report("backed up", to, head);
    Ok(())
}

async fn restore(url: &str, from: &Path) -> Result<()> {
    if !from.is_file() {
        bail!("{}: no backup there", from.display());
    }
    if let Some(path) = sqlite_path(url) {
        // The copy is checked as a store (it opens, and says its revision)
        // before it replaces anything, and replaces the database whole.
        let staged = path.with_extension("db.restoring");
        std::fs::copy(from, &staged)
            .with_context(|| format!("copying {} to {}", from.display(), staged.display()))?;
        let head = match Store::open(&format!("sqlite://{}", staged.display())).await {
            Ok(store) => store.head(),
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(anyhow!("{}: not an Atrium backup: {e}", from.display()));
            }
        };
        for stale in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{stale}", staged.display()));
            let _ = std::fs::remove_file(format!("{}{stale}", path.display()));
        }
        std::fs::rename(&staged, &path).with_context(|| format!("replacing {}", path.display()))?;
        report("restored", &path, head);
        return Ok(());
    }
    let (conninfo, password) = without_password(url)?;
    postgres_tool(
        Command::new("pg_restore")
            .args([
                "--clean",
                "--if-exists",
                "--no-owner",
                "--single-transaction",
                "--dbname",
            ])
            .arg(&conninfo)
            .arg(from),
        password.as_deref(),
    )?;
    let head = Store::open(url).await?.head();
    report("restored", from, head);
    Ok(())
}

#[allow(clippy::print_stdout)] // the command's answer
fn report(what: &str, file: &Path, head: i64) {
    println!("{what} {} at revision {head}", file.display());
}

/// `url` without its password, and the password, so it can go to the
/// PostgreSQL tools through the environment. Read as text, not as a URL:
/// libpq's several hosts (`h1:5432,h2:5432`) are no URL's authority, and
/// the tools take them as written (with `target_session_attrs`).
fn without_password(url: &str) -> Result<(String, Option<String>)> {
    let (scheme, rest) = url
        .split_once("://")
        .filter(|(s, _)| matches!(*s, "postgres" | "postgresql"))
        .ok_or_else(|| anyhow!("database-url: must start with sqlite:// or postgres://"))?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let Some((userinfo, hosts)) = authority.rsplit_once('@') else {
        return Ok((url.to_string(), None));
    };
    let Some((user, password)) = userinfo.split_once(':') else {
        return Ok((url.to_string(), None));
    };
    let password = percent_encoding::percent_decode_str(password)
        .decode_utf8_lossy()
        .into_owned();
    Ok((format!("{scheme}://{user}@{hosts}{tail}"), Some(password)))
}

fn postgres_tool(cmd: &mut Command, password: Option<&str>) -> Result<()> {
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.output().map_err(|e| {
        anyhow!(
            "{program}: {e} (install PostgreSQL's client tools: apt-get install postgresql-client)"
        )
    })?;
    if !out.status.success() {
        bail!(
            "{program} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_leaves_the_url_for_the_environment() {
        let (url, pw) = without_password("postgres://atrium:s%40cret@db:5432/atrium").unwrap();
        assert_eq!(url, "postgres://atrium@db:5432/atrium");
        assert_eq!(pw.as_deref(), Some("s@cret"));
        let (url, pw) = without_password("postgres://db/atrium").unwrap();
        assert_eq!((url.as_str(), pw), ("postgres://db/atrium", None));
        assert!(without_password("mysql://db/x").is_err());
        let (url, pw) = without_password(
            "postgres://atrium:pw@h1:5432,h2:5433/atrium?target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://atrium@h1:5432,h2:5433/atrium?target_session_attrs=read-write"
        );
        assert_eq!(pw.as_deref(), Some("pw"));
        assert_eq!(
            sqlite_path("sqlite:///var/lib/atrium/atrium.db?mode=rwc"),
            Some(PathBuf::from("/var/lib/atrium/atrium.db"))
        );
    }
}
