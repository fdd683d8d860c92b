//! Deterministic reductions: grouped channel sums (bias and time-embedding gradients), the sum of
//! squares behind the global gradient norm (over gradient arenas, or one tensor at a time), and
//! the eps-MSE loss.

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

/// Workgroups a sliced reduction aims for: about 8 per SM of a 132-SM GPU.
pub const WIDE_WORKGROUPS: usize = 1024;

/// A reduction with this many outputs (one workgroup each) is wide enough in one pass: two
/// workgroups per SM of a 132-SM card (an H100 SXM; an A100 has 108 SMs, an RTX 4090 128).
pub const NARROW_WORKGROUPS: usize = 264;

/// A reduction over at most this many bytes stays in one pass: a second dispatch would cost more
/// than the width buys (and small nets keep the summation order, and the bits, they always had).
pub const SMALL_BYTES: usize = 1 << 20;

/// Fewest values one workgroup of a sliced reduction sums (4 per invocation).
pub const MIN_SLICE: usize = 1024;

/// How many slices a channel reduction cuts each of its `outputs` outputs' `m` f32 values into:
/// one where the outputs alone fill a large GPU or the data is small, else enough for
/// [`WIDE_WORKGROUPS`] workgroups with none shorter than [`MIN_SLICE`]. group_sum and BatchNorm's
/// training reductions cut alike (so BN's backward can leave the channel sums group_sum would
/// compute).
pub fn group_slices(outputs: usize, m: usize) -> usize {
    if outputs >= NARROW_WORKGROUPS || 4 * outputs * m <= SMALL_BYTES {
        return 1;
    }
    WIDE_WORKGROUPS.div_ceil(outputs).min(m.div_ceil(MIN_SLICE)).max(1)
}

/// y[b, c] = sum over r, s of x[r*B + b, c, s]; x: [N, C, ...] with N a multiple of `groups` (B),
/// f32 or bit-packed spikes (then y counts spikes). Where B*C workgroups are too few for the data
/// ([`group_slices`]), each output's values are summed in P slices and a final pass adds the P
/// partials in order: the same bits every run. Where the kernel that wrote x left its channel
/// sums ([`crate::graph::PartialSums`]) and they fit this grouping, only that final pass runs.
pub fn group_sum(g: &mut Graph, x: TensorId, groups: usize, name: &str) -> TensorId {
    let s = g.shape(x).to_vec();
    assert!(s.len() >= 2 && s[0].is_multiple_of(groups), "{name}: cannot group {s:?} into {groups}");
    let (n, c) = (s[0], s[1]);
    let sp: usize = s[2..].iter().product();
    let outputs = groups * c;
    let y = g.intermediate(name, &[groups, c]);
    // Rows of single images map onto any grouping of them; blocks of images only onto one group.
    if let Some(ps) =
        g.partial_sums.get(&x).copied().filter(|ps| groups == 1 || (ps.per_image && ps.rows.is_multiple_of(groups)))
    {
        push_final(g, ps.part, y, outputs, ps.rows / groups, ps.slices, name);
        return y;
    }
    let xd = g.dtype(x);
    let slices = if xd == DType::Spike { 1 } else { group_slices(outputs, n / groups * sp) };
    let entry = match xd {
        DType::Spike => "group_sum_spikes",
        _ if sp.is_multiple_of(4) => "group_sum_vec4",
        _ => "group_sum",
    };
    let params = ReduceParams { n: size_u32(n), c: size_u32(c), s: size_u32(sp), b: size_u32(groups) };
    let part = if slices > 1 { g.intermediate(&format!("{name}.partials"), &[outputs, slices]) } else { y };
    g.push_typed(
        Node {
            shader: &SHADER,
            entry,
            params: Params::of(&params),
            reads: vec![x],
            writes: vec![part],
            workgroups: [size_u32(outputs), size_u32(slices), 1],
            label: if slices > 1 { format!("{name}.partials") } else { name.to_string() },
            cost: Cost { flops: (n * c * sp) as u64, bytes: g.bytes_of(x) + g.bytes_of(part) },
        },
        &[xd],
        &[DType::F32],
    );
    if slices > 1 {
        push_final(g, part, y, outputs, 1, slices, name);
    }
    y
}

