-- API keys of server-to-server callers (app.core.security.api_keys): only the
-- SHA-256 of each key's secret is kept; a revoked key stays, marked, for audit.
CREATE TABLE IF NOT EXISTS api_keys (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    revoked_at    TIMESTAMPTZ
);
