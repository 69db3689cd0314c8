//! `motif serve`, `motif worker` and `motif admin`: flags, and the
//! [`motif_server::Runner`] that runs a job with the same code as
//! `motif generate`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use motif_engine::pipelines::{Event, ModelCache, StillUse, Stills};
use motif_engine::EngineError;
use motif_engine::Gpu;
use motif_server::accounts;
use motif_server::discord::{DiscordOptions, Verifier};
use motif_server::{
    ApiLimits, ClipSize, ConnectionLimits, FieldError, HashingOptions, ImageMode, JobRequest,
    Names, Preview, Progress, QueueOptions, RunError, RunJob, RunOutput, Runner, ServeOptions,
    StoreOptions, WebOptions, WorkerOptions,
};

use crate::catalog;
use crate::generate;

#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    /// Seconds a worker's claim on a job lasts without a heartbeat; a job whose worker died goes back to the queue after it.
    #[arg(long, env = "MOTIF_LEASE_SECONDS", default_value_t = 30.0)]
    lease_seconds: f64,
    /// Claims per job (a worker that dies or a run that fails uses one) before the job is failed with its error. Input that can never succeed (a corrupt still) fails at once.
    #[arg(long, default_value_t = 3)]
    max_attempts: i64,
    /// Seconds to wait for a database connection before the database counts as unreachable: API requests then answer 503 with Retry-After.
    #[arg(long, default_value_t = 5.0)]
    db_acquire_timeout_seconds: f64,
    /// Shifts this process's clock (tests only: machines whose clocks disagree).
    #[arg(
        long,
        default_value_t = 0.0,
        hide = true,
        allow_negative_numbers = true
    )]
    clock_offset_seconds: f64,
}

impl QueueArgs {
    fn options(&self) -> Result<QueueOptions> {
        if !(self.lease_seconds.is_finite() && self.lease_seconds >= 0.3) {
            bail!(
                "--lease-seconds {}: expected at least 0.3",
                self.lease_seconds
            );
        }
        if self.max_attempts < 1 {
            bail!("--max-attempts must be at least 1");
        }
        if !(self.db_acquire_timeout_seconds.is_finite()
            && (0.1..=600.0).contains(&self.db_acquire_timeout_seconds))
        {
            bail!(
                "--db-acquire-timeout-seconds {}: expected 0.1 to 600",
                self.db_acquire_timeout_seconds
            );
        }
        if !(self.clock_offset_seconds.is_finite() && self.clock_offset_seconds.abs() < 1e9) {
            bail!(
                "--clock-offset-seconds {}: expected a number of seconds",
                self.clock_offset_seconds
            );
        }
        Ok(QueueOptions {
            lease: Duration::from_secs_f64(self.lease_seconds),
            max_attempts: self.max_attempts,
            acquire_timeout: Duration::from_secs_f64(self.db_acquire_timeout_seconds),
            clock_offset_ms: (self.clock_offset_seconds * 1000.0) as i64,
            ..Default::default()
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Keep clips and recipes in an S3-compatible bucket, s3://BUCKET or s3://BUCKET/PREFIX, shared by the server and its workers, instead of the clips folder in --data. Credentials and region come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN) and AWS_REGION.
    #[arg(long, env = "MOTIF_STORE", value_name = "s3://BUCKET/PREFIX")]
    store: Option<String>,
    /// The endpoint of an S3-compatible service other than AWS (MinIO, Cloudflare R2, moto), e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL, else AWS); an http:// endpoint is used without TLS.
    #[arg(long, value_name = "URL")]
    s3_endpoint: Option<String>,
}

impl StoreArgs {
    fn options(&self) -> StoreOptions {
        StoreOptions {
            url: self.store.clone(),
            endpoint: self.s3_endpoint.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Folder for the SQLite database, the clips and their recipes (created if missing).
    #[arg(long)]
    data: PathBuf,
    /// Address and port to listen on.
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], motif_server::DEFAULT_PORT)))]
    listen: SocketAddr,
    /// In-process GPU workers; 0 serves the API only (workers run as `motif worker`).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// A PostgreSQL URL (postgres://user:password@host/db) shared with `motif worker`s, instead of the SQLite file in --data.
    #[arg(long, env = "MOTIF_DATABASE_URL")]
    database: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Queued plus running jobs one member may have, all their tokens (API, web pages, Discord) together; a token of no member has its own.
    #[arg(long, alias = "max-active-per-token", default_value_t = 10)]
    max_active_per_member: i64,
    /// Jobs one member (all their tokens together) may submit per minute.
    #[arg(long, default_value_t = 30)]
    submissions_per_minute: i64,
    /// How long a gallery login lasts, in seconds (default 14 days).
    #[arg(long, env = "MOTIF_SESSION_SECONDS", default_value_t = 14 * 24 * 3600)]
    session_seconds: u64,
    /// Failed gallery logins to one account allowed per 15 minutes; more get 429.
    #[arg(long, default_value_t = 5)]
    login_failures: usize,
    /// Failed gallery logins from one client address (any names; IPv6 by
    /// /64) allowed per 15 minutes; more get 429.
    #[arg(long, default_value_t = 20)]
    login_failures_per_ip: usize,
    /// Clips on one gallery page.
    #[arg(long, default_value_t = 24)]
    page_size: usize,
    #[command(flatten)]
    queue: QueueArgs,
    #[command(flatten)]
    discord: DiscordArgs,
    #[command(flatten)]
    abuse: AbuseLimitArgs,
}

