//! `profile` tables and trace, the timestamp fallback, and `energy` firing rates.

mod common;

use common::*;
use sddpm_gpu::checkpoint::Checkpoint;
use sddpm_gpu::energy::SpikeCounter;
use sddpm_gpu::profile::layer_of;

/// The share% column of the table starting with `header` (five columns from the right: share%,
/// GFLOP/s, GB/s, %FLOP, %BW).
fn shares(stdout: &str, header: &str) -> Vec<f64> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with(header))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().rev().nth(4).unwrap().parse::<f64>().unwrap())
        .collect()
}

#[test]
fn profile_prints_tables_that_add_up_and_a_trace() {
    let trace = common::tmp("trace.json");
    let out = bin()
        .args(["profile", "--preset", "tiny", "--batch", "1", "--size", "16", "--iters", "2", "--trace"])
        .arg(&trace)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for kernel in ["conv::conv2d", "neuron::neuron_forward", "batchnorm::bn_eval"] {
        assert!(stdout.contains(kernel), "{kernel} missing:\n{stdout}");
    }
    for layer in ["downblocks.0.conv1", "downblocks.0.neuron1", "T_output_layer"] {
        assert!(stdout.contains(layer), "{layer} missing:\n{stdout}");
    }
    for header in ["kernel", "layer"] {
        let s = shares(&stdout, header);
        assert!(s.len() > 5, "{header} table too short");
        let total: f64 = s.iter().sum();
        assert!((total - 100.0).abs() < 0.5, "{header} shares add to {total}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("memory: intermediates")), "memory line:\n{stdout}");
    // % of the measured peak: both columns, a number (not "-") on the conv row, and the peak line.
    let header = stdout.lines().find(|l| l.starts_with("kernel ")).unwrap();
    assert!(header.ends_with("%FLOP     %BW"), "{header}");
    let conv = stdout.lines().find(|l| l.starts_with("conv::conv2d")).unwrap();
    let pct: Vec<f64> = conv.split_whitespace().rev().take(2).map(|v| v.parse().unwrap()).collect();
    assert!(pct.iter().all(|&v| v > 0.0), "{conv}");
    let peak = stdout.lines().find(|l| l.starts_with("peak: ")).expect("peak line");
    assert!(peak.contains("GFLOP/s") && peak.contains("GB/s"), "{peak}");
    let total_line = stdout.lines().find(|l| l.starts_with("total:")).expect("totals");
    let dispatches: usize = total_line
        .split(", ")
        .find(|p| p.contains("dispatches"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).expect("trace is JSON");
    let events = json["traceEvents"].as_array().unwrap();
    assert_eq!(events.len(), 2 * dispatches, "one event per dispatch per iteration");
    assert!(events.iter().all(|e| e["ph"] == "X" && e["dur"].as_f64().unwrap() >= 0.0 && e["name"].is_string()));
}

#[test]
fn profile_without_timestamps_falls_back_with_a_notice() {
    let out = bin()
        .args([
            "profile",
            "--preset",
            "tiny",
            "--batch",
            "1",
            "--size",
            "16",
            "--iters",
            "1",
            "--train",
            "--host-timers",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timestamp queries are not available") && stderr.contains("host timers"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("conv::conv2d_grad_weight") && stdout.contains("optim::adam") && stdout.contains("host timers")
    );
    assert!(stdout.contains("optimizer"), "optimizer layer row:\n{stdout}");
}

#[test]
fn dispatch_labels_map_to_official_modules() {
    assert_eq!(layer_of("downblocks.0.conv1.grad_weight_reduce"), "downblocks.0.conv1");
    assert_eq!(layer_of("downblocks.0.bn1.stats"), "downblocks.0.bn1");
    assert_eq!(layer_of("upblocks.3.concat"), "upblocks.3");
    assert_eq!(layer_of("upblocks.3.concat.grad_a"), "upblocks.3");
    assert_eq!(layer_of("middleblocks.1.temb_add.grad_bias"), "middleblocks.1");
    assert_eq!(layer_of("adam.conv.weight"), "optimizer");
    assert_eq!(layer_of("T_output_layer"), "T_output_layer");
}

#[test]
fn energy_firing_rates_equal_a_cpu_count() {
    let ckpt = Checkpoint::load(&fixture("weights.safetensors")).unwrap();
    let cfg = ckpt.config(None).unwrap();
    let (batch, size) = (2, 16);
    let mut r = rng(90);
    let x = normalish(&mut r, batch * cfg.img_ch * size * size, 1.0);
    let counter = SpikeCounter::new(ctx(), &cfg, &ckpt, batch, size, 1.0, true).unwrap();
    let report = counter.measure(ctx(), &x, &[999, 10]).unwrap();
    // Stem 1 + 8 ResBlocks x 2 (2 down, 2 middle, 4 up) + 1 Down + 1 Up.
    assert_eq!(report.layers.len(), 19, "spiking layers of the fixture net");
    for l in &report.layers {
        let spikes = counter.spikes(ctx(), &l.name).unwrap();
        assert!(spikes.iter().all(|&s| s == 0.0 || s == 1.0));
        let rate = spikes.iter().filter(|&&s| s == 1.0).count() as f64 / spikes.len() as f64;
        assert_eq!(l.firing_rate, rate, "{}", l.name);
        assert_eq!(l.sops, rate * cfg.snn_steps as f64 * l.macs as f64);
    }
    assert!(report.layers.iter().any(|l| l.firing_rate > 0.0));
    let sops: f64 = report.layers.iter().map(|l| l.sops).sum();
    let want = (4.6 * report.first_conv_macs as f64 * cfg.snn_steps as f64 + 0.9 * sops) * 1e-9;
    assert!((report.energy_snn_mj - want).abs() < 1e-12);
    assert!((report.energy_ann_mj - 4.6e-9 * report.total_macs as f64).abs() < 1e-12);
    // Guidance below 1 fires more.
    let lower = SpikeCounter::new(ctx(), &cfg, &ckpt, batch, size, 0.9, false).unwrap();
    assert!(lower.measure(ctx(), &x, &[999, 10]).unwrap().total_sops > report.total_sops);
}

#[test]
fn energy_json_lists_every_layer() {
    let out = bin()
        .args(["energy", "--checkpoint"])
        .arg(fixture("weights.safetensors"))
        .args(["--n", "1", "--size", "16", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let layers = v["layers"].as_array().unwrap();
    assert!(layers.iter().any(|l| l["name"] == "downblocks.0.neuron1"));
    for l in layers {
        for key in ["name", "firing_rate", "macs", "sops"] {
            assert!(!l[key].is_null(), "{key} missing in {l}");
        }
    }
    assert!(v["energy_snn_mj"].as_f64().unwrap() > 0.0 && v["energy_ann_mj"].as_f64().unwrap() > 0.0);
}

#[test]
fn energy_counts_attention_layers() {
    let ckpt = Checkpoint::load(&fixture_in("fixtures-attn", "weights.safetensors")).unwrap();
    let cfg = ckpt.config(None).unwrap();
    let (batch, size) = (1, 16);
    let x = normalish(&mut rng(91), batch * cfg.img_ch * size * size, 1.0);
    let counter = SpikeCounter::new(ctx(), &cfg, &ckpt, batch, size, 1.0, true).unwrap();
    let report = counter.measure(ctx(), &x, &[500]).unwrap();
    // The 19 spiking layers of the base net + 5 per attention (downblocks.2, upblocks.0, .1).
    assert_eq!(report.layers.len(), 19 + 3 * 5, "spiking layers of the attention fixture net");
    for l in &report.layers {
        let spikes = counter.spikes(ctx(), &l.name).unwrap();
        let rate = spikes.iter().filter(|&&s| s == 1.0).count() as f64 / spikes.len() as f64;
        assert_eq!(l.firing_rate, rate, "{}", l.name);
        assert_eq!(l.sops, rate * cfg.snn_steps as f64 * l.macs as f64, "{}", l.name);
    }
    let layer = |name: &str| report.layers.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("{name} missing"));
    // Level 1 of the fixture: 32 channels at 8x8, 2 heads of d = 16.
    let (c, n, d) = (32u64, 64u64, 16u64);
    let input = layer("downblocks.2.attn.neuron");
    assert_eq!(input.macs, 3 * c * c * n, "the input neuron feeds the q, k and v 1x1 convs");
    assert!(input.feeds.contains("downblocks.2.attn.k_conv"), "{}", input.feeds);
    for (neuron, product) in [("q_neuron", "qkv"), ("k_neuron", "kv")] {
        let l = layer(&format!("upblocks.1.attn.{neuron}"));
        assert_eq!((l.feeds.as_str(), l.macs), (format!("upblocks.1.attn.{product}").as_str(), n * d * c));
    }
    assert_eq!(layer("upblocks.0.attn.v_neuron").macs, 0, "v is the operand k gates, not charged twice");
    assert_eq!(layer("upblocks.0.attn.attn_neuron").feeds, "upblocks.0.attn.proj_conv");
    assert!(layer("upblocks.0.attn.neuron").firing_rate > 0.0);
}

#[test]
fn profile_and_energy_show_attention_by_module_path() {
    let ckpt = fixture_in("fixtures-attn", "weights.safetensors");
    let trace = tmp("attn-trace.json");
    let out = bin()
        .args(["profile", "--batch", "1", "--size", "16", "--iters", "1", "--train", "--trace"])
        .arg(&trace)
        .arg("--checkpoint")
        .arg(&ckpt)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Every attention kernel, forward and backward, is in the table and carries its FLOPs and
    // bytes (read from the trace: the table's rates are rounded and, on a loaded CPU adapter,
    // can print as 0.00).
    let events: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    for kernel in ["attention_kv", "attention_out", "attention_grad_m", "attention_grad_qkv"] {
        let name = format!("spike_attention::{kernel}");
        assert!(stdout.lines().any(|l| l.starts_with(&format!("{name} "))), "{kernel} missing:\n{stdout}");
        let costs: Vec<(u64, u64)> = events["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"].as_str().is_some_and(|n| n == name || n.starts_with(&format!("{name}@"))))
            .map(|e| (e["args"]["flops"].as_u64().unwrap(), e["args"]["bytes"].as_u64().unwrap()))
            .collect();
        assert!(!costs.is_empty() && costs.iter().all(|&(f, b)| f > 0 && b > 0), "costs of {kernel}: {costs:?}");
    }
    for layer in
        ["downblocks.2.attn.kv ", "upblocks.1.attn.qkv ", "upblocks.0.attn.q_conv ", "upblocks.0.attn.attn_neuron "]
    {
        assert!(stdout.lines().any(|l| l.starts_with(layer)), "layer {layer} missing:\n{stdout}");
    }
    // A preset with attention asked for on the command line.
    let args = ["profile", "--preset", "tiny", "--attn", "0,1", "--heads", "2", "--batch", "1", "--size", "8"];
    let out = bin().args(args).args(["--iters", "1"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 8 px: level 0 (N = 64 >= d = 8) takes the [d, d] form, level 1 (N = 16 == d) too.
    for layer in ["downblocks.0.attn.kv ", "upblocks.4.attn.qkv ", "upblocks.0.attn.kv "] {
        assert!(stdout.lines().any(|l| l.starts_with(layer)), "layer {layer} missing:\n{stdout}");
    }
    let out = bin().args(["energy", "--n", "1", "--size", "16", "--json", "--checkpoint"]).arg(&ckpt).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let names: Vec<&str> = v["layers"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    for name in ["downblocks.2.attn.neuron", "downblocks.2.attn.q_neuron", "upblocks.1.attn.attn_neuron"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
}

fn memory_line(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.starts_with("memory: "))
        .unwrap_or_else(|| panic!("no memory line:\n{stdout}"))
        .to_string()
}

/// The number before " MiB" or " GiB" after `key` in a memory line, in MiB.
fn mib_after(line: &str, key: &str) -> f64 {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} missing: {line}")) + key.len()..];
    let mut words = rest.split_whitespace();
    let v: f64 = words.next().unwrap().trim_end_matches(',').parse().unwrap();
    if words.next().unwrap().starts_with("GiB") {
        v * 1024.0
    } else {
        v
    }
}

#[test]
fn dry_run_plans_without_running_and_matches_the_real_plan() {
    let args = ["profile", "--preset", "tiny", "--batch", "2", "--size", "16", "--iters", "1"];
    let real = run(&args);
    assert!(real.status.success(), "{}", String::from_utf8_lossy(&real.stderr));
    let dry = run(&[&args[..], &["--dry-run"]].concat());
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let (real, dry) = (String::from_utf8_lossy(&real.stdout), String::from_utf8_lossy(&dry.stdout));
    assert!(dry.starts_with("dry run") && dry.contains("neuron::neuron_forward") && dry.contains("GB moved"), "{dry}");
    let (lr, ld) = (memory_line(&real), memory_line(&dry));
    // The same plan: only the node-parameter buffer's alignment may differ (the adapter's vs 256).
    for key in ["intermediates ", "naive ", "inputs + parameters + state ", "staging "] {
        assert_eq!(mib_after(&lr, key), mib_after(&ld, key), "{key}:\n{lr}\n{ld}");
    }
    let parts = ["intermediates ", "inputs + parameters + state ", "staging ", "node parameters "];
    let sum: f64 = parts.iter().map(|k| mib_after(&ld, k)).sum();
    assert!((mib_after(&ld, "total ") - sum).abs() < 0.02, "total is the sum of the parts: {ld}");
}

#[test]
fn dry_run_plans_the_paper_net_at_any_batch() {
    // cifar10 training at batch 32 needs GiBs and bindings past lavapipe's 128 MiB: planned,
    // reported, never allocated.
    let out = run(&["profile", "--preset", "cifar10", "--train", "--batch", "32", "--dry-run"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = memory_line(&stdout);
    assert!(line.contains("GiB"), "{line}");
    assert!(stdout.contains("largest storage bindings"), "{stdout}");
    assert!(stdout.contains("conv::conv2d_grad_weight") && stdout.contains("optim::adam"), "{stdout}");
}

#[test]
fn oversized_batch_is_a_one_line_error_naming_the_flag() {
    let start = std::time::Instant::now();
    let out = run(&["sample", "--preset", "cifar10", "--n", "20000", "--batch", "20000", "--out", "/dev/null"]);
    assert_one_line_error(&out, "--batch");
    let out = run(&["profile", "--preset", "cifar10", "--train", "--batch", "20000", "--dry-run"]);
    assert_one_line_error(&out, "--batch");
    assert!(start.elapsed().as_secs() < 60, "must fail while building the graph, not after allocating");
}
