-- See the PostgreSQL migration of the same number. SQLite has no
-- ADD COLUMN IF NOT EXISTS: each migration runs in one transaction with the
-- row recording it (app/db/sqlite.py), so it is applied whole or not at all.
ALTER TABLE idempotency_keys ADD COLUMN claim_token TEXT;
