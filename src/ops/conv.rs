//! 2-D convolution (3x3 stride 1/2, 1x1, any channel counts) and the output layer's (3,3,1) 3-D
//! convolution, which has kernel depth 1 along time and is therefore a per-step 3x3 conv. The
//! input may be f32 or bit-packed spikes; the output and all gradients are f32. For inference,
//! [`conv2d_relu`] also takes non-square kernels (Inception's 1x7, 7x1, 1x3, 3x1) with separate
//! paddings, and fuses a ReLU.

use crate::gpu::Shader;
use crate::graph::{grid_1d, Cost, DType, Graph, Needs, Node, Params, TensorId, Variant};
use crate::shader;

pub static SHADER: Shader = shader!("conv");

/// Output positions one weight-gradient invocation sums; filled into the WGSL `override
/// GRAD_W_CHUNK` of both weight-gradient kernels (see [`grad_weight_variants`]).
pub const GRAD_W_CHUNK: usize = 2048;

/// Output channels and output pixels of one `conv2d_igemm` workgroup tile (IG_TILE in conv.wgsl).
pub const IGEMM_TILE: usize = 32;

/// The forward kernels the tuner chooses from: the 8x4 register-tiled kernel (default; no
/// workgroup memory, best on CPU adapters) and the workgroup-tiled implicit GEMM.
pub fn forward_variants(n: usize, cout: usize, ho: usize, wo: usize) -> Vec<Variant> {
    let wo_groups = wo.div_ceil(4);
    vec![
        Variant {
            name: "r8x4".into(),
            entry: "conv2d",
            constants: vec![],
            workgroups: [(ho * wo_groups).div_ceil(64) as u32, cout.div_ceil(8) as u32, n as u32],
            writes_workgroup_memory_first: false,
            shader: None,
            needs: Needs { invocations: 64, ..Needs::default() },
        },
        Variant {
            name: "igemm32".into(),
            entry: "conv2d_igemm",
            constants: vec![],
            workgroups: [(ho * wo).div_ceil(IGEMM_TILE) as u32, cout.div_ceil(IGEMM_TILE) as u32, n as u32],
            // Every invocation stores its 4 values of both tiles before the first barrier.
            writes_workgroup_memory_first: true,
            shader: None,
            needs: Needs { invocations: 64, workgroup_bytes: 2048, ..Needs::default() },
        },
    ]
}

/// Workgroup tiles of the double-buffered implicit GEMM `conv2d_igemm_db` (variants named
/// after them): (name, output channels DB_BM, output pixels DB_BN, reduction steps per stage
/// DB_BK). Each invocation computes 8 x 8 outputs and loads at most 2 vec4 of each operand per
/// chunk (DB_BK * DB_BM and DB_BK * DB_BN at most 8 per invocation). The 32 KiB one runs only
/// where the adapter allows that much workgroup memory (see [`Needs`]).
pub const DB_TILES: [(&str, usize, usize, usize); 3] =
    [("db64x64", 64, 64, 8), ("db128x128", 128, 128, 8), ("db128x128k16", 128, 128, 16)];

/// The double-buffered implicit-GEMM forward kernels (see [`DB_TILES`]) of a conv whose weight
/// has `weights` elements: none unless that is a multiple of 4, since they bind the weights as
/// vec4.
pub fn forward_db_variants(n: usize, cout: usize, ho: usize, wo: usize, weights: usize) -> Vec<Variant> {
    if !weights.is_multiple_of(4) {
        return vec![];
    }
    db_variants("conv2d_igemm_db", n, cout, ho * wo)
}

/// The double-buffered implicit-GEMM input-gradient kernels (see [`DB_TILES`]).
pub fn grad_input_db_variants(n: usize, cin: usize, h: usize, w: usize) -> Vec<Variant> {
    db_variants("conv2d_grad_input_igemm_db", n, cin, h * w)
}

/// The [`DB_TILES`] variants of `entry`, a GEMM of `rows` channels x `pixels` per image.
fn db_variants(entry: &'static str, n: usize, rows: usize, pixels: usize) -> Vec<Variant> {
    DB_TILES
        .iter()
        .map(|&(name, bm, bn, bk)| {
            let invocations = (bm / 8) * (bn / 8);
            // The kernel holds 2 vec4 per operand and invocation between a chunk's load and store.
            assert!(bk * bm <= 8 * invocations && bk * bn <= 8 * invocations && bk % 4 == 0, "{name} does not fit");
            Variant {
                name: name.into(),
                entry,
                constants: vec![
                    ("DB_BM", bm as f64),
                    ("DB_BN", bn as f64),
                    ("DB_BK", bk as f64),
                    ("DB_WG", invocations as f64),
                ],
                workgroups: [pixels.div_ceil(bn) as u32, rows.div_ceil(bm) as u32, n as u32],
                // Every stage is written (chunk c at iteration c) before the barrier that precedes
                // its first read.
                writes_workgroup_memory_first: true,
                shader: None,
                needs: Needs {
                    invocations: invocations as u32,
                    workgroup_bytes: (2 * bk * (bm + bn) * 4) as u32,
                    ..Needs::default()
                },
            }
        })
        .collect()
}

