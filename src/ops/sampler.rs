//! The on-GPU sampling loop's kernels (begin step, fused update, advance) and the counter-based
//! Gaussian generator they use, with CPU references.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, DType, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!("sampler", uses "index", "philox");

/// Width of one row of the per-step coefficient table.
pub const COEF_ROW: usize = 8;

/// The update rule of one step (see shaders/sampler.wgsl).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ancestral = 0,
    Final = 1,
    Ddim = 2,
}

/// One row of the coefficient table, in f32 as the kernels use it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoef {
    pub t: u32,
    pub mode: Mode,
    pub a: f32,
    pub b: f32,
    pub c1: f32,
    pub c2: f32,
    pub c3: f32,
    pub sigma: f32,
}

impl StepCoef {
    pub fn row(&self) -> [f32; COEF_ROW] {
        [
            f32::from_bits(self.t),
            f32::from_bits(self.mode as u32),
            self.a,
            self.b,
            self.c1,
            self.c2,
            self.c3,
            self.sigma,
        ]
    }
}

/// Per-batch values of the sampling kernels: which images (for the noise) and the seed.
#[derive(Debug, Clone, Copy)]
pub struct NoiseKey {
    pub seed: u64,
    pub image_base: u32,
}

/// Uniform parameters of every sampler entry (WGSL `Params`): `numel` elements of
/// `per_image` each, `batch` images (the noise step in `gaussian_fill` and `q_sample`), the first
/// image's global index and the seed; `z_source` 1 reads the noise from a buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SamplerParams {
    pub numel: u32,
    pub per_image: u32,
    pub batch: u32,
    pub image_base: u32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub z_source: u32,
    pub _pad: u32,
}

fn params(numel: usize, per_image: usize, batch: usize, key: NoiseKey, z_from_buffer: bool) -> Vec<u32> {
    Params::of(&SamplerParams {
        numel: size_u32(numel),
        per_image: size_u32(per_image),
        batch: size_u32(batch),
        image_base: key.image_base,
        seed_lo: key.seed as u32,
        seed_hi: (key.seed >> 32) as u32,
        z_source: z_from_buffer as u32,
        _pad: 0,
    })
}

/// Parameters of `begin_step` and `update` for a new batch (same length as compiled).
pub fn batch_params(x_numel: usize, batch: usize, key: NoiseKey) -> Vec<u32> {
    params(x_numel, x_numel / batch, batch, key, false)
}

/// begin_step: x = noise at step 0; t[b] = coef[step].t. `x` [B, ...], `t` [B] (u32).
pub fn begin_step(g: &mut Graph, coef: TensorId, step: TensorId, x: TensorId, t: TensorId, key: NoiseKey) -> usize {
    let batch = g.info(t).numel();
    let numel = g.info(x).numel();
    g.push_typed(
        Node {
            shader: &SHADER,
            entry: "begin_step",
            params: batch_params(numel, batch, key),
            reads: vec![coef, step],
            writes: vec![x, t],
            workgroups: grid_1d(numel.max(batch), 256),
            label: "sampler.begin_step".into(),
            cost: Cost { flops: 0, bytes: 4 * batch as u64 },
        },
        &[DType::F32, DType::U32],
        &[DType::F32, DType::U32],
    );
    g.nodes.len() - 1
}

/// The fused update: x0 prediction, clamp, posterior mean (or DDIM step), fresh noise; in place
/// on x. With `z` given, noise is read from it instead of generated (for tests).
pub fn update(
    g: &mut Graph,
    coef: TensorId,
    step: TensorId,
    eps: TensorId,
    x: TensorId,
    z: Option<TensorId>,
    key: NoiseKey,
) -> usize {
    let numel = g.info(x).numel();
    let batch = g.shape(x)[0];
    g.push_typed(
        Node {
            shader: &SHADER,
            entry: "update",
            params: params(numel, numel / batch, batch, key, z.is_some()),
            reads: vec![coef, step, eps, z.unwrap_or(eps)],
            writes: vec![x],
            workgroups: grid_1d(numel, 256),
            label: "sampler.update".into(),
            cost: Cost { flops: 12 * numel as u64, bytes: 12 * numel as u64 },
        },
        &[DType::F32, DType::U32, DType::F32, DType::F32],
        &[DType::F32],
    );
    g.nodes.len() - 1
}

/// step[0] += 1.
pub fn advance(g: &mut Graph, step: TensorId) {
    g.push_typed(
        Node {
            shader: &SHADER,
            entry: "advance",
            params: Params::of(&SamplerParams::zeroed()), // advance reads none
            reads: vec![],
            writes: vec![step],
            workgroups: [1, 1, 1],
            label: "sampler.advance".into(),
            cost: Cost::default(),
        },
        &[],
        &[DType::U32],
    );
}

