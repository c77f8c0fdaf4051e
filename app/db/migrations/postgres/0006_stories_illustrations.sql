-- Pictures kept in our own object store, drawn in the background (issue 14).
-- illustration_status: NULL (none asked for), 'pending', 'ready' or 'failed'.
-- A pending picture is held by one worker at a time: illustration_claim is the
-- holder's random token, illustration_locked_until the end of its lease.
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_status TEXT
    CHECK (illustration_status IN ('pending', 'ready', 'failed'));
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_key TEXT;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_media_type TEXT;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_bytes INTEGER;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_width INTEGER;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_height INTEGER;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_sha256 TEXT;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_error TEXT;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_claim TEXT;
ALTER TABLE stories ADD COLUMN IF NOT EXISTS illustration_locked_until TIMESTAMPTZ;

-- Stories illustrated before: the upstream's URL died an hour after it was drawn.
UPDATE stories
SET illustration_status = 'failed',
    illustration_error = CASE WHEN illustration_url IS NULL THEN 'not drawn'
                              ELSE 'upstream link expired' END
WHERE illustrate AND illustration_status IS NULL;

-- The sweep: pending pictures whose lease has lapsed, oldest first.
CREATE INDEX IF NOT EXISTS stories_illustration_pending_idx
    ON stories (illustration_locked_until) WHERE illustration_status = 'pending';
