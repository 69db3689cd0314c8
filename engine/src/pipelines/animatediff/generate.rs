//! AnimateDiff's step loop: prompts encoded once, the initial noise (or
//! the still, noised to `strength`), then per step the motion UNet on the
//! [uncond, cond] batch, guidance, the scheduler step, camera guidance,
//! the still's anchoring, previews and a step event; finally the VAE
//! decode a chunk of frames at a time.
//!
//! The latents stay on the GPU from the first step to the decode: the
//! model's input batch, guidance, the scheduler's update (with the
//! multistep schedulers' history), camera guidance and the still's anchor
//! run there (`ops::latent`), their per-step coefficients computed on the
//! CPU. What crosses per step is the noise Euler ancestral and LCM draw on
//! the CPU (from the run's generator, so that seeds keep their clips).

use super::context::shuffle_context;
use super::image::Anchor;
use super::{motion_scale, AnimateDiff};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::unet_motion::MotionOptions;
use crate::ops::latent;
use crate::pipelines::camera::{camera_weight, CameraGuide};
use crate::pipelines::decode::decode_in_chunks;
use crate::pipelines::events::{emit, Event, Generated, Trace};
use crate::pipelines::preview::StepPreviews;
use crate::pipelines::{guidance, noise, Request};
use crate::schedulers::{Scheduler, StepProgram};
use crate::tensor::{DType, Tensor};
use crate::text::tokenizer::MAX_LENGTH;

