//! Euler's method on the probability-flow ODE in σ (Karras et al. 2022,
//! algorithm 2 without churn): diffusers' `EulerDiscreteScheduler`.

use super::config::SchedulerConfig;
use super::schedule::{
    karras_sigmas, np_arange, np_interp_unit_grid, np_linspace, np_round, sigma_to_t, NoiseSchedule,
};
use super::{argument, index_for_timestep, Algorithm, Prediction, Spacing, StepProgram};
use crate::error::{LoadError, Result};
use crate::ops::latent::{ElementProgram, Value};

pub(crate) struct Euler {
    schedule: NoiseSchedule,
    prediction: Prediction,
    spacing: Spacing,
    steps_offset: i64,
    karras: bool,
    /// Karras range overrides (`sigma_min`, `sigma_max`).
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    /// `final_sigmas_type = "sigma_min"`: end at σ_0 instead of 0.
    final_sigma_min: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, karras: Option<bool>) -> Result<Self, LoadError> {
        let schedule = NoiseSchedule::from_config(cfg, "linear", 0.0001, 0.02, true)?;
        cfg.choice("interpolation_type", "linear", &["linear"])?;
        cfg.require_false("use_exponential_sigmas", "use Karras sigmas or none")?;
        cfg.require_false("use_beta_sigmas", "use Karras sigmas or none")?;
        let prediction = Prediction::from_config(
            cfg,
            &["epsilon", "v_prediction", "sample", "original_sample"],
        )?;
        let timestep_type = cfg.choice("timestep_type", "discrete", &["discrete", "continuous"])?;
        if timestep_type == "continuous" && prediction == Prediction::V {
            return Err(cfg.error(
                "`timestep_type` \"continuous\" with v_prediction (EDM-style timesteps) is not supported; \
                 use \"discrete\"",
            ));
        }
        Ok(Self {
            prediction,
            spacing: Spacing::from_config(cfg, "linspace")?,
            steps_offset: cfg.i64_or("steps_offset", 0)?,
            karras: match karras {
                Some(k) => k,
                None => cfg.bool_or("use_karras_sigmas", false)?,
            },
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
            final_sigma_min: cfg.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])?
                == "sigma_min",
            schedule,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }
}

/// The float32 timesteps Euler and Euler ancestral space out: linspace is an
/// even (fractional) grid over [0, train−1]; leading and trailing are as
/// DDIM's, as floats.
pub(crate) fn float_timesteps(
    spacing: Spacing,
    train: usize,
    steps: usize,
    offset: i64,
) -> Vec<f32> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps, true)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f32 + offset as f32)
                .collect()
        }
        Spacing::Trailing => np_arange(train as f64, 0.0, -(train as f64 / steps as f64))
            .into_iter()
            .map(|t| np_round(t) as f32 - 1.0)
            .collect(),
    }
}

/// σ at fractional timesteps: numpy's linear interpolation of the float32
/// training σ table, in float64.
pub(crate) fn interpolated_sigmas(timesteps: &[f32], train_sigmas: &[f32]) -> Vec<f64> {
    timesteps
        .iter()
        .map(|&t| np_interp_unit_grid(t as f64, train_sigmas))
        .collect()
}

/// diffusers' `init_noise_sigma` for the σ-based schedulers: σ_max where the
/// schedule starts at the last training step (linspace, trailing), else
/// √(σ_max² + 1).
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: Spacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// x / √(σ² + 1): the UNet was trained on unit-variance inputs.
pub(crate) fn scale_by_sigma(sample: &[f32], sigma: f32) -> Vec<f32> {
    let scale = (sigma * sigma + 1.0).sqrt();
    sample.iter().map(|&x| x / scale).collect()
}

/// x₀ from the model output at noise level σ (Euler-type parametrisation,
/// x = x₀ + σ·ε), written into `p`.
pub(crate) fn predict_original(
    p: &mut ElementProgram,
    prediction: Prediction,
    model_output: Value,
    sample: Value,
    sigma: f32,
) -> Value {
    match prediction {
        Prediction::Epsilon => {
            let s = p.constant(sigma);
            let t = p.mul(s, model_output);
            p.sub(sample, t)
        }
        // v·c_out + x / c_in
        Prediction::V => {
            let c_out = p.constant(-sigma / (sigma * sigma + 1.0).sqrt());
            let c_in = p.constant(sigma * sigma + 1.0);
            let a = p.mul(model_output, c_out);
            let b = p.div(sample, c_in);
            p.add(a, b)
        }
        Prediction::Sample => model_output,
    }
}

/// x + (x − x₀)/σ · dt, Euler's step along the ODE's derivative.
pub(crate) fn euler_update(
    p: &mut ElementProgram,
    x: Value,
    x0: Value,
    sigma: f32,
    dt: f32,
) -> Value {
    let d = p.sub(x, x0);
    let s = p.constant(sigma);
    let derivative = p.div(d, s);
    let dt = p.constant(dt);
    let t = p.mul(derivative, dt);
    p.add(x, t)
}

impl Algorithm for Euler {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps()
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train = self.num_train_timesteps();
        let timesteps = float_timesteps(self.spacing, train, steps, self.steps_offset);
        let train_sigmas = self.schedule.train_sigmas();
        let mut sigmas = interpolated_sigmas(&timesteps, &train_sigmas);
        let mut timesteps: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        if self.karras {
            let (Some(&first), Some(&last)) = (sigmas.first(), sigmas.last()) else {
                return Err(argument("no timesteps to derive Karras sigmas from"));
            };
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            sigmas = karras_sigmas(
                self.sigma_min.unwrap_or(last),
                self.sigma_max.unwrap_or(first),
                steps,
            );
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let ac0 = self.schedule.alphas_cumprod[0];
        sigmas.push(if self.final_sigma_min {
            ((1.0 - ac0) / ac0).sqrt() as f64
        } else {
            0.0
        });
        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.timesteps = timesteps.into_iter().map(|t| t as f32 as f64).collect();
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

    fn input_divisor(&self, step: usize) -> f32 {
        let sigma = self.sigmas[step];
        (sigma * sigma + 1.0).sqrt()
    }

    fn step_program(&mut self, step: usize) -> StepProgram {
        // s_churn = 0 (the pipelines' default): σ̂ = σ, no noise.
        let sigma = self.sigmas[step];
        let mut p = ElementProgram::new();
        let x = p.input(StepProgram::SAMPLE);
        let m = p.input(StepProgram::MODEL_OUTPUT);
        let x0 = predict_original(&mut p, self.prediction, m, x, sigma);
        let dt = self.sigmas[step + 1] - sigma;
        let prev = euler_update(&mut p, x, x0, sigma, dt);
        p.store(StepProgram::PREV_SAMPLE, prev);
        p.store(StepProgram::PRED_ORIGINAL, x0);
        StepProgram::new(p)
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        add_noise_at_sigma(&self.timesteps, &self.sigmas, original, noise, timestep)
    }
}

/// x₀ + σ·ε at the σ of `timestep`, which must be one of the schedule's.
pub(crate) fn add_noise_at_sigma(
    timesteps: &[f64],
    sigmas: &[f32],
    original: &[f32],
    noise: &[f32],
    timestep: f64,
) -> Result<Vec<f32>> {
    let index = index_for_timestep(timesteps, timestep).ok_or_else(|| {
        argument(format!(
            "timestep {timestep} is not in the schedule (call set_timesteps and use one of timesteps())"
        ))
    })?;
    let sigma = sigmas[index];
    Ok(original
        .iter()
        .zip(noise)
        .map(|(&x, &n)| x + n * sigma)
        .collect())
}
