//! The multi-step spiking neuron fused over T: integrate-and-fire (the reference's IFNode) or
//! leaky integrate-and-fire, hard reset, reset not detached. Spikes leave it bit-packed.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, DType, Graph, Node, Params, TensorId};
use crate::ops::batchnorm::{self, BnParams, BnSaved};
use crate::ops::reduce;
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

/// Uniform parameters of every neuron.wgsl entry (WGSL `Params`); `c`, `hw`, `b` and `has_emb`
/// describe the input of the affine entries and are 0 for the others.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct NeuronParams {
    pub n: u32,
    pub t: u32,
    pub lif: u32,
    /// BatchNorm groups of the affine entries' statistics (0 or 1: one).
    pub bn_groups: u32,
    pub v_th: f32,
    pub v_reset: f32,
    pub inv_tau: f32,
    pub pad1: u32,
    pub c: u32,
    pub hw: u32,
    pub b: u32,
    pub has_emb: u32,
}

impl NeuronParams {
    fn words(self) -> Vec<u32> {
        Params::of(&self)
    }
}

impl Neuron {
    fn params(&self, n: usize, t: usize) -> NeuronParams {
        NeuronParams {
            n: size_u32(n),
            t: size_u32(t),
            lif: self.tau.is_some() as u32,
            v_th: self.v_th,
            v_reset: self.v_reset,
            inv_tau: 1.0 / self.tau.unwrap_or(1.0),
            ..NeuronParams::zeroed()
        }
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
            params: cfg.params(n, t).words(),
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
    // Where x's other consumers already gave it a gradient (a residual, a skip), the kernel adds
    // its own to it instead of a separate sum pass.
    g.record_into(name, vec![x], vec![s], move |g, go, _needs, prev| {
        let Some(gs) = go[0] else { return vec![None] };
        let dx = g.intermediate(&format!("{label}.grad_input"), &shape);
        let (entry, reads) = match prev[0] {
            Some(earlier) => ("neuron_backward_acc", vec![gs, x, earlier]),
            None => ("neuron_backward", vec![gs, x]),
        };
        g.push(Node {
            shader: &SHADER,
            entry,
            params: cfg.params(n, t).words(),
            workgroups: grid_1d(n, 256),
            label: format!("{label}.backward"),
            // gs, x (and the earlier gradient) read, h parked in dx and read back, dx written.
            cost: Cost { flops: 16 * (n * t) as u64, bytes: 4 * (5 + reads.len() - 2) as u64 * (n * t) as u64 },
            reads,
            writes: vec![dx],
        });
        vec![Some(dx)]
    });
    (s, x)
}

/// A neuron input that training-mode BatchNorm computes from a saved tensor, plus optionally a
/// per-(image, channel) term: x = (c * alpha + beta) [+ emb[n % B, ch]] with alpha = weight *
/// invstd, beta = bias - mean * alpha per channel, c: [N, C, ...], emb: [B, C]. `saved` comes from
/// [`batchnorm::batchnorm_stats`] of c; `bn_name` labels BN's backward nodes.
#[derive(Debug, Clone)]
pub struct BnInput {
    pub c: TensorId,
    pub bn: BnParams,
    pub saved: BnSaved,
    pub emb: Option<TensorId>,
    pub bn_name: String,
}

/// [`neuron_forward_train`] of the x that `input` describes, without x ever being stored: the
/// forward computes it in registers from c (the same float operations as `bn_train_apply` and
/// `elementwise::add_channel`, so the same spikes), and the backward recomputes it from c, which
/// BN's backward keeps anyway. One tape entry: its backward is the neuron's (to dL/dx), then BN's
/// ([`batchnorm::batchnorm_train_backward`]) and the term's (a sum over T and pixels) from dL/dx.
/// Returns the spikes.
pub fn neuron_forward_train_bn(g: &mut Graph, input: BnInput, t: usize, cfg: Neuron, name: &str) -> TensorId {
    let c = input.c;
    let n = neurons_per_step(g, c, t, name);
    let shape = g.shape(c).to_vec();
    assert!(shape.len() >= 2, "{name}: the BN input must be [N, C, ...], got {shape:?}");
    let (ch, hw) = (shape[1], shape[2..].iter().product::<usize>());
    let b = shape[0] / t;
    if let Some(emb) = input.emb {
        assert_eq!(g.shape(emb), [b, ch], "{name}: the added term must be [B, C] = [{b}, {ch}]");
    }
    let groups = input.bn.groups;
    assert!(
        groups.count == 1 || groups.batch == b,
        "{name}: BatchNorm groups of a batch of {} on a batch of {b}",
        groups.batch
    );
    let params = NeuronParams {
        c: size_u32(ch),
        hw: size_u32(hw),
        b: size_u32(b),
        has_emb: input.emb.is_some() as u32,
        bn_groups: size_u32(input.bn.groups.count),
        ..cfg.params(n, t)
    };
    // Without a term the emb binding is a placeholder the kernels do not read.
    let reads = vec![c, input.bn.weight, input.bn.bias, input.saved.mean, input.saved.invstd, input.emb.unwrap_or(c)];
    let s = g.intermediate_as(name, &shape, DType::Spike);
    let (entry, workgroups) = if n.is_multiple_of(32) {
        ("neuron_forward_affine_aligned", grid_1d(n, 32))
    } else {
        ("neuron_forward_affine", grid_1d((n * t).div_ceil(32), 256))
    };
    let per_channel = 4 * ch + input.emb.map_or(0, |_| b * ch);
    g.push_typed(
        Node {
            shader: &SHADER,
            entry,
            params: params.words(),
            reads: reads.clone(),
            writes: vec![s],
            workgroups,
            label: name.to_string(),
            cost: Cost {
                flops: (6 + input.emb.is_some() as u64) * (n * t) as u64,
                bytes: g.bytes_of(c) + 4 * per_channel as u64 + g.bytes_of(s),
            },
        },
        &[DType::F32; 6],
        &[DType::Spike],
    );
    let label = name.to_string();
    let mut inputs = vec![c, input.bn.weight, input.bn.bias];
    inputs.extend(input.emb);
    g.record(name, inputs, vec![s], move |g, go, needs| {
        let Some(gs) = go[0] else { return vec![None; needs.len()] };
        let dx = g.intermediate(&format!("{label}.grad_input"), &shape);
        let mut backward_reads = reads.clone();
        backward_reads.push(gs);
        g.push(Node {
            shader: &SHADER,
            entry: "neuron_backward_affine",
            params: params.words(),
            reads: backward_reads,
            writes: vec![dx],
            workgroups: grid_1d(n, 256),
            label: format!("{label}.backward"),
            // gs and c read, h parked in dx and read back, dx written.
            cost: Cost { flops: 20 * (n * t) as u64, bytes: 20 * (n * t) as u64 },
        });
        let bn_needs = [needs[0], needs[1], needs[2]];
        let mut grads =
            batchnorm::batchnorm_train_backward(g, dx, c, input.bn, input.saved, bn_needs, &input.bn_name).to_vec();
        if input.emb.is_some() {
            grads.push(needs[3].then(|| reduce::group_sum(g, dx, b, &format!("{label}.grad_bias"))));
        }
        grads
    });
    s
}

/// CPU reference of the input [`neuron_forward_train_bn`] computes: BN-apply with the batch
/// statistics (mean, invstd), then the term, in the kernels' order.
#[allow(clippy::too_many_arguments)]
pub fn bn_input_cpu(
    cv: &[f32],
    c: usize,
    hw: usize,
    w: &[f32],
    bias: &[f32],
    mean: &[f32],
    invstd: &[f32],
    emb: Option<(&[f32], usize)>,
) -> Vec<f32> {
    cv.iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / hw) % c;
            let alpha = w[ch] * invstd[ch];
            let y = v * alpha + (bias[ch] - mean[ch] * alpha);
            emb.map_or(y, |(e, b)| y + e[((i / (hw * c)) % b) * c + ch])
        })
        .collect()
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
