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
use motif_engine::pipeline::Event;
use motif_engine::Gpu;
use motif_server::accounts;
use motif_server::{
    ApiLimits, FieldError, JobRequest, Names, Preview, Progress, QueueOptions, RunJob, RunOutput,
    Runner, ServeOptions, StoreOptions, WebOptions, WorkerOptions,
};

use crate::catalog;
use crate::generate::{self, GenerateArgs};

#[derive(Args, Debug, Clone)]
pub struct QueueArgs {
    /// Seconds a worker's claim on a job lasts without a heartbeat; a job whose worker died goes back to the queue after it.
    #[arg(long, env = "MOTIF_LEASE_SECONDS", default_value_t = 30.0)]
    lease_seconds: f64,
    /// Claims per job (a worker that dies or a run that fails uses one) before the job is failed with its error.
    #[arg(long, default_value_t = 3)]
    max_attempts: i64,
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
        Ok(QueueOptions {
            lease: Duration::from_secs_f64(self.lease_seconds),
            max_attempts: self.max_attempts,
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
    /// Queued plus running jobs one token may have.
    #[arg(long, default_value_t = 10)]
    max_active_per_token: i64,
    /// Jobs one token may submit per minute.
    #[arg(long, default_value_t = 30)]
    submissions_per_minute: i64,
    /// How long a gallery login lasts, in seconds (default 14 days).
    #[arg(long, env = "MOTIF_SESSION_SECONDS", default_value_t = 14 * 24 * 3600)]
    session_seconds: u64,
    /// Failed gallery logins to one account allowed per 15 minutes; more get 429.
    #[arg(long, default_value_t = 5)]
    login_failures: usize,
    /// Clips on one gallery page.
    #[arg(long, default_value_t = 24)]
    page_size: usize,
    #[command(flatten)]
    queue: QueueArgs,
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

/// Runs jobs with `motif generate`'s code; keeps opened GPUs for the next job.
struct EngineRunner {
    open_gpu: GpuOpener,
    idle_gpus: Mutex<Vec<Gpu>>,
}

/// The generate flags of a job.
fn generate_args(request: &JobRequest) -> GenerateArgs {
    GenerateArgs {
        prompt: Some(request.prompt.clone()),
        negative: request.negative.clone(),
        model: request.model.clone(),
        strength: request.strength,
        width: request.width.map(|v| v as usize),
        height: request.height.map(|v| v as usize),
        aspect: request.aspect.clone(),
        frames: request.frames.map(|v| v as usize),
        fps: request.fps,
        steps: request.steps.map(|v| v as usize),
        guidance: request.guidance,
        seed: request.seed,
        scheduler: request.scheduler.clone(),
        karras: request.karras.unwrap_or(false),
        motion: request.motion,
        camera: request.camera.clone(),
        style: request.style.clone(),
        quiet: true,
        ..Default::default()
    }
}

/// The request field an error of `generate::prepare` is about: its messages
/// start with the flag they concern.
fn field_of(message: &str) -> &'static str {
    const FIELDS: [(&str, &str); 14] = [
        ("--width", "width"),
        ("--height", "height"),
        ("--aspect", "aspect"),
        ("--frames", "frames"),
        ("--steps", "steps"),
        ("--fps", "fps"),
        ("--guidance", "guidance"),
        ("--motion", "motion"),
        ("--strength", "strength"),
        ("--scheduler", "scheduler"),
        ("--camera", "camera"),
        ("unknown style", "style"),
        ("--model", "model"),
        ("opening the model", "model"),
    ];
    FIELDS
        .iter()
        .find(|(prefix, _)| message.starts_with(prefix))
        .map(|(_, field)| *field)
        .unwrap_or("request")
}

impl Runner for EngineRunner {
    fn check(&self, request: &JobRequest) -> Result<(), FieldError> {
        let mut args = generate_args(request);
        args.output = Some(PathBuf::from("check.mp4"));
        match generate::prepare(&args) {
            Ok(_) => Ok(()),
            Err(e) => {
                let message = format!("{e:#}");
                Err(FieldError::new(field_of(&message), message))
            }
        }
    }

    fn names(&self) -> Names {
        Names {
            // The built-in presets always parse; a broken styles.json fails its own tests.
            styles: catalog::styles()
                .map(|all| all.into_iter().map(|s| s.name).collect())
                .unwrap_or_default(),
            models: catalog::list_models().into_iter().map(|m| m.name).collect(),
        }
    }

    fn run(
        &self,
        job: &RunJob,
        progress: &mut dyn FnMut(Progress) -> bool,
    ) -> Result<Option<RunOutput>> {
        let mut args = generate_args(&job.request);
        args.image = job.image.clone();
        args.output = Some(job.output.clone());
        let prepared = generate::prepare(&args)?;
        let reused = self.idle_gpus.lock().ok().and_then(|mut g| g.pop());
        let gpu = match reused {
            Some(g) => g,
            None => (self.open_gpu)()?,
        };
        let result = generate::generate_on(
            &gpu,
            prepared,
            &|_| {},
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
            },
        );
        if let Ok(mut idle) = self.idle_gpus.lock() {
            idle.push(gpu);
        }
        Ok(result?.map(|f| RunOutput {
            clip: f.output,
            recipe: f.recipe,
        }))
    }
}

fn runner(open_gpu: GpuOpener) -> Arc<dyn Runner> {
    Arc::new(EngineRunner {
        open_gpu,
        idle_gpus: Mutex::new(Vec::new()),
    })
}

pub fn serve(open_gpu: GpuOpener, args: &ServeArgs) -> Result<()> {
    if args.max_active_per_token < 1 || args.submissions_per_minute < 1 {
        bail!("--max-active-per-token and --submissions-per-minute must be at least 1");
    }
    if args.session_seconds < 1 || args.login_failures < 1 || !(1..=500).contains(&args.page_size) {
        bail!("--session-seconds and --login-failures must be at least 1, --page-size 1 to 500");
    }
    let options = ServeOptions {
        listen: args.listen,
        data: args.data.clone(),
        database: args.database.clone(),
        store: args.store.options(),
        workers: args.workers,
        queue: args.queue.options()?,
        limits: ApiLimits {
            max_active_per_token: args.max_active_per_token,
            submissions_per_minute: args.submissions_per_minute,
            ..Default::default()
        },
        web: WebOptions {
            session: Duration::from_secs(args.session_seconds),
            login_failures: args.login_failures,
            page_size: args.page_size,
            ..Default::default()
        },
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
