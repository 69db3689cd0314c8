-- Portable SQL: the same migration runs on SQLite and PostgreSQL (sqlx's Any
-- driver). Times are Unix milliseconds and flags 0/1 integers, because the Any
-- driver has no portable timestamp or boolean type.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    admin BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    -- queued, running, finished, failed, cancelled
    state TEXT NOT NULL,
    -- the submitted recipe fields (JSON, without the still)
    request TEXT NOT NULL,
    -- the uploaded still, base64, or NULL
    image TEXT,
    format TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    started_ms BIGINT,
    finished_ms BIGINT,
    -- claims so far: a claim whose worker died counts
    attempts BIGINT NOT NULL,
    worker TEXT,
    lease_until_ms BIGINT,
    cancel_requested BIGINT NOT NULL,
    step BIGINT NOT NULL,
    total BIGINT NOT NULL,
    -- the latest preview grid, a data: URL of a PNG
    preview TEXT,
    error TEXT,
    -- clip and recipe file names inside the clip store, set only once both exist
    clip TEXT,
    recipe TEXT
);

CREATE INDEX jobs_by_state ON jobs (state, created_ms);
CREATE INDEX jobs_by_token ON jobs (token_id, created_ms);
