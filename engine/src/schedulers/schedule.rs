//! The training noise schedule (betas → ᾱ) and the handful of numpy/torch
//! routines the schedulers build their timesteps and sigmas with.
//!
//! diffusers mixes three arithmetics here and the results depend on which
//! one each quantity went through: betas and ᾱ are torch float32 tensors,
//! timestep grids and interpolated sigmas are numpy float64 arrays cast to
//! float32 at the end, and per-step coefficients are float32 0-dim tensors.
//! Each helper below reproduces one of those routines operation for
//! operation. Betas, ᾱ and timesteps come out bit-equal to diffusers'; σ can
//! differ in the last bit, because torch's CPU sqrt, log and exp (MKL's
//! vector math) are not correctly rounded and Rust's are.

use super::config::SchedulerConfig;
use crate::error::LoadError;

/// ᾱ_t for t in 0..num_train_timesteps, as diffusers computes it in float32.
#[derive(Debug, Clone)]
pub(crate) struct NoiseSchedule {
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`,
    /// `trained_betas` and `rescale_betas_zero_snr` with the class's defaults.
    /// `floor_terminal`: the σ-based schedulers set ᾱ_T = 2⁻²⁴ after a zero
    /// terminal SNR rescale, so that σ_T stays finite.
    pub fn from_config(
        cfg: &SchedulerConfig,
        default_schedule: &str,
        default_beta_start: f64,
        default_beta_end: f64,
        floor_terminal: bool,
    ) -> Result<Self, LoadError> {
        let n = cfg.count_or("num_train_timesteps", 1000)?;
        let betas = if let Some(trained) = cfg.opt_f64_list("trained_betas")? {
            if trained.len() != n {
                return Err(cfg.error(format!(
                    "`trained_betas` has {} values, `num_train_timesteps` is {n}",
                    trained.len()
                )));
            }
            trained.iter().map(|&b| b as f32).collect()
        } else {
            let start = cfg.f64_or("beta_start", default_beta_start)?;
            let end = cfg.f64_or("beta_end", default_beta_end)?;
            let schedule = cfg.choice(
                "beta_schedule",
                default_schedule,
                &["linear", "scaled_linear", "squaredcos_cap_v2"],
            )?;
            match schedule.as_str() {
                "linear" => torch_linspace_f32(start, end, n),
                "scaled_linear" => torch_linspace_f32(start.powf(0.5), end.powf(0.5), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                _ => betas_for_alpha_bar_cosine(n),
            }
        };
        let rescale = cfg.bool_or("rescale_betas_zero_snr", false)?;
        let betas = if rescale {
            rescale_zero_terminal_snr(&betas)
        } else {
            betas
        };
        let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
        let mut alphas_cumprod = cumprod_f32(&alphas);
        if rescale && floor_terminal {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        Ok(Self { alphas_cumprod })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// σ_t = √((1 − ᾱ_t)/ᾱ_t) for every training timestep, in float32 as
    /// diffusers' `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// torch.linspace(start, end, steps, dtype=float32) on the CPU: the ends are
/// cast to float32, the first half counts up from `start` and the second half
/// down from `end`, each point one fused multiply-add (torch's kernel is
/// compiled with FMA contraction).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// torch.cumprod on a float32 CPU tensor: the running product is kept in
/// float64 and each output rounded to float32.
pub(crate) fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut product = 1.0f64;
    values
        .iter()
        .map(|&v| {
            product *= v as f64;
            product as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ᾱ of Nichol & Dhariwal
/// (2021), eq. 17: computed in Python floats, capped at 0.999, then float32.
fn betas_for_alpha_bar_cosine(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powf(2.0)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion
/// Noise Schedules and Sample Steps are Flawed", algorithm 1), in float32
/// tensor arithmetic as diffusers does it.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|&b| 1.0 - b).collect();
    let mut sqrt_ab: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let (Some(&first), Some(&last)) = (sqrt_ab.first(), sqrt_ab.last()) else {
        return Vec::new();
    };
    let scale = first / (first - last);
    for v in &mut sqrt_ab {
        *v = (*v - last) * scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    std::iter::once(ab[0])
        .chain(ab.windows(2).map(|w| w[1] / w[0]))
        .map(|a| 1.0 - a)
        .collect()
}

/// numpy.linspace in float64 (`i * step + start`, the last point set to
/// `stop` exactly when `endpoint`).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        for v in &mut y {
            *v = if step == 0.0 {
                *v / div as f64 * delta
            } else {
                *v * step
            };
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// numpy.arange(start, stop, step) in float64: ⌈(stop − start)/step⌉ points,
/// `start + i·d` with d = (start + step) − start. The count can exceed what
/// the caller meant (1000/(1000/61) rounds up to 62 points); diffusers'
/// "trailing" spacing inherits that, and so do we.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy.interp(x, arange(len(fp)), fp) for float32 `fp`, in float64.
pub(crate) fn np_interp_unit_grid(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if x.is_nan() || n == 0 {
        return f64::NAN;
    }
    let last = (n - 1) as f64;
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last {
        return fp[n - 1] as f64;
    }
    let j = x.floor() as usize;
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    if x == j as f64 {
        return y0;
    }
    // The grid spacing is 1, so numpy's slope (y1 − y0)/(x1 − x0) is y1 − y0.
    let slope = y1 - y0;
    let y = slope * (x - j as f64) + y0;
    if y.is_nan() {
        let y = slope * (x - (j + 1) as f64) + y1;
        if y.is_nan() && y0 == y1 {
            return y0;
        }
        return y;
    }
    y
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose σ is
/// `sigma`, by linear interpolation in log σ. `log_sigmas` are float32 as
/// numpy's `np.log` of the float32 σ table gives them.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // low = argmax(cumsum(log_sigma >= log_sigmas)): where the running count
    // first reaches its maximum (0 when no entry is below).
    let (mut count, mut best, mut low) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low = i;
        }
    }
    let low = low.min(log_sigmas.len().saturating_sub(2));
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[high] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// Karras et al. (2022), eq. 5 with ρ = 7: `n` sigmas from `sigma_max` down
/// to `sigma_min`, evenly spaced in σ^(1/ρ), in float64 as diffusers' numpy.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n, true)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// numpy's round: half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_and_arange_match_numpy_on_known_values() {
        assert_eq!(
            np_linspace(0.0, 999.0, 4, true),
            vec![0.0, 333.0, 666.0, 999.0]
        );
        assert_eq!(np_linspace(0.0, 999.0, 1, true), vec![0.0]);
        assert_eq!(np_linspace(0.0, 10.0, 4, false), vec![0.0, 2.5, 5.0, 7.5]);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        // numpy.arange(1000, 0, -1000/61) has 62 points.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_round(0.5), 0.0);
        assert_eq!(np_round(1.5), 2.0);
    }

    #[test]
    fn interpolation_hits_grid_points_and_clamps() {
        let fp = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp_unit_grid(0.5, &fp), 2.0);
        assert_eq!(np_interp_unit_grid(1.0, &fp), 3.0);
        assert_eq!(np_interp_unit_grid(2.0, &fp), 7.0);
        assert_eq!(np_interp_unit_grid(5.0, &fp), 7.0);
        assert_eq!(np_interp_unit_grid(-1.0, &fp), 1.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas = [0.1f32, 0.2, 0.4, 0.8];
        let logs: Vec<f32> = sigmas.iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.2f32 as f64, &logs) - 1.0).abs() < 1e-6);
        let mid = ((0.2f64.ln() + 0.4f64.ln()) / 2.0).exp();
        assert!((sigma_to_t(mid, &logs) - 1.5).abs() < 1e-6);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
        assert_eq!(sigma_to_t(10.0, &logs), 3.0);
    }
}
