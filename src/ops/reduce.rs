//! Deterministic reductions: grouped channel sums (bias and time-embedding gradients), the
//! running sum of squares behind the global gradient norm, and the eps-MSE loss.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, DType, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "reduce", uses "tree_sum");

/// Uniform parameters of every reduction (WGSL `Params`): `n` values, or `n` rows of `c`
/// channels and `s` positions summed into `b` groups; `sumsq_acc` reads `b` = 1 as "first".
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ReduceParams {
    pub n: u32,
    pub c: u32,
    pub s: u32,
    pub b: u32,
}

/// Parameters of a reduction over `n` flat values.
fn flat(n: usize) -> ReduceParams {
    ReduceParams { n: size_u32(n), c: 0, s: 0, b: 0 }
}

/// y[b, c] = sum over r, s of x[r*B + b, c, s]; x: [N, C, ...] with N a multiple of `groups` (B),
/// f32 or bit-packed spikes (then y counts spikes).
pub fn group_sum(g: &mut Graph, x: TensorId, groups: usize, name: &str) -> TensorId {
    let s = g.shape(x).to_vec();
    assert!(s.len() >= 2 && s[0].is_multiple_of(groups), "{name}: cannot group {s:?} into {groups}");
    let (n, c) = (s[0], s[1]);
    let sp: usize = s[2..].iter().product();
    let y = g.intermediate(name, &[groups, c]);
    let xd = g.dtype(x);
    let entry = if xd == DType::Spike { "group_sum_spikes" } else { "group_sum" };
    let bytes = g.bytes_of(x) + 4 * (groups * c) as u64;
    g.push_typed(
        Node {
            shader: &SHADER,
            entry,
            params: Params::of(&ReduceParams { n: size_u32(n), c: size_u32(c), s: size_u32(sp), b: size_u32(groups) }),
            reads: vec![x],
            writes: vec![y],
            workgroups: [(groups * c) as u32, 1, 1],
            label: name.to_string(),
            cost: Cost { flops: (n * c * sp) as u64, bytes },
        },
        &[xd],
        &[DType::F32],
    );
    y
}

/// acc[0] += sum(x^2) (acc[0] = sum(x^2) when `first`); nodes appended in a fixed order give a
/// fixed summation order.
pub fn sumsq_acc(g: &mut Graph, x: TensorId, acc: TensorId, first: bool, name: &str) {
    let n = g.info(x).numel();
    g.push(Node {
        shader: &SHADER,
        entry: "sumsq_acc",
        params: Params::of(&ReduceParams { b: first as u32, ..flat(n) }),
        reads: vec![x],
        writes: vec![acc],
        workgroups: [1, 1, 1],
        label: name.to_string(),
        cost: Cost { flops: 2 * n as u64, bytes: 4 * n as u64 },
    });
}

/// loss = mean((a - b)^2) as a [1] tensor; differentiable in `a`.
pub fn mse_loss(g: &mut Graph, a: TensorId, b: TensorId, name: &str) -> TensorId {
    assert_eq!(g.shape(a), g.shape(b), "{name}: MSE needs equal shapes");
    let n = g.info(a).numel();
    let loss = g.intermediate(name, &[1]);
    g.push(Node {
        shader: &SHADER,
        entry: "mse_loss",
        params: Params::of(&flat(n)),
        reads: vec![a, b],
        writes: vec![loss],
        workgroups: [1, 1, 1],
        label: name.to_string(),
        cost: Cost { flops: 3 * n as u64, bytes: 8 * n as u64 },
    });
    let label = name.to_string();
    g.record(name, vec![a, b], vec![loss], move |g, go, needs| {
        let gl = go[0].expect("loss gradient");
        let shape = g.shape(a).to_vec();
        let d = g.intermediate(&format!("{label}.grad"), &shape);
        g.push(Node {
            shader: &SHADER,
            entry: "mse_grad",
            params: Params::of(&flat(n)),
            reads: vec![a, b, gl],
            writes: vec![d],
            workgroups: grid_1d(n, 256),
            label: format!("{label}.backward"),
            cost: Cost { flops: 4 * n as u64, bytes: 12 * n as u64 },
        });
        vec![needs[0].then_some(d), None]
    });
    loss
}

/// CPU reference of [`group_sum`] (f64 accumulation).
pub fn group_sum_cpu(x: &[f32], n: usize, c: usize, s: usize, groups: usize) -> Vec<f32> {
    let mut y = vec![0f64; groups * c];
    for i in 0..n {
        for ch in 0..c {
            for k in 0..s {
                y[(i % groups) * c + ch] += x[(i * c + ch) * s + k] as f64;
            }
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

/// CPU reference of [`mse_loss`] and its gradient (f64 accumulation).
pub fn mse_cpu(a: &[f32], b: &[f32]) -> (f32, Vec<f32>) {
    let n = a.len() as f64;
    let loss = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / n;
    (loss as f32, a.iter().zip(b).map(|(x, y)| 2.0 * (x - y) / n as f32).collect())
}
