//! Every backward: GPU (through the graph's autodiff) against its CPU reference on random inputs,
//! and the CPU reference against central finite differences of the CPU forward.
//!
//! Tolerances: GPU vs CPU 1e-5 relative (+1e-5 absolute, sums of signed terms); finite
//! differences in f32 with step h are good to ~1e-3 relative for linear ops and ~1e-2 for
//! nonlinear ones. The neuron's surrogate gradient is not the derivative of its (step-function)
//! forward, so it is checked against the PyTorch reference's autograd instead.

mod common;

use common::*;
use sddpm_gpu::graph::{backward, DType, Graph, Plan};
use sddpm_gpu::ops::{batchnorm, conv, elementwise, layout, matmul, neuron, optim, readout, reduce, spike_attention};

fn check_conv_backward(seed: u64, [n, cin, h, w]: [usize; 4], cout: usize, k: usize, stride: usize) {
    let pad = k / 2;
    let (ho, wo) = (conv::conv_out(h, k, stride, pad), conv::conv_out(w, k, stride, pad));
    let mut r = rng(seed);
    let xv = normalish(&mut r, n * cin * h * w, 1.0);
    let wv = uniform(&mut r, cout * cin * k * k, -0.5, 0.5);
    let bv = uniform(&mut r, cout, -0.5, 0.5);
    let dy = normalish(&mut r, n * cout * ho * wo, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[n, cin, h, w]);
    let wt = g.param("w", &[cout, cin, k, k]);
    let b = g.param("b", &[cout]);
    let y = conv::conv2d(&mut g, x, wt, Some(b), stride, pad, "conv");
    let got = gpu_grads(g, y, &dy, &[(x, xv.clone()), (wt, wv.clone()), (b, bv.clone())], &[x, wt, b]);
    let dx = conv::conv2d_grad_input_cpu(&dy, &wv, [n, cin, h, w], [cout, k], stride, pad);
    let dw = conv::conv2d_grad_weight_cpu(&dy, &xv, [n, cin, h, w], [cout, k], stride, pad);
    let db = reduce::group_sum_cpu(&dy, n, cout, ho * wo, 1);
    let what = format!("conv {n}x{cin}x{h}x{w}->{cout} k{k} s{stride}");
    assert_close(&format!("{what} dx"), &got[0], &dx, 1e-5, 1e-5);
    assert_close(&format!("{what} dw"), &got[1], &dw, 1e-5, 1e-4);
    assert_close(&format!("{what} db"), &got[2], &db, 1e-5, 1e-4);
    let fwd_x = |xx: &[f32]| conv::conv2d_cpu(xx, [n, cin, h, w], &wv, [cout, cin, k, k], Some(&bv), stride, pad);
    fd_check(&format!("{what} dx"), fwd_x, &xv, &dy, &dx, 1e-2, 2e-3);
    let fwd_w = |ww: &[f32]| conv::conv2d_cpu(&xv, [n, cin, h, w], ww, [cout, cin, k, k], Some(&bv), stride, pad);
    fd_check(&format!("{what} dw"), fwd_w, &wv, &dy, &dw, 1e-2, 2e-3);
    let fwd_b = |bb: &[f32]| conv::conv2d_cpu(&xv, [n, cin, h, w], &wv, [cout, cin, k, k], Some(bb), stride, pad);
    fd_check(&format!("{what} db"), fwd_b, &bv, &dy, &db, 1e-2, 2e-3);
}

#[test]
fn conv2d_backward_3x3() {
    check_conv_backward(1, [2, 3, 7, 9], 5, 3, 1);
    check_conv_backward(2, [8, 4, 8, 8], 6, 3, 1);
}

#[test]
fn conv2d_weight_gradient_over_many_positions() {
    // 8 x 32 x 32 = 8192 output positions per weight: more than one chunk, and more loop
    // iterations than lavapipe lets one invocation run (it silently stops loops at 65535).
    check_conv_backward(6, [8, 2, 32, 32], 3, 3, 1);
    check_conv_backward(7, [1, 1, 64, 64], 2, 1, 1);
}

#[test]
fn conv2d_weight_gradient_reads_packed_spikes() {
    // What backward keeps of a conv over spikes is the packed spikes; the weight gradient must
    // equal the one over the same spikes as f32, bit for bit.
    for (seed, [n, cin, h, w], cout, k, stride) in
        [(8u64, [2usize, 3, 7, 9], 5usize, 3usize, 1usize), (9, [3, 5, 9, 11], 4, 3, 2), (10, [8, 2, 32, 32], 3, 3, 1)]
    {
        let pad = k / 2;
        let (ho, wo) = (conv::conv_out(h, k, stride, pad), conv::conv_out(w, k, stride, pad));
        let mut r = rng(seed);
        let xv: Vec<f32> =
            uniform(&mut r, n * cin * h * w, 0.0, 1.0).iter().map(|&u| (u < 0.3) as u32 as f32).collect();
        let wv = uniform(&mut r, cout * cin * k * k, -0.5, 0.5);
        let dy = normalish(&mut r, n * cout * ho * wo, 1.0);
        let mut grads = Vec::new();
        for dtype in [DType::Spike, DType::F32] {
            let mut g = Graph::new();
            let x = g.input_as("x", &[n, cin, h, w], dtype);
            let wt = g.param("w", &[cout, cin, k, k]);
            let y = conv::conv2d(&mut g, x, wt, None, stride, pad, "conv");
            let seed_t = g.input("dy", &[n, cout, ho, wo]);
            let gw = backward(&mut g, y, seed_t, &[wt], elementwise::add)[&wt];
            let xdata = if dtype == DType::Spike { sddpm_gpu::graph::pack_spikes(&xv) } else { bits(&xv) };
            grads.push(run_graph(g, &[(x, xdata), (wt, bits(&wv)), (seed_t, bits(&dy))], &[gw]).remove(0));
        }
        let what = format!("conv over spikes {n}x{cin}x{h}x{w}->{cout} k{k} s{stride} dw");
        assert_eq!(bits(&grads[0]), bits(&grads[1]), "{what}: packed vs f32");
        let dw = conv::conv2d_grad_weight_cpu(&dy, &xv, [n, cin, h, w], [cout, k], stride, pad);
        assert_close(&what, &grads[0], &dw, 1e-5, 1e-4);
    }
}

