//! Which weights a command evaluates, through the command line: `--weights ema|raw` (EMA weights
//! by default when a checkpoint has them), and official PyTorch checkpoints (`.pt`, written here
//! by tests/common/torch.rs as torch 2.x writes them) read directly by every command that takes
//! `--checkpoint`, and `convert`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::torch::{self, Obj};
use common::{assert_one_line_error, fixture, fixture_in, rel_l2, run, tmp};
use sddpm_gpu::checkpoint::{self, Data, TensorFile};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `forward` of `ckpt` on `input` (extra flags after), returning eps.
fn eps(ckpt: &Path, input: &Path, extra: &[&str]) -> Vec<f32> {
    let out = tmp(&format!("eps-{}.safetensors", rand_name()));
    let mut args = vec!["forward", "--checkpoint", p(ckpt), "--input", p(input), "--output", p(&out)];
    args.extend_from_slice(extra);
    ok(&run(&args));
    TensorFile::load(&out).unwrap().get("eps").unwrap().data.clone()
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The SDDPM fixture's weights with `ema.*` copies of every weight scaled by 0.9: forward of the
/// EMA weights differs from the reference's.
fn with_ema(name: &str) -> PathBuf {
    let ckpt = TensorFile::load(&fixture("weights.safetensors")).unwrap();
    let scaled: Vec<(String, Vec<usize>, Vec<f32>)> = ckpt
        .tensors
        .iter()
        .filter(|(n, _)| n.ends_with(".weight"))
        .map(|(n, t)| (format!("ema.{n}"), t.shape.clone(), t.data.iter().map(|v| v * 0.9).collect()))
        .collect();
    let mut tensors: Vec<(String, Vec<usize>, Data)> =
        ckpt.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), Data::F32(&t.data))).collect();
    tensors.extend(ckpt.ints.iter().map(|(n, t)| (n.clone(), t.shape.clone(), Data::I64(&t.data))));
    tensors.extend(scaled.iter().map(|(n, s, d)| (n.clone(), s.clone(), Data::F32(d))));
    let path = tmp(name);
    checkpoint::save(&path, tensors, ckpt.metadata.clone()).unwrap();
    path
}

#[test]
fn weights_ema_is_the_default_and_raw_gives_the_trained_weights() {
    let input = fixture("forward.safetensors");
    let want = TensorFile::load(&input).unwrap().get("eps").unwrap().data.clone();
    let ckpt = with_ema("ema.safetensors");
    let raw = eps(&ckpt, &input, &["--weights", "raw"]);
    assert!(rel_l2(&raw, &want) < 1e-4, "--weights raw evaluates the trained weights");
    let ema = eps(&ckpt, &input, &["--weights", "ema"]);
    assert!(rel_l2(&ema, &want) > 1e-2, "the EMA weights are other weights");
    let out = tmp("default.safetensors");
    let args = ["forward", "--checkpoint", p(&ckpt), "--input", p(&input), "--output", p(&out)];
    let err = ok(&run(&args));
    assert!(err.contains("EMA weights") && err.contains("--weights raw"), "the default is said: {err}");
    let default = TensorFile::load(&out).unwrap().get("eps").unwrap().data.clone();
    assert_eq!(default, ema, "default: the EMA weights, as pytorch-ddpm samples");
    // sample takes the flag too; EMA weights that are not there are a one-line error.
    let grid = tmp("raw.png");
    let args = ["sample", "--checkpoint", p(&ckpt), "--weights", "raw", "--n", "1", "--sampler", "ddim"];
    ok(&run(&[&args[..], &["--steps", "1", "--size", "16", "--out", p(&grid)]].concat()));
    let plain = fixture("weights.safetensors");
    let out = run(&["sample", "--checkpoint", p(&plain), "--weights", "ema", "--n", "1", "--out", p(&grid)]);
    assert_one_line_error(&out, "EMA");
}

