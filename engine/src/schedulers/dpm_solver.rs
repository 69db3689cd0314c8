//! DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
//! Sampling of Diffusion Probabilistic Models"): the multistep second-order
//! solver on the data prediction x₀, in λ = log(α/σ). diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"`.

use super::config::SchedulerConfig;
use super::schedule::{
    karras_sigmas, np_arange, np_interp_unit_grid, np_linspace, np_round, sigma_to_t, NoiseSchedule,
};
use super::{
    argument, index_for_timestep, Algorithm, MultistepProgram, Prediction, Spacing, StepProgram,
};
use crate::error::{LoadError, Result};

/// The state slot of the last step's x₀ (the converted model output).
const PREVIOUS_X0: usize = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub(crate) struct DpmSolverMultistep {
    schedule: NoiseSchedule,
    /// 1 or 2 (DPM-Solver++ 2M).
    solver_order: usize,
    prediction: Prediction,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    karras: bool,
    /// `final_sigmas_type = "sigma_min"`: end at σ_0 instead of 0.
    final_sigma_min: bool,
    lambda_min_clipped: f64,
    spacing: Spacing,
    steps_offset: i64,
    /// `squaredcos_cap_v2` keeps fractional Karras timesteps (truncated).
    cosine_schedule: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// Steps run since `set_timesteps`, up to `solver_order`: the second
    /// order needs an earlier x₀ (kept by the [`super::Scheduler`] in state
    /// slot [`PREVIOUS_X0`]).
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    pub fn new(cfg: &SchedulerConfig, karras: Option<bool>) -> Result<Self, LoadError> {
        let schedule = NoiseSchedule::from_config(cfg, "linear", 0.0001, 0.02, true)?;
        let solver_order = cfg.i64_or("solver_order", 2)?;
        if !(1..=2).contains(&solver_order) {
            return Err(cfg.error(format!(
                "`solver_order` is {solver_order}; Motif implements DPM-Solver++ of order 1 and 2"
            )));
        }
        // diffusers maps the deprecated "deis" to dpmsolver++.
        cfg.choice("algorithm_type", "dpmsolver++", &["dpmsolver++", "deis"])?;
        // diffusers maps UniPC's and DEIS's solver types to midpoint.
        let solver_type = match cfg
            .choice(
                "solver_type",
                "midpoint",
                &["midpoint", "heun", "logrho", "bh1", "bh2"],
            )?
            .as_str()
        {
            "heun" => SolverType::Heun,
            _ => SolverType::Midpoint,
        };
        cfg.require_false(
            "thresholding",
            "dynamic thresholding is for pixel-space models",
        )?;
        for key in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
        ] {
            cfg.require_false(key, "use Karras sigmas or none")?;
        }
        if let Some(v) = cfg.opt_string("variance_type")? {
            return Err(cfg.error(format!(
                "`variance_type` is \"{v}\"; Motif supports models that predict no variance (null)"
            )));
        }
        let beta_schedule = cfg.choice(
            "beta_schedule",
            "linear",
            &["linear", "scaled_linear", "squaredcos_cap_v2"],
        )?;
        Ok(Self {
            solver_order: solver_order as usize,
            prediction: Prediction::from_config(cfg, &["epsilon", "sample", "v_prediction"])?,
            solver_type,
            lower_order_final: cfg.bool_or("lower_order_final", true)?,
            euler_at_final: cfg.bool_or("euler_at_final", false)?,
            karras: match karras {
                Some(k) => k,
                None => cfg.bool_or("use_karras_sigmas", false)?,
            },
            final_sigma_min: cfg.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])?
                == "sigma_min",
            lambda_min_clipped: cfg.f64_or("lambda_min_clipped", f64::NEG_INFINITY)?,
            spacing: Spacing::from_config(cfg, "linspace")?,
            steps_offset: cfg.i64_or("steps_offset", 0)?,
            cosine_schedule: beta_schedule == "squaredcos_cap_v2",
            schedule,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            lower_order_nums: 0,
        })
    }

    /// The training timestep after which λ falls below `lambda_min_clipped`
    /// (diffusers clips the schedule there for cosine-schedule stability).
    fn last_timestep(&self) -> usize {
        let train = self.num_train_timesteps();
        // λ_t = log √ᾱ − log √(1−ᾱ) decreases with t; count the smallest
        // ones below the clip (torch.searchsorted on the flipped table).
        let clipped = self
            .schedule
            .alphas_cumprod
            .iter()
            .rev()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .take_while(|&l| (l as f64) < self.lambda_min_clipped)
            .count();
        train - clipped
    }

    fn spaced_timesteps(&self, steps: usize) -> Vec<i64> {
        let train = self.num_train_timesteps();
        let last = self.last_timestep();
        // One point more than steps, the final (t = 0) dropped.
        match self.spacing {
            Spacing::Linspace => {
                let mut t: Vec<i64> = np_linspace(0.0, last as f64 - 1.0, steps + 1, true)
                    .into_iter()
                    .rev()
                    .map(|t| np_round(t) as i64)
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = (last / (steps + 1)) as i64;
                (1..=steps as i64)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => np_arange(last as f64, 0.0, -(train as f64 / steps as f64))
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect(),
        }
    }
}

