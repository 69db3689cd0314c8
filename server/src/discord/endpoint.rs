//! `POST /discord/interactions`: checked, parsed, answered within Discord's
//! three seconds. Commands that make a clip answer "thinking…" (deferred) at
//! once; the job is queued in a task and its result posted by `deliver`.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::db::DiscordJob;
use super::interaction::{self, Action, Attachment, DiscordUser, Interaction, RecipeOptions};
use super::{deliver, fetch, DiscordState};
use crate::accounts::{web_token_id, User};
use crate::db::{self, now_ms};
use crate::{api, ImageMode, JobRequest};

/// An interaction's token lasts this long after the interaction was made.
pub const TOKEN_LIFETIME_MS: i64 = 15 * 60 * 1000;

/// How long an interaction id is remembered: a replay is accepted by the
/// signature check up to the window after its timestamp, by a server whose
/// clock may run up to the window behind, so twice the window (and a minute
/// for the time in between).
const REMEMBER_INTERACTIONS_MS: i64 = (2 * super::verify::MAX_AGE_SECONDS as i64 + 60) * 1000;

pub(crate) async fn interactions(
    State(state): State<DiscordState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Nothing of the body is looked at before its signature checks out.
    if let Err(refused) = state.options.public_key.verify(
        header("x-signature-timestamp"),
        header("x-signature-ed25519"),
        &body,
        now,
    ) {
        let error = json!({ "error": refused.to_string() });
        return (StatusCode::UNAUTHORIZED, Json(error)).into_response();
    }
    let interaction = match interaction::parse(&body) {
        Ok(i) => i,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": e.0 }))).into_response();
        }
    };
    // A signed request stays valid for the whole signature window: one sent
    // again within it (captured on the way) must not run a second time. A
    // ping changes nothing and is answered however often it comes.
    if interaction.action != Action::Ping {
        match state
            .app
            .db
            .first_sight_of_interaction(&interaction.id, REMEMBER_INTERACTIONS_MS)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                let error = json!({ "error": format!("interaction {} was already answered", interaction.id) });
                return (StatusCode::CONFLICT, Json(error)).into_response();
            }
            Err(e) => {
                eprintln!("motif serve: discord: {e:#}");
                let error = json!({ "error": "the server cannot record interactions right now" });
                return (StatusCode::SERVICE_UNAVAILABLE, Json(error)).into_response();
            }
        }
    }
    Json(answer(&state, interaction).await).into_response()
}

/// Where a new job's recipe comes from.
enum Source {
    /// `/create`: the server's Discord defaults and the options.
    New(RecipeOptions),
    /// `/animate`: the same, and the attached still.
    Animate(Attachment, RecipeOptions),
    /// `/remix`, the Remix modal and Re-roll: a clip's recipe and the options;
    /// Re-roll draws a new seed.
    Remix {
        clip: String,
        options: RecipeOptions,
        new_seed: bool,
    },
}

async fn answer(state: &DiscordState, i: Interaction) -> Value {
    if i.action == Action::Ping {
        return interaction::pong();
    }
    // parse() refuses anything else without a user.
    let Some(user) = i.user.clone() else {
        return interaction::ephemeral("Motif could not tell who asked.");
    };
    let source = match i.action.clone() {
        Action::Ping => return interaction::pong(),
        Action::Create(options) => Source::New(options),
        Action::Animate { image, options } => Source::Animate(image, options),
        Action::Remix { clip, options } => Source::Remix {
            clip,
            options,
            new_seed: false,
        },
        Action::Modal { custom_id, fields } => match custom_id.split_once(':') {
            Some(("remix", id)) => {
                let prompt = fields
                    .iter()
                    .find(|(k, _)| k == "prompt")
                    .map(|(_, v)| v.trim().to_string())
                    .filter(|p| !p.is_empty());
                Source::Remix {
                    clip: id.to_string(),
                    options: RecipeOptions {
                        prompt,
                        ..Default::default()
                    },
                    new_seed: false,
                }
            }
            _ => return outdated(),
        },
        Action::Button { custom_id } => match custom_id.split_once(':') {
            Some(("reroll", id)) => Source::Remix {
                clip: id.to_string(),
                options: RecipeOptions::default(),
                new_seed: true,
            },
            Some(("publish", id)) => return or_sorry(publish(state, &i, &user, id).await),
            Some(("remix", id)) => return or_sorry(remix_modal(state, &user, id).await),
            _ => return outdated(),
        },
    };
    // Checked and counted under one lock: parallel commands each take a slot or wait.
    if let Err(wait) = state.limiter.reserve(&user.id) {
        return interaction::ephemeral(&format!(
            "You're making clips quickly: at most {} a minute. Try again in {wait} s.",
            state.options.per_minute
        ));
    }
    let task_state = state.clone();
    tokio::spawn(async move { queue(task_state, i, user, source).await });
    interaction::deferred()
}

