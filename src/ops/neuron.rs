//! The multi-step spiking neuron fused over T: integrate-and-fire (the reference's IFNode) or
//! leaky integrate-and-fire, hard reset, reset not detached. Spikes leave it bit-packed.

use crate::gpu::Shader;
use crate::graph::{grid_1d, Cost, DType, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "neuron");

/// Neuron dynamics. The reference uses `Neuron::default()`: IF, threshold 1, reset to 0.
/// Threshold-guided sampling changes `v_th` at inference only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neuron {
    pub v_th: f32,
    pub v_reset: f32,
    /// `None`: IF (no leak). `Some(tau)`: LIF with decay_input, h = v + (x - (v - v_reset)) / tau.
    pub tau: Option<f32>,
}

impl Default for Neuron {
    fn default() -> Self {
        Neuron { v_th: 1.0, v_reset: 0.0, tau: None }
    }
}

impl Neuron {
    fn params(&self, n: usize, t: usize) -> Vec<u32> {
        Params::new()
            .u(n)
            .u(t)
            .u(self.tau.is_some() as usize)
            .u(0)
            .f(self.v_th)
            .f(self.v_reset)
            .f(1.0 / self.tau.unwrap_or(1.0))
            .build()
    }
}

fn neurons_per_step(g: &Graph, x: TensorId, t: usize, name: &str) -> usize {
    let numel = g.info(x).numel();
    assert!(t > 0 && numel.is_multiple_of(t), "{name}: {numel} values do not split into T = {t} steps");
    numel / t
}

/// The forward node: x [T*B, ...] f32 -> bit-packed spikes of the same shape. See
/// shaders/neuron.wgsl for the two grids.
fn forward_node(g: &mut Graph, x: TensorId, t: usize, cfg: Neuron, name: &str) -> TensorId {
    let n = neurons_per_step(g, x, t, name);
    let shape = g.shape(x).to_vec();
    let s = g.intermediate_as(name, &shape, DType::Spike);
    let (entry, workgroups) = if n.is_multiple_of(32) {
        ("neuron_forward_aligned", grid_1d(n, 32))
    } else {
        ("neuron_forward", grid_1d((n * t).div_ceil(32), 256))
    };
    let bytes = g.bytes_of(x) + g.bytes_of(s);
    g.push_typed(
        Node {
            shader: &SHADER,
            entry,
            params: cfg.params(n, t),
            reads: vec![x],
            writes: vec![s],
            workgroups,
            label: name.to_string(),
            cost: Cost { flops: 4 * (n * t) as u64, bytes },
        },
        &[DType::F32],
        &[DType::Spike],
    );
    s
}

/// Spikes of x ([T*B, ...], time-major) over `t` steps, bit-packed ([`DType::Spike`]).
pub fn neuron_forward(g: &mut Graph, x: TensorId, t: usize, cfg: Neuron, name: &str) -> TensorId {
    forward_node(g, x, t, cfg, name)
}

/// Training form: the same spikes, recorded for backward, and the tensor backward keeps. That is
/// the input x, not the membranes: backward recomputes h from x, which costs the same memory as
/// keeping h, and none when x is kept for another op's backward anyway.
pub fn neuron_forward_train(g: &mut Graph, x: TensorId, t: usize, cfg: Neuron, name: &str) -> (TensorId, TensorId) {
    let s = forward_node(g, x, t, cfg, name);
    let n = neurons_per_step(g, x, t, name);
    let label = name.to_string();
    let shape = g.shape(x).to_vec();
    g.record(name, vec![x], vec![s], move |g, go, _needs| {
        let Some(gs) = go[0] else { return vec![None] };
        let dx = g.intermediate(&format!("{label}.grad_input"), &shape);
        g.push(Node {
            shader: &SHADER,
            entry: "neuron_backward",
            params: cfg.params(n, t),
            reads: vec![gs, x],
            writes: vec![dx],
            workgroups: grid_1d(n, 256),
            label: format!("{label}.backward"),
            // gs and x read, h parked in dx and read back, dx written.
            cost: Cost { flops: 16 * (n * t) as u64, bytes: 20 * (n * t) as u64 },
        });
        vec![Some(dx)]
    });
    (s, x)
}

