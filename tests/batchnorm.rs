//! Training-mode BatchNorm at GPU width: statistics and backward reductions in (channel x slice)
//! workgroups merged in a fixed order, against the CPU references on odd sizes (one slice and
//! several, vec4 rows and not), bit for bit run to run, and the channel sums BN's backward leaves
//! for a conv bias equal to what group_sum computes from its output.

mod common;

use common::*;
use sddpm_gpu::graph::{Graph, TensorId};
use sddpm_gpu::ops::{batchnorm, conv, neuron, reduce};

/// [N, C, HW] shapes: one slice per channel (small) and many (over 1 MiB, few channels); HW a
/// multiple of 4 (vec4 loads) and not.
const SHAPES: [[usize; 3]; 5] = [[8, 5, 63], [64, 3, 1536], [100, 3, 901], [16, 4, 256], [130, 2, 1025]];

fn bn_params(g: &mut Graph, c: usize) -> batchnorm::BnParams {
    batchnorm::BnParams {
        weight: g.param("bn.weight", &[c]),
        bias: g.param("bn.bias", &[c]),
        running_mean: g.param("bn.running_mean", &[c]),
        running_var: g.param("bn.running_var", &[c]),
        groups: batchnorm::BnGroups::ONE,
    }
}

#[test]
fn slices_are_what_group_sum_uses() {
    let slices: Vec<usize> = SHAPES.iter().map(|&[n, c, hw]| batchnorm::slices(n, c, hw)).collect();
    assert_eq!(slices, [1, 96, 88, 1, 131]);
    for [n, c, hw] in SHAPES {
        assert_eq!(batchnorm::slices(n, c, hw), reduce::group_slices(c, n * hw));
    }
}

#[test]
fn statistics_in_slices_match_cpu_and_repeat_bit_for_bit() {
    for (i, [n, c, hw]) in SHAPES.into_iter().enumerate() {
        let mut r = rng(80 + i as u64);
        // An offset mean: the merge of slice statistics must not lose the variance to it.
        let xv: Vec<f32> = normalish(&mut r, n * c * hw, 0.5).iter().map(|v| v + 3.0).collect();
        let (wv, bv) = (uniform(&mut r, c, 0.8, 1.2), uniform(&mut r, c, -0.1, 0.1));
        let (rm, rv) = (uniform(&mut r, c, -0.2, 0.2), uniform(&mut r, c, 0.5, 1.5));
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut g = Graph::new();
            let x = g.input("x", &[n, c, hw]);
            let p = bn_params(&mut g, c);
            let (y, saved) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
            g.mark_output(p.running_mean);
            g.mark_output(p.running_var);
            let inputs = [
                (x, bits(&xv)),
                (p.weight, bits(&wv)),
                (p.bias, bits(&bv)),
                (p.running_mean, bits(&rm)),
                (p.running_var, bits(&rv)),
            ];
            runs.push(run_graph(g, &inputs, &[y, saved.mean, saved.invstd, p.running_mean, p.running_var]));
        }
        assert_eq!(
            runs[0].iter().map(|v| bits(v)).collect::<Vec<_>>(),
            runs[1].iter().map(|v| bits(v)).collect::<Vec<_>>()
        );
        let out = &runs[0];
        let (mut rm_c, mut rv_c) = (rm.clone(), rv.clone());
        let (y_cpu, mean_cpu, invstd_cpu) = batchnorm::batchnorm_train_cpu(&xv, c, hw, &wv, &bv, &mut rm_c, &mut rv_c);
        let what = format!("BN [{n}, {c}, {hw}]");
        assert_close(&format!("{what} y"), &out[0], &y_cpu, 1e-5, 2e-5);
        assert_close(&format!("{what} mean"), &out[1], &mean_cpu, 1e-6, 1e-6);
        assert_close(&format!("{what} invstd"), &out[2], &invstd_cpu, 1e-5, 0.0);
        assert_close(&format!("{what} running_mean"), &out[3], &rm_c, 1e-5, 1e-6);
        assert_close(&format!("{what} running_var"), &out[4], &rv_c, 1e-5, 0.0);
    }
}

