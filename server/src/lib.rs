//! `motif serve` and `motif worker`: Motif's generation service.
//!
//! The HTTP API (`api`), the metadata store and job queue (`db`: SQLite
//! embedded in the data folder, or PostgreSQL shared with remote workers),
//! the clip store (`store`: files under the data folder, or an S3-compatible
//! bucket) and the worker loop (`worker`). Generation itself is behind the
//! [`Runner`] trait, which the `motif` binary implements with the same code
//! as `motif generate`, so this crate never touches the GPU.

pub mod accounts;
mod api;
pub mod db;
pub mod discord;
pub mod gallery;
mod listen;
mod quota;
pub mod request;
mod store;
mod web;
mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub use accounts::HashingOptions;
pub use listen::ConnectionLimits;
pub use request::{FieldError, JobLimits, JobRequest, Names};
use store::Store;
pub use store::StoreOptions;
pub use web::WebOptions;

/// The port `motif serve` listens on by default: not one that ComfyUI (8188),
/// the Gradio web UIs (7860), Ollama (11434) or the usual dev servers use.
pub const DEFAULT_PORT: u16 = 7433;

/// Preview frames after a denoising step, RGB8 at latent size.
pub struct Preview {
    pub width: usize,
    pub height: usize,
    pub frames: Vec<Vec<u8>>,
}

/// Progress of one job, reported by the runner after each step.
pub struct Progress {
    pub step: usize,
    pub total: usize,
    pub preview: Option<Preview>,
}

/// One job handed to a [`Runner`].
pub struct RunJob {
    pub id: String,
    pub request: JobRequest,
    /// The uploaded still, written to a file for the runner.
    pub image: Option<PathBuf>,
    /// The uploaded last still (first-last frame), written the same way.
    pub last_image: Option<PathBuf>,
    /// Where the clip goes, in the worker's scratch folder, with its recipe
    /// beside it; the worker then moves both to the clip store.
    pub output: PathBuf,
}

/// The files a finished run wrote.
pub struct RunOutput {
    pub clip: PathBuf,
    pub recipe: PathBuf,
}

/// The clip a job makes, once the model's defaults fill in what the job left
/// out and `aspect` is turned into a size: what the server's bounds apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipSize {
    pub width: u32,
    pub height: u32,
    pub frames: u32,
}

/// Why a run failed. `message` is what the job's owner sees (the API, /me,
/// Discord): it names the input ("the uploaded image"), never a path on the
/// server; `detail` is the whole cause, for the server's log.
#[derive(Debug)]
pub struct RunError {
    pub message: String,
    /// The input itself is at fault (a corrupt still, a request the model
    /// refuses): another attempt would fail the same way, so none is made.
    pub permanent: bool,
    pub detail: anyhow::Error,
}

impl RunError {
    pub fn permanent(message: impl Into<String>, detail: anyhow::Error) -> Self {
        RunError {
            message: message.into(),
            permanent: true,
            detail,
        }
    }

    /// The machine, not the input, failed (GPU, disk, the model's files):
    /// another attempt, maybe on another worker, may succeed.
    pub fn transient(message: impl Into<String>, detail: anyhow::Error) -> Self {
        RunError {
            message: message.into(),
            permanent: false,
            detail,
        }
    }
}

/// How a model uses the still of a job (Discord's /animate says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageMode {
    /// The still anchors the first frame of a text-to-video model
    /// (AnimateDiff's `image`, with `strength`).
    Anchor,
    /// The model is trained for image-to-video and reads the still itself
    /// (Wan I2V); `strength` does not apply.
    Native,
}

/// Runs generations for the service. Implemented by the `motif` binary.
pub trait Runner: Send + Sync + 'static {
    /// Every check that needs no GPU (model found, style known, sizes that
    /// the model allows), at submission time; returns the clip's final size,
    /// which the server then bounds ([`JobLimits::check_size`]).
    fn check(&self, request: &JobRequest) -> Result<ClipSize, FieldError>;

    /// The style presets and models this machine offers by name.
    fn names(&self) -> Names;

    /// How `model` (the default model when `None`) uses an uploaded still:
    /// `None` when it takes none or cannot be opened here.
    fn image_mode(&self, model: Option<&str>) -> Option<ImageMode>;

    /// Runs one job to completion on the calling (blocking) thread.
    /// `progress` returns false to cancel. `Ok(None)`: cancelled, nothing written.
    fn run(
        &self,
        job: &RunJob,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Option<RunOutput>, RunError>;
}

