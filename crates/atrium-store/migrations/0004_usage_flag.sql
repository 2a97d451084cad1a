-- Why a gateway recorded its own count instead of the replica's (an
-- upstream reported usage outside what the request could produce); NULL
-- when the replica's count was used as reported.
ALTER TABLE usage_records ADD COLUMN flag TEXT;
