-- Motif as a Discord app. Portable SQL as in 0001 (Unix ms BIGINT times).

-- A Discord user's Motif account, made on their first command.
CREATE TABLE discord_users (
    discord_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- A job queued from Discord, and where its result goes: the interaction's
-- webhook (its token lasts 15 minutes from token_expires_ms - 15 min) or,
-- after that, the channel through the bot. posted_ms stays NULL until the
-- result is posted or given up; claimed_until_ms keeps two servers sharing a
-- database from posting the same result twice.
CREATE TABLE discord_jobs (
    job_id TEXT PRIMARY KEY,
    discord_id TEXT NOT NULL,
    application_id TEXT NOT NULL,
    interaction_token TEXT NOT NULL,
    token_expires_ms BIGINT NOT NULL,
    channel_id TEXT,
    created_ms BIGINT NOT NULL,
    posted_ms BIGINT,
    claimed_until_ms BIGINT NOT NULL,
    attempts BIGINT NOT NULL
);
CREATE INDEX discord_jobs_unposted ON discord_jobs (posted_ms, claimed_until_ms);

-- A clip shown in a Discord channel has a page anyone with its link can open,
-- but it is listed in the gallery (index, search) only once its author
-- publishes it. Clips published before this are listed.
ALTER TABLE clips ADD COLUMN listed BIGINT NOT NULL DEFAULT 1;
