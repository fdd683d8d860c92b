//! Cooperative-matrix (tensor-core) kernels: the fragment against CPU references, the self-check,
//! and the SDDPM_KERNELS policy.
//!
//! They need an adapter with cooperative matrices: on a machine without a GPU, Mesa 26's lavapipe
//! through tools/lavapipe26-run (`.ci/run` does this). The tests that need them are `#[ignore]`d, so
//! the plain `cargo test` reports them as ignored rather than passed; run them with
//! `tools/lavapipe26-run`-as-runner and `-- --include-ignored`, where a missing feature is a failure.
//!
//! Tolerances: the products are f32 sums of exact f16 x f16 products, with real operands carried
//! as hi + lo (about 22 bits), so results match the f32 references to a few f32 roundings of the
//! sum's magnitude: relative L2 error at most 2e-6 and elementwise 1e-5 of the row's scale.

mod common;

use common::*;
use sddpm_gpu::gpu::{Context, KernelPolicy, Shader};
use sddpm_gpu::graph::{Graph, Plan, TensorId, Variant};
use sddpm_gpu::ops::coop_matmul::{self, Operand};
use sddpm_gpu::ops::matmul::{self, Strides};
use sddpm_gpu::tune;

/// Why the tests that need cooperative matrices are ignored by default.
const NEEDS_COOP: &str = "needs cooperative matrices: run with CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=tools/lavapipe26-run and -- --include-ignored (.ci/run does)";

/// The shared context with tuning off, if the adapter has cooperative matrices.
fn try_coop_ctx() -> Option<&'static Context> {
    let c = ctx();
    (!c.coop_sizes.is_empty()).then_some(c)
}

/// The shared context with tuning off; fails unless the adapter has cooperative matrices (the
/// tests calling it are ignored unless asked for, and then must not pass by skipping).
fn coop_ctx() -> &'static Context {
    try_coop_ctx().unwrap_or_else(|| {
        let c = ctx();
        panic!(
            "{} offers no cooperative matrices our kernels use (it lists: {:?}); {NEEDS_COOP}",
            c.describe(),
            c.adapter.coop_descriptions()
        )
    })
}

/// A context of its own with policy `kernels`, tuning as `enabled`, its cache in a fresh folder.
fn policy_ctx(kernels: KernelPolicy, enabled: bool, cache: &str) -> Context {
    let c = Context::open(None, wgpu::Features::empty(), kernels).unwrap();
    {
        let state = tune::tuning(&c);
        let mut t = state.lock().unwrap();
        t.enabled = enabled;
        let dir = tmp(cache);
        let _ = std::fs::remove_dir_all(&dir);
        t.cache_dir = Some(dir);
    }
    c
}

/// Test values for an operand mode: spikes; values around 1 (weights, images) or, with `small`,
/// around 2^-13, many of them in f16's subnormal range (a zero-initialised layer's weights);
/// gradient-like magnitudes around 1e-7 for pre-scaled operands.
fn operand_data(r: &mut rand::rngs::StdRng, n: usize, op: Operand, small: bool) -> Vec<f32> {
    match op {
        Operand::Exact => spikes(r, n, 0.3),
        Operand::Split => normalish(r, n, if small { 2f32.powi(-13) } else { 1.0 }),
        Operand::Scaled => normalish(r, n, 1e-7),
    }
}

/// The instances whose variants this device can run.
fn runnable_instances(c: &Context) -> Vec<&'static coop_matmul::Instance> {
    coop_matmul::INSTANCES
        .iter()
        .zip(&coop_matmul::SHADERS)
        .filter(|(i, s)| coop_matmul::variant(i, s, 1, 1, [Operand::Split; 2]).needs.met_on(c))
        .map(|(i, _)| i)
        .collect()
}

/// The index of candidate `name` of node 0.
fn candidate(g: &Graph, name: &str) -> usize {
    g.variants[&0].candidates.iter().position(|v| v.name == name).unwrap_or_else(|| panic!("no candidate {name}"))
}

