//! Data movement between U-Net stages: nearest 2x upsampling and channel concatenation.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, DType, Graph, Node, Params, TensorId};
use crate::ops::pointwise_cost;
use crate::shader;

pub static SHADER: Shader = shader!(trusted "layout", uses "index");

/// Uniform parameters of every layout entry (WGSL `Params`): `numel` elements; the upsamples
/// read `c`, `h`, `w`; concat and slice read `c`, `ca`, `cb`, `s`; repeat and sum read `s`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct LayoutParams {
    pub numel: u32,
    pub c: u32,
    pub h: u32,
    pub w: u32,
    pub ca: u32,
    pub cb: u32,
    pub s: u32,
    pub _pad: u32,
}

/// Parameters of the upsamples: `numel` elements (per the entry's doc) of [N, C, H, W] = `shape`,
/// the input's.
fn upsample_params(numel: usize, shape: &[usize]) -> LayoutParams {
    let [c, h, w] = [shape[1], shape[2], shape[3]].map(size_u32);
    LayoutParams { numel: size_u32(numel), c, h, w, ca: 0, cb: 0, s: 0, _pad: 0 }
}

/// Parameters of concat and slice along channels: `numel` outputs, `c` channels in the source
/// (slice only), channel parts `ca` and `cb`, `s` positions per channel.
fn channel_params(numel: usize, c: usize, ca: usize, cb: usize, s: usize) -> LayoutParams {
    let [numel, c, ca, cb, s] = [numel, c, ca, cb, s].map(size_u32);
    LayoutParams { numel, c, h: 0, w: 0, ca, cb, s, _pad: 0 }
}

/// Parameters of repeat_leading and sum_leading: `numel` elements of the repeated tensor, blocks
/// of `m`.
fn leading_params(numel: usize, m: usize) -> LayoutParams {
    LayoutParams { numel: size_u32(numel), c: 0, h: 0, w: 0, ca: 0, cb: 0, s: size_u32(m), _pad: 0 }
}

/// Nearest-neighbour x2 upsampling of [N, C, H, W] -> [N, C, 2H, 2W], of f32 values or of
/// bit-packed spikes (the output has the input's dtype; the gradient is f32 either way).
pub fn upsample2x(g: &mut Graph, x: TensorId, name: &str) -> TensorId {
    let s = g.shape(x).to_vec();
    assert_eq!(s.len(), 4, "{name}: upsample needs [N, C, H, W]");
    let dt = g.dtype(x);
    let y = g.intermediate_as(name, &[s[0], s[1], 2 * s[2], 2 * s[3]], dt);
    let numel = 4 * g.info(x).numel();
    let (entry, invocations) = match dt {
        DType::Spike => ("upsample2x_spikes", numel.div_ceil(32)),
        _ => ("upsample2x", numel),
    };
    let cost = Cost { flops: 0, bytes: g.bytes_of(x) + g.bytes_of(y) };
    g.push_typed(
        Node {
            shader: &SHADER,
            entry,
            params: Params::of(&upsample_params(numel, &s)),
            reads: vec![x],
            writes: vec![y],
            workgroups: grid_1d(invocations, 256),
            label: name.to_string(),
            cost,
        },
        &[dt],
        &[dt],
    );
    let label = name.to_string();
    g.record(name, vec![x], vec![y], move |g, go, _| {
        let Some(dy) = go[0] else { return vec![None] };
        let dx = g.intermediate(&format!("{label}.backward"), &s);
        g.push(Node {
            shader: &SHADER,
            entry: "upsample2x_backward",
            params: Params::of(&upsample_params(numel / 4, &s)),
            reads: vec![dy],
            writes: vec![dx],
            workgroups: grid_1d(numel / 4, 256),
            label: format!("{label}.backward"),
            cost: pointwise_cost(numel / 4, numel, 3),
        });
        vec![Some(dx)]
    });
    y
}

