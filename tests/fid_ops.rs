//! The FID Inception-v3's ops: GPU against the CPU references on random inputs of several shapes
//! (odd sizes, channel counts off multiples of 4/8), and the CPU references against what torch
//! computes (tests/fixtures/fid/ops.safetensors, from tools/fid_ops_fixture.py).
//!
//! Tolerances: pooling and non-square convs sum in the reference's order: 1e-5 relative (+1e-5
//! absolute for cancelling sums); the max pool is exact. Bilinear weights may contract to FMA on
//! GPUs: 1e-6 absolute on values in [-1, 1]. Against torch (other summation orders): 1e-5.

mod common;

use common::*;
use sddpm_gpu::checkpoint::TensorFile;
use sddpm_gpu::graph::Graph;
use sddpm_gpu::ops::conv;
use sddpm_gpu::ops::pool::{self, Pool};
use sddpm_gpu::ops::resize;

fn torch(name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = TensorFile::load(&fixture("fid/ops.safetensors")).unwrap();
    let t = f.get(name).unwrap();
    (t.shape.clone(), t.data.clone())
}

fn dims(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

// ---- pooling --------------------------------------------------------------------------------

fn check_pool(seed: u64, xs: [usize; 4], kind: Pool, k: usize, stride: usize, pad: usize) {
    let xv = normalish(&mut rng(seed), xs.iter().product(), 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &xs);
    let y = pool::pool2d(&mut g, x, kind, k, stride, pad, "pool");
    let got = run_graph(g, &[(x, bits(&xv))], &[y]).remove(0);
    let want = pool::pool2d_cpu(&xv, xs, kind, k, stride, pad);
    let what = format!("{kind:?} pool {xs:?} k{k} s{stride} p{pad}");
    match kind {
        Pool::Max => assert_eq!(bits(&got), bits(&want), "{what}"),
        Pool::Avg => assert_close(&what, &got, &want, 1e-5, 1e-6),
    }
}

#[test]
fn pools_match_cpu() {
    for kind in [Pool::Max, Pool::Avg] {
        check_pool(1, [2, 3, 7, 9], kind, 3, 1, 1); // branch pools (padded)
        check_pool(2, [1, 5, 11, 8], kind, 3, 2, 0); // stem and reduction pools
        check_pool(3, [3, 7, 8, 8], kind, 8, 8, 0); // the final 8x8 pool to 1x1
        check_pool(4, [2, 2, 5, 5], kind, 2, 2, 1);
    }
}

#[test]
fn pool_references_match_torch() {
    let (xs, x) = torch("x");
    for (name, kind, k, s, p) in [
        ("avg3_s1_p1", Pool::Avg, 3, 1, 1),
        ("max3_s2_p0", Pool::Max, 3, 2, 0),
        ("max3_s1_p1", Pool::Max, 3, 1, 1),
        ("avg2_s2_p0", Pool::Avg, 2, 2, 0),
    ] {
        let (_, want) = torch(name);
        assert_close(name, &pool::pool2d_cpu(&x, dims(&xs), kind, k, s, p), &want, 1e-5, 1e-6);
    }
}

// ---- bilinear resize + preprocessing ---------------------------------------------------------

fn check_resize(seed: u64, xs: [usize; 4], out: [usize; 2], cout: usize) {
    let xv = uniform(&mut rng(seed), xs.iter().product(), 0.0, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &xs);
    let y = resize::resize_bilinear(&mut g, x, out, cout, 2.0, -1.0, "resize");
    let got = run_graph(g, &[(x, bits(&xv))], &[y]).remove(0);
    let want = resize::resize_bilinear_cpu(&xv, xs, out, cout, 2.0, -1.0);
    assert_close(&format!("resize {xs:?} -> {cout}x{out:?}"), &got, &want, 0.0, 1e-6);
}

#[test]
fn resize_matches_cpu() {
    check_resize(5, [2, 1, 28, 28], [299, 299], 3); // MNIST: gray -> RGB, up
    check_resize(6, [1, 3, 32, 32], [299, 299], 3); // CIFAR-10
    check_resize(7, [1, 3, 400, 301], [299, 299], 3); // down in one axis, odd sizes
    check_resize(8, [3, 2, 5, 7], [13, 4], 2);
}

#[test]
fn resize_reference_matches_torch_preprocessing() {
    let (xs, img) = torch("img");
    let (ys, want) = torch("img_up");
    let got = resize::resize_bilinear_cpu(&img, dims(&xs), [ys[2], ys[3]], 3, 2.0, -1.0);
    assert_close("gray up", &got, &want, 0.0, 1e-6);
    let (xs, rgb) = torch("rgb");
    let (ys, want) = torch("rgb_down");
    let got = resize::resize_bilinear_cpu(&rgb, dims(&xs), [ys[2], ys[3]], 3, 2.0, -1.0);
    assert_close("rgb down", &got, &want, 0.0, 1e-6);
}

// ---- non-square convolutions with a ReLU epilogue ---------------------------------------------

#[allow(clippy::too_many_arguments)]
fn check_conv_relu(seed: u64, xs: [usize; 4], ws: [usize; 4], stride: usize, pad: [usize; 2], bias: bool, relu: bool) {
    let mut r = rng(seed);
    let xv = normalish(&mut r, xs.iter().product(), 1.0);
    let wv = uniform(&mut r, ws.iter().product(), -0.5, 0.5);
    let bv = uniform(&mut r, ws[0], -0.5, 0.5);
    let mut g = Graph::new();
    let x = g.input("x", &xs);
    let w = g.param("w", &ws);
    let b = g.param("b", &[ws[0]]);
    let y = conv::conv2d_relu(&mut g, x, w, bias.then_some(b), stride, pad, relu, "conv");
    let mut inputs = vec![(x, bits(&xv)), (w, bits(&wv))];
    if bias {
        inputs.push((b, bits(&bv)));
    }
    let got = run_graph(g, &inputs, &[y]).remove(0);
    let want = conv::conv2d_relu_cpu(&xv, xs, &wv, ws, bias.then_some(&bv[..]), stride, pad, relu);
    if relu {
        assert!(want.iter().all(|&v| v >= 0.0) && want.contains(&0.0));
    }
    assert_close(&format!("conv {xs:?} * {ws:?} s{stride} p{pad:?} relu {relu}"), &got, &want, 1e-5, 1e-5);
}

#[test]
fn non_square_convs_with_relu_match_cpu() {
    check_conv_relu(10, [2, 5, 9, 11], [6, 5, 1, 7], 1, [0, 3], true, true);
    check_conv_relu(11, [1, 3, 10, 7], [9, 3, 7, 1], 1, [3, 0], true, true);
    check_conv_relu(12, [2, 4, 8, 9], [5, 4, 1, 3], 1, [0, 1], false, true);
    check_conv_relu(13, [1, 4, 9, 8], [5, 4, 3, 1], 1, [1, 0], true, false);
    check_conv_relu(14, [1, 3, 17, 13], [7, 3, 5, 5], 1, [2, 2], true, true); // 5x5
    check_conv_relu(15, [2, 3, 15, 15], [8, 3, 3, 3], 2, [0, 0], true, true); // stem, stride 2
}

#[test]
fn non_square_conv_reference_matches_torch() {
    let (xs, x) = torch("x");
    let (ws, w) = torch("w17");
    let got = conv::conv2d_relu_cpu(&x, dims(&xs), &w, dims(&ws), None, 1, [0, 3], true);
    assert_close("1x7 relu", &got, &torch("conv17_relu").1, 1e-5, 1e-5);
    let (ws, w) = torch("w71");
    let (_, b) = torch("b");
    let got = conv::conv2d_relu_cpu(&x, dims(&xs), &w, dims(&ws), Some(&b), 2, [3, 0], true);
    assert_close("7x1 s2 relu", &got, &torch("conv71_s2_relu").1, 1e-5, 1e-5);
}
