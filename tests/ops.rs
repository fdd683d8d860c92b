//! Every forward kernel against its CPU reference on random inputs of several shapes (odd sizes,
//! channel counts that are not multiples of 4/8/16, batch = T*B).
//!
//! Tolerances: f32 kernels that sum in the same order as their reference are compared at 1e-5
//! relative (+1e-5 absolute for sums that cancel); lavapipe is usually bit-exact, real GPUs may
//! contract to FMA. Kernels built from exp/sqrt use 1e-5 relative. Spikes must match exactly.

mod common;

use common::*;
use sddpm_gpu::graph::{DType, Graph};
use sddpm_gpu::ops::{batchnorm, conv, elementwise, embedding, layout, matmul, neuron, readout, spike_attention};

// ---- conv2d ---------------------------------------------------------------------------------

fn check_conv2d(seed: u64, [n, cin, h, w]: [usize; 4], cout: usize, k: usize, stride: usize, with_bias: bool) {
    let pad = k / 2;
    let mut r = rng(seed);
    let xv = normalish(&mut r, n * cin * h * w, 1.0);
    let wv = uniform(&mut r, cout * cin * k * k, -0.5, 0.5);
    let bv = uniform(&mut r, cout, -0.5, 0.5);
    let mut g = Graph::new();
    let x = g.input("x", &[n, cin, h, w]);
    let wt = g.param("w", &[cout, cin, k, k]);
    let b = g.param("b", &[cout]);
    let y = conv::conv2d(&mut g, x, wt, with_bias.then_some(b), stride, pad, "conv");
    let mut inputs = vec![(x, bits(&xv)), (wt, bits(&wv))];
    if with_bias {
        inputs.push((b, bits(&bv)));
    }
    let got = run_graph(g, &inputs, &[y]).remove(0);
    let want = conv::conv2d_cpu(&xv, [n, cin, h, w], &wv, [cout, cin, k, k], with_bias.then_some(&bv[..]), stride, pad);
    assert_close(&format!("conv2d {n}x{cin}x{h}x{w} -> {cout} k{k} s{stride}"), &got, &want, 1e-5, 1e-5);
}

#[test]
fn conv2d_3x3_stride1_odd_sizes() {
    check_conv2d(1, [2, 3, 7, 9], 5, 3, 1, true);
    check_conv2d(2, [3, 1, 5, 6], 13, 3, 1, true);
}

#[test]
fn conv2d_3x3_stride1_time_folded_batch() {
    // T = 4 spiking steps x B = 2 images.
    check_conv2d(3, [8, 16, 16, 16], 16, 3, 1, true);
    check_conv2d(4, [8, 6, 8, 8], 10, 3, 1, false);
}

#[test]
fn conv2d_3x3_stride2() {
    check_conv2d(5, [2, 5, 9, 11], 7, 3, 2, true);
    check_conv2d(6, [8, 8, 16, 16], 8, 3, 2, true);
    check_conv2d(7, [1, 3, 4, 4], 3, 3, 2, false);
}

#[test]
fn conv2d_1x1_shortcut() {
    check_conv2d(8, [2, 6, 5, 5], 10, 1, 1, true);
    check_conv2d(9, [8, 24, 4, 4], 12, 1, 1, true);
    check_conv2d(10, [3, 7, 3, 13], 9, 1, 1, false);
}

#[test]
fn conv2d_wide_channels_few_pixels() {
    check_conv2d(11, [4, 33, 2, 2], 35, 3, 1, true);
}

/// Random 0/1 values with about `rate` ones.
fn spike_values(r: &mut rand::rngs::StdRng, n: usize, rate: f32) -> Vec<f32> {
    uniform(r, n, 0.0, 1.0).into_iter().map(|u| (u < rate) as u32 as f32).collect()
}

#[test]
fn conv2d_reads_packed_spikes() {
    // Element counts that are not multiples of 32, stride 2 and 1x1 included.
    for (seed, [n, cin, h, w], cout, k, stride) in [
        (20u64, [2usize, 3, 7, 9], 5usize, 3usize, 1usize),
        (21, [3, 5, 9, 11], 7, 3, 2),
        (22, [4, 16, 8, 8], 9, 3, 1),
        (23, [3, 7, 3, 13], 9, 1, 1),
    ] {
        let pad = k / 2;
        let mut r = rng(seed);
        let xv = spike_values(&mut r, n * cin * h * w, 0.3);
        let wv = uniform(&mut r, cout * cin * k * k, -0.5, 0.5);
        let bv = uniform(&mut r, cout, -0.5, 0.5);
        let mut g = Graph::new();
        let xs = g.input_as("spikes", &[n, cin, h, w], DType::Spike);
        let xf = g.input("spikes as f32", &[n, cin, h, w]);
        let wt = g.param("w", &[cout, cin, k, k]);
        let b = g.param("b", &[cout]);
        let ys = conv::conv2d(&mut g, xs, wt, Some(b), stride, pad, "conv over packed spikes");
        let yf = conv::conv2d(&mut g, xf, wt, Some(b), stride, pad, "conv over f32 spikes");
        let packed = sddpm_gpu::graph::pack_spikes(&xv);
        let out = run_graph(g, &[(xs, packed), (xf, bits(&xv)), (wt, bits(&wv)), (b, bits(&bv))], &[ys, yf]);
        let what = format!("conv over spikes {n}x{cin}x{h}x{w} -> {cout} k{k} s{stride}");
        assert_eq!(bits(&out[0]), bits(&out[1]), "{what}: packed and f32 spikes must give the same bits");
        let want = conv::conv2d_cpu(&xv, [n, cin, h, w], &wv, [cout, cin, k, k], Some(&bv), stride, pad);
        assert_close(&what, &out[0], &want, 1e-5, 1e-5);
    }
}

