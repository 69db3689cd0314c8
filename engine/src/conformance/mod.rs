//! The reference-case runner behind `motif conformance DIR` (format
//! `motif-cases-v1`, see CONFORMANCE.md in the shared folder): loads DIR as a
//! model, runs every case (or the selected components), and compares each
//! output with its expected tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{EngineError, LoadError, Result};
use crate::gpu::{DType, Gpu};
use crate::models::clip::ClipTextModel;
use crate::models::source::{ModelSource, ModelSpec};
use crate::models::unet_motion::{MotionOptions, UNetMotionModel};
use crate::models::vae::AutoencoderKL;
use crate::pipelines::{AnimateDiff, Family, Request};
use crate::tensor::Tensor;
use crate::text::ClipTokenizer;
use crate::weights::{config::read_json, SafetensorsFile, Weights};

/// Components this runner knows; the others of the format come with later work.
pub const COMPONENTS: [&str; 6] = [
    "tokenizer",
    "text_encoder",
    "unet",
    "vae",
    "scheduler",
    "pipeline",
];
/// Components of the format not implemented yet: their cases fail.
pub const PENDING_COMPONENTS: [&str; 0] = [];

#[derive(Debug, Clone)]
pub struct ConformanceOptions {
    /// Run only these components (`--component`); `None` runs all cases.
    pub components: Option<Vec<String>>,
    /// Also compare `debug_outputs`.
    pub debug: bool,
}

/// One compared output, or a case that could not run.
#[derive(Debug, Clone)]
pub enum Line {
    Output {
        case: String,
        output: String,
        max_abs_err: f64,
        tolerance: f64,
        budget: String,
        ok: bool,
    },
    CaseError {
        case: String,
        error: String,
    },
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub passed: usize,
    pub failed: usize,
}

struct Expected {
    tensor: String,
    name: Option<String>,
    tolerance: f64,
    exact: bool,
}

struct CaseSet {
    dir: PathBuf,
    /// The model the cases run on: `pipeline_dir` (a diffusers folder, or a
    /// single-file checkpoint with optional `motion_adapter` and `vae` files
    /// named beside it in the manifest).
    source: ModelSource,
    tensors: SafetensorsFile,
    prompts: Option<serde_json::Value>,
}

fn cfg_err(path: &Path, message: impl Into<String>) -> EngineError {
    LoadError::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
    .into()
}

/// Runs the case set in `dir`, calling `report` for every line as it is known.
pub fn run(
    gpu: &Gpu,
    dir: &Path,
    opts: &ConformanceOptions,
    mut report: impl FnMut(&Line),
) -> Result<Summary> {
    let manifest_path = dir.join("cases.json");
    let manifest = read_json(&manifest_path)?;
    if manifest.get("format").and_then(|f| f.as_str()) != Some("motif-cases-v1") {
        return Err(cfg_err(
            &manifest_path,
            "`format` is not \"motif-cases-v1\"",
        ));
    }
    if let Some(list) = &opts.components {
        for c in list {
            if !COMPONENTS.contains(&c.as_str()) && !PENDING_COMPONENTS.contains(&c.as_str()) {
                return Err(EngineError::Argument {
                    op: "conformance",
                    message: format!(
                        "unknown component `{c}` (known: {})",
                        [&COMPONENTS[..], &PENDING_COMPONENTS[..]]
                            .concat()
                            .join(", ")
                    ),
                });
            }
        }
    }
    let pipeline_dir = dir.join(
        manifest
            .get("pipeline_dir")
            .and_then(|p| p.as_str())
            .unwrap_or("."),
    );
    let tensors_file = dir.join(
        manifest
            .get("tensors")
            .and_then(|p| p.as_str())
            .unwrap_or("cases.safetensors"),
    );
    let prompts_path = dir.join("prompts.json");
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
    })?;
    let set = CaseSet {
        dir: dir.to_path_buf(),
        source,
        tensors: SafetensorsFile::open(&tensors_file)?,
        prompts: if prompts_path.exists() {
            Some(read_json(&prompts_path)?)
        } else {
            None
        },
    };
    let cases = manifest
        .get("cases")
        .and_then(|c| c.as_array())
        .ok_or_else(|| cfg_err(&manifest_path, "no `cases` list"))?;

    let mut models = Models::default();
    let mut summary = Summary::default();
    for case in cases {
        let name = case
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("(unnamed)")
            .to_string();
        let component = case.get("component").and_then(|c| c.as_str()).unwrap_or("");
        if let Some(list) = &opts.components {
            if !list.iter().any(|c| c == component) {
                continue;
            }
        }
        match run_case(gpu, &set, &mut models, case, component, opts.debug) {
            Ok(lines) => {
                for line in lines {
                    if let Line::Output { ok, .. } = line {
                        if ok {
                            summary.passed += 1;
                        } else {
                            summary.failed += 1;
                        }
                    }
                    report(&line);
                }
            }
            Err(e) => {
                summary.failed += 1;
                report(&Line::CaseError {
                    case: name,
                    error: e.to_string(),
                });
            }
        }
    }
    Ok(summary)
}

