//! The metadata store and job queue: one set of SQL statements for SQLite
//! (embedded, one file in the data folder) and PostgreSQL (shared by a server
//! and remote workers), through sqlx's Any driver. The only difference is the
//! claim: PostgreSQL locks the chosen row with `FOR UPDATE SKIP LOCKED` so
//! that concurrent workers never take the same job; SQLite serialises all
//! writes anyway (and the pool has one connection).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Job states as stored.
pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const FINISHED: &str = "finished";
pub const FAILED: &str = "failed";
pub const CANCELLED: &str = "cancelled";

/// Added to this process's clock: set only by tests (`--clock-offset-seconds`)
/// to play machines whose clocks disagree.
static CLOCK_OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// Shifts [`now_ms`] for the whole process (tests only).
pub fn set_clock_offset_ms(offset: i64) {
    CLOCK_OFFSET_MS.store(offset, Ordering::Relaxed);
}

/// This process's clock in Unix milliseconds: for times shown and rates
/// counted on one machine. Leases use the database's clock ([`Db::now_sql`]).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
        + CLOCK_OFFSET_MS.load(Ordering::Relaxed)
}

/// How long a request waits for a database connection before giving up
/// (`--db-acquire-timeout-seconds`): short, so that during an outage clients
/// get a 503 soon instead of hanging.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `e` means the database cannot be reached right now (no connection
/// within the acquire timeout, or the connection broke), as opposed to a
/// statement it refused: a 503 to clients, a retry to workers.
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<sqlx::Error>(),
            Some(
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::WorkerCrashed
            )
        )
    })
}

#[derive(Clone)]
pub struct Db {
    pub(crate) pool: AnyPool,
    postgres: bool,
}

#[derive(Debug, Clone)]
pub struct Token {
    pub id: String,
    pub admin: bool,
    /// The gallery member who owns it (None: a token from before accounts).
    pub user_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub token_id: String,
    pub state: String,
    pub request: String,
    pub format: String,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub attempts: i64,
    pub worker: Option<String>,
    pub cancel_requested: bool,
    pub step: i64,
    pub total: i64,
    pub preview: Option<String>,
    pub error: Option<String>,
    pub clip: Option<String>,
    pub recipe: Option<String>,
}

impl JobRow {
    /// The job's fields, read as a submission is ([`crate::JobRequest`]);
    /// `None` for a row no release of this server wrote.
    pub fn job_request(&self) -> Option<crate::JobRequest> {
        serde_json::from_str(&self.request).ok()
    }
}

/// What a worker learns from a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Held { cancel_requested: bool },
    Lost,
}

const JOB_COLUMNS: &str =
    "id, token_id, state, request, format, created_ms, started_ms, finished_ms, \
     attempts, worker, cancel_requested, step, total, preview, error, clip, recipe";

fn job_from_row(row: &AnyRow) -> Result<JobRow> {
    Ok(JobRow {
        id: row.try_get("id")?,
        token_id: row.try_get("token_id")?,
        state: row.try_get("state")?,
        request: row.try_get("request")?,
        format: row.try_get("format")?,
        created_ms: row.try_get("created_ms")?,
        started_ms: row.try_get("started_ms")?,
        finished_ms: row.try_get("finished_ms")?,
        attempts: row.try_get("attempts")?,
        worker: row.try_get("worker")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        step: row.try_get("step")?,
        total: row.try_get("total")?,
        preview: row.try_get("preview")?,
        error: row.try_get("error")?,
        clip: row.try_get("clip")?,
        recipe: row.try_get("recipe")?,
    })
}

/// A new job as the API accepted it.
pub struct NewJob<'a> {
    pub id: &'a str,
    pub token_id: &'a str,
    pub request: &'a str,
    pub image: Option<&'a str>,
    /// The still a first-last-frame job ends on.
    pub last_image: Option<&'a str>,
    pub format: &'a str,
}

impl Db {
    /// Opens (creating if needed) the database at `url` and brings its
    /// schema up to date.
    pub async fn connect(url: &str) -> Result<Db> {
        Db::connect_with(url, DEFAULT_ACQUIRE_TIMEOUT).await
    }