#[test]
fn conv2d_backward_stride2_and_1x1() {
    check_conv_backward(3, [2, 5, 9, 11], 7, 3, 2);
    check_conv_backward(4, [3, 6, 8, 8], 4, 3, 2);
    check_conv_backward(5, [2, 6, 5, 5], 10, 1, 1);
}

/// The conv with both epilogue addends: x, w and b get the plain conv's gradients, emb
/// add_channel's (dy summed over pixels and over the images sharing a row), the residual dy.
fn check_conv_epilogue_backward(
    seed: u64,
    [n, cin, h, w]: [usize; 4],
    cout: usize,
    k: usize,
    stride: usize,
    rows: usize,
) {
    let pad = k / 2;
    let (ho, wo) = (conv::conv_out(h, k, stride, pad), conv::conv_out(w, k, stride, pad));
    let mut r = rng(seed);
    let xv = normalish(&mut r, n * cin * h * w, 1.0);
    let wv = uniform(&mut r, cout * cin * k * k, -0.5, 0.5);
    let bv = uniform(&mut r, cout, -0.5, 0.5);
    let ev = normalish(&mut r, rows * cout, 1.0);
    let rv = normalish(&mut r, n * cout * ho * wo, 1.0);
    let dy = normalish(&mut r, n * cout * ho * wo, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[n, cin, h, w]);
    let wt = g.param("w", &[cout, cin, k, k]);
    let b = g.param("b", &[cout]);
    let e = g.input("emb", &[rows, cout]);
    let res = g.input("residual", &[n, cout, ho, wo]);
    let epilogue = conv::Epilogue { emb: Some(e), residual: Some(res) };
    let y = conv::conv2d_fused(&mut g, x, wt, Some(b), stride, pad, epilogue, "conv");
    let inputs = [(x, xv.clone()), (wt, wv.clone()), (b, bv.clone()), (e, ev.clone()), (res, rv.clone())];
    let got = gpu_grads(g, y, &dy, &inputs, &[x, wt, b, e, res]);
    let what = format!("fused conv {n}x{cin}x{h}x{w}->{cout} k{k} s{stride} emb rows {rows}");
    let fwd = |xx: &[f32], ee: &[f32], rr: &[f32]| {
        let (xs, ws) = ([n, cin, h, w], [cout, cin, k, k]);
        conv::conv2d_fused_cpu(xx, xs, &wv, ws, Some(&bv), stride, pad, Some((ee, rows)), Some(rr))
    };
    let dx = conv::conv2d_grad_input_cpu(&dy, &wv, [n, cin, h, w], [cout, k], stride, pad);
    assert_close(&format!("{what} dx"), &got[0], &dx, 1e-5, 1e-5);
    fd_check(&format!("{what} dx"), |xx| fwd(xx, &ev, &rv), &xv, &dy, &dx, 1e-2, 2e-3);
    let dw = conv::conv2d_grad_weight_cpu(&dy, &xv, [n, cin, h, w], [cout, k], stride, pad);
    assert_close(&format!("{what} dw"), &got[1], &dw, 1e-5, 1e-4);
    let db = reduce::group_sum_cpu(&dy, n, cout, ho * wo, 1);
    assert_close(&format!("{what} db"), &got[2], &db, 1e-5, 1e-4);
    let de = reduce::group_sum_cpu(&dy, n, cout, ho * wo, rows);
    assert_close(&format!("{what} demb"), &got[3], &de, 1e-5, 1e-4);
    fd_check(&format!("{what} demb"), |ee| fwd(&xv, ee, &rv), &ev, &dy, &de, 1e-2, 2e-3);
    assert_eq!(bits(&got[4]), bits(&dy), "{what}: the residual's gradient is dy");
    fd_check(&format!("{what} dresidual"), |rr| fwd(&xv, &ev, rr), &rv, &dy, &dy, 1e-2, 2e-3);
}

#[test]
fn conv2d_epilogue_backward() {
    check_conv_epilogue_backward(60, [8, 3, 7, 9], 5, 3, 1, 2);
    check_conv_epilogue_backward(61, [6, 5, 9, 11], 37, 3, 2, 3);
    check_conv_epilogue_backward(62, [4, 6, 5, 5], 10, 1, 1, 4);
}

