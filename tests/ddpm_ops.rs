//! The ANN counterpart's kernels (GroupNorm with fused Swish, fused softmax attention, dropout): GPU
//! against the CPU reference on random inputs of several shapes (odd sizes, partial key tiles),
//! and every backward's CPU reference against central finite differences of its CPU forward.
//!
//! Tolerances: GPU vs CPU 1e-5 relative + 1e-5 absolute (f32 sums against f64 references; exp
//! inside); finite differences in f32 with step 1e-2 to 1e-2 of the gradient's largest entry.

mod common;

use common::*;
use sddpm_gpu::graph::{backward, Graph};
use sddpm_gpu::ops::groupnorm::{self, GnShape};
use sddpm_gpu::ops::{attention, dropout, elementwise};

// ---- GroupNorm -------------------------------------------------------------------------------

const GN_SHAPES: [(usize, usize, usize, usize, usize); 4] =
    [(2, 6, 3, 5, 7), (1, 64, 32, 4, 4), (3, 5, 5, 3, 3), (2, 32, 8, 1, 1)];

fn gn_data(seed: u64, sh: GnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut r = rng(seed);
    let x: Vec<f32> = normalish(&mut r, sh.b * sh.c * sh.s, 1.5).iter().map(|v| v + 0.4).collect();
    (x, uniform(&mut r, sh.c, 0.6, 1.4), uniform(&mut r, sh.c, -0.3, 0.3))
}

#[test]
fn groupnorm_matches_cpu() {
    for (k, &(b, c, groups, h, w)) in GN_SHAPES.iter().enumerate() {
        for swish in [false, true] {
            let sh = GnShape { b, c, s: h * w, groups };
            let (xv, wv, bv) = gn_data(100 + k as u64, sh);
            let mut g = Graph::new();
            let x = g.input("x", &[b, c, h, w]);
            let (wt, bt) = (g.param("gn.weight", &[c]), g.param("gn.bias", &[c]));
            let y = groupnorm::groupnorm(&mut g, x, wt, bt, groups, swish, "gn");
            let got = run_graph(g, &[(x, bits(&xv)), (wt, bits(&wv)), (bt, bits(&bv))], &[y]).remove(0);
            let (want, _, _) = groupnorm::groupnorm_cpu(&xv, sh, &wv, &bv, swish);
            assert_close(&format!("groupnorm {sh:?} swish {swish}"), &got, &want, 1e-5, 1e-5);
        }
    }
}

#[test]
fn groupnorm_normalises_each_group() {
    // Without affine terms every (image, group) has mean 0 and variance 1 (up to eps).
    let sh = GnShape { b: 2, c: 8, s: 50, groups: 4 };
    let (xv, _, _) = gn_data(7, sh);
    let (y, _, _) = groupnorm::groupnorm_cpu(&xv, sh, &[1.0; 8], &[0.0; 8], false);
    for grp in y.chunks(100) {
        let mean = grp.iter().sum::<f32>() / 100.0;
        let var = grp.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 100.0;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "mean {mean} var {var}");
    }
}

#[test]
fn groupnorm_backward() {
    for (k, &(b, c, groups, h, w)) in GN_SHAPES.iter().enumerate() {
        for swish in [false, true] {
            let sh = GnShape { b, c, s: h * w, groups };
            let (xv, wv, bv) = gn_data(200 + k as u64, sh);
            let dy = normalish(&mut rng(300 + k as u64), b * c * h * w, 1.0);
            let mut g = Graph::new();
            let x = g.input("x", &[b, c, h, w]);
            let (wt, bt) = (g.param("gn.weight", &[c]), g.param("gn.bias", &[c]));
            let y = groupnorm::groupnorm(&mut g, x, wt, bt, groups, swish, "gn");
            let inputs = [(x, xv.clone()), (wt, wv.clone()), (bt, bv.clone())];
            let got = gpu_grads(g, y, &dy, &inputs, &[x, wt, bt]);
            let (dx, dw, db) = groupnorm::groupnorm_backward_cpu(&dy, &xv, sh, &wv, &bv, swish);
            let what = format!("groupnorm {sh:?} swish {swish}");
            assert_close(&format!("{what} dx"), &got[0], &dx, 1e-4, 1e-5);
            assert_close(&format!("{what} dweight"), &got[1], &dw, 1e-5, 1e-4);
            assert_close(&format!("{what} dbias"), &got[2], &db, 1e-5, 1e-4);
            if sh.b * sh.c * sh.s <= 2000 {
                let fwd = |xx: &[f32], ww: &[f32], bb: &[f32]| groupnorm::groupnorm_cpu(xx, sh, ww, bb, swish).0;
                fd_check(&format!("{what} dx"), |xx| fwd(xx, &wv, &bv), &xv, &dy, &dx, 1e-2, 1e-2);
                fd_check(&format!("{what} dweight"), |ww| fwd(&xv, ww, &bv), &wv, &dy, &dw, 1e-2, 1e-2);
                fd_check(&format!("{what} dbias"), |bb| fwd(&xv, &wv, bb), &bv, &dy, &db, 1e-2, 1e-2);
            }
        }
    }
}