/// The input-gradient kernels: the 8x4 register-tiled default and the implicit GEMM.
pub fn grad_input_variants(n: usize, cin: usize, h: usize, w: usize) -> Vec<Variant> {
    vec![
        Variant {
            name: "r8x4".into(),
            entry: "conv2d_grad_input",
            constants: vec![],
            workgroups: [(h * w.div_ceil(4)).div_ceil(64) as u32, cin.div_ceil(8) as u32, n as u32],
            writes_workgroup_memory_first: false,
            shader: None,
            needs: Needs { invocations: 64, ..Needs::default() },
        },
        Variant {
            name: "igemm32".into(),
            entry: "conv2d_grad_input_igemm",
            constants: vec![],
            workgroups: [(h * w).div_ceil(IGEMM_TILE) as u32, cin.div_ceil(IGEMM_TILE) as u32, n as u32],
            // Every invocation stores its 4 values of both tiles before the first barrier.
            writes_workgroup_memory_first: true,
            shader: None,
            needs: Needs { invocations: 64, workgroup_bytes: 2048, ..Needs::default() },
        },
    ]
}

/// The weight-gradient (partial sums) kernels: 4 channels x all taps per invocation (default,
/// K <= 3) and the implicit GEMM; both write the same [parts, Cout*Cin*K*K] partials.
pub fn grad_weight_variants(cout: usize, cin: usize, k: usize, parts: usize) -> Vec<Variant> {
    vec![
        Variant {
            name: "r4xkk".into(),
            entry: "conv2d_grad_weight",
            constants: vec![("GRAD_W_CHUNK", GRAD_W_CHUNK as f64)],
            workgroups: [cin.div_ceil(64) as u32, cout.div_ceil(4) as u32, parts as u32],
            writes_workgroup_memory_first: false,
            shader: None,
            needs: Needs { invocations: 64, ..Needs::default() },
        },
        Variant {
            name: "igemm32".into(),
            entry: "conv2d_grad_weight_igemm",
            constants: vec![("GRAD_W_CHUNK", GRAD_W_CHUNK as f64)],
            workgroups: [(cin * k * k).div_ceil(IGEMM_TILE) as u32, cout.div_ceil(IGEMM_TILE) as u32, parts as u32],
            // Every invocation stores its 4 values of both tiles before the first barrier.
            writes_workgroup_memory_first: true,
            shader: None,
            needs: Needs { invocations: 64, workgroup_bytes: 2048, ..Needs::default() },
        },
    ]
}

/// Output size of a convolution along one axis.
pub fn conv_out(size: usize, k: usize, stride: usize, pad: usize) -> usize {
    (size + 2 * pad - k) / stride + 1
}

/// y = conv2d(x, w) + b, x: [N, Cin, H, W] (f32 or spikes), w: [Cout, Cin, K, K], b: [Cout].
pub fn conv2d(
    g: &mut Graph,
    x: TensorId,
    w: TensorId,
    b: Option<TensorId>,
    stride: usize,
    pad: usize,
    name: &str,
) -> TensorId {
    let ws = g.shape(w).to_vec();
    assert!(ws.len() == 4 && ws[2] == ws[3], "{name}: conv2d weight must be [Cout, Cin, K, K], got {ws:?}");
    conv_node(g, x, w, b, [ws[0], ws[1], ws[2], ws[2]], stride, [pad, pad], false, name)
}

/// y = relu(conv2d(x, w) + b) (or without the ReLU), w: [Cout, Cin, KH, KW], zero padding
/// [ph, pw]. Inference only: no backward rule is recorded.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_relu(
    g: &mut Graph,
    x: TensorId,
    w: TensorId,
    b: Option<TensorId>,
    stride: usize,
    [ph, pw]: [usize; 2],
    relu: bool,
    name: &str,
) -> TensorId {
    let ws = g.shape(w).to_vec();
    assert!(ws.len() == 4, "{name}: conv2d weight must be [Cout, Cin, KH, KW], got {ws:?}");
    conv_node(g, x, w, b, [ws[0], ws[1], ws[2], ws[3]], stride, [ph, pw], relu, name)
}

