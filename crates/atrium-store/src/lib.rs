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

mod migrate;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::{watch, Mutex};

/// The PostgreSQL channel on which committed revisions are announced.
const NOTIFY_CHANNEL: &str = "atrium_changes";

/// Errors of the store itself. Rule violations come back as
/// [`WriteError::Rejected`] with the caller's own error type.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("{kind} {id} not found")]
    NotFound { kind: String, id: String },
    /// Another object of the same kind and tenant has this name.
    #[error("a {kind} named {name:?} already exists")]
    NameTaken { kind: String, name: String },
    /// The object changed since the revision the caller based its write on.
    #[error("{kind} {id} is at revision {actual}, not {expected}")]
    RevisionMismatch {
        kind: String,
        id: String,
        expected: i64,
        actual: i64,
    },
    /// The database URL is neither `sqlite:` nor `postgres:`.
    #[error("unsupported database URL {0:?}: use sqlite://<path> or postgres://...")]
    UnsupportedUrl(String),
    /// A stored document does not parse; the database was edited by hand
    /// or by an incompatible version.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The database failed or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// The outcome of a conditional write.
#[derive(Debug, thiserror::Error)]
pub enum WriteError<E> {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller's precondition refused the write; nothing was written.
    #[error("rejected by precondition")]
    Rejected(E),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One stored resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub kind: String,
    pub id: String,
    /// Owning tenant, `None` for provider-level resources.
    pub tenant: Option<String>,
    pub name: String,
    pub body: Value,
    /// Revision of the last write to this object.
    pub revision: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOp {
    Created,
    Updated,
    Deleted,
}

impl ChangeOp {
    fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Created => "created",
            ChangeOp::Updated => "updated",
            ChangeOp::Deleted => "deleted",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "created" => Ok(ChangeOp::Created),
            "updated" => Ok(ChangeOp::Updated),
            "deleted" => Ok(ChangeOp::Deleted),
            other => Err(StoreError::Corrupt(format!("unknown change op {other:?}"))),
        }
    }
}

/// One entry of the change log: the object as it was after the change (for
/// a deletion, as it was when deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub revision: i64,
    pub op: ChangeOp,
    pub object: Object,
}

/// Which tenants' objects a read covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantFilter {
    /// Every object, whatever its tenant.
    All,
    /// Objects of exactly this tenant (`None`: provider-level objects).
    Exactly(Option<String>),
    /// A tenant's own objects plus provider-level (public) ones.
    OwnAndPublic(String),
}

impl TenantFilter {
    /// The SQL condition on column `tenant` and the value to bind at `$n`.
    fn sql(&self, n: usize) -> (String, Option<String>) {
        match self {
            TenantFilter::All => ("1 = 1".to_string(), None),
            TenantFilter::Exactly(t) => (
                format!("tenant = ${n}"),
                Some(t.clone().unwrap_or_default()),
            ),
            TenantFilter::OwnAndPublic(t) => (format!("tenant IN (${n}, '')"), Some(t.clone())),
        }
    }
}

/// A write.
#[derive(Debug, Clone)]
pub enum Write {
    Create {
        kind: String,
        id: String,
        tenant: Option<String>,
        name: String,
        body: Value,
    },
    /// Replaces the body; with `if_revision`, only if the object is still at
    /// that revision.
    Update {
        kind: String,
        id: String,
        body: Value,
        if_revision: Option<i64>,
    },
    Delete {
        kind: String,
        id: String,
    },
}

/// Objects a precondition reads: every object of `kind` that `tenant`
/// selects, or only the one called `name`.
#[derive(Debug, Clone)]
pub struct Selection {
    pub kind: String,
    pub tenant: TenantFilter,
    pub name: Option<String>,
}

/// The pure rule of a [`Precondition`].
pub type Check<E> = Box<dyn FnOnce(&[Vec<Object>]) -> Result<(), E> + Send>;

/// A check that must hold for a write to commit, evaluated inside the write
/// transaction (after writers are serialised) over what `reads` selects:
/// `check` gets one vector per selection, in order.
pub struct Precondition<E> {
    pub reads: Vec<Selection>,
    pub check: Check<E>,
}

/// Who made a write and why, recorded with it.
#[derive(Debug, Clone, Default)]
pub struct AuditContext {
    pub actor: String,
    pub role: String,
    pub action: String,
    pub request_id: String,
}

/// A stored audit event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub revision: i64,
    pub at: String,
    pub actor: String,
    pub role: String,
    pub tenant: Option<String>,
    pub action: String,
    pub kind: String,
    pub object_id: String,
    pub object_name: String,
    pub request_id: String,
}

/// One metered request, as a gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageRecord {
    pub at: String,
    pub tenant: String,
    pub deployment: String,
    /// The site that processed the request.
    pub site: String,
    pub replica: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// The gateway's id of the request; empty for records without one.
    pub request_id: String,
    /// Why the gateway recorded its own count rather than the replica's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
}