#[derive(Default)]
struct Models {
    tokenizer: Option<ClipTokenizer>,
    /// Per LoRA a case fuses in (see [`case_lora`]); "" without one.
    text_encoder: HashMap<String, ClipTextModel>,
    vae: Option<AutoencoderKL>,
    unet: HashMap<String, UNetMotionModel>,
    pipeline: Option<AnimateDiff>,
}

/// The model source for a case: the set's, or with the LoRA file the case
/// names in its literal inputs `lora` (beside cases.json) and `lora_weight`
/// (diffusers' `fuse_lora(lora_scale=…)`, default 1). Also the cache key of
/// the models loaded with it.
fn case_lora(set: &CaseSet, case: &serde_json::Value) -> Result<(String, Option<ModelSource>)> {
    let Some(file) = case.get("inputs").and_then(|i| i.get("lora")) else {
        return Ok((String::new(), None));
    };
    let bad = |message: String| EngineError::Argument {
        op: "conformance",
        message,
    };
    let file = file
        .as_str()
        .ok_or_else(|| bad("input `lora` is not a file name".into()))?;
    let weight = match case.get("inputs").and_then(|i| i.get("lora_weight")) {
        Some(w) => w
            .as_f64()
            .ok_or_else(|| bad("input `lora_weight` is not a number".into()))?,
        None => 1.0,
    };
    let path = set.dir.join(file).to_string_lossy().into_owned();
    let source = set.source.with_loras(&[(path, weight as f32)])?;
    Ok((format!("{file}:{weight}"), Some(source)))
}

/// An F32 input tensor of the case, uploaded in the run's precision.
fn upload_input(gpu: &Gpu, set: &CaseSet, case: &serde_json::Value, name: &str) -> Result<Tensor> {
    let key = input_tensor(case, name)?;
    let info = set
        .tensors
        .info(key)
        .ok_or_else(|| LoadError::MissingTensor {
            path: set.dir.join("cases.safetensors"),
            key: key.into(),
        })?;
    let shape = info.shape.clone();
    Tensor::from_f32(gpu, &set.tensors.to_f32(key)?, &shape, gpu.precision())
}

fn has_input(case: &serde_json::Value, name: &str) -> bool {
    case.get("inputs").and_then(|i| i.get(name)).is_some()
}

fn values(gpu: &Gpu, t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_f32(gpu)?.iter().map(|&v| v as f64).collect())
}