#[test]
#[ignore = "needs cooperative matrices (tools/lavapipe26-run, -- --include-ignored)"]
fn coop_matmul_matches_cpu_on_odd_shapes() {
    let c = coop_ctx();
    use Operand::*;
    let shapes = [
        ([1usize, 1, 1], false),
        ([7, 33, 19], true),
        ([45, 37, 83], false),
        ([65, 17, 70], true),
        ([3, 129, 5], false),
    ];
    let modes = [[Split, Split], [Exact, Split], [Split, Exact], [Scaled, Exact], [Split, Scaled], [Exact, Exact]];
    let mut tested = 0;
    for inst in runnable_instances(c) {
        tested += 1;
        let mut worst = 0f64;
        for (seed, &([m, n, k], transposed)) in shapes.iter().enumerate() {
            for (mi, &ops) in modes.iter().enumerate() {
                let mut r = rng(100 + seed as u64 * 10 + mi as u64);
                let small = mi % 2 == 1;
                let a_data = operand_data(&mut r, m * k, ops[0], small);
                let b_data = operand_data(&mut r, k * n, ops[1], !small);
                let bias_data = normalish(&mut r, n, 1.0);
                let s = if transposed { Strides::nt(k) } else { Strides::nn(k, n) };
                let with_bias = seed % 2 == 0;
                let want = matmul::matmul_cpu(&a_data, &b_data, with_bias.then_some(&bias_data[..]), [m, n, k], s);
                let mut g = Graph::new();
                let a = g.input("a", &[m, k]);
                let b = g.input("b", &[k * n]);
                let bias = g.input("bias", &[n]);
                let out = coop_matmul::matmul(&mut g, a, b, with_bias.then_some(bias), [m, n, k], s, ops, "mm");
                let i = candidate(&g, inst.name);
                g.choose(0, i);
                let got =
                    run_graph(g, &[(a, bits(&a_data)), (b, bits(&b_data)), (bias, bits(&bias_data))], &[out]).remove(0);
                let what = format!(
                    "{} [{m}, {n}, {k}] {ops:?} small {small} transposed {transposed} bias {with_bias}",
                    inst.name
                );
                let err = rel_l2(&got, &want);
                worst = worst.max(err);
                assert!(err <= 2e-6, "{what}: relative L2 error {err:.2e}");
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
                assert_close(&what, &got, &want, 1e-5, 1e-5 * scale);
            }
        }
        println!("{}: worst relative L2 error {worst:.2e} against the CPU reference", inst.name);
    }
    assert!(tested > 0, "no cooperative-matrix instance runs on {}", c.describe());
}

/// A coop matmul node (f32 candidates, then `coop` or the family's own cooperative-matrix ones).
fn coop_graph(m: usize, n: usize, k: usize, coop: Option<Variant>) -> (Graph, [TensorId; 3]) {
    let mut g = Graph::new();
    let a = g.input("a", &[m, k]);
    let b = g.input("b", &[k, n]);
    let out = coop_matmul::matmul(&mut g, a, b, None, [m, n, k], Strides::nn(k, n), [Operand::Split; 2], "mm");
    if let Some(v) = coop {
        let t = g.variants.get_mut(&0).unwrap();
        t.candidates.retain(|c| c.needs.coop == 0);
        t.candidates.push(v);
    }
    (g, [a, b, out])
}

/// Run the selected plan of `g` ([m, n, k] product of coop_graph) and compare with the CPU.
fn run_selected(c: &Context, g: &Graph, [a, b, out]: [TensorId; 3], [m, n, k]: [usize; 3]) {
    let mut r = rng(7);
    let (ad, bd) = (normalish(&mut r, m * k, 1.0), normalish(&mut r, k * n, 1.0));
    let mut g = g.clone();
    g.mark_output(out);
    let plan = Plan::compile(c, &g).unwrap();
    plan.write(c, a, &ad).unwrap();
    plan.write(c, b, &bd).unwrap();
    plan.run(c).unwrap();
    let got = plan.read(c, out).unwrap();
    let want = matmul::matmul_cpu(&ad, &bd, None, [m, n, k], Strides::nn(k, n));
    assert_close("selected matmul", &got, &want, 1e-5, 1e-5);
}