/// The conv with its epilogue (emb and/or residual added as the output is stored), in every
/// forward variant, over f32 and packed spikes: against the CPU reference (1e-5 as above), and
/// bit for bit against the same conv followed by the separate add_channel and add it replaces.
#[test]
fn conv2d_epilogue_matches_cpu_and_the_separate_adds_in_every_variant() {
    // (x [N, Cin, H, W], Cout, K, stride, bias, emb rows B (0: none), residual, packed spikes):
    // odd sizes, Cout below, above and not a multiple of the 32 tile, emb only, residual only, both.
    let cases = [
        ([8usize, 3, 7, 9], 5usize, 3usize, 1usize, true, 2usize, false, false),
        ([6, 5, 9, 11], 37, 3, 2, false, 0, true, true),
        ([4, 7, 3, 13], 9, 1, 1, true, 4, true, false),
        ([3, 6, 5, 5], 33, 1, 2, true, 1, true, true),
        ([8, 4, 6, 7], 70, 3, 1, true, 2, true, true),
        ([6, 3, 7, 5], 10, 3, 2, true, 3, false, true),
        ([2, 8, 5, 6], 12, 3, 1, true, 2, true, true),
    ];
    for (seed, &([n, cin, h, w], cout, k, stride, with_bias, rows, with_residual, packed)) in cases.iter().enumerate() {
        let pad = k / 2;
        let (ho, wo) = (conv::conv_out(h, k, stride, pad), conv::conv_out(w, k, stride, pad));
        let mut r = rng(seed as u64 + 30);
        let xv =
            if packed { spike_values(&mut r, n * cin * h * w, 0.3) } else { normalish(&mut r, n * cin * h * w, 1.0) };
        let wv = uniform(&mut r, cout * cin * k * k, -0.5, 0.5);
        let bv = uniform(&mut r, cout, -0.5, 0.5);
        let ev = normalish(&mut r, rows.max(1) * cout, 1.0);
        let rv = normalish(&mut r, n * cout * ho * wo, 1.0);
        let want = conv::conv2d_fused_cpu(
            &xv,
            [n, cin, h, w],
            &wv,
            [cout, cin, k, k],
            with_bias.then_some(&bv[..]),
            stride,
            pad,
            (rows > 0).then_some((&ev[..], rows)),
            with_residual.then_some(&rv[..]),
        );
        // The double-buffered variants come only with whole vec4s of weights (cases 5 and 7).
        let variants = conv::forward_variants(1, 1, 1, 1).len() + conv::forward_db_variants(1, 1, 1, 1, wv.len()).len();
        for v in 0..variants {
            let mut g = Graph::new();
            let x = g.input_as("x", &[n, cin, h, w], if packed { DType::Spike } else { DType::F32 });
            let wt = g.param("w", &[cout, cin, k, k]);
            let b = g.param("b", &[cout]);
            let e = g.input("emb", &[rows.max(1), cout]);
            let res = g.input("residual", &[n, cout, ho, wo]);
            let epilogue = conv::Epilogue { emb: (rows > 0).then_some(e), residual: with_residual.then_some(res) };
            let bias = with_bias.then_some(b);
            let fused_node = g.nodes.len();
            let fused = conv::conv2d_fused(&mut g, x, wt, bias, stride, pad, epilogue, "fused");
            g.choose(fused_node, v);
            let plain_node = g.nodes.len();
            let mut separate = conv::conv2d(&mut g, x, wt, bias, stride, pad, "conv");
            g.choose(plain_node, v);
            if rows > 0 {
                separate = elementwise::add_channel(&mut g, separate, e, "temb_add");
            }
            if with_residual {
                separate = elementwise::add(&mut g, separate, res, "residual");
            }
            let name = g.variants[&fused_node].variant().name.clone();
            let xin = if packed { sddpm_gpu::graph::pack_spikes(&xv) } else { bits(&xv) };
            let inputs = [(x, xin), (wt, bits(&wv)), (b, bits(&bv)), (e, bits(&ev)), (res, bits(&rv))];
            let out = run_graph(g, &inputs, &[fused, separate]);
            let what = format!(
                "conv2d {name} {n}x{cin}x{h}x{w} -> {cout} k{k} s{stride} bias {with_bias} emb rows {rows} \
                 residual {with_residual} spikes {packed}"
            );
            assert_eq!(bits(&out[0]), bits(&out[1]), "{what}: fused and separate adds must give the same bits");
            assert_close(&what, &out[0], &want, 1e-5, 1e-5);
        }
    }
}

