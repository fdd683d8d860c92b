//! Spiking self-attention core (Spikformer's SSA, no softmax): o = (q k^T) v * scale per row
//! (one image at one spiking step) and head, from spike tensors q, k, v [R, C, H, W], computed
//! as q (k^T v) so only the [d, d] matrix k^T v is materialised. The 1x1 convs, BatchNorms and
//! neurons around it are ordinary ops; the model wires them (sddpm-spec.md section 10.1).
//!
//! Both kernel forms and why they are exact: docs/kernels.md (Spiking self-attention).

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, size_u32, Cost, DType, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "spike_attention", uses "index");

/// Uniform parameters of every spiking-attention entry (WGSL `Params`): see [`Dims`]; `d` is
/// the head width C / heads and `scale` 1 / sqrt(N d).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct SpikeAttentionParams {
    pub rows: u32,
    pub c: u32,
    pub n: u32,
    pub heads: u32,
    pub d: u32,
    pub scale: f32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Shape of one attention call: rows R = T*B, channels C, positions N = H*W, heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub rows: usize,
    pub c: usize,
    pub n: usize,
    pub heads: usize,
}

impl Dims {
    pub fn d(&self) -> usize {
        self.c / self.heads
    }
    /// The [N, N] form (A = q k^T first) when N < d, else the [d, d] form (M = k^T v first):
    /// the intermediate is the smaller square, the result the same bits.
    pub fn n_form(&self) -> bool {
        self.n < self.d()
    }
    /// Side of the intermediate square per row and head.
    fn side(&self) -> usize {
        if self.n_form() {
            self.n
        } else {
            self.d()
        }
    }
    /// The reference's scale 1 / sqrt(N d), rounded once to f32 (as a Python float times an f32
    /// tensor is).
    pub fn scale(&self) -> f32 {
        (1.0 / ((self.n * self.d()) as f64).sqrt()) as f32
    }
    /// The two products as computed, for operation counts: (label suffix, the input whose
    /// spikes gate its accumulates, multiply-accumulates per row). d-form: k^T v (each k spike
    /// adds a row of v), then q M (each q spike adds a row of M). N-form: q k^T (each q spike adds
    /// a row of k), then A v (each v spike adds a column of A).
    pub fn products(&self) -> [(&'static str, &'static str, u64); 2] {
        let macs = (self.c * self.n * self.side()) as u64;
        if self.n_form() {
            [("qk", "q", macs), ("qkv", "v", macs)]
        } else {
            [("kv", "k", macs), ("qkv", "q", macs)]
        }
    }
    /// The dims a node of this family was built with (its uniform's first four words).
    pub fn of_params(words: &[u32]) -> Dims {
        let [rows, c, n, heads] = [0, 1, 2, 3].map(|i| words[i] as usize);
        Dims { rows, c, n, heads }
    }
    fn params(&self) -> Vec<u32> {
        let [rows, c, n, heads, d] = [self.rows, self.c, self.n, self.heads, self.d()].map(size_u32);
        Params::of(&SpikeAttentionParams { rows, c, n, heads, d, scale: self.scale(), _pad0: 0, _pad1: 0 })
    }
    fn sq_len(&self) -> usize {
        self.rows * self.heads * self.side() * self.side()
    }
    fn x_len(&self) -> usize {
        self.rows * self.c * self.n
    }
}

fn dims_of(g: &Graph, q: TensorId, k: TensorId, v: TensorId, heads: usize, name: &str) -> Dims {
    let s = g.shape(q).to_vec();
    assert!(s.len() == 4, "{name}: q must be [R, C, H, W], got {s:?}");
    assert!(g.shape(k) == s && g.shape(v) == s, "{name}: q, k and v must have equal shapes");
    assert!(heads > 0 && s[1].is_multiple_of(heads), "{name}: {heads} heads do not divide {} channels", s[1]);
    Dims { rows: s[0], c: s[1], n: s[2] * s[3], heads }
}

/// One dispatch of the shader: one invocation per 4x4 tile of its (first) output: the square
/// [side, side] per row and head, or the [d, N] slice of a head.
fn dispatch(
    g: &mut Graph,
    entry: &'static str,
    reads: Vec<TensorId>,
    writes: Vec<TensorId>,
    label: String,
    cost: Cost,
    dims: Dims,
) {
    let tiles = |len: usize| len.div_ceil(4);
    let side = dims.side();
    let len = match entry {
        "attention_kv" | "attention_qk" | "attention_grad_m" | "attention_grad_a" => {
            dims.rows * dims.heads * tiles(side) * tiles(side)
        }
        _ => dims.rows * dims.heads * tiles(dims.d()) * tiles(dims.n),
    };
    // Which reads are spikes (bit-packed), in binding order; the rest and all writes are f32.
    let (f, s) = (DType::F32, DType::Spike);
    let read_types: &[DType] = match entry {
        "attention_kv" | "attention_qk" => &[s, s],
        "attention_out" | "attention_grad_m" => &[s, f],
        "attention_av" | "attention_grad_a" => &[f, s],
        "attention_grad_qkv" | "attention_grad_qkv_n" => &[f, f, f, s, s],
        other => unreachable!("spike_attention has no entry {other}"),
    };
    let write_types = vec![f; writes.len()];
    g.push_typed(
        Node {
            shader: &SHADER,
            entry,
            params: dims.params(),
            reads,
            writes,
            workgroups: grid_1d(len, 256),
            label,
            cost,
        },
        read_types,
        &write_types,
    );
}

