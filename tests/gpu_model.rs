//! The GPU model of the dry run (src/gpu_model.rs): its arithmetic on hand-computed cases, its
//! reflection of launch shapes, its choice of variants, `profile --dry-run --gpu-model`'s JSON and
//! errors, and the dispatch lints it serves over the cifar10 training step and sampling evaluation
//! at batch 32 (planned without a GPU, every node on the variant the model picks for an H100).

mod common;

use common::*;
use sddpm_gpu::diffusion::{train_graph, TrainOptions};
use sddpm_gpu::gpu_model::{self, fill, kind_of, resident_per_sm, time_us, Reflector, Report, GPUS};
use sddpm_gpu::graph::{Graph, TileWork};
use sddpm_gpu::model::{eval_graph, Net};
use sddpm_gpu::ops::{conv, elementwise};

/// Two workgroups per SM of a 132-SM card (an H100 SXM).
const WIDE: u64 = 264;
/// A dispatch moving more than this, or doing more than `LARGE_FLOPS`, must be wide.
const LARGE_BYTES: u64 = 4_000_000;
const LARGE_FLOPS: u64 = 1_000_000_000;
/// Most dispatches a step may take.
const MAX_DISPATCHES: usize = 900;

fn h100() -> &'static gpu_model::GpuSpec {
    gpu_model::spec("h100").unwrap()
}

fn cifar10() -> Net {
    Net::preset("sddpm", "cifar10").unwrap()
}

/// (what, graph, the model's report on an H100) of the cifar10 training step and sampling
/// evaluation at batch 32.
fn cifar10_graphs() -> Vec<(&'static str, Graph, Report)> {
    let mut train = train_graph(&cifar10(), 32, 32, &TrainOptions::default()).unwrap();
    let (mut sample, _, _, unet) = eval_graph(cifar10(), 32, 32, 1.0).unwrap();
    sample.mark_output(unet.eps);
    let rt = gpu_model::report(&mut train, h100());
    let rs = gpu_model::report(&mut sample, h100());
    vec![("training step", train, rt), ("sampling evaluation", sample, rs)]
}

fn close(got: f64, want: f64) -> bool {
    (got - want).abs() <= 1e-9 * want.abs().max(1.0)
}

#[test]
fn occupancy_fill_and_time_match_a_hand_computation() {
    let h = h100();
    let streaming = kind_of(None);
    assert_eq!((streaming.efficiency, streaming.registers), (0.5, 32));
    // 256 invocations, no workgroup memory: 2048 / 256 = 8 by threads, 65536 / (256 * 32) = 8 by
    // registers, 32 by the workgroup cap -> 8 per SM, 1056 slots on 132 SMs.
    assert_eq!(resident_per_sm(h, 256, 0, 32), 8);
    assert!(close(fill(h, 2112, 8), 1.0));
    // One workgroup past a full wave: a second wave, half full.
    assert!(close(fill(h, 1057, 8), 1057.0 / 2112.0));
    assert!(close(fill(h, 132, 8), 0.125));
    // 268 MB streamed: 2.68e8 / (3350e9 * 0.8) s = 100 us, + 3 us launch.
    assert!(close(time_us(h, &streaming, 0, 268_000_000, 1.0, 1.0), 103.0));
    assert!(close(time_us(h, &streaming, 0, 268_000_000, 1.0, 0.5), 203.0));
    // A db tile (64 invocations, 8 KiB, 128 registers): 65536 / (64 * 128) = 8 by registers,
    // 233472 / 8192 = 28 by memory, 32 by threads -> 8.
    let db = conv::forward_db_variants(2, 256, 4, 4, 256 * 256 * 9).remove(0);
    let kind = kind_of(Some(&db));
    assert_eq!((db.name.as_str(), kind.efficiency, kind.registers), ("db64x64", 0.35, 128));
    assert_eq!(resident_per_sm(h, 64, 8192, 128), 8);
    // 1e10 useful FLOPs at 50% tile utilisation: 2e10 / (66.9e12 * 0.35) s = 854.15 us, + 3.
    let want = 3.0 + 1e6 * 2e10 / (66.9e12 * 0.35);
    assert!(close(time_us(h, &kind, 10_000_000_000, 1000, 0.5, 1.0), want));
    // The larger of compute and memory counts, not their sum.
    assert!(close(time_us(h, &kind, 10_000_000_000, 268_000_000, 0.5, 1.0), want));
}

