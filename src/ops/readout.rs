//! The membrane output layer: eps_hat = sum_t decay^(T-1-t) h[t] (decay 0.8 in the reference).

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Graph, Node, Params, TensorId};
use crate::ops::pointwise_cost;
use crate::shader;

pub static SHADER: Shader = shader!(trusted "readout");

/// Uniform parameters of `membrane_readout` and its backward (WGSL `Params`): `m` outputs,
/// `t` spiking steps, the membrane decay.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ReadoutParams {
    pub m: u32,
    pub t: u32,
    pub decay: f32,
    pub _pad: u32,
}

/// The reference's decay (MembraneOutputLayer, from FSVAE).
pub const DECAY: f32 = 0.8;

/// h: [T*B, ...] time-major -> [B, ...].
pub fn membrane_readout(g: &mut Graph, h: TensorId, t: usize, decay: f32, name: &str) -> TensorId {
    let s = g.shape(h).to_vec();
    assert!(t > 0 && s[0].is_multiple_of(t), "{name}: leading dim {} is not a multiple of T = {t}", s[0]);
    let mut out_shape = s.clone();
    out_shape[0] = s[0] / t;
    let y = g.intermediate(name, &out_shape);
    let m = g.info(y).numel();
    let params = ReadoutParams { m: size_u32(m), t: size_u32(t), decay, _pad: 0 };
    g.push(Node {
        shader: &SHADER,
        entry: "membrane_readout",
        params: Params::of(&params),
        reads: vec![h],
        writes: vec![y],
        workgroups: grid_1d(m, 256),
        label: name.to_string(),
        cost: pointwise_cost(m, m * t, 2 * t as u64),
    });
    let label = name.to_string();
    g.record(name, vec![h], vec![y], move |g, go, _| {
        let Some(dy) = go[0] else { return vec![None] };
        let dh = g.intermediate(&format!("{label}.backward"), &s);
        g.push(Node {
            shader: &SHADER,
            entry: "readout_backward",
            params: Params::of(&params),
            reads: vec![dy],
            writes: vec![dh],
            workgroups: grid_1d(m, 256),
            label: format!("{label}.backward"),
            cost: pointwise_cost(m * t, m, t as u64),
        });
        vec![Some(dh)]
    });
    y
}

/// CPU reference of the backward of [`membrane_readout`].
pub fn membrane_readout_backward_cpu(dy: &[f32], t: usize, decay: f32) -> Vec<f32> {
    let w = readout_weights(t, decay);
    w.iter().flat_map(|&ws| dy.iter().map(move |&g| ws * g)).collect()
}

/// The readout weights decay^(T-1-t), built by repeated multiplication from t = T-1 down.
pub fn readout_weights(t: usize, decay: f32) -> Vec<f32> {
    (0..t).map(|step| (step + 1..t).fold(1f32, |w, _| w * decay)).collect()
}

/// CPU reference of [`membrane_readout`].
pub fn membrane_readout_cpu(h: &[f32], t: usize, decay: f32) -> Vec<f32> {
    let m = h.len() / t;
    let w = readout_weights(t, decay);
    (0..m).map(|i| (0..t).fold(0f32, |acc, step| acc + w[step] * h[step * m + i])).collect()
}
