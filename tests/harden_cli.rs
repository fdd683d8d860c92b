//! Hardening through the command line (issue 19): crafted checkpoints and configs, flags checked
//! before any work, atomic writes that never follow links, locked run folders, SIGTERM and
//! SIGINT, and messages that name the file, the field and the fix. Every failure must be one
//! `error:` line and no panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_one_line_error, bin, fixture, run, tmp};
use sddpm_gpu::checkpoint::{self, Data, TensorFile};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "command failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

const QUICK: &[&str] = &["--size", "16", "--batch", "2", "--snn-steps", "2", "--sample-n", "0"];

/// A finished two-step run of the tiny net (made once per test binary; tests copy it).
fn trained_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        // Shared by the tests of this binary, so it outlives the test that made it.
        let dir = common::shared_tmp("trained");
        ok(&bin().args(["train", "--steps", "2"]).args(QUICK).arg("--out").arg(&dir).output().unwrap());
        dir
    })
}

/// A copy of the trained run in a folder of its own.
fn copy_of_run(name: &str) -> PathBuf {
    let to = tmp(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["config.json", "ckpt.safetensors", "loss.csv"] {
        std::fs::copy(trained_run().join(f), to.join(f)).unwrap();
    }
    to
}

/// Rewrite checkpoint `path` after `edit` changes its tensors.
fn edit_checkpoint(path: &Path, edit: impl FnOnce(&mut TensorFile)) {
    let mut f = TensorFile::load(path).unwrap();
    edit(&mut f);
    let mut tensors: Vec<(String, Vec<usize>, Data)> =
        f.tensors.iter().map(|(n, t)| (n.clone(), t.shape.clone(), Data::F32(&t.data))).collect();
    tensors.extend(f.ints.iter().map(|(n, t)| (n.clone(), t.shape.clone(), Data::I64(&t.data))));
    checkpoint::save(path, tensors, f.metadata.clone()).unwrap();
}

/// Rewrite RUN/config.json with `edit` applied to its JSON.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn resume(dir: &Path, steps: &str) -> Output {
    run(&["train", "--steps", steps, "--resume", p(dir)])
}

/// Make integer tensor `name` of `f` empty (shape [0]).
fn empty_int(f: &mut TensorFile, name: &str) {
    let t = f.ints.get_mut(name).unwrap();
    (t.shape, t.data) = (vec![0], Vec::new());
}

#[test]
fn bad_counters_are_one_line_errors() {
    // Item 3 and 15: an empty, float or negative optim.step, an empty BatchNorm counter.
    type Edit = Box<dyn Fn(&mut TensorFile)>;
    let edits: [(&str, Edit, &str); 4] = [
        ("empty", Box::new(|f| empty_int(f, "optim.step")), "exactly one"),
        (
            "float",
            Box::new(|f| {
                f.ints.remove("optim.step");
                f.tensors.insert("optim.step".into(), checkpoint::Tensor { shape: vec![1], data: vec![2.0] });
            }),
            "float tensor",
        ),
        ("negative", Box::new(|f| f.ints.get_mut("optim.step").unwrap().data[0] = -5), "at least 0"),
        ("bn", Box::new(|f| empty_int(f, "bn.num_batches_tracked")), "num_batches_tracked"),
    ];
    for (what, edit, needle) in edits {
        let dir = copy_of_run(&format!("counter-{what}"));
        let ckpt = dir.join("ckpt.safetensors");
        edit_checkpoint(&ckpt, edit);
        let config = std::fs::read(dir.join("config.json")).unwrap();
        assert_one_line_error(&resume(&dir, "3"), needle);
        assert_eq!(
            std::fs::read(dir.join("config.json")).unwrap(),
            config,
            "{what}: a failed resume rewrote config.json"
        );
        let out = run(&[
            "train-step",
            "--checkpoint",
            p(&ckpt),
            "--input",
            p(&fixture("train_step.safetensors")),
            "--output",
            p(&tmp("counter-out.safetensors")),
        ]);
        assert_one_line_error(&out, needle);
    }
}

