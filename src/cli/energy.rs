//! `energy`: firing rate of every spiking layer and the paper's energy estimate per network
//! evaluation; for an ANN, MACs and energy from its shape alone.

use std::path::PathBuf;

use anyhow::{bail, Result};

use sddpm_gpu::checkpoint::TensorFile;
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::Net;

use super::{check_threshold_value, load_model, WeightsArg};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("model_source").required(true).args(["checkpoint", "preset"])))]
pub struct EnergyArgs {
    /// Model weights (safetensors or an official .pt).
    #[arg(long, conflicts_with = "model")]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: ema or raw [default: ema when the checkpoint has EMA weights].
    #[arg(long, value_enum, requires = "checkpoint")]
    pub weights: Option<WeightsArg>,
    /// Untrained weights of a preset instead of a checkpoint (firing rates of untrained weights;
    /// for --model ddpm the estimate needs no weights at all).
    #[arg(long)]
    pub preset: Option<String>,
    /// Model of --preset: sddpm or ddpm.
    #[arg(long)]
    pub model: Option<String>,
    /// Inputs as for `forward` (x [B,C,H,W], t [B]); default: --n Gaussian-noise images at --t.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Diffusion step of the generated inputs.
    #[arg(long, default_value_t = 999)]
    pub t: u32,
    /// Number of generated inputs.
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    /// Firing threshold of every neuron (threshold guidance).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub threshold: f32,
    #[arg(long)]
    pub snn_steps: Option<usize>,
    /// Image side of the generated inputs (default: the model's).
    #[arg(long)]
    pub size: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(adapter: Option<&str>, a: &EnergyArgs) -> Result<()> {
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
