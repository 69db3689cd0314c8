//! The worker loop: claim the oldest queued job, run it on a blocking thread
//! while renewing the lease and recording progress, then record the outcome
//! only if the lease is still ours, so that a job re-queued behind a worker's
//! back is never finished twice. The clip and recipe reach the clip store
//! whole before the job is marked finished, so a finished job never points
//! at a missing object.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use tokio::sync::watch;

use crate::db::{Db, JobRow, Lease};
use crate::{
    JobRequest, Preview, Progress, QueueOptions, RunError, RunJob, RunOutput, Runner, Store,
};

/// Tells workers and event streams to stop.
#[derive(Clone)]
pub struct Shutdown {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            sender: Arc::new(watch::channel(false).0),
        }
    }

    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    pub fn is_set(&self) -> bool {
        *self.sender.borrow()
    }

    /// Sleeps for `d`, or less if shutdown is triggered meanwhile.
    pub async fn sleep(&self, d: Duration) {
        let mut rx = self.sender.subscribe();
        if *rx.borrow() {
            return;
        }
        let _ = tokio::time::timeout(d, rx.changed()).await;
    }
}

/// A name that tells which machine and process holds a lease.
pub fn worker_name(index: usize) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".to_string());
    format!(
        "{host}-{}-{index}-{}",
        std::process::id(),
        crate::random_hex(3)
    )
}

