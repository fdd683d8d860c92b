//! `profile`: per-kernel and per-layer GPU times of network evaluations or training steps, or
//! (`--dry-run`) the planned graph's memory and cost model without a GPU.

use std::path::PathBuf;

use anyhow::{bail, Result};

use sddpm_gpu::diffusion::{TrainOptions, Trainer};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::{EvalNet, Net};
use sddpm_gpu::weights;

use super::{load_model, WeightsArg};

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Model weights (safetensors or an official .pt); or use --preset for untrained weights.
    #[arg(long, conflicts_with_all = ["preset", "model"])]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: ema or raw [default: ema when the checkpoint has EMA weights].
    #[arg(long, value_enum, requires = "checkpoint")]
    pub weights: Option<WeightsArg>,
    /// Preset with untrained weights: cifar10, celeba64, mnist, fashion, small, tiny (default tiny;
    /// with --model ddpm: cifar10, pytorch-ddpm-cifar10, mnist, small, tiny).
    #[arg(long)]
    pub preset: Option<String>,
    /// Model of --preset: sddpm (the spiking U-Net) or ddpm (its ANN counterpart, pytorch-ddpm's).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long)]
    pub snn_steps: Option<usize>,
    /// Image side in pixels (default: the model's).
    #[arg(long)]
    pub size: Option<usize>,
    /// With --preset: spiking self-attention on these levels (as `train --attn`).
    #[arg(long, value_delimiter = ',', conflicts_with = "checkpoint")]
    pub attn: Vec<usize>,
    /// With --preset and --attn: attention heads.
    #[arg(long, default_value_t = 1, conflicts_with = "checkpoint", requires = "attn")]
    pub heads: usize,
    /// Profile training steps (forward, backward, optimizer) instead of network evaluations.
    #[arg(long)]
    pub train: bool,
    /// Profiled iterations after one warm-up.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Write a Chrome trace (opens in Perfetto and chrome://tracing): one event per dispatch.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Time dispatches with host timers even when the adapter has timestamp queries.
    #[arg(long)]
    pub host_timers: bool,
    /// Build and plan the graph without a GPU and print the plan (memory, cost model, largest
    /// bindings): any preset and batch, whether or not this adapter could hold it.
    #[arg(long, conflicts_with_all = ["trace", "host_timers"])]
    pub dry_run: bool,
    /// With --dry-run: ESTIMATE each dispatch's time on this card (h100, h200, a100, rtx4090, m2) with
    /// the GPU model (src/gpu_model.rs), each node running the variant the model predicts fastest.
    #[arg(long, requires = "dry_run")]
    pub gpu_model: Option<String>,
    /// With --gpu-model: print the estimate as one JSON object.
    #[arg(long, requires = "gpu_model")]
    pub json: bool,
    /// With --gpu-model: print the model beside this measured trace (`profile --trace` of the
    /// same preset, batch, size and --train on a real card), per kernel and kernel kind.
    #[arg(long, requires = "gpu_model", conflicts_with = "json")]
    pub compare_trace: Option<PathBuf>,
}

pub fn run(adapter: Option<&str>, a: &ProfileArgs) -> Result<()> {
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
    let gpu = a.gpu_model.as_deref().map(sddpm_gpu::gpu_model::spec).transpose()?;
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
    let mut g = if a.train {
        sddpm_gpu::diffusion::train_graph(&cfg, a.batch, size, &TrainOptions::default())?
    } else {
        let (mut g, _, _, unet) = sddpm_gpu::model::eval_graph(&cfg, a.batch, size, 1.0)?;
        g.mark_output(unet.eps);
        g
    };
    if let Some(gpu) = gpu.filter(|_| a.json || a.compare_trace.is_some()) {
        // Machine-read outputs: no banner.
        print!("{}", sddpm_gpu::gpu_model::dry_run(&mut g, gpu, a.json, a.compare_trace.as_deref())?);
        return Ok(());
    }
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
    match gpu {
        Some(gpu) => print!("{}", sddpm_gpu::gpu_model::dry_run(&mut g, gpu, false, None)?),
        None => print!("{}", sddpm_gpu::profile::dry_run(&g)),
    }
    Ok(())
}
