//! Pointwise ops: swish (SiLU), add, and the channel-broadcast add that injects the time
//! embedding over spiking steps and pixels.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Graph, Node, Params, TensorId};
use crate::ops::pointwise_cost;
use crate::shader;

pub static SHADER: Shader = shader!(trusted "elementwise", uses "index");

/// Uniform parameters of every elementwise entry (WGSL `Params`); `c`, `s`, `b` only for
/// `add_channel`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ElementwiseParams {
    pub numel: u32,
    pub c: u32,
    pub s: u32,
    pub b: u32,
}

/// Parameters of an entry that reads only `numel`.
fn flat(numel: usize) -> ElementwiseParams {
    ElementwiseParams { numel: size_u32(numel), c: 0, s: 0, b: 0 }
}

fn pointwise(
    g: &mut Graph,
    entry: &'static str,
    reads: Vec<TensorId>,
    params: ElementwiseParams,
    flops: u64,
    name: &str,
) -> TensorId {
    let shape = g.shape(reads[0]).to_vec();
    let numel = g.info(reads[0]).numel();
    let read_elems: usize = reads.iter().map(|&r| g.info(r).numel()).sum();
    let y = g.intermediate(name, &shape);
    g.push(Node {
        shader: &SHADER,
        entry,
        params: Params::of(&params),
        reads,
        writes: vec![y],
        workgroups: grid_1d(numel, 256),
        label: name.to_string(),
        cost: pointwise_cost(numel, read_elems, flops),
    });
    y
}

/// y = x * sigmoid(x).
pub fn swish(g: &mut Graph, x: TensorId, name: &str) -> TensorId {
    let n = g.info(x).numel();
    let y = pointwise(g, "swish", vec![x], flat(n), 4, name);
    let label = name.to_string();
    g.record(name, vec![x], vec![y], move |g, go, _| {
        let Some(dy) = go[0] else { return vec![None] };
        vec![Some(pointwise(g, "swish_backward", vec![x, dy], flat(n), 8, &format!("{label}.backward")))]
    });
    y
}

/// y = a + b (same shape).
pub fn add(g: &mut Graph, a: TensorId, b: TensorId, name: &str) -> TensorId {
    assert_eq!(g.shape(a), g.shape(b), "{name}: add needs equal shapes");
    let n = g.info(a).numel();
    let y = pointwise(g, "add", vec![a, b], flat(n), 1, name);
    g.record(name, vec![a, b], vec![y], move |_, go, needs| {
        vec![go[0].filter(|_| needs[0]), go[0].filter(|_| needs[1])]
    });
    y
}

/// y[n, c, ...] = x[n, c, ...] + e[n % B, c]; x: [N, C, ...] with N = T*B, e: [B, C].
pub fn add_channel(g: &mut Graph, x: TensorId, e: TensorId, name: &str) -> TensorId {
    let xs = g.shape(x).to_vec();
    let es = g.shape(e).to_vec();
    assert!(
        es.len() == 2 && xs.len() >= 2 && es[1] == xs[1] && xs[0].is_multiple_of(es[0]),
        "{name}: cannot broadcast {es:?} over {xs:?}"
    );
    let s: usize = xs[2..].iter().product();
    let n = g.info(x).numel();
    let params = ElementwiseParams { numel: size_u32(n), c: size_u32(xs[1]), s: size_u32(s), b: size_u32(es[0]) };
    let y = pointwise(g, "add_channel", vec![x, e], params, 1, name);
    let (label, groups) = (name.to_string(), es[0]);
    g.record(name, vec![x, e], vec![y], move |g, go, needs| {
        let Some(dy) = go[0] else { return vec![None, None] };
        let de = needs[1].then(|| crate::ops::reduce::group_sum(g, dy, groups, &format!("{label}.grad_bias")));
        vec![needs[0].then_some(dy), de]
    });
    y
}

/// CPU reference of the backward of [`swish`].
pub fn swish_backward_cpu(x: &[f32], dy: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let sg = 1.0 / (1.0 + (-v).exp());
            g * (sg + v * sg * (1.0 - sg))
        })
        .collect()
}

/// CPU reference of [`swish`].
pub fn swish_cpu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| v * (1.0 / (1.0 + (-v).exp()))).collect()
}

/// CPU reference of [`add`].
pub fn add_cpu(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// CPU reference of [`add_channel`]: x [N, C, S], e [B, C].
pub fn add_channel_cpu(x: &[f32], e: &[f32], c: usize, s: usize, b: usize) -> Vec<f32> {
    x.iter().enumerate().map(|(i, &v)| v + e[((i / (s * c)) % b) * c + (i / s) % c]).collect()
}