#[test]
fn conv3d_331_matches_reference_layout() {
    // The reference permutes [T, B, C, H, W] -> [B, C, H, W, T], applies Conv3d (3,3,1), and
    // permutes back. Compare our per-step conv on [T*B, C, H, W] against that literal Conv3d.
    for (seed, (t, b, c, h, w)) in
        [(4usize, 2usize, 3usize, 8usize, 8usize), (3, 1, 1, 5, 7), (8, 2, 2, 4, 6)].into_iter().enumerate()
    {
        let mut r = rng(20 + seed as u64);
        let x_tb = normalish(&mut r, t * b * c * h * w, 1.0);
        let wv = uniform(&mut r, c * c * 9, -0.5, 0.5);
        let bv = uniform(&mut r, c, -0.2, 0.2);
        // [T, B, C, H, W] -> [B, C, H, W, T]
        let mut x_bt = vec![0f32; x_tb.len()];
        for tt in 0..t {
            for i in 0..b * c * h * w {
                x_bt[i * t + tt] = x_tb[tt * b * c * h * w + i];
            }
        }
        let want_bt = conv::conv3d_331_cpu(&x_bt, [b, c, h, w, t], &wv, c, Some(&bv));
        let mut g = Graph::new();
        let x = g.input("x", &[t * b, c, h, w]);
        let wt = g.param("T_output_layer.weight", &[c, c, 3, 3, 1]);
        let bias = g.param("T_output_layer.bias", &[c]);
        let y = conv::conv3d_331(&mut g, x, wt, Some(bias), "T_output_layer");
        let got_tb = run_graph(g, &[(x, bits(&x_tb)), (wt, bits(&wv)), (bias, bits(&bv))], &[y]).remove(0);
        let mut got_bt = vec![0f32; got_tb.len()];
        for tt in 0..t {
            for i in 0..b * c * h * w {
                got_bt[i * t + tt] = got_tb[tt * b * c * h * w + i];
            }
        }
        assert_close("conv3d (3,3,1)", &got_bt, &want_bt, 1e-5, 1e-5);
    }
}

// ---- linear / matmul ------------------------------------------------------------------------

fn check_linear(seed: u64, rows: usize, inp: usize, out: usize) {
    let mut r = rng(seed);
    let xv = normalish(&mut r, rows * inp, 1.0);
    let wv = uniform(&mut r, out * inp, -0.3, 0.3);
    let bv = uniform(&mut r, out, -0.3, 0.3);
    let mut g = Graph::new();
    let x = g.input("x", &[rows, inp]);
    let w = g.param("w", &[out, inp]);
    let b = g.param("b", &[out]);
    let y = matmul::linear(&mut g, x, w, Some(b), "linear");
    let got = run_graph(g, &[(x, bits(&xv)), (w, bits(&wv)), (b, bits(&bv))], &[y]).remove(0);
    let want = matmul::linear_cpu(&xv, &wv, Some(&bv), rows, inp, out);
    assert_close(&format!("linear {rows}x{inp} -> {out}"), &got, &want, 1e-5, 1e-5);
}

#[test]
fn linear_time_embedding_shapes() {
    check_linear(30, 2, 128, 512);
    check_linear(31, 2, 512, 512);
    check_linear(32, 2, 512, 48);
}

#[test]
fn linear_odd_shapes() {
    check_linear(33, 3, 7, 5);
    check_linear(34, 33, 65, 31);
    check_linear(35, 1, 1, 1);
}

#[test]
fn matmul_strided_layouts() {
    let (m, n, k) = (37, 45, 29);
    let mut r = rng(36);
    let a = normalish(&mut r, m * k, 1.0);
    let b = normalish(&mut r, k * n, 1.0);
    // NN, A transposed (stored [K, M]), B transposed (stored [N, K]).
    let cases = [
        ("nn", matmul::Strides::nn(k, n)),
        ("tn", matmul::Strides { a_m: 1, a_k: m, b_k: n, b_n: 1 }),
        ("nt", matmul::Strides::nt(k)),
    ];
    for (name, s) in cases {
        let mut g = Graph::new();
        let ta = g.input("a", &[m * k]);
        let tb = g.input("b", &[k * n]);
        let c = matmul::matmul(&mut g, ta, tb, None, [m, n, k], s, name);
        let got = run_graph(g, &[(ta, bits(&a)), (tb, bits(&b))], &[c]).remove(0);
        let want = matmul::matmul_cpu(&a, &b, None, [m, n, k], s);
        assert_close(&format!("matmul {name}"), &got, &want, 1e-5, 1e-5);
    }
}

// ---- time embedding ---------------------------------------------------------------------------

#[test]
fn timestep_table_is_interleaved_sin_cos() {
    let d = 128;
    let table = embedding::timestep_table(1000, d);
    assert_eq!(table.len(), 1000 * d);
    // t = 0: sin 0 = 0, cos 0 = 1, interleaved.
    for i in 0..d / 2 {
        assert_eq!(table[2 * i], 0.0);
        assert_eq!(table[2 * i + 1], 1.0);
    }
    for t in [1usize, 17, 500, 999] {
        for i in [0usize, 1, 31, 63] {
            let f = (-(2.0 * i as f64) / d as f64 * 10000f64.ln()).exp();
            let (s, c) = ((t as f64 * f).sin(), (t as f64 * f).cos());
            // f32 rounding of t*f grows with t (999 rad): allow 2e-4 absolute.
            assert!((table[t * d + 2 * i] as f64 - s).abs() < 2e-4, "sin t={t} i={i}");
            assert!((table[t * d + 2 * i + 1] as f64 - c).abs() < 2e-4, "cos t={t} i={i}");
        }
    }
}

#[test]
fn timestep_table_matches_reference_checkpoint() {
    // The fixture checkpoint stores the reference's own table (ch = 16).
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/weights.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("time_embedding.timembedding.0.weight").unwrap();
    assert_eq!(t.shape(), [1000, 16]);
    let want: Vec<f32> = bytemuck::pod_collect_to_vec(t.data());
    let got = embedding::timestep_table(1000, 16);
    assert_close("timestep table vs PyTorch", &got, &want, 1e-5, 2e-6);
}

