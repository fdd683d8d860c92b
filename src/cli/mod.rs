//! The `sddpm-gpu` subcommands, one module each: its arguments (clap) and one function that checks
//! them and calls the library. main.rs only parses and dispatches. What several commands share
//! (the weights selector, loading a checkpoint or a preset, the threshold and learning-rate
//! checks) lives here.

use std::path::Path;

use anyhow::{bail, Result};
use clap::ValueEnum;

use sddpm_gpu::checkpoint::Checkpoint;
use sddpm_gpu::dist::{self, Comm};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::Net;
use sddpm_gpu::weights::{self, Which};

pub mod convert;
pub mod devices;
pub mod energy;
pub mod fid;
pub mod parity;
pub mod profile;
pub mod sample;
pub mod train;

/// Which weights of a checkpoint a command evaluates.
#[derive(Clone, Copy, ValueEnum)]
pub enum WeightsArg {
    /// The exponential moving average (`ema.*` of `train --ema`; pytorch-ddpm's `ema_model`).
    Ema,
    /// The trained weights themselves (`net_model` of a PyTorch checkpoint).
    Raw,
}

impl WeightsArg {
    pub fn which(w: Option<WeightsArg>) -> Option<Which> {
        w.map(|w| match w {
            WeightsArg::Ema => Which::Ema,
            WeightsArg::Raw => Which::Raw,
        })
    }
}

/// Weights and config from a checkpoint, or fresh weights of a preset of `model` (sddpm by
/// default), with a notice.
pub fn load_model(
    ckpt: Option<&Path>,
    which: Option<Which>,
    model: Option<&str>,
    preset: Option<&str>,
    snn_steps: Option<usize>,
    seed: u64,
) -> Result<(Checkpoint, Net)> {
    if let Some(path) = ckpt {
        return weights::open(path, which, snn_steps);
    }
    let mut cfg = Net::preset(model.unwrap_or("sddpm"), preset.unwrap_or("tiny"))?;
    if let Some(t) = snn_steps {
        cfg.set_snn_steps(t)?;
    }
    eprintln!("note: untrained {} {} weights (no --checkpoint)", cfg.kind(), preset.unwrap_or("tiny"));
    Ok((cfg.init_weights(seed), cfg))
}

/// The device of this process: under several MPI ranks the n-th discrete adapter of the node
/// for node-local rank n (see `gpu::choose_for_rank`); --adapter still overrides.
pub fn open_context(adapter: Option<&str>, comm: &dyn Comm) -> Result<Context> {
    let local = (comm.size() > 1).then(dist::local_rank);
    Context::for_rank(adapter, local)
}

/// A command's result on a rank of several: an error only this rank hit is printed with the
/// rank and ends the whole job (MPI_Abort), since the others may wait for this rank in a
/// collective; an outcome all ranks reached together is printed once, by rank 0.
pub fn end_ranks(comm: &dyn Comm, result: Result<()>) -> Result<()> {
    let Err(e) = result else { return Ok(()) };
    if comm.size() == 1 {
        return Err(e);
    }
    if dist::agreed(&e) {
        if comm.rank() == 0 {
            return Err(e);
        }
        let code = sddpm_gpu::signal::interrupted(&e).map_or(1, |i| i.signal.exit_code());
        return Err(dist::SaidByRank0(code).into());
    }
    match sddpm_gpu::signal::interrupted(&e) {
        Some(i) => say_line(&format!("rank {}: {i}", comm.rank())),
        None => say_line(&format!("error: rank {}: {e:#}", comm.rank())),
    }
    comm.abort(1);
    Err(e)
}

/// `line` and a newline on stderr in one write: under mpirun, which forwards every rank's
/// output and prints its own reports to the same stream, a line written in pieces (as
/// `eprintln!` writes its arguments) can be cut by another's.
pub fn say_line(line: &str) {
    use std::io::Write as _;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// --threshold is a firing threshold: positive and finite (the paper's guidance uses ~0.99).
pub fn check_threshold_value(threshold: f32) -> Result<()> {
    if !(threshold.is_finite() && threshold > 0.0) {
        bail!("--threshold must be a positive finite firing threshold (1.0 as trained; 0.997 for guidance), got {threshold}");
    }
    Ok(())
}

/// --lr of `train` and `train-step`: a positive finite learning rate.
pub fn check_lr(lr: f32) -> Result<()> {
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--lr must be a positive finite learning rate (the reference: 2e-4), got {lr}");
    }
    Ok(())
}

/// Threshold guidance moves spiking thresholds; an ANN has none.
pub fn check_threshold(cfg: &Net, threshold: f32) -> Result<()> {
    if cfg.snn_steps().is_none() && threshold != 1.0 {
        bail!("--threshold applies to spiking models only; this is a {} model", cfg.kind());
    }
    Ok(())
}
