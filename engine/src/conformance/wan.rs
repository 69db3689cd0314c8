//! Wan case sets (docs/CASES.md, "Wan"): the components `tokenizer`
//! (UMT5's, ids and mask), `text_encoder` (UMT5EncoderModel), `transformer`
//! (WanTransformer3DModel, `transformer` or `transformer_2`), `vae`
//! (AutoencoderKLWan: decode from `latents`, encode from `video`),
//! `scheduler` (UniPC / FlowMatchEuler, by the case's config),
//! `image_processor` (CLIPImageProcessor, PIL backend), `image_encoder`
//! (CLIPVisionModel's `hidden_states[-2]`) and `pipeline` (the Wan family
//! end to end, text- or image-to-video: see [`pipeline_case`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    argument, computed_from, has_input, input_shape, input_tensor, literal, resolve_prompts,
    scheduler_case, upload_input, values, CaseSet, Computed,
};
use crate::error::{EngineError, Result};
use crate::gpu::Gpu;
use crate::models::clip_vision::ClipVisionModel;
use crate::models::source::{ModelSource, ModelSpec};
use crate::models::umt5::{relative_position_buckets, BlockResidency, UMT5EncoderModel};
use crate::models::wan_files::WanFiles;
use crate::models::wan_transformer::{
    rope_tables, WanTransformer3DModel, WanTransformerConfig, ROPE_THETA,
};
use crate::models::wan_vae::AutoencoderKLWan;
use crate::pipelines::image::{ClipImageProcessor, RgbImage};
use crate::pipelines::{Family, ModelDefaults, Request, Wan};
use crate::schedulers::SchedulerConfig;
use crate::tensor::Tensor;
use crate::text::{Umt5Tokenizer, UMT5_MAX_LENGTH};
use crate::weights::wan_files::WanFile;
use crate::weights::{FileDType, LoraFile, LoraTarget, WeightSet, Weights};

/// The set's pipeline folder and the components its cases have loaded.
pub(super) struct Runner {
    dir: PathBuf,
    tokenizer: Option<Umt5Tokenizer>,
    text_encoder: Option<UMT5EncoderModel>,
    /// By folder (`transformer` and, for Wan 2.2 A14B, `transformer_2`)
    /// and the LoRA fused in (see [`case_lora`]).
    transformers: HashMap<(&'static str, String), WanTransformer3DModel>,
    vae: Option<AutoencoderKLWan>,
    image_processor: Option<ClipImageProcessor>,
    image_encoder: Option<ClipVisionModel>,
    pipeline: Option<Wan>,
    /// The single files a set's cases name (`transformer_file`,
    /// `text_encoder_file`, `vae_file`, `image_encoder_file`), in place of
    /// its folders.
    files: Option<WanFiles>,
}

impl Runner {
    pub(super) fn new(pipeline_dir: &Path) -> Self {
        Runner {
            dir: pipeline_dir.to_path_buf(),
            tokenizer: None,
            text_encoder: None,
            transformers: HashMap::new(),
            vae: None,
            image_processor: None,
            image_encoder: None,
            pipeline: None,
            files: None,
        }
    }