/// Limits against floods and slow clients (README, "Limits").
#[derive(Args, Debug)]
pub struct AbuseLimitArgs {
    /// Live API tokens one member may hold (made on /me; the web pages' own token not counted).
    #[arg(long, default_value_t = 10)]
    max_tokens_per_member: i64,
    /// Password hashes (sign-ups, logins) running at once, each about 19 MiB and a core for tens of milliseconds; more get 503 with Retry-After (default: 2 per core, at least 4).
    #[arg(long, value_name = "N")]
    max_password_hashes: Option<usize>,
    /// Sign-ups from one client address (IPv6 by /64) per hour; more get 429.
    #[arg(long, default_value_t = 10)]
    signups_per_address: usize,
    /// Seconds a client has to send a request's headers, from connecting or from its previous answer (so also how long an idle keep-alive connection stays open).
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    header_timeout: f64,
    /// Longest pause, in seconds, while a request body arrives; a stalled upload is ended.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    body_timeout: f64,
    /// Open connections from one client address (IPv6 by /64); more are closed as they arrive.
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_connections_per_address: usize,
}

impl AbuseLimitArgs {
    fn seconds(flag: &str, value: f64) -> Result<Duration> {
        if !(value.is_finite() && (0.1..=3600.0).contains(&value)) {
            bail!("--{flag} {value}: expected 0.1 to 3600 seconds");
        }
        Ok(Duration::from_secs_f64(value))
    }

    fn connections(&self) -> Result<ConnectionLimits> {
        if self.max_connections_per_address < 1 {
            bail!("--max-connections-per-address must be at least 1");
        }
        Ok(ConnectionLimits {
            header_timeout: Self::seconds("header-timeout", self.header_timeout)?,
            body_timeout: Self::seconds("body-timeout", self.body_timeout)?,
            max_per_address: self.max_connections_per_address,
        })
    }

    fn hashing(&self) -> Result<HashingOptions> {
        match self.max_password_hashes {
            Some(0) => bail!("--max-password-hashes must be at least 1"),
            Some(n) => Ok(HashingOptions { max_in_flight: n }),
            None => Ok(HashingOptions::default()),
        }
    }
}