fn outdated() -> Value {
    interaction::ephemeral("This is from an older version of Motif and does nothing now.")
}

/// Database trouble: logged, and a short apology to the user.
fn or_sorry(result: anyhow::Result<Value>) -> Value {
    result.unwrap_or_else(|e| {
        eprintln!("motif serve: discord: {e:#}");
        interaction::ephemeral("Something went wrong on the server. Please try again.")
    })
}

/// Queues the job and says so, or posts why it could not be queued.
async fn queue(state: DiscordState, i: Interaction, user: DiscordUser, source: Source) {
    let outcome = match state.app.db.discord_member(&user).await {
        Ok(member) => queue_job(&state, &member, source).await,
        Err(e) => Err(Failure::Internal(e)),
    };
    let message = match outcome {
        Ok((job, prompt, still)) => {
            let position = state.app.db.queue_position(&job).await.unwrap_or(0);
            let waiting = if position > 0 {
                format!(" ({position} ahead)")
            } else {
                String::new()
            };
            // Said before the job is handed to `deliver`, so that this never
            // overwrites the result.
            let said = deliver::edit_original(
                &state,
                &i.token,
                &json!({
                    "content": match &still {
                        Some(line) => deliver::with_line(
                            &format!("⏳ Queued{waiting}: **{}**", deliver::plain(&prompt)),
                            line,
                        ),
                        None => format!("⏳ Queued{waiting}: **{}**", deliver::plain(&prompt)),
                    },
                    "allowed_mentions": { "parse": [] },
                }),
            )
            .await;
            if let Err(e) = said {
                eprintln!("motif serve: discord: job {}: {e:#}", job.id);
            }
            let handed = state
                .app
                .db
                .insert_discord_job(&DiscordJob {
                    job_id: job.id.clone(),
                    discord_id: user.id.clone(),
                    application_id: state.options.application_id.clone(),
                    interaction_token: i.token.clone(),
                    token_expires_ms: interaction::snowflake_ms(&i.id).unwrap_or_else(now_ms)
                        + TOKEN_LIFETIME_MS,
                    channel_id: i.channel_id.clone(),
                    attempts: 0,
                })
                .await;
            match handed {
                Ok(()) => return,
                Err(e) => {
                    // The job runs and stays in the member's account; only
                    // the post to Discord is lost.
                    eprintln!("motif serve: discord: job {}: {e:#}", job.id);
                    format!(
                        "Your clip is queued as {} but Motif cannot post it here: {}",
                        job.id,
                        state.clip_page(&job.id)
                    )
                }
            }
        }
        Err(Failure::User(message)) => format!("⚠️ {message}"),
        Err(Failure::Internal(e)) => {
            eprintln!("motif serve: discord: {e:#}");
            "⚠️ Something went wrong on the server. Please try again.".to_string()
        }
    };
    let payload = json!({ "content": message, "allowed_mentions": { "parse": [] } });
    if let Err(e) = deliver::edit_original(&state, &i.token, &payload).await {
        eprintln!(
            "motif serve: discord: answering interaction {}: {e:#}",
            i.id
        );
    }
}

/// Why no job was queued: something to tell the user, or the server's trouble.
enum Failure {
    User(String),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Internal(e)
    }
}