/// torch.cat([a, b], dim=1) of [N, Ca, ...] and [N, Cb, ...].
pub fn concat_channels(g: &mut Graph, a: TensorId, b: TensorId, name: &str) -> TensorId {
    let sa = g.shape(a).to_vec();
    let sb = g.shape(b).to_vec();
    assert!(
        sa.len() >= 2 && sa.len() == sb.len() && sa[0] == sb[0] && sa[2..] == sb[2..],
        "{name}: cannot concatenate {sa:?} and {sb:?} along channels"
    );
    let mut shape = sa.clone();
    shape[1] = sa[1] + sb[1];
    let s: usize = sa[2..].iter().product();
    let y = g.intermediate(name, &shape);
    let numel = g.info(y).numel();
    g.push(Node {
        shader: &SHADER,
        entry: "concat_channels",
        params: Params::of(&channel_params(numel, 0, sa[1], sb[1], s)),
        reads: vec![a, b],
        writes: vec![y],
        workgroups: grid_1d(numel, 256),
        label: name.to_string(),
        cost: pointwise_cost(numel, numel, 0),
    });
    let label = name.to_string();
    let ct = sa[1] + sb[1];
    g.record(name, vec![a, b], vec![y], move |g, go, needs| {
        let Some(dy) = go[0] else { return vec![None, None] };
        let slice = |g: &mut Graph, shape: &[usize], c0: usize, part: &str| {
            let out = g.intermediate(&format!("{label}.grad_{part}"), shape);
            let m = g.info(out).numel();
            g.push(Node {
                shader: &SHADER,
                entry: "slice_channels",
                params: Params::of(&channel_params(m, ct, c0, shape[1], s)),
                reads: vec![dy],
                writes: vec![out],
                workgroups: grid_1d(m, 256),
                label: format!("{label}.grad_{part}"),
                cost: pointwise_cost(m, m, 0),
            });
            out
        };
        let da = needs[0].then(|| slice(g, &sa, 0, "a"));
        let db = needs[1].then(|| slice(g, &sb, sa[1], "b"));
        vec![da, db]
    });
    y
}

/// x [B, ...] -> [reps * B, ...]: the block repeated along the leading axis (time-major).
pub fn repeat_leading(g: &mut Graph, x: TensorId, reps: usize, name: &str) -> TensorId {
    let mut shape = g.shape(x).to_vec();
    shape[0] *= reps;
    let m = g.info(x).numel();
    let y = g.intermediate(name, &shape);
    g.push(Node {
        shader: &SHADER,
        entry: "repeat_leading",
        params: Params::of(&leading_params(m * reps, m)),
        reads: vec![x],
        writes: vec![y],
        workgroups: grid_1d(m * reps, 256),
        label: name.to_string(),
        cost: pointwise_cost(m * reps, m, 0),
    });
    let label = name.to_string();
    let in_shape = g.shape(x).to_vec();
    g.record(name, vec![x], vec![y], move |g, go, _| {
        let Some(dy) = go[0] else { return vec![None] };
        let dx = g.intermediate(&format!("{label}.backward"), &in_shape);
        g.push(Node {
            shader: &SHADER,
            entry: "sum_leading",
            params: Params::of(&leading_params(m * reps, m)),
            reads: vec![dy],
            writes: vec![dx],
            workgroups: grid_1d(m, 256),
            label: format!("{label}.backward"),
            cost: pointwise_cost(m, m * reps, reps as u64),
        });
        vec![Some(dx)]
    });
    y
}

/// CPU reference of the backward of [`upsample2x`]: each input pixel sums its 4 copies.
pub fn upsample2x_backward_cpu(dy: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut dx = vec![0f32; n * c * h * w];
    for p in 0..n * c {
        for y in 0..h {
            for x in 0..w {
                let at = |oy: usize, ox: usize| dy[(p * 2 * h + oy) * 2 * w + ox];
                dx[(p * h + y) * w + x] =
                    (at(2 * y, 2 * x) + at(2 * y, 2 * x + 1)) + (at(2 * y + 1, 2 * x) + at(2 * y + 1, 2 * x + 1));
            }
        }
    }
    dx
}

/// CPU reference of [`repeat_leading`].
pub fn repeat_leading_cpu(x: &[f32], reps: usize) -> Vec<f32> {
    x.repeat(reps)
}

/// CPU reference of [`upsample2x`].
pub fn upsample2x_cpu(x: &[f32], [n, c, h, w]: [usize; 4]) -> Vec<f32> {
    let mut y = vec![0f32; n * c * 4 * h * w];
    for p in 0..n * c {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                y[(p * 2 * h + oy) * 2 * w + ox] = x[(p * h + oy / 2) * w + ox / 2];
            }
        }
    }
    y
}

/// CPU reference of [`concat_channels`]: a [N, Ca, S], b [N, Cb, S].
pub fn concat_channels_cpu(a: &[f32], b: &[f32], n: usize, ca: usize, cb: usize, s: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(a.len() + b.len());
    for i in 0..n {
        y.extend_from_slice(&a[i * ca * s..(i + 1) * ca * s]);
        y.extend_from_slice(&b[i * cb * s..(i + 1) * cb * s]);
    }
    y
}