/// `motif serve` as a Discord app (docs/DISCORD.md); off unless the public key is given.
#[derive(Args, Debug)]
pub struct DiscordArgs {
    /// Answer Discord interactions at /discord/interactions, checked against this app's public key (64 hex digits, Developer Portal, General Information). Needs MOTIF_DISCORD_APPLICATION_ID and MOTIF_DISCORD_BOT_TOKEN too.
    #[arg(long, env = "MOTIF_DISCORD_PUBLIC_KEY", value_name = "HEX")]
    discord_public_key: Option<String>,
    /// The Discord app's Application ID.
    #[arg(long, env = "MOTIF_DISCORD_APPLICATION_ID", value_name = "ID")]
    discord_application_id: Option<String>,
    /// Discord's REST API (another base only for tests and proxies).
    #[arg(long, env = "MOTIF_DISCORD_API_BASE", default_value = motif_server::discord::commands::DEFAULT_API_BASE)]
    discord_api_base: String,
    /// Where /animate's images may be fetched from, https://HOST[:PORT]; repeat for several (default: Discord's attachment hosts).
    #[arg(long = "discord-attachment-host", value_name = "ORIGIN")]
    discord_attachment_hosts: Vec<String>,
    /// Largest image /animate fetches, in bytes (also bounded by the API's 4 MiB still limit).
    #[arg(long, default_value_t = 4 << 20)]
    discord_max_attachment_bytes: usize,
    /// Discord's upload limit for the bot, in bytes: larger clips are re-encoded smaller, else linked.
    #[arg(long, default_value_t = motif_server::discord::DEFAULT_UPLOAD_LIMIT)]
    discord_upload_limit_bytes: usize,
    /// Commands one Discord user may run per minute.
    #[arg(long, default_value_t = 3)]
    discord_per_minute: usize,
    /// Job fields every Discord clip starts from, as JSON (the command's options win), e.g. '{"steps": 8, "frames": 16}'.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    discord_defaults: String,
    /// The gallery's address as people reach it, for the links in Discord messages (default: http:// and --listen).
    #[arg(long, env = "MOTIF_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
}

impl DiscordArgs {
    fn options(&self, listen: SocketAddr) -> Result<Option<DiscordOptions>> {
        let Some(key) = &self.discord_public_key else {
            return Ok(None);
        };
        let public_key = Verifier::from_hex(key)
            .map_err(|e| anyhow::anyhow!("--discord-public-key (MOTIF_DISCORD_PUBLIC_KEY): {e}"))?;
        let application_id = self.discord_application_id.clone().context(
            "--discord-public-key needs the app's id too: MOTIF_DISCORD_APPLICATION_ID \
             or --discord-application-id",
        )?;
        // From the environment only: a flag would show in `ps` and shell history.
        let bot_token = match std::env::var("MOTIF_DISCORD_BOT_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => bail!(
                "--discord-public-key needs MOTIF_DISCORD_BOT_TOKEN (Developer Portal, Bot): \
                 results that finish after 15 minutes are posted with it"
            ),
        };
        let defaults = match serde_json::from_str(&self.discord_defaults) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => bail!(
                "--discord-defaults {}: expected a JSON object of job fields",
                self.discord_defaults
            ),
        };
        let attachment_origins = if self.discord_attachment_hosts.is_empty() {
            motif_server::discord::DEFAULT_ATTACHMENT_ORIGINS
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            self.discord_attachment_hosts.clone()
        };
        Ok(Some(DiscordOptions {
            public_key,
            application_id,
            bot_token,
            api_base: self.discord_api_base.clone(),
            attachment_origins,
            max_attachment_bytes: self.discord_max_attachment_bytes,
            upload_limit_bytes: self.discord_upload_limit_bytes,
            per_minute: self.discord_per_minute,
            defaults,
            public_url: self
                .public_url
                .clone()
                .unwrap_or_else(|| format!("http://{listen}")),
        }))
    }
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The PostgreSQL URL the server uses.
    #[arg(long, env = "MOTIF_DATABASE_URL")]
    database: String,
    /// Scratch space for running jobs. Without --store it is also the clip store, so it must be the server's --data folder (a shared mount). With --store it defaults to motif-worker in the system's temporary folder.
    #[arg(long, required_unless_present = "store")]
    data: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// Workers in this process (each runs one job at a time).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[command(flatten)]
    queue: QueueArgs,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create an API token and print it (only its hash is stored: keep it).
    CreateToken {
        /// The token sees and cancels every job.
        #[arg(long)]
        admin: bool,
        /// The gallery member the token belongs to (it gets their admin rights).
        #[arg(long, conflicts_with = "admin")]
        user: Option<String>,
        /// The server's --data folder (for its SQLite database).
        #[arg(long, required_unless_present = "database")]
        data: Option<PathBuf>,
        /// The server's PostgreSQL URL.
        #[arg(long, env = "MOTIF_DATABASE_URL")]
        database: Option<String>,
    },
    /// Create a gallery member; the password is read from standard input (one line).
    CreateUser {
        /// 3 to 32 letters, digits, `_` or `-`.
        name: String,
        /// Admins hide clips and see reports.
        #[arg(long)]
        admin: bool,
        /// The server's --data folder (for its SQLite database).
        #[arg(long, required_unless_present = "database")]
        data: Option<PathBuf>,
        /// The server's PostgreSQL URL.
        #[arg(long, env = "MOTIF_DATABASE_URL")]
        database: Option<String>,
    },
}