/// The product a forward node of this family computes ([`Dims::products`]), for operation
/// counts read off a built graph: (multiply-accumulates per row, the read whose spikes gate
/// them); None for any other node (backward included).
pub fn node_product(node: &Node) -> Option<(u64, TensorId)> {
    if node.shader.name != SHADER.name {
        return None;
    }
    let (product, gate) = match node.entry {
        // The first product reads (k, v) or (q, k), the second (q, M) or (A, v): the gate is
        // the input whose spikes select the rows added, as products() says.
        "attention_kv" | "attention_qk" => (0, node.reads[0]),
        "attention_out" => (1, node.reads[0]),
        "attention_av" => (1, node.reads[1]),
        _ => return None,
    };
    Some((Dims::of_params(&node.params).products()[product].2, gate))
}

/// o = (q k^T) v * scale, scale = 1 / sqrt(N d), per row and head; q, k, v spikes [R, C, H, W].
/// Nodes are labelled `{name}.kv` or `{name}.qk` (the first product, see [`Dims::products`]) and
/// `{name}.qkv`. Differentiable in q, k and v (the spikes' own gradients come from the neurons'
/// surrogates).
pub fn spike_attention(g: &mut Graph, q: TensorId, k: TensorId, v: TensorId, heads: usize, name: &str) -> TensorId {
    let dims = dims_of(g, q, k, v, heads, name);
    let side = dims.side();
    let [(first, _, _), (second, _, _)] = dims.products();
    let sq = g.intermediate(&format!("{name}.{first}"), &[dims.rows, dims.heads, side, side]);
    let shape = g.shape(q).to_vec();
    let o = g.intermediate(&format!("{name}.{second}"), &shape);
    let inner = if dims.n_form() { dims.d() } else { dims.n };
    // Spikes move one bit each (DType::Spike), floats four bytes.
    let (xn, sqn) = (dims.x_len() as u64, dims.sq_len() as u64);
    let cost1 = Cost { flops: 2 * sqn * inner as u64, bytes: 2 * xn.div_ceil(8) + 4 * sqn };
    let cost2 = Cost { flops: xn * (2 * side as u64 + 1), bytes: xn.div_ceil(8) + 4 * sqn + 4 * xn };
    let (e1, r1, e2, r2) = if dims.n_form() {
        ("attention_qk", vec![q, k], "attention_av", vec![sq, v])
    } else {
        ("attention_kv", vec![k, v], "attention_out", vec![q, sq])
    };
    dispatch(g, e1, r1, vec![sq], format!("{name}.{first}"), cost1, dims);
    dispatch(g, e2, r2, vec![o], format!("{name}.{second}"), cost2, dims);
    let label = name.to_string();
    g.record(name, vec![q, k, v], vec![o], move |g, go, _needs| {
        let Some(go) = go[0] else { return vec![None, None, None] };
        let [dq, dk, dv] = attention_backward(g, go, [q, k, v], sq, dims, &label);
        vec![Some(dq), Some(dk), Some(dv)]
    });
    o
}

/// Appends the backward: dS (the gradient of the intermediate square S, M or A), then dq, dk,
/// dv in one pass.
fn attention_backward(
    g: &mut Graph,
    go: TensorId,
    [q, k, v]: [TensorId; 3],
    sq: TensorId,
    dims: Dims,
    name: &str,
) -> [TensorId; 3] {
    let side = dims.side();
    let [(first, _, _), (second, _, _)] = dims.products();
    let dsq = g.intermediate(&format!("{name}.grad_{first}"), &[dims.rows, dims.heads, side, side]);
    let inner = if dims.n_form() { dims.d() } else { dims.n };
    let (xn, sqn) = (dims.x_len() as u64, dims.sq_len() as u64);
    let cost1 = Cost { flops: sqn * (2 * inner as u64 + 1), bytes: xn.div_ceil(8) + 4 * xn + 4 * sqn };
    let cost2 = Cost { flops: xn * (6 * side as u64 + 1), bytes: 2 * xn.div_ceil(8) + 16 * xn + 8 * sqn };
    let shape = g.shape(q).to_vec();
    let grads = ["q", "k", "v"].map(|x| g.intermediate(&format!("{name}.grad_{x}"), &shape));
    let (e1, r1, e2, r2) = if dims.n_form() {
        ("attention_grad_a", vec![go, v], "attention_grad_qkv_n", vec![go, sq, dsq, q, k])
    } else {
        ("attention_grad_m", vec![q, go], "attention_grad_qkv", vec![go, sq, dsq, k, v])
    };
    dispatch(g, e1, r1, vec![dsq], format!("{name}.{first}.backward"), cost1, dims);
    dispatch(g, e2, r2, grads.to_vec(), format!("{name}.{second}.backward"), cost2, dims);
    grads
}