#[test]
fn linear_backward() {
    for (seed, (rows, inp, out)) in [(10u64, (2usize, 16usize, 12usize)), (11, (3, 7, 5)), (12, (5, 33, 9))] {
        let mut r = rng(seed);
        let xv = normalish(&mut r, rows * inp, 1.0);
        let wv = uniform(&mut r, out * inp, -0.5, 0.5);
        let bv = uniform(&mut r, out, -0.5, 0.5);
        let dy = normalish(&mut r, rows * out, 1.0);
        let mut g = Graph::new();
        let x = g.input("x", &[rows, inp]);
        let w = g.param("w", &[out, inp]);
        let b = g.param("b", &[out]);
        let y = matmul::linear(&mut g, x, w, Some(b), "linear");
        let got = gpu_grads(g, y, &dy, &[(x, xv.clone()), (w, wv.clone()), (b, bv.clone())], &[x, w, b]);
        // dx = dy W, dW = dy^T x, db = column sums.
        let dx = matmul::matmul_cpu(&dy, &wv, None, [rows, inp, out], matmul::Strides::nn(out, inp));
        let dw = matmul::matmul_cpu(
            &dy,
            &xv,
            None,
            [out, inp, rows],
            matmul::Strides { a_m: 1, a_k: out, b_k: inp, b_n: 1 },
        );
        let db = reduce::group_sum_cpu(&dy, rows, out, 1, 1);
        assert_close("linear dx", &got[0], &dx, 1e-5, 1e-5);
        assert_close("linear dw", &got[1], &dw, 1e-5, 1e-5);
        assert_close("linear db", &got[2], &db, 1e-5, 1e-5);
        fd_check("linear dx", |xx| matmul::linear_cpu(xx, &wv, Some(&bv), rows, inp, out), &xv, &dy, &dx, 1e-2, 2e-3);
        fd_check("linear dw", |ww| matmul::linear_cpu(&xv, ww, Some(&bv), rows, inp, out), &wv, &dy, &dw, 1e-2, 2e-3);
    }
}

#[test]
fn batchnorm_train_backward() {
    for (seed, (n, c, hw)) in [(20u64, (8usize, 3usize, 25usize)), (21, (4, 5, 1)), (22, (2, 2, 300))] {
        let mut r = rng(seed);
        let xv: Vec<f32> = normalish(&mut r, n * c * hw, 1.5).iter().map(|v| v + 0.3).collect();
        let wv = uniform(&mut r, c, 0.5, 1.5);
        let bv = uniform(&mut r, c, -0.5, 0.5);
        let dy = normalish(&mut r, n * c * hw, 1.0);
        let mut g = Graph::new();
        let x = g.input("x", &[n, c, hw]);
        let p = batchnorm::BnParams {
            weight: g.param("bn.weight", &[c]),
            bias: g.param("bn.bias", &[c]),
            running_mean: g.param("bn.running_mean", &[c]),
            running_var: g.param("bn.running_var", &[c]),
            groups: batchnorm::BnGroups::ONE,
        };
        let (y, _) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
        let inputs = [
            (x, xv.clone()),
            (p.weight, wv.clone()),
            (p.bias, bv.clone()),
            (p.running_mean, vec![0.0; c]),
            (p.running_var, vec![1.0; c]),
        ];
        let got = gpu_grads(g, y, &dy, &inputs, &[x, p.weight, p.bias]);
        let fwd = |xx: &[f32], ww: &[f32], bb: &[f32]| {
            let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
            batchnorm::batchnorm_train_cpu(xx, c, hw, ww, bb, &mut rm, &mut rv)
        };
        let (_, mean, invstd) = fwd(&xv, &wv, &bv);
        let (dx, dw, db) = batchnorm::batchnorm_train_backward_cpu(&dy, &xv, c, hw, &wv, &mean, &invstd);
        assert_close("bn dx", &got[0], &dx, 1e-4, 1e-5);
        assert_close("bn dweight", &got[1], &dw, 1e-5, 1e-4);
        assert_close("bn dbias", &got[2], &db, 1e-5, 1e-4);
        fd_check("bn dx", |xx| fwd(xx, &wv, &bv).0, &xv, &dy, &dx, 1e-2, 1e-2);
        fd_check("bn dweight", |ww| fwd(&xv, ww, &bv).0, &wv, &dy, &dw, 1e-2, 1e-2);
        fd_check("bn dbias", |bb| fwd(&xv, &wv, bb).0, &bv, &dy, &db, 1e-2, 1e-2);
    }
}

fn check_neuron_backward(seed: u64, t: usize, n: usize, cfg: neuron::Neuron) {
    let mut r = rng(seed);
    let xv: Vec<f32> = normalish(&mut r, t * n, 1.2).iter().map(|v| v + 0.4).collect();
    let gs = normalish(&mut r, t * n, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[t, n]);
    let (s, _) = neuron::neuron_forward_train(&mut g, x, t, cfg, "neuron");
    let got = gpu_grads(g, s, &gs, &[(x, xv.clone())], &[x]).remove(0);
    let (_, h) = neuron::neuron_cpu(&xv, t, cfg);
    let want = neuron::neuron_backward_cpu(&gs, &h, t, cfg);
    assert_close(&format!("neuron backward T={t} {cfg:?}"), &got, &want, 1e-5, 1e-6);
}

