//! `--model ddpm` through the command line: forward and train-step parity with fixtures-ddpm,
//! energy without a checkpoint (the paper's 6.350 G MACs / 29.2 mJ), profile listing the
//! GroupNorm and attention kernels, a short `train --model ddpm` run that resumes
//! bit-identically and samples, and one-line errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{assert_one_line_error, rel_l2, run, tmp};
use sddpm_gpu::checkpoint::TensorFile;

fn fx(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures-ddpm").join(name)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn forward_command_matches_pytorch_ddpm() {
    let out = tmp("ddpm_eps.safetensors");
    let w = fx("weights.safetensors");
    let f = fx("forward.safetensors");
    ok(&run(&["forward", "--checkpoint", p(&w), "--input", p(&f), "--output", p(&out)]));
    let got = TensorFile::load(&out).unwrap();
    let want = TensorFile::load(&f).unwrap();
    let err = rel_l2(&got.get("eps").unwrap().data, &want.get("eps").unwrap().data);
    assert!(err < 1e-5, "eps relative L2 {err:e}");
}

#[test]
fn train_step_command_matches_pytorch_ddpm() {
    let out = tmp("ddpm_after.safetensors");
    let (w, f) = (fx("weights.safetensors"), fx("train_step.safetensors"));
    let line = ok(&run(&["train-step", "--checkpoint", p(&w), "--input", p(&f), "--output", p(&out)]));
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    let want = TensorFile::load(&f).unwrap();
    let (loss, norm) = (want.get("loss").unwrap().data[0] as f64, want.get("grad_norm").unwrap().data[0] as f64);
    assert!((v["loss"].as_f64().unwrap() - loss).abs() < 1e-5 * loss, "{line}");
    assert!((v["grad_norm"].as_f64().unwrap() - norm).abs() < 1e-4 * norm, "{line}");
    let after = TensorFile::load(&out).unwrap();
    for name in ["middleblocks.0.attn.proj_q.weight", "downblocks.0.block1.0.weight", "tail.2.weight"] {
        let (got, exp) = (&after.get(name).unwrap().data, &want.get(&format!("after.{name}")).unwrap().data);
        let grad = &want.get(&format!("grad.{name}")).unwrap().data;
        for i in 0..got.len() {
            if grad[i].abs() >= 1e-6 {
                assert!((got[i] - exp[i]).abs() <= 2e-6, "{name}[{i}]: {} vs {}", got[i], exp[i]);
            }
        }
    }
    assert_eq!(after.get_ints("optim.step").unwrap().data[0], 1);
    // The written checkpoint says ddpm and loads for inference.
    assert_eq!(after.net(None).unwrap().kind(), "ddpm");
}