#[test]
fn resume_refuses_edited_configs_naming_the_field() {
    // Items 4 and 15: config.json no longer matches the checkpoint, or is not a config at all.
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 6] = [
        ("img-size-0", |v| v["model"]["img_size"] = 0.into(), "image size 0"),
        ("timestep", |v| v["model"]["timestep"] = 8.into(), "'model.timestep' is 8"),
        ("batch", |v| v["batch"] = 3.into(), "'batch' is 3"),
        ("ch", |v| v["model"]["ch"] = 32.into(), "'model.ch' is 32"),
        ("lr-nan", |v| v["lr"] = serde_json::Value::String("nan".into()), "config.json"),
        ("lr-negative", |v| v["lr"] = (-1.0).into(), "lr"),
    ];
    for (what, edit, needle) in cases {
        let dir = copy_of_run(&format!("edited-{what}"));
        edit_config(&dir, edit);
        let before = std::fs::read(dir.join("config.json")).unwrap();
        let t = Instant::now();
        let out = resume(&dir, "3");
        assert_one_line_error(&out, needle);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("config.json"), "{what}: the message names the file: {err}");
        assert_eq!(std::fs::read(dir.join("config.json")).unwrap(), before, "{what}: config.json rewritten");
        assert!(!err.contains("tuned"), "{what}: refused only after tuning: {err}");
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: took {:?}", t.elapsed());
    }
    // An unedited run still resumes.
    let dir = copy_of_run("edited-none");
    ok(&resume(&dir, "3"));
}

#[test]
fn numbers_are_checked_before_any_work() {
    // Items 9 and 17: NaN, infinite and out-of-range flags fail at once, before a folder exists.
    let cases: &[(&[&str], &str)] = &[
        (&["--lr=nan"], "--lr"),
        (&["--lr=-1"], "--lr"),
        (&["--lr=inf"], "--lr"),
        (&["--ema", "nan"], "--ema"),
        (&["--ema", "2"], "--ema"),
        (&["--sample-n", "4", "--sample-steps", "0"], "--sample-steps"),
    ];
    for (i, (flags, needle)) in cases.iter().enumerate() {
        let dir = tmp(&format!("never-made-{i}"));
        let out = bin()
            .args(["train", "--steps", "2", "--size", "16", "--batch", "2"])
            .args(*flags)
            .arg("--out")
            .arg(&dir)
            .output()
            .unwrap();
        assert_one_line_error(&out, needle);
        assert!(!dir.exists(), "{flags:?}: made the run folder");
    }
    // A size no data can be resized to: refused, not an abort allocating 1e14 bytes.
    let out = run(&["train", "--size", "100000", "--steps", "1", "--out", p(&tmp("never-made-size"))]);
    assert_one_line_error(&out, "--size");
    for t in ["nan", "inf", "0", "-1"] {
        let threshold = format!("--threshold={t}");
        let sample = run(&["sample", "--preset", "tiny", "--n", "1", &threshold, "--out", p(&tmp("never.png"))]);
        assert_one_line_error(&sample, "--threshold");
        let energy = run(&["energy", "--preset", "tiny", &threshold]);
        assert_one_line_error(&energy, "--threshold");
        let forward = run(&[
            "forward",
            "--checkpoint",
            p(&fixture("weights.safetensors")),
            "--input",
            p(&fixture("forward.safetensors")),
            "--output",
            p(&tmp("never.safetensors")),
            &threshold,
        ]);
        assert_one_line_error(&forward, "--threshold");
    }
    assert!(!tmp("never.png").exists() && !tmp("never.safetensors").exists());
    let out = run(&[
        "train-step",
        "--checkpoint",
        p(&fixture("weights.safetensors")),
        "--input",
        p(&fixture("train_step.safetensors")),
        "--output",
        p(&tmp("never-step.safetensors")),
        "--lr=nan",
    ]);
    assert_one_line_error(&out, "--lr");
}

