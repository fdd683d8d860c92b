//! Matrix products: nn.Linear (y = x W^T + b) and the general strided matmul it is built on.

use crate::gpu::Shader;
use crate::graph::{Cost, Graph, Node, Params, TensorId};
use crate::shader;

pub static SHADER: Shader = shader!("matmul");

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
    let params = Params::new()
        .u(m)
        .u(n)
        .u(k)
        .u(bias.is_some() as usize)
        .u(strides.a_m)
        .u(strides.a_k)
        .u(strides.b_k)
        .u(strides.b_n)
        .build();
    g.push(Node {
        shader: &SHADER,
        entry: "matmul",
        params,
        reads: vec![a, b, bias.unwrap_or(b)],
        writes: vec![c],
        workgroups: [n.div_ceil(32) as u32, m.div_ceil(32) as u32, 1],
        label: name.to_string(),
        cost: Cost { flops: 2 * (m * n * k) as u64, bytes: 4 * (m * k + k * n + m * n) as u64 },
    });
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