#[test]
fn gather_rows_time_embedding() {
    let table = embedding::timestep_table(1000, 128);
    for idx in [vec![0u32, 999], vec![5, 5, 17], vec![998]] {
        let mut g = Graph::new();
        let tt = g.param("table", &[1000, 128]);
        let ti = g.input_as("t", &[idx.len()], DType::U32);
        let out = embedding::gather_rows(&mut g, tt, ti, "temb");
        let got = run_graph(g, &[(tt, bits(&table)), (ti, idx.clone())], &[out]).remove(0);
        assert_eq!(got, embedding::gather_rows_cpu(&table, 128, &idx));
    }
}

// ---- batch norm -------------------------------------------------------------------------------

struct BnData {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn bn_data(seed: u64, n: usize, c: usize, hw: usize) -> BnData {
    let mut r = rng(seed);
    let mut x = normalish(&mut r, n * c * hw, 1.5);
    for (i, v) in x.iter_mut().enumerate() {
        *v += ((i / hw) % c) as f32 * 0.3; // per-channel offsets
    }
    BnData {
        x,
        w: uniform(&mut r, c, 0.8, 1.2),
        b: uniform(&mut r, c, -0.1, 0.1),
        rm: uniform(&mut r, c, -0.2, 0.2),
        rv: uniform(&mut r, c, 0.5, 1.5),
    }
}

fn bn_graph(g: &mut Graph, n: usize, c: usize, hw: usize) -> (sddpm_gpu::graph::TensorId, batchnorm::BnParams) {
    let x = g.input("x", &[n, c, hw]);
    let p = batchnorm::BnParams {
        weight: g.param("bn.weight", &[c]),
        bias: g.param("bn.bias", &[c]),
        running_mean: g.param("bn.running_mean", &[c]),
        running_var: g.param("bn.running_var", &[c]),
        groups: batchnorm::BnGroups::ONE,
    };
    (x, p)
}

#[test]
fn batchnorm_eval_running_stats() {
    for (seed, (n, c, hw)) in [(40u64, (8usize, 5usize, 63usize)), (41, (2, 16, 16)), (42, (4, 3, 1))] {
        let d = bn_data(seed, n, c, hw);
        let mut g = Graph::new();
        let (x, p) = bn_graph(&mut g, n, c, hw);
        let y = batchnorm::batchnorm_eval(&mut g, x, p, "bn");
        let inputs = [
            (x, bits(&d.x)),
            (p.weight, bits(&d.w)),
            (p.bias, bits(&d.b)),
            (p.running_mean, bits(&d.rm)),
            (p.running_var, bits(&d.rv)),
        ];
        let got = run_graph(g, &inputs, &[y]).remove(0);
        let want = batchnorm::batchnorm_eval_cpu(&d.x, c, hw, &d.w, &d.b, &d.rm, &d.rv);
        assert_close("bn eval", &got, &want, 1e-5, 1e-5);
    }
}

#[test]
fn batchnorm_train_batch_stats_and_running_update() {
    // hw = 1 and n*hw not a multiple of the 256-wide reduction exercise the edges.
    for (seed, (n, c, hw)) in
        [(43u64, (8usize, 5usize, 63usize)), (44, (8, 3, 1024)), (45, (2, 7, 1)), (46, (4, 1, 300))]
    {
        let d = bn_data(seed, n, c, hw);
        let mut g = Graph::new();
        let (x, p) = bn_graph(&mut g, n, c, hw);
        let (y, saved) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
        g.mark_output(p.running_mean);
        g.mark_output(p.running_var);
        let inputs = [
            (x, bits(&d.x)),
            (p.weight, bits(&d.w)),
            (p.bias, bits(&d.b)),
            (p.running_mean, bits(&d.rm)),
            (p.running_var, bits(&d.rv)),
        ];
        let out = run_graph(g, &inputs, &[y, saved.mean, saved.invstd, p.running_mean, p.running_var]);
        let (mut rm, mut rv) = (d.rm.clone(), d.rv.clone());
        let (y_cpu, mean_cpu, invstd_cpu) = batchnorm::batchnorm_train_cpu(&d.x, c, hw, &d.w, &d.b, &mut rm, &mut rv);
        assert_close("bn train y", &out[0], &y_cpu, 1e-5, 2e-5);
        assert_close("bn train mean", &out[1], &mean_cpu, 1e-5, 1e-6);
        assert_close("bn train invstd", &out[2], &invstd_cpu, 1e-5, 0.0);
        assert_close("bn running_mean", &out[3], &rm, 1e-5, 1e-6);
        assert_close("bn running_var", &out[4], &rv, 1e-5, 0.0);
    }
}

#[test]
fn batchnorm_train_is_deterministic() {
    let d = bn_data(47, 8, 4, 500);
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut g = Graph::new();
        let (x, p) = bn_graph(&mut g, 8, 4, 500);
        let (y, saved) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
        let inputs = [
            (x, bits(&d.x)),
            (p.weight, bits(&d.w)),
            (p.bias, bits(&d.b)),
            (p.running_mean, bits(&d.rm)),
            (p.running_var, bits(&d.rv)),
        ];
        runs.push(run_graph(g, &inputs, &[y, saved.mean, saved.invstd]));
    }
    for r in &runs[1..] {
        for (a, b) in r.iter().zip(&runs[0]) {
            assert_eq!(bits(a), bits(b), "BN statistics must be bitwise reproducible");
        }
    }
}

/// What follows training-mode BN in one kernel: a residual add, Swish, or Swish then an add.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BnEpilogue {
    Add,
    Swish,
    SwishAdd,
}

