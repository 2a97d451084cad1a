-- The Batch API job a request ran for; NULL for a tenant's own request.
-- Batch usage is billed apart (OpenAI bills it at a discount).
ALTER TABLE usage_records ADD COLUMN batch TEXT;
