//! `sddpm-gpu fid` end to end: statistics files, one-line errors, and (with SDDPM_FID_WEIGHTS
//! set, see tests/fid_inception.rs) image folders, --save-stats and --json. The tests that need the
//! weights are `#[ignore]`d (reported as ignored by a plain `cargo test`); included with
//! `-- --include-ignored` they fail without them.

mod common;

use std::path::Path;

use common::{assert_one_line_error, fixture, run, tmp};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// SDDPM_FID_WEIGHTS, which a test that asked for the Inception fails without.
fn weights() -> String {
    std::env::var("SDDPM_FID_WEIGHTS")
        .ok()
        .filter(|v| !v.is_empty())
        .expect("SDDPM_FID_WEIGHTS is not set: point it at default_1.pt (see tests/fid_inception.rs)")
}

fn no_weights(args: &[&str]) -> std::process::Output {
    common::bin().args(args).env_remove("SDDPM_FID_WEIGHTS").env("XDG_CACHE_HOME", tmp("empty-cache")).output().unwrap()
}

#[test]
fn fid_of_statistics_files_needs_no_network() {
    let stats = fixture("fid/stats_a.npz");
    let out = no_weights(&["fid", p(&stats), p(&stats), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["fid"].as_f64().unwrap().abs() < 1e-9, "{v}");
    assert!(v["kid"].is_null() && v["n_a"].is_null(), "pytorch-fid statistics hold no features: {v}");
}

#[test]
fn fid_input_errors_are_one_line() {
    let stats = fixture("fid/stats_a.npz");
    let empty = tmp("fid-empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(&no_weights(&["fid", p(&empty), p(&stats)]), "fid-empty");
    let one = tmp("fid-one");
    std::fs::create_dir_all(&one).unwrap();
    std::fs::copy(fixture("fid/images/gray/000.png"), one.join("000.png")).unwrap();
    assert_one_line_error(&no_weights(&["fid", p(&one), p(&stats)]), "at least 2");
    // Missing weights name both sources.
    let out = no_weights(&["fid", p(&fixture("fid/images/gray")), p(&stats)]);
    assert_one_line_error(&out, "--weights");
    assert!(String::from_utf8_lossy(&out.stderr).contains("SDDPM_FID_WEIGHTS"));
    let out = no_weights(&["fid", p(&fixture("fid/images/gray")), p(&stats), "--weights", p(&stats)]);
    assert_one_line_error(&out, "stats_a.npz");
    // 16-d statistics against 2048-d features, or against other 16-d ones of the wrong shape.
    let other = tmp("fid-24d.npz");
    let (shape, data) = sddpm_gpu::fid::npz::read_array(&fixture("fid/features.npz"), "c").unwrap();
    let f: Vec<f32> = data.iter().map(|&v| v as f32).collect();
    sddpm_gpu::fid::npz::write_stats(&other, &sddpm_gpu::fid::Stats::from_features(f, shape[1]).unwrap()).unwrap();
    assert_one_line_error(&no_weights(&["fid", p(&stats), p(&other)]), "16-d");
    assert_one_line_error(&no_weights(&["fid", p(&tmp("nothing-here")), p(&stats)]), "nothing-here");
}

/// An image that does not decode is named, once the network it would feed is loaded (without the
/// weights the missing weights are the first error: see [`fid_input_errors_are_one_line`]).
#[test]
#[ignore = "needs the FID Inception weights: SDDPM_FID_WEIGHTS, -- --include-ignored"]
fn a_broken_image_is_named_in_a_one_line_error() {
    let w = weights();
    let stats = fixture("fid/stats_a.npz");
    let broken = tmp("fid-broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("a.png"), b"not a png").unwrap();
    std::fs::write(broken.join("b.png"), b"not a png").unwrap();
    assert_one_line_error(&run(&["fid", p(&broken), p(&stats), "--weights", &w]), "a.png");
}

#[test]
#[ignore = "needs the FID Inception weights: SDDPM_FID_WEIGHTS, -- --include-ignored"]
fn fid_of_folders_and_saved_statistics_agree() {
    let w = weights();
    let (gray, rgb) = (fixture("fid/images/gray"), fixture("fid/images/rgb"));
    let saved = tmp("gray.npz");
    let out = run(&["fid", p(&gray), p(&rgb), "--weights", &w, "--json", "--batch", "3", "--save-stats", p(&saved)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["n_a"].as_u64(), v["n_b"].as_u64()), (Some(3), Some(4)));
    // One progress count over both folders' images (in a pipe: lines, the last at 7 of 7).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().any(|l| l.starts_with("fid: 7/7 images (100%)")), "{err}");
    let again = run(&["fid", p(&saved), p(&rgb), "--weights", &w, "--json"]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let v2: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    let (f1, f2) = (v["fid"].as_f64().unwrap(), v2["fid"].as_f64().unwrap());
    assert_eq!(f1, f2, "FID with saved statistics vs images");
    assert_eq!(v["kid"], v2["kid"], "saved features give the same KID");
}

fn reference_2048(name: &str) -> std::path::PathBuf {
    // Statistics of 3 made-up 2048-d feature vectors: enough to check the logging, not a real FID.
    let f: Vec<f32> = (0..3 * 2048).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let path = tmp(name);
    sddpm_gpu::fid::npz::write_stats(&path, &sddpm_gpu::fid::Stats::from_features(f, 2048).unwrap()).unwrap();
    path
}

#[test]
fn train_fid_every_errors_are_one_line() {
    let base = ["train", "--steps", "1", "--size", "16", "--batch", "2", "--sample-n", "0", "--fid-every", "1"];
    let run_in = |extra: &[&str], name: &str| {
        let mut args: Vec<&str> = base.to_vec();
        let out = tmp(name);
        args.extend_from_slice(&["--out", p(&out)]);
        args.extend_from_slice(extra);
        no_weights(&args)
    };
    assert_one_line_error(&run_in(&[], "run-no-ref"), "--fid-ref");
    let stats = fixture("fid/stats_a.npz");
    assert_one_line_error(&run_in(&["--fid-ref", p(&stats)], "run-16d"), "16-d");
    let reference = reference_2048("ref-noweights.npz");
    assert_one_line_error(&run_in(&["--fid-ref", p(&reference)], "run-noweights"), "SDDPM_FID_WEIGHTS");
}

#[test]
#[ignore = "needs the FID Inception weights: SDDPM_FID_WEIGHTS, -- --include-ignored"]
fn train_logs_fid_and_kid() {
    let w = weights();
    let reference = reference_2048("ref.npz");
    let dir = tmp("run-fid");
    let out = run(&[
        "train",
        "--steps",
        "2",
        "--size",
        "16",
        "--batch",
        "2",
        "--sample-n",
        "0",
        "--fid-every",
        "2",
        "--fid-ref",
        p(&reference),
        "--fid-n",
        "2",
        "--fid-steps",
        "1",
        "--fid-weights",
        &w,
        "--out",
        p(&dir),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(dir.join("fid.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "step,fid,kid,kid_std");
    assert_eq!(lines.len(), 2, "{csv}");
    let fields: Vec<f64> = lines[1].split(',').map(|v| v.parse().unwrap()).collect();
    assert_eq!(fields[0], 2.0);
    assert!(fields[1].is_finite() && fields[1] > 0.0 && fields[2].is_finite(), "{csv}");
    assert!(dir.join("fid.png").exists());
}