/// BN-apply (+ the time-embedding term) fused into the neuron: the gradients of BN's input,
/// weight and bias and of the term are bit for bit those of BN, the add and the neuron run apart,
/// and match the CPU chain (neuron backward, then BN's and the sum over T and pixels). The part
/// below the neuron is checked against finite differences of the CPU forward (the neuron's
/// surrogate against PyTorch, below).
fn check_neuron_backward_bn(seed: u64, [t, b, c, hw]: [usize; 4], with_emb: bool, cfg: neuron::Neuron) {
    let n = t * b;
    let mut r = rng(seed);
    let cv: Vec<f32> = normalish(&mut r, n * c * hw, 1.0);
    let wv = uniform(&mut r, c, 0.5, 1.5);
    let bv = uniform(&mut r, c, 0.0, 0.8);
    let ev = uniform(&mut r, b * c, -0.3, 0.3);
    let gs = normalish(&mut r, n * c * hw, 1.0);
    let mut grads = Vec::new();
    for fused in [false, true] {
        let mut g = Graph::new();
        let x = g.input("c", &[n, c, hw]);
        let p = batchnorm::BnParams {
            weight: g.param("bn.weight", &[c]),
            bias: g.param("bn.bias", &[c]),
            running_mean: g.param("bn.running_mean", &[c]),
            running_var: g.param("bn.running_var", &[c]),
            groups: batchnorm::BnGroups::ONE,
        };
        let emb = g.input("emb", &[b, c]);
        let s = if fused {
            let saved = batchnorm::batchnorm_stats(&mut g, x, p, "bn");
            let input = neuron::BnInput { c: x, bn: p, saved, emb: with_emb.then_some(emb), bn_name: "bn".into() };
            neuron::neuron_forward_train_bn(&mut g, input, t, cfg, "neuron")
        } else {
            let (y, _) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
            let z = if with_emb { elementwise::add_channel(&mut g, y, emb, "add") } else { y };
            neuron::neuron_forward_train(&mut g, z, t, cfg, "neuron").0
        };
        let mut inputs = vec![
            (x, cv.clone()),
            (p.weight, wv.clone()),
            (p.bias, bv.clone()),
            (p.running_mean, vec![0.0; c]),
            (p.running_var, vec![1.0; c]),
        ];
        let mut wrt = vec![x, p.weight, p.bias];
        if with_emb {
            inputs.push((emb, ev.clone()));
            wrt.push(emb);
        }
        grads.push(gpu_grads(g, s, &gs, &inputs, &wrt));
    }
    let what = format!("neuron fused with BN T={t} B={b} C={c} HW={hw} emb {with_emb} {cfg:?}");
    for (i, (a, f)) in grads[0].iter().zip(&grads[1]).enumerate() {
        assert_eq!(bits(a), bits(f), "{what}: gradient {i} fused vs unfused");
    }
    let emb_arg = with_emb.then_some((&ev[..], b));
    let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
    let (_, mean, invstd) = batchnorm::batchnorm_train_cpu(&cv, c, hw, &wv, &bv, &mut rm, &mut rv);
    let z = neuron::bn_input_cpu(&cv, c, hw, &wv, &bv, &mean, &invstd, emb_arg);
    let (_, h) = neuron::neuron_cpu(&z, t, cfg);
    let dz = neuron::neuron_backward_cpu(&gs, &h, t, cfg);
    let (dc, dw, db) = batchnorm::batchnorm_train_backward_cpu(&dz, &cv, c, hw, &wv, &mean, &invstd);
    let got = &grads[1];
    assert_close(&format!("{what}: dc"), &got[0], &dc, 1e-4, 1e-5);
    assert_close(&format!("{what}: dweight"), &got[1], &dw, 1e-4, 1e-4);
    assert_close(&format!("{what}: dbias"), &got[2], &db, 1e-4, 1e-4);
    // The input of the neuron as a function of (c, weight, bias, emb), batch statistics included.
    let fwd = |cc: &[f32], ww: &[f32], bb: &[f32], ee: &[f32]| {
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        let (_, mean, invstd) = batchnorm::batchnorm_train_cpu(cc, c, hw, ww, bb, &mut rm, &mut rv);
        neuron::bn_input_cpu(cc, c, hw, ww, bb, &mean, &invstd, with_emb.then_some((ee, b)))
    };
    fd_check(&format!("{what}: dc"), |cc| fwd(cc, &wv, &bv, &ev), &cv, &dz, &dc, 1e-2, 1e-2);
    fd_check(&format!("{what}: dweight"), |ww| fwd(&cv, ww, &bv, &ev), &wv, &dz, &dw, 1e-2, 1e-2);
    fd_check(&format!("{what}: dbias"), |bb| fwd(&cv, &wv, bb, &ev), &bv, &dz, &db, 1e-2, 1e-2);
    if with_emb {
        let de = reduce::group_sum_cpu(&dz, n, c, hw, b);
        assert_close(&format!("{what}: demb"), &got[3], &de, 1e-4, 1e-4);
        fd_check(&format!("{what}: demb"), |ee| fwd(&cv, &wv, &bv, ee), &ev, &dz, &de, 1e-2, 1e-2);
    }
}

#[test]
fn neuron_fused_with_batchnorm_backward() {
    let lif = neuron::Neuron { tau: Some(2.0), ..Default::default() };
    for (i, (shape, emb)) in [
        ([4, 2, 5, 9], true),
        ([3, 3, 4, 16], true),
        ([2, 2, 3, 7], false),
        ([1, 2, 4, 8], true),
        ([4, 1, 3, 5], false),
    ]
    .into_iter()
    .enumerate()
    {
        for cfg in [neuron::Neuron::default(), lif] {
            check_neuron_backward_bn(40 + i as u64, shape, emb, cfg);
        }
    }
}