/// A page of objects and the revision the page was read at.
#[derive(Debug, Clone)]
pub struct Page {
    pub objects: Vec<Object>,
    pub revision: i64,
    /// Pass as `after` to read the next page; `None` on the last page.
    pub next_after: Option<String>,
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
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
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let pool = match backend {
            Backend::Sqlite => {
                let url = if url.contains('?') {
                    url.to_string()
                } else {
                    format!("{url}?mode=rwc")
                };
                AnyPoolOptions::new()
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
                    .await?
            }
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .connect(url)
                    .await?
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
                backend,
                head,
                sqlite_writer: Mutex::new(()),
            }),
        };
        if backend == Backend::Postgres {
            store.spawn_postgres_listener(url.to_string());
        }
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Follows revisions committed by other processes sharing the database.
    /// A notification carries the committed revision; a periodic read of the
    /// head covers notifications lost while reconnecting.
    fn spawn_postgres_listener(&self, url: String) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
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
                    let store = Store { inner };
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
    /// first, at most `limit`, optionally of one kind and tenant filter.
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
            (p.check)(&read).map_err(WriteError::Rejected)?;
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

    /// Audit events after revision `after`, oldest first, at most `limit`.
    pub async fn audit(
        &self,
        tenant: &TenantFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let (cond, bind) = tenant.sql(2);
        let sql = format!(
            "SELECT revision, at, actor, role, tenant, action, kind, object_id, object_name, \
             request_id FROM audit WHERE revision > $1 AND {cond} ORDER BY revision LIMIT {limit}"
        );
        let mut q = sqlx::query(&sql).bind(after);
        if let Some(b) = bind {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&self.inner.pool).await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEvent {
                    revision: r.try_get("revision")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    role: r.try_get("role")?,
                    tenant: tenant_from_column(r.try_get("tenant")?),
                    action: r.try_get("action")?,
                    kind: r.try_get("kind")?,
                    object_id: r.try_get("object_id")?,
                    object_name: r.try_get("object_name")?,
                    request_id: r.try_get("request_id")?,
                })
            })
            .collect()
    }

    /// Records a batch of usage once: returns false (and writes nothing)
    /// when a batch with this id was recorded before.
    pub async fn record_usage(
        &self,
        batch_id: &str,
        records: &[UsageRecord],
    ) -> Result<bool, StoreError> {
        let (_writer, mut tx, revision) = self.begin_write().await?;
        let fresh = sqlx::query("INSERT INTO usage_batches (batch_id, revision) VALUES ($1, $2) ON CONFLICT (batch_id) DO NOTHING")
            .bind(batch_id)
            .bind(revision)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !fresh {
            tx.rollback().await?;
            return Ok(false);
        }
        // The whole batch is one JSON parameter the database takes apart,
        // one statement per batch: sqlx binds SQLite parameters by name (a
        // lookup linear in the statement's parameters), so binding ten per
        // row capped statements at 16 rows. The control plane's CPU per
        // metered request is about the same either way (8–9 µs in `atrium
        // bench gateway`: decoding the batch and SQLite's row work).
        let sql = match self.inner.backend {
            Backend::Sqlite => {
                "INSERT INTO usage_records (revision, idx, at, tenant, deployment, site, replica, \
                 prompt_tokens, completion_tokens, request_id, flag) \
                 SELECT $1, CAST(j.key AS INTEGER), j.value ->> 'at', j.value ->> 'tenant', \
                 j.value ->> 'deployment', j.value ->> 'site', j.value ->> 'replica', \
                 j.value ->> 'prompt_tokens', j.value ->> 'completion_tokens', j.value ->> 'request_id', \
                 j.value ->> 'flag' \
                 FROM json_each($2) AS j"
            }
            Backend::Postgres => {
                "INSERT INTO usage_records (revision, idx, at, tenant, deployment, site, replica, \
                 prompt_tokens, completion_tokens, request_id, flag) \
                 SELECT $1, t.ord - 1, t.r ->> 'at', t.r ->> 'tenant', t.r ->> 'deployment', \
                 t.r ->> 'site', t.r ->> 'replica', (t.r ->> 'prompt_tokens')::bigint, \
                 (t.r ->> 'completion_tokens')::bigint, t.r ->> 'request_id', t.r ->> 'flag' \
                 FROM jsonb_array_elements($2::jsonb) WITH ORDINALITY AS t(r, ord)"
            }
        };
        let batch = serde_json::to_string(records)
            .map_err(|e| StoreError::Corrupt(format!("usage batch not serialisable: {e}")))?;
        sqlx::query(sql)
            .bind(revision)
            .bind(batch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.advance_head(revision);
        Ok(true)
    }

    /// Usage records after revision `after`, oldest first, with the revision
    /// of the batch that carried each.
    pub async fn usage(
        &self,
        tenant: &TenantFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<(i64, UsageRecord)>, StoreError> {
        let (cond, bind) = tenant.sql(2);
        let sql = format!(
            "SELECT revision, at, tenant, deployment, site, replica, prompt_tokens, completion_tokens, request_id, flag \
             FROM usage_records WHERE revision > $1 AND {cond} ORDER BY revision, idx LIMIT {limit}"
        );
        let mut q = sqlx::query(&sql).bind(after);
        if let Some(b) = bind {
            q = q.bind(b);
        }
        let rows = q.fetch_all(&self.inner.pool).await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("revision")?,
                    UsageRecord {
                        at: r.try_get("at")?,
                        tenant: r.try_get("tenant")?,
                        deployment: r.try_get("deployment")?,
                        site: r.try_get("site")?,
                        replica: r.try_get("replica")?,
                        prompt_tokens: r.try_get("prompt_tokens")?,
                        completion_tokens: r.try_get("completion_tokens")?,
                        request_id: r.try_get("request_id")?,
                        flag: r.try_get("flag")?,
                    },
                ))
            })
            .collect()
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

#[cfg(feature = "testing")]
pub mod testing;
