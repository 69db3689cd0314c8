//! Motif as a Discord app: the interactions endpoint on `motif serve`
//! (`endpoint`: signature checks in `verify`, parsing in `interaction`), the
//! Motif accounts of Discord users and the jobs queued for them (`db`), the
//! still of `/animate` (`fetch`), the results posted back (`deliver`), and the
//! slash commands with `motif discord register` (`commands`).

pub mod commands;
mod db;
mod deliver;
mod endpoint;
mod fetch;
pub mod interaction;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::Router;
use serde_json::{Map, Value};

use crate::accounts::RateLimiter;
use crate::api::AppState;
use crate::worker::Shutdown;
use crate::{FieldError, JobLimits, JobRequest};
pub use verify::Verifier;

/// Where Discord keeps attachments (the `url` of a resolved attachment).
pub const DEFAULT_ATTACHMENT_ORIGINS: [&str; 2] =
    ["https://cdn.discordapp.com", "https://media.discordapp.net"];

/// Discord's upload limit for a bot's message in a server without boosts.
pub const DEFAULT_UPLOAD_LIMIT: usize = 10 * 1000 * 1000;

/// Interactions are a few kilobytes of JSON.
const MAX_INTERACTION_BYTES: usize = 1 << 20;

/// How `motif serve` acts as a Discord app.
pub struct DiscordOptions {
    /// The app's public key: every request to the endpoint is checked with it.
    pub public_key: Verifier,
    pub application_id: String,
    /// Posts results that finish after the interaction's token expired.
    pub bot_token: String,
    /// Discord's REST API, [`commands::DEFAULT_API_BASE`] but for tests.
    pub api_base: String,
    /// `scheme://host[:port]` of the only places a still is fetched from.
    pub attachment_origins: Vec<String>,
    pub max_attachment_bytes: usize,
    /// Larger clips are re-encoded smaller, else posted as a link.
    pub upload_limit_bytes: usize,
    /// Commands one Discord user may run per minute.
    pub per_minute: usize,
    /// Job fields every Discord job starts from (the command's options win):
    /// what a community chooses to spend on a clip, e.g. `{"steps": 8}`.
    pub defaults: Map<String, Value>,
    /// The gallery's address as members reach it, for links in messages.
    pub public_url: String,
}

impl std::fmt::Debug for DiscordOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscordOptions")
            .field("application_id", &self.application_id)
            .field("api_base", &self.api_base)
            .field("attachment_origins", &self.attachment_origins)
            .field("public_url", &self.public_url)
            .finish_non_exhaustive()
    }
}

impl DiscordOptions {
    /// Checks what can be checked before serving: ids, URLs, the defaults
    /// (within the server's `limits`, or every command would be refused).
    pub fn check(&self, limits: &JobLimits) -> Result<()> {
        if self.application_id.is_empty()
            || !self.application_id.bytes().all(|b| b.is_ascii_digit())
        {
            bail!(
                "the Discord application id (MOTIF_DISCORD_APPLICATION_ID) must be the app's \
                 numeric id, found `{}`",
                self.application_id
            );
        }
        if self.bot_token.trim().is_empty() {
            bail!("MOTIF_DISCORD_BOT_TOKEN is empty: results that finish late are posted with it");
        }
        for origin in &self.attachment_origins {
            fetch::parse_origin(origin)?;
        }
        for (what, url) in [
            ("--discord-api-base", &self.api_base),
            ("--public-url", &self.public_url),
        ] {
            let parsed = reqwest::Url::parse(url).with_context(|| format!("{what} {url}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                bail!("{what} {url}: expected an http:// or https:// URL");
            }
        }
        self.defaults_probe()
            .and_then(|probe| probe.validate(limits).map(|_| ()))
            .map_err(|e| anyhow::anyhow!("--discord-defaults: {e}"))?;
        if self.per_minute == 0 {
            bail!("--discord-per-minute must be at least 1");
        }
        Ok(())
    }

    /// The defaults as a job with a placeholder prompt.
    fn defaults_probe(&self) -> Result<JobRequest, FieldError> {
        let mut probe = self.defaults.clone();
        probe.insert("prompt".into(), Value::from("a probe"));
        JobRequest::from_value(Value::Object(probe))
    }
}

/// What the endpoint and the delivery loop share.
#[derive(Clone)]
pub(crate) struct DiscordState {
    pub app: AppState,
    pub options: Arc<DiscordOptions>,
    pub client: reqwest::Client,
    /// Commands per Discord user per minute.
    pub limiter: Arc<RateLimiter>,
}

impl DiscordState {
    pub fn new(app: AppState, mut options: DiscordOptions) -> Result<DiscordState> {
        options.check(&app.limits.job)?;
        // Compared as parsed, once, not at every fetch.
        options.attachment_origins = (options.attachment_origins.iter())
            .map(|o| fetch::parse_origin(o))
            .collect::<Result<_>>()?;
        let client = reqwest::Client::builder()
            .user_agent(concat!(
                "DiscordBot (https://github.com/motif, ",
                env!("CARGO_PKG_VERSION"),
                ")"
            ))
            .timeout(Duration::from_secs(60))
            // An attachment URL that redirects elsewhere would escape the
            // host check: nothing here follows redirects.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the HTTP client")?;
        Ok(DiscordState {
            limiter: Arc::new(RateLimiter::new(
                options.per_minute,
                Duration::from_secs(60),
            )),
            options: Arc::new(options),
            client,
            app,
        })
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}{path}", self.options.api_base.trim_end_matches('/'))
    }

    pub fn clip_page(&self, job_id: &str) -> String {
        format!(
            "{}/clips/{job_id}",
            self.options.public_url.trim_end_matches('/')
        )
    }
}

/// `POST /discord/interactions`.
pub(crate) fn router(state: DiscordState) -> Router {
    Router::new()
        .route("/discord/interactions", post(endpoint::interactions))
        .layer(DefaultBodyLimit::max(MAX_INTERACTION_BYTES))
        .with_state(state)
}

/// Posts the results of Discord jobs as they end, until shutdown.
pub(crate) fn spawn_delivery(
    state: DiscordState,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(deliver::run(state, shutdown))
}