    /// [`Db::connect`], waiting at most `acquire_timeout` for a connection
    /// (here and in every later statement).
    pub async fn connect_with(url: &str, acquire_timeout: Duration) -> Result<Db> {
        let db = Db::open(url, acquire_timeout).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Reaches the database at `url`, without touching its schema: the step
    /// that fails while the database is down.
    pub async fn open(url: &str, acquire_timeout: Duration) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let postgres = url.starts_with("postgres:") || url.starts_with("postgresql:");
        let options = if postgres {
            AnyPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(acquire_timeout)
        } else {
            // One connection: SQLite takes one writer at a time, and in WAL mode a
            // second connection whose read snapshot went stale fails its write with
            // SQLITE_BUSY instead of waiting. Statements here are all short.
            AnyPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(acquire_timeout)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // Another process (`motif admin create-token`) may hold the lock briefly.
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        Ok(())
                    })
                })
        };
        let pool = options
            .connect(url)
            .await
            .with_context(|| format!("connecting to the database {}", redact(url)))?;
        if !postgres {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .context("switching SQLite to WAL")?;
        }
        Ok(Db { pool, postgres })
    }

    /// Brings the schema up to date.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .context("migrating the database schema")
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    /// The database's clock in Unix milliseconds, as an SQL expression: lease
    /// times are written and compared on one clock however far the clocks of
    /// the machines sharing the queue drift apart.
    fn now_sql(&self) -> &'static str {
        if self.postgres {
            "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
        } else {
            // julianday counts days from noon, 24 November 4714 BC; the Unix
            // epoch is day 2440587.5.
            "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"
        }
    }

    pub async fn insert_token(&self, id: &str, hash: &str, admin: bool) -> Result<()> {
        sqlx::query("INSERT INTO tokens (id, hash, admin, created_ms) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(hash)
            .bind(admin as i64)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The token with this hash, unless it was revoked.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<Token>> {
        let row = sqlx::query(
            "SELECT id, admin, user_id FROM tokens WHERE hash = $1 AND revoked_ms IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Token {
                id: r.try_get("id")?,
                admin: r.try_get::<i64, _>("admin")? != 0,
                user_id: r.try_get("user_id")?,
            })
        })
        .transpose()
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobRow>> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub async fn job_image(&self, id: &str) -> Result<Option<String>> {
        self.job_still(id, "image").await
    }

    /// The still a first-last-frame job ends on.
    pub async fn job_last_image(&self, id: &str) -> Result<Option<String>> {
        self.job_still(id, "last_image").await
    }

    /// `column` is one of the two above, never a caller's text.
    async fn job_still(&self, id: &str, column: &'static str) -> Result<Option<String>> {
        let row = sqlx::query(&format!("SELECT {column} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get(column)?,
            None => None,
        })
    }

    /// Newest first; `token_id` None lists everyone's.
    pub async fn list_jobs(
        &self,
        token_id: Option<&str>,
        state: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 = '' OR token_id = $2) AND ($3 = '' OR state = $4) \
             ORDER BY created_ms DESC, id DESC LIMIT $5"
        );
        let owner = token_id.unwrap_or("");
        let state = state.unwrap_or("");
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(owner)
            .bind(state)
            .bind(state)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    /// Jobs ahead of this queued job (0: it is next).
    pub async fn queue_position(&self, job: &JobRow) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE state = $1 AND \
             (created_ms < $2 OR (created_ms = $3 AND id < $4))",
        )
        .bind(QUEUED)
        .bind(job.created_ms)
        .bind(job.created_ms)
        .bind(&job.id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Queued or running jobs of a token.
    pub async fn active_jobs(&self, token_id: &str) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE token_id = $1 AND (state = $2 OR state = $3)",
        )
        .bind(token_id)
        .bind(QUEUED)
        .bind(RUNNING)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    /// Submission times (ms) of a token since `since_ms`, newest first, at
    /// most `limit` of them.
    pub async fn submissions_since(
        &self,
        token_id: &str,
        since_ms: i64,
        limit: i64,
    ) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT created_ms FROM jobs WHERE token_id = $1 AND created_ms >= $2 \
             ORDER BY created_ms DESC LIMIT $3",
        )
        .bind(token_id)
        .bind(since_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<i64, _>("created_ms")?))
            .collect()
    }

    /// A queued job is cancelled at once; a running one is asked to stop
    /// (its worker sees the flag at its next heartbeat). Returns the job as it
    /// is afterwards.
    pub async fn cancel(&self, id: &str) -> Result<Option<JobRow>> {
        sqlx::query(
            "UPDATE jobs SET state = $1, finished_ms = $2, preview = NULL WHERE id = $3 AND state = $4",
        )
        .bind(CANCELLED)
        .bind(now_ms())
        .bind(id)
        .bind(QUEUED)
        .execute(&self.pool)
        .await?;
        sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1 AND state = $2")
            .bind(id)
            .bind(RUNNING)
            .execute(&self.pool)
            .await?;
        self.job(id).await
    }

    /// Jobs whose worker stopped renewing its lease: re-queued while they have
    /// attempts left, else failed; cancelled if a cancel was asked for.
    /// Returns how many were touched.
    pub async fn reclaim_expired(&self, max_attempts: i64) -> Result<u64> {
        let now = now_ms();
        let db_now = self.now_sql();
        let cancelled = sqlx::query(&format!(
            "UPDATE jobs SET state = $1, finished_ms = $2, worker = NULL, lease_until_ms = NULL \
             WHERE state = $3 AND lease_until_ms < {db_now} AND cancel_requested = 1"
        ))
        .bind(CANCELLED)
        .bind(now)
        .bind(RUNNING)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let failed = sqlx::query(&format!(
            "UPDATE jobs SET state = $1, finished_ms = $2, worker = NULL, lease_until_ms = NULL, \
             error = COALESCE(error || '; ', '') || $3 \
             WHERE state = $4 AND lease_until_ms < {db_now} AND attempts >= $5"
        ))
        .bind(FAILED)
        .bind(now)
        .bind(format!(
            "its worker stopped without finishing it {max_attempts} times (attempt limit)"
        ))
        .bind(RUNNING)
        .bind(max_attempts)
        .execute(&self.pool)
        .await?
        .rows_affected();
        let requeued = sqlx::query(&format!(
            "UPDATE jobs SET state = $1, worker = NULL, lease_until_ms = NULL, step = 0, total = 0, \
             preview = NULL WHERE state = $2 AND lease_until_ms < {db_now}"
        ))
        .bind(QUEUED)
        .bind(RUNNING)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(cancelled + failed + requeued)
    }

    /// SQLite only, at start-up: no other process can hold a lease on an
    /// embedded database, so every running job belonged to a server that died.
    pub async fn expire_all_leases(&self) -> Result<()> {
        sqlx::query("UPDATE jobs SET lease_until_ms = 0 WHERE state = $1")
            .bind(RUNNING)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes the oldest queued job for `worker` with a lease until
    /// `lease_until_ms`.
    pub async fn claim(&self, worker: &str, lease_ms: i64) -> Result<Option<JobRow>> {
        let now = now_ms();
        let lock = if self.postgres {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let db_now = self.now_sql();
        let sql = format!(
            "UPDATE jobs SET state = $1, worker = $2, lease_until_ms = {db_now} + $3, started_ms = $4, \
             attempts = attempts + 1, step = 0, total = 0, preview = NULL \
             WHERE id = (SELECT id FROM jobs WHERE state = $5 ORDER BY created_ms, id LIMIT 1{lock}) \
             AND state = $6 RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(RUNNING)
            .bind(worker)
            .bind(lease_ms)
            .bind(now)
            .bind(QUEUED)
            .bind(QUEUED)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Renews the lease and records progress.
    pub async fn heartbeat(
        &self,
        id: &str,
        worker: &str,
        lease_ms: i64,
        step: i64,
        total: i64,
        preview: Option<&str>,
    ) -> Result<Lease> {
        let row = sqlx::query(&format!(
            "UPDATE jobs SET lease_until_ms = {} + $1, step = $2, total = $3, preview = COALESCE($4, preview) \
             WHERE id = $5 AND worker = $6 AND state = $7 RETURNING cancel_requested",
            self.now_sql()
        ))
        .bind(lease_ms)
        .bind(step)
        .bind(total)
        .bind(preview)
        .bind(id)
        .bind(worker)
        .bind(RUNNING)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Lease::Held {
                cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
            },
            None => Lease::Lost,
        })
    }

    /// Marks the job finished with its files, if this worker still holds it.
    pub async fn finish(&self, id: &str, worker: &str, clip: &str, recipe: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET state = $1, finished_ms = $2, clip = $3, recipe = $4, lease_until_ms = NULL, \
             step = total, error = NULL WHERE id = $5 AND worker = $6 AND state = $7",
        )
        .bind(FINISHED)
        .bind(now_ms())
        .bind(clip)
        .bind(recipe)
        .bind(id)
        .bind(worker)
        .bind(RUNNING)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// A run ended with an error: back to the queue while attempts remain,
    /// else failed with this error (at once where `max_attempts` is 0).
    /// Returns the job's state afterwards; None if this worker no longer held it.
    pub async fn fail(
        &self,
        id: &str,
        worker: &str,
        error: &str,
        max_attempts: i64,
    ) -> Result<Option<String>> {
        let now = now_ms();
        let row = sqlx::query(
            "UPDATE jobs SET state = CASE WHEN attempts >= $1 THEN $2 ELSE $3 END, \
             finished_ms = CASE WHEN attempts >= $4 THEN $5 ELSE NULL END, \
             error = $6, worker = NULL, lease_until_ms = NULL, step = 0, total = 0, preview = NULL \
             WHERE id = $7 AND worker = $8 AND state = $9 RETURNING state",
        )
        .bind(max_attempts)
        .bind(FAILED)
        .bind(QUEUED)
        .bind(max_attempts)
        .bind(now)
        .bind(error)
        .bind(id)
        .bind(worker)
        .bind(RUNNING)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get("state")).transpose()?)
    }

    pub async fn mark_cancelled(&self, id: &str, worker: &str) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET state = $1, finished_ms = $2, worker = NULL, lease_until_ms = NULL \
             WHERE id = $3 AND worker = $4 AND state = $5",
        )
        .bind(CANCELLED)
        .bind(now_ms())
        .bind(id)
        .bind(worker)
        .bind(RUNNING)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A worker that shuts down cleanly puts its job back without spending an attempt.
    pub async fn release(&self, id: &str, worker: &str) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET state = $1, worker = NULL, lease_until_ms = NULL, attempts = attempts - 1, \
             step = 0, total = 0, preview = NULL WHERE id = $2 AND worker = $3 AND state = $4",
        )
        .bind(QUEUED)
        .bind(id)
        .bind(worker)
        .bind(RUNNING)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