/// conv (with bias) -> training BN, so BN's backward feeds the conv's bias gradient: every
/// gradient against the CPU references, bit for bit run to run, and the bias gradient bit for bit
/// group_sum's of BN's dx (which the same graph also computes directly).
#[test]
fn backward_in_slices_matches_cpu_and_leaves_group_sums_bits() {
    for (i, [n, c, hw]) in SHAPES.into_iter().enumerate() {
        let side = (hw as f64).sqrt() as usize;
        let (h, w) = if side * side == hw { (side, side) } else { (1, hw) };
        let cin = 2;
        let mut r = rng(90 + i as u64);
        let xv = normalish(&mut r, n * cin * hw, 1.0);
        let cwv = uniform(&mut r, c * cin, -0.5, 0.5);
        let cbv = uniform(&mut r, c, -0.5, 0.5);
        let (wv, bv) = (uniform(&mut r, c, 0.5, 1.5), uniform(&mut r, c, -0.1, 0.1));
        let dy = normalish(&mut r, n * c * hw, 1.0);
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut g = Graph::new();
            let x = g.input("x", &[n, cin, h, w]);
            let cw = g.param("conv.weight", &[c, cin, 1, 1]);
            let cb = g.param("conv.bias", &[c]);
            let p = bn_params(&mut g, c);
            let z = conv::conv2d(&mut g, x, cw, Some(cb), 1, 0, "conv");
            let (y, _) = batchnorm::batchnorm_train(&mut g, z, p, "bn");
            let seed = g.input("dy", g.shape(y).to_vec().as_slice());
            let grads = sddpm_gpu::graph::backward(
                &mut g,
                y,
                seed,
                &[cw, cb, p.weight, p.bias, z],
                sddpm_gpu::ops::elementwise::add,
            );
            // group_sum of BN's dx from the values themselves, not from the sums BN left.
            let dz = grads[&z];
            let ps = g.partial_sums.remove(&dz).expect("BN's backward leaves dx's channel sums");
            let direct = reduce::group_sum(&mut g, dz, 1, "direct");
            g.partial_sums.insert(dz, ps);
            let outs: Vec<TensorId> = [cb, p.weight, p.bias, z].iter().map(|t| grads[t]).chain([direct]).collect();
            let inputs = [
                (x, bits(&xv)),
                (cw, bits(&cwv)),
                (cb, bits(&cbv)),
                (p.weight, bits(&wv)),
                (p.bias, bits(&bv)),
                (p.running_mean, bits(&vec![0.0; c])),
                (p.running_var, bits(&vec![1.0; c])),
                (seed, bits(&dy)),
            ];
            runs.push(run_graph(g, &inputs, &outs));
        }
        let what = format!("conv -> BN [{n}, {c}, {hw}]");
        assert_eq!(
            runs[0].iter().map(|v| bits(v)).collect::<Vec<_>>(),
            runs[1].iter().map(|v| bits(v)).collect::<Vec<_>>(),
            "{what}: run to run"
        );
        let got = &runs[0];
        assert_eq!(bits(&got[0]), bits(&got[4]), "{what}: the conv bias gradient is group_sum's of dx, bit for bit");
        let zv = conv::conv2d_cpu(&xv, [n, cin, h, w], &cwv, [c, cin, 1, 1], Some(&cbv), 1, 0);
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        let (_, mean, invstd) = batchnorm::batchnorm_train_cpu(&zv, c, hw, &wv, &bv, &mut rm, &mut rv);
        let (dz, dw, db) = batchnorm::batchnorm_train_backward_cpu(&dy, &zv, c, hw, &wv, &mean, &invstd);
        assert_close(&format!("{what} dx"), &got[3], &dz, 1e-4, 1e-5);
        assert_close(&format!("{what} dweight"), &got[1], &dw, 1e-4, 1e-3);
        assert_close(&format!("{what} dbias"), &got[2], &db, 1e-4, 1e-3);
        // The conv bias before a training BN gets a gradient that is zero up to rounding.
        let dcb = reduce::group_sum_cpu(&dz, n, c, hw, 1);
        let scale = dz.iter().map(|v| v.abs()).sum::<f32>();
        assert_close(&format!("{what} conv bias"), &got[0], &dcb, 0.0, 1e-6 * scale);
    }
}

