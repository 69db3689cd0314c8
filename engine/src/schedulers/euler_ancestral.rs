//! Ancestral sampling with Euler steps (Karras et al. 2022's k-diffusion
//! `sample_euler_ancestral`): each step goes down to σ_down deterministically
//! and adds fresh noise of size σ_up, with σ_down² + σ_up² = σ_next².
//! diffusers' `EulerAncestralDiscreteScheduler`.

use super::config::SchedulerConfig;
use super::euler::{
    add_noise_at_sigma, euler_update, float_timesteps, init_noise_sigma, interpolated_sigmas,
    predict_original, scale_by_sigma,
};
use super::schedule::NoiseSchedule;
use super::{Algorithm, Prediction, Spacing, StepProgram};
use crate::error::{LoadError, Result};
use crate::ops::latent::ElementProgram;

pub(crate) struct EulerAncestral {
    schedule: NoiseSchedule,
    prediction: Prediction,
    spacing: Spacing,
    steps_offset: i64,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self, LoadError> {
        Ok(Self {
            schedule: NoiseSchedule::from_config(cfg, "linear", 0.0001, 0.02, true)?,
            // diffusers raises NotImplementedError for "sample".
            prediction: Prediction::from_config(cfg, &["epsilon", "v_prediction"])?,
            spacing: Spacing::from_config(cfg, "linspace")?,
            steps_offset: cfg.i64_or("steps_offset", 0)?,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }
}

impl Algorithm for EulerAncestral {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps()
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.num_train_timesteps();
        let timesteps = float_timesteps(self.spacing, train, steps, self.steps_offset);
        let mut sigmas = interpolated_sigmas(&timesteps, &self.schedule.train_sigmas());
        sigmas.push(0.0);
        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.timesteps = timesteps.into_iter().map(f64::from).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        init_noise_sigma(&self.sigmas, self.spacing)
    }

    fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32> {
        scale_by_sigma(sample, self.sigmas[step])
    }

    fn needs_noise(&self, _step: usize) -> bool {
        // Drawn in every step, the last included (where σ_up = 0).
        true
    }

    fn input_divisor(&self, step: usize) -> f32 {
        let sigma = self.sigmas[step];
        (sigma * sigma + 1.0).sqrt()
    }

    fn step_program(&mut self, step: usize) -> StepProgram {
        let sigma = self.sigmas[step];
        let mut p = ElementProgram::new();
        let x = p.input(StepProgram::SAMPLE);
        let m = p.input(StepProgram::MODEL_OUTPUT);
        let noise = p.input(StepProgram::NOISE);
        let x0 = predict_original(&mut p, self.prediction, m, x, sigma);
        let sigma_to = self.sigmas[step + 1];
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let prev = euler_update(&mut p, x, x0, sigma, dt);
        // + n·σ_up
        let up = p.constant(sigma_up);
        let n = p.mul(noise, up);
        let prev = p.add(prev, n);
        p.store(StepProgram::PREV_SAMPLE, prev);
        p.store(StepProgram::PRED_ORIGINAL, x0);
        StepProgram::new(p)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        add_noise_at_sigma(&self.timesteps, &self.sigmas, original, noise, timestep)
    }
}
