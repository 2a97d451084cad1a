-- One counter row: every mutation bumps it first, inside its transaction.
-- Taking this row serialises writers (a row lock on PostgreSQL, the write
-- lock on SQLite), so revisions commit in the order they are issued and a
-- watcher that has seen revision N has seen everything before it.
CREATE TABLE atrium_revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO atrium_revision (id, value) VALUES (1, 0);

-- Current state of every resource. `tenant` is '' for provider-level
-- resources so the uniqueness of names holds for them too.
CREATE TABLE objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    revision BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, id),
    UNIQUE (kind, tenant, name)
);
CREATE INDEX objects_tenant ON objects (kind, tenant, id);

-- Every change, in revision order: the source of watch streams.
CREATE TABLE changes (
    revision BIGINT PRIMARY KEY,
    op TEXT NOT NULL,
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX changes_kind ON changes (kind, revision);

-- Who did what: one row per mutation, written in the same transaction.
CREATE TABLE audit (
    revision BIGINT PRIMARY KEY,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    tenant TEXT NOT NULL,
    action TEXT NOT NULL,
    kind TEXT NOT NULL,
    object_id TEXT NOT NULL,
    object_name TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX audit_tenant ON audit (tenant, revision);

-- Small facts about the installation (e.g. the admin token's digest).
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