/// The neuron fused with BN runs on the statistics in slices: the same spikes as BN, then the
/// neuron apart, and the same gradients.
#[test]
fn neuron_fused_with_batchnorm_in_slices() {
    let (t, b, c, hw) = (4, 8, 3, 4096);
    let n = t * b;
    assert!(batchnorm::slices(n, c, hw) > 1);
    let mut r = rng(99);
    let cv = normalish(&mut r, n * c * hw, 1.0);
    let wv = uniform(&mut r, c, 0.5, 1.5);
    let bv = uniform(&mut r, c, 0.0, 0.8);
    let gs = normalish(&mut r, n * c * hw, 1.0);
    let mut grads = Vec::new();
    for fused in [false, true] {
        let mut g = Graph::new();
        let x = g.input("c", &[n, c, hw]);
        let p = bn_params(&mut g, c);
        let s = if fused {
            let saved = batchnorm::batchnorm_stats(&mut g, x, p, "bn");
            let input = neuron::BnInput { c: x, bn: p, saved, emb: None, bn_name: "bn".into() };
            neuron::neuron_forward_train_bn(&mut g, input, t, neuron::Neuron::default(), "neuron")
        } else {
            let (y, _) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
            neuron::neuron_forward_train(&mut g, y, t, neuron::Neuron::default(), "neuron").0
        };
        g.mark_output(s);
        let inputs = [
            (x, cv.clone()),
            (p.weight, wv.clone()),
            (p.bias, bv.clone()),
            (p.running_mean, vec![0.0; c]),
            (p.running_var, vec![1.0; c]),
        ];
        let mut out = gpu_grads(g, s, &gs, &inputs, &[x, p.weight, p.bias]);
        out.iter_mut().for_each(|v| v.shrink_to_fit());
        grads.push(out);
    }
    for (k, (a, f)) in grads[0].iter().zip(&grads[1]).enumerate() {
        assert_eq!(bits(a), bits(f), "gradient {k}: fused vs unfused");
    }
}

// ---- BatchNorm groups (--bn-groups) --------------------------------------------------------------

/// (T, B, groups, C, HW): one slice per (group, channel) and several, vec4 rows and not, one image
/// per group, odd group sizes.
const GROUPED: [[usize; 5]; 5] =
    [[2, 4, 2, 5, 63], [3, 6, 3, 3, 1536], [1, 4, 4, 2, 1025], [4, 2, 2, 4, 256], [2, 9, 3, 3, 37]];

fn grouped_params(g: &mut Graph, c: usize, count: usize, batch: usize) -> batchnorm::BnParams {
    let groups = batchnorm::BnGroups::new(count, batch).unwrap();
    batchnorm::BnParams { groups, ..bn_params(g, c) }
}

/// Each group's BN applied to each group alone differs from BN over the batch: the test data
/// makes the groups' statistics differ (else a kernel ignoring the groups would pass).
fn assert_groups_matter(what: &str, y_groups: &[f32], y_plain: &[f32]) {
    let worst = y_groups.iter().zip(y_plain).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(worst > 1e-2, "{what}: the groups' statistics barely differ from the batch's ({worst})");
}