/// BN with a residual add, Swish, or both fused into its apply kernel: gradients bit for bit those
/// of the unfused ops, and the CPU references (Swish's backward, then BN's; dr = dy) against
/// finite differences.
#[test]
fn batchnorm_train_fused_epilogues_backward() {
    for (swish, add) in [(true, false), (false, true), (true, true)] {
        for (seed, (n, c, hw)) in [(23u64, (8usize, 3usize, 25usize)), (24, (4, 5, 1)), (25, (3, 2, 33))] {
            let mut r = rng(seed);
            let xv: Vec<f32> = normalish(&mut r, n * c * hw, 1.5).iter().map(|v| v + 0.3).collect();
            let wv = uniform(&mut r, c, 0.5, 1.5);
            let bv = uniform(&mut r, c, -0.5, 0.5);
            let rv = normalish(&mut r, n * c * hw, 1.0);
            let dy = normalish(&mut r, n * c * hw, 1.0);
            let mut grads = Vec::new();
            for fused in [false, true] {
                let mut g = Graph::new();
                let x = g.input("x", &[n, c, hw]);
                let res = g.input("r", &[n, c, hw]);
                let p = batchnorm::BnParams {
                    weight: g.param("bn.weight", &[c]),
                    bias: g.param("bn.bias", &[c]),
                    running_mean: g.param("bn.running_mean", &[c]),
                    running_var: g.param("bn.running_var", &[c]),
                    groups: batchnorm::BnGroups::ONE,
                };
                let y = match (fused, swish) {
                    (true, false) => batchnorm::batchnorm_train_add(&mut g, x, p, res, "bn"),
                    (true, true) => batchnorm::batchnorm_train_swish(&mut g, x, p, add.then_some(res), "bn"),
                    (false, _) => {
                        let (y, _) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
                        let y = if swish { elementwise::swish(&mut g, y, "swish") } else { y };
                        if add {
                            elementwise::add(&mut g, y, res, "add")
                        } else {
                            y
                        }
                    }
                };
                let mut inputs = vec![
                    (x, xv.clone()),
                    (p.weight, wv.clone()),
                    (p.bias, bv.clone()),
                    (p.running_mean, vec![0.0; c]),
                    (p.running_var, vec![1.0; c]),
                ];
                let mut wrt = vec![x, p.weight, p.bias];
                if add {
                    inputs.push((res, rv.clone()));
                    wrt.push(res);
                }
                grads.push(gpu_grads(g, y, &dy, &inputs, &wrt));
            }
            let what = format!("BN + swish {swish} + add {add} N={n} C={c} HW={hw}");
            for (i, (a, f)) in grads[0].iter().zip(&grads[1]).enumerate() {
                assert_eq!(bits(a), bits(f), "{what}: gradient {i} fused vs unfused");
            }
            let fwd = |xx: &[f32], ww: &[f32], bb: &[f32], rr: &[f32]| {
                let (mut rm, mut rvar) = (vec![0.0; c], vec![1.0; c]);
                let r = add.then_some(rr);
                if swish {
                    batchnorm::batchnorm_train_swish_cpu(xx, c, hw, ww, bb, &mut rm, &mut rvar, r)
                } else {
                    batchnorm::batchnorm_train_add_cpu(xx, c, hw, ww, bb, &mut rm, &mut rvar, rr)
                }
            };
            let (mut rm, mut rvar) = (vec![0.0; c], vec![1.0; c]);
            let (ybn, mean, invstd) = batchnorm::batchnorm_train_cpu(&xv, c, hw, &wv, &bv, &mut rm, &mut rvar);
            let dv = if swish { elementwise::swish_backward_cpu(&ybn, &dy) } else { dy.clone() };
            let (dx, dw, db) = batchnorm::batchnorm_train_backward_cpu(&dv, &xv, c, hw, &wv, &mean, &invstd);
            let got = &grads[1];
            assert_close(&format!("{what}: dx"), &got[0], &dx, 1e-4, 1e-5);
            assert_close(&format!("{what}: dweight"), &got[1], &dw, 1e-4, 1e-4);
            assert_close(&format!("{what}: dbias"), &got[2], &db, 1e-4, 1e-4);
            fd_check(&format!("{what}: dx"), |xx| fwd(xx, &wv, &bv, &rv).0, &xv, &dy, &dx, 1e-2, 1e-2);
            fd_check(&format!("{what}: dweight"), |ww| fwd(&xv, ww, &bv, &rv).0, &wv, &dy, &dw, 1e-2, 1e-2);
            fd_check(&format!("{what}: dbias"), |bb| fwd(&xv, &wv, bb, &rv).0, &bv, &dy, &db, 1e-2, 1e-2);
            if add {
                assert_eq!(bits(&got[3]), bits(&dy), "{what}: dr");
                fd_check(&format!("{what}: dr"), |rr| fwd(&xv, &wv, &bv, rr).0, &rv, &dy, &dy, 1e-2, 1e-3);
            }
        }
    }
}

/// A neuron whose input already has a gradient from a consumer recorded after it (here x + a 1x1
/// conv of the spikes, as a ResBlock's residual) adds its own inside its backward kernel: the same
/// bits as its gradient alone (same dL/ds) plus the earlier one summed apart, as the graph's
/// accumulation did.
fn check_neuron_backward_accumulates(seed: u64, [t, b, c, hw]: [usize; 4], cfg: neuron::Neuron) {
    let n = t * b;
    let mut r = rng(seed);
    let xv: Vec<f32> = normalish(&mut r, n * c * hw, 1.2).iter().map(|v| v + 0.4).collect();
    let wv = uniform(&mut r, c * c, -0.5, 0.5);
    let dy = normalish(&mut r, n * c * hw, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[n, c, hw, 1]);
    let w = g.input("w", &[c, c, 1, 1]);
    let (s, _) = neuron::neuron_forward_train(&mut g, x, t, cfg, "neuron");
    let y1 = conv::conv2d(&mut g, s, w, None, 1, 0, "conv");
    let y = elementwise::add(&mut g, y1, x, "residual");
    let mut probe = g.clone();
    let seed = probe.input("dy", &[n, c, hw, 1]);
    backward(&mut probe, y, seed, &[x, s], elementwise::add);
    assert!(probe.nodes.iter().any(|nd| nd.entry == "neuron_backward_acc"), "the neuron adds into dL/dx");
    assert!(!probe.nodes.iter().any(|nd| nd.label.ends_with(".grad_sum")), "no separate sum pass");
    let got = gpu_grads(g, y, &dy, &[(x, xv.clone()), (w, wv)], &[x, s]);
    let (dx, ds) = (&got[0], &got[1]);
    let mut g = Graph::new();
    let x = g.input("x", &[n, c, hw, 1]);
    let (s, _) = neuron::neuron_forward_train(&mut g, x, t, cfg, "neuron");
    let alone = gpu_grads(g, s, ds, &[(x, xv.clone())], &[x]).remove(0);
    let what = format!("neuron backward into an earlier gradient T={t} B={b} C={c} HW={hw} {cfg:?}");
    assert_eq!(bits(dx), bits(&elementwise::add_cpu(&dy, &alone)), "{what}");
    let (_, h) = neuron::neuron_cpu(&xv, t, cfg);
    let want = elementwise::add_cpu(&dy, &neuron::neuron_backward_cpu(ds, &h, t, cfg));
    assert_close(&what, dx, &want, 1e-5, 1e-6);
}