pub async fn run(
    db: Db,
    runner: Arc<dyn Runner>,
    store: Arc<Store>,
    queue: QueueOptions,
    name: String,
    shutdown: Shutdown,
) {
    while !shutdown.is_set() {
        let claimed = async {
            db.reclaim_expired(queue.max_attempts).await?;
            db.claim(&name, queue.lease.as_millis() as i64).await
        }
        .await;
        match claimed {
            Ok(Some(job)) => {
                let id = job.id.clone();
                // One line at the claim and one at the end, each with the job
                // id, so that an operator can follow a job across machines.
                eprintln!(
                    "worker {name}: job {id}: claimed, attempt {} of {}",
                    job.attempts, queue.max_attempts
                );
                let started = Instant::now();
                let attempt = job.attempts;
                let outcome = execute(&db, &runner, &store, &queue, &name, &shutdown, job).await;
                let seconds = started.elapsed().as_secs_f64();
                match outcome {
                    Ok(end) => eprintln!(
                        "worker {name}: job {id}: {end} after {seconds:.1} s (attempt {attempt})"
                    ),
                    // The lease lapses and the job goes back to the queue.
                    Err(e) => eprintln!(
                        "worker {name}: job {id}: could not record its outcome after {seconds:.1} s \
                         (attempt {attempt}; the lease will lapse): {e:#}"
                    ),
                }
            }
            Ok(None) => shutdown.sleep(queue.poll).await,
            Err(e) => {
                eprintln!("worker {name}: database: {e:#}");
                shutdown.sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Latest progress, shared between the generating thread and the heartbeat.
#[derive(Default)]
struct Live {
    step: i64,
    total: i64,
    preview: Option<String>,
    version: u64,
}

/// A failed attempt recorded: re-queued or failed, as the logs say it.
fn failed_as(state: Option<String>, error: &str) -> String {
    match state.as_deref() {
        Some(crate::db::QUEUED) => format!("failed, re-queued: {error}"),
        Some(_) => format!("failed: {error}"),
        None => format!("failed after its lease was lost: {error}"),
    }
}

/// Runs one claimed job to its end; returns how it ended, for the log.
async fn execute(
    db: &Db,
    runner: &Arc<dyn Runner>,
    store: &Store,
    queue: &QueueOptions,
    name: &str,
    shutdown: &Shutdown,
    job: JobRow,
) -> Result<String> {
    let request: JobRequest = match serde_json::from_str(&job.request) {
        Ok(r) => r,
        Err(e) => {
            // Only a schema change could cause this; retrying will not help.
            let error = format!("unreadable job: {e}");
            let state = db.fail(&job.id, name, &error, 0).await?;
            return Ok(failed_as(state, &error));
        }
    };
    let stills = match write_stills(db, store, &job).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("worker {name}: job {}: {:#}", job.id, e.detail);
            let attempts = if e.permanent { 0 } else { queue.max_attempts };
            let state = db.fail(&job.id, name, &e.message, attempts).await?;
            return Ok(failed_as(state, &e.message));
        }
    };
    // Named by attempt: a worker that lost its lease and a later claim of the
    // same job never write the same object.
    let output = store
        .tmp
        .join(format!("{}-{}.{}", job.id, job.attempts, job.format));
    let run_job = RunJob {
        id: job.id.clone(),
        request,
        image: stills.0.clone(),
        last_image: stills.1.clone(),
        output,
    };

    let live = Arc::new(Mutex::new(Live::default()));
    let cancel = Arc::new(AtomicBool::new(false));
    let mut handle = {
        let (runner, live, cancel) = (runner.clone(), live.clone(), cancel.clone());
        tokio::task::spawn_blocking(move || {
            runner.run(&run_job, &mut |p: Progress| {
                let preview = p.preview.as_ref().and_then(preview_data_url);
                if let Ok(mut l) = live.lock() {
                    l.step = p.step as i64;
                    l.total = p.total as i64;
                    if preview.is_some() {
                        l.preview = preview;
                    }
                    l.version += 1;
                }
                !cancel.load(Ordering::SeqCst)
            })
        })
    };

    let lease_ms = queue.lease.as_millis() as i64;
    // Renew well within the lease, and at least every second so that a cancel
    // asked for between two steps is seen soon.
    let beat_every = (queue.lease / 3).min(Duration::from_secs(1));
    let mut tick = tokio::time::interval(Duration::from_millis(200).min(beat_every));
    let mut last_beat = Instant::now();
    let mut sent_version = 0;
    let (mut user_cancelled, mut lease_lost, mut stopping) = (false, false, false);
    let result = loop {
        tokio::select! {
            r = &mut handle => break r,
            _ = tick.tick() => {
                let (version, step, total, preview) = match live.lock() {
                    Ok(mut l) => (l.version, l.step, l.total, l.preview.take()),
                    Err(_) => (sent_version, 0, 0, None),
                };
                if version != sent_version || last_beat.elapsed() >= beat_every {
                    match db.heartbeat(&job.id, name, lease_ms, step, total, preview.as_deref()).await {
                        Ok(Lease::Held { cancel_requested }) => {
                            sent_version = version;
                            last_beat = Instant::now();
                            if cancel_requested {
                                user_cancelled = true;
                                cancel.store(true, Ordering::SeqCst);
                            }
                        }
                        Ok(Lease::Lost) => {
                            lease_lost = true;
                            cancel.store(true, Ordering::SeqCst);
                        }
                        // The next tick tries again; if the database stays away the
                        // lease lapses and another worker takes the job.
                        Err(e) => eprintln!("worker {name}: heartbeat of {}: {e:#}", job.id),
                    }
                }
                if shutdown.is_set() && !stopping {
                    stopping = true;
                    cancel.store(true, Ordering::SeqCst);
                }
            }
        }
    };
    for p in [&stills.0, &stills.1].into_iter().flatten() {
        let _ = tokio::fs::remove_file(p).await;
    }

    match result {
        Ok(Ok(Some(out))) => {
            // The run can end between two ticks: its last steps and preview
            // reach the database before the job is marked finished, so the
            // finished job shows the clip's final preview.
            let pending = match live.lock() {
                Ok(mut l) => {
                    (l.version != sent_version).then(|| (l.step, l.total, l.preview.take()))
                }
                Err(_) => None,
            };
            if let Some((step, total, preview)) = pending {
                if let Err(e) = db
                    .heartbeat(&job.id, name, lease_ms, step, total, preview.as_deref())
                    .await
                {
                    eprintln!("worker {name}: last progress of {}: {e:#}", job.id);
                }
            }
            let stored = store_output(store, &out).await;
            let _ = tokio::fs::remove_file(&out.clip).await;
            let _ = tokio::fs::remove_file(&out.recipe).await;
            let (clip, recipe) = match stored {
                Ok(names) => names,
                // The store is unreachable or refuses: the attempt failed; another may
                // succeed. Its location is the operator's business, not the client's.
                Err(e) => {
                    eprintln!("worker {name}: job {}: {e:#}", job.id);
                    let error = "the clip could not be stored";
                    let state = db.fail(&job.id, name, error, queue.max_attempts).await?;
                    return Ok(failed_as(state, error));
                }
            };
            let recorded = db.finish(&job.id, name, &clip, &recipe).await;
            // Someone else owns the job now: our objects must not linger. (After
            // a database error the update may have committed: keep them.)
            if let Ok(false) = recorded {
                let _ = store.delete(&clip).await;
                let _ = store.delete(&recipe).await;
            }
            Ok(match recorded? {
                true => "finished".to_string(),
                false => "finished, but its lease was lost: the clip was dropped".to_string(),
            })
        }
        Ok(Ok(None)) => {
            if user_cancelled {
                db.mark_cancelled(&job.id, name).await?;
                Ok("cancelled".to_string())
            } else if stopping && !lease_lost {
                db.release(&job.id, name).await?;
                Ok("put back in the queue (the worker is stopping)".to_string())
            } else {
                Ok("stopped: its lease was lost".to_string())
            }
        }
        Ok(Err(e)) => {
            eprintln!("worker {name}: job {}: {:#}", job.id, e.detail);
            if lease_lost {
                return Ok(format!("failed after its lease was lost: {}", e.message));
            }
            // An input that can never succeed fails now instead of after every attempt.
            let attempts = if e.permanent { 0 } else { queue.max_attempts };
            let state = db.fail(&job.id, name, &e.message, attempts).await?;
            Ok(failed_as(state, &e.message))
        }
        Err(join) => {
            eprintln!("worker {name}: job {}: {join}", job.id);
            let error = "the generation stopped unexpectedly";
            let state = db.fail(&job.id, name, error, queue.max_attempts).await?;
            Ok(failed_as(state, error))
        }
    }
}

/// Moves a run's clip and recipe to the clip store; returns their names there.
async fn store_output(store: &Store, out: &RunOutput) -> Result<(String, String)> {
    let clip = file_name(&out.clip)?;
    let recipe = file_name(&out.recipe)?;
    store.put_file(&recipe, &out.recipe).await?;
    if let Err(e) = store.put_file(&clip, &out.clip).await {
        let _ = store.delete(&recipe).await;
        return Err(e);
    }
    Ok((clip, recipe))
}

fn file_name(p: &Path) -> Result<String> {
    p.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .with_context(|| format!("{}: no file name", p.display()))
}

/// Writes the job's uploaded stills (first, last) to the store's temporary folder.
async fn write_stills(
    db: &Db,
    store: &Store,
    job: &JobRow,
) -> Result<(Option<PathBuf>, Option<PathBuf>), RunError> {
    let image = db
        .job_image(&job.id)
        .await
        .map_err(|e| RunError::transient("the uploaded image could not be read back", e))?;
    let image = write_still(store, job, image, "image", "").await?;
    let last = db
        .job_last_image(&job.id)
        .await
        .map_err(|e| RunError::transient("the uploaded last image could not be read back", e))?;
    let last = write_still(store, job, last, "last image", "-last").await?;
    Ok((image, last))
}

/// Writes one still (`what` names it in messages) as `JOB-ATTEMPT{suffix}.EXT`.
async fn write_still(
    store: &Store,
    job: &JobRow,
    stored: Option<String>,
    what: &str,
    suffix: &str,
) -> Result<Option<PathBuf>, RunError> {
    let Some(b64) = stored else {
        return Ok(None);
    };
    let body = match b64.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => b64.as_str(),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| {
            RunError::permanent(
                format!("the uploaded {what} is not valid base64: {e}"),
                e.into(),
            )
        })?;
    // The runner reads the still by its extension.
    let extension = match image::guess_format(&bytes) {
        Ok(image::ImageFormat::Jpeg) => "jpg",
        Ok(image::ImageFormat::WebP) => "webp",
        _ => "png",
    };
    let path = store
        .tmp
        .join(format!("{}-{}{suffix}.{extension}", job.id, job.attempts));
    tokio::fs::write(&path, bytes)
        .await
        .with_context(|| format!("writing {}", path.display()))
        .map_err(|e| {
            RunError::transient(
                format!("the uploaded {what} could not be staged for the run"),
                e,
            )
        })?;
    Ok(Some(path))
}

/// The preview frames as one PNG grid (as square as the frame count allows),
/// as a `data:` URL.
fn preview_data_url(p: &Preview) -> Option<String> {
    let n = p.frames.len();
    if n == 0 || p.width == 0 || p.height == 0 {
        return None;
    }
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let (gw, gh) = (cols * p.width, rows * p.height);
    let mut grid = vec![0u8; gw * gh * 3];
    for (i, frame) in p.frames.iter().enumerate() {
        if frame.len() != p.width * p.height * 3 {
            return None;
        }
        let (cx, cy) = ((i % cols) * p.width, (i / cols) * p.height);
        for y in 0..p.height {
            let src = &frame[y * p.width * 3..(y + 1) * p.width * 3];
            let start = ((cy + y) * gw + cx) * 3;
            grid[start..start + p.width * 3].copy_from_slice(src);
        }
    }
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, gw as u32, gh as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().ok()?;
        writer.write_image_data(&grid).ok()?;
    }
    Some(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png_bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::NewJob;
    use crate::quota::JobQuota;
    use crate::request::{FieldError, Names};
    use crate::{ClipSize, ImageMode, StoreOptions};

    /// Reports its one step, with a preview, after the heartbeat's first
    /// tick and returns at once: the run ends between two ticks.
    struct QuickRunner;

    impl Runner for QuickRunner {
        fn check(&self, _: &JobRequest) -> Result<ClipSize, FieldError> {
            Ok(ClipSize {
                width: 8,
                height: 8,
                frames: 1,
            })
        }
        fn names(&self) -> Names {
            Names {
                styles: vec![],
                models: vec![],
            }
        }
        fn image_mode(&self, _: Option<&str>) -> Option<ImageMode> {
            None
        }
        fn run(
            &self,
            job: &RunJob,
            progress: &mut dyn FnMut(Progress) -> bool,
        ) -> Result<Option<RunOutput>, RunError> {
            std::thread::sleep(Duration::from_millis(50));
            let preview = Preview {
                width: 2,
                height: 2,
                frames: vec![vec![200; 12]],
            };
            progress(Progress {
                step: 1,
                total: 1,
                preview: Some(preview),
            });
            let recipe = job.output.with_extension("json");
            std::fs::write(&job.output, b"clip").expect("the scratch folder");
            std::fs::write(&recipe, b"{}").expect("the scratch folder");
            Ok(Some(RunOutput {
                clip: job.output.clone(),
                recipe,
            }))
        }
    }

    #[test]
    fn a_run_that_ends_between_heartbeats_records_its_last_step_and_preview() -> Result<()> {
        let data = std::env::temp_dir().join(format!("motif-worker-{}", crate::random_hex(8)));
        std::fs::create_dir_all(&data)?;
        let url = format!("sqlite://{}?mode=rwc", data.join("motif.db").display());
        let result = crate::runtime()?.block_on(async {
            let db = Db::connect(&url).await?;
            db.insert_token("t", "hash", false).await?;
            let request = serde_json::to_string(&JobRequest::new("a red ball"))?;
            let job = NewJob {
                id: "job1",
                token_id: "t",
                request: &request,
                image: None,
                last_image: None,
                format: "mp4",
            };
            let quota = JobQuota {
                max_active: 1,
                per_minute: 1,
            };
            db.insert_job_within_quota(&job, quota).await?;
            let store = Store::open(&data, &StoreOptions::default())?;
            let queue = QueueOptions::default();
            let claimed = db
                .claim("w", queue.lease.as_millis() as i64)
                .await?
                .context("claim")?;
            let runner: Arc<dyn Runner> = Arc::new(QuickRunner);
            let end = execute(&db, &runner, &store, &queue, "w", &Shutdown::new(), claimed).await?;
            assert_eq!(end, "finished");
            let row = db.job("job1").await?.context("the job")?;
            assert_eq!((row.step, row.total), (1, 1));
            let preview = row.preview.unwrap_or_default();
            assert!(preview.starts_with("data:image/png;base64,"), "{preview:?}");
            Ok::<(), anyhow::Error>(())
        });
        let _ = std::fs::remove_dir_all(&data);
        result
    }
}
