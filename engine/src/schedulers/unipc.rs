//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework
//! for Fast Sampling of Diffusion Models"): a multistep predictor (UniP) on
//! the data prediction x₀ in λ = log(α/σ), and after each new model
//! evaluation a corrector (UniC) that refines the sample the evaluation was
//! made at. diffusers' `UniPCMultistepScheduler` as Wan's folders configure
//! it: flow sigmas (`use_flow_sigmas`, α = 1 − σ, σ_t = σ), flow prediction
//! (x₀ = x − σ·v), `flow_shift`, `predict_x0`, order 1 or 2.
//!
//! The arithmetic is diffusers' float32 tensor arithmetic, scalar by scalar
//! in the same order, so that the only differences left are the last-bit
//! ones of libm's log and expm1 against torch's.

use super::config::SchedulerConfig;
use super::flow_match_euler::{flow_shift, shift_sigma};
use super::schedule::np_linspace;
use super::{flow_add_noise, Algorithm, MultistepProgram, Spacing, StepProgram};
use crate::error::{LoadError, Result};
use crate::ops::latent::Value;

/// The B(h) of the UniPC update (paper §3.2): `bh1` is B(h) = h, `bh2`
/// B(h) = e^h − 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Bh1,
    Bh2,
}

pub(crate) struct UniPc {
    num_train_timesteps: usize,
    /// 1 or 2.
    solver_order: usize,
    solver_type: SolverType,
    lower_order_final: bool,
    /// Step indices after which the corrector is skipped
    /// (`disable_corrector`: the corrector of step i+1 refines step i).
    disable_corrector: Vec<i64>,
    shift: f64,
    /// `final_sigmas_type = "sigma_min"`: end at the last flow σ instead of 0.
    final_sigma_min: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// The order the last predictor ran with; the next corrector uses it.
    this_order: usize,
    /// Steps run since `set_timesteps`, up to `solver_order`. The x₀ of
    /// the last two steps and the sample the last predictor started from
    /// are kept by the [`super::Scheduler`] (state slots [`x0_slot`],
    /// [`LAST_SAMPLE`]).
    lower_order_nums: usize,
}

