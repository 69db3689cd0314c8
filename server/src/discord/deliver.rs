//! Results back to Discord. A loop finds Discord jobs that ended and posts
//! each one: the clip (re-encoded smaller when over the upload limit, else a
//! link only), its seed and recipe, its page, and the Re-roll, Publish and
//! Remix buttons. Within the interaction token's 15 minutes the "thinking…"
//! response is edited through the webhook; later, the bot posts in the channel.
//! The database says what is posted, so a restart loses nothing.

use std::time::Duration;

use anyhow::{Context, Result};
use reqwest::multipart::{Form, Part};
use reqwest::Method;
use serde_json::{json, Value};

use super::db::DiscordJob;
use super::DiscordState;
use crate::db::{self, now_ms, JobRow};
use crate::worker::Shutdown;
use crate::{api, ImageMode};

/// How often the loop looks for ended jobs.
const POLL: Duration = Duration::from_millis(500);
/// A claimed result is someone's for this long (a re-encode included).
const CLAIM_MS: i64 = 5 * 60 * 1000;
/// Tries to post one result before giving up on it.
const MAX_ATTEMPTS: i64 = 6;
/// The webhook is used only while the token has this much life left.
const TOKEN_MARGIN_MS: i64 = 30 * 1000;
/// Discord's longest message.
const MAX_CONTENT_CHARS: usize = 2000;

pub(crate) async fn run(state: DiscordState, shutdown: Shutdown) {
    while !shutdown.is_set() {
        match state.app.db.claim_discord_results(CLAIM_MS).await {
            Ok(results) => {
                for result in results {
                    deliver(&state, &result).await;
                }
            }
            Err(e) => eprintln!("motif serve: discord results: {e:#}"),
        }
        shutdown.sleep(POLL).await;
    }
}

async fn deliver(state: &DiscordState, result: &DiscordJob) {
    let db = &state.app.db;
    let id = &result.job_id;
    let outcome = match post_result(state, result).await {
        Ok(()) => db.discord_posted(id).await,
        Err(e) if result.attempts >= MAX_ATTEMPTS => {
            eprintln!(
                "motif serve: discord: giving up posting job {id} after {} tries: {e:#}",
                result.attempts
            );
            db.discord_posted(id).await
        }
        Err(e) => {
            eprintln!(
                "motif serve: discord: posting job {id} (try {}): {e:#}",
                result.attempts
            );
            db.discord_retry(id, 5_000 * result.attempts).await
        }
    };
    if let Err(e) = outcome {
        eprintln!("motif serve: discord: job {id}: {e:#}");
    }
}

/// A file to attach: its name and bytes.
type Upload = (String, Vec<u8>);

async fn post_result(state: &DiscordState, result: &DiscordJob) -> Result<()> {
    let job = state
        .app
        .db
        .job(&result.job_id)
        .await?
        .context("the job is gone")?;
    let author = format!("<@{}>", result.discord_id);
    let prompt = plain(job.job_request().unwrap_or_default().prompt());
    let (content, upload, components) = match job.state.as_str() {
        db::FINISHED => {
            let (content, upload) = finished(state, &job, &author, &prompt).await?;
            (content, upload, buttons(&job.id, false))
        }
        db::FAILED => (
            format!(
                "⚠️ {author} Motif could not make **{prompt}**: {}",
                job.error.as_deref().unwrap_or("the job failed")
            ),
            None,
            json!([]),
        ),
        _ => (
            format!("{author} **{prompt}** was cancelled."),
            None,
            json!([]),
        ),
    };
    let mut payload = json!({
        "content": truncate(&content),
        "components": components,
        // Only the author is mentioned, whatever a prompt says.
        "allowed_mentions": { "parse": [], "users": [result.discord_id] },
    });
    if let Some((name, _)) = &upload {
        payload["attachments"] = json!([{ "id": 0, "filename": name }]);
    }
    send(state, result, &payload, upload).await
}

