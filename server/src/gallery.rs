//! The gallery's store: published clips, likes and reports, in the same
//! database as the queue (portable SQL for SQLite and PostgreSQL).

use anyhow::Result;
use sqlx::Row;

use crate::db::{now_ms, Db, JobRow};

/// A published clip as pages show it.
#[derive(Debug, Clone)]
pub struct Clip {
    pub job_id: String,
    pub user_id: String,
    pub author: String,
    pub prompt: String,
    pub style: String,
    pub camera: String,
    pub published_ms: i64,
    pub hidden: bool,
    pub likes: i64,
    /// In the gallery's index and search; an unlisted clip (shown on Discord,
    /// not published) is reached only by its link.
    pub listed: bool,
}

/// Orderings of the gallery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Newest,
    MostLiked,
}

/// One page of the gallery.
#[derive(Debug, Clone)]
pub struct Search {
    /// Every word must appear in the prompt (case ignored).
    pub words: Vec<String>,
    pub style: Option<String>,
    pub camera: Option<String>,
    pub sort: Sort,
    pub offset: i64,
    pub limit: i64,
    /// Admins see hidden clips too.
    pub include_hidden: bool,
}

/// A job of a member as their own page lists it.
#[derive(Debug, Clone)]
pub struct OwnJob {
    pub id: String,
    pub state: String,
    pub request: String,
    pub created_ms: i64,
    pub error: Option<String>,
    pub published: bool,
}

/// A report as admins see it.
#[derive(Debug, Clone)]
pub struct Report {
    pub job_id: String,
    pub reporter: String,
    pub reason: String,
    pub created_ms: i64,
    pub prompt: String,
    pub hidden: bool,
}

const CLIP_COLUMNS: &str = "c.job_id, c.user_id, u.name AS author, c.prompt, c.style, c.camera, \
     c.published_ms, c.hidden, c.likes, c.listed";

fn clip_from_row(row: &sqlx::any::AnyRow) -> Result<Clip> {
    Ok(Clip {
        job_id: row.try_get("job_id")?,
        user_id: row.try_get("user_id")?,
        author: row.try_get("author")?,
        prompt: row.try_get("prompt")?,
        style: row.try_get("style")?,
        camera: row.try_get("camera")?,
        published_ms: row.try_get("published_ms")?,
        hidden: row.try_get::<i64, _>("hidden")? != 0,
        likes: row.try_get("likes")?,
        listed: row.try_get::<i64, _>("listed")? != 0,
    })
}

