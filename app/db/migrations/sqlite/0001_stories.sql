-- Same contract as the PostgreSQL schema; times are ISO 8601 UTC text with
-- microseconds (sorts like the instant it names), paragraphs a JSON array.
CREATE TABLE IF NOT EXISTS stories (
    id                TEXT PRIMARY KEY,
    owner             TEXT    NOT NULL,
    title             TEXT    NOT NULL,
    paragraphs        TEXT    NOT NULL,
    prompt            TEXT    NOT NULL,
    age               INTEGER NOT NULL CHECK (age BETWEEN 2 AND 12),
    length            TEXT    NOT NULL,
    language          TEXT    NOT NULL,
    provider          TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    degraded          INTEGER NOT NULL,
    illustration_url  TEXT,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    generation_ms     INTEGER NOT NULL DEFAULT 0,
    created_at        TEXT    NOT NULL
);

CREATE INDEX IF NOT EXISTS stories_owner_created_idx
    ON stories (owner, created_at DESC, id DESC);

CREATE INDEX IF NOT EXISTS stories_owner_age_created_idx
    ON stories (owner, age, created_at DESC);