/// (α_t, σ_t) of the variance-preserving process at Euler-type noise level
/// σ: α = 1/√(σ²+1), σ_t = σ·α.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ, the half log-SNR the solver steps in (+∞ at σ = 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl Algorithm for DpmSolverMultistep {
    fn num_train_timesteps(&self) -> usize {
        self.schedule.num_train_timesteps()
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let train_sigmas = self.schedule.train_sigmas();
        let (timesteps, mut sigmas): (Vec<i64>, Vec<f64>) = if self.karras {
            let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
            let (Some(&min), Some(&max)) = (train_sigmas.first(), train_sigmas.last()) else {
                return Err(argument("empty noise schedule"));
            };
            let sigmas = karras_sigmas(min as f64, max as f64, steps);
            let timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    // torch's cast to int64 truncates.
                    (if self.cosine_schedule { t } else { np_round(t) }) as i64
                })
                .collect();
            (timesteps, sigmas)
        } else {
            let timesteps = self.spaced_timesteps(steps);
            let sigmas = timesteps
                .iter()
                .map(|&t| np_interp_unit_grid(t as f64, &train_sigmas))
                .collect();
            (timesteps, sigmas)
        };
        sigmas.push(if self.final_sigma_min {
            train_sigmas[0] as f64
        } else {
            0.0
        });
        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.lower_order_nums = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step_program(&mut self, step: usize) -> StepProgram {
        let n = self.timesteps.len();
        let short = self.lower_order_final && n < 15;
        // The last step is first order when the schedule ends at σ = 0
        // (a second-order step there is unstable), or with lower_order_final
        // on short schedules.
        let first_order_final =
            step == n - 1 && (self.euler_at_final || short || !self.final_sigma_min);

        let (mut b, x, m) = MultistepProgram::new();
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let (alpha, sigma) = (b.p.constant(alpha_s0), b.p.constant(sigma_s0));
        // The converted model output: x₀.
        let x0 = match self.prediction {
            Prediction::Epsilon => {
                let se = b.p.mul(sigma, m);
                let d = b.p.sub(x, se);
                b.p.div(d, alpha)
            }
            Prediction::Sample => m,
            Prediction::V => {
                let ax = b.p.mul(alpha, x);
                let sv = b.p.mul(sigma, m);
                b.p.sub(ax, sv)
            }
        };

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let c_sample = sigma_t / sigma_s0;
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        let (c_sample, c_d0_v) = (b.p.constant(c_sample), b.p.constant(c_d0));
        let cx = b.p.mul(c_sample, x);
        let cd0 = b.p.mul(c_d0_v, x0);
        let first = b.p.sub(cx, cd0);

        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || first_order_final {
            first
        } else {
            // Second order: D1 is the finite difference of the last two
            // x₀ predictions, scaled to this step's h.
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
            let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
            let r0 = h_0 / h;
            let inv_r0 = b.p.constant(1.0 / r0);
            let c_d1 = match self.solver_type {
                SolverType::Midpoint => -(0.5 * c_d0),
                SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
            };
            let c_d1 = b.p.constant(c_d1);
            let m1 = b.state(PREVIOUS_X0);
            let diff = b.p.sub(x0, m1);
            let d1 = b.p.mul(inv_r0, diff);
            let cd1 = b.p.mul(c_d1, d1);
            b.p.add(first, cd1)
        };
        b.p.store(StepProgram::PREV_SAMPLE, prev);
        if self.solver_order == 2 {
            b.keep(StepProgram::PRED_ORIGINAL, x0, PREVIOUS_X0);
        } else {
            b.p.store(StepProgram::PRED_ORIGINAL, x0);
        }
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        b.finish()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        if self.timesteps.is_empty() {
            return Err(argument("call set_timesteps before add_noise"));
        }
        // diffusers falls back to the last step for a timestep not listed.
        let index =
            index_for_timestep(&self.timesteps, timestep).unwrap_or(self.timesteps.len() - 1);
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        Ok(original
            .iter()
            .zip(noise)
            .map(|(&x, &n)| alpha * x + sigma * n)
            .collect())
    }
}
