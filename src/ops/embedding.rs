//! The sinusoidal diffusion-time embedding: the table (host-built, exactly as the reference) and
//! the per-sample row gather (GPU).

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{size_u32, DType, Graph, Node, Params, TensorId};
use crate::ops::pointwise_cost;
use crate::shader;

pub static SHADER: Shader = shader!("embedding");

/// Uniform parameters of `gather_rows` (WGSL `Params`): a [rows, d] table, `count` indices.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct GatherParams {
    pub rows: u32,
    pub d: u32,
    pub count: u32,
    pub _pad: u32,
}

/// The reference's frozen table [steps, d]: freq_i = exp(-(2i / d) * ln 10000) and
/// row t = [sin(t f_0), cos(t f_0), sin(t f_1), cos(t f_1), ...] (interleaved, not concatenated).
/// Computed in f32 step by step as PyTorch does (2i/d, times ln 10000 rounded to f32, exp, t * f).
pub fn timestep_table(steps: usize, d: usize) -> Vec<f32> {
    assert!(d.is_multiple_of(2), "time-embedding width must be even, got {d}");
    let ln = 10000f64.ln() as f32;
    let freq: Vec<f32> = (0..d / 2).map(|i| ((-((2 * i) as f32)) / d as f32 * ln).exp()).collect();
    let mut table = Vec::with_capacity(steps * d);
    for t in 0..steps {
        for &f in &freq {
            let ang = t as f32 * f;
            table.push(ang.sin());
            table.push(ang.cos());
        }
    }
    table
}

/// out[b, :] = table[idx[b], :]; table [rows, d], idx [count] (u32 words) -> [count, d].
pub fn gather_rows(g: &mut Graph, table: TensorId, idx: TensorId, name: &str) -> TensorId {
    let ts = g.shape(table).to_vec();
    assert_eq!(ts.len(), 2, "{name}: table must be [rows, d]");
    let count = g.info(idx).numel();
    let out = g.intermediate(name, &[count, ts[1]]);
    g.push_typed(
        Node {
            shader: &SHADER,
            entry: "gather_rows",
            params: Params::of(&GatherParams {
                rows: size_u32(ts[0]),
                d: size_u32(ts[1]),
                count: size_u32(count),
                _pad: 0,
            }),
            reads: vec![table, idx],
            writes: vec![out],
            workgroups: crate::graph::grid_1d(count * ts[1], 256),
            label: name.to_string(),
            cost: pointwise_cost(count * ts[1], count * ts[1] + count, 0),
        },
        &[DType::F32, DType::U32],
        &[DType::F32],
    );
    out
}

/// CPU reference of [`gather_rows`].
pub fn gather_rows_cpu(table: &[f32], d: usize, idx: &[u32]) -> Vec<f32> {
    idx.iter().flat_map(|&i| table[i as usize * d..(i as usize + 1) * d].iter().copied()).collect()
}
