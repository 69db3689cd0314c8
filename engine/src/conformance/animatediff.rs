//! AnimateDiff case sets (SD1.5 folders, single-file checkpoints): the
//! components `tokenizer` (CLIP), `text_encoder` (CLIP), `unet`
//! (UNetMotionModel), `vae` (AutoencoderKL), `scheduler` and `pipeline`.

use std::collections::HashMap;
use std::path::Path;

use super::{
    argument, computed_from, has_input, input_shape, input_tensor, literal, resolve_prompts,
    scheduler_case, upload_input, values, CaseSet, Computed,
};
use crate::error::{EngineError, Result};
use crate::gpu::Gpu;
use crate::models::clip::ClipTextModel;
use crate::models::source::{ModelSource, ModelSpec};
use crate::models::unet_motion::{MotionOptions, UNetMotionModel};
use crate::models::vae::AutoencoderKL;
use crate::pipelines::{AnimateDiff, Family, Request};
use crate::text::ClipTokenizer;
use crate::weights::Weights;

/// The set's model and what its cases have loaded so far.
pub(super) struct Runner {
    /// The model the cases run on: `pipeline_dir` (a diffusers folder, or a
    /// single-file checkpoint with optional `motion_adapter` and `vae` files
    /// named beside it in the manifest).
    source: ModelSource,
    tokenizer: Option<ClipTokenizer>,
    /// Per LoRA a case fuses in (see [`case_lora`]); "" without one.
    text_encoder: HashMap<String, ClipTextModel>,
    vae: Option<AutoencoderKL>,
    unet: HashMap<String, UNetMotionModel>,
    pipeline: Option<AnimateDiff>,
}

impl Runner {
    pub(super) fn new(
        dir: &Path,
        pipeline_dir: &Path,
        manifest: &serde_json::Value,
    ) -> Result<Self> {
        let beside = |key: &str| {
            manifest
                .get(key)
                .and_then(|p| p.as_str())
                .map(|p| dir.join(p).to_string_lossy().into_owned())
        };
        let source = ModelSource::open(&ModelSpec {
            model: pipeline_dir.to_string_lossy().into_owned(),
            motion_adapter: beside("motion_adapter"),
            vae: beside("vae"),
            loras: Vec::new(),
            ..Default::default()
        })?;
        Ok(Runner {
            source,
            tokenizer: None,
            text_encoder: HashMap::new(),
            vae: None,
            unet: HashMap::new(),
            pipeline: None,
        })
    }

