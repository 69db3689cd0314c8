//! Latent consistency models (Luo et al. 2023, "Latent Consistency Models",
//! algorithm 1 for multistep sampling): each step predicts the clean latents
//! through the consistency boundary condition and re-noises them to the next
//! timestep. diffusers' `LCMScheduler`, as AnimateLCM uses it.

use super::config::SchedulerConfig;
use super::ddim::clip_range;
use super::schedule::{np_linspace, NoiseSchedule};
use super::{
    alpha_cumprod_at, argument, noise_to_alpha, program_axpby, Algorithm, Prediction, StepProgram,
};
use crate::error::{LoadError, Result};
use crate::ops::latent::ElementProgram;

pub(crate) struct Lcm {
    schedule: NoiseSchedule,
    final_alpha_cumprod: f32,
    /// The distillation schedule's length (`original_inference_steps`).
    original_steps: usize,
    prediction: Prediction,
    clip: Option<f32>,
    timestep_scaling: f32,
    timesteps: Vec<f64>,
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self, LoadError> {
        // LCMScheduler's own defaults are SD's scaled_linear betas; AnimateLCM
        // loads it over an AnimateDiff config with "linear".
        let schedule = NoiseSchedule::from_config(cfg, "scaled_linear", 0.00085, 0.012, false)?;
        cfg.require_false(
            "thresholding",
            "dynamic thresholding is for pixel-space models",
        )?;
        let final_alpha_cumprod = if cfg.bool_or("set_alpha_to_one", true)? {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        let original_steps = cfg.count_or("original_inference_steps", 50)?;
        if original_steps > schedule.num_train_timesteps() {
            return Err(cfg.error(format!(
                "`original_inference_steps` {original_steps} exceeds `num_train_timesteps` {}",
                schedule.num_train_timesteps()
            )));
        }
        Ok(Self {
            final_alpha_cumprod,
            original_steps,
            prediction: Prediction::from_config(cfg, &["epsilon", "sample", "v_prediction"])?,
            clip: clip_range(cfg, false)?,
            timestep_scaling: cfg.f64_or("timestep_scaling", 10.0)? as f32,
            schedule,
            timesteps: Vec::new(),
        })
    }

    /// The consistency model's boundary-condition weights at `timestep`
    /// (c_skip → 1 and c_out → 0 as t → 0), with σ_data = 0.5, in float32.
    fn boundary_scalings(&self, timestep: f32) -> (f32, f32) {
        let sigma_data_sq = 0.25f32;
        let scaled = timestep * self.timestep_scaling;
        let denom = scaled * scaled + sigma_data_sq;
        // torch computes `0.25 / tensor` as reciprocal(tensor) * 0.25.
        let c_skip = (1.0 / denom) * sigma_data_sq;
        let c_out = scaled / denom.sqrt();
        (c_skip, c_out)
    }
}

impl Algorithm for Lcm {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps()
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        if steps > self.original_steps {
            return Err(argument(format!(
                "LCM takes at most original_inference_steps = {} steps, not {steps}",
                self.original_steps
            )));
        }
        // The distillation schedule: every k-th training step, k = T ÷ the
        // original step count, counted from k − 1 and listed high to low;
        // inference takes evenly spaced entries of it.
        let k = self.num_train_timesteps() / self.original_steps;
        let origin: Vec<usize> = (1..=self.original_steps).rev().map(|i| i * k - 1).collect();
        self.timesteps = np_linspace(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|i| origin[i.floor() as usize] as f64)
            .collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn needs_noise(&self, step: usize) -> bool {
        step + 1 < self.timesteps.len()
    }

    fn step_program(&mut self, step: usize) -> StepProgram {
        let t = self.timesteps[step];
        let prev_t = self.timesteps.get(step + 1).copied().unwrap_or(t);
        let ac = &self.schedule.alphas_cumprod;
        let alpha_t = ac[t as usize];
        let alpha_prev = if prev_t >= 0.0 {
            ac[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), (1.0 - alpha_t).sqrt());
        let (c_skip, c_out) = self.boundary_scalings(t as f32);

        let mut p = ElementProgram::new();
        let x = p.input(StepProgram::SAMPLE);
        let m = p.input(StepProgram::MODEL_OUTPUT);
        let x0 = match self.prediction {
            // (x − √β·ε) / √α
            Prediction::Epsilon => {
                let (sa, sb) = (p.constant(sqrt_alpha), p.constant(sqrt_beta));
                let t = p.mul(sb, m);
                let d = p.sub(x, t);
                p.div(d, sa)
            }
            Prediction::Sample => m,
            Prediction::V => {
                let (sa, sb) = (p.constant(sqrt_alpha), p.constant(sqrt_beta));
                let a = p.mul(sa, x);
                let b = p.mul(sb, m);
                p.sub(a, b)
            }
        };
        let x0 = match self.clip {
            Some(range) => {
                let bound = p.constant(range);
                p.clamp(x0, bound)
            }
            None => x0,
        };
        let denoised = program_axpby(&mut p, c_out, x0, c_skip, x);
        // Re-noised to the next timestep, except after the last step:
        // √ᾱ·denoised + √(1−ᾱ)·n (`noise_to_alpha`).
        let prev = if self.needs_noise(step) {
            let noise = p.input(StepProgram::NOISE);
            program_axpby(
                &mut p,
                alpha_prev.sqrt(),
                denoised,
                (1.0 - alpha_prev).sqrt(),
                noise,
            )
        } else {
            denoised
        };
        p.store(StepProgram::PREV_SAMPLE, prev);
        p.store(StepProgram::PRED_ORIGINAL, x0);
        p.store(StepProgram::DENOISED, denoised);
        StepProgram::new(p)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        let alpha = alpha_cumprod_at(&self.schedule.alphas_cumprod, timestep)?;
        Ok(noise_to_alpha(original, noise, alpha))
    }
}
