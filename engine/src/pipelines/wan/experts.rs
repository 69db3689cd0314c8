//! The denoiser of a Wan model: one transformer, or Wan 2.2 A14B's two
//! experts as diffusers' `WanPipeline` / `WanImageToVideoPipeline` run them
//! with `transformer_2` and `boundary_ratio`: `transformer` (trained on
//! high noise) while t ≥ boundary_ratio · num_train_timesteps, then
//! `transformer_2` (low noise), each step under its own guidance scale
//! (`guidance_scale`, `guidance_scale_2`; the second defaults to the first).
//!
//! Only one expert is on the device at a time: before the other one loads,
//! the resident one is dropped and the pool's free buffers go back to the
//! driver, so the peak is one expert's weights (an A14B expert is 28 GB in
//! f16), not two. The step loop asks for the expert of each step with
//! [`Experts::make_resident`]; a run that starts while the low-noise
//! expert is resident (the end of the previous run) swaps back first.

use std::path::Path;
use std::sync::Mutex;

use crate::error::{LoadError, Result};
use crate::gpu::Gpu;
use crate::models::source::ModelSource;
use crate::models::umt5::BlockResidency;
use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use crate::pipelines::controls::{Control, Controls};
use crate::pipelines::events::{emit, Event};
use crate::pipelines::Request;
use crate::schedulers::SchedulerConfig;
use crate::tensor::Tensor;
use crate::weights::{WeightSet, Weights};

/// The experts' names, as diffusers' folders and the case sets call them.
pub const EXPERT_NAMES: [&str; 2] = ["transformer", "transformer_2"];

/// A two-expert text-to-video model (Wan2.2-T2V-A14B): its LoRAs would
/// need one file per expert, which Motif does not pair yet.
pub const CONTROLS_A14B: Controls = Controls {
    supported: &[
        Control::Shift,
        Control::InitialLatents,
        Control::SecondGuidance,
    ],
    schedulers: super::CONTROLS.schedulers,
};

/// A two-expert image-to-video model (Wan2.2-I2V-A14B): the still is
/// required; it has no image encoder, the still reaches it through the
/// VAE-encoded conditioning video alone.
pub const CONTROLS_A14B_I2V: Controls = Controls {
    supported: &[
        Control::Shift,
        Control::InitialLatents,
        Control::Image,
        Control::SecondGuidance,
    ],
    schedulers: super::CONTROLS.schedulers,
};

/// One expert's weights (opened, not uploaded) and config.
pub(super) struct ExpertWeights {
    pub weights: Weights,
    pub config: WanTransformerConfig,
}

/// The second expert and where the denoiser switches to it.
struct Pair {
    boundary_ratio: f64,
    experts: [ExpertWeights; 2],
}

/// The expert on the device, if any (none after a failed load).
struct Resident {
    expert: usize,
    model: Option<WanTransformer3DModel>,
}

/// The transformer(s) of a Wan model.
pub(super) struct Experts {
    /// The (first) expert's config; a second expert's is equal in every
    /// shape (checked at load).
    pub config: WanTransformerConfig,
    pair: Option<Pair>,
    resident: Mutex<Resident>,
}

impl Experts {
    /// A model with one transformer (Wan 2.1, Wan 2.2 TI2V-5B).
    pub fn single(model: WanTransformer3DModel) -> Self {
        Experts {
            config: model.config.clone(),
            pair: None,
            resident: Mutex::new(Resident {
                expert: 0,
                model: Some(model),
            }),
        }
    }

    /// Wan 2.2 A14B, its experts checked by [`check_pair`]: the first is
    /// loaded, the second when the step loop reaches the boundary.
    pub fn pair(gpu: &Gpu, experts: [ExpertWeights; 2], boundary_ratio: f64) -> Result<Self> {
        let first = WanTransformer3DModel::new(
            gpu,
            &experts[0].weights,
            experts[0].config.clone(),
            BlockResidency::Resident,
        )?;
        Ok(Experts {
            config: first.config.clone(),
            pair: Some(Pair {
                boundary_ratio,
                experts,
            }),
            resident: Mutex::new(Resident {
                expert: 0,
                model: Some(first),
            }),
        })
    }