/// Training BN with groups (plain apply, with the residual add, with Swish and add) against the
/// CPU reference that runs every group's samples through plain BN, the running statistics from
/// group 0; bit for bit run to run.
#[test]
fn grouped_statistics_and_apply_match_cpu() {
    for (i, [t, b, count, c, hw]) in GROUPED.into_iter().enumerate() {
        let n = t * b;
        let groups = batchnorm::BnGroups::new(count, b).unwrap();
        let mut r = rng(180 + i as u64);
        // Every image its own offset, so the groups' means differ.
        let xv: Vec<f32> = normalish(&mut r, n * c * hw, 0.5)
            .iter()
            .enumerate()
            .map(|(k, v)| v * (1.0 + (k / (c * hw) % b) as f32 * 0.3) + 2.0 + (k / (c * hw) % b) as f32)
            .collect();
        let rv_add = normalish(&mut r, n * c * hw, 1.0);
        let (wv, bv) = (uniform(&mut r, c, 0.8, 1.2), uniform(&mut r, c, -0.1, 0.1));
        let (rm, rv) = (uniform(&mut r, c, -0.2, 0.2), uniform(&mut r, c, 0.5, 1.5));
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut g = Graph::new();
            let x = g.input("x", &[n, c, hw]);
            let res = g.input("r", &[n, c, hw]);
            let p = grouped_params(&mut g, c, count, b);
            let (y, saved) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
            // The fused forms on statistics of their own (running statistics updated three times).
            let y_add = batchnorm::batchnorm_train_add(&mut g, x, p, res, "bn_add");
            let y_swish = batchnorm::batchnorm_train_swish(&mut g, x, p, Some(res), "bn_swish");
            g.mark_output(p.running_mean);
            g.mark_output(p.running_var);
            let inputs = [
                (x, bits(&xv)),
                (res, bits(&rv_add)),
                (p.weight, bits(&wv)),
                (p.bias, bits(&bv)),
                (p.running_mean, bits(&rm)),
                (p.running_var, bits(&rv)),
            ];
            let outs = [y, saved.mean, saved.invstd, y_add, y_swish, p.running_mean, p.running_var];
            runs.push(run_graph(g, &inputs, &outs));
        }
        let what = format!("BN [{t}x{b}, {c}, {hw}] in {count} groups");
        assert_eq!(
            runs[0].iter().map(|v| bits(v)).collect::<Vec<_>>(),
            runs[1].iter().map(|v| bits(v)).collect::<Vec<_>>(),
            "{what}: run to run"
        );
        let out = &runs[0];
        let (mut rm_c, mut rv_c) = (rm.clone(), rv.clone());
        let (y_cpu, mean_cpu, invstd_cpu) =
            batchnorm::batchnorm_train_groups_cpu(&xv, c, hw, groups, &wv, &bv, &mut rm_c, &mut rv_c);
        for _ in 0..2 {
            // The fused forms' passes moved the running statistics again, with the same batch.
            batchnorm::batchnorm_train_groups_cpu(&xv, c, hw, groups, &wv, &bv, &mut rm_c, &mut rv_c);
        }
        let (mut rm_p, mut rv_p) = (rm.clone(), rv.clone());
        let (y_plain, _, _) = batchnorm::batchnorm_train_cpu(&xv, c, hw, &wv, &bv, &mut rm_p, &mut rv_p);
        assert_groups_matter(&what, &y_cpu, &y_plain);
        let add_cpu: Vec<f32> = y_cpu.iter().zip(&rv_add).map(|(a, b)| a + b).collect();
        let swish_cpu: Vec<f32> =
            sddpm_gpu::ops::elementwise::swish_cpu(&y_cpu).iter().zip(&rv_add).map(|(a, b)| a + b).collect();
        assert_close(&format!("{what} y"), &out[0], &y_cpu, 1e-5, 2e-5);
        assert_close(&format!("{what} mean"), &out[1], &mean_cpu, 1e-6, 1e-6);
        assert_close(&format!("{what} invstd"), &out[2], &invstd_cpu, 1e-5, 0.0);
        assert_close(&format!("{what} y + r"), &out[3], &add_cpu, 1e-5, 2e-5);
        assert_close(&format!("{what} swish(y) + r"), &out[4], &swish_cpu, 1e-5, 2e-5);
        assert_close(&format!("{what} running_mean"), &out[5], &rm_c, 1e-5, 1e-6);
        assert_close(&format!("{what} running_var"), &out[6], &rv_c, 1e-5, 0.0);
    }
}