impl AnimateDiff {
    /// One generation of a request already validated (see
    /// `Family::generate`).
    pub(super) fn run(
        &self,
        gpu: &Gpu,
        req: &Request,
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Generated> {
        let (c, f, h, w) = self.latent_shape(req);
        let n = c * f * h * w;
        let mut rng = noise::seeded(req.seed);
        let mut scheduler = Scheduler::new(&self.scheduler_config, req.scheduler, req.karras)?;

        let prompts = guidance::prompt_batch(&req.prompt, &req.negative, req.guidance);
        let (ids, embeds) = self.encode_prompts(gpu, &prompts, req.clip_skip)?;
        let per_prompt = embeds.len() / prompts.len();
        let dim = per_prompt / MAX_LENGTH;
        // Uploaded once, then each prompt's states repeated per frame on
        // the GPU: rows b·F + f.
        let rows = Tensor::from_f32(gpu, &embeds, &[prompts.len(), per_prompt], gpu.precision())?;
        let ehs =
            latent::repeat_rows(gpu, &rows, f)?.reshape(&[prompts.len() * f, MAX_LENGTH, dim])?;
        drop(rows);

        let context = self.context_for(req);
        let motion = MotionOptions {
            residual_scale: motion_scale(req.motion),
            context_windows: context,
        };
        let noise = match &req.latents {
            Some(l) => l.clone(),
            None => {
                let mut noise =
                    noise::initial_noise(&mut rng, (c, f, h, w), req.motion, req.camera);
                if let Some(windows) = context {
                    shuffle_context(&mut noise, &mut rng, (c, f, h * w), windows);
                }
                noise
            }
        };
        let (start, anchor) = match &req.image {
            Some(image) => {
                let start = scheduler.set_timesteps_for_strength(req.steps, req.strength as f64)?;
                let still = self.encode_image(gpu, image, req.width, req.height)?;
                (start, Some(Anchor::new(still, &noise, (c, f, h * w))))
            }
            None => {
                scheduler.set_timesteps(req.steps)?;
                (0, None)
            }
        };
        let timesteps = scheduler.timesteps().to_vec();
        let latents = match &anchor {
            // Every frame starts from the still, noised to the strength.
            Some(anchor) => anchor.start(&scheduler, &noise, timesteps[start], (c, f, h * w))?,
            None => {
                let sigma = scheduler.init_noise_sigma();
                noise.iter().map(|v| v * sigma).collect()
            }
        };
        let mut latents_gpu = Tensor::from_f32(gpu, &latents, &[c, f, h, w], DType::F32)?;
        let anchor = anchor.map(|a| a.upload(gpu, (c, h, w))).transpose()?;
        let camera = match req.camera {
            Some(cam) => CameraGuide::new(gpu, cam, (f, h, w))?,
            None => None,
        };
        let total = timesteps.len() - start;
        emit(events, Event::Started { steps: total })?;
        let mut trace = req.trace.then(|| Trace {
            timesteps: timesteps[start..].to_vec(),
            prompt_ids: ids.clone(),
            prompt_embeds: embeds.clone(),
            ..Default::default()
        });
        let batch = prompts.len();
        let mut previews = StepPreviews::default();
        for (k, &t) in timesteps.iter().enumerate().skip(start) {
            let divisor = scheduler.input_divisor(k)?;
            let x = latent::batch_input(gpu, &latents_gpu, divisor, batch, gpu.precision())?;
            let pred = self.unet.forward(gpu, &x, &[t as f32], &ehs, &motion)?;
            drop(x);
            let step_noise = scheduler.needs_noise(k).then(|| {
                let given = req
                    .step_noise
                    .as_ref()
                    .and_then(|v| v.get(k - start))
                    .map(Vec::as_slice);
                noise::step_noise(given, &mut rng, n)
            });
            let guided = latent::guide(gpu, &pred, req.guidance)?;
            drop(pred);
            let (mut next_latents, x0) = device_step(
                gpu,
                &mut scheduler,
                k,
                &latents_gpu,
                &guided,
                step_noise.as_deref(),
            )?;
            drop(guided);
            let next = timesteps.get(k + 1).copied();
            if let (Some(camera), Some(next)) = (&camera, next) {
                let weight = camera_weight(k - start, total);
                if weight > 0.0 {
                    next_latents =
                        camera.apply(gpu, &scheduler, &next_latents, &x0, next, weight)?;
                }
            }
            if let Some(anchor) = &anchor {
                // The first frame is the still, at the next step's noise level.
                next_latents = anchor.apply(gpu, &scheduler, &next_latents, next)?;
            }
            latents_gpu = next_latents;
            if let Some(tr) = trace.as_mut() {
                tr.step_latents.push(latents_gpu.to_f32(gpu)?);
            }
            let preview =
                previews.update(gpu, &self.latent_rgb, &x0, req.previews, req.gpu_previews)?;
            drop(x0);
            // Nothing comes back to the CPU in a step, so nothing would
            // submit it: submit and wait here, so that the step event means
            // the step has run (progress, cancellation between steps) and
            // the pending commands stay one step's.
            gpu.synchronize()?;
            emit(
                events,
                Event::Step {
                    index: k - start,
                    total,
                    timestep: t,
                    preview: preview.as_ref(),
                    gpu_preview: previews.textures.as_ref(),
                },
            )?;
        }
        let latents = latents_gpu.to_f32(gpu)?;

        let (hh, ww) = (req.height, req.width);
        let decoded = decode_in_chunks(
            gpu,
            &latents_gpu,
            (hh, ww),
            self.decode_chunk(hh, ww),
            req.trace,
            &|z| self.vae.decode_scaled(gpu, z),
            events,
        )?;
        Ok(Generated {
            width: ww,
            height: hh,
            frames: decoded.rgb8,
            frames_f32: decoded.f32,
            latents,
            scheduler: scheduler.kind(),
            trace,
        })
    }
}

/// Scheduler step `k` on the GPU: its program on the latents, the guided
/// prediction and the step's noise (drawn on the CPU from the run's
/// generator, so clips equal the CPU path's), with the multistep
/// schedulers' state kept on the GPU by the scheduler; returns the next
/// latents and the x₀ estimate that previews and camera guidance read.
fn device_step(
    gpu: &Gpu,
    scheduler: &mut Scheduler,
    k: usize,
    latents: &Tensor,
    guided: &Tensor,
    noise: Option<&[f32]>,
) -> Result<(Tensor, Tensor)> {
    let program = scheduler.step_program(k)?;
    let noise = match (program.reads_noise(), noise) {
        (true, Some(noise)) => Some(Tensor::from_f32(gpu, noise, latents.shape(), DType::F32)?),
        (true, None) => {
            return Err(crate::error::EngineError::Argument {
                op: "scheduler",
                message: "the step reads noise, but none was drawn".into(),
            })
        }
        (false, _) => None,
    };
    let guided = guided.reshape(latents.shape())?;
    let mut inputs = vec![latents, &guided];
    inputs.extend(noise.as_ref());
    let mut outputs = scheduler.run_step(gpu, &program, &inputs)?;
    let x0 = outputs.swap_remove(program.preview_output());
    let next = outputs.swap_remove(StepProgram::PREV_SAMPLE);
    Ok((next, x0))
}