async fn queue_job(
    state: &DiscordState,
    member: &User,
    source: Source,
) -> Result<(db::JobRow, String, Option<String>), Failure> {
    let mut still_line = None;
    let mut recipe = match source {
        Source::New(options) => {
            let mut r = state.options.defaults.clone();
            options.apply(&mut r);
            r
        }
        Source::Animate(image, options) => {
            let mut r = state.options.defaults.clone();
            options.apply(&mut r);
            let limit = state
                .options
                .max_attachment_bytes
                .min(state.app.limits.job.max_image_bytes);
            let still = fetch::still(
                &state.client,
                &image,
                &state.options.attachment_origins,
                limit,
            )
            .await
            .map_err(|e| Failure::User(e.to_string()))?;
            r.insert("image".into(), Value::from(still));
            // The server's model decides: one trained for image-to-video
            // reads the still (and has no `strength`), else it anchors the
            // first frame as AnimateDiff does.
            let model = r.get("model").and_then(Value::as_str).map(str::to_string);
            let mode = deliver::image_mode(state, model.clone()).await;
            let mut line = deliver::still_line(mode, model.as_deref());
            if mode == Some(ImageMode::Native) && r.remove("strength").is_some() {
                line.push_str(" `strength` does not apply to it and was left out.");
            }
            still_line = Some(line);
            r
        }
        Source::Remix {
            clip,
            options,
            new_seed,
        } => {
            let mut r = clip_recipe(state, member, &clip).await?;
            if new_seed {
                r.remove("seed");
            }
            options.apply(&mut r);
            r
        }
    };
    // Discord plays MP4 inline; a remixed GIF comes back as MP4 too.
    recipe.insert("format".into(), Value::from("mp4"));
    if recipe.get("prompt").is_none() {
        // /animate may leave the prompt out: the still says what it is.
        recipe.insert("prompt".into(), Value::from("the picture, moving"));
    }
    let request = JobRequest::from_value(Value::Object(recipe))
        .map_err(|e| Failure::User(format!("that recipe does not work: {e}")))?;
    let prompt = request.prompt().to_string();
    let job = api::accept_job(&state.app, &web_token_id(&member.id), request)
        .await
        .map_err(|e| {
            if e.status() == StatusCode::TOO_MANY_REQUESTS {
                Failure::User(format!(
                    "You have enough clips on the way for now ({}).",
                    e.describe()
                ))
            } else if e.status().is_server_error() {
                Failure::Internal(anyhow::anyhow!("{}", e.describe()))
            } else {
                Failure::User(e.describe())
            }
        })?;
    Ok((job, prompt, still_line))
}

/// The job id a `/remix` names: the id itself, or a clip page's URL.
fn clip_id(text: &str) -> Option<String> {
    let text = text.trim();
    let id = match text.find("/clips/") {
        Some(at) => text[at + "/clips/".len()..]
            .split(['/', '?', '#'])
            .next()
            .unwrap_or(""),
        None => text,
    };
    let plain = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    plain.then(|| id.to_string())
}

/// A job whose clip this member may remix: one shown in the gallery or on
/// Discord (and not hidden), or their own.
async fn remixable(
    state: &DiscordState,
    member: &User,
    id: &str,
) -> anyhow::Result<Option<db::JobRow>> {
    let db = &state.app.db;
    let shown = db.clip(id).await?.is_some_and(|c| !c.hidden);
    let own = db.job_owner(id).await?.as_deref() == Some(member.id.as_str());
    Ok(if shown || own {
        db.job(id).await?
    } else {
        None
    })
}