/// y[o] = sum over j < rows of (sum over q < slices of part[(j * outputs + o) * slices + q]): each
/// row's slices in order, then the rows in order.
fn push_final(g: &mut Graph, part: TensorId, y: TensorId, outputs: usize, rows: usize, slices: usize, name: &str) {
    assert_eq!(g.info(part).numel(), rows * outputs * slices, "{name}: partials do not match the outputs");
    let u = size_u32;
    g.push(Node {
        shader: &SHADER,
        entry: "group_sum_final",
        params: Params::of(&ReduceParams { n: u(outputs), c: 0, s: u(slices), b: u(rows) }),
        reads: vec![part],
        writes: vec![y],
        workgroups: grid_1d(outputs, 256),
        label: name.to_string(),
        cost: Cost { flops: (outputs * rows * slices) as u64, bytes: g.bytes_of(part) + g.bytes_of(y) },
    });
}

/// The sum of squares of every member of the arenas `arenas` (each with its chunk table, as
/// [`crate::graph::Layout::chunks`] at [`crate::graph::ARENA_CHUNK`] makes it): one workgroup per
/// chunk writes its partial, then one workgroup adds the partials in order. Returns the [1] sum.
pub fn sumsq_arenas(g: &mut Graph, arenas: &[(TensorId, TensorId)], name: &str) -> TensorId {
    let counts: Vec<usize> = arenas.iter().map(|&(_, chunks)| g.shape(chunks)[0]).collect();
    let total: usize = counts.iter().sum();
    let part = g.intermediate(&format!("{name}.partials"), &[total.max(1)]);
    let mut first = 0;
    for (k, (&(arena, chunks), &count)) in arenas.iter().zip(&counts).enumerate() {
        assert_eq!(g.shape(chunks), [count, 2], "{name}: a chunk table is [chunks, 2]");
        let numel = g.info(arena).numel();
        g.push_typed(
            Node {
                shader: &SHADER,
                entry: "sumsq_partials",
                params: Params::of(&ReduceParams { n: size_u32(count), c: 0, s: 0, b: size_u32(first) }),
                reads: vec![arena, chunks],
                writes: vec![part],
                workgroups: grid_1d(count, 1),
                label: format!("{name}.partials.{k}"),
                cost: Cost { flops: 2 * numel as u64, bytes: g.bytes_of(arena) + 12 * count as u64 },
            },
            &[DType::F32, DType::U32],
            &[DType::F32],
        );
        first += count;
    }
    let sumsq = g.intermediate(name, &[1]);
    g.push(Node {
        shader: &SHADER,
        entry: "sumsq_final",
        params: Params::of(&flat(total)),
        reads: vec![part],
        writes: vec![sumsq],
        workgroups: [1, 1, 1],
        label: format!("{name}.final"),
        cost: Cost { flops: total as u64, bytes: 4 * total as u64 + 4 },
    });
    sumsq
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

/// CPU reference of [`sumsq_arenas`] and [`sumsq_acc`]: the sum of squares of every value (f64).
pub fn sumsq_cpu<'a>(tensors: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    tensors.into_iter().flatten().map(|&v| (v as f64).powi(2)).sum::<f64>() as f32
}

/// CPU reference of [`mse_loss`] and its gradient (f64 accumulation).
pub fn mse_cpu(a: &[f32], b: &[f32]) -> (f32, Vec<f32>) {
    let n = a.len() as f64;
    let loss = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / n;
    (loss as f32, a.iter().zip(b).map(|(x, y)| 2.0 * (x - y) / n as f32).collect())
}
