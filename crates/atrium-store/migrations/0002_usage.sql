-- Usage reported by gateways. A batch is recorded once: its id is kept, so
-- a gateway that retries a batch it is unsure about creates no duplicates.
CREATE TABLE usage_batches (
    batch_id TEXT PRIMARY KEY,
    revision BIGINT NOT NULL
);

CREATE TABLE usage_records (
    revision BIGINT NOT NULL,
    idx BIGINT NOT NULL,
    at TEXT NOT NULL,
    tenant TEXT NOT NULL,
    deployment TEXT NOT NULL,
    site TEXT NOT NULL,
    replica TEXT NOT NULL,
    prompt_tokens BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    PRIMARY KEY (revision, idx)
);
CREATE INDEX usage_records_tenant ON usage_records (tenant, revision);
