//! `train` and `train-step` end to end: parity through the command, a run folder, resume
//! determinism, and one-line errors for bad data.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{assert_one_line_error, bin, fixture, fixture_in, run, tmp};
use sddpm_gpu::checkpoint::TensorFile;

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn train_step_command_matches_reference() {
    let out_path = tmp("after.safetensors");
    let out = run(&[
        "train-step",
        "--checkpoint",
        fixture("weights.safetensors").to_str().unwrap(),
        "--input",
        fixture("train_step.safetensors").to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
    ]);
    let line = ok(&out);
    let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
    let fx = TensorFile::load(&fixture("train_step.safetensors")).unwrap();
    check_train_step_output(&v, &line, &fx, &out_path, &["downblocks.0.conv1.weight"]);
}

#[test]
fn attention_and_lif_train_step_commands_match_reference() {
    for (dir, weight) in
        [("fixtures-attn", "upblocks.1.attn.v_conv.weight"), ("fixtures-lif", "upblocks.1.conv2.weight")]
    {
        let out_path = tmp(&format!("{dir}_after.safetensors"));
        let out = run(&[
            "train-step",
            "--checkpoint",
            fixture_in(dir, "weights.safetensors").to_str().unwrap(),
            "--input",
            fixture_in(dir, "train_step.safetensors").to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
        ]);
        let line = ok(&out);
        let v: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");
        let fx = TensorFile::load(&fixture_in(dir, "train_step.safetensors")).unwrap();
        check_train_step_output(&v, &line, &fx, &out_path, &["downblocks.0.conv1.weight", weight]);
        // The written checkpoint keeps the extension's config.
        let cfg = TensorFile::load(&out_path).unwrap().config(None).unwrap();
        assert!(!cfg.attn.is_empty() || cfg.neuron == sddpm_gpu::model::NeuronKind::Lif, "{dir}: {cfg:?}");
    }
}

/// The train-step command's JSON line `v` and written checkpoint against the fixture `fx`.
fn check_train_step_output(v: &serde_json::Value, line: &str, fx: &TensorFile, out_path: &Path, weights: &[&str]) {
    let want_loss = fx.get("loss").unwrap().data[0] as f64;
    let want_norm = fx.get("grad_norm").unwrap().data[0] as f64;
    assert!((v["loss"].as_f64().unwrap() - want_loss).abs() < 1e-5 * want_loss, "{line}");
    assert!((v["grad_norm"].as_f64().unwrap() - want_norm).abs() < 1e-3 * want_norm, "{line}");
    let after = TensorFile::load(out_path).unwrap();
    // Weights away from ~0 gradients, BN statistics and counters as the reference.
    for &name in weights {
        let (got, want) = (&after.get(name).unwrap().data, &fx.get(&format!("after.{name}")).unwrap().data);
        let grad = &fx.get(&format!("grad.{name}")).unwrap().data;
        for i in 0..got.len() {
            if grad[i].abs() >= 1e-5 {
                assert!((got[i] - want[i]).abs() <= 2e-5, "{name}[{i}]");
            }
        }
    }
    let rv = "middleblocks.0.bn1.running_var";
    common::assert_close(rv, &after.get(rv).unwrap().data, &fx.get(&format!("after.{rv}")).unwrap().data, 1e-4, 1e-6);
    assert_eq!(after.get_ints("bn.num_batches_tracked").unwrap().data[0], 8);
    assert_eq!(after.get_ints("optim.step").unwrap().data[0], 1);
    assert!(after.tensors.contains_key("optim.conv.weight.exp_avg"));
    // The written checkpoint is itself loadable for inference.
    after.config(None).unwrap();
}

/// A cheap run: the tiny net at 16 px, batch 2, T = 2 on the embedded MNIST subset.
fn quick_train(dir: &Path, steps: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--steps", steps];
    args.extend_from_slice(extra);
    if !extra.contains(&"--resume") {
        args.extend_from_slice(&["--size", "16", "--batch", "2", "--snn-steps", "2", "--sample-n", "0"]);
        args.extend_from_slice(&["--out", dir.to_str().unwrap()]);
    }
    run(&args)
}