#[test]
fn neuron_backward_adds_into_an_earlier_gradient() {
    let lif = neuron::Neuron { tau: Some(2.0), ..Default::default() };
    for (i, shape) in [[1, 2, 3, 5], [2, 3, 4, 8], [3, 1, 5, 7], [4, 2, 2, 16]].into_iter().enumerate() {
        for cfg in [neuron::Neuron::default(), lif] {
            check_neuron_backward_accumulates(80 + i as u64, shape, cfg);
        }
    }
}

#[test]
fn neuron_backward_through_time() {
    check_neuron_backward(30, 4, 1000, neuron::Neuron::default());
    check_neuron_backward(31, 8, 77, neuron::Neuron::default());
    check_neuron_backward(32, 4, 300, neuron::Neuron { tau: Some(2.0), ..Default::default() });
}

#[test]
fn neuron_backward_matches_reference_autograd() {
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/neuron.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f = |n: &str| bytemuck::pod_collect_to_vec::<u8, f32>(st.tensor(n).unwrap().data());
    let shape = st.tensor("x").unwrap().shape().to_vec();
    let (xv, gout, want) = (f("x"), f("grad_out"), f("grad_x"));
    let (t, n) = (shape[0], shape[1]);
    let mut g = Graph::new();
    let x = g.input("x", &[t, n]);
    let (s, _) = neuron::neuron_forward_train(&mut g, x, t, neuron::Neuron::default(), "neuron");
    let got = gpu_grads(g, s, &gout, &[(x, xv.clone())], &[x]).remove(0);
    assert_close("neuron grad_x vs PyTorch", &got, &want, 1e-5, 1e-6);
    let (_, h) = neuron::neuron_cpu(&xv, t, neuron::Neuron::default());
    assert_close(
        "CPU neuron grad_x vs PyTorch",
        &neuron::neuron_backward_cpu(&gout, &h, t, Default::default()),
        &want,
        1e-5,
        1e-6,
    );
}

#[test]
fn swish_backward() {
    let mut r = rng(40);
    let xv = uniform(&mut r, 999, -6.0, 6.0);
    let dy = normalish(&mut r, 999, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[999]);
    let y = elementwise::swish(&mut g, x, "swish");
    let got = gpu_grads(g, y, &dy, &[(x, xv.clone())], &[x]).remove(0);
    let want = elementwise::swish_backward_cpu(&xv, &dy);
    assert_close("swish backward", &got, &want, 1e-5, 1e-6);
    fd_check("swish", elementwise::swish_cpu, &xv, &dy, &want, 1e-3, 1e-2);
}

#[test]
fn add_channel_and_accumulation_backward() {
    // y = add_channel(x, e) + x: x's gradient arrives twice and must be summed.
    let (t, b, c, s) = (4, 2, 3, 5);
    let mut r = rng(41);
    let xv = normalish(&mut r, t * b * c * s, 1.0);
    let ev = normalish(&mut r, b * c, 1.0);
    let dy = normalish(&mut r, t * b * c * s, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[t * b, c, s]);
    let e = g.input("e", &[b, c]);
    let h = elementwise::add_channel(&mut g, x, e, "temb_add");
    let y = elementwise::add(&mut g, h, x, "residual");
    let got = gpu_grads(g, y, &dy, &[(x, xv.clone()), (e, ev.clone())], &[x, e]);
    let want_dx: Vec<f32> = dy.iter().map(|v| v + v).collect();
    assert_close("accumulated dx", &got[0], &want_dx, 1e-6, 0.0);
    let want_de = reduce::group_sum_cpu(&dy, t * b, c, s, b);
    assert_close("add_channel de", &got[1], &want_de, 1e-5, 1e-5);
    fd_check("add_channel de", |ee| elementwise::add_channel_cpu(&xv, ee, c, s, b), &ev, &dy, &want_de, 1e-2, 2e-3);
}

#[test]
fn layout_backward() {
    let mut r = rng(42);
    // upsample
    let shape = [2usize, 3, 3, 5];
    let xv = normalish(&mut r, 90, 1.0);
    let dy = normalish(&mut r, 360, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &shape);
    let y = layout::upsample2x(&mut g, x, "up");
    let got = gpu_grads(g, y, &dy, &[(x, xv.clone())], &[x]).remove(0);
    let want = layout::upsample2x_backward_cpu(&dy, shape);
    assert_close("upsample backward", &got, &want, 1e-6, 1e-6);
    fd_check("upsample", |xx| layout::upsample2x_cpu(xx, shape), &xv, &dy, &want, 1e-2, 2e-3);
    // concat
    let (n, ca, cb, s) = (2, 3, 2, 7);
    let av = normalish(&mut r, n * ca * s, 1.0);
    let bv = normalish(&mut r, n * cb * s, 1.0);
    let dy = normalish(&mut r, n * (ca + cb) * s, 1.0);
    let mut g = Graph::new();
    let a = g.input("a", &[n, ca, s]);
    let b = g.input("b", &[n, cb, s]);
    let y = layout::concat_channels(&mut g, a, b, "cat");
    let got = gpu_grads(g, y, &dy, &[(a, av.clone()), (b, bv.clone())], &[a, b]);
    let fa = |aa: &[f32]| layout::concat_channels_cpu(aa, &bv, n, ca, cb, s);
    let fb = |bb: &[f32]| layout::concat_channels_cpu(&av, bb, n, ca, cb, s);
    fd_check("concat da", fa, &av, &dy, &got[0], 1e-2, 2e-3);
    fd_check("concat db", fb, &bv, &dy, &got[1], 1e-2, 2e-3);
    // repeat over time
    let xv = normalish(&mut r, 2 * 3 * 4, 1.0);
    let dy = normalish(&mut r, 4 * 2 * 3 * 4, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[2, 3, 4]);
    let y = layout::repeat_leading(&mut g, x, 4, "repeat");
    let got = gpu_grads(g, y, &dy, &[(x, xv.clone())], &[x]).remove(0);
    fd_check("repeat", |xx| layout::repeat_leading_cpu(xx, 4), &xv, &dy, &got, 1e-2, 2e-3);
}