    /// Whether this is a two-expert model.
    pub fn is_pair(&self) -> bool {
        self.pair.is_some()
    }

    /// The timestep at and above which the first expert denoises
    /// (diffusers' `boundary_ratio * scheduler.config.num_train_timesteps`),
    /// None for a single transformer.
    pub fn boundary_timestep(&self, scheduler: &SchedulerConfig) -> Result<Option<f64>> {
        let Some(pair) = &self.pair else {
            return Ok(None);
        };
        let train = scheduler.count_or("num_train_timesteps", 1000)?;
        Ok(Some(pair.boundary_ratio * train as f64))
    }

    /// Which expert denoises at timestep `t` (0: `transformer`, 1:
    /// `transformer_2`), and its guidance scale. diffusers compares
    /// `t >= boundary_timestep` between a timestep tensor and a Python
    /// float, which torch does in float32: so does this.
    pub fn expert_at(&self, t: f64, boundary: Option<f64>, req: &Request) -> (usize, f32) {
        match boundary {
            Some(b) if (t as f32) < (b as f32) => (1, req.guidance_2.unwrap_or(req.guidance)),
            _ => (0, req.guidance),
        }
    }

    /// Puts `expert` on the device (a no-op when it is there): the other
    /// one is freed first and an [`Event::Expert`] says which loads from
    /// step `step`.
    pub fn make_resident(
        &self,
        gpu: &Gpu,
        expert: usize,
        step: usize,
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<()> {
        let Some(pair) = &self.pair else {
            return Ok(());
        };
        // A poisoned lock only means a panic elsewhere; the state is
        // consistent (the model is None until a load completes).
        let mut resident = self.resident.lock().unwrap_or_else(|p| p.into_inner());
        if resident.expert == expert && resident.model.is_some() {
            return Ok(());
        }
        let freed = resident.model.take().map(|_| EXPERT_NAMES[resident.expert]);
        gpu.synchronize()?;
        gpu.trim_pool();
        emit(
            events,
            Event::Expert {
                name: EXPERT_NAMES[expert],
                freed,
                step,
            },
        )?;
        let e = &pair.experts[expert];
        resident.expert = expert;
        resident.model = Some(WanTransformer3DModel::new(
            gpu,
            &e.weights,
            e.config.clone(),
            BlockResidency::Resident,
        )?);
        Ok(())
    }

    /// The resident expert's prediction (see
    /// [`WanTransformer3DModel::forward`]).
    pub fn forward(
        &self,
        gpu: &Gpu,
        hidden_states: &Tensor,
        timesteps: &[f32],
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
    ) -> Result<Tensor> {
        let resident = self.resident.lock().unwrap_or_else(|p| p.into_inner());
        let model = resident.model.as_ref().ok_or_else(|| {
            crate::pipelines::argument(format!(
                "the expert `{}` failed to load in an earlier run; generate again to retry",
                EXPERT_NAMES[resident.expert]
            ))
        })?;
        model.forward(
            gpu,
            hidden_states,
            timesteps,
            encoder_hidden_states,
            encoder_hidden_states_image,
        )
    }
}

/// The second expert of a diffusers folder whose model_index.json names
/// `transformer_2` and a `boundary_ratio` (None for a folder with
/// neither), checked against the first ([`check_pair`]) without reading
/// any weight data.
pub(super) fn open_second(
    gpu: &Gpu,
    dir: &Path,
    index: &super::WanIndex,
    source: &ModelSource,
    first: &ExpertWeights,
) -> Result<Option<(ExpertWeights, f64)>> {
    let index_path = dir.join("model_index.json");
    let has_second = super::present(&index.transformer_2);
    let boundary_ratio = match (has_second, index.boundary_ratio) {
        (false, None) => return Ok(None),
        (true, Some(b)) => b,
        (true, None) => {
            return Err(LoadError::Config {
                path: index_path,
                message: "names `transformer_2` (a second expert) but no `boundary_ratio`: a Wan \
                          2.2 A14B folder needs both (the timestep share where the second expert \
                          takes over)"
                    .into(),
            }
            .into())
        }
        (false, Some(b)) => {
            return Err(LoadError::Config {
                path: index_path,
                message: format!(
                    "sets boundary_ratio {b} but names no `transformer_2`: the low-noise expert \
                     of this Wan 2.2 A14B model is missing (`transformer_2/` with its \
                     config.json and weights, named in model_index.json)"
                ),
            }
            .into())
        }
    };
    if source.loras().next().is_some() {
        return Err(crate::pipelines::argument(format!(
            "{}: LoRAs on a two-expert model (Wan 2.2 A14B) are not supported yet",
            dir.display()
        )));
    }
    let second_dir = super::component(dir, "transformer_2", "the low-noise expert")?;
    let second = ExpertWeights {
        config: WanTransformerConfig::load(&second_dir.join("config.json"))?,
        weights: Weights::new(
            std::sync::Arc::new(WeightSet::open_dir(&second_dir)?),
            gpu.precision(),
        ),
    };
    check_pair(dir, first, &second, boundary_ratio)?;
    Ok(Some((second, boundary_ratio)))
}

/// Before any GPU work: the boundary, the experts' shapes equal, and every
/// weight of both present with its shape (the second loads mid-run).
pub(super) fn check_pair(
    model: &Path,
    first: &ExpertWeights,
    second: &ExpertWeights,
    boundary_ratio: f64,
) -> Result<()> {
    check_boundary(model, boundary_ratio)?;
    check_same_shapes(model, &first.config, &second.config)?;
    for e in [first, second] {
        WanTransformer3DModel::check_weights(&e.weights, &e.config)?;
    }
    Ok(())
}

/// diffusers takes any float; a boundary outside (0, 1) would leave one
/// expert unused whatever the steps, which is never what a checkpoint
/// means.
pub(super) fn check_boundary(model: &Path, boundary_ratio: f64) -> Result<(), LoadError> {
    if boundary_ratio.is_finite() && boundary_ratio > 0.0 && boundary_ratio < 1.0 {
        return Ok(());
    }
    Err(LoadError::Config {
        path: model.to_path_buf(),
        message: format!(
            "boundary_ratio {boundary_ratio} must lie strictly between 0 and 1 (the share of the \
             timesteps, from the noisiest, that `transformer` denoises before `transformer_2`)"
        ),
    })
}

/// The two experts must be interchangeable in the step loop: every field
/// that shapes a weight or an input equal.
pub(super) fn check_same_shapes(
    model: &Path,
    a: &WanTransformerConfig,
    b: &WanTransformerConfig,
) -> Result<(), LoadError> {
    let fields = |c: &WanTransformerConfig| -> Vec<(&'static str, String)> {
        vec![
            ("in_channels", c.in_channels.to_string()),
            ("out_channels", c.out_channels().to_string()),
            ("num_layers", c.num_layers.to_string()),
            ("num_attention_heads", c.num_attention_heads.to_string()),
            ("attention_head_dim", c.attention_head_dim.to_string()),
            ("ffn_dim", c.ffn_dim.to_string()),
            ("text_dim", c.text_dim.to_string()),
            ("freq_dim", c.freq_dim.to_string()),
            ("patch_size", format!("{:?}", c.patch_size)),
            ("image_dim", format!("{:?}", c.image_dim)),
            ("added_kv_proj_dim", format!("{:?}", c.added_kv_proj_dim)),
            ("pos_embed_seq_len", format!("{:?}", c.pos_embed_seq_len)),
            ("cross_attn_norm", c.cross_attn_norm.to_string()),
        ]
    };
    for ((name, va), (_, vb)) in fields(a).into_iter().zip(fields(b)) {
        if va != vb {
            return Err(LoadError::Config {
                path: model.to_path_buf(),
                message: format!(
                    "the experts differ in shape: `transformer` has {name} {va}, `transformer_2` \
                     {vb} (both experts of a Wan 2.2 A14B model have the same shapes)"
                ),
            });
        }
    }
    Ok(())
}