    /// The outputs of one case of `component`; with `debug`, also the
    /// intermediate states the models show (their `forward_observed`).
    pub(super) fn compute(
        &mut self,
        gpu: &Gpu,
        set: &CaseSet,
        case: &serde_json::Value,
        component: &str,
        debug: bool,
    ) -> Result<Computed> {
        if has_input(case, "pipeline_dir") {
            return Err(argument(
                "Wan cases with `pipeline_dir` are not supported yet",
            ));
        }
        if has_input(case, "lora_file") && component != "transformer" {
            return Err(argument(format!(
                "input `lora_file`: Wan LoRAs are fused into the transformer; `{component}` cases take none"
            )));
        }
        if self.files.is_none() {
            self.files = case_files(set, case)?;
        }
        match component {
            "tokenizer" => self.tokenizer_case(set, case),
            "text_encoder" => self.text_encoder_case(gpu, set, case, debug),
            "transformer" => self.transformer_case(gpu, set, case, debug),
            "vae" => self.vae_case(gpu, set, case),
            "scheduler" => scheduler_case(set, case),
            "image_processor" => self.image_processor_case(set, case),
            "image_encoder" => self.image_encoder_case(gpu, set, case),
            "pipeline" => {
                if self.pipeline.is_none() {
                    let source = match &self.files {
                        Some(files) => ModelSource::open(&ModelSpec {
                            model: files.transformer.to_string_lossy().into_owned(),
                            text_encoder: Some(files.text_encoder.to_string_lossy().into_owned()),
                            vae: Some(files.vae.to_string_lossy().into_owned()),
                            transformer_config: files
                                .transformer_config
                                .as_ref()
                                .map(|p| p.to_string_lossy().into_owned()),
                            image_encoder: files
                                .image_encoder
                                .as_ref()
                                .map(|p| p.to_string_lossy().into_owned()),
                            image_encoder_config: files
                                .image_encoder_config
                                .as_ref()
                                .map(|p| p.to_string_lossy().into_owned()),
                            ..Default::default()
                        })?,
                        None => ModelSource::folder(&self.dir),
                    };
                    self.pipeline = Some(Wan::load(gpu, &source)?);
                }
                let Some(wan) = self.pipeline.as_mut() else {
                    unreachable!("loaded above")
                };
                pipeline_case(gpu, set, wan, case)
            }
            other => Err(argument(format!(
                "component `{other}` is not a Wan component"
            ))),
        }
    }

    fn tokenizer_case(&mut self, set: &CaseSet, case: &serde_json::Value) -> Result<Computed> {
        if self.tokenizer.is_none() {
            self.tokenizer = Some(match &self.files {
                Some(files) => files.tokenizer()?,
                None => Umt5Tokenizer::from_dir(&self.dir.join("tokenizer"))?,
            });
        }
        let Some(tokenizer) = self.tokenizer.as_ref() else {
            unreachable!("loaded above")
        };
        let prompts = resolve_prompts(set, case.get("inputs").and_then(|i| i.get("prompts")))?;
        let max_length = match case.get("inputs").and_then(|i| i.get("max_length")) {
            None => UMT5_MAX_LENGTH,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| argument("input `max_length` is not a count"))?
                as usize,
        };
        let tokens = tokenizer.encode(&prompts, max_length)?;
        let widen = |v: &[u32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        Ok(computed_from([
            ("input_ids", widen(&tokens.input_ids)),
            ("attention_mask", widen(&tokens.attention_mask)),
        ]))
    }

    fn text_encoder_case(
        &mut self,
        gpu: &Gpu,
        set: &CaseSet,
        case: &serde_json::Value,
        debug: bool,
    ) -> Result<Computed> {
        if self.text_encoder.is_none() {
            self.text_encoder = Some(match &self.files {
                Some(files) => {
                    let part = files.text_encoder()?;
                    UMT5EncoderModel::new(
                        gpu,
                        &Weights::new(part.weights, gpu.precision()),
                        part.config,
                        BlockResidency::Resident,
                    )?
                }
                None => UMT5EncoderModel::from_dir(
                    gpu,
                    &self.dir.join("text_encoder"),
                    BlockResidency::Resident,
                )?,
            });
        }
        let Some(model) = self.text_encoder.as_ref() else {
            unreachable!("loaded above")
        };
        let ids_key = input_tensor(case, "input_ids")?;
        let mask_key = input_tensor(case, "attention_mask")?;
        let shape = input_shape(set, ids_key)?;
        if shape.len() != 2 || input_shape(set, mask_key)? != shape {
            return Err(EngineError::Shape {
                op: "text_encoder case",
                expected: "input_ids and attention_mask [N, L]".into(),
                found: format!(
                    "input_ids {shape:?}, attention_mask {:?}",
                    input_shape(set, mask_key)?
                ),
            });
        }
        let rows = |key: &str| -> Result<Vec<Vec<u32>>> {
            Ok(set
                .tensors
                .to_i64(key)?
                .chunks(shape[1].max(1))
                .map(|r| r.iter().map(|&v| v as u32).collect())
                .collect())
        };
        let (ids, mask) = (rows(ids_key)?, rows(mask_key)?);
        let mut computed = Computed::new();
        let out = model.forward_observed(gpu, &ids, &mask, &mut |name, t: &Tensor| {
            if debug {
                computed.push((name.to_string(), values(gpu, t)?));
            }
            Ok(())
        })?;
        computed.push(("last_hidden_state".into(), values(gpu, &out)?));
        if debug {
            // transformers' bucket table [L, L] (memory − query positions).
            let cfg = &model.config;
            let buckets = relative_position_buckets(
                shape[1],
                cfg.relative_attention_num_buckets,
                cfg.relative_attention_max_distance,
            );
            computed.push((
                "relative_position_bucket".into(),
                buckets.iter().map(|&b| f64::from(b)).collect(),
            ));
        }
        Ok(computed)
    }