/// conv (with bias) -> training BN in groups, and BN + Swish in groups: every gradient against
/// the CPU references (each group's plain BN backward), and the conv bias's gradient from the
/// groups' channel sums that BN's backward leaves (rows = groups) equal to group_sum's of dx.
#[test]
fn grouped_backward_matches_cpu() {
    for (i, [t, b, count, c, hw]) in GROUPED.into_iter().enumerate() {
        let n = t * b;
        let groups = batchnorm::BnGroups::new(count, b).unwrap();
        let cin = 2;
        let mut r = rng(190 + i as u64);
        let xv = normalish(&mut r, n * cin * hw, 1.0);
        let cwv = uniform(&mut r, c * cin, -0.5, 0.5);
        let cbv = uniform(&mut r, c, -0.5, 0.5);
        let (wv, bv) = (uniform(&mut r, c, 0.5, 1.5), uniform(&mut r, c, -0.1, 0.1));
        // Upstream gradients that differ by image, so the groups' sums differ.
        let dy: Vec<f32> = normalish(&mut r, n * c * hw, 1.0)
            .iter()
            .enumerate()
            .map(|(k, v)| v + 0.5 * (k / (c * hw) % b) as f32)
            .collect();
        let mut g = Graph::new();
        let x = g.input("x", &[n, cin, 1, hw]);
        let cw = g.param("conv.weight", &[c, cin, 1, 1]);
        let cb = g.param("conv.bias", &[c]);
        let p = grouped_params(&mut g, c, count, b);
        let z = conv::conv2d(&mut g, x, cw, Some(cb), 1, 0, "conv");
        let y = batchnorm::batchnorm_train_swish(&mut g, z, p, None, "bn");
        let seed = g.input("dy", g.shape(y).to_vec().as_slice());
        let grads = sddpm_gpu::graph::backward(
            &mut g,
            y,
            seed,
            &[cw, cb, p.weight, p.bias, z],
            sddpm_gpu::ops::elementwise::add,
        );
        let dz = grads[&z];
        let ps = g.partial_sums.remove(&dz).expect("BN's backward leaves dx's channel sums");
        assert_eq!(ps.rows, count, "one row of sums per group");
        let direct = reduce::group_sum(&mut g, dz, 1, "direct");
        g.partial_sums.insert(dz, ps);
        let outs: Vec<TensorId> = [cb, p.weight, p.bias, z].iter().map(|t| grads[t]).chain([direct]).collect();
        let inputs = [
            (x, bits(&xv)),
            (cw, bits(&cwv)),
            (cb, bits(&cbv)),
            (p.weight, bits(&wv)),
            (p.bias, bits(&bv)),
            (p.running_mean, bits(&vec![0.0; c])),
            (p.running_var, bits(&vec![1.0; c])),
            (seed, bits(&dy)),
        ];
        let got = run_graph(g, &inputs, &outs);
        let what = format!("conv -> BN + Swish [{t}x{b}, {c}, {hw}] in {count} groups");
        let zv = conv::conv2d_cpu(&xv, [n, cin, 1, hw], &cwv, [c, cin, 1, 1], Some(&cbv), 1, 0);
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        let (yv, mean, invstd) = batchnorm::batchnorm_train_groups_cpu(&zv, c, hw, groups, &wv, &bv, &mut rm, &mut rv);
        let dv = sddpm_gpu::ops::elementwise::swish_backward_cpu(&yv, &dy);
        let (dz_c, dw, db) =
            batchnorm::batchnorm_train_backward_groups_cpu(&dv, &zv, c, hw, groups, &wv, &mean, &invstd);
        let (dz_plain, _, _) = {
            let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
            let (_, m, s) = batchnorm::batchnorm_train_cpu(&zv, c, hw, &wv, &bv, &mut rm, &mut rv);
            batchnorm::batchnorm_train_backward_cpu(&dv, &zv, c, hw, &wv, &m, &s)
        };
        assert_groups_matter(&format!("{what} dx"), &dz_c, &dz_plain);
        assert_close(&format!("{what} dx"), &got[3], &dz_c, 1e-4, 1e-5);
        assert_close(&format!("{what} dweight"), &got[1], &dw, 1e-4, 1e-3);
        assert_close(&format!("{what} dbias"), &got[2], &db, 1e-4, 1e-3);
        let dcb = reduce::group_sum_cpu(&dz_c, n, c, hw, 1);
        let scale = dz_c.iter().map(|v| v.abs()).sum::<f32>();
        assert_close(&format!("{what} conv bias"), &got[0], &dcb, 0.0, 1e-6 * scale);
        assert_close(&format!("{what} conv bias vs group_sum"), &got[0], &got[4], 0.0, 1e-6 * scale);
    }
}

