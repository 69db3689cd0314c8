//! Gallery accounts: members with argon2id password hashes, their sessions
//! (a random secret in an HttpOnly cookie, stored as its SHA-256, with an
//! expiry), the API tokens they own, and the limit on failed logins.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sqlx::Row;
use tokio::sync::Semaphore;

use crate::db::{now_ms, Db};
use crate::{database_url, hash_token, random_hex, runtime};

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub name: String,
    pub admin: bool,
}

pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 200;

/// Member names appear in URLs and pages: 3 to 32 letters, digits, `_` or `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (3..=32).contains(&name.chars().count())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err("a name has 3 to 32 letters, digits, `_` or `-`".to_string())
    }
}

pub fn check_password(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&n) {
        Ok(())
    } else {
        Err(format!(
            "a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
        ))
    }
}

/// argon2id with the crate's default cost (19 MiB, 2 passes): about 30 ms
/// here, slow enough for offline guessing, fast enough for a login.
pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| anyhow!("encoding a salt: {e}"))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow!("hashing a password: {e}"))
}

pub fn verify_password(password: &str, stored: &str) -> bool {
    match PasswordHash::new(stored) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Verified against when the name is unknown, so that a login takes as long
/// whether or not the account exists.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_password("not a password of anyone").unwrap_or_default());

/// The token id under which a member's jobs from the web pages are queued
/// (the queue's jobs belong to tokens). It has no usable secret.
pub fn web_token_id(user_id: &str) -> String {
    format!("web-{user_id}")
}

fn user_from_row(row: &sqlx::any::AnyRow) -> Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        admin: row.try_get::<i64, _>("admin")? != 0,
    })
}

impl Db {
    /// Creates a member and their web token; None when the name is taken.
    pub async fn insert_user(
        &self,
        name: &str,
        password_hash: &str,
        admin: bool,
    ) -> Result<Option<User>> {
        let id = random_hex(8);
        let now = now_ms();
        let key = name.to_lowercase();
        let taken = sqlx::query("SELECT id FROM users WHERE name_key = $1")
            .bind(&key)
            .fetch_optional(&self.pool)
            .await?;
        if taken.is_some() {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (id, name, name_key, password_hash, admin, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(name)
        .bind(&key)
        .bind(password_hash)
        .bind(admin as i64)
        .bind(now)
        .execute(&mut *tx)
        .await;
        if inserted.is_err() {
            // Lost a race for the same name: the unique key refused it.
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO tokens (id, hash, admin, created_ms, user_id) VALUES ($1, $2, 0, $3, $4)",
        )
        .bind(web_token_id(&id))
        .bind(hash_token(&format!("unusable-{}", random_hex(32))))
        .bind(now)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(User {
            id,
            name: name.to_string(),
            admin,
        }))
    }

    /// The member and their password hash.
    pub async fn user_by_name(&self, name: &str) -> Result<Option<(User, String)>> {
        let row =
            sqlx::query("SELECT id, name, admin, password_hash FROM users WHERE name_key = $1")
                .bind(name.to_lowercase())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|r| Ok((user_from_row(&r)?, r.try_get("password_hash")?)))
            .transpose()
    }

    /// Starts a session and returns the cookie's secret.
    pub async fn create_session(&self, user_id: &str, lifetime: Duration) -> Result<String> {
        let secret = random_hex(32);
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (hash, user_id, created_ms, expires_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(hash_token(&secret))
        .bind(user_id)
        .bind(now)
        .bind(now + lifetime.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        // Expired sessions of anyone go now, so the table does not grow.
        sqlx::query("DELETE FROM sessions WHERE expires_ms < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(secret)
    }

    /// The member of a session that has not expired.
    pub async fn session_user(&self, secret: &str) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.name, u.admin FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.hash = $1 AND s.expires_ms > $2",
        )
        .bind(hash_token(secret))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    pub async fn delete_session(&self, secret: &str) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE hash = $1")
            .bind(hash_token(secret))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// An API token owned by a member; returns the token (only its hash is kept).
    pub async fn create_user_token(&self, user: &User) -> Result<String> {
        let token = format!("motif_{}", random_hex(32));
        sqlx::query(
            "INSERT INTO tokens (id, hash, admin, created_ms, user_id) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(random_hex(8))
        .bind(hash_token(&token))
        .bind(user.admin as i64)
        .bind(now_ms())
        .bind(&user.id)
        .execute(&self.pool)
        .await?;
        Ok(token)
    }

    /// Live API tokens of a member (their ids and creation times), newest
    /// first; the web token is not listed.
    pub async fn user_tokens(&self, user_id: &str) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query(
            "SELECT id, created_ms FROM tokens WHERE user_id = $1 AND id <> $2 \
             AND revoked_ms IS NULL ORDER BY created_ms DESC",
        )
        .bind(user_id)
        .bind(web_token_id(user_id))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("created_ms")?)))
            .collect()
    }

    /// Revokes one of a member's API tokens; false when no live token of
    /// theirs has this id. The web token cannot be revoked: the pages queue
    /// under it. The row is marked rather than deleted, so that the jobs the
    /// token queued stay the member's.
    pub async fn revoke_user_token(&self, user_id: &str, token_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tokens SET revoked_ms = $1 \
             WHERE id = $2 AND user_id = $3 AND id <> $4 AND revoked_ms IS NULL",
        )
        .bind(now_ms())
        .bind(token_id)
        .bind(user_id)
        .bind(web_token_id(user_id))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The member whose token queued this job (None: a token without owner).
    pub async fn job_owner(&self, job_id: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT t.user_id FROM jobs j JOIN tokens t ON t.id = j.token_id WHERE j.id = $1",
        )
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => r.try_get("user_id")?,
            None => None,
        })
    }
}

