-- A member can revoke an API token. The row stays, marked, because the jobs
-- the token queued belong to the member through it (jobs.token_id); the API
-- refuses a revoked token and /me no longer lists it.
ALTER TABLE tokens ADD COLUMN revoked_ms BIGINT;
