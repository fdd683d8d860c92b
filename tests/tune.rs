//! Calibration kernels (`devices --bench`, the profiler's % of peak), kernel variants against
//! their CPU references, and the autotuner's cache.
//!
//! Tolerances: the calibration FMA chains run the same operations in the same order on both
//! sides, but WGSL lets `fma` round the product before the add (lavapipe does), so up to 64 rounds
//! are compared at 1e-5 relative; copies and variants of one summation order must be bit-exact.

mod common;

use common::*;
use sddpm_gpu::graph::Graph;
use sddpm_gpu::ops::calibrate;

// ---- calibration kernels --------------------------------------------------------------------

#[test]
fn calibration_fma_matches_cpu_on_odd_sizes() {
    for (n, iters) in [(1usize, 1usize), (257, 3), (1000, 17), (4099, 64)] {
        let mut g = Graph::new();
        let out = calibrate::fma_rate(&mut g, n, iters, "fma");
        let got = run_graph(g, &[], &[out]).remove(0);
        assert_close(&format!("fma_rate n={n} iters={iters}"), &got, &calibrate::fma_rate_cpu(n, iters), 1e-5, 0.0);
    }
}

#[test]
fn calibration_copy_is_exact() {
    for values in [4usize, 1028, 4 * 1001] {
        let mut g = Graph::new();
        let src = g.input("src", &[values]);
        let dst = calibrate::copy_rate(&mut g, src, "copy");
        let data = uniform(&mut rng(values as u64), values, -3.0, 3.0);
        let got = run_graph(g, &[(src, bits(&data))], &[dst]).remove(0);
        assert_eq!(bits(&got), bits(&data), "copy of {values} values");
    }
}

#[test]
fn devices_bench_prints_positive_rates() {
    let out = run(&["devices", "--bench"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("bench ")).unwrap_or_else(|| panic!("no bench line:\n{text}"));
    let number_before = |unit: &str| -> f64 {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| w.starts_with(unit)).unwrap_or_else(|| panic!("no {unit} in: {line}"));
        words[at - 1].parse().unwrap_or_else(|_| panic!("no number before {unit} in: {line}"))
    };
    assert!(number_before("GFLOP/s") > 0.0, "{line}");
    assert!(number_before("GB/s") > 0.0, "{line}");
}
