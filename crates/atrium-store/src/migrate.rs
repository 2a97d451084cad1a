//! Schema migrations: numbered SQL files compiled into the binary, applied
//! in order, each in its own transaction, and recorded so they run once.
//! The same SQL serves both backends (the schema uses only types and syntax
//! SQLite and PostgreSQL share).

use sqlx::{AnyPool, Row};

use crate::{Backend, StoreError};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "objects, changes, audit, meta",
        include_str!("../migrations/0001_objects.sql"),
    ),
    (2, "usage", include_str!("../migrations/0002_usage.sql")),
    (
        3,
        "usage request ids",
        include_str!("../migrations/0003_usage_request_id.sql"),
    ),
    (
        4,
        "usage flags",
        include_str!("../migrations/0004_usage_flag.sql"),
    ),
    (
        5,
        "usage batches",
        include_str!("../migrations/0005_usage_batch.sql"),
    ),
    (6, "leases", include_str!("../migrations/0006_leases.sql")),
    (
        7,
        "load reports",
        include_str!("../migrations/0007_load_reports.sql"),
    ),
    (
        8,
        "usage request counts",
        include_str!("../migrations/0008_usage_requests.sql"),
    ),
    (
        9,
        "usage ingress site",
        include_str!("../migrations/0009_usage_ingress_site.sql"),
    ),
];

pub(crate) async fn run(pool: &AnyPool, backend: Backend) -> Result<(), StoreError> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS atrium_migrations (version BIGINT PRIMARY KEY, \
         description TEXT NOT NULL)",
    )
    .execute(pool)
    .await?;
    for (version, description, sql) in MIGRATIONS {
        let mut tx = pool.begin().await?;
        if backend == Backend::Postgres {
            // Two servers starting together must not both migrate.
            sqlx::query("SELECT pg_advisory_xact_lock(7301942)")
                .execute(&mut *tx)
                .await?;
        }
        let applied = sqlx::query("SELECT version FROM atrium_migrations WHERE version = $1")
            .bind(*version)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?;
        if applied.is_none() {
            tracing::info!(version, description, "store: applying migration");
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO atrium_migrations (version, description) VALUES ($1, $2)")
                .bind(*version)
                .bind(*description)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    Ok(())
}