#[test]
fn energy_of_the_ann_counterpart_without_a_checkpoint() {
    let out = ok(&run(&["energy", "--model", "ddpm", "--preset", "cifar10", "--json"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let macs = v["total_macs"].as_u64().unwrap();
    assert_eq!(format!("{:.3}", macs as f64 / 1e9), "6.350");
    assert_eq!(format!("{:.1}", v["energy_ann_mj"].as_f64().unwrap()), "29.2");
    let table = ok(&run(&["energy", "--model", "ddpm", "--preset", "cifar10"]));
    assert!(table.contains("middleblocks.0.attn.bmm") && table.contains("29.209 mJ"), "{table}");
    let err = run(&["energy", "--model", "ddpm", "--preset", "cifar10", "--threshold", "0.9"]);
    assert_one_line_error(&err, "--threshold");
}

#[test]
fn profile_shows_groupnorm_and_attention_kernels() {
    let out = ok(&run(&[
        "profile", "--model", "ddpm", "--preset", "tiny", "--size", "16", "--batch", "2", "--iters", "1", "--train",
    ]));
    for kernel in [
        "groupnorm::gn_stats",
        "groupnorm::gn_apply",
        "groupnorm::gn_backward_input",
        "attention::attn_forward",
        "attention::attn_backward_q",
        "attention::attn_backward_kv",
    ] {
        let line = out.lines().find(|l| l.starts_with(kernel)).unwrap_or_else(|| panic!("{kernel} missing:\n{out}"));
        // calls, total ms, mean us, share, GFLOP/s, GB/s, %FLOP, %BW: GFLOP/s and GB/s come from
        // the node costs.
        let cols: Vec<f64> = line.split_whitespace().skip(1).map(|c| c.parse().unwrap()).collect();
        assert!(cols.len() == 8 && cols[3] > 0.0 && (cols[4] > 0.0 || cols[5] > 0.0), "{line}");
    }
    assert!(out.contains("ddpm"), "{out}");
}

#[test]
fn mismatched_ddpm_checkpoint_is_a_one_line_error() {
    let mut ckpt = TensorFile::load(&fx("weights.safetensors")).unwrap();
    ckpt.tensors.remove("upblocks.0.attn.proj_v.bias");
    let tensors: Vec<(String, Vec<usize>, sddpm_gpu::checkpoint::Data)> = ckpt
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone(), sddpm_gpu::checkpoint::Data::F32(&t.data)))
        .collect();
    let path = tmp("ddpm_broken.safetensors");
    sddpm_gpu::checkpoint::save(&path, tensors, ckpt.metadata.clone()).unwrap();
    let out =
        run(&["forward", "--checkpoint", p(&path), "--input", p(&fx("forward.safetensors")), "--output", p(&tmp("x"))]);
    assert_one_line_error(&out, "missing upblocks.0.attn.proj_v.bias");
}

/// `train --model ddpm` on the embedded MNIST subset at 8 px (tiny: ch 32, mult 1,2, attention
/// at level 1), batch 2: runs, resumes bit-identically, writes a sample grid, and its
/// checkpoint samples through `sample`.
#[test]
fn train_ddpm_resumes_bit_identically_and_samples() {
    let quick = |dir: &Path, steps: &str, resume: bool| {
        let mut args = vec!["train", "--steps", steps];
        if resume {
            args.extend_from_slice(&["--resume", p(dir)]);
        } else {
            args.extend_from_slice(&["--model", "ddpm", "--size", "8", "--batch", "2", "--sample-n", "0"]);
            args.extend_from_slice(&["--out", p(dir)]);
        }
        run(&args)
    };
    let (straight, halves) = (tmp("ddpm_straight"), tmp("ddpm_halves"));
    ok(&quick(&straight, "4", false));
    ok(&quick(&halves, "2", false));
    ok(&quick(&halves, "4", true));
    let config = std::fs::read_to_string(straight.join("config.json")).unwrap();
    assert!(config.contains("\"model\": \"ddpm\""), "{config}");
    let a = TensorFile::load(&straight.join("ckpt.safetensors")).unwrap();
    let b = TensorFile::load(&halves.join("ckpt.safetensors")).unwrap();
    assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &a.tensors {
        assert!(t.data.iter().zip(&b.tensors[name].data).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}");
    }
    let grid = tmp("ddpm_grid.png");
    let ckpt = straight.join("ckpt.safetensors");
    let args = ["sample", "--checkpoint", p(&ckpt), "--n", "2", "--sampler", "ddim", "--steps", "3", "--size", "8"];
    ok(&run(&[&args[..], &["--out", p(&grid)]].concat()));
    assert!(grid.exists());
    let out = run(&[&args[..], &["--threshold", "0.99", "--out", p(&grid)]].concat());
    assert_one_line_error(&out, "--threshold");
}

#[test]
fn snn_only_flags_are_refused_for_ddpm() {
    let out = run(&["train", "--model", "ddpm", "--snn-steps", "2", "--steps", "1"]);
    assert_one_line_error(&out, "--snn-steps");
    let out = run(&["train", "--model", "ann", "--steps", "1"]);
    assert_one_line_error(&out, "--model");
}

#[test]
fn train_ddpm_on_embedded_mnist_learns() {
    // The tiny ANN at 8 px, batch 4, lr 2e-3: eps-MSE starts near 1 (the tail conv's 1e-5 gain
    // makes eps ~ 0) and falls to ~0.2 within a few dozen steps.
    let dir = tmp("ddpm_learn");
    let args = ["train", "--model", "ddpm", "--size", "8", "--batch", "4", "--steps", "16", "--lr", "2e-3"];
    ok(&run(&[&args[..], &["--sample-n", "0", "--out", p(&dir)]].concat()));
    let csv = std::fs::read_to_string(dir.join("loss.csv")).unwrap();
    let losses: Vec<f64> = csv.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), 16, "{csv}");
    let (first, last) = (losses[..4].iter().sum::<f64>() / 4.0, losses[12..].iter().sum::<f64>() / 4.0);
    assert!(last < 0.7 * first, "loss must fall: first 4 average {first}, last 4 average {last}\n{csv}");
}
