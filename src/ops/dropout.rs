//! Training-mode dropout whose mask is counter-based noise (Philox keyed by seed and training
//! step, like the sampler's and q_sample's), so training stays deterministic and resumable and
//! the backward recomputes the mask instead of storing it.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Graph, Node, Params, TensorId};
use crate::ops::pointwise_cost;
use crate::ops::sampler::{philox4x32, STREAM_DROPOUT};
use crate::shader;

pub static SHADER: Shader = shader!("dropout", uses "index", "philox");

/// Uniform parameters of `dropout` (WGSL `Params`): `numel` values, the layer's index in the
/// mask counter, the mask threshold and the survivors' scale 1 / (1 - p).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct DropoutParams {
    pub numel: u32,
    pub layer: u32,
    pub threshold: u32,
    pub _pad: u32,
    pub scale: f32,
    pub _pad1: u32,
    pub _pad2: u32,
    pub _pad3: u32,
}

/// The 4 words of a dropout key tensor: (seed_lo, seed_hi, step, 0).
pub fn key_words(seed: u64, step: u32) -> [u32; 4] {
    [seed as u32, (seed >> 32) as u32, step, 0]
}

/// Mask threshold on Philox's first output word: an element survives when it is >= this.
fn threshold(p: f32) -> u32 {
    (p as f64 * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
}

fn node(g: &mut Graph, x: TensorId, key: TensorId, p: f32, layer: usize, name: &str) -> TensorId {
    let n = g.info(x).numel();
    let shape = g.shape(x).to_vec();
    let y = g.intermediate(name, &shape);
    let params = DropoutParams {
        numel: size_u32(n),
        layer: size_u32(layer),
        threshold: threshold(p),
        _pad: 0,
        scale: 1.0 / (1.0 - p),
        _pad1: 0,
        _pad2: 0,
        _pad3: 0,
    };
    g.push(Node {
        shader: &SHADER,
        entry: "dropout",
        params: Params::of(&params),
        reads: vec![x, key],
        writes: vec![y],
        workgroups: grid_1d(n, 256),
        label: name.to_string(),
        cost: pointwise_cost(n, n, 1),
    });
    y
}

/// y = x * keep / (1 - p), keep drawn per element from (seed, step) in `key` (a [4] u32 tensor,
/// see [`key_words`]) and `layer` (distinct per dropout layer). 0 <= p < 1.
pub fn dropout(g: &mut Graph, x: TensorId, p: f32, key: TensorId, layer: usize, name: &str) -> TensorId {
    assert!((0.0..1.0).contains(&p), "{name}: dropout probability {p} is outside [0, 1)");
    assert_eq!(g.shape(key), [4], "{name}: the dropout key must be a [4] tensor");
    let y = node(g, x, key, p, layer, name);
    let label = name.to_string();
    g.record(name, vec![x], vec![y], move |g, go, _| {
        let Some(dy) = go[0] else { return vec![None] };
        vec![Some(node(g, dy, key, p, layer, &format!("{label}.backward")))]
    });
    y
}

/// CPU reference of [`dropout`] (and of its backward, applied to the upstream gradient).
pub fn dropout_cpu(x: &[f32], p: f32, key: [u32; 4], layer: usize) -> Vec<f32> {
    let (thr, scale) = (threshold(p), 1.0 / (1.0 - p));
    x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let r = philox4x32([i as u32, layer as u32, key[2], STREAM_DROPOUT], [key[0], key[1]]);
            if r[0] >= thr {
                v * scale
            } else {
                0.0
            }
        })
        .collect()
}