fn expected_list(case: &serde_json::Value, key: &str) -> Vec<Expected> {
    case.get(key)
        .and_then(|o| o.as_array())
        .map(|list| {
            list.iter()
                .filter_map(|o| {
                    Some(Expected {
                        tensor: o.get("tensor")?.as_str()?.to_string(),
                        name: o.get("name").and_then(|n| n.as_str()).map(str::to_string),
                        tolerance: o
                            .get("tolerance_max_abs")
                            .and_then(|t| t.as_f64())
                            .unwrap_or(0.0),
                        exact: o.get("exact").and_then(|e| e.as_bool()).unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Which engine output an expected tensor is: its `name` field, else the
/// known output name its tensor name ends with (the longest match).
fn output_name<'a>(e: &Expected, known: &[&'a str]) -> Option<&'a str> {
    if let Some(n) = &e.name {
        return known.iter().copied().find(|k| k == n);
    }
    known
        .iter()
        .copied()
        .filter(|k| e.tensor.ends_with(k))
        .max_by_key(|k| k.len())
        .or_else(|| {
            known
                .iter()
                .copied()
                .filter(|k| e.tensor.contains(k))
                .max_by_key(|k| k.len())
        })
}

fn input_tensor<'a>(case: &'a serde_json::Value, name: &str) -> Result<&'a str> {
    case.get("inputs")
        .and_then(|i| i.get(name))
        .and_then(|i| i.get("tensor"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| EngineError::Argument {
            op: "conformance",
            message: format!("case has no tensor input `{name}`"),
        })
}

fn run_case(
    gpu: &Gpu,
    set: &CaseSet,
    models: &mut Models,
    case: &serde_json::Value,
    component: &str,
    debug: bool,
) -> Result<Vec<Line>> {
    let name = case
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("(unnamed)");
    let mut expected = expected_list(case, "outputs");
    if debug {
        expected.extend(expected_list(case, "debug_outputs"));
    }
    // Computed outputs, by name, as f64 values.
    let (known, computed): (Vec<&str>, HashMap<&str, Vec<f64>>) = match component {
        "tokenizer" => {
            if models.tokenizer.is_none() {
                models.tokenizer = Some(set.source.tokenizer()?);
            }
            let tok = models.tokenizer.as_ref().expect("just loaded");
            let prompts = resolve_prompts(set, case.get("inputs").and_then(|i| i.get("prompts")))?;
            let ids: Vec<f64> = prompts
                .iter()
                .flat_map(|p| tok.encode(p))
                .map(f64::from)
                .collect();
            (vec!["input_ids"], HashMap::from([("input_ids", ids)]))
        }
        "text_encoder" => {
            let (lora, source) = case_lora(set, case)?;
            if !models.text_encoder.contains_key(&lora) {
                let part = source.as_ref().unwrap_or(&set.source).text_encoder()?;
                let weights = Weights::new(part.weights, gpu.precision());
                let model = ClipTextModel::new(gpu, &weights, part.config)?;
                models.text_encoder.insert(lora.clone(), model);
            }
            let model = &models.text_encoder[&lora];
            let key = input_tensor(case, "input_ids")?;
            let info = set
                .tensors
                .info(key)
                .ok_or_else(|| LoadError::MissingTensor {
                    path: set.dir.join("cases.safetensors"),
                    key: key.into(),
                })?;
            let shape = info.shape.clone();
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
            let get = |t: &crate::tensor::Tensor| -> Result<Vec<f64>> {
                Ok(t.to_f32(gpu)?.iter().map(|&v| v as f64).collect())
            };
            let names = vec![
                "last_hidden_state",
                "pooler_output",
                "clip_skip1_hidden_state",
            ];
            let map = HashMap::from([
                ("last_hidden_state", get(&out.last_hidden_state)?),
                ("pooler_output", get(&out.pooler_output)?),
                (
                    "clip_skip1_hidden_state",
                    get(&out.clip_skip1_hidden_state)?,
                ),
            ]);
            (names, map)
        }
        "vae" => {
            if models.vae.is_none() {
                let part = set.source.vae()?;
                let weights = Weights::new(part.weights, gpu.precision());
                models.vae = Some(AutoencoderKL::new(gpu, &weights, part.config)?);
            }
            let vae = models.vae.as_ref().expect("just loaded");
            let literal = |name: &str| {
                case.get("inputs")
                    .and_then(|i| i.get(name))
                    .and_then(|v| v.as_u64())
                    .map(|v| v as usize)
            };
            if let (true, Some(sample_tile), Some(latent_tile)) = (
                has_input(case, "latents"),
                literal("tile_sample_min_size"),
                literal("tile_latent_min_size"),
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
                (
                    vec!["sample"],
                    HashMap::from([("sample", image.data.iter().map(|&v| v as f64).collect())]),
                )
            } else if has_input(case, "latents") {
                let latents = upload_input(gpu, set, case, "latents")?;
                let sample = vae.decode_scaled(gpu, &latents)?;
                (
                    vec!["sample"],
                    HashMap::from([("sample", values(gpu, &sample)?)]),
                )
            } else if has_input(case, "image") {
                let image = upload_input(gpu, set, case, "image")?;
                let post = vae.encode(gpu, &image)?;
                (
                    vec!["mean", "logvar"],
                    HashMap::from([
                        ("mean", values(gpu, &post.mean)?),
                        ("logvar", values(gpu, &post.logvar)?),
                    ]),
                )
            } else {
                return Err(EngineError::Argument {
                    op: "conformance",
                    message: "a vae case needs input `latents` or `image`".into(),
                });
            }
        }
        "unet" => {
            let (lora, source) = case_lora(set, case)?;
            if !models.unet.contains_key(&lora) {
                let part = source.as_ref().unwrap_or(&set.source).unet()?;
                let weights = Weights::new(part.weights, gpu.precision());
                let model = UNetMotionModel::new(gpu, &weights, part.config)?;
                models.unet.insert(lora.clone(), model);
            }
            let unet = &models.unet[&lora];
            let sample = upload_input(gpu, set, case, "sample")?;
            let ehs = upload_input(gpu, set, case, "encoder_hidden_states")?;
            // Timesteps arrive as I64 (DDIM, DPM, LCM) or fractional F32 (Euler).
            let key = input_tensor(case, "timestep")?;
            let timestep = set.tensors.to_f32(key)?;
            let out = unet.forward(gpu, &sample, &timestep, &ehs, &MotionOptions::default())?;
            (
                vec!["noise_pred"],
                HashMap::from([("noise_pred", values(gpu, &out)?)]),
            )
        }
        "scheduler" => {
            // CPU only: schedulers compute in f32 whatever the GPU precision.
            let computed = crate::schedulers::reference::run_case(&set.dir, &set.tensors, case)?;
            let mut known: Vec<&str> = computed.keys().copied().collect();
            known.sort_unstable();
            (known, computed)
        }
        "pipeline" => {
            if models.pipeline.is_none() {
                models.pipeline = Some(AnimateDiff::load(gpu, &set.source)?);
            }
            let pipe = models.pipeline.as_mut().expect("just loaded");
            run_pipeline_case(gpu, set, pipe, case)?
        }
        other if PENDING_COMPONENTS.contains(&other) => {
            return Err(EngineError::Argument {
                op: "conformance",
                message: format!("component `{other}` is not implemented yet"),
            })
        }
        other => {
            return Err(EngineError::Argument {
                op: "conformance",
                message: format!("unknown component `{other}`"),
            })
        }
    };

    let mut lines = Vec::new();
    for e in &expected {
        let Some(out_name) =
            output_name(e, &known).or_else(|| (known.len() == 1).then(|| known[0]))
        else {
            lines.push(Line::CaseError {
                case: name.into(),
                error: format!(
                    "output `{}` matches no {component} output ({})",
                    e.tensor,
                    known.join(", ")
                ),
            });
            continue;
        };
        let want = set.tensors.to_f32(&e.tensor).map_err(EngineError::from)?;
        let got = &computed[out_name];
        if got.len() != want.len() {
            lines.push(Line::CaseError {
                case: name.into(),
                error: format!(
                    "output `{}`: computed {} values, expected {}",
                    e.tensor,
                    got.len(),
                    want.len()
                ),
            });
            continue;
        }
        let integer = set
            .tensors
            .info(&e.tensor)
            .map(|i| i.dtype == crate::weights::FileDType::I64)
            .unwrap_or(false);
        let max_abs_err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - *w as f64).abs())
            .fold(
                0.0,
                |m: f64, v| if v.is_nan() { f64::INFINITY } else { m.max(v) },
            );
        let max_expected = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
        let (tolerance, budget) = budget(gpu.precision(), component, e, integer, max_expected);
        lines.push(Line::Output {
            case: name.into(),
            output: e.tensor.clone(),
            max_abs_err,
            tolerance,
            budget,
            ok: max_abs_err <= tolerance,
        });
    }
    if expected.is_empty() {
        lines.push(Line::CaseError {
            case: name.into(),
            error: "case lists no outputs".into(),
        });
    }
    Ok(lines)
}

/// The tolerance applied, and how it was chosen (CONFORMANCE.md): integers
/// exact; f32 the case's tolerance; f16 storage max(f32 tolerance,
/// 3e-2 · max|expected|), 5e-2 for the `pipeline` component.
/// Output names, and each output's values.
type Computed = (Vec<&'static str>, HashMap<&'static str, Vec<f64>>);

/// A literal input of a case.
fn literal<'a>(case: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    case.get("inputs")
        .and_then(|i| i.get(name))
        .filter(|v| !v.is_object())
        .ok_or_else(|| EngineError::Argument {
            op: "conformance",
            message: format!("case has no literal input `{name}`"),
        })
}