/// How the queue treats claims.
#[derive(Debug, Clone)]
pub struct QueueOptions {
    /// A claimed job whose worker has not renewed its lease for this long is
    /// re-queued (or failed once out of attempts).
    pub lease: Duration,
    /// Claims per job before it is failed.
    pub max_attempts: i64,
    /// How often an idle worker looks for a job.
    pub poll: Duration,
    /// How long a statement waits for a database connection before the
    /// database counts as unreachable (API: 503 with `Retry-After`).
    pub acquire_timeout: Duration,
    /// Added to this process's clock (tests play machines whose clocks
    /// disagree with it); 0 in service.
    pub clock_offset_ms: i64,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            lease: Duration::from_secs(30),
            max_attempts: 3,
            poll: Duration::from_millis(500),
            acquire_timeout: db::DEFAULT_ACQUIRE_TIMEOUT,
            clock_offset_ms: 0,
        }
    }
}

/// Per-member limits and request bounds of the API. A member's tokens (API
/// tokens, the web pages', Discord's) share their member's limits; a token of
/// no member has limits of its own.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    pub job: JobLimits,
    /// Queued plus running jobs one member may have.
    pub max_active_per_member: i64,
    /// Jobs one member may submit in any 60 seconds.
    pub submissions_per_minute: i64,
    /// Live API tokens one member may hold (the web pages' own not counted).
    pub max_tokens_per_member: i64,
    /// Largest request body (a base64 still included).
    pub max_body_bytes: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            job: JobLimits::default(),
            max_active_per_member: 10,
            submissions_per_minute: 30,
            max_tokens_per_member: 10,
            max_body_bytes: 8 << 20,
        }
    }
}

pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data: PathBuf,
    /// `postgres://...`; None: the SQLite file in `data`.
    pub database: Option<String>,
    pub store: StoreOptions,
    pub workers: usize,
    pub queue: QueueOptions,
    pub limits: ApiLimits,
    /// Timeouts and the per-address cap on connections.
    pub connections: ConnectionLimits,
    /// The cap on password hashes in flight.
    pub hashing: HashingOptions,
    pub web: WebOptions,
    /// Serve `POST /discord/interactions` as this Discord app.
    pub discord: Option<discord::DiscordOptions>,
}

pub struct WorkerOptions {
    /// Scratch space; also the clip store unless `store` names a bucket.
    pub data: PathBuf,
    pub database: Option<String>,
    pub store: StoreOptions,
    pub workers: usize,
    pub queue: QueueOptions,
}

