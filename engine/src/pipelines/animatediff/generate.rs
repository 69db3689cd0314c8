//! AnimateDiff's step loop: prompts encoded once, the initial noise (or
//! the still, noised to `strength`), then per step the motion UNet on the
//! [uncond, cond] batch, guidance, the scheduler step, camera guidance,
//! the still's anchoring, previews and a step event; finally the VAE
//! decode a chunk of frames at a time.
//!
//! The latents stay on the GPU from the first step to the decode: the
//! model's input batch, guidance and the scheduler's update run there
//! (`ops::latent`), the scheduler's per-step coefficients computed on the
//! CPU. The steps that need the latents on the CPU — the multistep
//! schedulers' history, camera guidance and the still's anchor — take
//! them there and back each step (`HostStep`).

use super::context::shuffle_context;
use super::image::Anchor;
use super::{motion_scale, AnimateDiff};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::unet_motion::MotionOptions;
use crate::ops::latent;
use crate::pipelines::camera::{camera_guide, camera_weight};
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
        let mut latents = match &anchor {
            // Every frame starts from the still, noised to the strength.
            Some(anchor) => anchor.start(&scheduler, &noise, timesteps[start], (c, f, h * w))?,
            None => {
                let sigma = scheduler.init_noise_sigma();
                noise.iter().map(|v| v * sigma).collect()
            }
        };
        // The multistep schedulers, camera guidance and the anchor work on
        // the CPU's copy of the latents.
        let on_device = scheduler.has_step_program() && req.camera.is_none() && anchor.is_none();
        let upload = |v: &[f32]| Tensor::from_f32(gpu, v, &[c, f, h, w], DType::F32);
        let mut latents_gpu = on_device.then(|| upload(&latents)).transpose()?;
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
            let x = match &latents_gpu {
                Some(l) => latent::batch_input(gpu, l, divisor, batch, gpu.precision())?,
                None => {
                    let model_in = scheduler.scale_model_input(&latents, k)?;
                    let mut x = Vec::with_capacity(n * batch);
                    for _ in 0..batch {
                        x.extend_from_slice(&model_in);
                    }
                    Tensor::from_f32(gpu, &x, &[batch, c, f, h, w], gpu.precision())?
                }
            };
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
            let program = match on_device {
                true => scheduler.step_program(k)?,
                false => None,
            };
            let x0 = match (program, latents_gpu.as_mut()) {
                (Some(program), Some(latents_gpu)) => {
                    let guided = latent::guide(gpu, &pred, req.guidance)?;
                    let (next, x0) =
                        device_step(gpu, &program, latents_gpu, &guided, step_noise.as_deref())?;
                    *latents_gpu = next;
                    if let Some(tr) = trace.as_mut() {
                        tr.step_latents.push(latents_gpu.to_f32(gpu)?);
                    }
                    Some(x0)
                }
                _ => {
                    let guided = guidance::combine(pred.to_f32(gpu)?, req.guidance);
                    let out = scheduler.step(&guided, k, &latents, step_noise.as_deref())?;
                    latents = out.prev_sample;
                    let x0 = out.denoised.as_ref().unwrap_or(&out.pred_original);
                    let next = timesteps.get(k + 1).copied();
                    if let (Some(cam), Some(next)) = (req.camera, next) {
                        let weight = camera_weight(k - start, total);
                        if weight > 0.0 {
                            latents = camera_guide(
                                &scheduler, cam, &latents, x0, next, weight, c, f, h, w,
                            )?;
                        }
                    }
                    if let Some(anchor) = &anchor {
                        // The first frame is the still, at the next step's noise level.
                        anchor.apply(&scheduler, &mut latents, next, (c, f, h * w))?;
                    }
                    if let Some(tr) = trace.as_mut() {
                        tr.step_latents.push(latents.clone());
                    }
                    // Uploaded once for both kinds of preview.
                    (req.previews || req.gpu_previews)
                        .then(|| upload(x0))
                        .transpose()?
                }
            };
            drop(pred);
            let preview = match x0 {
                Some(x0) => {
                    previews.update(gpu, &self.latent_rgb, &x0, req.previews, req.gpu_previews)?
                }
                None => None,
            };
            // Nothing comes back to the CPU in a step on the GPU, so nothing
            // would submit it: submit and wait here, so that the step event
            // means the step has run (progress, cancellation between steps)
            // and the pending commands stay one step's.
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
        let latents_gpu = match latents_gpu {
            Some(l) => {
                latents = l.to_f32(gpu)?;
                l
            }
            None => upload(&latents)?,
        };

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

/// One scheduler step on the GPU: `program` on the latents, the guided
/// prediction and the step's noise (drawn on the CPU from the run's
/// generator, so clips equal the CPU path's); returns the next latents and
/// the x₀ estimate the previews show.
fn device_step(
    gpu: &Gpu,
    program: &StepProgram,
    latents: &Tensor,
    guided: &Tensor,
    noise: Option<&[f32]>,
) -> Result<(Tensor, Tensor)> {
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
    let mut outputs = latent::run_program(gpu, &program.program, &inputs)?;
    let x0 = outputs.swap_remove(program.preview_output());
    let next = outputs.swap_remove(StepProgram::PREV_SAMPLE);
    Ok((next, x0))
}
