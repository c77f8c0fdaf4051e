-- See the PostgreSQL migration of the same number.
ALTER TABLE stories ADD COLUMN illustration_status TEXT
    CHECK (illustration_status IN ('pending', 'ready', 'failed'));
ALTER TABLE stories ADD COLUMN illustration_key TEXT;
ALTER TABLE stories ADD COLUMN illustration_media_type TEXT;
ALTER TABLE stories ADD COLUMN illustration_bytes INTEGER;
ALTER TABLE stories ADD COLUMN illustration_width INTEGER;
ALTER TABLE stories ADD COLUMN illustration_height INTEGER;
ALTER TABLE stories ADD COLUMN illustration_sha256 TEXT;
ALTER TABLE stories ADD COLUMN illustration_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stories ADD COLUMN illustration_error TEXT;
ALTER TABLE stories ADD COLUMN illustration_claim TEXT;
ALTER TABLE stories ADD COLUMN illustration_locked_until TEXT;

UPDATE stories
SET illustration_status = 'failed',
    illustration_error = CASE WHEN illustration_url IS NULL THEN 'not drawn'
                              ELSE 'upstream link expired' END
WHERE illustrate = 1 AND illustration_status IS NULL;

CREATE INDEX IF NOT EXISTS stories_illustration_pending_idx
    ON stories (illustration_locked_until) WHERE illustration_status = 'pending';