/// The recipe of a clip this member may remix ([`remixable`]), with the
/// seed it was made with and its still.
async fn clip_recipe(
    state: &DiscordState,
    member: &User,
    clip: &str,
) -> Result<Map<String, Value>, Failure> {
    let db = &state.app.db;
    let unknown = || {
        Failure::User(format!(
            "There is no clip `{}` to remix.",
            deliver::plain(clip)
        ))
    };
    let id = clip_id(clip).ok_or_else(unknown)?;
    let job = remixable(state, member, &id).await?.ok_or_else(unknown)?;
    if job.state != db::FINISHED {
        return Err(Failure::User(format!(
            "The clip `{id}` is {}: only a finished clip can be remixed.",
            job.state
        )));
    }
    let mut recipe = match serde_json::from_str(&job.request) {
        Ok(Value::Object(m)) => m,
        _ => {
            return Err(Failure::Internal(anyhow::anyhow!(
                "job {id}: unreadable request"
            )))
        }
    };
    if !recipe.contains_key("seed") {
        if let Some(name) = &job.recipe {
            let made = api::read_stored(&state.app, name).await?;
            let made = String::from_utf8_lossy(&made);
            if let Some(seed) = motif_recipe::Recipe::from_json(&made)
                .ok()
                .and_then(|r| r.seed)
            {
                recipe.insert("seed".into(), Value::from(seed));
            }
        }
    }
    if let Some(image) = db.job_image(&id).await? {
        recipe.insert("image".into(), Value::from(image));
    }
    if let Some(last) = db.job_last_image(&id).await? {
        recipe.insert("last_image".into(), Value::from(last));
    }
    Ok(recipe)
}

/// Publish: only the Discord user who made the clip may list it in the gallery.
async fn publish(
    state: &DiscordState,
    i: &Interaction,
    user: &DiscordUser,
    id: &str,
) -> anyhow::Result<Value> {
    let db = &state.app.db;
    let Some(made) = db.discord_job(id).await? else {
        return Ok(interaction::ephemeral(
            "That clip is not one Motif made here.",
        ));
    };
    if made.discord_id != user.id {
        return Ok(interaction::ephemeral(&format!(
            "Only <@{}> can publish this clip. Re-roll or Remix it to make your own.",
            made.discord_id
        )));
    }
    let job = db.job(id).await?;
    let (Some(job), Some(owner)) = (job, db.job_owner(id).await?) else {
        return Ok(interaction::ephemeral("That clip has been deleted."));
    };
    if job.state != db::FINISHED {
        return Ok(interaction::ephemeral(
            "Only a finished clip can be published.",
        ));
    }
    let page = state.clip_page(id);
    if !db.publish_job(&job, &owner).await? {
        return Ok(interaction::ephemeral(&format!(
            "It is in the gallery already: {page}"
        )));
    }
    Ok(match &i.message_content {
        Some(content) => interaction::update_message(json!({
            "content": deliver::with_line(content, &format!("🌐 Published to the gallery: {page}")),
            "components": deliver::buttons(id, true),
            "allowed_mentions": { "parse": [] },
        })),
        None => interaction::ephemeral(&format!("Published to the gallery: {page}")),
    })
}

/// Remix: a form with the clip's prompt to change.
async fn remix_modal(state: &DiscordState, user: &DiscordUser, id: &str) -> anyhow::Result<Value> {
    let member = state.app.db.discord_member(user).await?;
    let Some(job) = remixable(state, &member, id).await? else {
        return Ok(interaction::ephemeral("That clip is gone."));
    };
    let request = job.job_request().unwrap_or_default();
    let prompt = request.prompt();
    let max = state.app.limits.job.max_prompt_chars.min(4000);
    let prompt: String = prompt.chars().take(max).collect();
    Ok(interaction::modal(
        &format!("remix:{id}"),
        "Remix this clip",
        &[("prompt", "Prompt", &prompt, max)],
    ))
}

#[cfg(test)]
mod tests {
    use super::clip_id;

    #[test]
    fn remix_takes_an_id_or_a_clip_page() {
        assert_eq!(clip_id(" 19abc0ff12 ").as_deref(), Some("19abc0ff12"));
        assert_eq!(
            clip_id("https://motif.example/clips/19abc0ff12?x=1").as_deref(),
            Some("19abc0ff12")
        );
        assert_eq!(
            clip_id("http://127.0.0.1:7433/clips/19abc0ff12/video").as_deref(),
            Some("19abc0ff12")
        );
        assert_eq!(clip_id("../../etc/passwd"), None);
        assert_eq!(clip_id("https://motif.example/clips/"), None);
    }
}
