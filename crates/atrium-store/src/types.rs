//! What the store takes and gives: objects, writes and their
//! preconditions, changes, audit events, usage records, and its errors.

use serde_json::Value;

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
    /// A PostgreSQL URL that cannot be used as given.
    #[error("database URL: {0}")]
    BadUrl(String),
    /// None of the database's hosts is a writable primary (now).
    #[error("no PostgreSQL primary among the database's hosts: {0}")]
    NoPrimary(String),
    /// A stored document does not parse; the database was edited by hand
    /// or by an incompatible version.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Changes after `requested` were asked for, but the change log keeps
    /// only those after `oldest`: list again, then follow from there.
    #[error("changes after revision {requested} were compacted (the log keeps those after {oldest}): list again")]
    Compacted { requested: i64, oldest: i64 },
    /// This store's writes are fenced to a lease term another holder
    /// has since taken: it is no longer the leader.
    #[error("lease {name:?} of term {term} is now {holder:?}'s in term {current}: this server no longer leads")]
    Fenced {
        name: String,
        term: i64,
        holder: String,
        current: i64,
    },
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
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Created => "created",
            ChangeOp::Updated => "updated",
            ChangeOp::Deleted => "deleted",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Self, StoreError> {
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
    pub(crate) fn sql(&self, n: usize) -> (String, Option<String>) {
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

/// Objects a precondition counts without reading them: those of every
/// kind that starts with `kind_prefix`, of `tenant`.
#[derive(Debug, Clone)]
pub struct Count {
    pub kind_prefix: String,
    pub tenant: TenantFilter,
}

/// The pure rule of a [`Precondition`]: what `reads` selected, then what
/// `counts` counted.
pub type Check<E> = Box<dyn FnOnce(&[Vec<Object>], &[u64]) -> Result<(), E> + Send>;

/// A check that must hold for a write to commit, evaluated inside the write
/// transaction (after writers are serialised) over what `reads` selects
/// and `counts` counts: `check` gets one vector per selection and one
/// number per count, in order.
pub struct Precondition<E> {
    pub reads: Vec<Selection>,
    pub counts: Vec<Count>,
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

impl AuditContext {
    /// A write the control plane makes on its own (a controller, a sweep),
    /// recorded under `actor` with the `system` role.
    pub fn system(actor: impl Into<String>, action: impl Into<String>) -> AuditContext {
        AuditContext {
            actor: actor.into(),
            role: "system".into(),
            action: action.into(),
            request_id: String::new(),
        }
    }
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
    /// The Batch API job the request ran for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// How many requests it sums (1 for a request's own record).
    pub requests: i64,
    /// The site the requests entered at, when another served them; empty
    /// when served where they entered.
    pub ingress_site: String,
}

/// A page of objects and the revision the page was read at.
#[derive(Debug, Clone)]
pub struct Page {
    pub objects: Vec<Object>,
    pub revision: i64,
    /// Pass as `after` to read the next page; `None` on the last page.
    pub next_after: Option<String>,
}
