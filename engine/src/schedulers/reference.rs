//! Runs a `scheduler` reference case (docs/CASES.md, `motif-cases-v1`):
//! the diffusers pipeline's scheduler loop with the UNet replaced by the
//! case's fixed per-step model outputs.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::{Scheduler, SchedulerConfig};
use crate::error::{EngineError, LoadError, Result};
use crate::weights::SafetensorsFile;

fn case_error(message: impl Into<String>) -> EngineError {
    EngineError::Argument {
        op: "scheduler case",
        message: message.into(),
    }
}

fn input<'a>(case: &'a Value, name: &str) -> Option<&'a Value> {
    case.get("inputs").and_then(|i| i.get(name))
}

/// The F32 values of a tensor input and its shape.
fn tensor_input(
    tensors: &SafetensorsFile,
    case: &Value,
    name: &str,
) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
    let Some(spec) = input(case, name) else {
        return Ok(None);
    };
    let key = spec
        .get("tensor")
        .and_then(Value::as_str)
        .ok_or_else(|| case_error(format!("input `{name}` is not a tensor")))?;
    let info = tensors.info(key).ok_or_else(|| LoadError::MissingTensor {
        path: tensors.path().to_path_buf(),
        key: key.into(),
    })?;
    let shape = info.shape.clone();
    Ok(Some((tensors.to_f32(key)?, shape)))
}

/// Computes every output a scheduler case can name: `timesteps`, `sigmas`
/// (where the scheduler has them), `sample0`, and per step, stacked,
/// `scaled_model_input`, `prev_sample`, `pred_original_sample` and LCM's
/// `denoised`.
pub(crate) fn run_case(
    dir: &Path,
    tensors: &SafetensorsFile,
    case: &Value,
) -> Result<HashMap<&'static str, Vec<f64>>> {
    let config_path = input(case, "scheduler_config")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            case_error("input `scheduler_config` must be a path relative to the case set")
        })?;
    let steps = input(case, "steps")
        .and_then(Value::as_u64)
        .ok_or_else(|| case_error("input `steps` must be a non-negative integer"))?;
    let (noise_init, _) = tensor_input(tensors, case, "noise_init")?
        .ok_or_else(|| case_error("no input `noise_init`"))?;
    let (model_output, mo_shape) = tensor_input(tensors, case, "model_output")?
        .ok_or_else(|| case_error("no input `model_output`"))?;
    let noise = tensor_input(tensors, case, "noise")?;

    let config = SchedulerConfig::load(&dir.join(config_path))?;
    let mut scheduler = Scheduler::new(&config, None, None)?;
    scheduler.set_timesteps(steps as usize)?;
    let n = scheduler.timesteps().len();
    let len = noise_init.len();
    if mo_shape.first() != Some(&n) || model_output.len() != n * len {
        return Err(EngineError::Shape {
            op: "scheduler case",
            expected: format!("model_output [{n}, ...] with {len} values per step"),
            found: format!("{mo_shape:?}"),
        });
    }
    if let Some((noise, _)) = &noise {
        if noise.len() != n * len {
            return Err(EngineError::Shape {
                op: "scheduler case",
                expected: format!("noise [{n}, ...] with {len} values per step"),
                found: format!("{} values", noise.len()),
            });
        }
    }

    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let mut out: HashMap<&'static str, Vec<f64>> = HashMap::new();
    out.insert("timesteps", scheduler.timesteps().to_vec());
    if let Some(sigmas) = scheduler.sigmas() {
        out.insert("sigmas", widen(sigmas));
    }
    // The pipeline's `latents * scheduler.init_noise_sigma`.
    let init_sigma = scheduler.init_noise_sigma();
    let mut sample: Vec<f32> = noise_init.iter().map(|&x| x * init_sigma).collect();
    out.insert("sample0", widen(&sample));

    let (mut scaled, mut prev, mut pred, mut denoised) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let step_noise = noise.as_ref().map(|(v, _)| &v[i * len..(i + 1) * len]);
        scaled.extend(widen(&scheduler.scale_model_input(&sample, i)?));
        let step = scheduler.step(
            &model_output[i * len..(i + 1) * len],
            i,
            &sample,
            step_noise,
        )?;
        pred.extend(widen(&step.pred_original));
        if let Some(d) = &step.denoised {
            denoised.extend(widen(d));
        }
        prev.extend(widen(&step.prev_sample));
        sample = step.prev_sample;
    }
    out.insert("scaled_model_input", scaled);
    out.insert("prev_sample", prev);
    out.insert("pred_original_sample", pred);
    if !denoised.is_empty() {
        out.insert("denoised", denoised);
    }
    Ok(out)
}
