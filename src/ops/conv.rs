//! 2-D convolution (3x3 stride 1/2, 1x1, any channel counts) and the output layer's (3,3,1) 3-D
//! convolution, which has kernel depth 1 along time and is therefore a per-step 3x3 conv. The
//! input may be f32 or bit-packed spikes; the output and all gradients are f32. For inference,
//! [`conv2d_relu`] also takes non-square kernels (Inception's 1x7, 7x1, 1x3, 3x1) with separate
//! paddings, and fuses a ReLU. [`conv2d_fused`] adds a time embedding and a residual in the
//! epilogue, saving the two passes over the output that separate adds cost.

use bytemuck::{Pod, Zeroable};

use crate::gpu::Shader;
use crate::graph::{grid_1d, Cost, DType, Graph, Needs, Node, Params, TensorId, TileWork, Variant};
use crate::shader;

pub static SHADER: Shader = shader!(trusted "conv");

/// Uniform parameters of every conv kernel (WGSL `Params`; the backward kernels read the same).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct ConvParams {
    /// Images (the weight-gradient reduce reads its part count here).
    pub n: u32,
    pub cin: u32,
    pub h: u32,
    pub w: u32,
    pub cout: u32,
    pub ho: u32,
    pub wo: u32,
    /// Kernel height (and width, but for [`conv2d_relu`]'s non-square kernels).
    pub k: u32,
    pub stride: u32,
    pub pad: u32,
    /// ceil(Wo / 4): the register-tiled forward's column groups.
    pub wo_groups: u32,
    /// 1 when x is bit-packed spikes.
    pub x_spikes: u32,
    pub kw: u32,
    pub pad_w: u32,
    /// `EPI_*` bits: what the forward's epilogue (WGSL store_output) adds and applies.
    pub epilogue: u32,
    /// Rows B of the epilogue's `emb` [B, Cout] (0 without one).
    pub emb_rows: u32,
}

/// [`ConvParams::epilogue`] bits (the WGSL EPI_* constants).
pub const EPI_BIAS: u32 = 1;
pub const EPI_EMB: u32 = 2;
pub const EPI_RESIDUAL: u32 = 4;
pub const EPI_RELU: u32 = 8;

/// What a conv's forward adds to its output after the bias, in this float order:
/// y = ((conv + bias) + emb) + residual, the order of the separate add passes it replaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Epilogue {
    /// [B, Cout]: image n (of N = T*B, time-major) adds row n % B to every pixel of each channel
    /// (the time embedding's projection, as `elementwise::add_channel`).
    pub emb: Option<TensorId>,
    /// [N, Cout, Ho, Wo], f32, added elementwise (a residual branch, as `elementwise::add`).
    pub residual: Option<TensorId>,
}

/// Output positions one weight-gradient invocation sums; filled into the WGSL `override
/// GRAD_W_CHUNK` of both weight-gradient kernels (see [`grad_weight_variants`]).
pub const GRAD_W_CHUNK: usize = 2048;

/// Output channels and output pixels of one `conv2d_igemm` workgroup tile (IG_TILE in conv.wgsl).
pub const IGEMM_TILE: usize = 32;

/// The forward kernels the tuner chooses from: the 8x4 register-tiled kernel (default; no
/// workgroup memory, best on CPU adapters) and the workgroup-tiled implicit GEMM.
pub fn forward_variants(n: usize, cout: usize, ho: usize, wo: usize) -> Vec<Variant> {
    tiled_variants(["conv2d", "conv2d_igemm"], n, cout, ho, wo)
}