    fn transformer_case(
        &mut self,
        gpu: &Gpu,
        set: &CaseSet,
        case: &serde_json::Value,
        debug: bool,
    ) -> Result<Computed> {
        // Which expert: Wan 2.2 A14B runs `transformer_2` below its boundary.
        let which: &'static str = match case.get("inputs").and_then(|i| i.get("transformer")) {
            None => "transformer",
            Some(v) => match v.as_str() {
                Some("transformer") => "transformer",
                Some("transformer_2") => "transformer_2",
                _ => {
                    return Err(argument(format!(
                        "input `transformer` is {v}: expected \"transformer\" or \"transformer_2\""
                    )))
                }
            },
        };
        let folder = self.dir.join(which);
        let (lora_key, loras) = case_lora(set, case)?;
        let cache_key = (which, lora_key);
        if let (Some(files), false) = (&self.files, self.transformers.contains_key(&cache_key)) {
            let part = files.transformer_with_loras(&loras)?;
            let w = Weights::new(part.weights, gpu.precision());
            let model = WanTransformer3DModel::new(gpu, &w, part.config, BlockResidency::Resident)?;
            self.transformers.insert(cache_key.clone(), model);
        }
        if !self.transformers.contains_key(&cache_key) && !folder.join("config.json").is_file() {
            return Err(argument(format!(
                "the case runs `{which}`, but {} has no {which}/config.json",
                self.dir.display()
            )));
        }
        if !self.transformers.contains_key(&cache_key) {
            let config = WanTransformerConfig::load(&folder.join("config.json"))?;
            let weights =
                WeightSet::open_dir(&folder)?.with_loras(&loras, LoraTarget::Transformer)?;
            let w = Weights::new(Arc::new(weights), gpu.precision());
            let model = WanTransformer3DModel::new(gpu, &w, config, BlockResidency::Resident)?;
            self.transformers.insert(cache_key.clone(), model);
        }
        let model = &self.transformers[&cache_key];
        let cfg = &model.config;

        let hidden_states = upload_input(gpu, set, case, "hidden_states")?;
        let hs_shape = hidden_states.shape().to_vec();
        let ts_key = input_tensor(case, "timestep")?;
        let ts_shape = input_shape(set, ts_key)?;
        // [B], or [B, S] per token (Wan 2.2 TI2V's expand_timesteps),
        // passed flat in token order.
        if ts_shape.is_empty() || ts_shape.len() > 2 || ts_shape[0] != hs_shape[0] {
            return Err(EngineError::Shape {
                op: "transformer case",
                expected: format!(
                    "timestep [{}] or [{}, S] (one per token)",
                    hs_shape[0], hs_shape[0]
                ),
                found: format!("{ts_shape:?}"),
            });
        }
        // Integers as UniPC gives them, fractions as FlowMatchEuler does.
        let timesteps: Vec<f32> = match set.tensors.info(ts_key).map(|i| i.dtype) {
            Some(FileDType::I64) => set
                .tensors
                .to_i64(ts_key)?
                .iter()
                .map(|&t| t as f32)
                .collect(),
            _ => set.tensors.to_f32(ts_key)?,
        };
        let ehs = upload_input(gpu, set, case, "encoder_hidden_states")?;
        let image = match has_input(case, "encoder_hidden_states_image") {
            true => Some(upload_input(gpu, set, case, "encoder_hidden_states_image")?),
            false => None,
        };