    /// The outputs of one case of `component`.
    pub(super) fn compute(
        &mut self,
        gpu: &Gpu,
        set: &CaseSet,
        case: &serde_json::Value,
        component: &str,
    ) -> Result<Computed> {
        match component {
            "tokenizer" => {
                if self.tokenizer.is_none() {
                    self.tokenizer = Some(self.source.tokenizer()?);
                }
                let Some(tok) = self.tokenizer.as_ref() else {
                    unreachable!("loaded above")
                };
                let prompts =
                    resolve_prompts(set, case.get("inputs").and_then(|i| i.get("prompts")))?;
                let ids: Vec<f64> = prompts
                    .iter()
                    .flat_map(|p| tok.encode(p))
                    .map(f64::from)
                    .collect();
                Ok(computed_from([("input_ids", ids)]))
            }
            "text_encoder" => {
                let (lora, source) = case_lora(&self.source, set, case)?;
                if !self.text_encoder.contains_key(&lora) {
                    let part = source.as_ref().unwrap_or(&self.source).text_encoder()?;
                    let weights = Weights::new(part.weights, gpu.precision());
                    let model = ClipTextModel::new(gpu, &weights, part.config)?;
                    self.text_encoder.insert(lora.clone(), model);
                }
                let model = &self.text_encoder[&lora];
                let key = input_tensor(case, "input_ids")?;
                let shape = input_shape(set, key)?;
                let ids = set.tensors.to_i64(key)?;
                if shape.len() != 2 {
                    return Err(EngineError::Shape {
                        op: "text_encoder case",
                        expected: "input_ids [N, L]".into(),
                        found: format!("{shape:?}"),
                    });
                }
                let rows: Vec<Vec<u32>> = ids
                    .chunks(shape[1].max(1))
                    .map(|r| r.iter().map(|&v| v as u32).collect())
                    .collect();
                let out = model.forward(gpu, &rows)?;
                Ok(computed_from([
                    ("last_hidden_state", values(gpu, &out.last_hidden_state)?),
                    ("pooler_output", values(gpu, &out.pooler_output)?),
                    (
                        "clip_skip1_hidden_state",
                        values(gpu, &out.clip_skip1_hidden_state)?,
                    ),
                ]))
            }
            "vae" => {
                if self.vae.is_none() {
                    let part = self.source.vae()?;
                    let weights = Weights::new(part.weights, gpu.precision());
                    self.vae = Some(AutoencoderKL::new(gpu, &weights, part.config)?);
                }
                let Some(vae) = self.vae.as_ref() else {
                    unreachable!("loaded above")
                };
                vae_case(gpu, set, vae, case)
            }
            "unet" => {
                let (lora, source) = case_lora(&self.source, set, case)?;
                if !self.unet.contains_key(&lora) {
                    let part = source.as_ref().unwrap_or(&self.source).unet()?;
                    let weights = Weights::new(part.weights, gpu.precision());
                    let model = UNetMotionModel::new(gpu, &weights, part.config)?;
                    self.unet.insert(lora.clone(), model);
                }
                let unet = &self.unet[&lora];
                let sample = upload_input(gpu, set, case, "sample")?;
                let ehs = upload_input(gpu, set, case, "encoder_hidden_states")?;
                // Timesteps arrive as I64 (DDIM, DPM, LCM) or fractional F32 (Euler).
                let timestep = set.tensors.to_f32(input_tensor(case, "timestep")?)?;
                let out = unet.forward(gpu, &sample, &timestep, &ehs, &MotionOptions::default())?;
                Ok(computed_from([("noise_pred", values(gpu, &out)?)]))
            }
            "scheduler" => scheduler_case(set, case),
            "pipeline" => {
                if self.pipeline.is_none() {
                    self.pipeline = Some(AnimateDiff::load(gpu, &self.source)?);
                }
                let Some(pipe) = self.pipeline.as_mut() else {
                    unreachable!("loaded above")
                };
                pipeline_case(gpu, set, pipe, case)
            }
            other => Err(argument(format!(
                "component `{other}` is not an AnimateDiff component"
            ))),
        }
    }
}

/// The model source for a case: the set's, or with the LoRA file the case
/// names in its literal inputs `lora` (beside cases.json) and `lora_weight`
/// (diffusers' `fuse_lora(lora_scale=…)`, default 1). Also the cache key of
/// the models loaded with it.
fn case_lora(
    base: &ModelSource,
    set: &CaseSet,
    case: &serde_json::Value,
) -> Result<(String, Option<ModelSource>)> {
    let Some(file) = case.get("inputs").and_then(|i| i.get("lora")) else {
        return Ok((String::new(), None));
    };
    let file = file
        .as_str()
        .ok_or_else(|| argument("input `lora` is not a file name"))?;
    let weight = match case.get("inputs").and_then(|i| i.get("lora_weight")) {
        Some(w) => w
            .as_f64()
            .ok_or_else(|| argument("input `lora_weight` is not a number"))?,
        None => 1.0,
    };
    let path = set.dir.join(file).to_string_lossy().into_owned();
    let source = base.with_loras(&[(path, weight as f32)])?;
    Ok((format!("{file}:{weight}"), Some(source)))
}