#[test]
fn train_writes_a_run_folder_and_resumes_bit_identically() {
    let straight = tmp("straight");
    ok(&quick_train(&straight, "4", &[]));
    let halves = tmp("halves");
    ok(&quick_train(&halves, "2", &[]));
    ok(&quick_train(&halves, "4", &["--resume", halves.to_str().unwrap()]));
    for f in ["config.json", "loss.csv", "loss.png", "ckpt.safetensors"] {
        assert!(straight.join(f).exists(), "{f} missing");
    }
    let csv = std::fs::read_to_string(halves.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "header + 4 steps after resume:\n{csv}");
    assert!(csv.starts_with("step,loss,lr,images_per_s"));
    let a = TensorFile::load(&straight.join("ckpt.safetensors")).unwrap();
    let b = TensorFile::load(&halves.join("ckpt.safetensors")).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        assert!(t.data.iter().zip(&u.data).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs after resume");
    }
    assert_eq!(a.ints, b.ints);
    let png = image::open(straight.join("loss.png")).unwrap();
    assert!(png.width() >= 400);
}

#[test]
fn attention_and_lif_run_round_trips_to_sample() {
    // The tiny preset on the 1-channel embedded MNIST (it takes the data's channels), with
    // attention on level 1 and LIF neurons: train -> checkpoint -> sample.
    let dir = tmp("attn_lif");
    let extra = ["--preset", "tiny", "--attn", "1", "--heads", "2", "--neuron", "lif", "--tau", "1.5"];
    ok(&quick_train(&dir, "2", &extra));
    let ckpt = TensorFile::load(&dir.join("ckpt.safetensors")).unwrap();
    let cfg = ckpt.config(None).unwrap();
    assert_eq!((cfg.img_ch, cfg.attn.as_slice(), cfg.heads), (1, &[1][..], 2));
    assert_eq!((cfg.neuron, cfg.tau), (sddpm_gpu::model::NeuronKind::Lif, 1.5));
    assert!(ckpt.tensors.contains_key("upblocks.1.attn.proj_bn.running_var"));
    assert!(ckpt.tensors.contains_key("optim.downblocks.2.attn.q_conv.weight.exp_avg"));
    // --resume restores the extensions from the run's config.
    ok(&quick_train(&dir, "3", &["--resume", dir.to_str().unwrap()]));
    let resumed = TensorFile::load(&dir.join("ckpt.safetensors")).unwrap();
    assert_eq!(resumed.config(None).unwrap(), cfg);
    assert_eq!(resumed.get_ints("optim.step").unwrap().data[0], 3);
    let png = tmp("attn_lif.png");
    let ckpt_path = dir.join("ckpt.safetensors");
    let args = ["sample", "--n", "2", "--sampler", "ddim", "--steps", "2", "--size", "16", "--out"];
    ok(&bin().args(args).arg(&png).arg("--checkpoint").arg(&ckpt_path).output().unwrap());
    let img = image::open(&png).unwrap();
    assert!(img.width() >= 32, "a grid of two 16 px images");
    // A bad attention setting is one line naming the flag.
    assert_one_line_error(&quick_train(&tmp("attn_bad"), "1", &["--attn", "1", "--heads", "3"]), "--heads");
    assert_one_line_error(&quick_train(&tmp("attn_bad2"), "1", &["--attn", "4"]), "--attn");
    // --heads without --attn is a usage error (clap's, naming --attn).
    let out = quick_train(&tmp("attn_bad3"), "1", &["--heads", "2"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--attn <ATTN>"));
}

#[test]
fn bad_data_gives_one_line_errors() {
    let out = quick_train(&tmp("r1"), "1", &["--data", "/no/such/data"]);
    assert_one_line_error(&out, "/no/such/data");
    let junk = tmp("junk-images-idx3-ubyte");
    std::fs::write(&junk, b"not an idx file at all").unwrap();
    let out = quick_train(&tmp("r2"), "1", &["--data", junk.to_str().unwrap()]);
    assert_one_line_error(&out, "junk-images-idx3-ubyte");
    // A CIFAR-10 folder at the wrong image size.
    let cifar = tmp("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    std::fs::write(cifar.join("data_batch_1.bin"), vec![0u8; 3073 * 2]).unwrap();
    let out = quick_train(&tmp("r3"), "1", &["--data", cifar.to_str().unwrap(), "--preset", "cifar10"]);
    assert_one_line_error(&out, "32x32");
    // A truncated CIFAR-10 batch.
    std::fs::write(cifar.join("data_batch_1.bin"), vec![0u8; 3000]).unwrap();
    let out =
        run(&["train", "--data", cifar.to_str().unwrap(), "--preset", "tiny", "--out", tmp("r4").to_str().unwrap()]);
    assert_one_line_error(&out, "data_batch_1.bin");
    // An unreadable image in a folder.
    let folder = tmp("faces");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("broken.png"), b"\\x89PNG garbage").unwrap();
    let out = run(&["train", "--data", folder.to_str().unwrap(), "--out", tmp("r5").to_str().unwrap()]);
    assert_one_line_error(&out, "broken.png");
    // Channels that do not match the preset.
    let out = quick_train(&tmp("r6"), "1", &["--preset", "cifar10"]);
    assert_one_line_error(&out, "channel");
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    let dir = tmp("interrupted");
    let child = bin()
        .args(["train", "--steps", "100000", "--size", "16", "--batch", "2", "--snn-steps", "2", "--sample-n", "0"])
        .args(["--ckpt-every", "100000", "--out"])
        .arg(&dir)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let csv = dir.join("loss.csv");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::fs::read_to_string(&csv).map_or(0, |t| t.lines().count()) < 2 {
        assert!(std::time::Instant::now() < deadline, "training never logged a step");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Interrupted is not finished: a scheduler must see the difference (128 + SIGINT).
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted (SIGINT): checkpoint of step"), "{err}");
    let ckpt = TensorFile::load(&dir.join("ckpt.safetensors")).unwrap();
    let step = ckpt.get_ints("optim.step").unwrap().data[0];
    assert!((1..100000).contains(&step), "step {step}");
    // ... and the run resumes from there.
    ok(&run(&["train", "--steps", &(step + 1).to_string(), "--resume", dir.to_str().unwrap()]));
}

// ---- the first hour (issue 21) -------------------------------------------------------------

/// `train` args with a fresh tuning cache of its own: (stderr, success).
fn train_fresh(cache: &Path, args: &[&str]) -> (String, bool) {
    let out = bin().env("SDDPM_CACHE_DIR", cache).arg("train").args(args).output().unwrap();
    (String::from_utf8_lossy(&out.stderr).to_string(), out.status.success())
}

#[test]
fn banner_comes_first_then_tuning_progress_then_training_lines() {
    let dir = tmp("first");
    let args = ["--steps", "3", "--size", "16", "--batch", "2", "--snn-steps", "2", "--sample-n", "2"];
    let (err, ok) = train_fresh(
        &tmp("first-cache"),
        &[&args[..], &["--sample-steps", "1", "--out", dir.to_str().unwrap()]].concat(),
    );
    assert!(ok, "{err}");
    let at = |needle: &str| err.find(needle).unwrap_or_else(|| panic!("'{needle}' missing:\n{err}"));
    let (banner, tuning, tuned) = (at("training sddpm tiny"), at("kernel shapes on"), at("note: tuned"));
    assert!(banner < tuning && tuning < tuned, "banner, then the tuning progress:\n{err}");
    assert!(err.lines().any(|l| l.starts_with("tuning: ") && l.contains(" kernel shapes (")), "{err}");
    assert_eq!(err.matches("note: tuned").count(), 1, "the sample grid is tuned with the training step:\n{err}");
    // stderr is a pipe here, as in a job log: one line per step of this short run, and a final line.
    for step in 1..=3 {
        assert!(err.contains(&format!("train: {step}/3 steps")), "step {step}:\n{err}");
    }
    assert!(err.lines().any(|l| l.starts_with("train: 3/3 steps (100%)") && l.contains("done")), "{err}");
}

/// A CIFAR-10 binary folder of `n` black images.
fn cifar_folder(name: &str, n: usize) -> std::path::PathBuf {
    let dir = tmp(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data_batch_1.bin"), vec![0u8; 3073 * n]).unwrap();
    dir
}

#[test]
fn a_model_the_adapter_cannot_hold_is_refused_before_tuning() {
    // The paper's CIFAR-10 net at batch 32 needs 192 MiB bindings (lavapipe allows 128); on an
    // adapter that allows more, a batch that needs more than it allows.
    let limit = common::ctx().max_binding_bytes();
    let per_image = 4 * 384 * 32 * 32 * 4; // 'upblocks.12.concat' [T * B, 384, 32, 32] f32
    let batch = (limit / per_image + 1).max(32) as usize;
    let data = cifar_folder("cifar-big", batch);
    let (dir, cache) = (tmp("refused"), tmp("refused-cache"));
    let (b, d) = (batch.to_string(), data.to_str().unwrap().to_string());
    let (err, ok) =
        train_fresh(&cache, &["--preset", "cifar10", "--data", &d, "--batch", &b, "--out", dir.to_str().unwrap()]);
    assert!(!ok, "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:") && !l.contains("XDG_RUNTIME_DIR"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(
        line.contains("tensor 'upblocks.") && line.contains("per storage binding") && line.contains("allows"),
        "{line}"
    );
    assert!(err.contains("training sddpm cifar10"), "the banner still comes first:\n{err}");
    assert!(!err.contains("tuning"), "nothing was tuned:\n{err}");
    assert!(!dir.exists(), "no run folder");
    assert!(!cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none(), "no tuning cache written");
}

#[test]
fn train_arguments_are_checked_before_any_folder_or_work() {
    let stats = common::fixture("fid/stats_a.npz");
    let folder = tmp("not-stats");
    std::fs::create_dir_all(&folder).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--batch", "0"], "--batch"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--lr", "-1"], "--lr"),
        (vec!["--lr", "nan"], "--lr"),
        (vec!["--neuron", "if", "--tau", "3"], "--tau"),
        (vec!["--tau", "3"], "--tau"),
        (vec!["--fid-every", "5"], "--fid-ref"),
        (vec!["--fid-every", "5", "--fid-ref", folder.to_str().unwrap()], "--fid-ref"),
        (vec!["--fid-ref", stats.to_str().unwrap()], "--fid-every"),
    ];
    for (i, (extra, needle)) in cases.iter().enumerate() {
        let dir = tmp(&format!("checked-{i}"));
        let out = bin().args(["train", "--out", dir.to_str().unwrap()]).args(extra).output().unwrap();
        assert_one_line_error(&out, needle);
        assert!(!dir.exists(), "{extra:?} created {}", dir.display());
    }
    // Resuming past the end does nothing and writes nothing.
    let dir = tmp("ended");
    ok(&quick_train(&dir, "1", &[]));
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let out = run(&["train", "--steps", "1", "--resume", dir.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"), "{}", ok(&out));
    assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), config);
}

#[test]
fn one_tuning_serves_sample_and_resume_at_other_batch_sizes() {
    let (dir, cache) = (tmp("tune-once"), tmp("tune-once-cache"));
    let args = ["--steps", "2", "--size", "16", "--batch", "2", "--snn-steps", "2", "--sample-n", "3"];
    let (err, ok) =
        train_fresh(&cache, &[&args[..], &["--sample-steps", "1", "--out", dir.to_str().unwrap()]].concat());
    assert!(ok && err.contains("note: tuned"), "{err}");
    let ckpt = dir.join("ckpt.safetensors");
    for extra in [["--n", "5", "--batch", "5"], ["--n", "1", "--batch", "1"], ["--n", "9", "--batch", "4"]] {
        let out = bin()
            .env("SDDPM_CACHE_DIR", &cache)
            .args(["sample", "--checkpoint", ckpt.to_str().unwrap(), "--sampler", "ddim", "--steps", "1"])
            .args(extra)
            .args(["--out", tmp("once.png").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(!err.contains("tuning") && !err.contains("note: tuned"), "{extra:?} tuned again:\n{err}");
    }
    let (err, ok) = train_fresh(&cache, &["--steps", "3", "--resume", dir.to_str().unwrap()]);
    assert!(ok && !err.contains("note: tuned"), "resume tuned again:\n{err}");
    // The cache reads as a report: keys that hold for every batch say so, with the shapes timed.
    let file = std::fs::read_dir(&cache).unwrap().next().unwrap().unwrap().path();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    let general: Vec<(&String, &serde_json::Value)> =
        json["shapes"].as_object().unwrap().iter().filter(|(k, _)| k.contains("2B")).collect();
    assert!(!general.is_empty(), "{json:#}");
    for (key, e) in general {
        assert!(e["timed_on"].as_str().is_some_and(|t| !t.contains('B')), "{key}: {e}");
    }
}

#[test]
fn plot_titles_name_attention_and_lif() {
    let dir = tmp("titled");
    let extra = ["--attn", "1", "--heads", "2", "--neuron", "lif", "--tau", "1.5"];
    ok(&quick_train(&dir, "1", &extra));
    let cfg: sddpm_gpu::run::RunConfig =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let title = sddpm_gpu::run::describe(&cfg);
    assert_eq!(title, "tiny, attention at level 1 (2 heads), LIF neurons (tau 1.5), T = 2");
}

/// `train-step --steps 2 --bn-groups 2` on one device reproduces the data-parallel fixture (two
/// ranks of two images under torch DDP, two steps): one JSON line per step, the global loss and
/// grad norm, the state after both steps.
#[test]
fn train_step_command_in_bn_groups_reproduces_the_ddp_fixture() {
    let out_path = tmp("ddp_after.safetensors");
    let (w, f) =
        (fixture_in(common::ddp::DIR, "weights.safetensors"), fixture_in(common::ddp::DIR, "ddp_step.safetensors"));
    let out = run(&[
        "train-step",
        "--checkpoint",
        w.to_str().unwrap(),
        "--input",
        f.to_str().unwrap(),
        "--output",
        out_path.to_str().unwrap(),
        "--steps",
        "2",
        "--bn-groups",
        "2",
    ]);
    let text = ok(&out);
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("JSON lines")).collect();
    let got: Vec<(f32, f32)> =
        lines.iter().map(|v| (v["loss"].as_f64().unwrap() as f32, v["grad_norm"].as_f64().unwrap() as f32)).collect();
    assert_eq!(lines.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2], "{text}");
    let (fx, before) = (TensorFile::load(&f).unwrap(), TensorFile::load(&w).unwrap());
    common::ddp::check(&fx, &before, &got, &TensorFile::load(&out_path).unwrap(), "train-step --bn-groups 2");
    // Bad counts are one-line errors naming the flag.
    for (flag, value, needle) in [("--steps", "3", "--steps 3"), ("--bn-groups", "3", "--bn-groups 3")] {
        let mut args = vec!["train-step", "--checkpoint", w.to_str().unwrap(), "--input", f.to_str().unwrap()];
        args.extend(["--output", out_path.to_str().unwrap(), "--steps", "2"]);
        if flag == "--steps" {
            *args.last_mut().unwrap() = value;
        } else {
            args.extend([flag, value]);
        }
        assert_one_line_error(&run(&args), needle);
    }
    let dir = tmp("bad_groups_run");
    let train = run(&["train", "--batch", "4", "--bn-groups", "3", "--steps", "1", "--out", dir.to_str().unwrap()]);
    assert_one_line_error(&train, "--bn-groups");
}
