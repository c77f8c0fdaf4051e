-- Stories as generated, with who asked, what they asked, and what it cost.
CREATE TABLE IF NOT EXISTS stories (
    id                UUID PRIMARY KEY,
    owner             TEXT        NOT NULL,
    title             TEXT        NOT NULL,
    paragraphs        TEXT[]      NOT NULL,
    prompt            TEXT        NOT NULL,
    age               SMALLINT    NOT NULL CHECK (age BETWEEN 2 AND 12),
    length            TEXT        NOT NULL,
    language          TEXT        NOT NULL,
    provider          TEXT        NOT NULL,
    model             TEXT        NOT NULL,
    degraded          BOOLEAN     NOT NULL,
    illustration_url  TEXT,
    prompt_tokens     INTEGER     NOT NULL DEFAULT 0,
    completion_tokens INTEGER     NOT NULL DEFAULT 0,
    generation_ms     INTEGER     NOT NULL DEFAULT 0,
    created_at        TIMESTAMPTZ NOT NULL
);

-- Newest-first pages of one owner's stories (keyset pagination).
CREATE INDEX IF NOT EXISTS stories_owner_created_idx
    ON stories (owner, created_at DESC, id DESC);

-- Recommendations by age.
CREATE INDEX IF NOT EXISTS stories_owner_age_created_idx
    ON stories (owner, age, created_at DESC);
