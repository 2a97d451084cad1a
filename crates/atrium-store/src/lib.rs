//! Atrium's persistence: resources as JSON documents with a global,
//! monotonic revision, an ordered change log to watch, and an audit trail,
//! on SQLite (embedded default) or PostgreSQL, behind one interface.
//!
//! The store holds no business rules. Where a rule must hold atomically with
//! a write (a quota), the caller passes a [`Precondition`]: a pure check the
//! store evaluates inside the write transaction over the objects it names.
//!
//! Ordering: every write transaction first bumps the single revision row.
//! That serialises writers on both backends, so revisions become visible in
//! order and "everything up to the head revision" is always a complete
//! prefix of the change log. Watchers read the log from their last revision
//! whenever the head moves; the head moves in-process after each commit and,
//! on PostgreSQL, across processes through LISTEN/NOTIFY.

mod compact;
mod lease;
mod ledger;
mod load;
mod migrate;
mod primary;
mod types;

pub use lease::Fence;
use primary::PostgresTargets;
pub use types::{
    AuditContext, AuditEvent, Backend, Change, ChangeOp, Check, Count, Object, Page, Precondition,
    Selection, StoreError, TenantFilter, UsageRecord, Write, WriteError,
};

use std::sync::Arc;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{watch, Mutex};

/// The PostgreSQL channel on which committed revisions are announced.
const NOTIFY_CHANNEL: &str = "atrium_changes";

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Set on a leader's store: its writes need its lease (see `lease`).
    fence: Option<Arc<lease::Fence>>,
}

struct Inner {
    pool: AnyPool,
    /// On PostgreSQL, the host the pool connects to: on a cluster it
    /// moves with the primary (`primary::follow`).
    primary_url: std::sync::RwLock<String>,
    backend: Backend,
    head: watch::Sender<i64>,
    /// SQLite allows one writer; queueing writers here rather than in
    /// SQLite's busy handler keeps latency fair and predictable.
    sqlite_writer: Mutex<()>,
}

fn now() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

fn tenant_column(t: &Option<String>) -> String {
    t.clone().unwrap_or_default()
}

fn tenant_from_column(t: String) -> Option<String> {
    (!t.is_empty()).then_some(t)
}

