//! The command line end to end: parity through `forward`, `sample` files, and one-line errors.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{assert_one_line_error, bin, fixture, fixture_in, rel_l2, run, tmp};
use sddpm_gpu::checkpoint::{self, Data, TensorFile};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `forward` on the fixture input with checkpoint `ckpt`, output to a temporary `name`.
fn forward_with(ckpt: &Path, name: &str) -> std::process::Output {
    let output = tmp(&format!("{name}.safetensors"));
    run(&["forward", "--checkpoint", p(ckpt), "--input", p(&fixture("forward.safetensors")), "--output", p(&output)])
}

#[test]
fn forward_command_matches_reference() {
    let want = TensorFile::load(&fixture("forward.safetensors")).unwrap();
    for (threshold, key) in [("1.0", "eps"), ("0.997", "eps_threshold")] {
        let out_path = tmp(&format!("eps_{key}.safetensors"));
        let out = run(&[
            "forward",
            "--checkpoint",
            p(&fixture("weights.safetensors")),
            "--input",
            p(&fixture("forward.safetensors")),
            "--output",
            p(&out_path),
            "--threshold",
            threshold,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = TensorFile::load(&out_path).unwrap();
        let eps = got.get("eps").unwrap();
        assert_eq!(eps.shape, want.get(key).unwrap().shape);
        let err = rel_l2(&eps.data, &want.get(key).unwrap().data);
        assert!(err < 1e-4, "{key}: relative L2 {err:e}");
    }
}

#[test]
fn attention_and_lif_forward_commands_match_reference() {
    for dir in ["fixtures-attn", "fixtures-lif"] {
        let want = TensorFile::load(&fixture_in(dir, "forward.safetensors")).unwrap();
        let threshold = want.get("threshold").unwrap().data[0].to_string();
        for (threshold, key) in [("1.0", "eps"), (threshold.as_str(), "eps_threshold")] {
            let out_path = tmp(&format!("{dir}_{key}.safetensors"));
            let out = run(&[
                "forward",
                "--checkpoint",
                p(&fixture_in(dir, "weights.safetensors")),
                "--input",
                p(&fixture_in(dir, "forward.safetensors")),
                "--output",
                p(&out_path),
                "--threshold",
                threshold,
            ]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let eps = TensorFile::load(&out_path).unwrap().get("eps").unwrap().data.clone();
            let err = rel_l2(&eps, &want.get(key).unwrap().data);
            assert!(err < 1e-4, "{dir} {key}: relative L2 {err:e}");
        }
    }
}

/// The attention fixture's tensors under a config edited by `edit`, written to `name`.
fn attention_weights_with_config(name: &str, edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
    let ckpt = TensorFile::load(&fixture_in("fixtures-attn", "weights.safetensors")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&ckpt.metadata["config"]).unwrap();
    edit(&mut cfg);
    let mut tensors: Vec<(String, Vec<usize>, Data)> =
        ckpt.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), Data::F32(&t.data))).collect();
    tensors.extend(ckpt.ints.iter().map(|(n, t)| (n.clone(), t.shape.clone(), Data::I64(&t.data))));
    let path = tmp(name);
    checkpoint::save(&path, tensors, HashMap::from([("config".to_string(), cfg.to_string())])).unwrap();
    path
}

#[test]
fn attention_tensors_must_match_the_config() {
    // Attention weights in a model configured without attention: the extra tensors are named.
    let plain = attention_weights_with_config("no_attn.safetensors", |c| {
        c.as_object_mut().unwrap().remove("attn");
    });
    let out = forward_with(&plain, "no_attn_out");
    assert_one_line_error(&out, "unexpected downblocks.2.attn.");
    // Attention on a level the weights do not have: the missing tensors are named.
    let other = attention_weights_with_config("attn0.safetensors", |c| c["attn"] = serde_json::json!([0, 1]));
    assert_one_line_error(&forward_with(&other, "attn0_out"), "missing downblocks.0.attn.");
    // Heads that do not divide the channels, a level that does not exist, a bad tau.
    let heads = attention_weights_with_config("heads5.safetensors", |c| c["heads"] = 5.into());
    assert_one_line_error(&forward_with(&heads, "heads5_out"), "--heads");
    let level = attention_weights_with_config("level7.safetensors", |c| c["attn"] = serde_json::json!([7]));
    assert_one_line_error(&forward_with(&level, "level7_out"), "attention level 7");
    let tau = attention_weights_with_config("tau.safetensors", |c| {
        c["neuron"] = "lif".into();
        c["tau"] = 0.5.into();
    });
    assert_one_line_error(&forward_with(&tau, "tau_out"), "tau");
}