#[test]
fn non_finite_checkpoints_are_refused() {
    // Item 9: NaN Adam moments (or weights) would train on (or sample black images) with rc 0.
    let dir = copy_of_run("nan-moments");
    let ckpt = dir.join("ckpt.safetensors");
    edit_checkpoint(&ckpt, |f| f.tensors.get_mut("optim.conv.weight.exp_avg").unwrap().data[3] = f32::NAN);
    assert_one_line_error(&resume(&dir, "3"), "optim.conv.weight.exp_avg");
    let out = run(&["sample", "--checkpoint", p(&ckpt), "--n", "1", "--out", p(&tmp("nan.png"))]);
    assert_one_line_error(&out, "NaN");
    assert!(!tmp("nan.png").exists());
}

#[test]
fn sample_checks_its_model_and_index_range_even_for_empty_shards() {
    // Item 10: noise is keyed by a 32-bit image index; an empty shard still opens the checkpoint.
    // (Two images per share, so a binary without the check finishes quickly, wrongly.)
    let out = bin()
        .args(["--no-tune", "sample", "--preset", "tiny", "--size", "16", "--sampler", "ddim", "--steps", "1"])
        .args(["--n", "8589934592", "--shard", "4294967296/4294967296", "--out-dir", p(&tmp("s"))])
        .output()
        .unwrap();
    assert_one_line_error(&out, "--n 8589934592");
    let out = run(&[
        "sample",
        "--checkpoint",
        "/nonexistent.safetensors",
        "--n",
        "5",
        "--shard",
        "1/100",
        "--out-dir",
        p(&tmp("s")),
    ]);
    assert_one_line_error(&out, "/nonexistent.safetensors");
}

/// One 16 px image of the untrained tiny net, one DDIM step, no tuning: a few seconds.
fn quick_sample(extra: &[&str]) -> Output {
    bin()
        .args(["--no-tune", "sample", "--preset", "tiny", "--sampler", "ddim", "--steps", "1", "--size", "16"])
        .args(if extra.contains(&"--n") { &[][..] } else { &["--n", "1"][..] })
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn outputs_are_replaced_never_written_through_links() {
    // Item 11 and 12: a link at the destination is replaced, its target untouched, and nothing
    // but the output is left in the folder.
    let dir = tmp("links");
    std::fs::create_dir_all(&dir).unwrap();
    let victim = tmp("links-victim.txt");
    std::fs::write(&victim, b"precious").unwrap();
    let grid = dir.join("grid.png");
    let _ = std::fs::remove_file(&grid);
    std::os::unix::fs::symlink(&victim, &grid).unwrap();
    ok(&quick_sample(&["--out", p(&grid)]));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&grid).unwrap().file_type().is_file());
    image::open(&grid).unwrap();
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("grid.png")], "temporary files left behind");
    // Another user of a shared folder plants a link where a predictable temporary file
    // (`.NAME.<pid>.tmp`) would go: random, exclusively created names never open it.
    let shared = tmp("links-shared");
    std::fs::create_dir_all(&shared).unwrap();
    let out = shared.join("grid.png");
    let child = bin()
        .args(["--no-tune", "sample", "--preset", "tiny", "--sampler", "ddim", "--steps", "1", "--size", "16"])
        .args(["--n", "1", "--out", p(&out)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let planted = shared.join(format!(".grid.png.{}.tmp", child.id()));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    ok(&child.wait_with_output().unwrap());
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "wrote through the planted link");
    assert!(std::fs::symlink_metadata(&out).unwrap().file_type().is_file());
    std::fs::remove_file(&planted).unwrap();
}

