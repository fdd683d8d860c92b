//! `mpirun -np 2 sddpm-gpu ...` end to end (issue 18), from an ordinary test process that launches
//! mpirun itself: needs `--features mpi` and Open MPI's mpirun on PATH (.ci/run installs both).
#![cfg(feature = "mpi")]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{fixture_in, tmp};
use sddpm_gpu::checkpoint::TensorFile;

/// `mpirun -np N` of the binary with `args`, killed after `limit` (a hung rank fails the test).
fn mpirun(n: usize, args: &[&str], limit: Duration) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=10").arg(limit.as_secs().to_string()).arg("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string()]);
    for var in ["WGPU_BACKEND", "CI", "XDG_RUNTIME_DIR", "HOME"] {
        if std::env::var_os(var).is_some() {
            cmd.args(["-x", var]);
        }
    }
    cmd.arg(env!("CARGO_BIN_EXE_sddpm-gpu")).args(args);
    let out = cmd.output().expect("mpirun (apt install openmpi-bin)");
    assert_ne!(out.status.code(), Some(124), "mpirun ran past {limit:?}: a rank hung");
    out
}

/// `mpirun -np 2 sddpm-gpu train-step --steps 2` reproduces the DDP fixture: each rank its share
/// of both batches, rank 0 alone prints the global loss and grad norm and writes the checkpoint.
#[test]
fn mpirun_train_step_reproduces_the_ddp_fixture() {
    let out_path = tmp("mpi_cli_after.safetensors");
    let (w, f) =
        (fixture_in(common::ddp::DIR, "weights.safetensors"), fixture_in(common::ddp::DIR, "ddp_step.safetensors"));
    let args = ["train-step", "--checkpoint", w.to_str().unwrap(), "--input", f.to_str().unwrap()];
    let mut args = args.to_vec();
    args.extend(["--output", out_path.to_str().unwrap(), "--steps", "2"]);
    let out = mpirun(2, &args, Duration::from_secs(400));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "mpirun failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(lines.len(), 2, "rank 0 alone prints one line per step:\n{text}");
    let got: Vec<(f32, f32)> =
        lines.iter().map(|v| (v["loss"].as_f64().unwrap() as f32, v["grad_norm"].as_f64().unwrap() as f32)).collect();
    let (fx, before) = (TensorFile::load(&f).unwrap(), TensorFile::load(&w).unwrap());
    common::ddp::check(&fx, &before, &got, &TensorFile::load(&out_path).unwrap(), "mpirun -np 2 train-step");
    // A global batch that does not divide by the ranks: one error line per rank, no hang.
    let odd = mpirun(
        2,
        &[
            "train-step",
            "--checkpoint",
            w.to_str().unwrap(),
            "--input",
            f.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
            "--steps",
            "8",
        ],
        Duration::from_secs(200),
    );
    let err = String::from_utf8_lossy(&odd.stderr);
    assert!(!odd.status.success() && err.contains("must divide by the 2 ranks"), "{err}");
}