/// A neuron input that training-mode BatchNorm and a broadcast add computed from a saved tensor:
/// x = (c * alpha + beta) + emb[n % B, ch] with alpha = weight * invstd, beta = bias - mean * alpha
/// per channel, c: [N, C, ...], emb: [B, C]. Backward recomputes x from these instead of keeping it.
#[derive(Debug, Clone, Copy)]
pub struct AffineInput {
    pub c: TensorId,
    pub weight: TensorId,
    pub bias: TensorId,
    pub mean: TensorId,
    pub invstd: TensorId,
    pub emb: TensorId,
}

/// [`neuron_forward_train`] of `x`, which must equal what `input` describes (the caller computed
/// it so); backward keeps nothing of x and reruns BN-apply, the add and the charge inside the
/// backward kernel. Returns the spikes.
pub fn neuron_forward_train_affine(
    g: &mut Graph,
    x: TensorId,
    input: AffineInput,
    t: usize,
    cfg: Neuron,
    name: &str,
) -> TensorId {
    let s = forward_node(g, x, t, cfg, name);
    let n = neurons_per_step(g, x, t, name);
    let shape = g.shape(x).to_vec();
    assert_eq!(g.shape(input.c), &shape[..], "{name}: the BN input must have the neuron input's shape");
    let (c, hw) = (shape[1], shape[2..].iter().product::<usize>());
    let b = g.shape(input.emb)[0];
    assert_eq!(g.shape(input.emb), [b, c], "{name}: the added term must be [B, C]");
    let mut params = cfg.params(n, t);
    params.truncate(8);
    params.extend(Params::new().u(c).u(hw).u(b).build());
    let label = name.to_string();
    g.record(name, vec![x], vec![s], move |g, go, _needs| {
        let Some(gs) = go[0] else { return vec![None] };
        let dx = g.intermediate(&format!("{label}.grad_input"), &shape);
        g.push(Node {
            shader: &SHADER,
            entry: "neuron_backward_affine",
            params: params.clone(),
            reads: vec![gs, input.c, input.weight, input.bias, input.mean, input.invstd, input.emb],
            writes: vec![dx],
            workgroups: grid_1d(n, 256),
            label: format!("{label}.backward"),
            cost: Cost { flops: 20 * (n * t) as u64, bytes: 20 * (n * t) as u64 },
        });
        vec![Some(dx)]
    });
    s
}

/// CPU reference of the backward through time: grad_x from grad_spikes and the saved h.
pub fn neuron_backward_cpu(grad_s: &[f32], h: &[f32], t: usize, cfg: Neuron) -> Vec<f32> {
    let n = h.len() / t;
    let (dh_dx, dh_dv) = match cfg.tau {
        None => (1.0, 1.0),
        Some(tau) => (1.0 / tau, 1.0 - 1.0 / tau),
    };
    let mut gx = vec![0f32; h.len()];
    for i in 0..n {
        let mut gv = 0f32;
        for step in (0..t).rev() {
            let hv = h[step * n + i];
            let over = hv - cfg.v_th;
            let s = if over >= 0.0 { 1.0 } else { 0.0 };
            let pi_x = std::f32::consts::PI * over;
            let sg = 1.0 / (1.0 + pi_x * pi_x);
            let dv_dh = (1.0 - s) + (cfg.v_reset - hv) * sg;
            let gh = grad_s[step * n + i] * sg + gv * dv_dh;
            gx[step * n + i] = gh * dh_dx;
            gv = gh * dh_dv;
        }
    }
    gx
}

/// CPU reference: (spikes, h), both [T, N] time-major.
pub fn neuron_cpu(x: &[f32], t: usize, cfg: Neuron) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / t;
    let inv_tau = 1.0 / cfg.tau.unwrap_or(1.0);
    let mut s = vec![0f32; x.len()];
    let mut hs = vec![0f32; x.len()];
    for i in 0..n {
        let mut v = cfg.v_reset;
        for step in 0..t {
            let xt = x[step * n + i];
            let h = match cfg.tau {
                None => v + xt,
                Some(_) => v + (xt - (v - cfg.v_reset)) * inv_tau,
            };
            let spike = if h - cfg.v_th >= 0.0 { 1.0 } else { 0.0 };
            s[step * n + i] = spike;
            hs[step * n + i] = h;
            v = h * (1.0 - spike) + cfg.v_reset * spike;
        }
    }
    (s, hs)
}