/// Gaussian noise of stream STEP at `step` for images image_base.. into `out` [B, per_image].
pub fn gaussian_fill(g: &mut Graph, out: TensorId, per_image: usize, step: u32, key: NoiseKey) {
    let numel = g.info(out).numel();
    g.push(Node {
        shader: &SHADER,
        entry: "gaussian_fill",
        params: params(numel, per_image, step as usize, key, false),
        reads: vec![],
        writes: vec![out],
        workgroups: grid_1d(numel, 256),
        label: "sampler.gaussian_fill".into(),
        cost: Cost { flops: 0, bytes: 4 * numel as u64 },
    });
}

/// Uniform words of [`q_sample`] for a training step: `step` keys the noise counter.
pub fn q_sample_params(numel: usize, batch: usize, seed: u64, step: u32, given: bool) -> Vec<u32> {
    q_sample_params_at(numel, batch, seed, step, given, 0)
}

/// [`q_sample_params`] for a batch whose first image has global index `image_base` (a rank's
/// share of a data-parallel batch): the noise of each image is keyed by its global index, so the
/// global batch's noise does not depend on the number of ranks.
pub fn q_sample_params_at(
    numel: usize,
    batch: usize,
    seed: u64,
    step: u32,
    given: bool,
    image_base: usize,
) -> Vec<u32> {
    let key = NoiseKey { seed, image_base: size_u32(image_base) };
    params(numel, numel / batch, step as usize, key, given)
}

/// The training forward process: x_t = a_b x0 + s_b noise with qcoef [B, 2] = (a_b, s_b);
/// noise from `noise` when given, else Philox (keyed per step by [`q_sample_params`]).
/// Returns (x_t, the noise used, node index).
pub fn q_sample(g: &mut Graph, qcoef: TensorId, x0: TensorId, noise: Option<TensorId>) -> (TensorId, TensorId, usize) {
    let shape = g.shape(x0).to_vec();
    let (batch, numel) = (shape[0], g.info(x0).numel());
    let x_t = g.intermediate("x_t", &shape);
    let noise_used = g.intermediate("noise", &shape);
    g.push(Node {
        shader: &SHADER,
        entry: "q_sample",
        params: q_sample_params(numel, batch, 0, 0, noise.is_some()),
        reads: vec![qcoef, x0, noise.unwrap_or(x0)],
        writes: vec![x_t, noise_used],
        workgroups: grid_1d(numel, 256),
        label: "q_sample".into(),
        cost: Cost { flops: 3 * numel as u64, bytes: 16 * numel as u64 },
    });
    (x_t, noise_used, g.nodes.len() - 1)
}

// ---- CPU references ------------------------------------------------------------------------

/// Philox4x32-10 (Salmon et al., SC'11).
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = 0xD251_1F53u64 * c[0] as u64;
        let p1 = 0xCD9E_8D57u64 * c[2] as u64;
        c = [(p1 >> 32) as u32 ^ c[1] ^ k[0], p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k[1], p0 as u32];
        k = [k[0].wrapping_add(0x9E37_79B9), k[1].wrapping_add(0xBB67_AE85)];
    }
    c
}

/// Stream ids of the noise counter.
pub const STREAM_STEP: u32 = 0;
pub const STREAM_INIT: u32 = 1;
pub const STREAM_TRAIN: u32 = 2;
/// Dropout masks (src/ops/dropout.rs).
pub const STREAM_DROPOUT: u32 = 3;

/// The Gaussian the kernels draw for (element, image, step, stream) under `seed`.
pub fn gaussian_cpu(seed: u64, element: u32, image: u32, step: u32, stream: u32) -> f32 {
    let r = philox4x32([element, image, step, stream], [seed as u32, (seed >> 32) as u32]);
    let u1 = ((r[0] >> 8) as f32 + 1.0) * (1.0 / 16_777_216.0);
    let u2 = (r[1] >> 8) as f32 * (1.0 / 16_777_216.0);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// CPU reference of one update (mode and coefficients from `c`) with given noise z.
pub fn update_cpu(c: &StepCoef, x: &[f32], eps: &[f32], z: &[f32]) -> Vec<f32> {
    x.iter()
        .zip(eps)
        .zip(z)
        .map(|((&xv, &e), &zv)| match c.mode {
            Mode::Final => ((xv - c.b * e) / c.a).clamp(-1.0, 1.0),
            Mode::Ddim => c.c1 * ((xv - c.b * e) / c.a).clamp(-1.0, 1.0) + c.c3 * e,
            Mode::Ancestral => {
                let x0 = (c.a * xv - c.b * e).clamp(-1.0, 1.0);
                c.c1 * x0 + c.c2 * xv + c.sigma * zv
            }
        })
        .collect()
}
