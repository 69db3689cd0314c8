//! The reference-case runner behind `motif conformance DIR` (format
//! `motif-cases-v1`, see docs/CASES.md): loads DIR as a
//! model, runs every case (or the selected components), and compares each
//! output with its expected tensor.
//!
//! The case set's family comes from its `model_index.json` `_class_name`:
//! `Wan…Pipeline` sets run through [`wan`], every other set (AnimateDiff
//! folders and single-file checkpoints, which have no model index) through
//! [`animatediff`]. Both share what this module holds: reading the manifest
//! and the case tensors, the comparison and docs/CASES.md's fixed budget.

mod animatediff;
mod wan;

use std::path::{Path, PathBuf};

use crate::error::{EngineError, LoadError, Result};
use crate::gpu::{DType, Gpu};
use crate::tensor::Tensor;
use crate::weights::{config::read_json, SafetensorsFile};

/// Components this runner knows, over both families (docs/CASES.md).
pub const COMPONENTS: [&str; 9] = [
    "tokenizer",
    "text_encoder",
    "unet",
    "transformer",
    "vae",
    "scheduler",
    "pipeline",
    "image_processor",
    "image_encoder",
];

#[derive(Debug, Clone)]
pub struct ConformanceOptions {
    /// Run only these components (`--component`); `None` runs all cases.
    pub components: Option<Vec<String>>,
    /// Also compare `debug_outputs`.
    pub debug: bool,
}

/// One compared output, or a case (or one of its outputs) that could not run.
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

/// One expected tensor of a case.
struct Expected {
    tensor: String,
    name: Option<String>,
    tolerance: f64,
    exact: bool,
    /// Listed under `debug_outputs`.
    debug: bool,
}

/// What every family reads from a case set.
struct CaseSet {
    dir: PathBuf,
    tensors: SafetensorsFile,
    prompts: Option<serde_json::Value>,
}

/// The outputs a case computed: engine name and values, in the layout and
/// order of diffusers' tensor (integers as exact f64).
type Computed = Vec<(String, Vec<f64>)>;

/// The model family a case set exercises.
enum Runner {
    AnimateDiff(Box<animatediff::Runner>),
    Wan(Box<wan::Runner>),
}

fn cfg_err(path: &Path, message: impl Into<String>) -> EngineError {
    LoadError::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
    .into()
}

fn argument(message: impl Into<String>) -> EngineError {
    EngineError::Argument {
        op: "conformance",
        message: message.into(),
    }
}

/// Whether `pipeline_dir` is a Wan pipeline folder: its `model_index.json`
/// names a `Wan…Pipeline` class (WanPipeline, WanImageToVideoPipeline, …).
/// Sets without a model index (single-file checkpoints) are AnimateDiff's.
fn is_wan(pipeline_dir: &Path) -> Result<bool> {
    let index = pipeline_dir.join("model_index.json");
    if !index.is_file() {
        return Ok(false);
    }
    let value = read_json(&index)?;
    let class = value
        .get("_class_name")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    Ok(class.starts_with("Wan") && class.ends_with("Pipeline"))
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
            if !COMPONENTS.contains(&c.as_str()) {
                return Err(argument(format!(
                    "unknown component `{c}` (known: {})",
                    COMPONENTS.join(", ")
                )));
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
    let mut runner = if is_wan(&pipeline_dir)? {
        Runner::Wan(Box::new(wan::Runner::new(&pipeline_dir)))
    } else {
        Runner::AnimateDiff(Box::new(animatediff::Runner::new(
            dir,
            &pipeline_dir,
            &manifest,
        )?))
    };
    let set = CaseSet {
        dir: dir.to_path_buf(),
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

    let mut summary = Summary::default();
    let mut count = |line: &Line, summary: &mut Summary| {
        match line {
            Line::Output { ok: true, .. } => summary.passed += 1,
            // An output that could not be compared fails like a wrong one.
            _ => summary.failed += 1,
        }
        report(line);
    };
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
        let computed = match &mut runner {
            Runner::AnimateDiff(r) => r.compute(gpu, &set, case, component),
            Runner::Wan(r) => r.compute(gpu, &set, case, component, opts.debug),
        };
        match computed.and_then(|c| compare(gpu.precision(), &set, case, component, opts.debug, &c))
        {
            Ok(lines) => {
                for line in &lines {
                    count(line, &mut summary);
                }
            }
            Err(e) => count(
                &Line::CaseError {
                    case: name,
                    error: e.to_string(),
                },
                &mut summary,
            ),
        }
    }
    Ok(summary)
}

/// An F32 input tensor of the case, uploaded in the run's precision.
fn upload_input(gpu: &Gpu, set: &CaseSet, case: &serde_json::Value, name: &str) -> Result<Tensor> {
    let key = input_tensor(case, name)?;
    let shape = input_shape(set, key)?;
    Tensor::from_f32(gpu, &set.tensors.to_f32(key)?, &shape, gpu.precision())
}

/// The shape of a tensor in the case file.
fn input_shape(set: &CaseSet, key: &str) -> Result<Vec<usize>> {
    Ok(set
        .tensors
        .info(key)
        .ok_or_else(|| LoadError::MissingTensor {
            path: set.tensors.path().to_path_buf(),
            key: key.into(),
        })?
        .shape
        .clone())
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
                        debug: key == "debug_outputs",
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Which computed output an expected tensor is: its `name` field, else the
/// computed name its tensor name ends with (the longest match), else the
/// only output there is.
fn output_index(e: &Expected, computed: &Computed) -> Option<usize> {
    if let Some(n) = &e.name {
        return computed.iter().position(|(k, _)| k == n);
    }
    let longest = |matches: &dyn Fn(&str) -> bool| {
        computed
            .iter()
            .enumerate()
            .filter(|(_, (k, _))| matches(k))
            .max_by_key(|(_, (k, _))| k.len())
            .map(|(i, _)| i)
    };
    longest(&|k| e.tensor.ends_with(k))
        .or_else(|| longest(&|k| e.tensor.contains(k)))
        .or_else(|| (computed.len() == 1).then_some(0))
}

fn input_tensor<'a>(case: &'a serde_json::Value, name: &str) -> Result<&'a str> {
    case.get("inputs")
        .and_then(|i| i.get(name))
        .and_then(|i| i.get("tensor"))
        .and_then(|t| t.as_str())
        .ok_or_else(|| argument(format!("case has no tensor input `{name}`")))
}

