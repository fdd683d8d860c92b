//! `forward` and `train-step`: one network evaluation or one training step on tensors from a
//! file, for parity checks against the PyTorch reference (tools/, tests/fixtures.rs).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use sddpm_gpu::checkpoint::{self, Data, TensorFile};
use sddpm_gpu::diffusion::{TrainOptions, Trainer};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::EvalNet;
use sddpm_gpu::weights::{self, Which};

use super::{check_lr, check_threshold, check_threshold_value, WeightsArg};

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// Model weights: a safetensors checkpoint (official state_dict names) or an official
    /// SDDPM / pytorch-ddpm PyTorch checkpoint (.pt).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// ema or raw [default: ema when the checkpoint has EMA weights].
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    /// Firing threshold of every spiking neuron (threshold-guided sampling; trained at 1.0).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub threshold: f32,
    /// Spiking time steps T (default: the checkpoint's, else 4).
    #[arg(long)]
    pub snn_steps: Option<usize>,
}

#[derive(clap::Args)]
pub struct TrainStepArgs {
    /// Training state (safetensors), or the trained weights of a PyTorch checkpoint (.pt).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub input: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long)]
    pub snn_steps: Option<usize>,
    #[arg(long, default_value_t = 2e-4, allow_negative_numbers = true)]
    pub lr: f32,
}

pub fn forward(adapter: Option<&str>, a: &ForwardArgs) -> Result<()> {
    check_threshold_value(a.threshold)?;
    let (ckpt, cfg) = weights::open(&a.checkpoint, WeightsArg::which(a.weights), a.snn_steps)?;
    check_threshold(&cfg, a.threshold)?;
    let inp = TensorFile::load(&a.input)?;
    let x = inp.get_images("x", cfg.img_ch())?;
    let shape = x.shape.clone();
    let steps = inp.get_timesteps("t", shape[0], cfg.diffusion_steps())?;
    let ctx = Context::new(adapter)?;
    sddpm_gpu::tune::pin_recorded(&ctx, &ckpt.metadata, &a.checkpoint.display().to_string())?;
    let net = EvalNet::new(&ctx, &cfg, &ckpt, shape[0], shape[2], a.threshold)?;
    let eps = net.forward(&ctx, &x.data, &steps)?;
    checkpoint::save(&a.output, vec![("eps".into(), shape, Data::F32(&eps))], HashMap::new())
}

pub fn train_step(adapter: Option<&str>, a: &TrainStepArgs) -> Result<()> {
    check_lr(a.lr)?;
    // A training step continues the trained weights, never their EMA.
    let (ckpt, cfg) = weights::open(&a.checkpoint, Some(Which::Raw), a.snn_steps)?;
    let inp = TensorFile::load(&a.input)?;
    let x0 = inp.get_images("x0", cfg.img_ch())?;
    let shape = x0.shape.clone();
    let noise = inp.get("noise")?;
    if noise.shape != shape {
        bail!("{}: 'noise' must have the shape of 'x0' {:?}, got {:?}", a.input.display(), shape, noise.shape);
    }
    let steps = inp.get_timesteps("t", shape[0], cfg.diffusion_steps())?;
    let ctx = Context::new(adapter)?;
    let opts = TrainOptions { lr: a.lr, given_noise: true, ..Default::default() };
    let mut trainer = Trainer::new(&ctx, &cfg, &ckpt, shape[0], shape[2], opts)?;
    let stats = trainer.step(&ctx, &x0.data, &steps, Some(&noise.data), 0)?;
    trainer.save(&ctx, &a.output, HashMap::new())?;
    println!("{}", serde_json::json!({ "loss": stats.loss, "grad_norm": stats.grad_norm }));
    Ok(())
}