#[test]
fn sample_out_dir_is_checked_before_sampling_and_stale_pngs_are_refused() {
    // Item 14 and 17.
    let dir = tmp("stale");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("000007.png"), b"an image of another run").unwrap();
    let out = quick_sample(&["--out-dir", p(&dir)]);
    assert_one_line_error(&out, "--overwrite");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 PNG"));
    ok(&quick_sample(&["--out-dir", p(&dir), "--overwrite"]));
    assert!(dir.join("000000.png").exists());
    // Another shard's images of the same job are not stale.
    let shards = tmp("shards");
    std::fs::create_dir_all(&shards).unwrap();
    std::fs::write(shards.join("000001.png"), b"shard 2 of 2").unwrap();
    ok(&quick_sample(&["--out-dir", p(&shards), "--n", "2", "--shard", "1/2"]));
    // An --out-dir that cannot be written fails before the checkpoint is even opened.
    let file = tmp("stale-file");
    std::fs::write(&file, b"x").unwrap();
    let out = run(&["sample", "--checkpoint", "/nonexistent.safetensors", "--out-dir", p(&file.join("sub"))]);
    assert_one_line_error(&out, "--out-dir");
}

/// Start a long training run into `dir`; returns once it has logged a step.
/// A child process killed when dropped, so a failing assertion never leaves a training run
/// behind (these runs train for 100000 steps unless told to stop).
struct Running(Option<std::process::Child>);

