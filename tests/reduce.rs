//! Channel reductions at GPU width: group_sum in one pass or in slices plus a final pass, vec4
//! and scalar loads, odd sizes, against the CPU reference and bit for bit run to run.

mod common;

use common::*;
use sddpm_gpu::graph::{Graph, Plan};
use sddpm_gpu::ops::reduce;

#[test]
fn group_sum_in_slices_matches_cpu_and_repeats_bit_for_bit() {
    // [N, C, S], groups, slices expected: single pass and sliced, S a multiple of 4 (vec4 loads)
    // and not, one group and several.
    let cases = [
        ([8, 5, 33], 1, 1),
        ([64, 3, 100], 1, 2),
        ([130, 3, 37], 1, 2),
        ([300, 2, 45], 2, 2),
        ([260, 3, 64], 2, 3),
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
    // The cifar10 conv bias gradient at 32x32 (N = T*B = 128, 128 channels): 8 slices of 16384.
    assert_eq!(reduce::group_slices(128, 128 * 1024), 8);
    // Already wide (the time-embedding gradient: B*C outputs) or small: one pass.
    assert_eq!(reduce::group_slices(32 * 128, 4 * 1024), 1);
    assert_eq!(reduce::group_slices(512, 128 * 16), 1);
    assert_eq!(reduce::group_slices(3, 10), 1);
}
