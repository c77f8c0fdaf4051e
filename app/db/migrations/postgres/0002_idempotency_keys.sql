-- Idempotency-Key of POST /v1/stories: the first request with a key claims it
-- (state 'pending'), the story is stored and the key marked 'done' in one
-- transaction; repeats get the same story. A pending claim whose holder died
-- is taken over after locked_until. Keys are kept until expires_at (>= 24 h).
CREATE TABLE IF NOT EXISTS idempotency_keys (
    owner        TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    fingerprint  TEXT        NOT NULL,
    state        TEXT        NOT NULL CHECK (state IN ('pending', 'done')),
    story_id     UUID        REFERENCES stories (id) ON DELETE CASCADE,
    locked_until TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (owner, key)
);

CREATE INDEX IF NOT EXISTS idempotency_keys_expires_idx ON idempotency_keys (expires_at);