/// `BN(x)` with `epi` fused in, and the same ops unfused, into `g`: (fused y, unfused y).
fn bn_epilogue_graph(
    g: &mut Graph,
    epi: BnEpilogue,
    x: sddpm_gpu::graph::TensorId,
    p: batchnorm::BnParams,
    r: sddpm_gpu::graph::TensorId,
) -> (sddpm_gpu::graph::TensorId, sddpm_gpu::graph::TensorId) {
    let fused = match epi {
        BnEpilogue::Add => batchnorm::batchnorm_train_add(g, x, p, r, "bn"),
        BnEpilogue::Swish => batchnorm::batchnorm_train_swish(g, x, p, None, "bn"),
        BnEpilogue::SwishAdd => batchnorm::batchnorm_train_swish(g, x, p, Some(r), "bn"),
    };
    let (y, _) = batchnorm::batchnorm_train(g, x, p, "bn.unfused");
    let unfused = match epi {
        BnEpilogue::Add => elementwise::add(g, y, r, "add"),
        BnEpilogue::Swish => elementwise::swish(g, y, "swish"),
        BnEpilogue::SwishAdd => {
            let o = elementwise::swish(g, y, "swish");
            elementwise::add(g, o, r, "add")
        }
    };
    (fused, unfused)
}

#[test]
fn batchnorm_train_fused_epilogues_match_unfused_and_cpu() {
    for epi in [BnEpilogue::Add, BnEpilogue::Swish, BnEpilogue::SwishAdd] {
        for (seed, (n, c, hw)) in [(48u64, (8usize, 5usize, 63usize)), (49, (4, 3, 1)), (57, (6, 16, 25))] {
            let d = bn_data(seed, n, c, hw);
            let rv = normalish(&mut rng(seed + 100), n * c * hw, 1.0);
            let mut g = Graph::new();
            let (x, p) = bn_graph(&mut g, n, c, hw);
            let r = g.input("r", &[n, c, hw]);
            let (fused, unfused) = bn_epilogue_graph(&mut g, epi, x, p, r);
            let mut inputs = vec![
                (x, bits(&d.x)),
                (p.weight, bits(&d.w)),
                (p.bias, bits(&d.b)),
                (p.running_mean, bits(&d.rm)),
                (p.running_var, bits(&d.rv)),
            ];
            if epi != BnEpilogue::Swish {
                inputs.push((r, bits(&rv)));
            }
            let out = run_graph(g, &inputs, &[fused, unfused]);
            let what = format!("BN + {epi:?} N={n} C={c} HW={hw}");
            assert_eq!(bits(&out[0]), bits(&out[1]), "{what}: fused vs unfused");
            let (mut rm_cpu, mut rv_cpu) = (d.rm.clone(), d.rv.clone());
            let (want, _, _) = match epi {
                BnEpilogue::Add => {
                    batchnorm::batchnorm_train_add_cpu(&d.x, c, hw, &d.w, &d.b, &mut rm_cpu, &mut rv_cpu, &rv)
                }
                _ => {
                    let r = (epi == BnEpilogue::SwishAdd).then_some(&rv[..]);
                    batchnorm::batchnorm_train_swish_cpu(&d.x, c, hw, &d.w, &d.b, &mut rm_cpu, &mut rv_cpu, r)
                }
            };
            assert_close(&what, &out[0], &want, 1e-5, 2e-5);
        }
    }
}

// ---- neuron -----------------------------------------------------------------------------------

fn check_neuron(seed: u64, t: usize, n: usize, cfg: neuron::Neuron) {
    let mut r = rng(seed);
    let xv: Vec<f32> = normalish(&mut r, t * n, 1.2).iter().map(|v| v + 0.4).collect();
    let mut g = Graph::new();
    let x = g.input("x", &[t, n]);
    let s_inf = neuron::neuron_forward(&mut g, x, t, cfg, "neuron");
    let (s_tr, kept) = neuron::neuron_forward_train(&mut g, x, t, cfg, "neuron.train");
    assert_eq!((g.dtype(s_inf), g.dtype(s_tr), kept), (DType::Spike, DType::Spike, x));
    for s in [s_inf, s_tr] {
        g.mark_output(s);
    }
    let c = ctx();
    let plan = sddpm_gpu::graph::Plan::compile(c, &g).unwrap();
    plan.write(c, x, &xv).unwrap();
    plan.run(c).unwrap();
    let (s_cpu, _) = neuron::neuron_cpu(&xv, t, cfg);
    assert!(s_cpu.contains(&1.0) && s_cpu.contains(&0.0), "test input must both fire and not");
    // Words compared whole: bits past the last element must be 0 too.
    let want = sddpm_gpu::graph::pack_spikes(&s_cpu);
    assert_eq!(plan.read_u32(c, s_inf).unwrap(), want, "inference spike words T={t} N={n} {cfg:?}");
    assert_eq!(plan.read_u32(c, s_tr).unwrap(), want, "training spike words T={t} N={n} {cfg:?}");
    assert_eq!(plan.read(c, s_inf).unwrap(), s_cpu, "unpacked spikes T={t} N={n} {cfg:?}");
}

#[test]
fn neuron_packs_spikes_at_odd_sizes() {
    // N a multiple of 32 takes the per-neuron grid (544: a partial last workgroup; T past 32:
    // more than one mask per neuron), any other N the per-word grid.
    for t in (1..=8).chain([33, 40]) {
        for n in [1, 31, 33, 64, 77, 96, 544] {
            let mut r = rng(60 + t as u64);
            let xv: Vec<f32> = normalish(&mut r, t * n, 1.2).iter().map(|v| v + 0.4).collect();
            let mut g = Graph::new();
            let x = g.input("x", &[t, n]);
            let s = neuron::neuron_forward(&mut g, x, t, neuron::Neuron::default(), "neuron");
            g.mark_output(s);
            let c = ctx();
            let plan = sddpm_gpu::graph::Plan::compile(c, &g).unwrap();
            plan.write(c, x, &xv).unwrap();
            plan.run(c).unwrap();
            let want = sddpm_gpu::graph::pack_spikes(&neuron::neuron_cpu(&xv, t, neuron::Neuron::default()).0);
            assert_eq!(plan.read_u32(c, s).unwrap(), want, "T={t} N={n}");
        }
    }
}