fn run_pipeline_case(
    gpu: &Gpu,
    set: &CaseSet,
    pipe: &mut AnimateDiff,
    case: &serde_json::Value,
) -> Result<Computed> {
    let text = |name: &str| -> Result<String> {
        literal(case, name)?
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| EngineError::Argument {
                op: "conformance",
                message: format!("input `{name}` is not a string"),
            })
    };
    let number = |name: &str| -> Result<f64> {
        literal(case, name)?
            .as_f64()
            .ok_or_else(|| EngineError::Argument {
                op: "conformance",
                message: format!("input `{name}` is not a number"),
            })
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
    let names = vec![
        "timesteps",
        "prompt_ids",
        "prompt_embeds",
        "step_latents",
        "latents",
        "frames",
    ];
    let map = HashMap::from([
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
        ("frames", f64s(&out.frames_f32)),
    ]);
    Ok((names, map))
}

fn budget(
    precision: DType,
    component: &str,
    e: &Expected,
    integer: bool,
    max_expected: f64,
) -> (f64, String) {
    if integer || e.exact {
        return (0.0, "exact".into());
    }
    match precision {
        DType::F32 => (e.tolerance, "f32".into()),
        DType::F16 => {
            let rel = if component == "pipeline" { 5e-2 } else { 3e-2 };
            let t = e.tolerance.max(rel * max_expected);
            (t, format!("f16 max(f32 tol, {rel:e}*max|exp|)"))
        }
    }
}

fn resolve_prompts(set: &CaseSet, value: Option<&serde_json::Value>) -> Result<Vec<String>> {
    let bad = || EngineError::Argument {
        op: "conformance",
        message: "input `prompts` must be a list of strings or \"prompts.json:KEY\"".into(),
    };
    let list = match value {
        Some(serde_json::Value::String(s)) => {
            let key = s.strip_prefix("prompts.json:").ok_or_else(bad)?;
            set.prompts
                .as_ref()
                .and_then(|p| p.get(key))
                .ok_or_else(|| EngineError::Argument {
                    op: "conformance",
                    message: format!("prompts.json has no list `{key}`"),
                })?
        }
        Some(v) => v,
        None => return Err(bad()),
    };
    list.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}