/// The SDDPM fixture as an official training checkpoint: {'net_model': state_dict (wrapped in
/// DataParallel: `module.` names), 'optim': ..., 'step': 7, 'x_T': tensor}, as main_SDDPM.py
/// saves it.
fn sddpm_pt(name: &str) -> PathBuf {
    let ckpt = TensorFile::load(&fixture("weights.safetensors")).unwrap();
    let top = Obj::Dict(vec![
        ("net_model".into(), torch::state_dict(&ckpt, "module.", |v| v)),
        (
            "optim".into(),
            Obj::Dict(vec![(
                "param_groups".into(),
                Obj::Dict(vec![("lr".into(), Obj::Float(2e-4)), ("eps".into(), Obj::Float(1e-8))]),
            )]),
        ),
        ("step".into(), Obj::Int(7)),
        ("x_T".into(), Obj::Tensor(vec![1, 3, 2, 2], vec![0.5; 12])),
    ]);
    let path = tmp(name);
    torch::save(&path, &top);
    path
}

#[test]
fn official_sddpm_checkpoints_are_read_directly() {
    let input = fixture("forward.safetensors");
    let want = TensorFile::load(&input).unwrap().get("eps").unwrap().data.clone();
    let pt = sddpm_pt("SDDPM_CIFAR10.pt");
    let got = eps(&pt, &input, &[]);
    assert_eq!(got, eps(&fixture("weights.safetensors"), &input, &[]), "the same bits as the safetensors file");
    assert!(rel_l2(&got, &want) < 1e-4);
    // SDDPM keeps no EMA.
    let out = run(&[
        "forward",
        "--checkpoint",
        p(&pt),
        "--weights",
        "ema",
        "--input",
        p(&input),
        "--output",
        p(&tmp("x.safetensors")),
    ]);
    assert_one_line_error(&out, "net_model");
    // sample, energy and train-step take it too.
    ok(&run(&[
        "sample",
        "--checkpoint",
        p(&pt),
        "--n",
        "1",
        "--sampler",
        "ddim",
        "--steps",
        "1",
        "--size",
        "16",
        "--out",
        p(&tmp("pt.png")),
    ]));
    let energy = run(&["energy", "--checkpoint", p(&pt), "--n", "1", "--json"]);
    ok(&energy);
    let e: serde_json::Value = serde_json::from_slice(&energy.stdout).unwrap();
    assert!(e["total_sops"].as_f64().unwrap() > 0.0, "{e}");
    let step_in = fixture("train_step.safetensors");
    let after = tmp("after.safetensors");
    let out = run(&["train-step", "--checkpoint", p(&pt), "--input", p(&step_in), "--output", p(&after)]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    ok(&out);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    let fx = TensorFile::load(&step_in).unwrap();
    let loss = fx.get("loss").unwrap().data[0] as f64;
    assert!((v["loss"].as_f64().unwrap() - loss).abs() < 1e-5 * loss, "{line}");

    // convert writes a safetensors checkpoint with the inferred config, evaluating the same.
    let st = tmp("converted.safetensors");
    let out = run(&["convert", p(&pt), p(&st), "--size", "16"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("config"), "{}", String::from_utf8_lossy(&out.stdout));
    ok(&out);
    let converted = TensorFile::load(&st).unwrap();
    let cfg = converted.config(None).unwrap();
    assert_eq!((cfg.ch, cfg.ch_mult.as_slice(), cfg.img_size, cfg.snn_steps), (16, &[1, 2][..], 16, 4));
    assert_eq!(
        converted.ints["bn.num_batches_tracked"],
        TensorFile::load(&fixture("weights.safetensors")).unwrap().ints["bn.num_batches_tracked"]
    );
    assert_eq!(eps(&st, &input, &[]), got);
}

#[test]
fn pytorch_ddpm_checkpoints_default_to_their_ema_model() {
    let input = fixture_in("fixtures-ddpm", "forward.safetensors");
    let want = TensorFile::load(&input).unwrap().get("eps").unwrap().data.clone();
    let ckpt = TensorFile::load(&fixture_in("fixtures-ddpm", "weights.safetensors")).unwrap();
    // pytorch-ddpm's ckpt.pt: the trained weights and their EMA (here: scaled, to tell them apart).
    let pt = tmp("ckpt.pt");
    let top = Obj::Dict(vec![
        ("net_model".into(), torch::state_dict(&ckpt, "", |v| v)),
        ("ema_model".into(), torch::state_dict(&ckpt, "", |v| v * 0.95)),
        ("step".into(), Obj::Int(800000)),
    ]);
    torch::save(&pt, &top);
    let raw = eps(&pt, &input, &["--weights", "raw"]);
    assert!(rel_l2(&raw, &want) < 1e-5, "net_model matches pytorch-ddpm's forward");
    let default = eps(&pt, &input, &[]);
    assert_eq!(default, eps(&pt, &input, &["--weights", "ema"]));
    assert!(rel_l2(&default, &want) > 1e-3, "the default is ema_model, as pytorch-ddpm samples");
    let st = tmp("ddpm.safetensors");
    ok(&run(&["convert", p(&pt), p(&st), "--weights", "raw"]));
    let converted = TensorFile::load(&st).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&converted.metadata["config"]).unwrap();
    assert_eq!(cfg["model"].as_str(), Some("ddpm"), "{cfg}");
    assert!((cfg["dropout"].as_f64().unwrap() - 0.1).abs() < 1e-6, "pytorch-ddpm's dropout: {cfg}");
    assert_eq!(eps(&st, &input, &[]), raw);
    // A bare state_dict (torch.save(model.state_dict())) is the raw weights.
    let bare = tmp("bare.pt");
    torch::save(&bare, &torch::state_dict(&ckpt, "", |v| v));
    assert_eq!(eps(&bare, &input, &[]), raw);
}

#[test]
fn hostile_or_foreign_pt_files_are_one_line_errors() {
    let input = fixture("forward.safetensors");
    let forward = |ckpt: &Path| {
        run(&["forward", "--checkpoint", p(ckpt), "--input", p(&input), "--output", p(&tmp("never.safetensors"))])
    };
    let good = std::fs::read(sddpm_pt("good.pt")).unwrap();
    let cut = tmp("cut.pt");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    assert_one_line_error(&forward(&cut), "cut.pt");
    // A pickle that names os.system: never imported or called.
    let evil = tmp("evil.pt");
    {
        use std::io::Write as _;
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&evil).unwrap());
        zip.start_file("archive/data.pkl", zip::write::SimpleFileOptions::default()).unwrap();
        zip.write_all(b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.").unwrap();
        zip.finish().unwrap();
    }
    assert_one_line_error(&forward(&evil), "posix.system");
    // A torch file holding something else than a U-Net.
    let other = tmp("other.pt");
    torch::save(
        &other,
        &Obj::Dict(vec![(
            "net_model".into(),
            Obj::StateDict(vec![("fc.weight".into(), Obj::Tensor(vec![2], vec![1.0, 2.0]))]),
        )]),
    );
    assert_one_line_error(&forward(&other), "state_dict");
    assert!(!tmp("never.safetensors").exists());
    // convert refuses to write anything but safetensors, and to overwrite its input.
    assert_one_line_error(&run(&["convert", p(&cut), p(&tmp("out.pt"))]), "safetensors");
}

#[test]
fn convert_of_our_checkpoint_extracts_its_ema_weights() {
    let ckpt = with_ema("train.safetensors");
    let st = tmp("ema-only.safetensors");
    ok(&run(&["convert", p(&ckpt), p(&st), "--weights", "ema"]));
    let input = fixture("forward.safetensors");
    assert_eq!(eps(&st, &input, &[]), eps(&ckpt, &input, &["--weights", "ema"]));
    let f = TensorFile::load(&st).unwrap();
    assert!(f.tensors.keys().all(|k| !k.starts_with("ema.")), "only the model's tensors");
}