#[test]
fn neuron_if_matches_cpu_exactly() {
    check_neuron(50, 4, 1000, neuron::Neuron::default());
    check_neuron(51, 8, 333, neuron::Neuron::default());
    check_neuron(52, 1, 17, neuron::Neuron::default());
}

#[test]
fn neuron_threshold_guided() {
    check_neuron(53, 4, 777, neuron::Neuron { v_th: 0.997, ..Default::default() });
    check_neuron(54, 4, 777, neuron::Neuron { v_th: 1.003, ..Default::default() });
}

#[test]
fn neuron_lif_and_nonzero_reset() {
    check_neuron(55, 4, 513, neuron::Neuron { tau: Some(2.0), ..Default::default() });
    check_neuron(56, 6, 129, neuron::Neuron { v_th: 0.5, v_reset: -0.25, tau: Some(1.5) });
}

#[test]
fn neuron_cpu_reference_semantics() {
    // Hand-worked IF: x = 0.6 each step -> h = 0.6, 1.2 (fire, reset), 0.6, 1.2 (fire).
    let (s, h) = neuron::neuron_cpu(&[0.6, 0.6, 0.6, 0.6], 4, neuron::Neuron::default());
    assert_eq!(s, [0.0, 1.0, 0.0, 1.0]);
    assert_eq!(h, [0.6, 1.2, 0.6, 1.2]);
    // Exactly at threshold fires (Heaviside of h - v_th >= 0).
    assert_eq!(neuron::neuron_cpu(&[1.0], 1, neuron::Neuron::default()).0, [1.0]);
}

/// BN-apply (+ the time-embedding term) fused into the neuron: the same spike words as BN, the add
/// and the neuron run apart, and as the CPU reference on the statistics the GPU computed (the
/// statistics pass is tested above).
fn check_neuron_bn(seed: u64, [t, b, c, hw]: [usize; 4], with_emb: bool, cfg: neuron::Neuron) {
    let n = t * b;
    let mut r = rng(seed);
    let cv = normalish(&mut r, n * c * hw, 1.0);
    let wv = uniform(&mut r, c, 0.5, 1.5);
    let bv = uniform(&mut r, c, 0.0, 0.8);
    let ev = uniform(&mut r, b * c, -0.3, 0.3);
    let mut g = Graph::new();
    let (x, p) = bn_graph(&mut g, n, c, hw);
    let emb = g.input("emb", &[b, c]);
    let saved = batchnorm::batchnorm_stats(&mut g, x, p, "bn");
    let input = neuron::BnInput { c: x, bn: p, saved, emb: with_emb.then_some(emb), bn_name: "bn".into() };
    let fused = neuron::neuron_forward_train_bn(&mut g, input, t, cfg, "neuron");
    let (y, _) = batchnorm::batchnorm_train(&mut g, x, p, "bn.unfused");
    let z = if with_emb { elementwise::add_channel(&mut g, y, emb, "add") } else { y };
    let unfused = neuron::neuron_forward(&mut g, z, t, cfg, "neuron.unfused");
    for o in [fused, unfused, saved.mean, saved.invstd] {
        g.mark_output(o);
    }
    let ctx = ctx();
    let plan = sddpm_gpu::graph::Plan::compile(ctx, &g).unwrap();
    let mut inputs = vec![(x, &cv), (p.weight, &wv), (p.bias, &bv)];
    if with_emb {
        inputs.push((emb, &ev));
    }
    for (tensor, data) in inputs {
        plan.write(ctx, tensor, data).unwrap();
    }
    plan.write(ctx, p.running_mean, &vec![0f32; c]).unwrap();
    plan.write(ctx, p.running_var, &vec![1f32; c]).unwrap();
    plan.run(ctx).unwrap();
    let what = format!("T={t} B={b} C={c} HW={hw} emb {with_emb} {cfg:?}");
    let got = plan.read_u32(ctx, fused).unwrap();
    assert_eq!(got, plan.read_u32(ctx, unfused).unwrap(), "fused vs unfused spike words {what}");
    let (mean, invstd) = (plan.read(ctx, saved.mean).unwrap(), plan.read(ctx, saved.invstd).unwrap());
    let xv = neuron::bn_input_cpu(&cv, c, hw, &wv, &bv, &mean, &invstd, with_emb.then_some((&ev[..], b)));
    let (s_cpu, _) = neuron::neuron_cpu(&xv, t, cfg);
    assert!(s_cpu.contains(&1.0) && s_cpu.contains(&0.0), "test input must both fire and not ({what})");
    assert_eq!(got, sddpm_gpu::graph::pack_spikes(&s_cpu), "spike words vs CPU {what}");
}

#[test]
fn neuron_fused_with_batchnorm_matches_unfused_and_cpu() {
    let lif = neuron::Neuron { tau: Some(2.0), ..Default::default() };
    // B*C*HW a multiple of 32 takes the per-neuron grid, any other the per-word grid.
    for (i, (shape, emb)) in [
        ([1, 2, 4, 16], true),
        ([2, 3, 5, 9], true),
        ([3, 2, 16, 4], false),
        ([4, 3, 7, 1], true),
        ([4, 2, 8, 32], false),
        ([3, 1, 3, 11], true),
        // Enough neurons that a 1% error in the added term flips spikes.
        ([4, 4, 8, 256], true),
    ]
    .into_iter()
    .enumerate()
    {
        for cfg in [neuron::Neuron::default(), lif] {
            check_neuron_bn(70 + i as u64, shape, emb, cfg);
        }
    }
}

