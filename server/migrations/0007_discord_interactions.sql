-- Interactions already answered, by Discord's interaction id, kept for the
-- signature window (and a margin): a signed request captured and sent again
-- within the window is recognised by every server sharing the database.
CREATE TABLE discord_interactions (
    id TEXT PRIMARY KEY,
    seen_ms BIGINT NOT NULL
);
CREATE INDEX discord_interactions_seen ON discord_interactions (seen_ms);