#[test]
fn tile_work_of_the_conv_variants_matches_a_hand_count() {
    // 4x4 output, 256 channels, 2 images: db64x64 launches [ceil(16 / 64), 256 / 64, 2] = 8
    // tiles of 64 x 64 = 32768 outputs for 2 * 256 * 16 = 8192 useful ones.
    let db = conv::forward_db_variants(2, 256, 4, 4, 256 * 256 * 9);
    assert_eq!(db[0].workgroups, [1, 4, 2]);
    assert_eq!(db[0].tile, Some(TileWork { useful_outputs: 8192, computed_outputs: 32768 }));
    assert!(close(db[0].tile.unwrap().utilization(), 0.25));
    // 128x128 tiles: [1, 2, 2] = 4 tiles of 16384 outputs, 12.5% useful (issue 16's "88% zeros").
    assert_eq!(db[1].workgroups, [1, 2, 2]);
    assert_eq!(db[1].tile, Some(TileWork { useful_outputs: 8192, computed_outputs: 65536 }));
    // Odd sizes: 5x5 output, 3 channels, 1 image. r8x4: 5 rows x 2 column groups = 10 of the 64
    // invocations, 1 channel block of 8: 64 * 8 * 4 = 2048 computed for 75 useful.
    let v = conv::forward_variants(1, 3, 5, 5);
    assert_eq!(v[0].tile, Some(TileWork { useful_outputs: 75, computed_outputs: 2048 }));
    // igemm32: ceil(25 / 32) x ceil(3 / 32) = 1 tile of 1024.
    assert_eq!(v[1].tile, Some(TileWork { useful_outputs: 75, computed_outputs: 1024 }));
    // Weight gradient, Cout 5, Cin 7, 3x3, 2 parts (each computes all 5 * 7 * 9 sums): r4xkk
    // [1, 2, 2] workgroups of 64 * 4 * 9 = 2304; igemm32 [ceil(63 / 32), 1, 2] of 1024.
    let w = conv::grad_weight_variants(5, 7, 3, 2);
    assert_eq!(w[0].tile, Some(TileWork { useful_outputs: 630, computed_outputs: 4 * 2304 }));
    assert_eq!(w[1].tile, Some(TileWork { useful_outputs: 630, computed_outputs: 4 * 1024 }));
}

#[test]
fn a_dispatch_estimate_reads_its_launch_from_the_shader() {
    // One elementwise add of 2^20 values: elementwise.wgsl's 256-invocation workgroups, 4096 of
    // them, 12 bytes per value; the estimate is the hand-computed streaming time.
    let n = 1 << 20;
    let mut g = Graph::new();
    let a = g.input("a", &[n]);
    let b = g.input("b", &[n]);
    elementwise::add(&mut g, a, b, "sum");
    let h = h100();
    let r = gpu_model::report(&mut g, h);
    assert_eq!(r.dispatches.len(), 1);
    let d = &r.dispatches[0];
    assert_eq!((d.kernel.as_str(), d.invocations, d.workgroup_bytes, d.workgroups), ("elementwise::add", 256, 0, 4096));
    assert_eq!((d.flops, d.bytes, d.tile_utilization), (n as u64, 12 * n as u64, 1.0));
    // 4096 workgroups on 1056 slots: 4 waves, fill 4096 / 4224.
    let f = 4096.0 / 4224.0;
    assert!(close(d.fill, f), "{}", d.fill);
    let want = 3.0 + 1e6 * (12.0 * n as f64 / (3350e9 * 0.8)) / f;
    assert!(close(d.est_us, want), "{} vs {want}", d.est_us);
    assert!(close(r.est_total_ms, want * 1e-3));
}

