//! Model configuration and presets. Field names on disk are the reference constructor's
//! (`T`, `ch`, `ch_mult`, `num_res_blocks`, `timestep`, `img_ch`), so a config written by the
//! reference's fixture tools and ours read the same; `img_size` is ours (default 32). The
//! extensions of sddpm-spec.md section 10 (`attn`, `heads`, `neuron`, `tau`) are written only when
//! they differ from the reference, so a reference config stays byte-for-byte the reference's.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::ops::neuron::Neuron;

/// The spiking neuron every layer uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NeuronKind {
    /// Integrate-and-fire, the reference's IFNode.
    #[default]
    If,
    /// Leaky integrate-and-fire with decay_input (spikingjelly's LIFNode), time constant `tau`.
    Lif,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Diffusion steps (the reference's `T`), 1000.
    #[serde(rename = "T", default = "default_diffusion_steps")]
    pub diffusion_steps: usize,
    /// Base channel width.
    pub ch: usize,
    /// Width multiplier per resolution level.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more).
    pub num_res_blocks: usize,
    /// Spiking time steps T (the reference's `timestep`).
    #[serde(rename = "timestep", default = "default_snn_steps")]
    pub snn_steps: usize,
    /// Image channels: 3 (CIFAR-10, CelebA) or 1 (MNIST, Fashion-MNIST).
    pub img_ch: usize,
    /// Image side in pixels for sampling and training.
    #[serde(default = "default_img_size")]
    pub img_size: usize,
    /// Levels (indices into `ch_mult`) whose down and up ResBlocks end in spiking self-attention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attn: Vec<usize>,
    /// Attention heads; must divide the channels of every attention level.
    #[serde(default = "default_heads", skip_serializing_if = "is_one")]
    pub heads: usize,
    #[serde(default, skip_serializing_if = "is_if")]
    pub neuron: NeuronKind,
    /// LIF membrane time constant (ignored by IF neurons).
    #[serde(default = "default_tau", skip_serializing_if = "is_default_tau")]
    pub tau: f32,
}

fn default_heads() -> usize {
    1
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn is_if(v: &NeuronKind) -> bool {
    *v == NeuronKind::If
}
fn default_tau() -> f32 {
    2.0
}
fn is_default_tau(v: &f32) -> bool {
    *v == default_tau()
}

fn default_diffusion_steps() -> usize {
    1000
}
fn default_snn_steps() -> usize {
    4
}
fn default_img_size() -> usize {
    32
}

/// Preset names, for help texts and errors.
pub const PRESETS: &[&str] = &["cifar10", "celeba64", "mnist", "fashion", "small", "tiny"];

impl ModelConfig {
    /// A named preset: the paper's nets (`cifar10`, `celeba64`, `mnist`, `fashion`) and small
    /// ones for tests and laptops (`small`, `tiny`; the same as bench_torch.py's).
    pub fn preset(name: &str) -> Result<ModelConfig> {
        let paper = |img_ch, img_size| ModelConfig {
            diffusion_steps: 1000,
            ch: 128,
            ch_mult: vec![1, 2, 2, 4],
            num_res_blocks: 2,
            snn_steps: 4,
            img_ch,
            img_size,
            attn: Vec::new(),
            heads: 1,
            neuron: NeuronKind::If,
            tau: default_tau(),
        };
        Ok(match name {
            "cifar10" => paper(3, 32),
            "celeba64" => paper(3, 64),
            "mnist" | "fashion" => paper(1, 32),
            "small" => ModelConfig { ch: 32, ch_mult: vec![1, 2, 2], num_res_blocks: 1, ..paper(1, 32) },
            "tiny" => ModelConfig { ch: 16, ch_mult: vec![1, 2], num_res_blocks: 1, ..paper(3, 32) },
            other => bail!("unknown preset '{other}'; choose one of: {}", PRESETS.join(", ")),
        })
    }

    /// The neuron of every spiking layer, firing at `v_th` (1.0 except threshold guidance).
    pub fn neuron_at(&self, v_th: f32) -> Neuron {
        let tau = (self.neuron == NeuronKind::Lif).then_some(self.tau);
        Neuron { v_th, tau, ..Neuron::default() }
    }

    /// Time-embedding width (4 * ch, as the reference).
    pub fn tdim(&self) -> usize {
        4 * self.ch
    }

    /// [`ModelConfig::validate`] plus a positive batch size.
    pub fn validate_run(&self, size: usize, batch: usize) -> Result<()> {
        if batch == 0 {
            bail!("the batch size must be at least 1");
        }
        self.validate(size)
    }

    /// Check the numbers make a buildable net; `size` is the image side to run at.
    pub fn validate(&self, size: usize) -> Result<()> {
        if self.ch == 0 || self.ch_mult.is_empty() || self.ch_mult.contains(&0) || self.img_ch == 0 {
            bail!("model config: ch, ch_mult and img_ch must be positive, got {self:?}");
        }
        if !self.ch.is_multiple_of(2) {
            bail!("model config: ch must be even (sin/cos time embedding), got {}", self.ch);
        }
        if self.snn_steps == 0 {
            bail!("model config: spiking steps (--snn-steps / timestep) must be at least 1");
        }
        if self.diffusion_steps == 0 {
            bail!("model config: diffusion steps T must be at least 1");
        }
        if self.neuron == NeuronKind::Lif && !(self.tau.is_finite() && self.tau >= 1.0) {
            bail!("model config: the LIF time constant tau (--tau) must be at least 1, got {}", self.tau);
        }
        if let Some(&bad) = self.attn.iter().find(|&&l| l >= self.ch_mult.len()) {
            bail!(
                "model config: attention level {bad} (--attn) does not exist; levels are 0..{}",
                self.ch_mult.len() - 1
            );
        }
        for &level in &self.attn {
            let c = self.ch * self.ch_mult[level];
            if self.heads == 0 || !c.is_multiple_of(self.heads) {
                bail!(
                    "model config: {} attention heads (--heads) do not divide level {level}'s {c} channels",
                    self.heads
                );
            }
        }
        let levels = self.ch_mult.len() as u32;
        let factor = 1usize << (levels - 1);
        if size == 0 || !size.is_multiple_of(factor) {
            bail!("image size {size} must be a positive multiple of {factor} for {levels} resolution levels");
        }
        Ok(())
    }
}