/// A `vae` case: decode from `latents` (scaled; tiled where the case gives
/// tile sizes) or encode from `image`.
fn vae_case(
    gpu: &Gpu,
    set: &CaseSet,
    vae: &AutoencoderKL,
    case: &serde_json::Value,
) -> Result<Computed> {
    let size = |name: &str| {
        case.get("inputs")
            .and_then(|i| i.get(name))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
    };
    if let (true, Some(sample_tile), Some(latent_tile)) = (
        has_input(case, "latents"),
        size("tile_sample_min_size"),
        size("tile_latent_min_size"),
    ) {
        // diffusers' enable_tiling() with the case's tile sizes.
        let latents = upload_input(gpu, set, case, "latents")?;
        let unscaled = crate::ops::scale(gpu, &latents, 1.0 / vae.config.scaling_factor)?;
        let tiling = crate::models::vae::Tiling {
            sample_tile,
            latent_tile,
            overlap: 0.25,
        };
        let image = vae.decode_tiled(gpu, &unscaled, &tiling)?;
        Ok(computed_from([(
            "sample",
            image.data.iter().map(|&v| v as f64).collect(),
        )]))
    } else if has_input(case, "latents") {
        let latents = upload_input(gpu, set, case, "latents")?;
        let sample = vae.decode_scaled(gpu, &latents)?;
        Ok(computed_from([("sample", values(gpu, &sample)?)]))
    } else if has_input(case, "image") {
        let image = upload_input(gpu, set, case, "image")?;
        let post = vae.encode(gpu, &image)?;
        Ok(computed_from([
            ("mean", values(gpu, &post.mean)?),
            ("logvar", values(gpu, &post.logvar)?),
        ]))
    } else {
        Err(argument("a vae case needs input `latents` or `image`"))
    }
}

fn pipeline_case(
    gpu: &Gpu,
    set: &CaseSet,
    pipe: &mut AnimateDiff,
    case: &serde_json::Value,
) -> Result<Computed> {
    let text = |name: &str| -> Result<String> {
        literal(case, name)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| argument(format!("input `{name}` is not a string")))
    };
    let number = |name: &str| -> Result<f64> {
        literal(case, name)?
            .as_f64()
            .ok_or_else(|| argument(format!("input `{name}` is not a number")))
    };
    let config =
        crate::schedulers::SchedulerConfig::load(&set.dir.join(text("scheduler_config")?))?;
    pipe.set_scheduler_config(config);
    let mut req = Request::new(text("prompt")?, pipe.defaults());
    req.negative = text("negative_prompt")?;
    req.frames = number("frames")? as usize;
    req.height = number("height")? as usize;
    req.width = number("width")? as usize;
    req.steps = number("steps")? as usize;
    req.guidance = number("guidance")? as f32;
    req.latents = Some(set.tensors.to_f32(input_tensor(case, "latents")?)?);
    if has_input(case, "noise") {
        let noise = set.tensors.to_f32(input_tensor(case, "noise")?)?;
        let per = noise.len() / req.steps.max(1);
        req.step_noise = Some(noise.chunks(per.max(1)).map(<[f32]>::to_vec).collect());
    }
    if has_input(case, "context_length") {
        req.context = Some((
            number("context_length")? as usize,
            number("context_stride")? as usize,
        ));
    }
    req.trace = true;
    let out = pipe.generate(gpu, &req, &mut |_| true)?;
    let trace = out.trace.unwrap_or_default();
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    Ok(computed_from([
        ("timesteps", trace.timesteps.clone()),
        (
            "prompt_ids",
            trace
                .prompt_ids
                .iter()
                .flatten()
                .map(|&i| i as f64)
                .collect(),
        ),
        ("prompt_embeds", f64s(&trace.prompt_embeds)),
        ("step_latents", f64s(&trace.step_latents.concat())),
        ("latents", f64s(&out.latents)),
        (
            "frames",
            f64s(out.frames_f32.as_deref().unwrap_or_default()),
        ),
    ]))
}
