//! The gateways' load reports, shared by every server on the database:
//! one row per gateway, replaced by each report, read while fresh. Not
//! objects: they carry no revision and make no change-log entry (a report
//! a second per gateway would flood every watch).

use sqlx::Row;

use crate::{Backend, Store, StoreError};

impl Store {
    /// Replaces `gateway`'s report with `body`, unless `most` other
    /// gateways reported within `fresh_ms` (then `Ok(false)`, nothing
    /// written). Reports older than that are dropped on the way.
    pub async fn put_load(
        &self,
        gateway: &str,
        body: &str,
        fresh_ms: i64,
        most: usize,
    ) -> Result<bool, StoreError> {
        let _writer = match self.inner.backend {
            Backend::Sqlite => Some(self.inner.sqlite_writer.lock().await),
            Backend::Postgres => None,
        };
        let mut tx = self.inner.pool.begin().await?;
        let now: i64 = sqlx::query(self.now_ms_sql())
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let cutoff = now.saturating_sub(fresh_ms);
        sqlx::query("DELETE FROM load_reports WHERE at_ms < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        let others: i64 = sqlx::query("SELECT COUNT(*) FROM load_reports WHERE gateway <> $1")
            .bind(gateway)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if usize::try_from(others).unwrap_or(usize::MAX) >= most {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO load_reports (gateway, body, at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (gateway) DO UPDATE SET body = excluded.body, at_ms = excluded.at_ms",
        )
        .bind(gateway)
        .bind(body)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The reports made within `fresh_ms`, by gateway.
    pub async fn fresh_loads(&self, fresh_ms: i64) -> Result<Vec<(String, String)>, StoreError> {
        let sql = format!(
            "SELECT gateway, body FROM load_reports WHERE at_ms >= ({}) - $1",
            self.now_ms_sql().trim_start_matches("SELECT ")
        );
        let rows = sqlx::query(&sql)
            .bind(fresh_ms)
            .fetch_all(&self.inner.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}