// ---- attention -------------------------------------------------------------------------------

/// (B, C, H, W): a single partial key tile, exactly one tile, several tiles with a partial last
/// one, and CIFAR-10's 16x16 level.
const ATTN_SHAPES: [(usize, usize, usize, usize); 5] =
    [(1, 4, 3, 5), (2, 8, 8, 8), (1, 3, 9, 10), (2, 32, 16, 16), (1, 1, 2, 1)];

fn attn_data(seed: u64, len: usize) -> [Vec<f32>; 3] {
    let mut r = rng(seed);
    // Scale 2 makes the softmax peaked enough that the running max matters.
    [normalish(&mut r, len, 2.0), normalish(&mut r, len, 2.0), normalish(&mut r, len, 1.0)]
}

#[test]
fn attention_matches_cpu() {
    for (k, &(b, c, h, w)) in ATTN_SHAPES.iter().enumerate() {
        let n = h * w;
        let [qv, kv, vv] = attn_data(400 + k as u64, b * c * n);
        let mut g = Graph::new();
        let (q, kk, v) = (g.input("q", &[b, c, h, w]), g.input("k", &[b, c, h, w]), g.input("v", &[b, c, h, w]));
        let o = attention::attention(&mut g, q, kk, v, "attn");
        let got = run_graph(g, &[(q, bits(&qv)), (kk, bits(&kv)), (v, bits(&vv))], &[o]).remove(0);
        let want = attention::attention_cpu(&qv, &kv, &vv, b, c, n);
        assert_close(&format!("attention {b}x{c}x{h}x{w}"), &got, &want, 1e-5, 1e-5);
    }
}

#[test]
fn attention_large_logits_stay_finite() {
    // Logits of several hundred: a plain exp would overflow; the online softmax must not.
    let (b, c, n) = (1, 16, 70);
    let [qv, kv, vv] = attn_data(450, b * c * n);
    let qv: Vec<f32> = qv.iter().map(|v| v * 30.0).collect();
    let mut g = Graph::new();
    let (q, k, v) = (g.input("q", &[b, c, n, 1]), g.input("k", &[b, c, n, 1]), g.input("v", &[b, c, n, 1]));
    let o = attention::attention(&mut g, q, k, v, "attn");
    let got = run_graph(g, &[(q, bits(&qv)), (k, bits(&kv)), (v, bits(&vv))], &[o]).remove(0);
    let want = attention::attention_cpu(&qv, &kv, &vv, b, c, n);
    assert_close("attention, large logits", &got, &want, 1e-4, 1e-5);
}