#[test]
fn reflected_launch_shapes_match_what_the_variants_declare() {
    // Workgroup sizes and memory come from naga, overrides resolved with each variant's
    // constants; a variant that declares them must agree (a disagreement is a bug on one side).
    let (_, g, _) = cifar10_graphs().remove(0);
    let mut reflect = Reflector::new();
    let mut checked = 0;
    for (i, t) in &g.variants {
        for v in &t.candidates {
            let shader = v.shader.unwrap_or(t.shader);
            let got = reflect.launch(shader, v.entry, &v.constants);
            let (inv, bytes) = got.unwrap_or_else(|| panic!("node {i}: {}::{} not reflected", shader.name, v.entry));
            if v.needs.invocations != 0 {
                assert_eq!(inv, v.needs.invocations, "{}::{} {}", shader.name, v.entry, v.name);
                checked += 1;
            }
            if v.needs.workgroup_bytes != 0 {
                assert_eq!(bytes, v.needs.workgroup_bytes, "{}::{} {}", shader.name, v.entry, v.name);
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked} declared shapes checked");
}

#[test]
fn every_tunable_node_runs_the_candidate_the_model_predicts_fastest() {
    for (what, g, r) in cifar10_graphs() {
        let mut tunable = 0;
        for (i, t) in &g.variants {
            let d = &r.dispatches[*i];
            assert_eq!(d.candidates.len(), t.candidates.len(), "{what} {}", d.label);
            let best = d.candidates.iter().filter(|c| c.runs).map(|c| c.est_us).fold(f64::INFINITY, f64::min);
            assert_eq!(d.variant.as_deref(), Some(t.variant().name.as_str()));
            assert!(close(d.est_us, best), "{what} {}: chose {:?} at {} us, best {best}", d.label, d.variant, d.est_us);
            tunable += 1;
        }
        assert!(tunable > 60, "{what}: {tunable} tunable nodes");
    }
}

#[test]
fn a_card_without_cooperative_matrices_never_gets_a_coop_variant() {
    let m2 = gpu_model::spec("m2").unwrap();
    let coop = sddpm_gpu::ops::coop_matmul::INSTANCES
        .iter()
        .zip(&sddpm_gpu::ops::coop_matmul::SHADERS)
        .map(|(inst, sh)| {
            sddpm_gpu::ops::coop_matmul::variant(inst, sh, 64, 64, [sddpm_gpu::ops::coop_matmul::Operand::Split; 2])
        })
        .collect::<Vec<_>>();
    assert!(!coop.is_empty());
    for v in &coop {
        assert!(!gpu_model::runs_on(m2, v), "{}", v.name);
        assert!(gpu_model::runs_on(h100(), v) == h100().coop_sizes.contains(&v.needs.coop), "{}", v.name);
    }
}

#[test]
fn the_table_has_every_card_with_plausible_numbers() {
    let names: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
    for want in ["h100", "a100", "rtx4090", "m2"] {
        assert!(names.contains(&want), "{names:?}");
    }
    for g in &GPUS {
        assert!(g.sms > 0 && g.fp32_tflops > 1.0 && g.f16_tensor_tflops >= g.fp32_tflops, "{}", g.name);
        assert!(g.bandwidth_gbs > 50.0 && g.workgroup_memory_per_workgroup <= g.workgroup_memory_per_sm, "{}", g.name);
        assert!(g.max_threads_per_sm >= 1024 && g.launch_us > 0.0, "{}", g.name);
    }
}

#[test]
fn json_has_the_documented_shape_and_adds_up() {
    let out =
        run(&["profile", "--dry-run", "--gpu-model", "a100", "--preset", "tiny", "--train", "--batch", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.trim().lines().count(), 1, "one JSON object:\n{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["gpu_model"], "a100");
    let d = v["dispatches"].as_array().unwrap();
    assert!(d.len() > 50, "{} dispatches", d.len());
    let mut sum = 0.0;
    for x in d {
        for key in
            ["kernel", "layer", "workgroups", "invocations", "workgroup_bytes", "tile_utilization", "flops", "bytes"]
        {
            assert!(!x[key].is_null(), "{key} missing: {x}");
        }
        assert!(x["variant"].is_string() || x["variant"].is_null(), "{x}");
        let u = x["tile_utilization"].as_f64().unwrap();
        assert!(u > 0.0 && u <= 1.0, "{x}");
        let us = x["est_us"].as_f64().unwrap();
        assert!(us >= 3.0, "at least the launch: {x}");
        sum += us;
    }
    let total = v["est_total_ms"].as_f64().unwrap();
    assert!((total - sum * 1e-3).abs() <= 1e-9 * total, "{total} vs {}", sum * 1e-3);
    // The same graph as the plain dry run: as many dispatches.
    let plain = run(&["profile", "--dry-run", "--preset", "tiny", "--train", "--batch", "2"]);
    let plain = String::from_utf8_lossy(&plain.stdout);
    let line = plain.lines().find(|l| l.starts_with("work per iteration")).unwrap();
    assert!(line.ends_with(&format!(" {} dispatches", d.len())), "{line}");
}

#[test]
fn the_text_report_is_labelled_an_estimate_and_has_the_three_tables() {
    let out = run(&["profile", "--dry-run", "--gpu-model", "m2", "--preset", "tiny", "--batch", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.starts_with("dry run") && s.contains("GPU MODEL ESTIMATE for Apple M2"), "{s}");
    for header in ["dispatch (label) ", "kernel ", "layer "] {
        let h = s.lines().find(|l| l.starts_with(header)).unwrap_or_else(|| panic!("{header} table:\n{s}"));
        for col in ["variant", "workgroups", "inv", "wg B", "util", "MFLOP", "MB", "est us"] {
            assert!(h.contains(col), "{h}");
        }
    }
    let total = s.lines().find(|l| l.starts_with("estimated step total")).expect("total line");
    assert!(total.contains("MODEL ESTIMATE, not measured") && total.contains(" ms;"), "{total}");
    assert!(s.lines().any(|l| l.starts_with("memory: intermediates")), "{s}");
}

#[test]
fn cli_errors_are_one_line() {
    let out = run(&["profile", "--dry-run", "--gpu-model", "v100", "--preset", "tiny"]);
    assert_one_line_error(&out, "v100");
    let err = String::from_utf8_lossy(&out.stderr);
    for name in ["h100", "a100", "rtx4090", "m2"] {
        assert!(err.contains(name), "the error lists the known models: {err}");
    }
    // The model estimates a planned graph: it needs --dry-run, and --json needs the model.
    let out = run(&["profile", "--gpu-model", "h100", "--preset", "tiny"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--dry-run"));
    let out = run(&["profile", "--dry-run", "--json", "--preset", "tiny"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--gpu-model"));
}

#[test]
fn a_step_takes_at_most_900_dispatches() {
    for (what, g, _) in cifar10_graphs() {
        assert!(g.nodes.len() <= MAX_DISPATCHES, "{what}: {} dispatches", g.nodes.len());
    }
}

/// The dispatches of `r` that move more than 4 MB or do more than 1 GFLOP on fewer than 264
/// workgroups, other than a reduction's final stage (entry `*_final`, as tests/bandwidth.rs).
fn narrow(r: &Report, conv: bool) -> Vec<String> {
    r.dispatches
        .iter()
        .filter(|d| gpu_model::is_conv(d) == conv && (d.bytes > LARGE_BYTES || d.flops > LARGE_FLOPS))
        .filter(|d| d.workgroups < WIDE && !d.kernel.ends_with("_final"))
        .map(|d| {
            format!(
                "{}@{} '{}': {} workgroups, {:.1} MB, {:.2} GFLOP",
                d.kernel,
                d.variant.as_deref().unwrap_or("-"),
                d.label,
                d.workgroups,
                d.bytes as f64 * 1e-6,
                d.flops as f64 * 1e-9
            )
        })
        .collect()
}

#[test]
fn every_large_non_conv_dispatch_fills_a_large_gpu() {
    for (what, _, r) in cifar10_graphs() {
        let bad = narrow(&r, false);
        assert!(bad.is_empty(), "{what}: {} narrow dispatches:\n{}", bad.len(), bad.join("\n"));
    }
}

/// The conv lints of issue 16 (the GEMM core's "done when"): every large conv dispatch is wide,
/// the conv dispatches' FLOP-weighted tile utilisation is at least 85%, and none carrying more
/// than 1% of the step's FLOPs is under 75%. All violations of both graphs are reported at once.
/// Expected to fail until the core folds the batch into the GEMM's N (tile utilisation at 4x4)
/// and the weight-gradient reduce is wide.
#[test]
#[ignore = "fails on today's conv kernels (4x4 convs at 25% tile utilisation, narrow weight-gradient reduces); un-ignored when the GEMM core of issue 16 lands"]
fn conv_dispatches_fill_a_large_gpu_with_useful_tiles() {
    let mut failures = Vec::new();
    for (what, _, r) in cifar10_graphs() {
        for n in narrow(&r, true) {
            failures.push(format!("{what}: narrow: {n}"));
        }
        let t = r.totals();
        if t.conv_utilization < 0.85 {
            failures
                .push(format!("{what}: FLOP-weighted conv tile utilisation {:.1}% < 85%", 100.0 * t.conv_utilization));
        }
        for d in r.dispatches.iter().filter(|d| gpu_model::is_conv(d)) {
            let share = d.flops as f64 / t.flops as f64;
            if share > 0.01 && d.tile_utilization < 0.75 {
                failures.push(format!(
                    "{what}: {}@{} '{}' carries {:.2}% of the FLOPs at {:.1}% tile utilisation",
                    d.kernel,
                    d.variant.as_deref().unwrap_or("-"),
                    d.label,
                    100.0 * share,
                    100.0 * d.tile_utilization
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} conv lint failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn compare_pairs_a_measured_trace_with_the_model() {
    // The model half of tools/gpu_check.sh, on lavapipe: a measured trace beside the model.
    let trace = tmp("gpu-model-trace.json");
    let net = ["--preset", "tiny", "--batch", "1", "--size", "16"];
    let out = bin().args(["profile", "--iters", "2"]).args(net).arg("--trace").arg(&trace).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let all = v["traceEvents"].as_array().unwrap();
    let events: Vec<&serde_json::Value> = all.iter().filter(|e| e["args"]["iteration"] == 0).collect();
    assert_eq!(all.len(), 2 * events.len());
    // The mean of the two iterations.
    let want_ms: f64 = all.iter().map(|e| e["dur"].as_f64().unwrap()).sum::<f64>() * 1e-3 / 2.0;

    let out = bin()
        .args(["profile", "--dry-run", "--gpu-model", "h100"])
        .args(net)
        .arg("--compare-trace")
        .arg(&trace)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("an ESTIMATE") && s.contains("MEASURED"), "{s}");
    // The kernel table: its calls are the trace's events, its measured column their times.
    let rows: Vec<Vec<&str>> = s
        .lines()
        .skip_while(|l| !l.starts_with("kernel (measured)"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(rows.len() > 5, "{s}");
    let calls: usize = rows.iter().map(|r| r[1].parse::<usize>().unwrap()).sum();
    assert_eq!(calls, events.len());
    let measured: f64 = rows.iter().map(|r| r[2].parse::<f64>().unwrap()).sum();
    assert!((measured - want_ms).abs() <= 5e-4 * rows.len() as f64, "{measured} vs {want_ms}");
    assert!(rows.iter().any(|r| r[0] == "conv::conv2d@r8x4" || r[0].starts_with("conv::conv2d_igemm")), "{s}");
    let total = s.lines().find(|l| l.starts_with("total: measured")).expect("total line");
    let ms: f64 = total.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert!((ms - want_ms).abs() < 1e-3, "{total} vs {want_ms}");

    // A trace of another batch does other work per dispatch: a one-line error, not a table.
    let out = run(&[
        "profile",
        "--dry-run",
        "--gpu-model",
        "h100",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--size",
        "16",
        "--compare-trace",
        trace.to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "--batch");
    let out = run(&[
        "profile",
        "--dry-run",
        "--gpu-model",
        "h100",
        "--preset",
        "tiny",
        "--compare-trace",
        "/nonexistent/trace.json",
    ]);
    assert_one_line_error(&out, "/nonexistent/trace.json");
}

#[test]
fn gpu_check_model_half_runs_here() {
    // tools/gpu_check.sh's model section on lavapipe: each measured profile's total reappears
    // as the measured side of the model's table (the script pairs the right trace and net).
    let out_dir = tmp("gpu-check-model");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out =
        std::process::Command::new("bash").args(["tools/gpu_check.sh", "model"]).env("OUT", &out_dir).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}\n{}", String::from_utf8_lossy(&out.stderr));
    let profiled: Vec<f64> = s
        .lines()
        .filter(|l| l.starts_with("total: ") && l.contains(" ms per iteration"))
        .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
        .collect();
    let compared: Vec<f64> = s
        .lines()
        .filter(|l| l.starts_with("total: measured "))
        .map(|l| l.split_whitespace().nth(2).unwrap().parse().unwrap())
        .collect();
    assert_eq!(profiled.len(), 2, "an evaluation and a training profile:\n{s}");
    assert_eq!(compared.len(), 2, "{s}");
    for (p, c) in profiled.iter().zip(&compared) {
        assert!((p - c).abs() < 2e-3, "profile says {p} ms, the comparison {c} ms:\n{s}");
    }
}
