//! `train`: a new run from presets and flags (assembled into a [`RunConfig`] and checked before
//! anything is created), or `--resume` of a run folder; the run itself is `run::train`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::ValueEnum;

use sddpm_gpu::diffusion::{plan_steps, SamplerKind, Schedule};
use sddpm_gpu::dist::{self, Comm};
use sddpm_gpu::model::{Net, NeuronKind};
use sddpm_gpu::run::{self, RunConfig};

use super::check_lr;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Model preset: cifar10, celeba64, mnist, fashion, small, tiny (default: tiny). small and
    /// tiny take as many image channels as the data has; the dataset presets keep theirs.
    #[arg(long)]
    pub preset: Option<String>,
    /// sddpm (the spiking U-Net, default) or ddpm (its ANN counterpart, pytorch-ddpm's U-Net;
    /// presets cifar10, pytorch-ddpm-cifar10, mnist, small, tiny).
    #[arg(long, default_value = "sddpm")]
    pub model: String,
    /// Dataset: an MNIST/Fashion-MNIST IDX file or folder, a CIFAR-10 binary folder, or a folder
    /// of PNG/JPEG images (format detected). Default: the embedded 10,000-image MNIST subset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Total optimizer steps of the run [default: 300; with --resume: the run's own].
    #[arg(long, allow_negative_numbers = true)]
    pub steps: Option<u64>,
    /// Images per step (default: 8 for tiny/small, 32 for the paper's nets as the reference).
    #[arg(long, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Adam learning rate (the reference: 2e-4).
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
    pub lr: f32,
    /// Linear learning-rate warmup steps (the reference: none).
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Keep an EMA of the weights with this decay, e.g. 0.9999 (the reference: off).
    #[arg(long, allow_negative_numbers = true)]
    pub ema: Option<f32>,
    /// BatchNorm statistics over G groups of the batch, running statistics from group 0: one
    /// device trains as G-GPU data parallelism does (`--batch 32 --bn-groups 8`: the paper's run)
    /// [default: 1; under N MPI ranks N, each rank's share normalised alone, as DataParallel].
    #[arg(long, value_name = "G")]
    pub bn_groups: Option<usize>,
    /// Spiking time steps T (default 4).
    #[arg(long)]
    pub snn_steps: Option<usize>,
    /// Levels (indices into the preset's channel multipliers, e.g. 1 or 1,2) whose down and up
    /// ResBlocks end in spiking self-attention (default: none, as the reference).
    #[arg(long, value_delimiter = ',')]
    pub attn: Vec<usize>,
    /// Heads of the spiking self-attention; must divide the channels of every --attn level.
    #[arg(long, default_value_t = 1, requires = "attn")]
    pub heads: usize,
    /// Spiking neuron: if (the reference) or lif (leaky, time constant --tau).
    #[arg(long, value_enum, default_value = "if")]
    pub neuron: NeuronArg,
    /// LIF membrane time constant, at least 1 (with --neuron lif) [default: 2].
    #[arg(long, allow_negative_numbers = true)]
    pub tau: Option<f32>,
    /// Image side in pixels (default: the preset's).
    #[arg(long)]
    pub size: Option<usize>,
    /// Seed of initialisation, data order, timesteps and noise (the reference: 42).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Run folder (default: runs/<preset>-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this folder from its checkpoint, bit-identically (only --steps may
    /// change).
    #[arg(long, conflicts_with_all = ["out", "preset", "data", "batch", "lr", "seed", "snn_steps", "size", "warmup", "ema", "bn_groups", "model", "attn", "heads", "neuron", "tau"])]
    pub resume: Option<PathBuf>,
    /// Write a sample grid every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub sample_every: u64,
    /// Write the checkpoint every N steps (always at the end and on Ctrl-C).
    #[arg(long, default_value_t = 100)]
    pub ckpt_every: u64,
    /// Images in each sample grid (0: no grids).
    #[arg(long, default_value_t = 8)]
    pub sample_n: usize,
    /// DDIM steps for the sample grids.
    #[arg(long, default_value_t = 20)]
    pub sample_steps: usize,
    /// Compute FID and KID of fresh samples every N steps (fid.csv, fid.png in the run folder).
    #[arg(long, default_value_t = 0)]
    pub fid_every: u64,
    /// Reference statistics for --fid-every (pytorch-fid .npz, e.g. from `fid DATA --save-stats`).
    #[arg(long, value_name = "STATS.npz")]
    pub fid_ref: Option<PathBuf>,
    /// Samples per FID evaluation.
    #[arg(long, default_value_t = 1000)]
    pub fid_n: usize,
    /// DDIM steps per FID sample.
    #[arg(long, default_value_t = 100)]
    pub fid_steps: usize,
    /// FID Inception weights [default: $SDDPM_FID_WEIGHTS, else ~/.cache/sddpm-gpu/default_1.pt].
    #[arg(long)]
    pub fid_weights: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum NeuronArg {
    /// Integrate-and-fire (the reference's IFNode).
    If,
    /// Leaky integrate-and-fire, spikingjelly's LIFNode with decay_input.
    Lif,
}

pub fn run(adapter: Option<&str>, a: &TrainArgs) -> Result<()> {
    // Before any work (tuning included): an interrupt from now on stops the run where its state
    // is consistent, instead of killing it (sddpm_gpu::signal).
    if let Err(e) = sddpm_gpu::signal::install() {
        eprintln!("warning: {e:#}; Ctrl-C and SIGTERM will kill the run without a checkpoint");
    }
    let comm = dist::world()?;
    let result = run_ranks(adapter, comm.as_ref(), a);
    super::end_ranks(comm.as_ref(), result)
}

/// The run on every rank: rank 0 resolves the settings and the folder (the same name for all,
/// even the default one made of the time), the others follow its decision.
fn run_ranks(adapter: Option<&str>, comm: &dyn Comm, a: &TrainArgs) -> Result<()> {
    let ranks = comm.size();
    let (cfg, dir, resume) = dist::decide(comm, || {
        check_train_args(a)?;
        let (cfg, dir, resume) = match &a.resume {
            Some(dir) => (resumed_run(dir, a.steps)?, dir.clone(), true),
            None => {
                let (cfg, dir) = new_run(a, ranks)?;
                (cfg, dir, false)
            }
        };
        run::check_ranks(&cfg, ranks)?;
        Ok((cfg, dir, resume))
    })?;
    let ctx = super::open_context(adapter, comm)?;
    run::train(&ctx, comm, &cfg, &dir, resume)
}

/// The settings of the run in `dir` (its config.json), with `--steps` the one thing that may change.
fn resumed_run(dir: &Path, steps: Option<u64>) -> Result<RunConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut cfg: RunConfig =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: not a run config ({e})", path.display()))?;
    cfg.steps = steps.unwrap_or(cfg.steps);
    // Edited or damaged settings fail here, before any work, naming the file.
    cfg.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// A new run's settings assembled from the preset and the flags, and its folder, both checked
/// (see [`check_new_run`]) before anything is created.
fn new_run(a: &TrainArgs, ranks: usize) -> Result<(RunConfig, PathBuf)> {
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
        bn_groups: a.bn_groups.unwrap_or(ranks),
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
    // Before the config's own checks: under N ranks a batch that does not split is the error.
    run::check_ranks(&cfg, ranks)?;
    check_new_run(&cfg, &dir)?;
    Ok((cfg, dir))
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

/// A new run's settings and folder, checked before any folder is made or GPU work starts.
fn check_new_run(cfg: &RunConfig, dir: &Path) -> Result<()> {
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