type GpuOpener = Box<dyn Fn() -> Result<Gpu> + Send + Sync>;

/// A worker's GPU and the model loaded on it.
struct Loaded {
    gpu: Gpu,
    models: ModelCache,
}

/// Runs jobs with `motif generate`'s code. Between jobs each opened GPU is
/// kept with its loaded model: a job takes the idle GPU that holds its
/// model (keyed as [`generate::Prepared::model_key`]: model, motion
/// adapter, VAE, LoRAs), else any idle one (another model evicts the one it
/// holds), else a new one.
struct EngineRunner {
    open_gpu: GpuOpener,
    idle: Mutex<Vec<Loaded>>,
}

impl EngineRunner {
    fn take(&self, model_key: &str) -> Result<Loaded> {
        let held = self.idle.lock().ok().and_then(|mut idle| {
            let i = (idle.iter())
                .position(|l| l.models.key() == Some(model_key))
                .or_else(|| idle.len().checked_sub(1))?;
            Some(idle.swap_remove(i))
        });
        match held {
            Some(l) => Ok(l),
            None => Ok(Loaded {
                gpu: (self.open_gpu)()?,
                models: ModelCache::default(),
            }),
        }
    }
}

/// A failed run as the job's owner is told it, classified where the error
/// arises: a recipe field or a request the engine refuses is the input's
/// fault (permanent); the GPU, the model's files or anything unforeseen is
/// the machine's (transient: another attempt may succeed). Messages never
/// carry the paths of the server's files.
fn run_error(e: anyhow::Error) -> RunError {
    if let Some(f) = generate::recipe_field(&e) {
        let message = match f.field.as_str() {
            // Its reason names the server's copy of the still.
            "image" => "the uploaded image cannot be read (PNG, JPEG or WebP expected)".to_string(),
            "last_image" => {
                "the uploaded last image cannot be read (PNG, JPEG or WebP expected)".to_string()
            }
            // Its reason names the model's folder.
            "model" => "model: the model cannot be opened on this server".to_string(),
            field => format!("{field}: {}", f.reason),
        };
        return RunError::permanent(message, e);
    }
    let engine = e.chain().find_map(|c| c.downcast_ref::<EngineError>());
    match engine {
        Some(
            EngineError::Argument { .. } | EngineError::Shape { .. } | EngineError::DType { .. },
        ) => {
            let message = format!(
                "the request cannot be generated: {}",
                engine.map(|x| x.to_string()).unwrap_or_default()
            );
            RunError::permanent(message, e)
        }
        Some(EngineError::UnsupportedControl {
            control, family, ..
        }) => RunError::permanent(
            format!("`{control}` is not supported by this model ({family} family)"),
            e,
        ),
        _ => RunError::transient(
            "the generation failed on the worker (the server's log has the cause)",
            e,
        ),
    }
}