/// The neuron fused with grouped BN (and the time-embedding term) fires as grouped BN, the add,
/// then the neuron apart, with the same gradients, bit for bit.
#[test]
fn neuron_fused_with_grouped_batchnorm() {
    for [t, b, count, c, hw] in [[4, 4, 2, 3, 64], [2, 6, 3, 2, 33]] {
        let n = t * b;
        let mut r = rng(199 + b as u64);
        let cv: Vec<f32> = normalish(&mut r, n * c * hw, 1.0)
            .iter()
            .enumerate()
            .map(|(k, v)| v * (1.0 + (k / (c * hw) % b) as f32 * 0.5))
            .collect();
        let wv = uniform(&mut r, c, 0.5, 1.5);
        let bv = uniform(&mut r, c, 0.0, 0.8);
        let ev = uniform(&mut r, b * c, -0.3, 0.3);
        let gs = normalish(&mut r, n * c * hw, 1.0);
        let mut results = Vec::new();
        for fused in [false, true] {
            let mut g = Graph::new();
            let x = g.input("c", &[n, c, hw]);
            let emb = g.input("emb", &[b, c]);
            let p = grouped_params(&mut g, c, count, b);
            let s = if fused {
                let saved = batchnorm::batchnorm_stats(&mut g, x, p, "bn");
                let input = neuron::BnInput { c: x, bn: p, saved, emb: Some(emb), bn_name: "bn".into() };
                neuron::neuron_forward_train_bn(&mut g, input, t, neuron::Neuron::default(), "neuron")
            } else {
                let (y, _) = batchnorm::batchnorm_train(&mut g, x, p, "bn");
                let y = sddpm_gpu::ops::elementwise::add_channel(&mut g, y, emb, "emb");
                neuron::neuron_forward_train(&mut g, y, t, neuron::Neuron::default(), "neuron").0
            };
            g.mark_output(s);
            let inputs = [
                (x, cv.clone()),
                (emb, ev.clone()),
                (p.weight, wv.clone()),
                (p.bias, bv.clone()),
                (p.running_mean, vec![0.0; c]),
                (p.running_var, vec![1.0; c]),
            ];
            let spikes = run_graph(g.clone(), &inputs.iter().map(|(t, v)| (*t, bits(v))).collect::<Vec<_>>(), &[s]);
            let grads = gpu_grads(g, s, &gs, &inputs, &[x, p.weight, p.bias, emb]);
            results.push((spikes, grads));
        }
        let what = format!("neuron(BN in {count} groups + emb) [{t}x{b}, {c}, {hw}]");
        assert_eq!(bits(&results[0].0[0]), bits(&results[1].0[0]), "{what}: spikes fused vs unfused");
        let rate = results[0].0[0].iter().sum::<f32>() / (n * c * hw) as f32;
        assert!(rate > 0.05 && rate < 0.95, "{what}: firing rate {rate} tests little");
        for (k, (a, f)) in results[0].1.iter().zip(&results[1].1).enumerate() {
            assert_close(&format!("{what}: gradient {k} fused vs unfused"), f, a, 1e-5, 1e-6);
        }
    }
}
