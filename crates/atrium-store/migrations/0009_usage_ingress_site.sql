-- The site a request entered at, when another site served it (forwarded
-- under the tenant's residency); empty when it was served where it
-- entered.
ALTER TABLE usage_records ADD COLUMN ingress_site TEXT NOT NULL DEFAULT '';