impl Runner for EngineRunner {
    fn check(&self, request: &JobRequest) -> Result<ClipSize, FieldError> {
        let field_error = |e: anyhow::Error| match generate::recipe_field(&e) {
            Some(f) => FieldError::new(&f.field, f.reason.clone()),
            None => FieldError::new("request", format!("{e:#}")),
        };
        let prepared = generate::prepare(request.recipe.clone(), Some(PathBuf::from("check.mp4")))
            .map_err(field_error)?;
        let (width, height, frames) = prepared.clip_size().map_err(field_error)?;
        let model = request.recipe.model.as_deref().unwrap_or("default");
        let stills = crate::view::model_stills(model).map_err(field_error)?;
        check_stills(request, model, stills)?;
        Ok(ClipSize {
            width,
            height,
            frames,
        })
    }

    fn image_mode(&self, model: Option<&str>) -> Option<ImageMode> {
        let stills = crate::view::model_stills(model.unwrap_or("default")).ok()?;
        stills.image.map(|u| match u {
            StillUse::Anchor => ImageMode::Anchor,
            StillUse::Native => ImageMode::Native,
        })
    }

    fn names(&self) -> Names {
        Names {
            // The built-in presets always parse; a broken styles.json fails its own tests.
            styles: catalog::styles()
                .map(|all| all.into_iter().map(|s| s.name).collect())
                .unwrap_or_default(),
            models: catalog::list_models()
                .into_iter()
                .filter(catalog::Listed::is_model)
                .map(|m| m.name)
                .collect(),
        }
    }

    fn run(
        &self,
        job: &RunJob,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Option<RunOutput>, RunError> {
        let mut recipe = job.request.recipe.clone();
        recipe.image = (job.image.as_ref()).map(|p| p.to_string_lossy().into_owned());
        recipe.last_image = (job.last_image.as_ref()).map(|p| p.to_string_lossy().into_owned());
        let prepared = generate::prepare(recipe, Some(job.output.clone())).map_err(run_error)?;
        let mut loaded = self
            .take(prepared.model_key())
            .map_err(|e| RunError::transient("no GPU could be opened on the worker", e))?;
        let result = generate::generate_cached(
            &loaded.gpu,
            prepared,
            &mut loaded.models,
            // Loads and reuses of the model, in the server's log.
            &|line| eprintln!("motif worker: job {}: {line}", job.id),
            &mut |req| req.previews = true,
            &mut |event| match event {
                Event::Started { steps } => progress(Progress {
                    step: 0,
                    total: steps,
                    preview: None,
                }),
                Event::Step {
                    index,
                    total,
                    preview,
                    ..
                } => progress(Progress {
                    step: index + 1,
                    total,
                    preview: preview.map(|p| Preview {
                        width: p.width,
                        height: p.height,
                        frames: p.frames.clone(),
                    }),
                }),
                Event::Decoded { .. } => true,
                Event::Expert { name, step, .. } => {
                    eprintln!(
                        "motif worker: job {}: step {}: loading the expert {name}",
                        job.id,
                        step + 1
                    );
                    true
                }
            },
        );
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(loaded);
        }
        Ok(result.map_err(run_error)?.map(|f| RunOutput {
            clip: f.output,
            recipe: f.recipe,
        }))
    }
}

/// A job's stills against how its model takes them, at submission: what
/// the engine would refuse when the job runs, refused before it is queued
/// and named by the field (the part) at fault.
fn check_stills(request: &JobRequest, model: &str, stills: Stills) -> Result<(), FieldError> {
    let kind = match (stills.image, stills.last_image) {
        (Some(StillUse::Native), true) => "a first-last-frame model",
        (Some(StillUse::Native), false) => "an image-to-video model",
        _ => "a text-to-video model",
    };
    let (image, last) = (request.image.is_some(), request.last_image.is_some());
    if image && stills.image.is_none() {
        return Err(FieldError::new(
            "image",
            format!("model `{model}` is {kind} that takes no still"),
        ));
    }
    if !image && !stills.text_to_video {
        return Err(FieldError::new(
            "image",
            format!("model `{model}` is {kind}: send the still to animate as `image`"),
        ));
    }
    if last && !stills.last_image {
        return Err(FieldError::new(
            "last_image",
            format!(
                "model `{model}` is {kind}: only a first-last-frame model (Wan2.1-FLF2V) takes \
                 a last image"
            ),
        ));
    }
    if !last && stills.last_image {
        return Err(FieldError::new(
            "last_image",
            format!("model `{model}` is {kind}: send the still the clip ends on as `last_image`"),
        ));
    }
    if request.recipe.strength.is_some() && stills.image == Some(StillUse::Native) {
        return Err(FieldError::new(
            "strength",
            format!(
                "model `{model}` is {kind}: it reads the still itself, `strength` (how far \
                 frames move from an anchored still) does not apply"
            ),
        ));
    }
    Ok(())
}