        let mut computed = Computed::new();
        let out = model.forward_observed(
            gpu,
            &hidden_states,
            &timesteps,
            &ehs,
            image.as_ref(),
            &mut |name, t: &Tensor| {
                if debug {
                    computed.push((name.to_string(), values(gpu, t)?));
                }
                Ok(())
            },
        )?;
        computed.push(("sample".into(), values(gpu, &out)?));
        if debug {
            let [pt, ph, pw] = cfg.patch_size;
            let grid = [hs_shape[2] / pt, hs_shape[3] / ph, hs_shape[4] / pw];
            let tokens: usize = grid.iter().product();
            // diffusers' Conv3d output is [B, dim, f, h, w]; the engine's
            // patch embedding is tokens [B, S, dim].
            if let Some((_, v)) = computed.iter_mut().find(|(n, _)| n == "patch_embedding") {
                *v = channels_first(v, hs_shape[0], tokens, cfg.inner_dim());
            }
            // The rotary tables as diffusers hands them to attention:
            // [1, S, 1, head_dim], each angle repeated for its pair.
            let (cos, sin) = rope_tables(cfg.rope_split(), grid, ROPE_THETA);
            let pairs = |t: &[f32]| t.iter().flat_map(|&v| [v as f64; 2]).collect::<Vec<f64>>();
            computed.push(("rotary_cos".into(), pairs(&cos)));
            computed.push(("rotary_sin".into(), pairs(&sin)));
        }
        Ok(computed)
    }

    /// Inputs `image_{i}` [H, W, 3] in [0, 1] (bytes / 255) → outputs
    /// `pixel_values_{i}` [1, 3, S, S].
    fn image_processor_case(
        &mut self,
        set: &CaseSet,
        case: &serde_json::Value,
    ) -> Result<Computed> {
        if self.image_processor.is_none() {
            self.image_processor = Some(ClipImageProcessor::load(
                &self
                    .dir
                    .join("image_processor")
                    .join("preprocessor_config.json"),
            )?);
        }
        let Some(processor) = self.image_processor.as_ref() else {
            unreachable!("loaded above")
        };
        let mut computed = Computed::new();
        for i in 0.. {
            let name = format!("image_{i}");
            if !has_input(case, &name) {
                break;
            }
            let image = case_image(set, case, &name)?;
            let px = processor.preprocess(&image);
            computed.push((
                format!("pixel_values_{i}"),
                px.iter().map(|&v| f64::from(v)).collect(),
            ));
        }
        Ok(computed)
    }

    fn image_encoder_case(
        &mut self,
        gpu: &Gpu,
        set: &CaseSet,
        case: &serde_json::Value,
    ) -> Result<Computed> {
        if self.image_encoder.is_none() {
            let from_file = match &self.files {
                Some(files) => files.image_encoder()?,
                None => None,
            };
            self.image_encoder = Some(match from_file {
                Some(part) => ClipVisionModel::new(
                    gpu,
                    &Weights::new(part.weights, gpu.precision()),
                    part.config,
                )?,
                None => ClipVisionModel::from_dir(gpu, &self.dir.join("image_encoder"))?,
            });
        }
        let Some(model) = self.image_encoder.as_ref() else {
            unreachable!("loaded above")
        };
        let pixel_values = upload_input(gpu, set, case, "pixel_values")?;
        let out = model.penultimate_hidden_state(gpu, &pixel_values)?;
        Ok(computed_from([(
            "penultimate_hidden_state",
            values(gpu, &out)?,
        )]))
    }