// ---- elementwise ------------------------------------------------------------------------------

#[test]
fn swish_matches_cpu() {
    for (seed, n) in [(60u64, 1000usize), (61, 4097), (62, 1)] {
        let mut r = rng(seed);
        let xv = uniform(&mut r, n, -12.0, 12.0);
        let mut g = Graph::new();
        let x = g.input("x", &[n]);
        let y = elementwise::swish(&mut g, x, "swish");
        let got = run_graph(g, &[(x, bits(&xv))], &[y]).remove(0);
        assert_close("swish", &got, &elementwise::swish_cpu(&xv), 1e-5, 1e-6);
    }
}

#[test]
fn add_matches_cpu() {
    let mut r = rng(63);
    let (av, bv) = (normalish(&mut r, 1023, 1.0), normalish(&mut r, 1023, 1.0));
    let mut g = Graph::new();
    let a = g.input("a", &[3, 11, 31]);
    let b = g.input("b", &[3, 11, 31]);
    let y = elementwise::add(&mut g, a, b, "add");
    let got = run_graph(g, &[(a, bits(&av)), (b, bits(&bv))], &[y]).remove(0);
    assert_eq!(got, elementwise::add_cpu(&av, &bv));
}

#[test]
fn add_channel_broadcasts_over_time_and_pixels() {
    for (seed, (t, b, c, s)) in [(64u64, (4usize, 2usize, 5usize, 21usize)), (65, (8, 3, 16, 16)), (66, (1, 1, 7, 1))] {
        let mut r = rng(seed);
        let xv = normalish(&mut r, t * b * c * s, 1.0);
        let ev = normalish(&mut r, b * c, 1.0);
        let mut g = Graph::new();
        let x = g.input("x", &[t * b, c, s]);
        let e = g.input("e", &[b, c]);
        let y = elementwise::add_channel(&mut g, x, e, "temb_add");
        let got = run_graph(g, &[(x, bits(&xv)), (e, bits(&ev))], &[y]).remove(0);
        assert_eq!(got, elementwise::add_channel_cpu(&xv, &ev, c, s, b));
    }
}

#[test]
fn elementwise_grid_beyond_65535_workgroups() {
    // 2^24 + 5 elements need more than 65535 workgroups of 256: the grid spills into y.
    let n = (1 << 24) + 5;
    let av: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let bv: Vec<f32> = (0..n).map(|i| (i / 1000) as f32).collect();
    let mut g = Graph::new();
    let a = g.input("a", &[n]);
    let b = g.input("b", &[n]);
    let y = elementwise::add(&mut g, a, b, "add");
    let got = run_graph(g, &[(a, bits(&av)), (b, bits(&bv))], &[y]).remove(0);
    assert_eq!(got, elementwise::add_cpu(&av, &bv));
}

// ---- layout -----------------------------------------------------------------------------------

#[test]
fn upsample2x_nearest() {
    for (seed, shape) in [(70u64, [3usize, 5, 7, 9]), (71, [8, 16, 4, 4]), (72, [1, 1, 1, 1])] {
        let mut r = rng(seed);
        let xv = normalish(&mut r, shape.iter().product(), 1.0);
        let mut g = Graph::new();
        let x = g.input("x", &shape);
        let y = layout::upsample2x(&mut g, x, "up");
        let got = run_graph(g, &[(x, bits(&xv))], &[y]).remove(0);
        assert_eq!(got, layout::upsample2x_cpu(&xv, shape));
    }
}

#[test]
fn upsample2x_packed_spikes() {
    for (seed, shape) in [(73u64, [3usize, 5, 7, 9]), (74, [8, 16, 4, 4]), (75, [1, 1, 1, 1]), (76, [2, 3, 5, 3])] {
        let mut r = rng(seed);
        let xv = spike_values(&mut r, shape.iter().product(), 0.4);
        let mut g = Graph::new();
        let x = g.input_as("x", &shape, DType::Spike);
        let y = layout::upsample2x(&mut g, x, "up");
        assert_eq!(g.dtype(y), DType::Spike);
        let mut g2 = g.clone();
        g2.mark_output(y);
        let c = ctx();
        let plan = sddpm_gpu::graph::Plan::compile(c, &g2).unwrap();
        plan.write(c, x, &sddpm_gpu::graph::pack_spikes(&xv)).unwrap();
        plan.run(c).unwrap();
        let want = layout::upsample2x_cpu(&xv, shape);
        assert_eq!(plan.read_u32(c, y).unwrap(), sddpm_gpu::graph::pack_spikes(&want), "{shape:?}");
    }
}

#[test]
fn group_sum_counts_packed_spikes() {
    for (seed, [n, c, s], groups) in [(77u64, [8usize, 5, 7], 1usize), (78, [8, 3, 33], 2), (79, [4, 16, 64], 1)] {
        let mut r = rng(seed);
        let xv = spike_values(&mut r, n * c * s, 0.3);
        let mut g = Graph::new();
        let x = g.input_as("spikes", &[n, c, s], DType::Spike);
        let y = sddpm_gpu::ops::reduce::group_sum(&mut g, x, groups, "spike_count");
        let got = run_graph(g, &[(x, sddpm_gpu::graph::pack_spikes(&xv))], &[y]).remove(0);
        assert_eq!(got, sddpm_gpu::ops::reduce::group_sum_cpu(&xv, n, c, s, groups), "counts {n}x{c}x{s} / {groups}");
    }
}