/// `word` as a LIKE pattern that matches it literally anywhere.
fn like_pattern(word: &str) -> String {
    let mut p = String::from("%");
    for c in word.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

impl Db {
    /// Adds a finished job's clip: listed in the gallery (published), or
    /// only reachable by its link (`listed` false: shown on Discord). True
    /// when this changed anything: a second publish of the same clip (a
    /// double click) is a no-op on both SQLite and PostgreSQL, and an unlisted
    /// clip that is published becomes listed as of now.
    pub async fn add_clip(
        &self,
        job_id: &str,
        user_id: &str,
        fields: [&str; 3],
        listed: bool,
    ) -> Result<bool> {
        let [prompt, style, camera] = fields;
        let on_conflict = if listed {
            "ON CONFLICT (job_id) DO UPDATE SET listed = 1, published_ms = $6 \
             WHERE clips.listed = 0"
        } else {
            "ON CONFLICT (job_id) DO NOTHING"
        };
        let changed = sqlx::query(&format!(
            "INSERT INTO clips (job_id, user_id, prompt, style, camera, published_ms, hidden, likes, listed) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7) {on_conflict}"
        ))
        .bind(job_id)
        .bind(user_id)
        .bind(prompt)
        .bind(style)
        .bind(camera)
        .bind(now_ms())
        .bind(listed as i64)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(changed == 1)
    }

    /// Publishes a finished job of `user_id`, with the prompt, style and
    /// camera of its request for search and filters; false if it already was.
    pub async fn publish_job(&self, job: &JobRow, user_id: &str) -> Result<bool> {
        self.add_job_clip(job, user_id, true).await
    }

    /// A finished job's clip with the search fields of its request.
    pub async fn add_job_clip(&self, job: &JobRow, user_id: &str, listed: bool) -> Result<bool> {
        let recipe = job.job_request().unwrap_or_default().recipe;
        let fields = [
            recipe.prompt.as_deref().unwrap_or(""),
            recipe.style.as_deref().unwrap_or(""),
            recipe.camera.map_or("", |c| c.name()),
        ];
        self.add_clip(&job.id, user_id, fields, listed).await
    }

    pub async fn clip(&self, job_id: &str) -> Result<Option<Clip>> {
        let row = sqlx::query(&format!(
            "SELECT {CLIP_COLUMNS} FROM clips c JOIN users u ON u.id = c.user_id WHERE c.job_id = $1"
        ))
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(clip_from_row).transpose()
    }

    /// One page of clips: `search.limit` of them at most.
    pub async fn search_clips(&self, search: &Search) -> Result<Vec<Clip>> {
        let mut sql = format!(
            "SELECT {CLIP_COLUMNS} FROM clips c JOIN users u ON u.id = c.user_id WHERE 1 = 1"
        );
        let mut binds: Vec<String> = Vec::new();
        let mut next = |sql: &mut String, clause: &str, value: String| {
            binds.push(value);
            sql.push_str(&clause.replace("?", &format!("${}", binds.len())));
        };
        if !search.include_hidden {
            sql.push_str(" AND c.hidden = 0");
        }
        sql.push_str(" AND c.listed = 1");
        for word in &search.words {
            next(
                &mut sql,
                " AND LOWER(c.prompt) LIKE ? ESCAPE '\\'",
                like_pattern(word),
            );
        }
        if let Some(style) = &search.style {
            next(&mut sql, " AND c.style = ?", style.clone());
        }
        if let Some(camera) = &search.camera {
            next(&mut sql, " AND c.camera = ?", camera.clone());
        }
        sql.push_str(match search.sort {
            Sort::Newest => " ORDER BY c.published_ms DESC, c.job_id DESC",
            Sort::MostLiked => " ORDER BY c.likes DESC, c.published_ms DESC, c.job_id DESC",
        });
        sql.push_str(&format!(
            " LIMIT ${} OFFSET ${}",
            binds.len() + 1,
            binds.len() + 2
        ));
        let mut query = sqlx::query(&sql);
        for b in &binds {
            query = query.bind(b);
        }
        let rows = query
            .bind(search.limit)
            .bind(search.offset)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(clip_from_row).collect()
    }

    /// Likes or unlikes; returns whether the member likes it now.
    pub async fn toggle_like(&self, job_id: &str, user_id: &str) -> Result<bool> {
        let removed = sqlx::query("DELETE FROM likes WHERE job_id = $1 AND user_id = $2")
            .bind(job_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if removed == 0 {
            sqlx::query(
                "INSERT INTO likes (job_id, user_id, created_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (job_id, user_id) DO NOTHING",
            )
            .bind(job_id)
            .bind(user_id)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        }
        // Counted again rather than incremented: concurrent toggles stay exact.
        sqlx::query(
            "UPDATE clips SET likes = (SELECT COUNT(*) FROM likes WHERE likes.job_id = $1) \
             WHERE job_id = $2",
        )
        .bind(job_id)
        .bind(job_id)
        .execute(&self.pool)
        .await?;
        Ok(removed == 0)
    }

    pub async fn likes_clip(&self, job_id: &str, user_id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT job_id FROM likes WHERE job_id = $1 AND user_id = $2")
            .bind(job_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    pub async fn set_hidden(&self, job_id: &str, hidden: bool) -> Result<()> {
        sqlx::query("UPDATE clips SET hidden = $1 WHERE job_id = $2")
            .bind(hidden as i64)
            .bind(job_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn report(&self, job_id: &str, user_id: &str, reason: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO reports (id, job_id, user_id, reason, created_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(crate::random_hex(8))
        .bind(job_id)
        .bind(user_id)
        .bind(reason)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn reports(&self, limit: i64) -> Result<Vec<Report>> {
        let rows = sqlx::query(
            "SELECT r.job_id, u.name AS reporter, r.reason, r.created_ms, c.prompt, c.hidden \
             FROM reports r JOIN users u ON u.id = r.user_id JOIN clips c ON c.job_id = r.job_id \
             ORDER BY r.created_ms DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Report {
                    job_id: r.try_get("job_id")?,
                    reporter: r.try_get("reporter")?,
                    reason: r.try_get("reason")?,
                    created_ms: r.try_get("created_ms")?,
                    prompt: r.try_get("prompt")?,
                    hidden: r.try_get::<i64, _>("hidden")? != 0,
                })
            })
            .collect()
    }

    /// Removes a job that has ended, with its gallery entry, likes and
    /// reports; returns its clip and recipe file names for the caller to delete.
    pub async fn delete_job(
        &self,
        job_id: &str,
    ) -> Result<Option<(Option<String>, Option<String>)>> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM likes WHERE job_id = $1",
            "DELETE FROM reports WHERE job_id = $1",
            "DELETE FROM clips WHERE job_id = $1",
        ] {
            sqlx::query(sql).bind(job_id).execute(&mut *tx).await?;
        }
        let row = sqlx::query(
            "DELETE FROM jobs WHERE id = $1 AND state <> 'queued' AND state <> 'running' \
             RETURNING clip, recipe",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.map(|r| Ok((r.try_get("clip")?, r.try_get("recipe")?)))
            .transpose()
    }

    /// A member's jobs (from the web and from their API tokens), newest first.
    pub async fn user_jobs(&self, user_id: &str, limit: i64) -> Result<Vec<OwnJob>> {
        let rows = sqlx::query(
            "SELECT j.id, j.state, j.request, j.created_ms, j.error, c.listed AS published \
             FROM jobs j JOIN tokens t ON t.id = j.token_id LEFT JOIN clips c ON c.job_id = j.id \
             WHERE t.user_id = $1 ORDER BY j.created_ms DESC, j.id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OwnJob {
                    id: r.try_get("id")?,
                    state: r.try_get("state")?,
                    request: r.try_get("request")?,
                    created_ms: r.try_get("created_ms")?,
                    error: r.try_get("error")?,
                    published: r.try_get::<Option<i64>, _>("published")? == Some(1),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::like_pattern;

    #[test]
    fn search_words_match_literally() {
        assert_eq!(like_pattern("Star"), "%star%");
        assert_eq!(like_pattern("50%_a\\"), "%50\\%\\_a\\\\%");
    }
}