    fn vae_case(&mut self, gpu: &Gpu, set: &CaseSet, case: &serde_json::Value) -> Result<Computed> {
        if self.vae.is_none() {
            self.vae = Some(match &self.files {
                Some(files) => {
                    let part = files.vae()?;
                    AutoencoderKLWan::new(
                        gpu,
                        &Weights::new(part.weights, gpu.precision()),
                        part.config,
                    )?
                }
                None => AutoencoderKLWan::load(gpu, &self.dir.join("vae"))?,
            });
        }
        let Some(vae) = self.vae.as_ref() else {
            unreachable!("loaded above")
        };
        // The VAE shows no intermediates: its debug outputs are reported as
        // not exposed.
        if has_input(case, "latents") {
            let latents = upload_input(gpu, set, case, "latents")?;
            let sample = vae.decode(gpu, &latents)?;
            Ok(computed_from([("sample", values(gpu, &sample)?)]))
        } else if has_input(case, "video") {
            let video = upload_input(gpu, set, case, "video")?;
            let posterior = vae.encode(gpu, &video)?;
            Ok(computed_from([
                ("posterior_mean", values(gpu, &posterior.mean)?),
                ("posterior_logvar", values(gpu, &posterior.logvar)?),
            ]))
        } else {
            Err(argument(
                "a Wan vae case needs input `latents` (raw, to decode) or `video` (to encode)",
            ))
        }
    }
}

/// LoRA files opened, with the user's weight of each.
type OpenLoras = Vec<(Arc<LoraFile>, f32)>;

/// The LoRA a transformer case fuses in: its literal inputs `lora_file` (a
/// path relative to the case set) and `lora_scale` (diffusers'
/// `fuse_lora(lora_scale=…)`, default 1). Also the model cache's key: ""
/// without one.
fn case_lora(set: &CaseSet, case: &serde_json::Value) -> Result<(String, OpenLoras)> {
    if !has_input(case, "lora_file") {
        return Ok((String::new(), Vec::new()));
    }
    let file = literal(case, "lora_file")?
        .as_str()
        .ok_or_else(|| argument("input `lora_file` is not a path"))?;
    let scale = match has_input(case, "lora_scale") {
        true => literal(case, "lora_scale")?
            .as_f64()
            .ok_or_else(|| argument("input `lora_scale` is not a number"))?,
        false => 1.0,
    };
    let lora = LoraFile::open(&set.dir.join(file))?;
    Ok((
        format!("{file}:{scale}"),
        vec![(Arc::new(lora), scale as f32)],
    ))
}

/// The files of a case over single files (paths relative to the set), or
/// `None` for a case over the set's folders.
fn case_files(set: &CaseSet, case: &serde_json::Value) -> Result<Option<WanFiles>> {
    let names = [
        "transformer_file",
        "text_encoder_file",
        "vae_file",
        "transformer_config",
        "image_encoder_file",
        "image_encoder_config",
    ];
    if !names.iter().any(|n| has_input(case, n)) {
        return Ok(None);
    }
    let path = |name: &str| -> Result<Option<String>> {
        if !has_input(case, name) {
            return Ok(None);
        }
        let rel = literal(case, name)?
            .as_str()
            .ok_or_else(|| argument(format!("input `{name}` is not a path")))?;
        Ok(Some(set.dir.join(rel).to_string_lossy().into_owned()))
    };
    let model = path("transformer_file")?
        .ok_or_else(|| argument("a Wan case over single files names its `transformer_file`"))?;
    let spec = ModelSpec {
        model: model.clone(),
        text_encoder: path("text_encoder_file")?,
        vae: path("vae_file")?,
        transformer_config: path("transformer_config")?,
        image_encoder: path("image_encoder_file")?,
        image_encoder_config: path("image_encoder_config")?,
        ..Default::default()
    };
    Ok(Some(WanFiles::open(
        Path::new(&model),
        WanFile::Transformer,
        &spec,
    )?))
}

/// An image input [H, W, 3] with values in [0, 1].
fn case_image(set: &CaseSet, case: &serde_json::Value, name: &str) -> Result<RgbImage> {
    let key = input_tensor(case, name)?;
    let shape = input_shape(set, key)?;
    if shape.len() != 3 || shape[2] != 3 {
        return Err(EngineError::Shape {
            op: "image input",
            expected: format!("`{name}` [H, W, 3]"),
            found: format!("{shape:?}"),
        });
    }
    Ok(RgbImage {
        width: shape[1],
        height: shape[0],
        data: set.tensors.to_f32(key)?,
    })
}

