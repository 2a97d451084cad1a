-- How many requests a usage record sums: 1 for a request's own record,
-- more for a gateway's aggregate of one (deployment, site, replica,
-- minute, batch, flag).
ALTER TABLE usage_records ADD COLUMN requests BIGINT NOT NULL DEFAULT 1;
