//! The Wan family from single files (`--model` transformer, `--text-encoder`
//! UMT5, `--vae`, and for image-to-video `--image-encoder` CLIP vision):
//! the parts come from `models::wan_files`, the scheduler is the one Wan
//! 2.1's diffusers repositories ship, and everything after the parts is the
//! folder path's.
//!
//! Wan 2.2 A14B from ComfyUI's pair of files (`…high_noise…` as `--model`,
//! `…low_noise…` beside it or `--transformer-2`): single files carry no
//! boundary or scheduler, so the Wan team's published ones are taken
//! (T2V: boundary 0.875, shift 12; I2V: boundary 0.9, shift 5).

use std::path::Path;

use serde_json::json;

use super::experts::{ExpertWeights, Experts};
use super::{Wan, STREAM_TEXT_ENCODER_ABOVE};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::source::ModelSource;
use crate::models::source::Part;
use crate::models::umt5::{BlockResidency, UMT5EncoderModel};
use crate::models::wan_files::WanFiles;
use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use crate::models::wan_vae::AutoencoderKLWan;
use crate::schedulers::SchedulerConfig;
use crate::weights::Weights;

/// `scheduler/scheduler_config.json` of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
/// (UniPC on flow sigmas, shift 3): single files carry no scheduler.
fn published_scheduler() -> serde_json::Value {
    json!({
        "_class_name": "UniPCMultistepScheduler",
        "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
        "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": true,
        "num_train_timesteps": 1000, "predict_x0": true, "prediction_type": "flow_prediction",
        "rescale_betas_zero_snr": false, "sample_max_value": 1.0, "solver_order": 2,
        "solver_type": "bh2", "steps_offset": 0, "thresholding": false,
        "time_shift_type": "exponential", "timestep_spacing": "linspace",
        "use_beta_sigmas": false, "use_dynamic_shifting": false,
        "use_exponential_sigmas": false, "use_flow_sigmas": true, "use_karras_sigmas": false
    })
}

/// The published inference settings of Wan 2.2 A14B (the Wan team's
/// `wan_t2v_A14B.py` / `wan_i2v_A14B.py`): boundary, flow shift.
fn published_a14b(image_to_video: bool) -> (f64, f64) {
    match image_to_video {
        false => (0.875, 12.0),
        true => (0.9, 5.0),
    }
}

/// One transformer, or A14B's two experts with their boundary and shift.
enum Denoiser {
    One(Part<WanTransformerConfig>),
    Two(Box<[ExpertWeights; 2]>, f64, f64),
}

impl Wan {
    pub(super) fn from_files(gpu: &Gpu, files: &WanFiles, source: &ModelSource) -> Result<Self> {
        // LoRAs are checked against the transformer (headers only) before
        // any part goes to the GPU.
        let tr = files.transformer_with_loras(source.lora_files())?;
        let path = Path::new(&files.transformer);
        // Wan 2.2 A14B: both experts checked before any part goes to the GPU.
        let denoiser = match files.transformer_2()? {
            None => Denoiser::One(tr),
            Some(second) => {
                if !source.lora_files().is_empty() {
                    return Err(crate::pipelines::argument(format!(
                        "{}: LoRAs on a two-expert model (Wan 2.2 A14B) are not supported yet",
                        path.display()
                    )));
                }
                let expert = |part: Part<WanTransformerConfig>| ExpertWeights {
                    weights: Weights::new(part.weights, gpu.precision()),
                    config: part.config,
                };
                let experts = [expert(tr), expert(second)];
                let in_channels = experts[0].config.in_channels;
                let (boundary, shift) = published_a14b(in_channels != files.vae()?.config.z_dim);
                super::experts::check_pair(path, &experts[0], &experts[1], boundary)?;
                Denoiser::Two(Box::new(experts), boundary, shift)
            }
        };
        let tokenizer = files.tokenizer()?;
        let te = files.text_encoder()?;
        crate::pipelines::check_vocabulary(
            tokenizer.path(),
            tokenizer.max_id(),
            Path::new(&files.text_encoder),
            te.config.vocab_size,
        )?;
        let bytes = std::fs::metadata(&files.text_encoder).map_or(0, |m| m.len());
        let residency = match bytes > STREAM_TEXT_ENCODER_ABOVE {
            true => BlockResidency::Streamed,
            false => BlockResidency::Resident,
        };
        let text_encoder = UMT5EncoderModel::new(
            gpu,
            &Weights::new(te.weights, gpu.precision()),
            te.config,
            residency,
        )?;
        let mut scheduler = published_scheduler();
        let transformer = match denoiser {
            Denoiser::One(tr) => Experts::single(WanTransformer3DModel::new(
                gpu,
                &Weights::new(tr.weights, gpu.precision()),
                tr.config,
                BlockResidency::Resident,
            )?),
            Denoiser::Two(experts, boundary, shift) => {
                scheduler["flow_shift"] = json!(shift);
                Experts::pair(gpu, *experts, boundary)?
            }
        };
        let vae = files.vae()?;
        let vae =
            AutoencoderKLWan::new(gpu, &Weights::new(vae.weights, gpu.precision()), vae.config)?;
        let image = match files.image_encoder()? {
            Some(part) => Some(super::image::ImageConditioning::from_part(gpu, part)?),
            None => None,
        };
        let scheduler_config = SchedulerConfig::from_json(scheduler, path)?;
        let mut wan = Self::assemble(
            path.to_path_buf(),
            tokenizer,
            text_encoder,
            transformer,
            vae,
            image,
            scheduler_config,
            path.to_path_buf(),
            // The prompt cache keys entries on a text encoder folder's
            // files: a single file has none yet, so nothing is cached.
            None,
        )?;
        // Only TI2V-5B pairs its transformer with the Wan 2.2 VAE (the
        // A14B experts use Wan 2.1's): such a pair runs as TI2V.
        let ti2v = wan.vae.config.is_residual;
        wan.set_expand_timesteps(ti2v)?;
        Ok(wan)
    }
}
