//! The diffusion schedule in f64 (as the reference), and the per-step coefficient tables of the
//! samplers, rounded to f32 exactly where the reference rounds.

use anyhow::{bail, Result};

use crate::ops::sampler::{Mode, StepCoef};

/// Linear betas and the DDPM coefficients, all f64.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub betas: Vec<f64>,
    pub alphas_bar: Vec<f64>,
    /// Coefficient of x0 in the one-step posterior mean.
    pub post_c1: Vec<f64>,
    /// Coefficient of x_t in the one-step posterior mean.
    pub post_c2: Vec<f64>,
    /// 'fixedlarge' variance: posterior variance at t = 1, beta_t after.
    pub var_large: Vec<f64>,
}

/// torch.linspace in float64: the first half counts up from `start`, the second half down from
/// `end`, so both ends are exact.
pub fn torch_linspace(start: f64, end: f64, steps: usize) -> Vec<f64> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f64;
    let half = steps / 2;
    (0..steps).map(|i| if i < half { start + step * i as f64 } else { end - step * (steps - 1 - i) as f64 }).collect()
}

impl Schedule {
    pub fn linear(steps: usize, beta_1: f64, beta_t: f64) -> Schedule {
        let betas = torch_linspace(beta_1, beta_t, steps);
        let mut alphas_bar = Vec::with_capacity(steps);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_bar.push(acc);
        }
        let prev = |t: usize| if t == 0 { 1.0 } else { alphas_bar[t - 1] };
        let post_c1 = (0..steps).map(|t| prev(t).sqrt() * betas[t] / (1.0 - alphas_bar[t])).collect();
        let post_c2 = (0..steps).map(|t| (1.0 - betas[t]).sqrt() * (1.0 - prev(t)) / (1.0 - alphas_bar[t])).collect();
        let post_var: Vec<f64> = (0..steps).map(|t| betas[t] * (1.0 - prev(t)) / (1.0 - alphas_bar[t])).collect();
        let var_large = (0..steps)
            .map(|t| if t == 0 { post_var.get(1).copied().unwrap_or(post_var[0]) } else { betas[t] })
            .collect();
        Schedule { betas, alphas_bar, post_c1, post_c2, var_large }
    }

    /// The reference's schedule: 1000 steps, betas 1e-4 .. 0.02.
    pub fn reference(steps: usize) -> Schedule {
        Schedule::linear(steps, 1e-4, 0.02)
    }

    pub fn steps(&self) -> usize {
        self.betas.len()
    }
}

/// Which update rule a sampling run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// DDPM ancestral sampling, 'fixedlarge' variance. With S = T steps it is the reference's
    /// sampler exactly; with fewer steps it uses the posterior of the strided chain.
    Ddpm,
    /// DDIM with eta = 0.
    Ddim,
}

/// The reference's visiting order: t_k = max(int((T-1) - (T/S) k), 0) for k < S, then 0.
pub fn timesteps(total: usize, steps: usize) -> Result<Vec<usize>> {
    if steps == 0 || steps > total {
        bail!("--steps must be between 1 and {total}, got {steps}");
    }
    let stride = total as f64 / steps as f64;
    let mut ts: Vec<usize> = (0..steps).map(|k| ((total - 1) as f64 - stride * k as f64).max(0.0) as usize).collect();
    if *ts.last().unwrap() != 0 {
        ts.push(0);
    }
    Ok(ts)
}

/// The coefficient rows of a sampling run: one per network evaluation.
pub fn plan_steps(sch: &Schedule, kind: SamplerKind, steps: usize) -> Result<Vec<StepCoef>> {
    let ts = timesteps(sch.steps(), steps)?;
    let ab = &sch.alphas_bar;
    let mut rows = Vec::new();
    for (i, &t) in ts.iter().enumerate() {
        let base =
            StepCoef { t: t as u32, mode: Mode::Ancestral, a: 0.0, b: 0.0, c1: 0.0, c2: 0.0, c3: 0.0, sigma: 0.0 };
        match kind {
            SamplerKind::Ddpm if t == 0 => rows.push(StepCoef {
                mode: Mode::Final,
                a: ab[0].sqrt() as f32,
                b: (1.0 - ab[0]).sqrt() as f32,
                ..base
            }),
            SamplerKind::Ddpm => {
                let s = ts[i + 1];
                let (c1, c2, var) = if t - s == 1 {
                    (sch.post_c1[t], sch.post_c2[t], sch.var_large[t])
                } else {
                    // Posterior q(x_s | x_t, x0) of the strided chain, 'large' variance beta_{t|s}.
                    let beta_ts = 1.0 - ab[t] / ab[s];
                    (
                        ab[s].sqrt() * beta_ts / (1.0 - ab[t]),
                        (ab[t] / ab[s]).sqrt() * (1.0 - ab[s]) / (1.0 - ab[t]),
                        beta_ts,
                    )
                };
                rows.push(StepCoef {
                    a: (1.0 / ab[t]).sqrt() as f32,
                    b: (1.0 / ab[t] - 1.0).sqrt() as f32,
                    c1: c1 as f32,
                    c2: c2 as f32,
                    sigma: var.sqrt() as f32,
                    ..base
                });
            }
            SamplerKind::Ddim if t == 0 => {}
            SamplerKind::Ddim => {
                let s = ts[i + 1];
                rows.push(StepCoef {
                    mode: Mode::Ddim,
                    a: ab[t].sqrt() as f32,
                    b: (1.0 - ab[t]).sqrt() as f32,
                    c1: ab[s].sqrt() as f32,
                    c3: (1.0 - ab[s]).sqrt() as f32,
                    ..base
                });
            }
        }
    }
    Ok(rows)
}
