//! Matrix products: nn.Linear (y = x W^T + b) and the general strided matmul it is built on.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{Cost, Graph, Needs, Node, Params, TensorId, TileWork, Variant};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "matmul");

/// Uniform parameters of `matmul` (WGSL `Params`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub has_bias: u32,
    pub a_sm: u32,
    pub a_sk: u32,
    pub b_sk: u32,
    pub b_sn: u32,
}

/// The kernels [`matmul`] offers the tuner: workgroup shapes (WG_X, WG_Y) of the 4x4
/// register-tiled kernel. Index 0 is the default; square blocks suit large products, the wide
/// one the thin [rows, out] products of the time embedding.
pub const VARIANTS: [(&str, u32, u32); 3] = [("wg8x8", 8, 8), ("wg16x16", 16, 16), ("wg16x4", 16, 4)];

/// The candidate kernels of an [M, N] product (see [`VARIANTS`]).
pub fn variants(m: usize, n: usize) -> Vec<Variant> {
    VARIANTS
        .iter()
        .map(|&(name, wx, wy)| {
            let workgroups = [n.div_ceil(4 * wx as usize) as u32, m.div_ceil(4 * wy as usize) as u32, 1];
            Variant {
                name: name.to_string(),
                entry: "matmul",
                constants: vec![("WG_X", wx as f64), ("WG_Y", wy as f64)],
                workgroups,
                writes_workgroup_memory_first: false,
                shader: None,
                needs: Needs::default(),
                // 4x4 outputs per invocation.
                tile: Some(TileWork::of_grid(m * n, workgroups, 16 * (wx * wy) as usize)),
            }
        })
        .collect()
}

/// How A[M, K] and B[K, N] are laid out in memory: element strides along each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strides {
    pub a_m: usize,
    pub a_k: usize,
    pub b_k: usize,
    pub b_n: usize,
}

impl Strides {
    /// Both row-major: A [M, K], B [K, N].
    pub fn nn(k: usize, n: usize) -> Self {
        Strides { a_m: k, a_k: 1, b_k: n, b_n: 1 }
    }
    /// A row-major [M, K], B given as [N, K] (used transposed), as in x W^T.
    pub fn nt(k: usize) -> Self {
        Strides { a_m: k, a_k: 1, b_k: 1, b_n: k }
    }
}

/// C[M, N] = A . B (+ bias[N]), A and B read through `strides`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    g: &mut Graph,
    a: TensorId,
    b: TensorId,
    bias: Option<TensorId>,
    [m, n, k]: [usize; 3],
    strides: Strides,
    name: &str,
) -> TensorId {
    assert_eq!(g.info(a).numel(), m * k, "{name}: A must hold M*K = {} values", m * k);
    assert_eq!(g.info(b).numel(), k * n, "{name}: B must hold K*N = {} values", k * n);
    if let Some(bias) = bias {
        assert_eq!(g.info(bias).numel(), n, "{name}: bias must hold N = {n} values");
    }
    let c = g.intermediate(name, &[m, n]);
    let u = |v: usize| u32::try_from(v).expect("matmul parameter exceeds u32");
    let p = MatmulParams {
        m: u(m),
        n: u(n),
        k: u(k),
        has_bias: bias.is_some() as u32,
        a_sm: u(strides.a_m),
        a_sk: u(strides.a_k),
        b_sk: u(strides.b_k),
        b_sn: u(strides.b_n),
    };
    let candidates = variants(m, n);
    g.push_variants(
        Node {
            shader: &SHADER,
            entry: candidates[0].entry,
            params: Params::of(&p),
            reads: vec![a, b, bias.unwrap_or(b)],
            writes: vec![c],
            workgroups: candidates[0].workgroups,
            label: name.to_string(),
            cost: Cost { flops: 2 * (m * n * k) as u64, bytes: 4 * (m * k + k * n + m * n) as u64 },
        },
        candidates,
    );
    c
}

/// nn.Linear: x [rows, in] . W^T, W [out, in], + b [out] -> [rows, out].
pub fn linear(g: &mut Graph, x: TensorId, w: TensorId, b: Option<TensorId>, name: &str) -> TensorId {
    let ws = g.shape(w).to_vec();
    assert_eq!(ws.len(), 2, "{name}: linear weight must be [out, in]");
    let (out, inp) = (ws[0], ws[1]);
    let xs = g.shape(x).to_vec();
    assert_eq!(*xs.last().unwrap(), inp, "{name}: input {xs:?} does not end in {inp}");
    let rows = g.info(x).numel() / inp;
    let y = matmul(g, x, w, b, [rows, out, inp], Strides::nt(inp), name);
    let label = name.to_string();
    let mut inputs = vec![x, w];
    inputs.extend(b);
    g.record(name, inputs, vec![y], move |g, go, needs| {
        let Some(dy) = go[0] else { return vec![None; needs.len()] };
        // dx [rows, in] = dy [rows, out] . W [out, in]
        let dx = needs[0].then(|| {
            let dx = matmul(g, dy, w, None, [rows, inp, out], Strides::nn(out, inp), &format!("{label}.grad_input"));
            g.reshape(dx, &xs);
            dx
        });
        // dW [out, in] = dy^T . x: A[m = o, k = r] = dy[r, o], B[k = r, n = i] = x[r, i]
        let dw = needs[1].then(|| {
            let s = Strides { a_m: 1, a_k: out, b_k: inp, b_n: 1 };
            matmul(g, dy, x, None, [out, inp, rows], s, &format!("{label}.grad_weight"))
        });
        let mut grads = vec![dx, dw];
        if needs.len() == 3 {
            grads.push(needs[2].then(|| {
                let db = crate::ops::reduce::group_sum(g, dy, 1, &format!("{label}.grad_bias"));
                g.reshape(db, &[out]);
                db
            }));
        }
        grads
    });
    y
}

/// CPU reference of [`matmul`]: k ascending, bias last.
pub fn matmul_cpu(a: &[f32], b: &[f32], bias: Option<&[f32]>, [m, n, k]: [usize; 3], s: Strides) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for kk in 0..k {
                acc += a[i * s.a_m + kk * s.a_k] * b[kk * s.b_k + j * s.b_n];
            }
            c[i * n + j] = acc + bias.map_or(0.0, |v| v[j]);
        }
    }
    c
}

/// CPU reference of [`linear`].
pub fn linear_cpu(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, inp: usize, out: usize) -> Vec<f32> {
    matmul_cpu(x, w, b, [rows, out, inp], Strides::nt(inp))
}
