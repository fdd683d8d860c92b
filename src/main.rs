//! The `sddpm-gpu` command line: parsing and dispatch only. Each subcommand is a module of
//! src/cli/ (its arguments and one function calling the library).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use sddpm_gpu::gpu;

mod cli;

#[derive(Parser)]
#[command(name = "sddpm-gpu", version, about = "Spiking DDPMs on any GPU wgpu reaches (Vulkan, Metal, DX12)")]
struct Cli {
    /// Use the first adapter whose name contains this (case-insensitive); default: the best one
    /// (discrete > integrated > virtual > CPU). WGPU_BACKEND=vulkan|metal|dx12|gl limits the APIs.
    #[arg(long, global = true, env = "SDDPM_ADAPTER")]
    adapter: Option<String>,
    /// Use every op's default kernel instead of timing the variants on this adapter (also
    /// SDDPM_NO_TUNE=1). Tuning results are cached in $SDDPM_CACHE_DIR (default ~/.cache/sddpm-gpu).
    #[arg(long, global = true)]
    no_tune: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter with the features and limits that matter; `*` marks the one chosen.
    Devices(cli::devices::DevicesArgs),
    /// One network evaluation, for parity checks against PyTorch: IN holds `x` [B,C,H,W] f32 and
    /// `t` [B] int64/int32; OUT gets `eps` [B,C,H,W] f32.
    Forward(cli::parity::ForwardArgs),
    /// Sample images from a trained model, entirely on the GPU.
    Sample(cli::sample::SampleArgs),
    /// Train a model. With no arguments: the `tiny` net on the embedded MNIST subset.
    Train(cli::train::TrainArgs),
    /// Time every shader dispatch of network evaluations (or training steps with --train) with
    /// GPU timestamps: per-kernel and per-layer tables, totals, optional Chrome trace.
    Profile(cli::profile::ProfileArgs),
    /// Firing rate of every spiking layer and the paper's energy estimate per network evaluation.
    Energy(cli::energy::EnergyArgs),
    /// FID and KID between two image sets (pytorch-fid protocol, torch-fidelity KID) with the FID
    /// Inception-v3 on our kernels.
    Fid(cli::fid::FidArgs),
    /// One training step for parity checks: IN holds `x0` [B,C,H,W], `t` [B], `noise` [B,C,H,W];
    /// writes the updated checkpoint (weights, BN statistics, Adam state) and prints one JSON
    /// line with `loss` and `grad_norm` (before clipping).
    TrainStep(cli::parity::TrainStepArgs),
    /// Convert a checkpoint (an official SDDPM or pytorch-ddpm .pt, or ours) into a safetensors
    /// checkpoint with its config in the metadata; no Python needed.
    Convert(cli::convert::ConvertArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // WGPU_BACKEND decides which adapters exist at all: a misspelt one is named at once.
    if let Err(e) = gpu::check_backend_env() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    if cli.no_tune {
        // Every context reads this (sddpm_gpu::tune::Tuning::from_env); set before any thread starts.
        std::env::set_var("SDDPM_NO_TUNE", "1");
    }
    let adapter = cli.adapter.as_deref();
    let result = match &cli.command {
        Command::Devices(a) => cli::devices::run(adapter, a),
        Command::Forward(a) => cli::parity::forward(adapter, a),
        Command::Sample(a) => cli::sample::run(adapter, a),
        Command::Train(a) => cli::train::run(adapter, a),
        Command::Profile(a) => cli::profile::run(adapter, a),
        Command::Energy(a) => cli::energy::run(adapter, a),
        Command::Fid(a) => cli::fid::run(adapter, a),
        Command::TrainStep(a) => cli::parity::train_step(adapter, a),
        Command::Convert(a) => cli::convert::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A rank of several whose reason rank 0 printed already.
        Err(e) if e.is::<sddpm_gpu::dist::SaidByRank0>() => {
            ExitCode::from(e.downcast_ref::<sddpm_gpu::dist::SaidByRank0>().map_or(1, |s| s.0))
        }
        Err(e) => match sddpm_gpu::signal::interrupted(&e) {
            // Not an error: the run stopped as asked and says what it kept; 130 / 143 tell a
            // scheduler it did not finish.
            Some(i) => {
                cli::say_line(&i.to_string());
                ExitCode::from(i.signal.exit_code())
            }
            None => {
                cli::say_line(&format!("error: {e:#}"));
                ExitCode::FAILURE
            }
        },
    }
}