#[test]
fn forward_accepts_int32_timesteps() {
    let src = TensorFile::load(&fixture("forward.safetensors")).unwrap();
    let x = src.get("x").unwrap();
    let t: Vec<i32> = src.get_ints("t").unwrap().data.iter().map(|&v| v as i32).collect();
    let input = tmp("in_i32.safetensors");
    // Write t as int32 by hand through safetensors.
    let xb: &[u8] = bytemuck::cast_slice(&x.data);
    let tb: &[u8] = bytemuck::cast_slice(&t);
    let views = vec![
        ("x", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, x.shape.clone(), xb).unwrap()),
        ("t", safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![t.len()], tb).unwrap()),
    ];
    std::fs::write(&input, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
    let output = tmp("out_i32.safetensors");
    let out = run(&[
        "forward",
        "--checkpoint",
        p(&fixture("weights.safetensors")),
        "--input",
        p(&input),
        "--output",
        p(&output),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = rel_l2(&TensorFile::load(&output).unwrap().get("eps").unwrap().data, &src.get("eps").unwrap().data);
    assert!(err < 1e-4);
}

#[test]
fn truncated_checkpoint_is_a_one_line_error() {
    let bytes = std::fs::read(fixture("weights.safetensors")).unwrap();
    let bad = tmp("truncated.safetensors");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let out = forward_with(&bad, "x");
    assert_one_line_error(&out, "truncated.safetensors");
    let garbage = tmp("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint").unwrap();
    let out = run(&["sample", "--checkpoint", p(&garbage), "--n", "1"]);
    assert_one_line_error(&out, "garbage.safetensors");
    let out = run(&["sample", "--checkpoint", p(&tmp("does-not-exist.safetensors")), "--n", "1"]);
    assert_one_line_error(&out, "does-not-exist");
}

#[test]
fn mis_shaped_or_missing_tensor_is_named() {
    let ckpt = TensorFile::load(&fixture("weights.safetensors")).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Data)> = Vec::new();
    let wrong = vec![0f32; 7];
    for (name, t) in &ckpt.tensors {
        if name == "downblocks.0.conv1.bias" {
            tensors.push((name.clone(), vec![7], Data::F32(&wrong)));
        } else if name != "tail_conv.weight" {
            tensors.push((name.clone(), t.shape.clone(), Data::F32(&t.data)));
        }
    }
    let bad = tmp("misshaped.safetensors");
    checkpoint::save(&bad, tensors, ckpt.metadata.clone()).unwrap();
    let out = forward_with(&bad, "y");
    assert_one_line_error(&out, "downblocks.0.conv1.bias");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing tail_conv.weight"), "{err}");
}

#[test]
fn bad_forward_input_is_named() {
    let src = TensorFile::load(&fixture("forward.safetensors")).unwrap();
    let x = src.get("x").unwrap();
    let input = tmp("bad_t.safetensors");
    checkpoint::save(
        &input,
        vec![("x".into(), x.shape.clone(), Data::F32(&x.data)), ("t".into(), vec![2], Data::I64(&[5, 1000]))],
        HashMap::new(),
    )
    .unwrap();
    let out = run(&[
        "forward",
        "--checkpoint",
        p(&fixture("weights.safetensors")),
        "--input",
        p(&input),
        "--output",
        p(&tmp("z.safetensors")),
    ]);
    assert_one_line_error(&out, "timestep 1000");
}

#[test]
fn unknown_preset_is_a_one_line_error() {
    let out = run(&["sample", "--preset", "imagenet", "--n", "1"]);
    assert_one_line_error(&out, "unknown preset 'imagenet'");
}

#[test]
fn sample_writes_deterministic_pngs() {
    let dir = tmp("samples");
    let grid1 = tmp("grid1.png");
    let grid2 = tmp("grid2.png");
    let grid3 = tmp("grid3.png");
    let ck = fixture("weights.safetensors");
    let args = |grid: &Path, seed: &str| {
        vec![
            "sample".to_string(),
            "--checkpoint".into(),
            p(&ck).into(),
            "--n".into(),
            "3".into(),
            "--batch".into(),
            "2".into(),
            "--sampler".into(),
            "ddim".into(),
            "--steps".into(),
            "3".into(),
            "--size".into(),
            "16".into(),
            "--seed".into(),
            seed.into(),
            "--out".into(),
            p(grid).into(),
        ]
    };
    let mut a = args(&grid1, "5");
    a.extend(["--out-dir".into(), p(&dir).into()]);
    let out = bin().args(&a).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(bin().args(args(&grid2, "5")).status().unwrap().success());
    assert!(bin().args(args(&grid3, "6")).status().unwrap().success());
    let (g1, g2, g3) = (std::fs::read(&grid1).unwrap(), std::fs::read(&grid2).unwrap(), std::fs::read(&grid3).unwrap());
    assert_eq!(g1, g2, "same seed, same adapter: identical files");
    assert_ne!(g1, g3, "another seed: other images");
    let img = image::load_from_memory(&g1).unwrap();
    // 3 images in a 2-column grid of 16 px with 2 px padding: 38 x 38.
    assert_eq!((img.width(), img.height()), (38, 38));
    for i in 0..3 {
        let one = image::open(dir.join(format!("{i:06}.png"))).unwrap();
        assert_eq!((one.width(), one.height()), (16, 16));
    }
    assert!(!dir.join("000003.png").exists());
}

#[test]
fn sample_shards_reproduce_one_run_byte_for_byte() {
    let ck = fixture("weights.safetensors");
    let sample = |dir: &Path, extra: &[&str]| {
        let mut args =
            vec!["sample", "--checkpoint", p(&ck), "--n", "5", "--sampler", "ddim", "--steps", "2", "--size", "16"];
        args.extend_from_slice(&["--seed", "9", "--out-dir", p(dir)]);
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let whole = tmp("shard_whole");
    sample(&whole, &["--batch", "2"]);
    let merged = tmp("shard_merged");
    // Shares of 1, 2 and 2 images, sampled with another batch size than the single run.
    for k in ["1/3", "2/3", "3/3"] {
        sample(&merged, &["--shard", k, "--batch", "3"]);
    }
    let names = |dir: &Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    let want: Vec<String> = (0..5).map(|i| format!("{i:06}.png")).collect();
    assert_eq!(names(&whole), want);
    assert_eq!(names(&merged), want);
    for name in &want {
        assert_eq!(std::fs::read(whole.join(name)).unwrap(), std::fs::read(merged.join(name)).unwrap(), "{name}");
    }
    // One share alone writes exactly its indices.
    let one = tmp("shard_one");
    sample(&one, &["--shard", "2/3"]);
    assert_eq!(names(&one), ["000001.png", "000002.png"]);
}

#[test]
fn bad_shard_specs_are_one_line_errors() {
    let ck = fixture("weights.safetensors");
    let dir = tmp("shard_bad");
    for spec in ["0/2", "3/2", "1/0", "x"] {
        let out = run(&["sample", "--checkpoint", p(&ck), "--n", "4", "--out-dir", p(&dir), "--shard", spec]);
        assert_one_line_error(&out, &format!("--shard {spec}"));
    }
    let out = run(&["sample", "--checkpoint", p(&ck), "--n", "4", "--shard", "1/2"]);
    assert_one_line_error(&out, "--out-dir");
    assert!(!dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none());
}

// ---- the first hour (issue 21) -------------------------------------------------------------

#[test]
fn sample_arguments_are_checked_before_sampling() {
    let ck = fixture("weights.safetensors");
    let sample = |extra: &[&str]| {
        let mut args =
            vec!["sample", "--checkpoint", p(&ck), "--n", "2", "--sampler", "ddim", "--steps", "1", "--size", "16"];
        args.extend_from_slice(extra);
        run(&args)
    };
    let file = tmp("a-file");
    std::fs::write(&file, b"x").unwrap();
    let inside = file.join("grid.png");
    assert_one_line_error(&sample(&["--out", p(&inside)]), "is a file");
    let nowhere = tmp("no/such/dir/grid.png");
    assert_one_line_error(&sample(&["--out", p(&nowhere)]), "does not exist");
    assert!(!tmp("no").exists(), "no folder is created on the way");
    assert_one_line_error(&sample(&["--out", p(&tmp("grid.gif"))]), ".png");
    assert_one_line_error(&sample(&["--batch", "0"]), "--batch");
    assert_one_line_error(&sample(&["--out-dir", p(&file)]), "--out-dir");
    // A .jpg name gets a JPEG.
    let jpg = tmp("grid.jpg");
    let out = sample(&["--out", p(&jpg)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(&std::fs::read(&jpg).unwrap()[..3], &[0xff, 0xd8, 0xff], "JPEG bytes");
    // The bar counts finished network evaluations; in a pipe, its last line says all were done.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().any(|l| l.starts_with("sample: 1/1 network evals (100%)")), "{err}");
}

#[test]
fn an_unknown_wgpu_backend_is_named() {
    for cmd in [&["devices"][..], &["sample", "--preset", "tiny", "--n", "1"]] {
        let out = bin().env("WGPU_BACKEND", "bogus").args(cmd).output().unwrap();
        assert_one_line_error(&out, "WGPU_BACKEND=bogus");
    }
}

#[test]
fn a_test_folder_goes_with_its_test() {
    let dir = std::thread::spawn(|| {
        let f = tmp("kept-while-running");
        std::fs::write(&f, b"x").unwrap();
        assert!(f.exists());
        f.parent().unwrap().to_path_buf()
    })
    .join()
    .unwrap();
    assert!(!dir.exists(), "{} outlived its test", dir.display());
}
