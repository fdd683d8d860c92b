//! `convert`: an official SDDPM / pytorch-ddpm checkpoint (or ours) into a safetensors checkpoint
//! with its config in the metadata.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use sddpm_gpu::checkpoint::{self, Data};
use sddpm_gpu::model::Net;
use sddpm_gpu::weights;

use super::WeightsArg;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The checkpoint to read: an official SDDPM or pytorch-ddpm training checkpoint (.pt; its
    /// `net_model` or `ema_model`), a bare state_dict, or a safetensors checkpoint.
    pub input: PathBuf,
    /// The safetensors file to write.
    pub output: PathBuf,
    /// ema or raw [default: ema when the checkpoint has EMA weights].
    #[arg(long, value_enum)]
    pub weights: Option<WeightsArg>,
    /// Spiking time steps T of the model (not in the weights; SDDPM's CIFAR-10 model uses 4).
    #[arg(long)]
    pub snn_steps: Option<usize>,
    /// Image side the model samples at (stored in the config; default 32).
    #[arg(long)]
    pub size: Option<usize>,
    /// pytorch-ddpm models only: dropout stored for further training (not in the weights;
    /// pytorch-ddpm's CIFAR-10 model uses 0.1) [default: 0.1].
    #[arg(long)]
    pub dropout: Option<f32>,
}

pub fn run(a: &ConvertArgs) -> Result<()> {
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

/// `convert`'s arguments that need no file (see `train`'s `check_train_args`).
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
