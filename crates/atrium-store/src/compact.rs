//! Change-log compaction: the log keeps a bounded window of the newest
//! changes. A reader asking for changes from before the window gets
//! [`StoreError::Compacted`] and must list again, then follow from the
//! list's revision — never a silent gap.
//!
//! The oldest revision kept is recorded in `meta` (`compacted_revision`)
//! in the same transaction that deletes, and read *after* each read of the
//! log: a compaction that removed rows a read wanted committed before that
//! read, so the check after it sees it, in this process or another one
//! sharing the database.

use sqlx::Row;

use crate::{Store, StoreError};

const KEY: &str = "compacted_revision";

impl Store {
    /// The revision up to which changes are gone (0: none are).
    pub async fn compacted(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(KEY)
            .fetch_optional(&self.inner.pool)
            .await?;
        let text: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
        text.map_or(Ok(0), |t| {
            t.parse()
                .map_err(|_| StoreError::Corrupt(format!("{KEY} is {t:?}")))
        })
    }

    /// Refuses a read of the changes after `after` that compaction reached.
    pub(crate) async fn check_not_compacted(&self, after: i64) -> Result<(), StoreError> {
        let oldest = self.compacted().await?;
        if after < oldest {
            return Err(StoreError::Compacted {
                requested: after,
                oldest,
            });
        }
        Ok(())
    }

    /// Deletes every change but the newest `keep` revisions' (objects
    /// themselves stay). Returns the revision compacted up to.
    pub async fn compact(&self, keep: i64) -> Result<i64, StoreError> {
        let up_to = self.head().saturating_sub(keep.max(0));
        let done = self.compacted().await?;
        if up_to <= done {
            return Ok(done);
        }
        // SQLite's one writer: queued with the others, not behind its
        // busy handler.
        let _writer = match self.inner.backend {
            crate::Backend::Sqlite => Some(self.inner.sqlite_writer.lock().await),
            crate::Backend::Postgres => None,
        };
        let mut tx = self.inner.pool.begin().await?;
        sqlx::query("DELETE FROM changes WHERE revision <= $1")
            .bind(up_to)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(KEY)
        .bind(up_to.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(up_to)
    }
}