impl Running {
    fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }
    fn finish(mut self) -> Output {
        self.0.take().expect("running").wait_with_output().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_long_run(dir: &Path) -> Running {
    let child = Running(Some(
        bin()
            .args(["train", "--steps", "100000", "--ckpt-every", "100000"])
            .args(QUICK)
            .arg("--out")
            .arg(dir)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let csv = dir.join("loss.csv");
    let deadline = Instant::now() + Duration::from_secs(180);
    while std::fs::read_to_string(&csv).map_or(0, |t| t.lines().count()) < 2 {
        assert!(Instant::now() < deadline, "training never logged a step");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

#[test]
fn a_run_folder_has_one_run_and_sigterm_saves_it() {
    // Items 13 and 16.
    let dir = tmp("locked");
    let child = start_long_run(&dir);
    let second = run(&["train", "--steps", "3", "--resume", p(&dir)]);
    assert_one_line_error(&second, &format!("process {}", child.id()));
    let fresh = bin().args(["train", "--steps", "3"]).args(QUICK).arg("--out").arg(&dir).output().unwrap();
    assert!(!fresh.status.success());
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.finish();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "SIGTERM exits 143: {err}");
    assert!(err.contains("interrupted (SIGTERM)") && err.contains("--resume"), "{err}");
    let step = TensorFile::load(&dir.join("ckpt.safetensors")).unwrap().counter("optim.step").unwrap().unwrap();
    assert!((1..100000).contains(&step), "step {step}");
    ok(&resume(&dir, &(step + 1).to_string()));
}

#[test]
fn an_interrupt_during_tuning_leaves_nothing() {
    // Issue 21 item 2: a fresh run stopped before its first step removes what it wrote; a
    // folder with only config.json (a run killed during tuning) starts from step 0 on --resume.
    let dir = tmp("tuning-interrupted");
    let child = Running(Some(
        bin()
            .args(["train", "--steps", "2"])
            .args(QUICK)
            .arg("--out")
            .arg(&dir)
            .env("SDDPM_CACHE_DIR", tmp("cold-cache"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    // config.json is written before tuning starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("config.json").exists() {
        assert!(Instant::now() < deadline, "no config.json");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.finish();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted (SIGINT)") && err.contains("nothing to resume"), "{err}");
    assert!(!dir.exists(), "the interrupted run left {}", dir.display());
    // What a kill -9 during tuning leaves: config.json alone. --resume starts it.
    let killed = copy_of_run("killed-in-tuning");
    std::fs::remove_file(killed.join("ckpt.safetensors")).unwrap();
    let out = resume(&killed, "1");
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("from step 0"));
    assert!(killed.join("ckpt.safetensors").exists());
}

#[test]
fn integer_and_float_tensors_in_the_wrong_place_are_named() {
    // Item 18: an int64 weight, a float timestep.
    let ckpt = tmp("int-weight.safetensors");
    std::fs::copy(fixture("weights.safetensors"), &ckpt).unwrap();
    edit_checkpoint(&ckpt, |f| {
        let t = f.tensors.remove("conv.weight").unwrap();
        f.ints.insert(
            "conv.weight".into(),
            checkpoint::IntTensor { shape: t.shape, data: t.data.iter().map(|&v| v as i64).collect() },
        );
    });
    let out = run(&["sample", "--checkpoint", p(&ckpt), "--n", "1", "--out", p(&tmp("never2.png"))]);
    assert_one_line_error(&out, "integer tensors where floats belong");
    let input = tmp("float-t.safetensors");
    std::fs::copy(fixture("forward.safetensors"), &input).unwrap();
    edit_checkpoint(&input, |f| {
        let t = f.ints.remove("t").unwrap();
        f.tensors.insert(
            "t".into(),
            checkpoint::Tensor { shape: t.shape, data: t.data.iter().map(|&v| v as f32).collect() },
        );
    });
    let out = run(&[
        "forward",
        "--checkpoint",
        p(&fixture("weights.safetensors")),
        "--input",
        p(&input),
        "--output",
        p(&tmp("never3.safetensors")),
    ]);
    assert_one_line_error(&out, "'t' is a float tensor");
}

fn no_weights(args: &[&str]) -> Output {
    bin().args(args).env_remove("SDDPM_FID_WEIGHTS").env("XDG_CACHE_HOME", tmp("empty-cache")).output().unwrap()
}

/// Statistics of dimension 4 with `rows` feature rows.
fn small_stats(path: &Path, rows: usize) {
    let stats = sddpm_gpu::fid::Stats {
        dim: 4,
        n: Some(rows.max(2)),
        mu: vec![0.1, 0.2, 0.3, 0.4],
        sigma: (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect(),
        features: Some((0..rows * 4).map(|i| i as f32 * 0.01).collect()),
    };
    sddpm_gpu::fid::npz::write_stats(path, &stats).unwrap();
}

#[test]
fn fid_checks_outputs_first_and_reports_what_it_can() {
    // Item 17: --save-stats that cannot be written fails before any feature is computed (the
    // weights are looked up first otherwise: their error would come instead).
    let file = tmp("fid-a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = no_weights(&["fid", p(&fixture("fid/images/gray")), "--save-stats", p(&file.join("x.npz"))]);
    assert_one_line_error(&out, "--save-stats");
    // Item 18: KID of a set with one feature row is n/a, naming the file; the FID still prints.
    let (one, three) = (tmp("fid-one-row.npz"), tmp("fid-three-rows.NPZ"));
    small_stats(&one, 1);
    small_stats(&three, 3);
    let text = ok(&no_weights(&["fid", p(&three), p(&one)]));
    assert!(text.contains("FID 0.0000") && text.contains("KID n/a") && text.contains("fid-one-row.npz"), "{text}");
    // SDDPM_FID_WEIGHTS= (empty) is unset, not a path named "".
    let out = bin()
        .args(["fid", p(&fixture("fid/images/gray")), p(&one)])
        .env("SDDPM_FID_WEIGHTS", "")
        .env("XDG_CACHE_HOME", tmp("empty-cache"))
        .output()
        .unwrap();
    assert_one_line_error(&out, "--weights");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("cannot read :"));
}

#[test]
fn images_too_large_for_the_gpu_name_the_file() {
    // Item 18: checked from the PNG header before the network runs.
    let dir = tmp("fid-huge");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("fid/images/gray/000.png"), dir.join("000.png")).unwrap();
    image::GrayImage::new(6000, 6000).save(dir.join("001.png")).unwrap();
    let sddpm_gpu::fid::inputs::Input::Images(images) = sddpm_gpu::fid::inputs::Input::open(&dir).unwrap() else {
        panic!("an image folder")
    };
    let e = images.check_fits(128 << 20).unwrap_err().to_string();
    assert!(e.contains("001.png") && e.contains("6000x6000") && !e.contains("batch"), "{e}");
    images.check_fits(1 << 30).unwrap();
}