/// The key under which failed logins from a client address count: an IPv4
/// address as is, an IPv6 address by its /64, which one subscriber usually
/// holds whole (counting single addresses would let them rotate freely).
pub fn client_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// Events per key within a sliding window: failed logins per account name or
/// [`client_key`], Discord commands per user. Past `max_events`, the key waits
/// (429, or a polite answer) until its oldest event leaves the window.
pub struct RateLimiter {
    pub max_events: usize,
    pub window: Duration,
    events: Mutex<HashMap<String, Vec<Instant>>>,
}

impl RateLimiter {
    pub fn new(max_events: usize, window: Duration) -> Self {
        RateLimiter {
            max_events,
            window,
            events: Mutex::new(HashMap::new()),
        }
    }

    /// Checks and records one event for `key` under one lock: Err with the
    /// seconds to wait when the key has spent its events. Parallel requests
    /// each take a slot or are refused; none can pass a check that another
    /// is about to spend (a failed login is reserved before its password is
    /// checked, a sign-up before its hash).
    pub fn reserve(&self, key: &str) -> Result<Reservation, u64> {
        let now = Instant::now();
        let key = key.to_lowercase();
        let Ok(mut map) = self.events.lock() else {
            // Only a panic while holding the lock poisons it: refuse rather than let all through.
            return Err(self.window.as_secs().max(1));
        };
        if map.len() > 100_000 && !map.contains_key(&key) {
            map.retain(|_, list| list.iter().any(|t| now.duration_since(*t) < self.window));
            if map.len() > 100_000 {
                map.clear();
            }
        }
        let list = map.entry(key.clone()).or_default();
        list.retain(|t| now.duration_since(*t) < self.window);
        if list.len() >= self.max_events {
            let oldest = list.iter().min().copied().unwrap_or(now);
            let wait = self.window.saturating_sub(now.duration_since(oldest));
            return Err(wait.as_secs().max(1));
        }
        list.push(now);
        Ok(Reservation { key, at: now })
    }

    /// Gives back a reserved event that turned out not to count (a login
    /// that succeeded, a sign-up refused before any work).
    pub fn release(&self, reservation: Reservation) {
        if let Ok(mut map) = self.events.lock() {
            if let Some(list) = map.get_mut(&reservation.key) {
                if let Some(i) = list.iter().position(|t| *t == reservation.at) {
                    list.swap_remove(i);
                }
            }
        }
    }

    /// Forgets the key's events (a successful login).
    pub fn clear(&self, key: &str) {
        if let Ok(mut map) = self.events.lock() {
            map.remove(&key.to_lowercase());
        }
    }
}

/// One event held in a [`RateLimiter`] by [`RateLimiter::reserve`].
#[derive(Debug)]
pub struct Reservation {
    key: String,
    at: Instant,
}

/// How many password hashes (sign-up) and verifications (login) may run at
/// once: each takes argon2's 19 MiB and a core for tens of milliseconds.
#[derive(Debug, Clone)]
pub struct HashingOptions {
    pub max_in_flight: usize,
}

impl Default for HashingOptions {
    fn default() -> Self {
        HashingOptions {
            max_in_flight: default_hashes_in_flight(),
        }
    }
}

/// Two per core, at least 4: the CPU stays busy and memory stays at a few
/// tens of MiB.
pub fn default_hashes_in_flight() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (2 * cores).max(4)
}

/// All hashing is refused for now: `max_in_flight` hashes are running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingBusy;

/// The semaphore around password hashing, with counters an operator (and
/// the tests) read on `/api/v1/health`.
pub struct PasswordHashing {
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    refused: AtomicU64,
}

impl PasswordHashing {
    pub fn new(options: &HashingOptions) -> Self {
        let max = options.max_in_flight.max(1);
        PasswordHashing {
            permits: Arc::new(Semaphore::new(max)),
            max_in_flight: max,
            in_flight: Arc::new(AtomicUsize::new(0)),
            peak: Arc::new(AtomicUsize::new(0)),
            refused: AtomicU64::new(0),
        }
    }