#[test]
fn readout_and_mse_backward() {
    let (t, m) = (4, 37);
    let mut r = rng(43);
    let hv = normalish(&mut r, t * m, 1.0);
    let dy = normalish(&mut r, m, 1.0);
    let mut g = Graph::new();
    let h = g.input("h", &[t, m]);
    let y = readout::membrane_readout(&mut g, h, t, readout::DECAY, "readout");
    let got = gpu_grads(g, y, &dy, &[(h, hv.clone())], &[h]).remove(0);
    let want = readout::membrane_readout_backward_cpu(&dy, t, readout::DECAY);
    assert_close("readout backward", &got, &want, 1e-6, 1e-7);
    fd_check("readout", |hh| readout::membrane_readout_cpu(hh, t, readout::DECAY), &hv, &dy, &want, 1e-2, 2e-3);
    // MSE with a unit seed: gradient 2 (a - b) / n.
    let av = normalish(&mut r, 500, 1.0);
    let bv = normalish(&mut r, 500, 1.0);
    let mut g = Graph::new();
    let a = g.input("a", &[500]);
    let b = g.input("b", &[500]);
    let loss = reduce::mse_loss(&mut g, a, b, "loss");
    g.mark_output(loss);
    let got = gpu_grads(g, loss, &[1.0], &[(a, av.clone()), (b, bv.clone())], &[a]).remove(0);
    let (l_cpu, d_cpu) = reduce::mse_cpu(&av, &bv);
    assert_close("mse grad", &got, &d_cpu, 1e-5, 1e-8);
    fd_check("mse", |aa| vec![reduce::mse_cpu(aa, &bv).0], &av, &[1.0], &d_cpu, 1e-2, 1e-2);
    assert!(l_cpu > 0.5);
}

#[test]
fn group_sum_and_sumsq_match_cpu() {
    let mut r = rng(44);
    let xv = normalish(&mut r, 8 * 5 * 33, 1.0);
    let yv = normalish(&mut r, 1000, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[8, 5, 33]);
    let y = g.input("y", &[1000]);
    let s1 = reduce::group_sum(&mut g, x, 1, "sum1");
    let s2 = reduce::group_sum(&mut g, x, 2, "sum2");
    let acc = g.intermediate("acc", &[1]);
    reduce::sumsq_acc(&mut g, x, acc, true, "sumsq.x");
    reduce::sumsq_acc(&mut g, y, acc, false, "sumsq.y");
    let out = run_graph(g, &[(x, bits(&xv)), (y, bits(&yv))], &[s1, s2, acc]);
    assert_close("group_sum B=1", &out[0], &reduce::group_sum_cpu(&xv, 8, 5, 33, 1), 1e-5, 1e-5);
    assert_close("group_sum B=2", &out[1], &reduce::group_sum_cpu(&xv, 8, 5, 33, 2), 1e-5, 1e-5);
    let want: f64 = xv.iter().chain(&yv).map(|&v| (v as f64).powi(2)).sum();
    assert!((out[2][0] as f64 - want).abs() < 1e-4 * want, "{} vs {want}", out[2][0]);
}

#[test]
fn adam_step_matches_cpu() {
    let adam = optim::Adam::default();
    let mut r = rng(45);
    let n = 777;
    let (pv, gv) = (normalish(&mut r, n, 1.0), normalish(&mut r, n, 3.0));
    let (mv, vv) = (normalish(&mut r, n, 0.1), uniform(&mut r, n, 0.0, 0.01));
    let sumsq: f32 = gv.iter().map(|v| v * v).sum();
    for (step, max_norm) in [(1u64, 1.0f32), (7, 1e3)] {
        let hyper = optim::hyper(&adam, 2e-4, step, max_norm);
        let mut g = Graph::new();
        let p = g.param("p", &[n]);
        let grad = g.input("grad", &[n]);
        let m = g.param("m", &[n]);
        let v = g.param("v", &[n]);
        let ss = g.input("sumsq", &[1]);
        let hy = g.input("hyper", &[4]);
        optim::adam_step(&mut g, &adam, p, grad, m, v, ss, hy, "adam");
        let inputs = [
            (p, bits(&pv)),
            (grad, bits(&gv)),
            (m, bits(&mv)),
            (v, bits(&vv)),
            (ss, bits(&[sumsq])),
            (hy, bits(&hyper)),
        ];
        let out = run_graph(g, &inputs, &[p, m, v]);
        let (mut pc, mut mc, mut vc) = (pv.clone(), mv.clone(), vv.clone());
        optim::adam_cpu(&adam, &mut pc, &gv, &mut mc, &mut vc, sumsq, hyper);
        assert_close("adam param", &out[0], &pc, 1e-6, 1e-7);
        assert_close("adam m", &out[1], &mc, 1e-6, 1e-8);
        assert_close("adam v", &out[2], &vc, 1e-6, 1e-10);
        assert!(out[0].iter().zip(&pv).any(|(a, b)| a != b), "parameters must move");
    }
}