/// The reference's `T_output_layer`: Conv3d(C, C, kernel (3,3,1), padding (1,1,0)) applied to
/// [B, C, H, W, T]. Our activations are [T*B, C, H, W]; since the kernel spans one time step,
/// this is a 3x3 conv per (t, b) with weight w[:, :, :, :, 0], whose memory layout is identical.
pub fn conv3d_331(g: &mut Graph, x: TensorId, w: TensorId, b: Option<TensorId>, name: &str) -> TensorId {
    let ws = g.shape(w).to_vec();
    assert!(
        ws.len() == 5 && ws[2] == 3 && ws[3] == 3 && ws[4] == 1,
        "{name}: conv3d weight must be [Cout, Cin, 3, 3, 1], got {ws:?}"
    );
    conv_node(g, x, w, b, [ws[0], ws[1], 3, 3], 1, [1, 1], false, name)
}

#[allow(clippy::too_many_arguments)]
fn conv_node(
    g: &mut Graph,
    x: TensorId,
    w: TensorId,
    b: Option<TensorId>,
    [cout, cin, k, kw]: [usize; 4],
    stride: usize,
    [pad, pad_w]: [usize; 2],
    relu: bool,
    name: &str,
) -> TensorId {
    let xs = g.shape(x).to_vec();
    assert!(xs.len() == 4 && xs[1] == cin, "{name}: input {xs:?} does not match weight Cin {cin}");
    if let Some(b) = b {
        assert_eq!(g.shape(b), [cout], "{name}: bias must be [{cout}]");
    }
    let (n, h, wd) = (xs[0], xs[2], xs[3]);
    let xd = g.dtype(x);
    assert!(matches!(xd, DType::F32 | DType::Spike), "{name}: conv input must be f32 or spikes, got {}", xd.name());
    // Spike loads cut 4 taps out of one 32-bit window (shaders/conv.wgsl load_x4).
    assert!(xd != DType::Spike || stride <= 10, "{name}: a conv over packed spikes takes strides up to 10");
    let x_bytes = g.bytes_of(x);
    let (ho, wo) = (conv_out(h, k, stride, pad), conv_out(wd, kw, stride, pad_w));
    let y = g.intermediate(name, &[n, cout, ho, wo]);
    let wo_groups = wo.div_ceil(4);
    let params = Params::new()
        .u(n)
        .u(cin)
        .u(h)
        .u(wd)
        .u(cout)
        .u(ho)
        .u(wo)
        .u(k)
        .u(stride)
        .u(pad)
        .u(b.is_some() as usize)
        .u(wo_groups)
        .u((xd == DType::Spike) as usize)
        .u(kw)
        .u(pad_w)
        .u(relu as usize)
        .build();
    let macs = (n * cout * ho * wo * cin * k * kw) as u64;
    let bwd_params = params.clone();
    let bytes = x_bytes + 4 * (cout * cin * k * kw + n * cout * ho * wo) as u64;
    let mut candidates = forward_variants(n, cout, ho, wo);
    candidates.extend(forward_db_variants(n, cout, ho, wo, cout * cin * k * kw));
    if relu || k != kw || pad != pad_w {
        // The implicit GEMM takes square kernels without an epilogue; Inception's non-square
        // ReLU convs run the register-tiled default.
        candidates.truncate(1);
    }
    g.push_variants_typed(
        Node {
            shader: &SHADER,
            entry: candidates[0].entry,
            params,
            // Without a bias the weight is bound in its slot; the shader never reads it then.
            reads: vec![x, w, b.unwrap_or(w)],
            writes: vec![y],
            workgroups: candidates[0].workgroups,
            label: name.to_string(),
            cost: Cost { flops: 2 * macs, bytes },
        },
        &[xd, DType::F32, DType::F32],
        &[DType::F32],
        candidates,
    );
    if relu || k != kw || pad != pad_w {
        // Inference-only variants (the backward kernels assume square kernels and no ReLU).
        return y;
    }
    let label = name.to_string();
    let mut inputs = vec![x, w];
    inputs.extend(b);
    g.record(name, inputs, vec![y], move |g, go, needs| {
        let Some(dy) = go[0] else { return vec![None; needs.len()] };
        let cost =
            Cost { flops: 2 * macs, bytes: 4 * (n * cin * h * wd + cout * cin * k * k + n * cout * ho * wo) as u64 };
        let grad_w_cost = Cost { flops: 2 * macs, bytes };
        let dx = needs[0].then(|| {
            let dx = g.intermediate(&format!("{label}.grad_input"), &[n, cin, h, wd]);
            let mut candidates = grad_input_variants(n, cin, h, wd);
            candidates.extend(grad_input_db_variants(n, cin, h, wd));
            g.push_variants(
                Node {
                    shader: &SHADER,
                    entry: candidates[0].entry,
                    params: bwd_params.clone(),
                    reads: vec![dy, w],
                    writes: vec![dx],
                    workgroups: candidates[0].workgroups,
                    label: format!("{label}.grad_input"),
                    cost,
                },
                candidates,
            );
            dx
        });
        let dw = needs[1].then(|| {
            assert!(k <= 3, "{label}: weight gradients support kernels up to 3x3");
            let parts = (n * ho * wo).div_ceil(GRAD_W_CHUNK);
            let partial = g.intermediate(&format!("{label}.grad_weight_parts"), &[parts, cout * cin * k * k]);
            let mut candidates = grad_weight_variants(cout, cin, k, parts);
            candidates.push(crate::ops::conv_subgroup::grad_weight_variant(cout, cin, parts));
            g.push_variants_typed(
                Node {
                    shader: &SHADER,
                    entry: candidates[0].entry,
                    params: bwd_params.clone(),
                    reads: vec![dy, x],
                    writes: vec![partial],
                    workgroups: candidates[0].workgroups,
                    label: format!("{label}.grad_weight"),
                    cost: grad_w_cost,
                },
                &[DType::F32, xd],
                &[DType::F32],
                candidates,
            );
            let shape = g.shape(w).to_vec();
            let dw = g.intermediate(&format!("{label}.grad_weight"), &shape);
            let mut reduce_params = bwd_params.clone();
            reduce_params[0] = parts as u32; // the reduce kernel reads the part count from `n`
            g.push(Node {
                shader: &SHADER,
                entry: "conv2d_grad_weight_reduce",
                params: reduce_params,
                reads: vec![partial],
                writes: vec![dw],
                workgroups: grid_1d(cout * cin * k * k, 256),
                label: format!("{label}.grad_weight_reduce"),
                cost: Cost {
                    flops: (parts * cout * cin * k * k) as u64,
                    bytes: 4 * ((parts + 1) * cout * cin * k * k) as u64,
                },
            });
            dw
        });
        let mut grads = vec![dx, dw];
        if needs.len() == 3 {
            grads.push(needs[2].then(|| crate::ops::reduce::group_sum(g, dy, 1, &format!("{label}.grad_bias"))));
        }
        grads
    });
    y
}