    /// Runs `work` on a blocking thread if a permit is free now, else
    /// [`HashingBusy`] at once: a client waits on a 503 and its Retry-After,
    /// not in a queue that holds its connection. The permit moves into the
    /// blocking task, so a hash whose client went away still counts until it ends.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Result<T, HashingBusy>> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(Err(HashingBusy));
        };
        let in_flight = self.in_flight.clone();
        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let result = tokio::task::spawn_blocking(move || {
            let result = work();
            in_flight.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
            result
        })
        .await
        .context("hashing a password")?;
        Ok(Ok(result))
    }

    pub async fn hash(&self, password: String) -> Result<Result<String, HashingBusy>> {
        match self.run(move || hash_password(&password)).await? {
            Ok(hash) => Ok(Ok(hash?)),
            Err(busy) => Ok(Err(busy)),
        }
    }

    /// Checks `password` against `stored`, or against a hash of no one's
    /// password when `stored` is None (an unknown name takes as long).
    pub async fn verify(
        &self,
        password: String,
        stored: Option<String>,
    ) -> Result<Result<bool, HashingBusy>> {
        self.run(move || {
            // DUMMY_HASH is made on first use, here on a blocking thread under the permit.
            let ok = verify_password(&password, stored.as_deref().unwrap_or(&DUMMY_HASH));
            ok && stored.is_some()
        })
        .await
    }

    /// `{"max_in_flight", "in_flight", "peak_in_flight", "refused"}`.
    pub fn report(&self) -> serde_json::Value {
        serde_json::json!({
            "max_in_flight": self.max_in_flight,
            "in_flight": self.in_flight.load(Ordering::SeqCst),
            "peak_in_flight": self.peak.load(Ordering::SeqCst),
            "refused": self.refused.load(Ordering::Relaxed),
        })
    }
}

/// Checks a login: the member, or None for an unknown name or a wrong password
/// (the same time either way); [`HashingBusy`] when no hash may start now.
pub async fn login(
    db: &Db,
    hashing: &PasswordHashing,
    name: &str,
    password: &str,
) -> Result<Result<Option<User>, HashingBusy>> {
    let (user, stored) = match db.user_by_name(name).await? {
        Some((u, h)) => (Some(u), Some(h)),
        None => (None, None),
    };
    Ok(hashing
        .verify(password.to_string(), stored)
        .await?
        .map(|ok| user.filter(|_| ok)))
}

/// `motif admin create-user`: a member (an admin with `admin`).
pub fn create_user(
    data: &Path,
    database: Option<&str>,
    name: &str,
    password: &str,
    admin: bool,
) -> Result<()> {
    check_name(name).map_err(|e| anyhow!("{name:?}: {e}"))?;
    check_password(password).map_err(|e| anyhow!("the password: {e}"))?;
    let url = database_url(data, database)?;
    let hash = hash_password(password)?;
    runtime()?.block_on(async {
        let db = Db::connect(&url).await?;
        match db.insert_user(name, &hash, admin).await? {
            Some(_) => Ok(()),
            None => bail!("the name {name:?} is taken"),
        }
    })
}

/// `motif admin create-token --user NAME`: an API token owned by that member.
pub fn create_token_for(data: &Path, database: Option<&str>, name: &str) -> Result<String> {
    let url = database_url(data, database)?;
    runtime()?.block_on(async {
        let db = Db::connect(&url).await?;
        let (user, _) = db
            .user_by_name(name)
            .await?
            .ok_or_else(|| anyhow!("no member named {name:?} (see `motif admin create-user`)"))?;
        db.create_user_token(&user).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_revokes_only_their_own_api_tokens_and_never_the_web_token() -> Result<()> {
        let file = std::env::temp_dir().join(format!("motif-revoke-{}.db", random_hex(8)));
        let url = format!("sqlite://{}?mode=rwc", file.display());
        let result = runtime()?.block_on(async {
            let db = Db::connect(&url).await?;
            let dana = db.insert_user("dana", "x", false).await?.context("dana")?;
            let eve = db.insert_user("eve", "x", false).await?.context("eve")?;
            let token = db.create_user_token(&dana).await?;
            let (id, _) = db.user_tokens(&dana.id).await?.remove(0);
            let web = web_token_id(&dana.id);
            assert!(!db.revoke_user_token(&dana.id, &web).await?);
            assert!(!db.revoke_user_token(&eve.id, &id).await?);
            assert!(db.token_by_hash(&hash_token(&token)).await?.is_some());
            assert!(db.revoke_user_token(&dana.id, &id).await?);
            assert!(!db.revoke_user_token(&dana.id, &id).await?);
            assert!(db.token_by_hash(&hash_token(&token)).await?.is_none());
            assert!(db.user_tokens(&dana.id).await?.is_empty());
            Ok::<(), anyhow::Error>(())
        });
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
        result
    }

    #[test]
    fn client_keys_are_addresses_and_ipv6_slash_64s() {
        let key = |s: &str| client_key(s.parse().expect("a test address"));
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), key("2001:db8:1:2:aaaa::1"));
    }
}
