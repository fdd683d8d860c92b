//! Shared test helpers: one GPU context per test binary, random data, tolerant comparison, and a
//! one-call "build graph, upload, run, read" for op tests.
#![allow(dead_code)]

pub mod ddp;
pub mod torch;

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::graph::{Graph, Plan, TensorId};

/// The context all tests of a binary share (wgpu devices are thread-safe). Under CI the
/// adapter must be Vulkan: wgpu silently falls back to GL when the Vulkan ICD is missing.
pub fn ctx() -> &'static Context {
    static CTX: OnceLock<Context> = OnceLock::new();
    CTX.get_or_init(|| {
        let mut c =
            Context::new(None).expect("a GPU adapter (on Linux without a GPU: apt install mesa-vulkan-drivers)");
        // Kernels run with wgpu's bounds checks here, so an out-of-bounds access shows up as a
        // mismatch against the CPU reference instead of undefined behaviour. The release binary
        // runs trusted kernels without them; the CLI tests (train/sample parity through the
        // binary) and tests/platform.rs cover that path.
        c.shader_checks = true;
        // Op and model tests run every family's default kernel: timing the variants of each
        // shape again in every test binary would cost more than the tests (tests/tune.rs checks
        // every variant against the CPU reference and the tuner itself).
        sddpm_gpu::tune::tuning(&c).lock().unwrap().enabled = false;
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            assert_eq!(c.adapter.backend, wgpu::Backend::Vulkan, "CI expects Vulkan, got {}", c.describe());
        }
        c
    })
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Approximately normal values (sum of uniforms), enough for test inputs.
pub fn normalish(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (0..4).map(|_| rng.random_range(-1.0f32..1.0)).sum::<f32>() * 0.866 * scale).collect()
}

/// Random spikes (exactly 0 or 1) firing with probability `rate`.
pub fn spikes(rng: &mut StdRng, n: usize, rate: f32) -> Vec<f32> {
    (0..n).map(|_| f32::from(rng.random::<f32>() < rate)).collect()
}

pub fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Assert |got - want| <= atol + rtol * |want| elementwise; report the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() == w.is_finite(), "{what}[{i}]: got {g}, want {w}");
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}[{i}]: got {}, want {} (rtol {rtol}, atol {atol})", got[i], want[i]);
}

/// Relative L2 error |got - want| / |want|.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| ((g - w) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Compile `g` (with `outputs` marked), upload `inputs` (raw 32-bit words), run once, read outputs.
pub fn run_graph(mut g: Graph, inputs: &[(TensorId, Vec<u32>)], outputs: &[TensorId]) -> Vec<Vec<f32>> {
    let c = ctx();
    for &o in outputs {
        g.mark_output(o);
    }
    // Guarded: a kernel reading past a tensor's end sees NaN, one writing past it fails here.
    let plan = Plan::compile_guarded(c, &g).expect("compile");
    for (t, data) in inputs {
        plan.write(c, *t, data).expect("upload");
    }
    plan.run(c).expect("run");
    plan.check_guards(c).expect("no kernel writes out of bounds");
    outputs.iter().map(|&o| plan.read(c, o).expect("read")).collect()
}

// ---- command-line helpers ---------------------------------------------------------------------

pub fn bin() -> std::process::Command {
    // Under tools/lavapipe26-run (the cooperative-matrix tests) the binary runs through it too:
    // only the test binary itself was started with sid's loader and driver.
    let mut cmd = match std::env::var_os("SDDPM_LAVAPIPE26_RUN") {
        Some(runner) => {
            let mut c = std::process::Command::new(runner);
            c.arg(env!("CARGO_BIN_EXE_sddpm-gpu"));
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_sddpm-gpu")),
    };
    // Tuning results go to one cache under target/ that every CLI test shares (the suite tunes
    // each shape once, and leaves nothing in the user's cache or in /tmp).
    cmd.env("SDDPM_CACHE_DIR", std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tune-cache"));
    cmd
}

pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A file of another fixture set: `tests/{dir}/{name}` (fixtures-attn, fixtures-lif, ...).
pub fn fixture_in(dir: &str, name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(dir).join(name)
}

thread_local! {
    /// This test's temporary folder. libtest runs every test on a thread of its own, and a
    /// thread's locals are dropped when it ends, pass or fail: the folder goes with the test.
    static TEST_DIR: tempfile::TempDir =
        tempfile::Builder::new().prefix("sddpm-test-").tempdir().expect("a temporary folder");
}

/// A path in this test's own temporary folder, removed when the test ends.
pub fn tmp(name: &str) -> std::path::PathBuf {
    TEST_DIR.with(|d| d.path().join(name))
}

/// A path in a folder this test binary's tests share (something made once, e.g. a trained run
/// several tests copy): `target/tmp/shared-<test binary>/`, emptied when the binary first asks
/// for it, so each binary keeps one copy under target/ and nothing piles up in /tmp.
pub fn shared_tmp(name: &str) -> std::path::PathBuf {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("shared-{}", env!("CARGO_CRATE_NAME")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
    .join(name)
}

pub fn run(args: &[&str]) -> std::process::Output {
    bin().args(args).output().unwrap()
}

/// A failure must be one `error:` line mentioning `needle`, a non-zero exit, and no panic.
pub fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "expected failure");
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("error:") && !l.contains("XDG_RUNTIME_DIR")).collect();
    assert_eq!(ours.len(), 1, "exactly one error line expected:\n{err}");
    assert!(ours[0].contains(needle), "error should mention '{needle}': {}", ours[0]);
    assert!(!err.contains("panicked"), "{err}");
}

// ---- gradient checks ---------------------------------------------------------------------------

/// Run `g`, whose output `y` gets upstream gradient `dy`, and return the gradients of `wrt`.
pub fn gpu_grads(
    mut g: Graph,
    y: TensorId,
    dy: &[f32],
    inputs: &[(TensorId, Vec<f32>)],
    wrt: &[TensorId],
) -> Vec<Vec<f32>> {
    let shape = g.shape(y).to_vec();
    let seed = g.input("dy", &shape);
    let grads = sddpm_gpu::graph::backward(&mut g, y, seed, wrt, sddpm_gpu::ops::elementwise::add);
    let outs: Vec<TensorId> = wrt.iter().map(|t| grads[t]).collect();
    // Spike inputs are uploaded bit-packed, as the neurons write them.
    let upload = |t: TensorId, v: &[f32]| match g.info(t).dtype {
        sddpm_gpu::graph::DType::Spike => sddpm_gpu::graph::pack_spikes(v),
        _ => bits(v),
    };
    let mut all: Vec<(TensorId, Vec<u32>)> = inputs.iter().map(|(t, v)| (*t, upload(*t, v))).collect();
    all.push((seed, bits(dy)));
    run_graph(g, &all, &outs)
}

/// Check `grad` (analytic, of L = sum(dy * f(x))) against central differences at a few indices.
pub fn fd_check(what: &str, f: impl Fn(&[f32]) -> Vec<f32>, x: &[f32], dy: &[f32], grad: &[f32], h: f32, rtol: f32) {
    let loss = |x: &[f32]| f(x).iter().zip(dy).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
    let scale = grad.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let step = (x.len() / 7).max(1);
    for i in (0..x.len()).step_by(step).chain([x.len() - 1]) {
        let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
        xp[i] += h;
        xm[i] -= h;
        let num = ((loss(&xp) - loss(&xm)) / (2.0 * h as f64)) as f32;
        assert!(
            (num - grad[i]).abs() <= rtol * scale,
            "{what}[{i}]: finite difference {num}, analytic {}, scale {scale}",
            grad[i]
        );
    }
}