/// CPU reference of [`conv2d`]: same summation order (ci, ky, kx; bias last).
pub fn conv2d_cpu(
    x: &[f32],
    xs: [usize; 4],
    wt: &[f32],
    ws: [usize; 4],
    bias: Option<&[f32]>,
    stride: usize,
    pad: usize,
) -> Vec<f32> {
    conv2d_relu_cpu(x, xs, wt, ws, bias, stride, [pad, pad], false)
}

/// CPU reference of [`conv2d_relu`]: same summation order (ci, ky, kx; bias, then the ReLU).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_relu_cpu(
    x: &[f32],
    [n, cin, h, w]: [usize; 4],
    wt: &[f32],
    [cout, wcin, k, kw]: [usize; 4],
    bias: Option<&[f32]>,
    stride: usize,
    [pad, pad_w]: [usize; 2],
    relu: bool,
) -> Vec<f32> {
    assert_eq!(cin, wcin);
    let (ho, wo) = (conv_out(h, k, stride, pad), conv_out(w, kw, stride, pad_w));
    let mut y = vec![0f32; n * cout * ho * wo];
    for b in 0..n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0f32;
                    for ci in 0..cin {
                        for ky in 0..k {
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride + kx) as isize - pad_w as isize;
                                let v = if ix < 0 || ix >= w as isize {
                                    0.0
                                } else {
                                    x[((b * cin + ci) * h + iy as usize) * w + ix as usize]
                                };
                                acc += wt[((co * cin + ci) * k + ky) * kw + kx] * v;
                            }
                        }
                    }
                    let v = acc + bias.map_or(0.0, |bb| bb[co]);
                    y[((b * cout + co) * ho + oy) * wo + ox] = if relu { v.max(0.0) } else { v };
                }
            }
        }
    }
    y
}