impl UniPc {
    /// `shift` overrides the config's `flow_shift` (`--shift`).
    pub fn new(cfg: &SchedulerConfig, shift: Option<f64>) -> Result<Self, LoadError> {
        // A FlowMatch class's config serves UniPC as a flow schedule with
        // its `shift`: read as diffusers would (use_flow_sigmas false,
        // epsilon), it would be a noise-prediction schedule for a model that
        // predicts velocity.
        let from_flow_class = cfg.class_name().is_some_and(|c| c.starts_with("FlowMatch"));
        if !from_flow_class {
            if !cfg.bool_or("use_flow_sigmas", false)? {
                return Err(cfg.error(
                    "`use_flow_sigmas` is false: Motif implements UniPC for flow-matching models \
                     (Wan); for a noise-prediction model choose dpm++2m, ddim, euler, euler-a or lcm",
                ));
            }
            cfg.choice("prediction_type", "epsilon", &["flow_prediction"])?;
        }
        let solver_order = cfg.i64_or("solver_order", 2)?;
        if !(1..=2).contains(&solver_order) {
            return Err(cfg.error(format!(
                "`solver_order` is {solver_order}; Motif implements UniPC of order 1 and 2"
            )));
        }
        // diffusers maps the DPM-Solver names to bh2.
        let solver_type = match cfg
            .choice(
                "solver_type",
                "bh2",
                &["bh1", "bh2", "midpoint", "heun", "logrho"],
            )?
            .as_str()
        {
            "bh1" => SolverType::Bh1,
            _ => SolverType::Bh2,
        };
        if !cfg.bool_or("predict_x0", true)? {
            return Err(cfg.error(
                "`predict_x0` is false; Motif implements UniPC on the data prediction (true)",
            ));
        }
        if cfg.opt_string("solver_p")?.is_some() {
            return Err(
                cfg.error("`solver_p` is set; Motif implements UniPC's own predictor (null)")
            );
        }
        cfg.require_false(
            "thresholding",
            "dynamic thresholding is for pixel-space models",
        )?;
        cfg.require_false(
            "use_dynamic_shifting",
            "the shift then depends on the image size through `mu`; set `flow_shift` instead",
        )?;
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ] {
            cfg.require_false(key, "flow sigmas are implemented")?;
        }
        if let Some(v) = cfg.opt_f64("shift_terminal")? {
            if v != 0.0 {
                return Err(cfg.error(format!(
                    "`shift_terminal` is {v}, which Motif does not support (null)"
                )));
            }
        }
        // diffusers validates the spacing even though flow sigmas replace
        // the timesteps it spaces.
        Spacing::from_config(cfg, "linspace")?;
        let final_sigma_min =
            cfg.choice("final_sigmas_type", "zero", &["zero", "sigma_min"])? == "sigma_min";
        let lower_order_final = cfg.bool_or("lower_order_final", true)?;
        if solver_order == 2 && !lower_order_final && !final_sigma_min {
            // λ = +∞ at σ = 0 makes the second-order difference divide by
            // zero: diffusers' last step returns ±∞ there.
            return Err(cfg.error(
                "`lower_order_final` is false with `final_sigmas_type` \"zero\": UniPC's second-order \
                 last step divides by zero there; set `lower_order_final` to true",
            ));
        }
        let disable_corrector = match cfg.opt_f64_list("disable_corrector")? {
            None => Vec::new(),
            Some(list) => list
                .into_iter()
                .map(|v| {
                    if v.fract() == 0.0 && v.abs() < 1e15 {
                        Ok(v as i64)
                    } else {
                        Err(cfg.error(format!(
                            "`disable_corrector` must be a list of step indices, found {v}"
                        )))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            num_train_timesteps: cfg.count_or("num_train_timesteps", 1000)?,
            solver_order: solver_order as usize,
            solver_type,
            lower_order_final,
            disable_corrector,
            shift: flow_shift(
                cfg,
                if from_flow_class {
                    "shift"
                } else {
                    "flow_shift"
                },
                if from_flow_class {
                    "flow_shift"
                } else {
                    "shift"
                },
                shift,
            )?,
            final_sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            this_order: 1,
            lower_order_nums: 0,
        })
    }

    /// λ = log α − log σ at step index `i`, with flow's α = 1 − σ (+∞ at σ = 0).
    fn lambda(&self, i: usize) -> f32 {
        let sigma = self.sigmas[i];
        (1.0 - sigma).ln() - sigma.ln()
    }

    /// UniP: the predictor from step `step` (σ_s0) to `step + 1` (σ_t),
    /// from `sample` with this step's x₀ `m0` and, at order 2, the previous
    /// step's x₀.
    fn predict(
        &self,
        b: &mut MultistepProgram,
        sample: Value,
        m0: Value,
        step: usize,
        order: usize,
    ) -> Value {
        let (sigma_s0, sigma_t) = (self.sigmas[step], self.sigmas[step + 1]);
        let alpha_t = 1.0 - sigma_t;
        let lambda_s0 = self.lambda(step);
        let h = self.lambda(step + 1) - lambda_s0;
        let c = Coefficients::new(h, order, self.solver_type);
        let c_x = b.p.constant(sigma_t / sigma_s0);
        let c_m0 = b.p.constant(alpha_t * c.h_phi_1);
        let cx = b.p.mul(c_x, sample);
        let cm0 = b.p.mul(c_m0, m0);
        let x_t = b.p.sub(cx, cm0);
        if order == 1 {
            // diffusers subtracts α_t·B(h)·0 here, which is NaN where
            // B(h) = −∞ (bh1 at a final σ of 0); the sum is x_t_ itself
            // wherever diffusers' is finite.
            return x_t;
        }
        // Order 2: one earlier x₀; diffusers fixes ρ = 0.5 for it
        // (UniPC's B(h)-dependent choice reduces to ½ at order 2).
        let m1 = b.state(x0_slot(step - 1));
        let rk = b.p.constant((self.lambda(step - 1) - lambda_s0) / h);
        let rho = b.p.constant(0.5);
        let c_res = b.p.constant(alpha_t * c.b_h);
        let diff = b.p.sub(m1, m0);
        let d1 = b.p.div(diff, rk);
        let rd1 = b.p.mul(rho, d1);
        let res = b.p.mul(c_res, rd1);
        b.p.sub(x_t, res)
    }

    /// UniC: refines the sample of step `step` with this step's x₀
    /// `model_t`, from the sample step − 1's predictor started from and
    /// the x₀ of step − 1 (and step − 2 at order 2), all kept in state.
    fn correct(
        &self,
        b: &mut MultistepProgram,
        model_t: Value,
        step: usize,
        order: usize,
    ) -> Value {
        let last_sample = b.state(LAST_SAMPLE);
        let m0 = b.state(x0_slot(step - 1));
        let (sigma_s0, sigma_t) = (self.sigmas[step - 1], self.sigmas[step]);
        let alpha_t = 1.0 - sigma_t;
        let lambda_s0 = self.lambda(step - 1);
        let h = self.lambda(step) - lambda_s0;
        let c = Coefficients::new(h, order, self.solver_type);
        let c_x = b.p.constant(sigma_t / sigma_s0);
        let c_m0 = b.p.constant(alpha_t * c.h_phi_1);
        let c_res = b.p.constant(alpha_t * c.b_h);
        let cx = b.p.mul(c_x, last_sample);
        let cm0 = b.p.mul(c_m0, m0);
        let x_t = b.p.sub(cx, cm0);
        let residual = if order == 1 {
            let rho = b.p.constant(0.5);
            let diff = b.p.sub(model_t, m0);
            b.p.mul(rho, diff)
        } else {
            let m1 = b.state(x0_slot(step - 2));
            let rk = (self.lambda(step - 2) - lambda_s0) / h;
            // ρ solves R·ρ = b with R = [[1, 1], [r_k, 1]] (rows: r^0, r^1).
            let [rho_0, rho_1] = solve_2x2([[1.0, 1.0], [rk, 1.0]], [c.b[0], c.b[1]]);
            let (rk, rho_0, rho_1) = (b.p.constant(rk), b.p.constant(rho_0), b.p.constant(rho_1));
            let diff = b.p.sub(m1, m0);
            let d1 = b.p.div(diff, rk);
            let r0d1 = b.p.mul(rho_0, d1);
            let dt = b.p.sub(model_t, m0);
            let r1dt = b.p.mul(rho_1, dt);
            b.p.add(r0d1, r1dt)
        };
        let res = b.p.mul(c_res, residual);
        b.p.sub(x_t, res)
    }
}

/// The state slot of step `step`'s x₀: the last two alternate, so that a
/// step reads step − 2's before its own x₀ replaces it.
fn x0_slot(step: usize) -> usize {
    step % 2
}

/// The state slot of the sample the last predictor started from, and the
/// output that carries it there.
const LAST_SAMPLE: usize = 2;
const KEPT_SAMPLE_OUTPUT: usize = 2;

/// The φ-function terms both updates share, for step size h in λ
/// (predict_x0: hh = −h).
struct Coefficients {
    /// hφ₁(hh) = e^hh − 1.
    h_phi_1: f32,
    b_h: f32,
    /// b_i = hφ_{i+1}(hh)·i! / B(h), i = 1 … order.
    b: Vec<f32>,
}

impl Coefficients {
    fn new(h: f32, order: usize, solver_type: SolverType) -> Self {
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = match solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let mut factorial = 1u64;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as u64 {
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i + 1;
            // Python's 1 / factorial is a float64, rounded to float32 by the
            // tensor subtraction.
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Self { h_phi_1, b_h, b }
    }
}

/// Solves a 2×2 system as LAPACK's sgesv does (torch.linalg.solve on the
/// CPU): LU with partial pivoting, the column scaled by the pivot's
/// reciprocal, then forward and back substitution, in float32.
fn solve_2x2(mut a: [[f32; 2]; 2], mut b: [f32; 2]) -> [f32; 2] {
    if a[1][0].abs() > a[0][0].abs() {
        a.swap(0, 1);
        b.swap(0, 1);
    }
    let l = a[1][0] * (1.0 / a[0][0]);
    let u11 = a[1][1] - l * a[0][1];
    let y1 = b[1] - l * b[0];
    let x1 = y1 / u11;
    let x0 = (b[0] - x1 * a[0][1]) / a[0][0];
    [x0, x1]
}

impl Algorithm for UniPc {
    fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let n = self.num_train_timesteps as f64;
        // Flow sigmas: steps points of linspace(1, 1/N, steps + 1), shifted,
        // in float64; σ = 1 exactly would make α = 0 and λ = −∞.
        let mut sigmas: Vec<f64> = np_linspace(1.0, 1.0 / n, steps + 1, true)
            .into_iter()
            .take(steps)
            .map(|s| shift_sigma(self.shift, s))
            .collect();
        if (sigmas[0] - 1.0).abs() < 1e-6 {
            sigmas[0] -= 1e-6;
        }
        // Timesteps are σ·N cast to int64: truncated, not rounded.
        self.timesteps = sigmas.iter().map(|&s| (s * n).trunc()).collect();
        let last = if self.final_sigma_min {
            sigmas[steps - 1]
        } else {
            0.0
        };
        sigmas.push(last);
        self.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.this_order = 1;
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
        let (mut b, x, v) = MultistepProgram::new();
        // x₀ = x − σ·v (diffusers' `convert_model_output` for flow
        // prediction).
        let sigma = b.p.constant(self.sigmas[step]);
        let sv = b.p.mul(sigma, v);
        let x0 = b.p.sub(x, sv);
        // The corrector refines the sample this model output was computed
        // at, using the previous step's prediction and order.
        let corrects = self.lower_order_nums > 0
            && step > 0
            && !self.disable_corrector.contains(&(step as i64 - 1));
        let sample = match corrects {
            true => self.correct(&mut b, x0, step, self.this_order),
            false => x,
        };
        let n = self.timesteps.len();
        let order = if self.lower_order_final {
            self.solver_order.min(n - step)
        } else {
            self.solver_order
        };
        // Warm-up: order k needs k − 1 earlier predictions.
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev_sample = self.predict(&mut b, sample, x0, step, self.this_order);
        b.p.store(StepProgram::PREV_SAMPLE, prev_sample);
        b.keep(StepProgram::PRED_ORIGINAL, x0, x0_slot(step));
        b.keep(KEPT_SAMPLE_OUTPUT, sample, LAST_SAMPLE);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        b.finish()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Result<Vec<f32>> {
        flow_add_noise(
            &self.timesteps,
            &self.sigmas,
            original,
            noise,
            timestep,
            true,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_2x2_pivots_and_solves() {
        // No pivot: [[1, 1], [0.5, 1]]·[2, 4] = [6, 5].
        assert_eq!(solve_2x2([[1.0, 1.0], [0.5, 1.0]], [6.0, 5.0]), [2.0, 4.0]);
        // Pivot: [[1, 1], [-2, 1]]·[1, 3] = [4, 1].
        assert_eq!(solve_2x2([[1.0, 1.0], [-2.0, 1.0]], [4.0, 1.0]), [1.0, 3.0]);
    }

    #[test]
    fn order_one_coefficients_are_the_exponential_integrator_s() {
        // b_1 = (φ₁(hh) − 1)/B(h)·1! with hh = −h; for bh2 B = e^hh − 1.
        let h = 0.3f32;
        let c = Coefficients::new(h, 2, SolverType::Bh2);
        let hh = -h as f64;
        let phi1 = hh.exp_m1();
        assert!((c.h_phi_1 as f64 - phi1).abs() < 1e-7);
        let b1 = (phi1 / hh - 1.0) / phi1;
        assert!((c.b[0] as f64 - b1).abs() < 1e-6, "{} vs {b1}", c.b[0]);
        let b2 = ((phi1 / hh - 1.0) / hh - 0.5) * 2.0 / phi1;
        assert!((c.b[1] as f64 - b2).abs() < 1e-5, "{} vs {b2}", c.b[1]);
    }
}