/// A literal input of a case.
fn literal<'a>(case: &'a serde_json::Value, name: &str) -> Result<&'a serde_json::Value> {
    case.get("inputs")
        .and_then(|i| i.get(name))
        .filter(|v| !v.is_object())
        .ok_or_else(|| argument(format!("case has no literal input `{name}`")))
}

/// A `scheduler` case, the same for every family: CPU only, in f32 whatever
/// the GPU precision.
fn scheduler_case(set: &CaseSet, case: &serde_json::Value) -> Result<Computed> {
    let mut computed: Computed =
        crate::schedulers::reference::run_case(&set.dir, &set.tensors, case)?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
    computed.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(computed)
}

/// One line per expected output (and debug output, with `debug`): the
/// computed values against the case file's, under [`budget`].
fn compare(
    precision: DType,
    set: &CaseSet,
    case: &serde_json::Value,
    component: &str,
    debug: bool,
    computed: &Computed,
) -> Result<Vec<Line>> {
    let name = case
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or("(unnamed)");
    let mut expected = expected_list(case, "outputs");
    if expected.is_empty() {
        return Err(argument("case lists no outputs"));
    }
    if debug {
        expected.extend(expected_list(case, "debug_outputs"));
    }
    let known = || {
        computed
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut lines = Vec::new();
    for e in &expected {
        let Some(index) = output_index(e, computed) else {
            let what = if e.debug { "debug output" } else { "output" };
            lines.push(Line::CaseError {
                case: name.into(),
                error: format!(
                    "{what} `{}`{}: the engine's {component} does not expose it (it shows: {})",
                    e.tensor,
                    e.name
                        .as_ref()
                        .map(|n| format!(" (`{n}`)"))
                        .unwrap_or_default(),
                    known()
                ),
            });
            continue;
        };
        let want = set.tensors.to_f32(&e.tensor).map_err(EngineError::from)?;
        let got = &computed[index].1;
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
        let (tolerance, budget) = budget(precision, component, e, integer, max_expected);
        lines.push(Line::Output {
            case: name.into(),
            output: e.tensor.clone(),
            max_abs_err,
            tolerance,
            budget,
            ok: max_abs_err <= tolerance,
        });
    }
    Ok(lines)
}

/// The tolerance applied, and how it was chosen (docs/CASES.md): integers
/// exact; f32 the case's tolerance; f16 storage max(f32 tolerance,
/// 3e-2 · max|expected|), 5e-2 for the `pipeline` component. Fixed by the
/// format: never widened per case or per family.
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
    let bad = || argument("input `prompts` must be a list of strings or \"prompts.json:KEY\"");
    let list = match value {
        Some(serde_json::Value::String(s)) => {
            let key = s.strip_prefix("prompts.json:").ok_or_else(bad)?;
            set.prompts
                .as_ref()
                .and_then(|p| p.get(key))
                .ok_or_else(|| argument(format!("prompts.json has no list `{key}`")))?
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

/// Computed outputs from (name, values) pairs with static names.
fn computed_from(pairs: impl IntoIterator<Item = (&'static str, Vec<f64>)>) -> Computed {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}
