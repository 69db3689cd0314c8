//! Per-member limits on jobs and API tokens, checked and applied in one
//! transaction that holds the member's lock, so that parallel requests cannot
//! all pass the same count before any of them inserts.
//!
//! The lock is the member's `users` row (`SELECT … FOR UPDATE`) on
//! PostgreSQL, and the database's write lock (`BEGIN IMMEDIATE`) on SQLite,
//! which takes one writer at a time anyway. A token that belongs to no member
//! (one from before accounts, `motif admin create-token`) is its own scope and
//! locks its own row.

use anyhow::{Context, Result};
use sqlx::{Any, Row, Transaction};

use crate::accounts::{web_token_id, User};
use crate::db::{now_ms, Db, NewJob, QUEUED, RUNNING};
use crate::{hash_token, random_hex};

/// What a submission is held to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JobQuota {
    /// Queued plus running jobs of a member (all their tokens together).
    pub max_active: i64,
    /// Jobs a member may submit in any 60 seconds.
    pub per_minute: i64,
}

/// The outcome of [`Db::insert_job_within_quota`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Accepted,
    /// `active` jobs are queued or running already.
    TooManyActive {
        active: i64,
    },
    /// The per-minute limit is spent; a slot frees in `wait_s` seconds.
    TooManyRecent {
        wait_s: u64,
    },
}

/// Whose jobs count together: a member's tokens, or one token of no member.
enum Scope {
    Member(String),
    Token(String),
}

impl Scope {
    /// The jobs of this scope, as a condition on `jobs.token_id` with its one parameter.
    fn jobs_condition(&self, param: usize) -> (String, &str) {
        match self {
            Scope::Member(user) => (
                format!("token_id IN (SELECT id FROM tokens WHERE user_id = ${param})"),
                user,
            ),
            Scope::Token(token) => (format!("token_id = ${param}"), token),
        }
    }
}

impl Db {
    /// A transaction that no other limit check can interleave with on
    /// SQLite: `BEGIN IMMEDIATE` takes the write lock at once, where a plain
    /// `BEGIN` would let another process read the same counts first.
    async fn begin_locked(&self) -> Result<Transaction<'static, Any>> {
        let tx = if self.is_postgres() {
            self.pool.begin().await?
        } else {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        };
        Ok(tx)
    }

    /// Locks a member's row until the transaction ends (PostgreSQL; SQLite's
    /// write lock is held already).
    async fn lock_member(&self, tx: &mut Transaction<'static, Any>, user_id: &str) -> Result<()> {
        if self.is_postgres() {
            sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
                .bind(user_id)
                .fetch_optional(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The scope a token's jobs count in, with its lock taken.
    async fn lock_scope(
        &self,
        tx: &mut Transaction<'static, Any>,
        token_id: &str,
    ) -> Result<Scope> {
        let lock = if self.is_postgres() {
            " FOR UPDATE"
        } else {
            ""
        };
        let row = sqlx::query(&format!("SELECT user_id FROM tokens WHERE id = $1{lock}"))
            .bind(token_id)
            .fetch_optional(&mut **tx)
            .await?;
        let user: Option<String> = match row {
            Some(r) => r.try_get("user_id")?,
            None => None,
        };
        Ok(match user {
            Some(user) => {
                self.lock_member(tx, &user).await?;
                Scope::Member(user)
            }
            None => Scope::Token(token_id.to_string()),
        })
    }

    /// Queues the job if its member (or its token, when no member owns it)
    /// is within both limits; the count and the insert happen under one lock.
    pub(crate) async fn insert_job_within_quota(
        &self,
        job: &NewJob<'_>,
        quota: JobQuota,
    ) -> Result<Admission> {
        let mut tx = self.begin_locked().await?;
        let scope = self.lock_scope(&mut tx, job.token_id).await?;
        let (condition, key) = scope.jobs_condition(1);
        let active: i64 = sqlx::query(&format!(
            "SELECT COUNT(*) AS n FROM jobs WHERE {condition} AND (state = $2 OR state = $3)"
        ))
        .bind(key)
        .bind(QUEUED)
        .bind(RUNNING)
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if active >= quota.max_active {
            return Ok(Admission::TooManyActive { active });
        }
        let now = now_ms();
        let recent = sqlx::query(&format!(
            "SELECT created_ms FROM jobs WHERE {condition} AND created_ms >= $2 \
             ORDER BY created_ms DESC LIMIT $3"
        ))
        .bind(key)
        .bind(now - 60_000)
        .bind(quota.per_minute)
        .fetch_all(&mut *tx)
        .await?;
        if recent.len() as i64 >= quota.per_minute {
            // A slot frees when the oldest of the last `per_minute` submissions turns a minute old.
            let oldest: i64 = match recent.last() {
                Some(r) => r.try_get("created_ms")?,
                None => now,
            };
            let wait_s = ((oldest + 60_000 - now).max(0) as u64)
                .div_ceil(1000)
                .max(1);
            return Ok(Admission::TooManyRecent { wait_s });
        }
        sqlx::query(
            "INSERT INTO jobs (id, token_id, state, request, image, last_image, format, created_ms, \
             attempts, cancel_requested, step, total) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, 0, 0, 0)",
        )
        .bind(job.id)
        .bind(job.token_id)
        .bind(QUEUED)
        .bind(job.request)
        .bind(job.image)
        .bind(job.last_image)
        .bind(job.format)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.context("committing the job")?;
        Ok(Admission::Accepted)
    }

    /// A new API token for a member who has fewer than `max` live ones (the
    /// web token not counted); None when they have `max` already.
    pub async fn create_user_token_within(&self, user: &User, max: i64) -> Result<Option<String>> {
        let mut tx = self.begin_locked().await?;
        self.lock_member(&mut tx, &user.id).await?;
        let live: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM tokens WHERE user_id = $1 AND id <> $2 AND revoked_ms IS NULL",
        )
        .bind(&user.id)
        .bind(web_token_id(&user.id))
        .fetch_one(&mut *tx)
        .await?
        .try_get("n")?;
        if live >= max {
            return Ok(None);
        }
        let token = format!("motif_{}", random_hex(32));
        sqlx::query(
            "INSERT INTO tokens (id, hash, admin, created_ms, user_id) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(random_hex(8))
        .bind(hash_token(&token))
        .bind(user.admin as i64)
        .bind(now_ms())
        .bind(&user.id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await.context("committing the token")?;
        Ok(Some(token))
    }
}
