//! The optimizer step: global gradient-norm clip and Adam, fused per parameter tensor.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "optim");

/// Uniform parameters of `adam` and `ema_update` (WGSL `Params`): `n` values; Adam's betas and
/// eps, or the EMA decay in `beta1`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct OptimParams {
    pub n: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub _pad3: u32,
}

/// Parameters over `n` values, constants zero.
fn flat(n: usize) -> OptimParams {
    OptimParams { n: size_u32(n), _pad0: 0, _pad1: 0, _pad2: 0, beta1: 0.0, beta2: 0.0, eps: 0.0, _pad3: 0 }
}

/// Adam's constants (PyTorch defaults as the reference uses them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adam {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl Default for Adam {
    fn default() -> Self {
        Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// The per-step `hyper` tensor: [lr, 1 - beta1^step, sqrt(1 - beta2^step), max_norm].
pub fn hyper(adam: &Adam, lr: f32, step: u64, max_norm: f32) -> [f32; 4] {
    let bc1 = 1.0 - (adam.beta1 as f64).powi(step as i32);
    let bc2 = 1.0 - (adam.beta2 as f64).powi(step as i32);
    [lr, bc1 as f32, bc2.sqrt() as f32, max_norm]
}

/// Clip by the global norm in `sumsq` and take one Adam step on `param` (in place, with its
/// moments `m` and `v`).
#[allow(clippy::too_many_arguments)]
pub fn adam_step(
    g: &mut Graph,
    adam: &Adam,
    param: TensorId,
    grad: TensorId,
    m: TensorId,
    v: TensorId,
    sumsq: TensorId,
    hyper: TensorId,
    name: &str,
) {
    let n = g.info(param).numel();
    assert!(g.info(grad).numel() == n && g.info(m).numel() == n && g.info(v).numel() == n, "{name}: shapes differ");
    g.push(Node {
        shader: &SHADER,
        entry: "adam",
        params: Params::of(&OptimParams { beta1: adam.beta1, beta2: adam.beta2, eps: adam.eps, ..flat(n) }),
        reads: vec![grad, sumsq, hyper],
        writes: vec![param, m, v],
        workgroups: grid_1d(n, 256),
        label: name.to_string(),
        cost: Cost { flops: 14 * n as u64, bytes: 28 * n as u64 },
    });
}

/// CPU reference of [`adam_step`] on one tensor.
pub fn adam_cpu(
    adam: &Adam,
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    sumsq: f32,
    hyper: [f32; 4],
) {
    let [lr, bc1, bc2_sqrt, max_norm] = hyper;
    let clip = (max_norm / (sumsq.sqrt() + 1e-6)).min(1.0);
    for i in 0..param.len() {
        let gr = grad[i] * clip;
        m[i] = adam.beta1 * m[i] + (1.0 - adam.beta1) * gr;
        v[i] = adam.beta2 * v[i] + (1.0 - adam.beta2) * gr * gr;
        let denom = v[i].sqrt() / bc2_sqrt + adam.eps;
        param[i] -= (lr / bc1) * m[i] / denom;
    }
}

/// ema = decay * ema + (1 - decay) * param.
pub fn ema_update(g: &mut Graph, param: TensorId, ema: TensorId, decay: f32, name: &str) {
    let n = g.info(param).numel();
    g.push(Node {
        shader: &SHADER,
        entry: "ema_update",
        params: Params::of(&OptimParams { beta1: decay, ..flat(n) }),
        reads: vec![param],
        writes: vec![ema],
        workgroups: grid_1d(n, 256),
        label: name.to_string(),
        cost: Cost { flops: 3 * n as u64, bytes: 12 * n as u64 },
    });
}
