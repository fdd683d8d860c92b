//! Channel reductions at GPU width: group_sum in one pass or in slices plus a final pass, vec4
//! and scalar loads, odd sizes, against the CPU reference and bit for bit run to run.

mod common;

use common::*;
use sddpm_gpu::graph::{Graph, PartialSums, Plan};
use sddpm_gpu::ops::reduce;

#[test]
fn group_sum_in_slices_matches_cpu_and_repeats_bit_for_bit() {
    // [N, C, S], groups, slices expected: single pass (small) and sliced (over 1 MiB, few
    // outputs), S a multiple of 4 (vec4 loads) and not, one group and several.
    let cases = [
        ([8, 5, 33], 1, 1),
        ([400, 3, 252], 1, 99),
        ([300, 3, 301], 1, 89),
        ([600, 2, 225], 2, 66),
        ([520, 2, 256], 4, 33),
        ([12, 5, 64], 4, 1),
    ];
    let mut r = rng(70);
    for (shape, groups, slices) in cases {
        let [n, c, s] = shape;
        let xv = normalish(&mut r, n * c * s, 1.0);
        let mut g = Graph::new();
        let x = g.input("x", &shape);
        let y = reduce::group_sum(&mut g, x, groups, "sum");
        assert_eq!(reduce::group_slices(groups * c, n / groups * s), slices, "{shape:?}");
        assert_eq!(g.nodes.len(), if slices > 1 { 2 } else { 1 }, "{shape:?}: a final pass exactly when sliced");
        assert_eq!(g.nodes[0].workgroups, [(groups * c) as u32, slices as u32, 1]);
        g.mark_output(y);
        let ctx = ctx();
        let plan = Plan::compile_guarded(ctx, &g).unwrap();
        plan.write(ctx, x, &xv).unwrap();
        plan.run(ctx).unwrap();
        let got = plan.read(ctx, y).unwrap();
        plan.run(ctx).unwrap();
        assert_eq!(bits(&got), bits(&plan.read(ctx, y).unwrap()), "{shape:?}: run to run");
        plan.check_guards(ctx).unwrap();
        let want = reduce::group_sum_cpu(&xv, n, c, s, groups);
        assert_close(&format!("group_sum {shape:?} / {groups}"), &got, &want, 1e-5, 1e-4);
    }
}

#[test]
fn group_sum_slices_fill_a_large_gpu_only_when_the_data_is_large() {
    // The cifar10 conv bias gradient at 32x32 (N = T*B = 128, 128 channels): 8 slices of 16384;
    // at 4x4 with 256 channels (2048 values each) 2 slices, none shorter than 1024.
    assert_eq!(reduce::group_slices(128, 128 * 1024), 8);
    assert_eq!(reduce::group_slices(256, 128 * 16), 2);
    // Already wide (the time-embedding gradient: B*C outputs; 512 channels) or small: one pass.
    assert_eq!(reduce::group_slices(32 * 128, 4 * 1024), 1);
    assert_eq!(reduce::group_slices(512, 128 * 16), 1);
    assert_eq!(reduce::group_slices(16, 8 * 1024), 1);
    assert_eq!(reduce::group_slices(3, 10), 1);
}

/// Channel partials as a producer would write them: per row (a block of `B / rows` images of
/// every step) and channel, `slices` consecutive pixel blocks summed over the steps.
fn partials_cpu(x: &[f32], [t, b, c, hw]: [usize; 4], rows: usize, slices: usize) -> Vec<f32> {
    let per = hw.div_ceil(slices);
    let mut part = vec![0f32; rows * c * slices];
    for step in 0..t {
        for img in 0..b {
            let r = img / (b / rows);
            for ch in 0..c {
                for px in 0..hw {
                    part[(r * c + ch) * slices + px / per] += x[((step * b + img) * c + ch) * hw + px];
                }
            }
        }
    }
    part
}

#[test]
fn group_sum_finishes_partials_its_producer_left() {
    let (t, b, c, hw) = (3, 4, 5, 12);
    let mut r = rng(71);
    let xv = normalish(&mut r, t * b * c * hw, 1.0);
    // Rows of single images serve every grouping; blocks of two images only the plain sum.
    for (rows, groupings) in [(b, vec![1, 2, b]), (2, vec![1])] {
        for groups in groupings {
            let slices = 3;
            let mut g = Graph::new();
            let x = g.input("x", &[t * b, c, hw]);
            let part = g.input("part", &[rows * c * slices]);
            g.partial_sums.insert(x, PartialSums { part, rows, slices, per_image: rows == b });
            let y = reduce::group_sum(&mut g, x, groups, "sum");
            assert_eq!(g.nodes.len(), 1, "only the final pass");
            assert_eq!(g.nodes[0].entry, "group_sum_final");
            let pv = partials_cpu(&xv, [t, b, c, hw], rows, slices);
            let got = run_graph(g, &[(x, bits(&xv)), (part, bits(&pv))], &[y]).remove(0);
            let want = reduce::group_sum_cpu(&xv, t * b, c, hw, groups);
            assert_close(&format!("rows {rows}, groups {groups}"), &got, &want, 1e-5, 1e-5);
        }
    }
    // Blocks of images cannot be regrouped: group_sum sums x itself.
    let mut g = Graph::new();
    let x = g.input("x", &[t * b, c, hw]);
    let part = g.input("part", &[2 * c]);
    g.partial_sums.insert(x, PartialSums { part, rows: 2, slices: 1, per_image: false });
    reduce::group_sum(&mut g, x, b, "sum");
    assert_eq!(g.nodes[0].reads, [x]);
}