/// The message of a finished clip, and the clip when it fits.
async fn finished(
    state: &DiscordState,
    job: &JobRow,
    author: &str,
    prompt: &str,
) -> Result<(String, Option<Upload>)> {
    let app = &state.app;
    // Shown in a channel: its page opens for anyone with the link, and it
    // joins the gallery's index only when its author publishes it.
    if let Some(owner) = app.db.job_owner(&job.id).await? {
        app.db.add_job_clip(job, &owner, false).await?;
    }
    let recipe: Value = match &job.recipe {
        Some(name) => serde_json::from_slice(&api::read_stored(app, name).await?)
            .context("the job's recipe is not JSON")?,
        None => Value::Null,
    };
    let clip_name = job
        .clip
        .as_deref()
        .context("the finished job has no clip")?;
    let clip = api::read_stored(app, clip_name).await?;
    let limit = state.options.upload_limit_bytes;
    let file_name = format!("motif-{}.mp4", job.id);
    let (upload, note) = if clip.len() <= limit {
        (Some((file_name, clip)), None)
    } else {
        let size = clip.len();
        let smaller = tokio::task::spawn_blocking(move || motif_video::shrink_mp4(&clip, limit))
            .await
            .context("re-encoding the clip")?;
        match smaller {
            Ok(Some(bytes)) => (
                Some((file_name, bytes)),
                Some(
                    "Re-encoded smaller to fit Discord's upload limit; the page has the full clip.",
                ),
            ),
            other => {
                if let Err(e) = other {
                    eprintln!(
                        "motif serve: discord: job {}: re-encoding {size} bytes: {e}",
                        job.id
                    );
                }
                (
                    None,
                    Some("Too large to attach here: watch it on its page."),
                )
            }
        }
    };
    let mut content = format!("{author} **{prompt}**\n{}", recipe_line(&recipe));
    if recipe.get("image").is_some_and(Value::is_string) {
        let model = recipe
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mode = image_mode(state, model.clone()).await;
        content = with_line(&content, &still_line(mode, model.as_deref()));
    }
    if let Some(note) = note {
        content = with_line(&content, note);
    }
    content = with_line(&content, &state.clip_page(&job.id));
    Ok((content, upload))
}

/// How the model of a job (`None`: the server's default) uses its still,
/// read on a blocking thread (the runner may read the model's configs).
pub async fn image_mode(state: &DiscordState, model: Option<String>) -> Option<ImageMode> {
    let runner = state.app.runner.clone();
    tokio::task::spawn_blocking(move || runner.image_mode(model.as_deref()))
        .await
        .ok()
        .flatten()
}

/// /animate's line on how the still is used: by a model trained for
/// image-to-video, or anchoring the first frame of a text-to-video model.
pub fn still_line(mode: Option<ImageMode>, model: Option<&str>) -> String {
    let model = plain(model.unwrap_or("default"));
    match mode {
        Some(ImageMode::Native) => {
            format!("🖼️ Native image-to-video: model {model} animates the still itself.")
        }
        _ => format!(
            "🖼️ Anchored: the still pins the first frame (model {model} has no native \
             image-to-video)."
        ),
    }
}

/// A recipe number as people write it: 0.7, not the f32's 0.699999988.
fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() => {
            let text = format!("{x:.3}");
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        }
        _ => v.to_string(),
    }
}

/// The recipe in one line: seed first, then what was chosen.
fn recipe_line(recipe: &Value) -> String {
    let get = |k: &str| recipe.get(k).filter(|v| !v.is_null());
    let mut parts = Vec::new();
    if let Some(seed) = get("seed") {
        parts.push(format!("seed `{seed}`"));
    }
    for key in ["style", "camera"] {
        if let Some(v) = get(key).and_then(Value::as_str) {
            parts.push(plain(v));
        }
    }
    if let Some(m) = get("motion") {
        parts.push(format!("motion {}", number(m)));
    }
    if let (Some(w), Some(h)) = (get("width"), get("height")) {
        parts.push(format!("{w}×{h}"));
    }
    if let Some(f) = get("frames") {
        match get("fps") {
            Some(fps) => parts.push(format!("{f} frames at {} fps", number(fps))),
            None => parts.push(format!("{f} frames")),
        }
    }
    if let Some(s) = get("steps") {
        parts.push(format!("{s} steps"));
    }
    if let Some(s) = get("strength") {
        parts.push(format!("strength {}", number(s)));
    }
    if let Some(m) = get("model").and_then(Value::as_str) {
        parts.push(format!("model {}", plain(m)));
    }
    parts.join(" · ")
}

/// Text as Discord shows it literally: markdown characters escaped, no line
/// breaks, so a prompt cannot restyle or forge the message around it.
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\r' => out.push(' '),
            '*' | '_' | '~' | '`' | '|' | '>' | '#' | '[' | ']' | '\\' | '<' | '@' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// `content` with one more line, within Discord's length.
pub fn with_line(content: &str, line: &str) -> String {
    truncate(&format!("{content}\n{line}"))
}