/// [B, S, C] → [B, C, S].
fn channels_first(x: &[f64], b: usize, s: usize, c: usize) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    for bi in 0..b {
        for si in 0..s {
            for ci in 0..c {
                out[(bi * c + ci) * s + si] = x[(bi * s + si) * c + ci];
            }
        }
    }
    out
}

/// A `pipeline` case: the Wan family (`pipelines::wan`) end to end on the
/// case's latents with its scheduler config and text length, traced:
/// `timesteps`, `prompt_embeds` (uncond first), `step_latents`, `latents`,
/// `frames` [1, F, H, W, 3]. Its debug outputs (per-step transformer
/// outputs and timesteps, prompt ids) are not exposed by the family.
fn pipeline_case(
    gpu: &Gpu,
    set: &CaseSet,
    wan: &mut Wan,
    case: &serde_json::Value,
) -> Result<Computed> {
    let count = |name: &str| -> Result<usize> {
        literal(case, name)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| argument(format!("input `{name}` is not a count")))
    };
    let text = |name: &str| -> Result<String> {
        Ok(literal(case, name)?
            .as_str()
            .ok_or_else(|| argument(format!("input `{name}` is not a string")))?
            .to_string())
    };
    let config = text("scheduler_config")?;
    wan.set_scheduler_config(SchedulerConfig::load(&set.dir.join(config))?);
    wan.set_max_sequence_length(match has_input(case, "max_sequence_length") {
        true => count("max_sequence_length")?,
        false => UMT5_MAX_LENGTH,
    });
    let defaults = ModelDefaults {
        width: count("width")?,
        height: count("height")?,
        frames: count("frames")?,
        steps: count("steps")?,
        guidance: literal(case, "guidance")?
            .as_f64()
            .ok_or_else(|| argument("input `guidance` is not a number"))? as f32,
        fps: 16.0,
        negative: text("negative_prompt").unwrap_or_default(),
        camera_prompts: Default::default(),
    };
    let mut req = Request::new(text("prompt")?, &defaults);
    let key = input_tensor(case, "latents")?;
    req.latents = Some(set.tensors.to_f32(key)?);
    if has_input(case, "image") {
        req.image = Some(case_image(set, case, "image")?);
    }
    if has_input(case, "last_image") {
        req.last_image = Some(case_image(set, case, "last_image")?);
    }
    // Wan 2.2 A14B: the low-noise expert's guidance scale.
    if has_input(case, "guidance_2") {
        req.guidance_2 = Some(
            literal(case, "guidance_2")?
                .as_f64()
                .ok_or_else(|| argument("input `guidance_2` is not a number"))? as f32,
        );
    }
    req.trace = true;
    let out = wan.generate(gpu, &req, &mut |_| true)?;
    let trace = out.trace.unwrap_or_default();
    let widen = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
    let mut computed = computed_from([
        ("timesteps", trace.timesteps.clone()),
        ("prompt_embeds", widen(&trace.prompt_embeds)),
        ("step_latents", widen(&trace.step_latents.concat())),
        // The last step's latents, as diffusers' callback sees them (Wan
        // 2.2 TI2V returns them with the first frame replaced for decoding).
        (
            "latents",
            widen(trace.step_latents.last().unwrap_or(&out.latents)),
        ),
        (
            "frames",
            widen(out.frames_f32.as_deref().unwrap_or_default()),
        ),
    ]);
    if req.image.is_some() {
        // None without an image encoder (Wan 2.2 A14B I2V, Wan 2.2 TI2V).
        if !trace.image_embeds.is_empty() {
            computed.push(("image_embeds".into(), widen(&trace.image_embeds)));
        }
        computed.push(("condition".into(), widen(&trace.condition)));
    }
    Ok(computed)
}