/// CPU reference of [`spike_attention`] in the kernels' form and summation order (layout
/// [R, C, N]): d-form M = k^T v (n ascending), o = (q M, i ascending) * scale; N-form
/// A = q k^T (i ascending), o = (A v, m ascending) * scale.
pub fn spike_attention_cpu(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
    let (c, n, d, heads) = (dims.c, dims.n, dims.d(), dims.heads);
    let sq = square_cpu(q, k, v, dims);
    let mut o = vec![0f32; dims.x_len()];
    for r in 0..dims.rows {
        for ch in 0..c {
            let (h, j) = (ch / d, ch % d);
            for p in 0..n {
                let acc = if dims.n_form() {
                    let a0 = ((r * heads + h) * n + p) * n;
                    (0..n).fold(0f32, |acc, m| acc + sq[a0 + m] * v[(r * c + ch) * n + m])
                } else {
                    let m0 = (r * heads + h) * d * d + j;
                    (0..d).fold(0f32, |acc, i| acc + q[(r * c + h * d + i) * n + p] * sq[m0 + i * d])
                };
                o[(r * c + ch) * n + p] = acc * dims.scale();
            }
        }
    }
    o
}

/// The intermediate square per row and head: M = k^T v [d, d] or A = q k^T [N, N].
fn square_cpu(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
    let (c, n, d, heads, side) = (dims.c, dims.n, dims.d(), dims.heads, dims.side());
    let mut sq = vec![0f32; dims.sq_len()];
    for r in 0..dims.rows {
        for h in 0..heads {
            let x0 = (r * c + h * d) * n;
            for a in 0..side {
                for b in 0..side {
                    sq[((r * heads + h) * side + a) * side + b] = if dims.n_form() {
                        (0..d).fold(0f32, |acc, i| acc + q[x0 + i * n + a] * k[x0 + i * n + b])
                    } else {
                        (0..n).fold(0f32, |acc, p| acc + k[x0 + a * n + p] * v[x0 + b * n + p])
                    };
                }
            }
        }
    }
    sq
}

/// CPU reference of the backward: (dq, dk, dv) from go, in the kernels' form and summation
/// order. It treats q, k, v as real numbers (the op is trilinear in them), so finite
/// differences check it.
pub fn spike_attention_backward_cpu(
    go: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (c, n, d, heads, side) = (dims.c, dims.n, dims.d(), dims.heads, dims.side());
    let scale = dims.scale();
    let sq = square_cpu(q, k, v, dims);
    // dS: dM[i, j] = (sum_n q[i, n] go[j, n]) * scale, or dA[n, m] = (sum_j go[j, n] v[j, m]) * scale.
    let mut dsq = vec![0f32; dims.sq_len()];
    for r in 0..dims.rows {
        for h in 0..heads {
            let x0 = (r * c + h * d) * n;
            for a in 0..side {
                for b in 0..side {
                    let acc = if dims.n_form() {
                        (0..d).fold(0f32, |acc, j| acc + go[x0 + j * n + a] * v[x0 + j * n + b])
                    } else {
                        (0..n).fold(0f32, |acc, p| acc + q[x0 + a * n + p] * go[x0 + b * n + p])
                    };
                    dsq[((r * heads + h) * side + a) * side + b] = acc * scale;
                }
            }
        }
    }
    let (mut dq, mut dk, mut dv) = (vec![0f32; dims.x_len()], vec![0f32; dims.x_len()], vec![0f32; dims.x_len()]);
    for r in 0..dims.rows {
        for ch in 0..c {
            let (h, a) = (ch / d, ch % d);
            let s0 = (r * heads + h) * side * side;
            for p in 0..n {
                let idx = (r * c + ch) * n + p;
                if dims.n_form() {
                    let row0 = (r * c + ch) * n;
                    let (mut aq, mut ak, mut av) = (0f32, 0f32, 0f32);
                    for m in 0..n {
                        aq += dsq[s0 + p * n + m] * k[row0 + m];
                        ak += dsq[s0 + m * n + p] * q[row0 + m];
                        av += sq[s0 + m * n + p] * go[row0 + m];
                    }
                    (dq[idx], dk[idx], dv[idx]) = (aq, ak, av * scale);
                } else {
                    let x0 = (r * c + h * d) * n + p;
                    let (mut aq, mut ak, mut av) = (0f32, 0f32, 0f32);
                    for j in 0..d {
                        let at = x0 + j * n;
                        aq += go[at] * sq[s0 + a * d + j];
                        ak += v[at] * dsq[s0 + a * d + j];
                        av += k[at] * dsq[s0 + j * d + a];
                    }
                    (dq[idx], dk[idx], dv[idx]) = (aq * scale, ak, av);
                }
            }
        }
    }
    (dq, dk, dv)
}