fn truncate(content: &str) -> String {
    if content.chars().count() <= MAX_CONTENT_CHARS {
        return content.to_string();
    }
    let mut cut: String = content.chars().take(MAX_CONTENT_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The buttons under a result: Re-roll, Publish (disabled once done), Remix.
pub fn buttons(job_id: &str, published: bool) -> Value {
    const PRIMARY: u8 = 1;
    const SECONDARY: u8 = 2;
    const SUCCESS: u8 = 3;
    json!([{ "type": 1, "components": [
        { "type": 2, "style": PRIMARY, "label": "Re-roll", "custom_id": format!("reroll:{job_id}") },
        { "type": 2, "style": SUCCESS, "label": if published { "Published" } else { "Publish" },
          "custom_id": format!("publish:{job_id}"), "disabled": published },
        { "type": 2, "style": SECONDARY, "label": "Remix", "custom_id": format!("remix:{job_id}") },
    ] }])
}

/// Why a call to Discord failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{method} {path}: Discord answered {status}: {body}")]
    Status {
        method: Method,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// One call to Discord's API: JSON, or multipart with the file attached.
async fn call(
    state: &DiscordState,
    method: Method,
    path: &str,
    bot: bool,
    payload: &Value,
    upload: Option<&Upload>,
) -> Result<(), CallError> {
    let mut request = state.client.request(method.clone(), state.api(path));
    if bot {
        request = request.header(
            "Authorization",
            format!("Bot {}", state.options.bot_token.trim()),
        );
    }
    request = match upload {
        Some((name, bytes)) => {
            let part = Part::bytes(bytes.clone())
                .file_name(name.clone())
                .mime_str("video/mp4")
                .context("the attachment's type")?;
            let form = Form::new()
                .text("payload_json", payload.to_string())
                .part("files[0]", part);
            request.multipart(form)
        }
        None => request.json(payload),
    };
    // The path holds the interaction token: only its start is logged.
    let shown: String = path.chars().take(48).collect();
    let response = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{method} {shown}…: {}", e.without_url()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body: String = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(300)
        .collect();
    Err(CallError::Status {
        method,
        path: format!("{shown}…"),
        status: status.as_u16(),
        body,
    })
}

fn webhook_original(state: &DiscordState, token: &str) -> String {
    format!(
        "/webhooks/{}/{token}/messages/@original",
        state.options.application_id
    )
}

/// Edits the interaction's "thinking…" response (a queued note or an error).
pub async fn edit_original(state: &DiscordState, token: &str, payload: &Value) -> Result<()> {
    let path = webhook_original(state, token);
    call(state, Method::PATCH, &path, false, payload, None)
        .await
        .map_err(anyhow::Error::from)
}

/// The result replaces "thinking…" while the interaction's token lives;
/// afterwards (or if Discord no longer knows the token) it goes to the
/// channel as a new message from the bot.
async fn send(
    state: &DiscordState,
    result: &DiscordJob,
    payload: &Value,
    upload: Option<Upload>,
) -> Result<()> {
    if now_ms() + TOKEN_MARGIN_MS < result.token_expires_ms {
        let path = webhook_original(state, &result.interaction_token);
        match call(state, Method::PATCH, &path, false, payload, upload.as_ref()).await {
            Ok(()) => return Ok(()),
            Err(CallError::Status { status, .. }) if status == 401 || status == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let channel = result
        .channel_id
        .as_deref()
        .context("the token expired and the interaction named no channel")?;
    let path = format!("/channels/{channel}/messages");
    call(state, Method::POST, &path, true, payload, upload.as_ref())
        .await
        .map_err(anyhow::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_cannot_restyle_or_mention() {
        assert_eq!(plain("a *bold* fox"), "a \\*bold\\* fox");
        assert_eq!(plain("@everyone <@1>"), "\\@everyone \\<\\@1\\>");
        assert_eq!(plain("two\nlines"), "two lines");
    }

    #[test]
    fn the_recipe_line_names_seed_and_choices() {
        let line = recipe_line(&json!({"seed": 42, "style": "anime", "camera": "pan-left",
            "motion": 1.5, "width": 64, "height": 64, "frames": 4, "fps": 8.0, "steps": 2,
            "strength": 0.699999988079071, "model": "motif-tiny"}));
        assert_eq!(
            line,
            "seed `42` · anime · pan-left · motion 1.5 · 64×64 · 4 frames at 8 fps · 2 steps · strength 0.7 · model motif-tiny"
        );
    }

    #[test]
    fn long_messages_are_cut_to_discords_length() {
        let long = "x".repeat(3000);
        assert_eq!(with_line(&long, "y").chars().count(), MAX_CONTENT_CHARS);
        assert_eq!(with_line("a", "b"), "a\nb");
    }
}