fn runner(open_gpu: GpuOpener) -> Arc<dyn Runner> {
    Arc::new(EngineRunner {
        open_gpu,
        idle: Mutex::new(Vec::new()),
    })
}

pub fn serve(open_gpu: GpuOpener, args: &ServeArgs) -> Result<()> {
    if args.max_active_per_member < 1
        || args.submissions_per_minute < 1
        || args.abuse.max_tokens_per_member < 1
        || args.abuse.signups_per_address < 1
    {
        bail!(
            "--max-active-per-member, --submissions-per-minute, --max-tokens-per-member and \
             --signups-per-address must be at least 1"
        );
    }
    if args.session_seconds < 1
        || args.login_failures < 1
        || args.login_failures_per_ip < 1
        || !(1..=500).contains(&args.page_size)
    {
        bail!(
            "--session-seconds, --login-failures and --login-failures-per-ip must be at least 1, \
             --page-size 1 to 500"
        );
    }
    let options = ServeOptions {
        listen: args.listen,
        data: args.data.clone(),
        database: args.database.clone(),
        store: args.store.options(),
        workers: args.workers,
        queue: args.queue.options()?,
        limits: ApiLimits {
            max_active_per_member: args.max_active_per_member,
            submissions_per_minute: args.submissions_per_minute,
            max_tokens_per_member: args.abuse.max_tokens_per_member,
            ..Default::default()
        },
        connections: args.abuse.connections()?,
        hashing: args.abuse.hashing()?,
        web: WebOptions {
            session: Duration::from_secs(args.session_seconds),
            login_failures: args.login_failures,
            login_failures_per_ip: args.login_failures_per_ip,
            signups_per_address: args.abuse.signups_per_address,
            page_size: args.page_size,
            ..Default::default()
        },
        discord: args.discord.options(args.listen)?,
    };
    motif_server::serve(options, runner(open_gpu))
}

pub fn worker(open_gpu: GpuOpener, args: &WorkerArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("motif-worker"));
    let options = WorkerOptions {
        data,
        database: Some(args.database.clone()),
        store: args.store.options(),
        workers: args.workers,
        queue: args.queue.options()?,
    };
    motif_server::work(options, runner(open_gpu))
}

pub fn admin(command: &AdminCommand) -> Result<()> {
    match command {
        AdminCommand::CreateToken {
            admin,
            user,
            data,
            database,
        } => {
            let data = data.clone().unwrap_or_else(|| PathBuf::from("."));
            let token = match user {
                Some(name) => accounts::create_token_for(&data, database.as_deref(), name)?,
                None => motif_server::create_token(&data, database.as_deref(), *admin)?,
            };
            println!("{token}");
            Ok(())
        }
        AdminCommand::CreateUser {
            name,
            admin,
            data,
            database,
        } => {
            let data = data.clone().unwrap_or_else(|| PathBuf::from("."));
            // Not a flag: a password on the command line lands in shell
            // histories and process lists.
            if std::io::stdin().is_terminal() {
                eprint!("Password for {name}: ");
            }
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            accounts::create_user(&data, database.as_deref(), name, password, *admin)?;
            eprintln!(
                "created {}{name}",
                if *admin { "the admin " } else { "the member " }
            );
            Ok(())
        }
    }
}