fn object_from_row(row: &AnyRow, kind: Option<&str>) -> Result<Object, StoreError> {
    let body: String = row.try_get("body")?;
    Ok(Object {
        kind: match kind {
            Some(k) => k.to_string(),
            None => row.try_get("kind")?,
        },
        id: row.try_get("id")?,
        tenant: tenant_from_column(row.try_get("tenant")?),
        name: row.try_get("name")?,
        body: serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        revision: row.try_get("revision")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

const OBJECT_COLUMNS: &str = "id, tenant, name, body, revision, created_at, updated_at";

impl Store {
    /// Opens (creating if needed) the database at `url` and applies any
    /// pending migrations. `sqlite://<path>` or `postgres://...`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            // Only the scheme: the rest may hold a password.
            let scheme = url.split_once(':').map_or("", |(s, _)| s);
            return Err(StoreError::UnsupportedUrl(format!("{scheme}:")));
        };
        let mut targets = None;
        let (pool, url) = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                let pool = AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            // WAL lets readers run beside the writer; FULL
                            // syncs each commit so an acknowledged write
                            // survives a crash of the process or the host.
                            for pragma in [
                                "PRAGMA journal_mode = WAL",
                                "PRAGMA synchronous = FULL",
                                "PRAGMA busy_timeout = 10000",
                            ] {
                                sqlx::Executor::execute(&mut *conn, pragma).await?;
                            }
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?;
                (pool, url)
            }
            Backend::Postgres => {
                let parsed = PostgresTargets::parse(url)?;
                let url = if parsed.several() {
                    let primary = primary::find_primary(&parsed).await?;
                    targets = Some(Arc::new(parsed));
                    primary
                } else {
                    parsed.first().to_string()
                };
                (primary::pool_on(&url)?, url)
            }
        };
        migrate::run(&pool, backend).await?;
        let head_now: i64 = sqlx::query("SELECT value FROM atrium_revision WHERE id = 1")
            .fetch_one(&pool)
            .await?
            .try_get(0)?;
        let (head, _) = watch::channel(head_now);
        let store = Store {
            inner: Arc::new(Inner {
                pool,
                primary_url: std::sync::RwLock::new(url),
                backend,
                head,
                sqlite_writer: Mutex::new(()),
            }),
            fence: None,
        };
        if backend == Backend::Postgres {
            store.spawn_postgres_listener();
        }
        if let Some(targets) = targets {
            primary::follow(Arc::downgrade(&store.inner), targets);
        }
        Ok(store)
    }

    /// Writes a consistent copy of a SQLite store to `path` (which must not
    /// exist) while it serves: `VACUUM INTO` reads one snapshot, so writes
    /// go on beside it and none is half in the copy. PostgreSQL is copied
    /// with its own tools (`pg_dump`), not through here.
    pub async fn backup_sqlite(&self, path: &std::path::Path) -> Result<(), StoreError> {
        if self.inner.backend != Backend::Sqlite {
            return Err(StoreError::UnsupportedUrl(
                "a PostgreSQL store is backed up with pg_dump".into(),
            ));
        }
        let path = path.to_str().ok_or_else(|| {
            StoreError::UnsupportedUrl(format!("{}: not a UTF-8 path", path.display()))
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(path)
            .execute(&self.inner.pool)
            .await?;
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Follows revisions committed by other processes sharing the database.
    /// A notification carries the committed revision; a periodic read of the
    /// head covers notifications lost while reconnecting.
    /// On a cluster it listens on the primary of the moment (a standby
    /// refuses LISTEN), and follows it when it moves.
    fn spawn_postgres_listener(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(url) = weak.upgrade().map(|inner| primary::current_url(&inner)) else {
                    return;
                };
                let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "store: cannot listen for changes; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
                    tracing::warn!(error = %e, "store: LISTEN failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let store = Store { inner, fence: None };
                    if let Ok(h) = store.read_head().await {
                        store.advance_head(h);
                    }
                    let next = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await;
                    match next {
                        Ok(Ok(n)) => {
                            if let Ok(rev) = n.payload().parse::<i64>() {
                                store.advance_head(rev);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "store: change listener broke; reconnecting");
                            break;
                        }
                        Err(_elapsed) => {}
                    }
                }
            }
        });
    }

    fn advance_head(&self, revision: i64) {
        self.inner.head.send_if_modified(|h| {
            if revision > *h {
                *h = revision;
                true
            } else {
                false
            }
        });
    }

    async fn read_head(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query("SELECT value FROM atrium_revision WHERE id = 1")
                .fetch_one(&self.inner.pool)
                .await?
                .try_get(0)?,
        )
    }

    /// The latest revision known committed. Every change up to it is in the
    /// change log.
    pub fn head(&self) -> i64 {
        *self.inner.head.borrow()
    }

    /// A receiver that wakes whenever the head revision moves.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.inner.head.subscribe()
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        Ok(())
    }

    pub async fn get(&self, kind: &str, id: &str) -> Result<Option<Object>, StoreError> {
        let sql = format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = $1 AND id = $2");
        let row = sqlx::query(&sql)
            .bind(kind)
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await?;
        row.map(|r| object_from_row(&r, Some(kind))).transpose()
    }

    pub async fn get_by_name(
        &self,
        kind: &str,
        tenant: Option<&str>,
        name: &str,
    ) -> Result<Option<Object>, StoreError> {
        let sql = format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = $1 AND tenant = $2 AND name = $3"
        );
        let row = sqlx::query(&sql)
            .bind(kind)
            .bind(tenant.unwrap_or_default())
            .bind(name)
            .fetch_optional(&self.inner.pool)
            .await?;
        row.map(|r| object_from_row(&r, Some(kind))).transpose()
    }

    /// A page of objects of `kind` in id order, after id `after`, read in
    /// one snapshot together with the revision it reflects, so a client can
    /// list and then watch from that revision without a gap or a repeat.
    pub async fn list(
        &self,
        kind: &str,
        tenant: &TenantFilter,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page, StoreError> {
        let mut tx = self.inner.pool.begin().await?;
        if self.inner.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .execute(&mut *tx)
                .await?;
        }
        let revision: i64 = sqlx::query("SELECT value FROM atrium_revision WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let (cond, bind) = tenant.sql(3);
        let sql = format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = $1 AND id > $2 AND {cond} \
             ORDER BY id LIMIT {}",
            u64::from(limit) + 1
        );
        let mut q = sqlx::query(&sql).bind(kind).bind(after.unwrap_or(""));
        if let Some(b) = bind {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&mut *tx).await?;
        tx.commit().await?;
        let mut objects = rows
            .iter()
            .map(|r| object_from_row(r, Some(kind)))
            .collect::<Result<Vec<_>, _>>()?;
        let next_after = if objects.len() > limit as usize {
            objects.truncate(limit as usize);
            objects.last().map(|o| o.id.clone())
        } else {
            None
        };
        Ok(Page {
            objects,
            revision,
            next_after,
        })
    }

    /// Every object of `kind` that `tenant` selects (no paging; for rules
    /// and controllers over bounded sets).
    pub async fn list_all(
        &self,
        kind: &str,
        tenant: &TenantFilter,
    ) -> Result<Vec<Object>, StoreError> {
        let mut conn = self.inner.pool.acquire().await?;
        select_all(&mut conn, kind, tenant, None).await
    }

    /// Changes after revision `after` up to and including `up_to`, oldest
    /// first, at most `limit`, optionally of one kind and tenant filter;
    /// [`StoreError::Compacted`] when some are gone (`compact`).
    pub async fn changes(
        &self,
        after: i64,
        up_to: i64,
        kind: Option<&str>,
        tenant: &TenantFilter,
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        let (cond, tenant_bind) = tenant.sql(3);
        let mut sql = format!(
            "SELECT revision, op, kind, {OBJECT_COLUMNS} FROM changes \
             WHERE revision > $1 AND revision <= $2 AND {cond}"
        );
        let mut binds: Vec<String> = tenant_bind.into_iter().collect();
        if let Some(k) = kind {
            sql.push_str(&format!(" AND kind = ${}", 3 + binds.len()));
            binds.push(k.to_string());
        }
        sql.push_str(&format!(" ORDER BY revision LIMIT {limit}"));
        let mut q = sqlx::query(&sql).bind(after).bind(up_to);
        for b in binds {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&self.inner.pool).await?;
        // After the read: a compaction it raced is seen here.
        self.check_not_compacted(after).await?;
        rows.iter()
            .map(|r| {
                let op: String = r.try_get("op")?;
                Ok(Change {
                    revision: r.try_get("revision")?,
                    op: ChangeOp::parse(&op)?,
                    object: object_from_row(r, None)?,
                })
            })
            .collect()
    }

    /// Starts a write transaction and takes its revision. Bumping the one
    /// revision row first serialises writers on both backends (a row lock
    /// on PostgreSQL; on SQLite the write lock, queued in-process by the
    /// returned guard), so revisions commit in the order they are taken.
    async fn begin_write(
        &self,
    ) -> Result<
        (
            Option<tokio::sync::MutexGuard<'_, ()>>,
            sqlx::Transaction<'static, sqlx::Any>,
            i64,
        ),
        StoreError,
    > {
        let writer = match self.inner.backend {
            Backend::Sqlite => Some(self.inner.sqlite_writer.lock().await),
            Backend::Postgres => None,
        };
        let mut tx = self.inner.pool.begin().await?;
        let revision: i64 = sqlx::query(
            "UPDATE atrium_revision SET value = value + 1 WHERE id = 1 RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        self.check_fence(&mut tx).await?;
        Ok((writer, tx, revision))
    }

    /// Applies `write` atomically with `precondition`, recording `audit`.
    /// Returns the change it made.
    pub async fn write<E>(
        &self,
        write: Write,
        precondition: Option<Precondition<E>>,
        audit: AuditContext,
    ) -> Result<Change, WriteError<E>> {
        let (_writer, mut tx, revision) = self.begin_write().await?;
        if let Some(p) = precondition {
            let mut read = Vec::with_capacity(p.reads.len());
            for sel in &p.reads {
                read.push(select_all(&mut tx, &sel.kind, &sel.tenant, sel.name.as_deref()).await?);
            }
            let mut counted = Vec::with_capacity(p.counts.len());
            for c in &p.counts {
                counted.push(count_kinds(&mut tx, &c.kind_prefix, &c.tenant).await?);
            }
            (p.check)(&read, &counted).map_err(WriteError::Rejected)?;
        }
        let at = now();
        let change = match write {
            Write::Create {
                kind,
                id,
                tenant,
                name,
                body,
            } => {
                let taken = sqlx::query(
                    "SELECT 1 FROM objects WHERE kind = $1 AND tenant = $2 AND name = $3",
                )
                .bind(&kind)
                .bind(tenant_column(&tenant))
                .bind(&name)
                .fetch_optional(&mut *tx)
                .await
                .map_err(StoreError::from)?;
                if taken.is_some() {
                    return Err(StoreError::NameTaken { kind, name }.into());
                }
                let object = Object {
                    kind,
                    id,
                    tenant,
                    name,
                    body,
                    revision,
                    created_at: at.clone(),
                    updated_at: at,
                };
                sqlx::query(
                    "INSERT INTO objects (kind, id, tenant, name, body, revision, created_at, \
                     updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&object.kind)
                .bind(&object.id)
                .bind(tenant_column(&object.tenant))
                .bind(&object.name)
                .bind(object.body.to_string())
                .bind(revision)
                .bind(&object.created_at)
                .bind(&object.updated_at)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
                Change {
                    revision,
                    op: ChangeOp::Created,
                    object,
                }
            }
            Write::Update {
                kind,
                id,
                body,
                if_revision,
            } => {
                let mut object = select_one(&mut tx, &kind, &id).await?;
                if let Some(expected) = if_revision {
                    if expected != object.revision {
                        return Err(StoreError::RevisionMismatch {
                            kind,
                            id,
                            expected,
                            actual: object.revision,
                        }
                        .into());
                    }
                }
                object.body = body;
                object.revision = revision;
                object.updated_at = at;
                sqlx::query(
                    "UPDATE objects SET body = $1, revision = $2, updated_at = $3 \
                     WHERE kind = $4 AND id = $5",
                )
                .bind(object.body.to_string())
                .bind(revision)
                .bind(&object.updated_at)
                .bind(&kind)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
                Change {
                    revision,
                    op: ChangeOp::Updated,
                    object,
                }
            }
            Write::Delete { kind, id } => {
                let mut object = select_one(&mut tx, &kind, &id).await?;
                sqlx::query("DELETE FROM objects WHERE kind = $1 AND id = $2")
                    .bind(&kind)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::from)?;
                object.revision = revision;
                object.updated_at = at;
                Change {
                    revision,
                    op: ChangeOp::Deleted,
                    object,
                }
            }
        };
        let o = &change.object;
        sqlx::query(
            "INSERT INTO changes (revision, op, kind, id, tenant, name, body, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(revision)
        .bind(change.op.as_str())
        .bind(&o.kind)
        .bind(&o.id)
        .bind(tenant_column(&o.tenant))
        .bind(&o.name)
        .bind(o.body.to_string())
        .bind(&o.created_at)
        .bind(&o.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        sqlx::query(
            "INSERT INTO audit (revision, at, actor, role, tenant, action, kind, object_id, \
             object_name, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(revision)
        .bind(&o.updated_at)
        .bind(&audit.actor)
        .bind(&audit.role)
        .bind(tenant_column(&o.tenant))
        .bind(&audit.action)
        .bind(&o.kind)
        .bind(&o.id)
        .bind(&o.name)
        .bind(&audit.request_id)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        if self.inner.backend == Backend::Postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(revision.to_string())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.advance_head(revision);
        Ok(change)
    }

    pub async fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Sets `key` only if it has no value yet; returns whether it did. Two
    /// servers starting at once on one database agree on a single value.
    pub async fn set_meta_if_absent(&self, key: &str, value: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.inner.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Closes the pool, waiting for connections to finish.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }
}

async fn select_one(
    conn: &mut sqlx::AnyConnection,
    kind: &str,
    id: &str,
) -> Result<Object, StoreError> {
    let sql = format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = $1 AND id = $2");
    let row = sqlx::query(&sql)
        .bind(kind)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(r) => object_from_row(&r, Some(kind)),
        None => Err(StoreError::NotFound {
            kind: kind.to_string(),
            id: id.to_string(),
        }),
    }
}

async fn select_all(
    conn: &mut sqlx::AnyConnection,
    kind: &str,
    tenant: &TenantFilter,
    name: Option<&str>,
) -> Result<Vec<Object>, StoreError> {
    let (cond, bind) = tenant.sql(2);
    let mut sql = format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE kind = $1 AND {cond}");
    let mut binds: Vec<String> = bind.into_iter().collect();
    if let Some(n) = name {
        sql.push_str(&format!(" AND name = ${}", 2 + binds.len()));
        binds.push(n.to_string());
    }
    sql.push_str(" ORDER BY id");
    let mut q = sqlx::query(&sql).bind(kind);
    for b in binds {
        q = q.bind(b);
    }
    let rows = q.fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| object_from_row(r, Some(kind)))
        .collect()
}

/// How many objects of `tenant` have a kind starting with `prefix`: a
/// range over the leading column of the `(kind, tenant, id)` index, so
/// it reads no bodies.
async fn count_kinds(
    conn: &mut sqlx::AnyConnection,
    prefix: &str,
    tenant: &TenantFilter,
) -> Result<u64, StoreError> {
    let (cond, bind) = tenant.sql(3);
    let sql = format!("SELECT COUNT(*) FROM objects WHERE kind >= $1 AND kind < $2 AND {cond}");
    // Every kind with the prefix sorts below the prefix with its last
    // byte raised; a prefix ending in 0xFF is never made (kinds are ASCII).
    let mut end = prefix.as_bytes().to_vec();
    match end.last_mut() {
        Some(b) if *b < 0x7f => *b += 1,
        _ => {
            return Err(StoreError::Corrupt(format!(
                "kind prefix {prefix:?} is not counted"
            )))
        }
    }
    let end = String::from_utf8(end).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let mut q = sqlx::query(&sql).bind(prefix).bind(end);
    if let Some(b) = bind {
        q = q.bind(b);
    }
    let n: i64 = q.fetch_one(&mut *conn).await?.try_get(0)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

#[cfg(feature = "testing")]
pub mod testing;