#[test]
fn backward_graph_replays_with_memory_reuse() {
    // A conv -> BN -> neuron -> conv chain: its backward pass plans like the forward.
    let mut g = Graph::new();
    let x = g.input("x", &[8, 4, 8, 8]);
    let w1 = g.param("w1", &[4, 4, 3, 3]);
    let w2 = g.param("w2", &[4, 4, 3, 3]);
    let p = batchnorm::BnParams {
        weight: g.param("bn.weight", &[4]),
        bias: g.param("bn.bias", &[4]),
        running_mean: g.param("bn.running_mean", &[4]),
        running_var: g.param("bn.running_var", &[4]),
        groups: batchnorm::BnGroups::ONE,
    };
    let h = conv::conv2d(&mut g, x, w1, None, 1, 1, "conv1");
    let (h, _) = batchnorm::batchnorm_train(&mut g, h, p, "bn");
    let (s, _) = neuron::neuron_forward_train(&mut g, h, 4, Default::default(), "neuron");
    let y = conv::conv2d(&mut g, s, w2, None, 1, 1, "conv2");
    let seed = g.input("dy", &[8, 4, 8, 8]);
    let grads = backward(&mut g, y, seed, &[w1, w2, p.weight], elementwise::add);
    assert_eq!(grads.len(), 3);
    let m = sddpm_gpu::graph::plan_memory(&g);
    assert!(m.planned_intermediate_bytes < m.naive_intermediate_bytes);
    for t in grads.values() {
        g.mark_output(*t);
    }
    let c = ctx();
    let plan = Plan::compile(c, &g).unwrap();
    let mut r = rng(46);
    for (t, lo, hi) in
        [(x, -1.0, 2.0), (w1, -0.5, 0.5), (w2, -0.5, 0.5), (p.weight, 0.5, 1.5), (p.bias, -0.1, 0.1), (seed, -1.0, 1.0)]
    {
        plan.write(c, t, &uniform(&mut r, g.info(t).numel(), lo, hi)).unwrap();
    }
    plan.write(c, p.running_mean, &[0f32; 4]).unwrap();
    plan.write(c, p.running_var, &[1f32; 4]).unwrap();
    plan.run(c).unwrap();
    let first = plan.read(c, grads[&w1]).unwrap();
    plan.run(c).unwrap();
    assert_eq!(bits(&first), bits(&plan.read(c, grads[&w1]).unwrap()), "backward replays bit-identically");
    assert!(first.iter().any(|v| *v != 0.0));
}

fn check_spike_attention_backward(seed: u64, [rows, c, h, w]: [usize; 4], heads: usize) {
    let dims = spike_attention::Dims { rows, c, n: h * w, heads };
    let len = rows * c * h * w;
    let mut r = rng(seed);
    let (qv, kv, vv) = (spikes(&mut r, len, 0.3), spikes(&mut r, len, 0.4), spikes(&mut r, len, 0.25));
    let dy = normalish(&mut rng(seed + 1), len, 1.0);
    let mut g = Graph::new();
    let [q, k, v] = ["q", "k", "v"].map(|n| g.input_as(n, &[rows, c, h, w], DType::Spike));
    let o = spike_attention::spike_attention(&mut g, q, k, v, heads, "attn");
    let got = gpu_grads(g, o, &dy, &[(q, qv.clone()), (k, kv.clone()), (v, vv.clone())], &[q, k, v]);
    let (dq, dk, dv) = spike_attention::spike_attention_backward_cpu(&dy, &qv, &kv, &vv, dims);
    let what = format!("spike attention {rows}x{c}x{h}x{w}, {heads} heads");
    assert_close(&format!("{what} dq"), &got[0], &dq, 1e-5, 1e-6);
    assert_close(&format!("{what} dk"), &got[1], &dk, 1e-5, 1e-6);
    assert_close(&format!("{what} dv"), &got[2], &dv, 1e-5, 1e-6);
    // The op is trilinear in (q, k, v): its CPU backward is checked at real-valued points.
    let mut r = rng(seed + 2);
    let (qr, kr, vr) = (normalish(&mut r, len, 1.0), normalish(&mut r, len, 1.0), normalish(&mut r, len, 1.0));
    let (dq, dk, dv) = spike_attention::spike_attention_backward_cpu(&dy, &qr, &kr, &vr, dims);
    let f_q = |x: &[f32]| spike_attention::spike_attention_cpu(x, &kr, &vr, dims);
    fd_check(&format!("{what} dq"), f_q, &qr, &dy, &dq, 1e-2, 2e-3);
    let f_k = |x: &[f32]| spike_attention::spike_attention_cpu(&qr, x, &vr, dims);
    fd_check(&format!("{what} dk"), f_k, &kr, &dy, &dk, 1e-2, 2e-3);
    let f_v = |x: &[f32]| spike_attention::spike_attention_cpu(&qr, &kr, x, dims);
    fd_check(&format!("{what} dv"), f_v, &vr, &dy, &dv, 1e-2, 2e-3);
}

#[test]
fn spike_attention_backward() {
    check_spike_attention_backward(80, [2, 8, 4, 4], 2);
    check_spike_attention_backward(81, [3, 6, 3, 5], 3);
    check_spike_attention_backward(82, [1, 5, 7, 1], 1);
    // [N, N] form (N < d).
    check_spike_attention_backward(83, [2, 12, 2, 3], 1);
    check_spike_attention_backward(84, [3, 10, 1, 3], 2);
}
