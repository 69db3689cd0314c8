//! DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12
//! with η = 0): diffusers' `DDIMScheduler`.

use super::config::SchedulerConfig;
use super::schedule::{np_arange, np_linspace, np_round, NoiseSchedule};
use super::{
    alpha_cumprod_at, argument, noise_to_alpha, program_axpby, Algorithm, Prediction, Spacing,
    StepProgram,
};
use crate::error::{LoadError, Result};
use crate::ops::latent::ElementProgram;

pub(crate) struct Ddim {
    schedule: NoiseSchedule,
    /// ᾱ used for the step past t = 0 (`set_alpha_to_one`: 1, else ᾱ_0).
    final_alpha_cumprod: f32,
    prediction: Prediction,
    /// `clip_sample_range` where `clip_sample` is on.
    clip: Option<f32>,
    spacing: Spacing,
    steps_offset: i64,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self, LoadError> {
        let schedule = NoiseSchedule::from_config(cfg, "linear", 0.0001, 0.02, false)?;
        cfg.require_false(
            "thresholding",
            "dynamic thresholding is for pixel-space models",
        )?;
        let final_alpha_cumprod = if cfg.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let clip = clip_range(cfg, true)?;
        Ok(Self {
            final_alpha_cumprod,
            prediction: Prediction::from_config(cfg, &["epsilon", "sample", "v_prediction"])?,
            clip,
            spacing: Spacing::from_config(cfg, "leading")?,
            steps_offset: cfg.i64_or("steps_offset", 0)?,
            schedule,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        })
    }
}

/// `clip_sample_range` where `clip_sample` (default `default`) is on.
pub(crate) fn clip_range(cfg: &SchedulerConfig, default: bool) -> Result<Option<f32>, LoadError> {
    if !cfg.bool_or("clip_sample", default)? {
        return Ok(None);
    }
    let range = cfg.f64_or("clip_sample_range", 1.0)?;
    if range.is_nan() || range < 0.0 {
        return Err(cfg.error(format!(
            "`clip_sample_range` is {range}, expected a non-negative number"
        )));
    }
    Ok(Some(range as f32))
}

/// DDIM's timesteps for `steps` of `train` training steps: linspace rounds
/// an even grid over [0, train−1], leading counts up from 0 by train÷steps
/// (plus `steps_offset`), trailing counts down from `train` by train/steps.
fn integer_timesteps(spacing: Spacing, train: usize, steps: usize, offset: i64) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps, true)
            .into_iter()
            .rev()
            .map(|t| np_round(t) as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (train / steps) as i64;
            (0..steps as i64)
                .rev()
                .map(|i| i * ratio + offset)
                .collect()
        }
        Spacing::Trailing => np_arange(train as f64, 0.0, -(train as f64 / steps as f64))
            .into_iter()
            .map(|t| np_round(t) as i64 - 1)
            .collect(),
    }
}

impl Algorithm for Ddim {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps()
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.num_train_timesteps();
        let timesteps = integer_timesteps(self.spacing, train, steps, self.steps_offset);
        if let Some(t) = timesteps.iter().find(|&&t| t < 0 || t >= train as i64) {
            return Err(argument(format!(
                "{steps} steps with {:?} spacing and steps_offset {} give timestep {t}, outside \
                 0..{train}; choose another step count",
                self.spacing, self.steps_offset
            )));
        }
        self.num_inference_steps = steps;
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step_program(&mut self, step: usize) -> StepProgram {
        let train = self.num_train_timesteps();
        let t = self.timesteps[step] as i64;
        // diffusers steps to t − train÷steps, which is not always the next
        // listed timestep (linspace and trailing spacing, steps_offset).
        let prev_t = t - (train / self.num_inference_steps) as i64;
        let ac = &self.schedule.alphas_cumprod;
        let alpha_t = ac[t as usize];
        let alpha_prev = if prev_t >= 0 {
            ac[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), beta_t.sqrt());

        let mut p = ElementProgram::new();
        let x = p.input(StepProgram::SAMPLE);
        let m = p.input(StepProgram::MODEL_OUTPUT);
        let (sa, sb) = (p.constant(sqrt_alpha), p.constant(sqrt_beta));
        let (x0, eps) = match self.prediction {
            // (x − √β·ε) / √α
            Prediction::Epsilon => {
                let t = p.mul(sb, m);
                let d = p.sub(x, t);
                (p.div(d, sa), m)
            }
            // ε = (x − √α·x₀) / √β
            Prediction::Sample => {
                let t = p.mul(sa, m);
                let d = p.sub(x, t);
                (m, p.div(d, sb))
            }
            // x₀ = √α·x − √β·v, ε = √α·v + √β·x
            Prediction::V => {
                let a = p.mul(sa, x);
                let b = p.mul(sb, m);
                let x0 = p.sub(a, b);
                let c = p.mul(sa, m);
                let d = p.mul(sb, x);
                (x0, p.add(c, d))
            }
        };
        let x0 = match self.clip {
            Some(range) => {
                let bound = p.constant(range);
                p.clamp(x0, bound)
            }
            None => x0,
        };
        // η = 0: no variance term, but diffusers still forms σ_t = 0·√var,
        // which is NaN where var is.
        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = 0.0 * variance.sqrt();
        let direction = (1.0 - alpha_prev - std_dev * std_dev).sqrt();
        let sqrt_alpha_prev = alpha_prev.sqrt();
        let prev = program_axpby(&mut p, sqrt_alpha_prev, x0, direction, eps);
        p.store(StepProgram::PREV_SAMPLE, prev);
        p.store(StepProgram::PRED_ORIGINAL, x0);
        StepProgram::new(p)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        let alpha = alpha_cumprod_at(&self.schedule.alphas_cumprod, timestep)?;
        Ok(noise_to_alpha(original, noise, alpha))
    }
}
