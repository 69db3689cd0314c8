//! Wan's step loop, as diffusers' `WanPipeline.__call__`: the prompt and
//! the negative prompt encoded once (each embedding past its prompt's
//! length zeroed), the initial noise (no `init_noise_sigma`: flow matching
//! starts from pure noise at σ = 1), then per step the transformer on the
//! prompt and — with guidance above 1 — on the negative prompt, guidance,
//! the scheduler step, previews and a step event; finally the VAE decode,
//! one latent frame at a time through its feature cache.
//!
//! Image-to-video (`WanImageToVideoPipeline`) adds, before the loop, the
//! image tokens and the conditioning channels (`image.rs`); each step the
//! transformer reads [latents, condition] and the image tokens.
//!
//! Wan 2.2 A14B changes expert (and guidance scale) at its boundary
//! timestep (`experts.rs`).
//!
//! With a single-step scheduler (flow-matching Euler) the latents stay on
//! the GPU between steps, guidance and the update running there
//! (`ops::latent`); UniPC keeps its history of model outputs on the CPU
//! and takes the prediction there each step, and so does image-to-video, whose
//! conditioning channels are appended to the latents on the CPU.

use super::{ti2v, Wan};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::latent;
use crate::pipelines::decode::Frames;
use crate::pipelines::events::{emit, Event, Generated, Trace};
use crate::pipelines::preview::StepPreviews;
use crate::pipelines::prompt_cache::PromptKey;
use crate::pipelines::{guidance, noise, Request};
use crate::schedulers::{Scheduler, SchedulerOptions, StepProgram};
use crate::tensor::{DType, Tensor};
use crate::text::umt5::prompt_clean;
use std::sync::atomic::Ordering;

impl Wan {
    /// Prompt embeddings [N, L, D] for `prompts` (after the pipeline's
    /// `prompt_clean`), every row past a prompt's own length zeroed as the
    /// Wan pipelines do (the transformer's cross-attention then sees zeros
    /// there, not a mask). Returned on the CPU, prompt by prompt.
    ///
    /// With a prompt cache, prompts encoded before (same encoder,
    /// tokenizer, cleaned prompt, length and precision) are read from disk
    /// and the text encoder does not run; if any prompt is missing, all
    /// of them are encoded together, as without the cache, so that the
    /// embeddings never depend on which were cached.
    pub fn encode_prompts(&self, gpu: &Gpu, prompts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let len = self.max_sequence_length;
        let tokens = self.tokenizer.encode(prompts, len)?;
        let dim = self.text_encoder.config.d_model;
        let mut warn = |w: String| eprintln!("motif: warning: {w}");
        let cached = match (&self.prompt_cache, &self.encoder_identity) {
            (Some(cache), Some(identity)) => {
                let keys: Vec<PromptKey> = prompts
                    .iter()
                    .map(|p| identity.key(&prompt_clean(p), len, gpu.precision()))
                    .collect();
                Some((cache, keys))
            }
            _ => None,
        };
        if let Some((cache, keys)) = &cached {
            let hits: Option<Vec<Vec<f32>>> = keys
                .iter()
                .zip(&tokens.lengths)
                .map(|(key, &keep)| {
                    let mut rows = cache.get(key, dim, &mut warn)?;
                    if rows.len() != keep * dim {
                        warn(format!(
                            "prompt cache: an entry holds {} tokens where the prompt has {keep}; \
                             encoding again",
                            rows.len() / dim.max(1)
                        ));
                        return None;
                    }
                    rows.resize(len * dim, 0.0);
                    Some(rows)
                })
                .collect();
            if let Some(hits) = hits {
                return Ok(hits);
            }
        }
        let ids: Vec<Vec<u32>> = tokens.input_ids.chunks(len).map(<[u32]>::to_vec).collect();
        let mask: Vec<Vec<u32>> = tokens
            .attention_mask
            .chunks(len)
            .map(<[u32]>::to_vec)
            .collect();
        self.text_encoder_runs.fetch_add(1, Ordering::Relaxed);
        let states = self.text_encoder.forward(gpu, &ids, &mask)?.to_f32(gpu)?;
        let embeds: Vec<Vec<f32>> = states
            .chunks(len * dim)
            .zip(&tokens.lengths)
            .map(|(rows, &keep)| {
                let mut rows = rows.to_vec();
                rows[keep * dim..].fill(0.0);
                rows
            })
            .collect();
        if let Some((cache, keys)) = &cached {
            for ((rows, &keep), key) in embeds.iter().zip(&tokens.lengths).zip(keys) {
                // Only the prompt's own rows: the rest are zeros.
                cache.put(key, &rows[..keep * dim], dim, &mut warn);
            }
        }
        Ok(embeds)
    }

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
        let mut scheduler = Scheduler::with_options(
            &self.scheduler_config,
            SchedulerOptions {
                kind: req.scheduler,
                karras: None,
                shift: req.shift.map(f64::from),
            },
        )?;
        let guided = guidance::uses_guidance(req.guidance);
        // diffusers encodes the prompt, then the negative prompt.
        let prompts: Vec<&str> = match guided {
            true => vec![&req.prompt, &req.negative],
            false => vec![&req.prompt],
        };
        let embeds = self.encode_prompts(gpu, &prompts)?;
        let len = self.max_sequence_length;
        let dim = embeds[0].len() / len;
        let upload = |e: &Vec<f32>| Tensor::from_f32(gpu, e, &[1, len, dim], gpu.precision());
        let cond = upload(&embeds[0])?;
        let uncond = embeds.get(1).map(upload).transpose()?;
        // Each phase's free buffers go back to the driver before the next
        // phase, whose sizes differ: the peak is one phase's, not their sum.
        gpu.trim_pool();
        // diffusers encodes the image after the prompts, then the
        // conditioning video after setting the timesteps (no effect on values).
        let image = self.image_conditions(gpu, req)?;
        // Wan 2.2 TI2V given a still: its encoded first latent frame.
        let first_frame = self.first_frame_condition(gpu, req)?;
        let cin = self.transformer.config.in_channels;
        let [_, ph, pw] = self.transformer.config.patch_size;
        let tokens_per_frame = (h / ph) * (w / pw);