/// A cooperative-matrix variant whose module loads B column-major (coopLoad instead of
/// coopLoadT: the layout mistake coop-matrix-on-cpu.md warns of), so it multiplies by B's
/// fragments transposed; it compiles and runs without any error.
fn broken_variant(inst: &coop_matmul::Instance) -> Variant {
    let i = coop_matmul::INSTANCES.iter().position(|x| x == inst).unwrap();
    let src = coop_matmul::SHADERS[i].source.replace("coopLoadT<CmB>", "coopLoad<CmB>");
    assert_ne!(src, coop_matmul::SHADERS[i].source);
    let shader: &'static Shader =
        Box::leak(Box::new(Shader { name: "coop_matmul", source: Box::leak(src.into_boxed_str()), trusted: true }));
    coop_matmul::variant(inst, shader, 45, 37, [Operand::Split; 2])
}

#[test]
#[ignore = "needs cooperative matrices (tools/lavapipe26-run, -- --include-ignored)"]
fn self_check_rejects_a_broken_kernel_and_the_node_falls_back() {
    let c0 = coop_ctx();
    let inst = runnable_instances(c0)[0];
    let c = policy_ctx(KernelPolicy::Coop, false, "coop-broken");
    let [m, n, k] = [45, 37, 83];
    let (mut g, ids) = coop_graph(m, n, k, Some(broken_variant(inst)));
    let report = tune::select(&c, &mut g).unwrap();
    assert_eq!(report.checks_run, 1, "{report:?}");
    assert_eq!(report.rejected.len(), 1, "one notice: {report:?}");
    let notice = &report.rejected[0];
    assert!(!notice.contains('\n') && notice.contains(inst.name) && notice.contains("coop_matmul"), "{notice}");
    assert!(
        notice.contains("CM_A_MODE=1") && notice.contains("relative error"),
        "names the shape and the error: {notice}"
    );
    assert_eq!(g.variants[&0].variant().needs.coop, 0, "falls back to an f32 kernel");
    assert_eq!(report.forced, 0);
    run_selected(&c, &g, ids, [m, n, k]);
    // The verdict is kept for the context and cached: no second check, no second notice.
    let (mut g2, _) = coop_graph(m, n, k, Some(broken_variant(inst)));
    let again = tune::select(&c, &mut g2).unwrap();
    assert_eq!((again.checks_run, again.rejected.len()), (0, 0), "{again:?}");
    let fresh = policy_ctx(KernelPolicy::Coop, false, "coop-broken-2");
    tune::tuning(&fresh).lock().unwrap().cache_dir = tune::tuning(&c).lock().unwrap().cache_dir.clone();
    let (mut g3, _) = coop_graph(m, n, k, Some(broken_variant(inst)));
    let cached = tune::select(&fresh, &mut g3).unwrap();
    assert_eq!(cached.checks_run, 0, "the verdict comes from the cache: {cached:?}");
    assert_eq!(cached.rejected.len(), 1, "a new context says it once: {cached:?}");
    assert_eq!(g3.variants[&0].variant().needs.coop, 0);
}

#[test]
#[ignore = "needs cooperative matrices (tools/lavapipe26-run, -- --include-ignored)"]
fn coop_forced_runs_the_coop_kernel_after_it_passes_its_check() {
    let c0 = coop_ctx();
    let c = policy_ctx(KernelPolicy::Coop, false, "coop-forced");
    let [m, n, k] = [45, 37, 83];
    let (mut g, ids) = coop_graph(m, n, k, None);
    let report = tune::select(&c, &mut g).unwrap();
    let offered = runnable_instances(c0).len();
    assert_eq!(report.checks_run, offered, "each runnable instance checked once: {report:?}");
    assert!(report.rejected.is_empty(), "{report:?}");
    assert_eq!(report.forced, 1, "{report:?}");
    let chosen = g.variants[&0].variant();
    assert_ne!(chosen.needs.coop, 0, "forced onto a cooperative-matrix kernel, got {}", chosen.name);
    let key = g.tuning_key(0);
    assert_eq!(tune::tuning(&c).lock().unwrap().chosen[&key], chosen.name, "recorded like any choice");
    run_selected(&c, &g, ids, [m, n, k]);
    // The verdicts went to the tuning cache file.
    let dir = tune::tuning(&c).lock().unwrap().cache_dir.clone().unwrap();
    let file = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains("\"checks\"") && text.contains("\"passed\": true"), "{text}");
}

