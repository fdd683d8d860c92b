//! Calibration kernels: an FMA-bound and a bandwidth-bound dispatch whose only purpose is to
//! measure what an adapter can do (`devices --bench`, the profiler's % of peak columns). They
//! are ops like any other so the graph's timestamps time them and the tests check them.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, Cost, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!("calibrate");

/// Flops one invocation of `fma_rate` does per round: 8 vec4 FMA chains of 2 flops per lane.
pub const FLOPS_PER_ROUND: u64 = 8 * 4 * 2;

/// Uniform parameters of `fma_rate` (WGSL `FmaParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct FmaParams {
    pub n: u32,
    pub iters: u32,
    pub a: f32,
    pub b: f32,
}

/// Uniform parameters of `copy_rate` (WGSL `CopyParams`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct CopyParams {
    pub n: u32,
    pub pad0: u32,
    pub pad1: u32,
    pub pad2: u32,
}

// Multiplier and addend keep every chain bounded (a fixed point near b / (1 - a)) whatever `iters`.
const FMA_A: f32 = 0.999;
const FMA_B: f32 = 0.001;

/// `n` invocations of `iters` FMA rounds each; returns the [n] per-invocation sums.
pub fn fma_rate(g: &mut Graph, n: usize, iters: usize, name: &str) -> TensorId {
    let out = g.intermediate(name, &[n]);
    let p = FmaParams { n: n as u32, iters: iters as u32, a: FMA_A, b: FMA_B };
    g.push(Node {
        shader: &SHADER,
        entry: "fma_rate",
        params: Params::of(&p),
        reads: vec![],
        writes: vec![out],
        workgroups: grid_1d(n, 256),
        label: name.to_string(),
        cost: Cost { flops: n as u64 * iters as u64 * FLOPS_PER_ROUND, bytes: 4 * n as u64 },
    });
    out
}

/// Copy `src` (numel a multiple of 4) into a new tensor, as vec4s.
pub fn copy_rate(g: &mut Graph, src: TensorId, name: &str) -> TensorId {
    let numel = g.info(src).numel();
    assert!(numel.is_multiple_of(4), "{name}: copy_rate copies vec4s; {numel} values is not a multiple of 4");
    let dst = g.intermediate(name, &[numel]);
    let n = numel / 4;
    let p = CopyParams { n: n as u32, pad0: 0, pad1: 0, pad2: 0 };
    g.push(Node {
        shader: &SHADER,
        entry: "copy_rate",
        params: Params::of(&p),
        reads: vec![src],
        writes: vec![dst],
        workgroups: grid_1d(n, 256),
        label: name.to_string(),
        cost: Cost { flops: 0, bytes: 8 * numel as u64 },
    });
    dst
}

/// CPU reference of [`fma_rate`], same operations in the same order (`mul_add` fuses; WGSL may not).
pub fn fma_rate_cpu(n: usize, iters: usize) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let mut total = 0f32;
            for j in 0..8u32 {
                let mut acc: [f32; 4] = std::array::from_fn(|c| ((i + 4 * j + c as u32) & 255) as f32 / 256.0);
                for _ in 0..iters {
                    for v in &mut acc {
                        *v = v.mul_add(FMA_A, FMA_B);
                    }
                }
                total += (acc[0] + acc[1]) + (acc[2] + acc[3]);
            }
            total
        })
        .collect()
}