/// CPU reference of the (3,3,1) Conv3d written literally on the reference's [B, C, H, W, T]
/// layout (padding 1 in H and W, none in T), with weight [Cout, Cin, 3, 3, 1].
pub fn conv3d_331_cpu(
    x: &[f32],
    [b, c, h, w, t]: [usize; 5],
    wt: &[f32],
    cout: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![0f32; b * cout * h * w * t];
    let at = |bb: usize, ci: usize, iy: usize, ix: usize, tt: usize| ((((bb * c + ci) * h + iy) * w + ix) * t) + tt;
    for bb in 0..b {
        for co in 0..cout {
            for oy in 0..h {
                for ox in 0..w {
                    for tt in 0..t {
                        let mut acc = 0f32;
                        for ci in 0..c {
                            for ky in 0..3 {
                                let iy = oy as isize + ky as isize - 1;
                                if iy < 0 || iy >= h as isize {
                                    continue;
                                }
                                for kx in 0..3 {
                                    let ix = ox as isize + kx as isize - 1;
                                    let v = if ix < 0 || ix >= w as isize {
                                        0.0
                                    } else {
                                        x[at(bb, ci, iy as usize, ix as usize, tt)]
                                    };
                                    acc += wt[((co * c + ci) * 3 + ky) * 3 + kx] * v;
                                }
                            }
                        }
                        y[((((bb * cout + co) * h + oy) * w + ox) * t) + tt] = acc + bias.map_or(0.0, |v| v[co]);
                    }
                }
            }
        }
    }
    y
}

/// CPU reference of the input gradient of [`conv2d`] (sum over co, ky, kx).
pub fn conv2d_grad_input_cpu(
    dy: &[f32],
    wt: &[f32],
    [n, cin, h, w]: [usize; 4],
    [cout, k]: [usize; 2],
    stride: usize,
    pad: usize,
) -> Vec<f32> {
    let (ho, wo) = (conv_out(h, k, stride, pad), conv_out(w, k, stride, pad));
    let mut dx = vec![0f32; n * cin * h * w];
    for b in 0..n {
        for ci in 0..cin {
            for iy in 0..h {
                for ix in 0..w {
                    let mut acc = 0f32;
                    for co in 0..cout {
                        for ky in 0..k {
                            let ty = (iy + pad) as isize - ky as isize;
                            if ty < 0 || ty % stride as isize != 0 || ty / stride as isize >= ho as isize {
                                continue;
                            }
                            let oy = ty as usize / stride;
                            for kx in 0..k {
                                let tx = (ix + pad) as isize - kx as isize;
                                if tx < 0 || tx % stride as isize != 0 || tx / stride as isize >= wo as isize {
                                    continue;
                                }
                                let ox = tx as usize / stride;
                                acc +=
                                    wt[((co * cin + ci) * k + ky) * k + kx] * dy[((b * cout + co) * ho + oy) * wo + ox];
                            }
                        }
                    }
                    dx[((b * cin + ci) * h + iy) * w + ix] = acc;
                }
            }
        }
    }
    dx
}

/// CPU reference of the weight gradient of [`conv2d`]: sums over (n, oy, ox) in chunks of
/// [`GRAD_W_CHUNK`] positions, then the chunks in order (the kernels' order).
pub fn conv2d_grad_weight_cpu(
    dy: &[f32],
    x: &[f32],
    [n, cin, h, w]: [usize; 4],
    [cout, k]: [usize; 2],
    stride: usize,
    pad: usize,
) -> Vec<f32> {
    let (ho, wo) = (conv_out(h, k, stride, pad), conv_out(w, k, stride, pad));
    let total = n * ho * wo;
    let mut dw = vec![0f32; cout * cin * k * k];
    for co in 0..cout {
        for ci in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    let mut sum = 0f32;
                    for start in (0..total).step_by(GRAD_W_CHUNK) {
                        let mut acc = 0f32;
                        for e in start..(start + GRAD_W_CHUNK).min(total) {
                            let (b, oy, ox) = (e / (ho * wo), (e % (ho * wo)) / wo, e % wo);
                            let iy = (oy * stride + ky) as isize - pad as isize;
                            let ix = (ox * stride + kx) as isize - pad as isize;
                            if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                                continue;
                            }
                            acc += dy[((b * cout + co) * ho + oy) * wo + ox]
                                * x[((b * cin + ci) * h + iy as usize) * w + ix as usize];
                        }
                        sum += acc;
                    }
                    dw[((co * cin + ci) * k + ky) * k + kx] = sum;
                }
            }
        }
    }
    dw
}
