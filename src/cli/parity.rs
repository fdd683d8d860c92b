//! `forward` and `train-step`: one network evaluation or one training step on tensors from a
//! file, for parity checks against the PyTorch reference (tools/, tests/fixtures.rs).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;

use sddpm_gpu::checkpoint::{self, Data, TensorFile};
use sddpm_gpu::gpu::Context;
use sddpm_gpu::model::EvalNet;
use sddpm_gpu::{run, weights};

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
    /// BatchNorm statistics over G groups of the batch, running statistics from group 0
    /// (default: one per MPI rank): one device reproduces G-GPU data-parallel training.
    #[arg(long, value_name = "G")]
    pub bn_groups: Option<usize>,
    /// IN holds K consecutive batches (K*B rows); run them in order, one JSON line each.
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub steps: usize,
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
    let comm = sddpm_gpu::dist::world()?;
    let args = run::TrainStepArgs {
        checkpoint: a.checkpoint.clone(),
        input: a.input.clone(),
        output: a.output.clone(),
        snn_steps: a.snn_steps,
        lr: a.lr,
        bn_groups: a.bn_groups,
        steps: a.steps,
    };
    let result =
        super::open_context(adapter, comm.as_ref()).and_then(|ctx| run::train_step(&ctx, comm.as_ref(), &args));
    super::end_ranks(comm.as_ref(), result)
}