#[test]
fn concat_channels_like_torch_cat() {
    for (seed, (n, ca, cb, s)) in [(73u64, (2usize, 3usize, 4usize, 35usize)), (74, (8, 16, 8, 16)), (75, (1, 1, 1, 1))]
    {
        let mut r = rng(seed);
        let av = normalish(&mut r, n * ca * s, 1.0);
        let bv = normalish(&mut r, n * cb * s, 1.0);
        let mut g = Graph::new();
        let a = g.input("a", &[n, ca, s]);
        let b = g.input("b", &[n, cb, s]);
        let y = layout::concat_channels(&mut g, a, b, "cat");
        assert_eq!(g.shape(y), [n, ca + cb, s]);
        let got = run_graph(g, &[(a, bits(&av)), (b, bits(&bv))], &[y]).remove(0);
        assert_eq!(got, layout::concat_channels_cpu(&av, &bv, n, ca, cb, s));
    }
}

#[test]
fn repeat_leading_over_time() {
    for (seed, (t, shape)) in [(76u64, (4usize, [2usize, 3, 5, 7])), (77, (1, [1, 1, 2, 2])), (78, (8, [3, 1, 4, 4]))] {
        let mut r = rng(seed);
        let xv = normalish(&mut r, shape.iter().product(), 1.0);
        let mut g = Graph::new();
        let x = g.input("x", &shape);
        let y = layout::repeat_leading(&mut g, x, t, "repeat");
        assert_eq!(g.shape(y)[0], t * shape[0]);
        let got = run_graph(g, &[(x, bits(&xv))], &[y]).remove(0);
        assert_eq!(got, layout::repeat_leading_cpu(&xv, t));
    }
}

// ---- readout ----------------------------------------------------------------------------------

#[test]
fn readout_weights_match_reference() {
    let w = readout::readout_weights(4, readout::DECAY);
    for (got, want) in w.iter().zip([0.512f32, 0.64, 0.8, 1.0]) {
        assert!((got - want).abs() < 1e-7, "{w:?}");
    }
    assert_eq!(readout::readout_weights(1, readout::DECAY), [1.0]);
}

#[test]
fn membrane_readout_matches_cpu() {
    for (seed, (t, m)) in [(80u64, (4usize, 2 * 3 * 64)), (81, (8, 99)), (82, (1, 5))] {
        let mut r = rng(seed);
        let hv = normalish(&mut r, t * m, 1.0);
        let mut g = Graph::new();
        let h = g.input("h", &[t, m]);
        let y = readout::membrane_readout(&mut g, h, t, readout::DECAY, "readout");
        let got = run_graph(g, &[(h, bits(&hv))], &[y]).remove(0);
        assert_eq!(bits(&got), bits(&readout::membrane_readout_cpu(&hv, t, readout::DECAY)));
    }
}

fn check_spike_attention(seed: u64, [rows, c, h, w]: [usize; 4], heads: usize) {
    let dims = spike_attention::Dims { rows, c, n: h * w, heads };
    assert_eq!(dims.n_form(), h * w < c / heads);
    let mut r = rng(seed);
    let len = rows * c * h * w;
    let (qv, kv, vv) = (spikes(&mut r, len, 0.3), spikes(&mut r, len, 0.5), spikes(&mut r, len, 0.2));
    let mut g = Graph::new();
    let [q, k, v] = ["q", "k", "v"].map(|n| g.input_as(n, &[rows, c, h, w], DType::Spike));
    let o = spike_attention::spike_attention(&mut g, q, k, v, heads, "attn");
    let packed = sddpm_gpu::graph::pack_spikes;
    let got = run_graph(g, &[(q, packed(&qv)), (k, packed(&kv)), (v, packed(&vv))], &[o]);
    let want = spike_attention::spike_attention_cpu(&qv, &kv, &vv, dims);
    // Integer sums of 0/1 products times one rounded scale: bit-exact in any order.
    assert_eq!(bits(&got[0]), bits(&want), "spike attention {rows}x{c}x{h}x{w}, {heads} heads");
    // Against the definition's order, (q k^T) v in f64: the same numbers.
    let d = c / heads;
    let n = h * w;
    for (idx, &o) in want.iter().enumerate() {
        let (row, ch, p) = (idx / (c * n), (idx / n) % c, idx % n);
        let hd = ch / d * d;
        let mut acc = 0f64;
        for m in 0..n {
            let qk: f64 =
                (0..d).map(|i| (qv[(row * c + hd + i) * n + p] * kv[(row * c + hd + i) * n + m]) as f64).sum();
            acc += qk * vv[(row * c + ch) * n + m] as f64;
        }
        assert_eq!(o, acc as f32 * dims.scale(), "definition order at {idx}");
    }
}

#[test]
fn spike_attention_matches_cpu_exactly() {
    // [d, d] form (N >= d).
    check_spike_attention(70, [2, 8, 4, 4], 2);
    check_spike_attention(71, [3, 6, 3, 5], 3);
    check_spike_attention(72, [1, 5, 7, 1], 1);
    check_spike_attention(73, [4, 16, 2, 2], 4);
    // [N, N] form (N < d).
    check_spike_attention(74, [2, 12, 2, 3], 1);
    check_spike_attention(75, [3, 10, 1, 3], 2);
    check_spike_attention(76, [1, 33, 1, 1], 1);
}
