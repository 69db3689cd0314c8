//! Discord users' Motif accounts and the jobs queued from Discord, in the
//! server's database (portable SQL for SQLite and PostgreSQL).

use anyhow::{Context, Result};
use sqlx::Row;

use crate::accounts::User;
use crate::db::{now_ms, Db};

use super::interaction::DiscordUser;

/// A Motif account of a Discord user has no password (it cannot log in to the
/// web pages); argon2 cannot parse this, so no password ever matches it.
const NO_PASSWORD: &str = "!discord";

/// A job queued from Discord and where its result goes.
#[derive(Debug, Clone)]
pub struct DiscordJob {
    pub job_id: String,
    pub discord_id: String,
    pub application_id: String,
    pub interaction_token: String,
    pub token_expires_ms: i64,
    pub channel_id: Option<String>,
    pub attempts: i64,
}

/// A member name from a Discord name: the letters, digits, `_` and `-` of it,
/// 3 to 24 of them, else `discord-user`.
fn member_name(discord_name: &str) -> String {
    let name: String = discord_name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(24)
        .collect();
    if name.len() >= 3 {
        name
    } else {
        "discord-user".to_string()
    }
}

fn job_from_row(row: &sqlx::any::AnyRow) -> Result<DiscordJob> {
    Ok(DiscordJob {
        job_id: row.try_get("job_id")?,
        discord_id: row.try_get("discord_id")?,
        application_id: row.try_get("application_id")?,
        interaction_token: row.try_get("interaction_token")?,
        token_expires_ms: row.try_get("token_expires_ms")?,
        channel_id: row.try_get("channel_id")?,
        attempts: row.try_get("attempts")?,
    })
}

const COLUMNS: &str = "job_id, discord_id, application_id, interaction_token, \
     token_expires_ms, channel_id, attempts";

impl Db {
    /// Records an interaction id; false if it was seen already (a replay).
    /// Ids older than `keep_ms` are forgotten first: by then the signature
    /// check refuses the request anyway.
    pub async fn first_sight_of_interaction(&self, id: &str, keep_ms: i64) -> Result<bool> {
        let now = now_ms();
        sqlx::query("DELETE FROM discord_interactions WHERE seen_ms < $1")
            .bind(now - keep_ms)
            .execute(&self.pool)
            .await
            .context("forgetting old Discord interactions")?;
        // One statement, so that two servers sharing the database cannot both
        // take the same id as new.
        let inserted = sqlx::query(
            "INSERT INTO discord_interactions (id, seen_ms) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .context("recording a Discord interaction")?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// The Motif account of a Discord user, made on first use under their
    /// Discord name (with a number after it when the name is taken).
    pub async fn discord_member(&self, discord: &DiscordUser) -> Result<User> {
        if let Some(user) = self.linked_member(&discord.id).await? {
            return Ok(user);
        }
        let base = member_name(&discord.name);
        let mut created = None;
        for n in 1..=20 {
            let name = match n {
                1 => base.clone(),
                n if n < 20 => format!("{base}-{n}"),
                _ => format!("{base}-{}", crate::random_hex(4)),
            };
            if let Some(user) = self.insert_user(&name, NO_PASSWORD, false).await? {
                created = Some(user);
                break;
            }
        }
        let user = created.with_context(|| format!("no free member name like {base:?}"))?;
        // Two first commands at once both make an account; the first link
        // wins and the other account stays unused (it cannot log in).
        sqlx::query(
            "INSERT INTO discord_users (discord_id, user_id, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (discord_id) DO NOTHING",
        )
        .bind(&discord.id)
        .bind(&user.id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.linked_member(&discord.id)
            .await?
            .context("the Discord account link vanished after insert")
    }

    async fn linked_member(&self, discord_id: &str) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT u.id, u.name, u.admin FROM discord_users d JOIN users u ON u.id = d.user_id \
             WHERE d.discord_id = $1",
        )
        .bind(discord_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<User> {
            Ok(User {
                id: r.try_get("id")?,
                name: r.try_get("name")?,
                admin: r.try_get::<i64, _>("admin")? != 0,
            })
        })
        .transpose()
    }

    pub async fn insert_discord_job(&self, job: &DiscordJob) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO discord_jobs ({COLUMNS}, created_ms, posted_ms, claimed_until_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7, NULL, 0)"
        ))
        .bind(&job.job_id)
        .bind(&job.discord_id)
        .bind(&job.application_id)
        .bind(&job.interaction_token)
        .bind(job.token_expires_ms)
        .bind(&job.channel_id)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn discord_job(&self, job_id: &str) -> Result<Option<DiscordJob>> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM discord_jobs WHERE job_id = $1"
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Discord jobs that ended and whose result is not posted, claimed for
    /// `claim_ms` by this caller (another server sharing the database skips
    /// them meanwhile).
    pub async fn claim_discord_results(&self, claim_ms: i64) -> Result<Vec<DiscordJob>> {
        let now = now_ms();
        let rows = sqlx::query(
            "SELECT d.job_id FROM discord_jobs d JOIN jobs j ON j.id = d.job_id \
             WHERE d.posted_ms IS NULL AND d.claimed_until_ms < $1 \
             AND j.state IN ('finished', 'failed', 'cancelled') \
             ORDER BY d.created_ms LIMIT 8",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::new();
        for row in rows {
            let id: String = row.try_get("job_id")?;
            let taken = sqlx::query(
                "UPDATE discord_jobs SET claimed_until_ms = $1, attempts = attempts + 1 \
                 WHERE job_id = $2 AND posted_ms IS NULL AND claimed_until_ms < $3",
            )
            .bind(now + claim_ms)
            .bind(&id)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if taken == 1 {
                claimed.extend(self.discord_job(&id).await?);
            }
        }
        Ok(claimed)
    }

    /// The result is posted (or given up on): never again.
    pub async fn discord_posted(&self, job_id: &str) -> Result<()> {
        sqlx::query("UPDATE discord_jobs SET posted_ms = $1 WHERE job_id = $2")
            .bind(now_ms())
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Posting failed: try again after `after_ms`.
    pub async fn discord_retry(&self, job_id: &str, after_ms: i64) -> Result<()> {
        sqlx::query("UPDATE discord_jobs SET claimed_until_ms = $1 WHERE job_id = $2")
            .bind(now_ms() + after_ms)
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::member_name;

    #[test]
    fn member_names_come_from_discord_names() {
        assert_eq!(member_name("Ada Lovelace"), "AdaLovelace");
        assert_eq!(member_name("ℵ"), "discord-user");
        assert_eq!(member_name("bo"), "discord-user");
        assert_eq!(member_name(&"x".repeat(40)).len(), 24);
        assert!(crate::accounts::check_name(&member_name("a.b_c-d!e")).is_ok());
    }
}
