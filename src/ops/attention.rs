//! Fused softmax self-attention over the H*W positions of each image (pytorch-ddpm's AttnBlock
//! core: bmm, scale C^-0.5, softmax, bmm), forward and flash-attention-style backward. The
//! N x N attention matrix never goes to memory: the forward keeps an online softmax per query
//! and saves only the log-sum-exp per query, from which the backward recomputes it.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{size_u32, Cost, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "attention");

/// Widest channel count the kernels hold in workgroup memory (MAX_C in shaders/attention.wgsl).
pub const MAX_C: usize = 512;

/// Uniform parameters of every attention entry (WGSL `Params`): `b` images of `c` channels and
/// `n` positions, the logit scale C^-0.5.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct AttentionParams {
    pub b: u32,
    pub c: u32,
    pub n: u32,
    pub _pad: u32,
    pub scale: f32,
    pub _pad1: u32,
    pub _pad2: u32,
    pub _pad3: u32,
}

fn params(b: usize, c: usize, n: usize) -> Vec<u32> {
    let scale = (c as f32).powf(-0.5);
    let [b, c, n] = [b, c, n].map(size_u32);
    Params::of(&AttentionParams { b, c, n, _pad: 0, scale, _pad1: 0, _pad2: 0, _pad3: 0 })
}

/// Multiply-accumulates per image of the two products (q^T k and P v, C N^2 each) of a forward
/// node of this family, for operation counts read off a built graph; None for any other node.
pub fn node_macs(g: &Graph, node: &Node) -> Option<u64> {
    if node.shader.name != SHADER.name || node.entry != "attn_forward" {
        return None;
    }
    let s = g.shape(node.reads[0]);
    let (c, n) = (s[1], s[2] * s[3]);
    Some((2 * c * n * n) as u64)
}

/// o = softmax(q^T k * C^-0.5) v^T per image, laid out like the inputs: q, k, v [B, C, H, W] ->
/// o [B, C, H, W] (o[b, :, i] = sum_j P[i, j] v[b, :, j]).
pub fn attention(g: &mut Graph, q: TensorId, k: TensorId, v: TensorId, name: &str) -> TensorId {
    let shape = g.shape(q).to_vec();
    assert!(
        shape.len() == 4 && g.shape(k) == shape && g.shape(v) == shape,
        "{name}: q, k, v must be equal [B, C, H, W] shapes"
    );
    let (b, c, n) = (shape[0], shape[1], shape[2] * shape[3]);
    assert!(c <= MAX_C, "{name}: attention over {c} channels; the kernel holds at most {MAX_C}");
    assert!(n <= 65535 && b <= 65535, "{name}: {b} images of {n} positions exceed the dispatch grid");
    let o = g.intermediate(name, &shape);
    let lse = g.intermediate(&format!("{name}.lse"), &[b, n]);
    let bcn = (b * c * n) as u64;
    g.push(Node {
        shader: &SHADER,
        entry: "attn_forward",
        params: params(b, c, n),
        reads: vec![q, k, v],
        writes: vec![o, lse],
        workgroups: [n as u32, b as u32, 1],
        label: name.to_string(),
        cost: Cost { flops: 4 * bcn * n as u64 + 5 * (b * n * n) as u64, bytes: 4 * (4 * bcn + (b * n) as u64) },
    });
    let label = name.to_string();
    g.record(name, vec![q, k, v], vec![o], move |g, go, _needs| {
        let Some(d_o) = go[0] else { return vec![None; 3] };
        let dq = g.intermediate(&format!("{label}.grad_q"), &shape);
        let dsum = g.intermediate(&format!("{label}.grad_rowdot"), &[b, n]);
        let cost = Cost { flops: 6 * bcn * n as u64, bytes: 4 * (6 * bcn + 2 * (b * n) as u64) };
        g.push(Node {
            shader: &SHADER,
            entry: "attn_backward_q",
            params: params(b, c, n),
            reads: vec![q, k, v, d_o, lse, o],
            writes: vec![dq, dsum],
            workgroups: [n as u32, b as u32, 1],
            label: format!("{label}.grad_q"),
            cost,
        });
        let dk = g.intermediate(&format!("{label}.grad_k"), &shape);
        let dv = g.intermediate(&format!("{label}.grad_v"), &shape);
        g.push(Node {
            shader: &SHADER,
            entry: "attn_backward_kv",
            params: params(b, c, n),
            reads: vec![q, k, v, d_o, lse, dsum],
            writes: vec![dk, dv],
            workgroups: [n as u32, b as u32, 1],
            label: format!("{label}.grad_kv"),
            cost: Cost { flops: 8 * bcn * n as u64, ..cost },
        });
        vec![Some(dq), Some(dk), Some(dv)]
    });
    o
}

