//! The generation thread. It owns the engine's [`Gpu`] and the loaded model
//! (kept between jobs, loaded again only when the model changes), and runs
//! one job at a time; every engine event becomes a [`Update`] for the
//! window, which it wakes through the event loop. Cancel is a flag the
//! event callback returns, so a run stops at the next step (or decoded frame).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use motif_engine::pipelines::{Event, FrameTextures, ModelCache};
use motif_engine::Gpu;

use crate::{Backend, Controls, Saved};

pub struct Job {
    pub controls: Controls,
    pub output: PathBuf,
    pub cancel: Arc<AtomicBool>,
    /// After this 1-based step's update the worker waits for `resume`
    /// (scripted screenshots and cancels land on an exact step).
    pub pause_after_step: Option<usize>,
    pub resume: Option<Receiver<()>>,
}

pub enum Update {
    /// Prompts encoded, denoising starts.
    Started {
        steps: usize,
        at: Instant,
    },
    Step {
        /// 1-based.
        step: usize,
        total: usize,
        /// The textures the step's previews were written into, on the GPU.
        preview: Option<FrameTextures>,
        at: Instant,
    },
    Decoded {
        frame: usize,
        total: usize,
    },
    /// A status line from the backend (`model loaded: …`).
    Note(String),
    Finished(Saved),
    Cancelled {
        after_step: usize,
    },
    Failed(String),
}

pub struct Worker {
    /// Closed on drop: the thread's loop then ends.
    jobs: Option<Sender<Job>>,
    /// The cancel flags of the jobs handed over that may still run.
    cancels: Vec<Arc<AtomicBool>>,
    thread: Option<JoinHandle<()>>,
}

/// The window has closed: cancel what runs or waits, and wait for the
/// thread, which drops the engine's device on its way out. Returning from
/// main while that thread was still unloading the Vulkan driver crashed the
/// process in the driver's exit handlers (SIGSEGV after `motif view
/// --screenshot` had finished, seen under load).
impl Drop for Worker {
    fn drop(&mut self) {
        for cancel in &self.cancels {
            cancel.store(true, Ordering::SeqCst);
        }
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            // A panic on that thread was already reported there.
            let _ = thread.join();
        }
    }
}

impl Worker {
    /// Starts the thread; `wake` is called after every update is sent.
    pub fn start(
        gpu: Gpu,
        backend: Arc<dyn Backend>,
        updates: Sender<Update>,
        wake: impl Fn() + Send + 'static,
    ) -> Self {
        let (jobs, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("motif-generate".into())
            .spawn(move || {
                let mut models = ModelCache::default();
                for job in rx {
                    let send = |u: Update| {
                        // The window is gone: nothing left to tell.
                        let _ = updates.send(u);
                        wake();
                    };
                    run_job(&gpu, &mut models, backend.as_ref(), job, &send);
                }
            })
            .expect("spawning a thread only fails when the OS is out of threads");
        Worker {
            jobs: Some(jobs),
            cancels: Vec::new(),
            thread: Some(thread),
        }
    }

    pub fn submit(&mut self, job: Job) -> bool {
        // Flags only this list still holds belong to jobs that are over.
        self.cancels.retain(|c| Arc::strong_count(c) > 1);
        self.cancels.push(job.cancel.clone());
        self.jobs
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok())
    }
}

fn run_job(
    gpu: &Gpu,
    models: &mut ModelCache,
    backend: &dyn Backend,
    job: Job,
    send: &dyn Fn(Update),
) {
    let mut last_step = 0;
    let say = |line: &str| send(Update::Note(line.to_string()));
    let result = backend.generate(
        gpu,
        models,
        &job.controls,
        &job.output,
        &say,
        &mut |event| {
            match event {
                Event::Started { steps } => send(Update::Started {
                    steps,
                    at: Instant::now(),
                }),
                Event::Step {
                    index,
                    total,
                    gpu_preview,
                    ..
                } => {
                    last_step = index + 1;
                    send(Update::Step {
                        step: index + 1,
                        total,
                        preview: gpu_preview.cloned(),
                        at: Instant::now(),
                    });
                    if job.pause_after_step == Some(index + 1) {
                        if let Some(resume) = &job.resume {
                            // A closed channel means the window went away: go on.
                            let _ = resume.recv();
                        }
                    }
                }
                Event::Decoded { frame, total } => send(Update::Decoded { frame, total }),
                // Swapping Wan 2.2 A14B's experts: the step events go on.
                Event::Expert { .. } => {}
            }
            !job.cancel.load(Ordering::SeqCst)
        },
    );
    send(match result {
        Ok(Some(saved)) => Update::Finished(saved),
        Ok(None) => Update::Cancelled {
            after_step: last_step,
        },
        Err(e) => Update::Failed(format!("{e:#}")),
    });
}
