//! Spiking self-attention core (Spikformer's SSA, no softmax): o = (q k^T) v * scale per row
//! (one image at one spiking step) and head, from spike tensors q, k, v [R, C, H, W], computed
//! as q (k^T v) so only the [d, d] matrix k^T v is materialised. The 1x1 convs, BatchNorms and
//! neurons around it are ordinary ops; the model wires them (sddpm-spec.md section 10.1).

use crate::gpu::Shader;
use crate::graph::{grid_1d, Cost, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!("spike_attention");

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
    /// The reference's scale 1 / sqrt(N d), rounded once to f32 (as a Python float times an f32
    /// tensor is).
    pub fn scale(&self) -> f32 {
        (1.0 / ((self.n * self.d()) as f64).sqrt()) as f32
    }
    fn params(&self) -> Vec<u32> {
        Params::new().u(self.rows).u(self.c).u(self.n).u(self.heads).u(self.d()).f(self.scale()).build()
    }
    fn m_len(&self) -> usize {
        self.rows * self.heads * self.d() * self.d()
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

/// M = k^T v per row and head, [R, heads, d, d] (integer counts).
fn attention_kv(g: &mut Graph, k: TensorId, v: TensorId, dims: Dims, name: &str) -> TensorId {
    let d = dims.d();
    let m = g.intermediate(&format!("{name}.kv"), &[dims.rows, dims.heads, d, d]);
    g.push(Node {
        shader: &SHADER,
        entry: "attention_kv",
        params: dims.params(),
        reads: vec![k, v],
        writes: vec![m],
        workgroups: grid_1d(dims.m_len(), 256),
        label: format!("{name}.kv"),
        cost: Cost { flops: 2 * (dims.m_len() * dims.n) as u64, bytes: 4 * (2 * dims.x_len() + dims.m_len()) as u64 },
    });
    m
}

/// o = q M * scale, [R, C, H, W].
fn attention_out(g: &mut Graph, q: TensorId, m: TensorId, dims: Dims, name: &str) -> TensorId {
    let shape = g.shape(q).to_vec();
    let o = g.intermediate(&format!("{name}.qkv"), &shape);
    g.push(Node {
        shader: &SHADER,
        entry: "attention_out",
        params: dims.params(),
        reads: vec![q, m],
        writes: vec![o],
        workgroups: grid_1d(dims.x_len(), 256),
        label: format!("{name}.qkv"),
        cost: Cost {
            flops: (dims.x_len() * (2 * dims.d() + 1)) as u64,
            bytes: 4 * (2 * dims.x_len() + dims.m_len()) as u64,
        },
    });
    o
}

/// o = (q k^T) v * scale, scale = 1 / sqrt(N d), per row and head; q, k, v spikes [R, C, H, W].
/// Nodes are labelled `{name}.kv` (k^T v) and `{name}.qkv` (the product with q). Differentiable
/// in q, k and v (the spikes' own gradients come from the neurons' surrogates).
pub fn spike_attention(g: &mut Graph, q: TensorId, k: TensorId, v: TensorId, heads: usize, name: &str) -> TensorId {
    let dims = dims_of(g, q, k, v, heads, name);
    let m = attention_kv(g, k, v, dims, name);
    let o = attention_out(g, q, m, dims, name);
    let label = name.to_string();
    g.record(name, vec![q, k, v], vec![o], move |g, go, _needs| {
        let Some(go) = go[0] else { return vec![None, None, None] };
        let (dq, dk, dv) = attention_backward(g, go, q, k, v, m, dims, &label);
        vec![Some(dq), Some(dk), Some(dv)]
    });
    o
}

#[allow(clippy::too_many_arguments)]
fn attention_backward(
    g: &mut Graph,
    go: TensorId,
    q: TensorId,
    k: TensorId,
    v: TensorId,
    m: TensorId,
    dims: Dims,
    name: &str,
) -> (TensorId, TensorId, TensorId) {
    let d = dims.d();
    let dm = g.intermediate(&format!("{name}.grad_m"), &[dims.rows, dims.heads, d, d]);
    g.push(Node {
        shader: &SHADER,
        entry: "attention_grad_m",
        params: dims.params(),
        reads: vec![q, go],
        writes: vec![dm],
        workgroups: grid_1d(dims.m_len(), 256),
        label: format!("{name}.kv.backward"),
        cost: Cost {
            flops: (dims.m_len() * (2 * dims.n + 1)) as u64,
            bytes: 4 * (2 * dims.x_len() + dims.m_len()) as u64,
        },
    });
    let shape = g.shape(q).to_vec();
    let dq = g.intermediate(&format!("{name}.grad_q"), &shape);
    let dk = g.intermediate(&format!("{name}.grad_k"), &shape);
    let dv = g.intermediate(&format!("{name}.grad_v"), &shape);
    g.push(Node {
        shader: &SHADER,
        entry: "attention_grad_qkv",
        params: dims.params(),
        reads: vec![go, m, dm, k, v],
        writes: vec![dq, dk, dv],
        workgroups: grid_1d(dims.x_len(), 256),
        label: format!("{name}.qkv.backward"),
        cost: Cost {
            flops: (dims.x_len() * (6 * d + 1)) as u64,
            bytes: 4 * (6 * dims.x_len() + 2 * dims.m_len()) as u64,
        },
    });
    (dq, dk, dv)
}

/// CPU reference of [`spike_attention`], in the kernels' summation order: M = k^T v (n
/// ascending), then o = (q M, i ascending) * scale. Layout [R, C, N].
pub fn spike_attention_cpu(q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
    let m = kv_cpu(k, v, dims);
    let (c, n, d, heads) = (dims.c, dims.n, dims.d(), dims.heads);
    let mut o = vec![0f32; dims.x_len()];
    for r in 0..dims.rows {
        for ch in 0..c {
            let (h, j) = (ch / d, ch % d);
            for p in 0..n {
                let mut acc = 0f32;
                for i in 0..d {
                    acc += q[(r * c + h * d + i) * n + p] * m[((r * heads + h) * d + i) * d + j];
                }
                o[(r * c + ch) * n + p] = acc * dims.scale();
            }
        }
    }
    o
}

fn kv_cpu(k: &[f32], v: &[f32], dims: Dims) -> Vec<f32> {
    let (c, n, d, heads) = (dims.c, dims.n, dims.d(), dims.heads);
    let mut m = vec![0f32; dims.m_len()];
    for r in 0..dims.rows {
        for h in 0..heads {
            for i in 0..d {
                for j in 0..d {
                    let (ki, vj) = ((r * c + h * d + i) * n, (r * c + h * d + j) * n);
                    m[((r * heads + h) * d + i) * d + j] = (0..n).fold(0f32, |acc, p| acc + k[ki + p] * v[vj + p]);
                }
            }
        }
    }
    m
}

/// CPU reference of the backward: (dq, dk, dv) from go, in the kernels' summation order. It
/// treats q, k, v as real numbers (the op is bilinear in them), so finite differences check it.
pub fn spike_attention_backward_cpu(
    go: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let m = kv_cpu(k, v, dims);
    let (c, n, d, heads) = (dims.c, dims.n, dims.d(), dims.heads);
    let scale = dims.scale();
    let mut dm = vec![0f32; dims.m_len()];
    for r in 0..dims.rows {
        for h in 0..heads {
            for i in 0..d {
                for j in 0..d {
                    let (qi, gj) = ((r * c + h * d + i) * n, (r * c + h * d + j) * n);
                    let acc = (0..n).fold(0f32, |acc, p| acc + q[qi + p] * go[gj + p]);
                    dm[((r * heads + h) * d + i) * d + j] = acc * scale;
                }
            }
        }
    }
    let (mut dq, mut dk, mut dv) = (vec![0f32; dims.x_len()], vec![0f32; dims.x_len()], vec![0f32; dims.x_len()]);
    for r in 0..dims.rows {
        for ch in 0..c {
            let (h, a) = (ch / d, ch % d);
            let m0 = (r * heads + h) * d * d;
            for p in 0..n {
                let x0 = (r * c + h * d) * n + p;
                let (mut aq, mut ak, mut av) = (0f32, 0f32, 0f32);
                for j in 0..d {
                    let at = x0 + j * n;
                    aq += go[at] * m[m0 + a * d + j];
                    ak += v[at] * dm[m0 + a * d + j];
                    av += k[at] * dm[m0 + j * d + a];
                }
                let idx = (r * c + ch) * n + p;
                dq[idx] = aq * scale;
                dk[idx] = ak;
                dv[idx] = av;
            }
        }
    }
    (dq, dk, dv)
}
