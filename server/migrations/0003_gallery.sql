-- The community gallery: accounts, their sessions, published clips, likes and
-- reports. Portable SQL as in 0001 (Unix ms BIGINT times, 0/1 BIGINT flags).

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    -- as typed at sign-up; unique ignoring case through name_key
    name TEXT NOT NULL,
    name_key TEXT NOT NULL UNIQUE,
    -- argon2id, PHC string format
    password_hash TEXT NOT NULL,
    admin BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- The cookie holds a random secret; only its SHA-256 is stored.
CREATE TABLE sessions (
    hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);

-- API tokens belong to accounts. Tokens created before accounts existed keep
-- a NULL owner and stay valid.
ALTER TABLE tokens ADD COLUMN user_id TEXT;
CREATE INDEX tokens_by_user ON tokens (user_id);

-- A published clip: a finished job shown in the gallery. The prompt, style
-- and camera are copied from the job's request for search and filters.
CREATE TABLE clips (
    job_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    style TEXT NOT NULL,
    camera TEXT NOT NULL,
    published_ms BIGINT NOT NULL,
    hidden BIGINT NOT NULL,
    likes BIGINT NOT NULL
);
CREATE INDEX clips_by_time ON clips (hidden, published_ms);
CREATE INDEX clips_by_likes ON clips (hidden, likes, published_ms);

CREATE TABLE likes (
    job_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, user_id)
);

CREATE TABLE reports (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX reports_by_time ON reports (created_ms);