/// The softmax matrix P [N, N] of one image (f64), q, k: [C, N].
fn probs(q: &[f64], k: &[f64], c: usize, n: usize) -> Vec<f64> {
    let scale = (c as f64).powf(-0.5);
    let mut p = vec![0f64; n * n];
    for i in 0..n {
        let row = &mut p[i * n..(i + 1) * n];
        for (j, s) in row.iter_mut().enumerate() {
            *s = (0..c).map(|ch| q[ch * n + i] * k[ch * n + j]).sum::<f64>() * scale;
        }
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        row.iter_mut().for_each(|s| *s = (*s - m).exp());
        let l: f64 = row.iter().sum();
        row.iter_mut().for_each(|s| *s /= l);
    }
    p
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// CPU reference of [`attention`]: the plain (two-pass) softmax with the full matrix, in f64.
/// q, k, v: [B, C, N].
pub fn attention_cpu(q: &[f32], k: &[f32], v: &[f32], b: usize, c: usize, n: usize) -> Vec<f32> {
    let mut o = vec![0f32; b * c * n];
    for bi in 0..b {
        let r = bi * c * n..(bi + 1) * c * n;
        let (qb, kb, vb) = (f64s(&q[r.clone()]), f64s(&k[r.clone()]), f64s(&v[r.clone()]));
        let p = probs(&qb, &kb, c, n);
        for ch in 0..c {
            for i in 0..n {
                o[r.start + ch * n + i] = (0..n).map(|j| p[i * n + j] * vb[ch * n + j]).sum::<f64>() as f32;
            }
        }
    }
    o
}

/// CPU reference of the backward of [`attention`] through the full matrix: (dq, dk, dv), f64.
pub fn attention_backward_cpu(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d_o: &[f32],
    b: usize,
    c: usize,
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let scale = (c as f64).powf(-0.5);
    let (mut dq, mut dk, mut dv) = (vec![0f32; b * c * n], vec![0f32; b * c * n], vec![0f32; b * c * n]);
    for bi in 0..b {
        let r = bi * c * n..(bi + 1) * c * n;
        let (qb, kb, vb, gb) = (f64s(&q[r.clone()]), f64s(&k[r.clone()]), f64s(&v[r.clone()]), f64s(&d_o[r.clone()]));
        let p = probs(&qb, &kb, c, n);
        // dP[i, j] = sum_c do[c, i] v[c, j]; dS = P * (dP - sum_j P dP) (softmax backward).
        let mut ds = vec![0f64; n * n];
        for i in 0..n {
            let dp: Vec<f64> = (0..n).map(|j| (0..c).map(|ch| gb[ch * n + i] * vb[ch * n + j]).sum()).collect();
            let dot: f64 = (0..n).map(|j| p[i * n + j] * dp[j]).sum();
            for j in 0..n {
                ds[i * n + j] = p[i * n + j] * (dp[j] - dot);
            }
        }
        for ch in 0..c {
            for i in 0..n {
                dq[r.start + ch * n + i] = ((0..n).map(|j| ds[i * n + j] * kb[ch * n + j]).sum::<f64>() * scale) as f32;
                dk[r.start + ch * n + i] = ((0..n).map(|j| ds[j * n + i] * qb[ch * n + j]).sum::<f64>() * scale) as f32;
                dv[r.start + ch * n + i] = (0..n).map(|j| p[j * n + i] * gb[ch * n + j]).sum::<f64>() as f32;
            }
        }
    }
    (dq, dk, dv)
}
