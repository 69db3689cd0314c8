//! Euler's method on the rectified-flow ODE dx/dσ = v (Liu et al. 2022,
//! "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow
//! Transformers", eq. 23 for the shift): diffusers'
//! `FlowMatchEulerDiscreteScheduler` with a fixed shift, the sampler Wan's
//! pipelines accept besides UniPC.
//!
//! x_σ = (1 − σ)·x₀ + σ·ε and the model predicts v = ε − x₀, so one step is
//! x + (σ_next − σ)·v and the timestep the model sees is σ·1000 as a float.

use super::config::SchedulerConfig;
use super::schedule::np_linspace;
use super::{flow_add_noise, Algorithm, StepProgram};
use crate::error::{LoadError, Result};
use crate::ops::latent::ElementProgram;

pub(crate) struct FlowMatchEuler {
    num_train_timesteps: usize,
    shift: f64,
    /// The ends of the training σ table, already shifted once at
    /// construction (diffusers' `sigma_max`, `sigma_min`).
    sigma_max: f32,
    sigma_min: f32,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
}

/// σ' = s·σ / (1 + (s − 1)·σ): the resolution-dependent shift of SD3 §5.3.2,
/// in float64 as diffusers applies it to numpy schedules.
pub(crate) fn shift_sigma(shift: f64, sigma: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// The same shift on a float32 torch tensor: the Python float `shift` and
/// `shift - 1` are each rounded to float32 before the float32 arithmetic.
fn shift_sigma_f32(shift: f64, sigma: f32) -> f32 {
    (shift as f32) * sigma / (1.0 + ((shift - 1.0) as f32) * sigma)
}

/// The shift a flow-matching scheduler uses: the caller's override, else
/// `key` from the config, else the other flow class's name for it. diffusers'
/// `from_config` would ignore a key of the other class (FlowMatchEuler reads
/// `shift`, UniPC `flow_shift`) and fall back to 1.0, which on Wan's configs
/// (flow_shift 3 or 5) silently gives another schedule: the model's own
/// shift is what the user of either sampler means.
pub(crate) fn flow_shift(
    cfg: &SchedulerConfig,
    key: &str,
    other: &str,
    shift: Option<f64>,
) -> Result<f64, LoadError> {
    let value = match shift {
        Some(s) => s,
        None => match cfg.opt_f64(key)? {
            Some(s) => s,
            None => cfg.f64_or(other, 1.0)?,
        },
    };
    if !(value.is_finite() && value > 0.0) {
        return Err(cfg.error(format!(
            "shift {value}: expected a positive number (`{key}`, or --shift)"
        )));
    }
    Ok(value)
}

impl FlowMatchEuler {
    /// `shift` overrides the config's `shift` (`--shift`).
    pub fn new(cfg: &SchedulerConfig, shift: Option<f64>) -> Result<Self, LoadError> {
        let num_train_timesteps = cfg.count_or("num_train_timesteps", 1000)?;
        let shift = flow_shift(cfg, "shift", "flow_shift", shift)?;
        cfg.require_false(
            "use_dynamic_shifting",
            "the shift then depends on the image size through `mu`; set `shift` instead",
        )?;
        cfg.require_false("invert_sigmas", "it is for models trained on 1 − σ")?;
        cfg.require_false(
            "stochastic_sampling",
            "use the deterministic Euler step of the pipelines",
        )?;
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            cfg.require_false(key, "the shifted linear schedule is implemented")?;
        }
        if let Some(v) = cfg.opt_f64("shift_terminal")? {
            if v != 0.0 {
                return Err(cfg.error(format!(
                    "`shift_terminal` is {v}, which Motif does not support (null)"
                )));
            }
        }
        // The training table runs σ = t/N for t = N … 1 (its ends 1 and
        // 1/N), shifted in float32: set_timesteps spaces its grid between the
        // shifted ends.
        let sigma_max = shift_sigma_f32(shift, 1.0);
        let sigma_min = shift_sigma_f32(shift, 1.0 / num_train_timesteps as f32);
        Ok(Self {
            num_train_timesteps,
            shift,
            sigma_max,
            sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }
}

impl Algorithm for FlowMatchEuler {
    fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let n = self.num_train_timesteps as f64;
        // diffusers spaces timesteps between the already shifted ends and
        // then shifts again: the schedule it runs is shifted twice.
        let grid = np_linspace(
            self.sigma_max as f64 * n,
            self.sigma_min as f64 * n,
            steps,
            true,
        );
        self.sigmas = grid
            .iter()
            .map(|&t| shift_sigma(self.shift, t / n) as f32)
            .collect();
        // Timesteps are σ·N in float32 (torch), fractional.
        self.timesteps = self
            .sigmas
            .iter()
            .map(|&s| (s * self.num_train_timesteps as f32) as f64)
            .collect();
        self.sigmas.push(0.0);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step_program(&mut self, step: usize) -> StepProgram {
        let sigma = self.sigmas[step];
        let dt = self.sigmas[step + 1] - sigma;
        let mut p = ElementProgram::new();
        let x = p.input(StepProgram::SAMPLE);
        let v = p.input(StepProgram::MODEL_OUTPUT);
        // x + dt·v
        let dt = p.constant(dt);
        let t = p.mul(dt, v);
        let prev = p.add(x, t);
        // x₀ = x − σ·v (diffusers' `convert_model_output` for flow prediction)
        let s = p.constant(sigma);
        let t = p.mul(s, v);
        let x0 = p.sub(x, t);
        p.store(StepProgram::PREV_SAMPLE, prev);
        p.store(StepProgram::PRED_ORIGINAL, x0);
        StepProgram::new(p)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        flow_add_noise(
            &self.timesteps,
            &self.sigmas,
            original,
            noise,
            timestep,
            false,
        )
    }
}