/// `r8x4` and `igemm32` of a direct-conv-shaped kernel pair (`entries`) writing `rows` channels
/// of h x w pixels per image: 8 channels x 4 pixels of a row per invocation, 64 per workgroup;
/// or IGEMM_TILE x IGEMM_TILE tiles through workgroup memory.
fn tiled_variants(entries: [&'static str; 2], n: usize, rows: usize, h: usize, w: usize) -> Vec<Variant> {
    let r8x4 = [(h * w.div_ceil(4)).div_ceil(64) as u32, rows.div_ceil(8) as u32, n as u32];
    let igemm = [(h * w).div_ceil(IGEMM_TILE) as u32, rows.div_ceil(IGEMM_TILE) as u32, n as u32];
    vec![
        Variant {
            name: "r8x4".into(),
            entry: entries[0],
            constants: vec![],
            workgroups: r8x4,
            writes_workgroup_memory_first: false,
            shader: None,
            needs: Needs { invocations: 64, ..Needs::default() },
            tile: Some(TileWork::of_grid(n * rows * h * w, r8x4, 64 * 8 * 4)),
        },
        Variant {
            name: "igemm32".into(),
            entry: entries[1],
            constants: vec![],
            workgroups: igemm,
            // Every invocation stores its 4 values of both tiles before the first barrier.
            writes_workgroup_memory_first: true,
            shader: None,
            needs: Needs { invocations: 64, workgroup_bytes: 2048, ..Needs::default() },
            tile: Some(TileWork::of_grid(n * rows * h * w, igemm, IGEMM_TILE * IGEMM_TILE)),
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
            let workgroups = [pixels.div_ceil(bn) as u32, rows.div_ceil(bm) as u32, n as u32];
            Variant {
                name: name.into(),
                entry,
                constants: vec![
                    ("DB_BM", bm as f64),
                    ("DB_BN", bn as f64),
                    ("DB_BK", bk as f64),
                    ("DB_WG", invocations as f64),
                ],
                workgroups,
                // Every stage is written (chunk c at iteration c) before the barrier that precedes
                // its first read.
                writes_workgroup_memory_first: true,
                shader: None,
                needs: Needs {
                    invocations: invocations as u32,
                    workgroup_bytes: (2 * bk * (bm + bn) * 4) as u32,
                    ..Needs::default()
                },
                tile: Some(TileWork::of_grid(n * rows * pixels, workgroups, bm * bn)),
            }
        })
        .collect()
}

/// The input-gradient kernels: the 8x4 register-tiled default and the implicit GEMM.
pub fn grad_input_variants(n: usize, cin: usize, h: usize, w: usize) -> Vec<Variant> {
    tiled_variants(["conv2d_grad_input", "conv2d_grad_input_igemm"], n, cin, h, w)
}

/// The weight-gradient (partial sums) kernels: 4 channels x all taps per invocation (default,
/// K <= 3) and the implicit GEMM; both write the same [parts, Cout*Cin*K*K] partials.
pub fn grad_weight_variants(cout: usize, cin: usize, k: usize, parts: usize) -> Vec<Variant> {
    // Every part computes all Cout*Cin*K*K sums over its chunk of positions.
    let useful = parts * cout * cin * k * k;
    let r4xkk = [cin.div_ceil(64) as u32, cout.div_ceil(4) as u32, parts as u32];
    let igemm = [(cin * k * k).div_ceil(IGEMM_TILE) as u32, cout.div_ceil(IGEMM_TILE) as u32, parts as u32];
    vec![
        Variant {
            name: "r4xkk".into(),
            entry: "conv2d_grad_weight",
            constants: vec![("GRAD_W_CHUNK", GRAD_W_CHUNK as f64)],
            workgroups: r4xkk,
            writes_workgroup_memory_first: false,
            shader: None,
            needs: Needs { invocations: 64, ..Needs::default() },
            tile: Some(TileWork::of_grid(useful, r4xkk, 64 * 4 * k * k)),
        },
        Variant {
            name: "igemm32".into(),
            entry: "conv2d_grad_weight_igemm",
            constants: vec![("GRAD_W_CHUNK", GRAD_W_CHUNK as f64)],
            workgroups: igemm,
            // Every invocation stores its 4 values of both tiles before the first barrier.
            writes_workgroup_memory_first: true,
            shader: None,
            needs: Needs { invocations: 64, workgroup_bytes: 2048, ..Needs::default() },
            tile: Some(TileWork::of_grid(useful, igemm, IGEMM_TILE * IGEMM_TILE)),
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
    conv2d_fused(g, x, w, b, stride, pad, Epilogue::default(), name)
}

/// [`conv2d`] with the additions of `epilogue` done as the output is stored:
/// `y = ((conv2d(x, w) + b) + emb[n % B, co]) + residual[n, co, oy, ox]`, bit-identical to the
/// conv followed by `elementwise::add_channel` and `elementwise::add`, in one pass over y
/// instead of three.
/// Differentiable in every input: the residual's gradient is dy, emb's the sum of dy over pixels
/// and the images sharing a row.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_fused(
    g: &mut Graph,
    x: TensorId,
    w: TensorId,
    b: Option<TensorId>,
    stride: usize,
    pad: usize,
    epilogue: Epilogue,
    name: &str,
) -> TensorId {
    let ws = g.shape(w).to_vec();
    assert!(ws.len() == 4 && ws[2] == ws[3], "{name}: conv2d weight must be [Cout, Cin, K, K], got {ws:?}");
    conv_node(g, x, w, b, [ws[0], ws[1], ws[2], ws[2]], stride, [pad, pad], false, epilogue, name)
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
    conv_node(g, x, w, b, [ws[0], ws[1], ws[2], ws[3]], stride, [ph, pw], relu, Epilogue::default(), name)
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
    conv_node(g, x, w, b, [ws[0], ws[1], 3, 3], 1, [1, 1], false, Epilogue::default(), name)
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
    epilogue: Epilogue,
    name: &str,
) -> TensorId {
    let xs = g.shape(x).to_vec();
    assert!(xs.len() == 4 && xs[1] == cin, "{name}: input {xs:?} does not match weight Cin {cin}");
    if let Some(b) = b {
        assert_eq!(g.shape(b), [cout], "{name}: bias must be [{cout}]");
    }
    let emb_rows = epilogue.emb.map(|e| g.shape(e)[0]);
    if let Some(e) = epilogue.emb {
        let es = g.shape(e).to_vec();
        assert!(
            es.len() == 2 && es[1] == cout && xs[0].is_multiple_of(es[0]),
            "{name}: epilogue emb must be [B, {cout}] with B dividing {}, got {es:?}",
            xs[0]
        );
    }
    let (n, h, wd) = (xs[0], xs[2], xs[3]);
    let xd = g.dtype(x);
    assert!(matches!(xd, DType::F32 | DType::Spike), "{name}: conv input must be f32 or spikes, got {}", xd.name());
    // Spike loads cut 4 taps out of one 32-bit window (shaders/conv.wgsl load_x4).
    assert!(xd != DType::Spike || stride <= 10, "{name}: a conv over packed spikes takes strides up to 10");
    let x_bytes = g.bytes_of(x);
    let (ho, wo) = (conv_out(h, k, stride, pad), conv_out(wd, kw, stride, pad_w));
    if let Some(r) = epilogue.residual {
        assert!(
            g.shape(r) == [n, cout, ho, wo] && g.dtype(r) == DType::F32,
            "{name}: epilogue residual must be f32 [{n}, {cout}, {ho}, {wo}], got {:?} {}",
            g.shape(r),
            g.dtype(r).name()
        );
    }
    let y = g.intermediate(name, &[n, cout, ho, wo]);
    let u = |v: usize| u32::try_from(v).unwrap_or(u32::MAX); // past u32, building has already failed
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let params = ConvParams {
        n: u(n),
        cin: u(cin),
        h: u(h),
        w: u(wd),
        cout: u(cout),
        ho: u(ho),
        wo: u(wo),
        k: u(k),
        stride: u(stride),
        pad: u(pad),
        wo_groups: u(wo.div_ceil(4)),
        x_spikes: (xd == DType::Spike) as u32,
        kw: u(kw),
        pad_w: u(pad_w),
        epilogue: flag(b.is_some(), EPI_BIAS)
            | flag(epilogue.emb.is_some(), EPI_EMB)
            | flag(epilogue.residual.is_some(), EPI_RESIDUAL)
            | flag(relu, EPI_RELU),
        emb_rows: u(emb_rows.unwrap_or(0)),
    };
    let words = |p: ConvParams| Params::of(&p);
    let macs = (n * cout * ho * wo * cin * k * kw) as u64;
    let out_elems = n * cout * ho * wo;
    let epilogue_adds = (epilogue.emb.is_some() as usize + epilogue.residual.is_some() as usize) * out_elems;
    let epilogue_elems = emb_rows.map_or(0, |r| r * cout) + epilogue.residual.map_or(0, |_| out_elems);
    let bytes = x_bytes + 4 * (cout * cin * k * kw + out_elems) as u64;
    let mut candidates = forward_variants(n, cout, ho, wo);
    candidates.extend(forward_db_variants(n, cout, ho, wo, cout * cin * k * kw));
    if relu || k != kw || pad != pad_w {
        // The implicit GEMM takes square kernels; Inception's (non-square, ReLU) convs run the
        // register-tiled default.
        candidates.truncate(1);
    }
    g.push_variants_typed(
        Node {
            shader: &SHADER,
            entry: candidates[0].entry,
            params: words(params),
            // An absent epilogue operand binds the weight in its slot; the shader never reads it.
            reads: vec![x, w, b.unwrap_or(w), epilogue.emb.unwrap_or(w), epilogue.residual.unwrap_or(w)],
            writes: vec![y],
            workgroups: candidates[0].workgroups,
            label: name.to_string(),
            cost: Cost { flops: 2 * macs + epilogue_adds as u64, bytes: bytes + 4 * epilogue_elems as u64 },
        },
        &[xd, DType::F32, DType::F32, DType::F32, DType::F32],
        &[DType::F32],
        candidates,
    );
    if relu || k != kw || pad != pad_w {
        // Inference-only variants (the backward kernels assume square kernels and no ReLU).
        return y;
    }
    let bwd_params = words(params);
    let label = name.to_string();
    let mut inputs = vec![x, w];
    inputs.extend(b);
    inputs.extend(epilogue.emb);
    inputs.extend(epilogue.residual);
    let has_bias = b.is_some();
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
            candidates.push(crate::ops::conv_subgroup::grad_weight_variant(cout, cin, k, parts));
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
            // The reduce kernel reads the part count from `n`.
            let reduce_params = ConvParams { n: parts as u32, ..params };
            g.push(Node {
                shader: &SHADER,
                entry: "conv2d_grad_weight_reduce",
                params: words(reduce_params),
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
        let mut need = needs[2..].iter().copied();
        if has_bias {
            let need = need.next().unwrap();
            grads.push(need.then(|| crate::ops::reduce::group_sum(g, dy, 1, &format!("{label}.grad_bias"))));
        }
        if let Some(rows) = emb_rows {
            // As elementwise::add_channel's backward: dy summed over pixels and the T images of a row.
            let need = need.next().unwrap();
            grads.push(need.then(|| crate::ops::reduce::group_sum(g, dy, rows, &format!("{label}.grad_emb"))));
        }
        if epilogue.residual.is_some() {
            grads.push(need.next().unwrap().then_some(dy));
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

/// CPU reference of [`conv2d_fused`]: [`conv2d_cpu`], then `emb` ([rows, Cout], image n reading
/// row n % rows), then `residual` added to each output.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_fused_cpu(
    x: &[f32],
    xs: [usize; 4],
    wt: &[f32],
    ws: [usize; 4],
    bias: Option<&[f32]>,
    stride: usize,
    pad: usize,
    emb: Option<(&[f32], usize)>,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = conv2d_cpu(x, xs, wt, ws, bias, stride, pad);
    let cout = ws[0];
    let plane = y.len() / (xs[0] * cout);
    for (i, v) in y.iter_mut().enumerate() {
        let (n, co) = (i / (cout * plane), (i / plane) % cout);
        if let Some((e, rows)) = emb {
            *v += e[(n % rows) * cout + co];
        }
        if let Some(r) = residual {
            *v += r[i];
        }
    }
    y
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
