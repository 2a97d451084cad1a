-- The gateway's id of each metered request (`x-request-id`), so a tenant
-- can match its bill to its responses and duplicates can be seen.
ALTER TABLE usage_records ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