#[test]
#[ignore = "needs cooperative matrices (tools/lavapipe26-run, -- --include-ignored)"]
fn the_tuner_times_coop_candidates_like_any_other() {
    let c0 = coop_ctx();
    let c = policy_ctx(KernelPolicy::Auto, true, "coop-auto");
    let (mut g, ids) = coop_graph(45, 37, 83, None);
    let report = tune::select(&c, &mut g).unwrap();
    assert_eq!(report.timed, 1, "{report:?}");
    assert_eq!(report.forced, 0);
    let dir = tune::tuning(&c).lock().unwrap().cache_dir.clone().unwrap();
    let file = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(file).unwrap();
    for inst in runnable_instances(c0) {
        assert!(text.contains(&format!("\"variant\": \"{}\"", inst.name)), "{} timed: {text}", inst.name);
    }
    run_selected(&c, &g, ids, [45, 37, 83]);
}

#[test]
fn kernels_f32_opens_the_device_without_cooperative_matrices() {
    let c = policy_ctx(KernelPolicy::F32, true, "coop-f32");
    assert!(c.coop_sizes.is_empty());
    assert!(!c.features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX));
    let (mut g, _) = coop_graph(9, 10, 11, None);
    tune::select(&c, &mut g).unwrap();
    assert!(g.variants[&0].candidates.iter().all(|v| v.needs.coop == 0), "no cooperative-matrix candidate is offered");
}

#[test]
fn kernels_coop_without_cooperative_matrices_is_a_one_line_error() {
    // Any adapter, with the feature withheld, stands in for one that has none.
    let err = Context::open(None, wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX, KernelPolicy::Coop)
        .err()
        .expect("coop forced without cooperative matrices must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("SDDPM_KERNELS=coop") && msg.contains("cooperative matrices") && !msg.contains('\n'), "{msg}");
    // Through the binary: an unknown policy and a forced one on this adapter.
    let out = bin().args(["devices"]).env("SDDPM_KERNELS", "fast").output().unwrap();
    assert_one_line_error(&out, "SDDPM_KERNELS");
}

#[test]
fn devices_lists_the_cooperative_matrix_shapes() {
    let out = bin().arg("devices").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cooperative-matrix kernels: where the adapter has them"), "{text}");
    if try_coop_ctx().is_some() {
        assert!(text.contains("cooperative matrices: ") && text.contains("8x8x8 f16 x f16 -> f32"), "{text}");
        assert!(text.contains("our kernels use 8x8x8"), "{text}");
    }
}

#[test]
fn every_instance_prelude_matches_its_description() {
    for (inst, shader) in coop_matmul::INSTANCES.iter().zip(&coop_matmul::SHADERS) {
        let f = inst.f;
        for line in [
            format!("alias CmA = coop_mat{f}x{f}<f16, A>;"),
            format!("alias CmC = coop_mat{f}x{f}<f32, C>;"),
            format!("const CM_BM: u32 = {}u;", inst.bm),
            format!("const CM_BN: u32 = {}u;", inst.bn),
            format!("const CM_BK: u32 = {}u;", inst.bk),
            format!("const CM_WG: u32 = {}u;", inst.wg),
            format!("const CM_MAXF: u32 = {}u;", inst.maxf),
        ] {
            assert!(shader.source.contains(&line), "{}: prelude lacks '{line}'", inst.name);
        }
        assert!(inst.bk % f == 0 && inst.bm % f == 0 && inst.bn % f == 0, "{}: tile of whole fragments", inst.name);
        let (lo, hi) = inst.subgroups();
        assert!(lo >= 1 && lo <= hi && inst.fragments() <= inst.wg, "{}: subgroups {lo}..{hi}", inst.name);
    }
}