        let mut latents = match &req.latents {
            Some(l) => l.clone(),
            None => noise::normal(&mut noise::seeded(req.seed), n),
        };
        scheduler.set_timesteps(req.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        let upload = |v: &[f32]| Tensor::from_f32(gpu, v, &[c, f, h, w], DType::F32);
        let mut latents_gpu =
            (scheduler.has_step_program() && image.is_none() && first_frame.is_none())
                .then(|| upload(&latents))
                .transpose()?;
        emit(events, Event::Started { steps: total })?;
        let mut trace = req.trace.then(|| Trace {
            timesteps: timesteps.clone(),
            // Uncond first, as the reference cases store them.
            prompt_embeds: embeds.iter().rev().flatten().copied().collect(),
            ..Default::default()
        });
        if let (Some(tr), Some(im)) = (trace.as_mut(), &image) {
            if let Some(embeds) = &im.image_embeds {
                tr.image_embeds = embeds.to_f32(gpu)?;
            }
            tr.condition = im.condition.clone();
        }
        if let (Some(tr), Some(cond)) = (trace.as_mut(), &first_frame) {
            tr.condition = cond.clone();
        }
        let boundary = self.transformer.boundary_timestep(&self.scheduler_config)?;
        let mut previews = StepPreviews::default();
        for (k, &t) in timesteps.iter().enumerate() {
            // Wan 2.2 A14B: the expert of this step and its guidance scale.
            let (expert, guidance_scale) = self.transformer.expert_at(t, boundary, req);
            self.transformer.make_resident(gpu, expert, k, events)?;
            let x = match (&latents_gpu, &image) {
                _ if first_frame.is_some() => {
                    let cond = first_frame.as_deref().unwrap_or_default();
                    let input = ti2v::with_first_frame(&latents, cond, c, f);
                    Tensor::from_f32(gpu, &input, &[1, c, f, h, w], gpu.precision())?
                }
                (Some(l), _) => latent::batch_input(gpu, l, 1.0, 1, gpu.precision())?,
                // One batch item: concatenating channels is appending.
                (None, Some(im)) => {
                    let input = [latents.as_slice(), &im.condition].concat();
                    Tensor::from_f32(gpu, &input, &[1, cin, f, h, w], gpu.precision())?
                }
                (None, None) => Tensor::from_f32(gpu, &latents, &[1, c, f, h, w], gpu.precision())?,
            };
            let image_embeds = image.as_ref().and_then(|im| im.image_embeds.as_ref());
            // TI2V image-to-video: timestep 0 on the clean first frame's
            // tokens (text-to-video's tokens all share t: one per item).
            let t = match first_frame {
                Some(_) => ti2v::token_timesteps(t as f32, f, tokens_per_frame),
                None => vec![t as f32],
            };
            let pred = self.transformer.forward(gpu, &x, &t, &cond, image_embeds)?;
            let u = match &uncond {
                Some(uncond) => {
                    Some(
                        self.transformer
                            .forward(gpu, &x, &t, uncond, image_embeds)?,
                    )
                }
                None => None,
            };
            drop(x);
            let program = match latents_gpu.is_some() {
                true => Some(scheduler.step_program(k)?),
                false => None,
            };
            let x0 = match (program, latents_gpu.as_mut()) {
                (Some(program), Some(l)) => {
                    let guided = latent::guide_pair(gpu, u.as_ref(), &pred, guidance_scale)?
                        .reshape(l.shape())?;
                    let mut out = scheduler.run_step(gpu, &program, &[l, &guided])?;
                    let x0 = out.swap_remove(StepProgram::PRED_ORIGINAL);
                    *l = out.swap_remove(StepProgram::PREV_SAMPLE);
                    if let Some(tr) = trace.as_mut() {
                        tr.step_latents.push(l.to_f32(gpu)?);
                    }
                    Some(x0)
                }
                _ => {
                    let mut guided = pred.to_f32(gpu)?;
                    if let Some(u) = &u {
                        guided = guidance::guide(&u.to_f32(gpu)?, &guided, guidance_scale);
                    }
                    let out = scheduler.step(&guided, k, &latents, None)?;
                    latents = out.prev_sample;
                    if let Some(tr) = trace.as_mut() {
                        tr.step_latents.push(latents.clone());
                    }
                    // Uploaded once for both kinds of preview.
                    (req.previews || req.gpu_previews)
                        .then(|| upload(&out.pred_original))
                        .transpose()?
                }
            };
            drop((pred, u));
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
                    index: k,
                    total,
                    timestep: timesteps[k],
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
            // TI2V: the first frame is the still's again for decoding (and
            // in the latents returned, as diffusers' output_type="latent").
            None => {
                if let Some(cond) = &first_frame {
                    latents = ti2v::with_first_frame(&latents, cond, c, f);
                }
                upload(&latents)?
            }
        };
        gpu.trim_pool();
        let frames = self.decode(gpu, &latents_gpu, req, events)?;
        Ok(Generated {
            width: req.width,
            height: req.height,
            frames: frames.rgb8,
            frames_f32: frames.f32,
            latents,
            scheduler: scheduler.kind(),
            trace,
        })
    }

    /// Latents [C, f, h, w] (f32, on the GPU) in the denoiser's domain →
    /// frames, one latent frame at a time (the first gives one frame, each
    /// next four), with a `Decoded` event per frame: RGB8 per frame, and
    /// with `trace` [F, H, W, 3] in [0, 1] (diffusers' `postprocess_video`:
    /// x / 2 + 0.5, clamped).
    fn decode(
        &self,
        gpu: &Gpu,
        latents: &Tensor,
        req: &Request,
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Frames> {
        let mut shape = vec![1];
        shape.extend_from_slice(latents.shape());
        let z = latent::batch_input(gpu, latents, 1.0, 1, gpu.precision())?.reshape(&shape)?;
        let raw = self.vae.denormalize_latents(gpu, &z)?;
        let total = req.frames;
        let mut frames = Frames::new(total, (req.height, req.width), req.trace);
        self.vae.decode_chunks(gpu, &raw, |_, first, chunk| {
            // chunk [Tc, 3, H, W] in [-1, 1].
            frames.push_images(gpu, &chunk, first, total, events)
        })?;
        Ok(frames)
    }
}