/// The database URL: the given one, or the SQLite file `motif.db` in `data`.
pub fn database_url(data: &Path, database: Option<&str>) -> Result<String> {
    match database {
        Some(url) => Ok(url.to_string()),
        None => {
            std::fs::create_dir_all(data)
                .with_context(|| format!("creating the data folder {}", data.display()))?;
            let dir = std::fs::canonicalize(data)
                .with_context(|| format!("the data folder {}", data.display()))?;
            Ok(format!(
                "sqlite://{}?mode=rwc",
                dir.join("motif.db").display()
            ))
        }
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(crate) fn hash_token(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// The names the server accepts and its OpenAPI document lists: the
/// runner's, less any model its own check refuses (a folder in the models
/// directory that is not a model it can open), so that the document never
/// promises what a submission would be refused for.
fn accepted_names(runner: &dyn Runner) -> Names {
    let mut names = runner.names();
    names.models.retain(|model| {
        let mut probe = JobRequest::new("a probe");
        probe.recipe.model = Some(model.clone());
        // An image-to-video model refuses the probe for the still it lacks:
        // it opened, so it is a model.
        match runner.check(&probe) {
            Ok(_) => true,
            Err(e) => matches!(e.field.as_str(), "image" | "last_image"),
        }
    });
    names
}

/// Creates an API token and returns it; only its SHA-256 is stored.
pub fn create_token(data: &Path, database: Option<&str>, admin: bool) -> Result<String> {
    let url = database_url(data, database)?;
    runtime()?.block_on(async {
        let db = db::Db::connect(&url).await?;
        let token = format!("motif_{}", random_hex(32));
        db.insert_token(&random_hex(8), &hash_token(&token), admin)
            .await
            .context("storing the token")?;
        Ok(token)
    })
}

/// Ctrl-C, or SIGTERM (what service managers send): workers put their job
/// back in the queue and exit.
async fn stop_requested() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `motif serve`: the API and `workers` in-process workers, until Ctrl-C or SIGTERM.
pub fn serve(options: ServeOptions, runner: Arc<dyn Runner>) -> Result<()> {
    if let Some(discord) = &options.discord {
        discord.check(&options.limits.job)?;
    }
    let url = database_url(&options.data, options.database.as_deref())?;
    let store = Arc::new(Store::open(&options.data, &options.store)?);
    db::set_clock_offset_ms(options.queue.clock_offset_ms);
    runtime()?.block_on(async move {
        store.check().await?;
        let db = db::Db::connect_with(&url, options.queue.acquire_timeout).await?;
        if !db.is_postgres() {
            // Nobody else can hold a lease on the embedded database: jobs left
            // running belonged to a server that died; hand them out again now.
            db.expire_all_leases().await?;
        }
        let shutdown = worker::Shutdown::new();
        let mut handles = Vec::new();
        for index in 0..options.workers {
            handles.push(tokio::spawn(worker::run(
                db.clone(),
                runner.clone(),
                store.clone(),
                options.queue.clone(),
                worker::worker_name(index),
                shutdown.clone(),
            )));
        }
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("listening on {}", options.listen))?;
        eprintln!(
            "motif serve: http://{} ({} worker{}, database {}, clips in {})",
            listener.local_addr().unwrap_or(options.listen),
            options.workers,
            if options.workers == 1 { "" } else { "s" },
            db::redact(&url),
            store.location
        );
        let names = accepted_names(&*runner);
        let state = api::AppState {
            db: db.clone(),
            openapi: api::openapi_document(&names)?.into(),
            names: Arc::new(names),
            runner,
            store,
            limits: Arc::new(options.limits),
            hashing: Arc::new(accounts::PasswordHashing::new(&options.hashing)),
            shutdown: shutdown.clone(),
            retry_after: options.queue.acquire_timeout.as_secs().max(1),
        };
        let mut routes = api::router(state.clone());
        if let Some(discord) = options.discord {
            let discord = discord::DiscordState::new(state.clone(), discord)?;
            eprintln!(
                "motif serve: Discord interactions at {}/discord/interactions",
                discord.options.public_url.trim_end_matches('/')
            );
            handles.push(discord::spawn_delivery(discord.clone(), shutdown.clone()));
            routes = routes.merge(discord::router(discord));
        }
        let app = web::app(routes, state, options.web);
        let signal = shutdown.clone();
        listen::serve(listener, app, &options.connections, async move {
            stop_requested().await;
            signal.trigger();
        })
        .await
        .context("serving HTTP")?;
        shutdown.trigger();
        for h in handles {
            let _ = h.await;
        }
        Ok(())
    })
}

/// Longest wait between two tries to reach the database at start-up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// A worker may start before its database (a machine booting, an outage):
/// it tries again, waiting twice as long each time up to
/// [`MAX_CONNECT_BACKOFF`], and says so each time. A schema it cannot
/// migrate is an error at once. None: asked to stop first.
async fn connect_until_up(
    url: &str,
    queue: &QueueOptions,
    shutdown: &worker::Shutdown,
) -> Result<Option<db::Db>> {
    let mut wait = Duration::from_secs(1);
    loop {
        match db::Db::open(url, queue.acquire_timeout).await {
            Ok(db) => {
                db.migrate().await?;
                return Ok(Some(db));
            }
            Err(e) => eprintln!(
                "motif worker: cannot reach the database {} ({e:#}); trying again in {} s",
                db::redact(url),
                wait.as_secs()
            ),
        }
        shutdown.sleep(wait).await;
        if shutdown.is_set() {
            return Ok(None);
        }
        wait = (wait * 2).min(MAX_CONNECT_BACKOFF);
    }
}

/// `motif worker`: `workers` workers on the shared queue, until Ctrl-C or SIGTERM.
pub fn work(options: WorkerOptions, runner: Arc<dyn Runner>) -> Result<()> {
    let url = database_url(&options.data, options.database.as_deref())?;
    let store = Arc::new(Store::open(&options.data, &options.store)?);
    db::set_clock_offset_ms(options.queue.clock_offset_ms);
    runtime()?.block_on(async move {
        store.check().await?;
        let shutdown = worker::Shutdown::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            stop_requested().await;
            signal.trigger();
        });
        let Some(db) = connect_until_up(&url, &options.queue, &shutdown).await? else {
            return Ok(());
        };
        let mut handles = Vec::new();
        for index in 0..options.workers.max(1) {
            let name = worker::worker_name(index);
            eprintln!(
                "motif worker {name}: database {}, clips in {}",
                db::redact(&url),
                store.location
            );
            handles.push(tokio::spawn(worker::run(
                db.clone(),
                runner.clone(),
                store.clone(),
                options.queue.clone(),
                name,
                shutdown.clone(),
            )));
        }
        for h in handles {
            let _ = h.await;
        }
        Ok(())
    })
}
