-- Leases: which server runs the controllers (`controllers`), until when
-- (milliseconds of the database's clock), and the term it holds them in.
-- A term grows by one at each takeover; a store fenced to a term refuses
-- to write once another holds the lease.
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
