//! Leases for leader election among servers sharing one database, and the
//! fence that makes a deposed leader's writes fail.
//!
//! Taking or renewing a lease is a write transaction like any other
//! (`begin_write`: serialised with every write, on PostgreSQL by the
//! revision row's lock), and a fenced store checks, inside each of its
//! write transactions, that its holder still holds the lease in its term.
//! So a takeover and an old leader's write can never interleave: the
//! write commits before the takeover, or sees it and is refused. Expiry
//! is read from the database's clock, so servers' clocks do not matter.

use std::time::Duration;

use sqlx::Row;

use crate::{Backend, Store, StoreError};

/// What a fenced store's writes require: `holder` holds lease `name` in
/// `term`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub name: String,
    pub holder: String,
    pub term: i64,
}

impl Store {
    /// The database's clock, in milliseconds since the epoch.
    pub(crate) fn now_ms_sql(&self) -> &'static str {
        match self.inner.backend {
            Backend::Sqlite => "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Backend::Postgres => {
                "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
            }
        }
    }

    /// Takes lease `name` for `holder` for `ttl`, or renews it: the term
    /// held, or `None` while another holder's lease runs.
    pub async fn lead(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let (_writer, mut tx, _) = self.begin_write().await?;
        let now: i64 = sqlx::query(self.now_ms_sql())
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let until = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        let row = sqlx::query("SELECT holder, term, expires_ms FROM leases WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let term = match row {
            None => {
                sqlx::query(
                    "INSERT INTO leases (name, holder, term, expires_ms) VALUES ($1, $2, 1, $3)",
                )
                .bind(name)
                .bind(holder)
                .bind(until)
                .execute(&mut *tx)
                .await?;
                1
            }
            Some(row) => {
                let (current, term, expires): (String, i64, i64) =
                    (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                let term = if current == holder {
                    term
                } else if expires < now {
                    term.saturating_add(1)
                } else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                sqlx::query(
                    "UPDATE leases SET holder = $2, term = $3, expires_ms = $4 WHERE name = $1",
                )
                .bind(name)
                .bind(holder)
                .bind(term)
                .bind(until)
                .execute(&mut *tx)
                .await?;
                term
            }
        };
        tx.commit().await?;
        Ok(Some(term))
    }

    /// Gives lease `name` up at once if `holder` holds it (a server
    /// stopping), so another takes over without waiting for it to expire.
    pub async fn resign(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (_writer, mut tx, _) = self.begin_write().await?;
        sqlx::query("UPDATE leases SET expires_ms = 0 WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// This store, with every write refused once `fence` no longer holds.
    pub fn fenced(&self, fence: Fence) -> Store {
        Store {
            inner: self.inner.clone(),
            fence: Some(std::sync::Arc::new(fence)),
        }
    }

    /// Inside a write transaction: refuses it unless this store's fence
    /// (if any) still holds.
    pub(crate) async fn check_fence(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    ) -> Result<(), StoreError> {
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        let row = sqlx::query("SELECT holder, term FROM leases WHERE name = $1")
            .bind(&fence.name)
            .fetch_optional(&mut **tx)
            .await?;
        let held = match row {
            Some(row) => (row.try_get::<String, _>(0)?, row.try_get::<i64, _>(1)?),
            None => (String::new(), 0),
        };
        if held != (fence.holder.clone(), fence.term) {
            return Err(StoreError::Fenced {
                name: fence.name.clone(),
                term: fence.term,
                holder: held.0,
                current: held.1,
            });
        }
        Ok(())
    }
}