#[test]
fn attention_backward() {
    for (k, &(b, c, h, w)) in ATTN_SHAPES.iter().enumerate() {
        let n = h * w;
        let [qv, kv, vv] = attn_data(500 + k as u64, b * c * n);
        let dy = normalish(&mut rng(600 + k as u64), b * c * n, 1.0);
        let mut g = Graph::new();
        let (q, kk, v) = (g.input("q", &[b, c, h, w]), g.input("k", &[b, c, h, w]), g.input("v", &[b, c, h, w]));
        let o = attention::attention(&mut g, q, kk, v, "attn");
        let got = gpu_grads(g, o, &dy, &[(q, qv.clone()), (kk, kv.clone()), (v, vv.clone())], &[q, kk, v]);
        let (dq, dk, dv) = attention::attention_backward_cpu(&qv, &kv, &vv, &dy, b, c, n);
        let what = format!("attention {b}x{c}x{h}x{w}");
        assert_close(&format!("{what} dq"), &got[0], &dq, 1e-4, 1e-5);
        assert_close(&format!("{what} dk"), &got[1], &dk, 1e-4, 1e-5);
        assert_close(&format!("{what} dv"), &got[2], &dv, 1e-4, 1e-5);
        if b * c * n <= 1000 {
            let f = attention::attention_cpu;
            fd_check(&format!("{what} dq"), |x| f(x, &kv, &vv, b, c, n), &qv, &dy, &dq, 1e-2, 1e-2);
            fd_check(&format!("{what} dk"), |x| f(&qv, x, &vv, b, c, n), &kv, &dy, &dk, 1e-2, 1e-2);
            fd_check(&format!("{what} dv"), |x| f(&qv, &kv, x, b, c, n), &vv, &dy, &dv, 1e-2, 1e-2);
        }
    }
}

// ---- dropout ---------------------------------------------------------------------------------

#[test]
fn dropout_matches_cpu_and_keeps_its_rate() {
    for (seed, n, p, layer, step) in [(11u64, 10_007usize, 0.1f32, 0usize, 1u32), (12, 333, 0.5, 3, 7)] {
        let xv = normalish(&mut rng(seed), n, 1.0);
        let key = dropout::key_words(seed, step);
        let mut g = Graph::new();
        let x = g.input("x", &[n]);
        let k = g.input("key", &[4]);
        let y = dropout::dropout(&mut g, x, p, k, layer, "dropout");
        let got = run_graph(g, &[(x, bits(&xv)), (k, key.to_vec())], &[y]).remove(0);
        let want = dropout::dropout_cpu(&xv, p, key, layer);
        assert_eq!(bits(&got), bits(&want), "dropout n {n} p {p}: the mask is integer arithmetic, exact");
        let dropped = want.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - p as f64).abs() < 4.0 * (p as f64 * (1.0 - p as f64) / n as f64).sqrt(), "rate {dropped}");
        let kept = xv.iter().zip(&want).find(|(_, &w)| w != 0.0).unwrap();
        assert_eq!(*kept.1, kept.0 * (1.0 / (1.0 - p)));
    }
}

#[test]
fn dropout_masks_differ_by_layer_step_and_seed() {
    let x = vec![1.0f32; 4096];
    let base = dropout::dropout_cpu(&x, 0.5, dropout::key_words(1, 1), 0);
    for other in [
        dropout::dropout_cpu(&x, 0.5, dropout::key_words(1, 1), 1),
        dropout::dropout_cpu(&x, 0.5, dropout::key_words(1, 2), 0),
        dropout::dropout_cpu(&x, 0.5, dropout::key_words(2, 1), 0),
    ] {
        let same = base.iter().zip(&other).filter(|(a, b)| a == b).count();
        assert!(same < 2400, "masks should be independent: {same} of 4096 agree");
    }
}

#[test]
fn dropout_backward_reuses_the_mask() {
    let (n, p, layer) = (999usize, 0.3f32, 2usize);
    let key = dropout::key_words(5, 3);
    let mut r = rng(13);
    let xv = normalish(&mut r, n, 1.0);
    let dy = normalish(&mut r, n, 1.0);
    let mut g = Graph::new();
    let x = g.input("x", &[n]);
    let k = g.input("key", &[4]);
    let y = dropout::dropout(&mut g, x, p, k, layer, "dropout");
    let shape = g.shape(y).to_vec();
    let seed = g.input("dy", &shape);
    let grads = backward(&mut g, y, seed, &[x], elementwise::add);
    let got = run_graph(g, &[(x, bits(&xv)), (k, key.to_vec()), (seed, bits(&dy))], &[grads[&x]]).remove(0);
    let want = dropout::dropout_cpu(&dy, p, key, layer);
    assert_eq!(bits(&got), bits(&want));
    fd_check("dropout dx", |xx| dropout::dropout_cpu(xx, p, key, layer), &xv, &dy, &want, 1e-2, 1e-3);
}
