//! Model configuration and presets. Field names on disk are the reference constructor's
//! (`T`, `ch`, `ch_mult`, `num_res_blocks`, `timestep`, `img_ch`), so a config written by the
//! reference's fixture tools and ours read the same; `img_size` is ours (default 32).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        let levels = self.ch_mult.len() as u32;
        let factor = 1usize << (levels - 1);
        if size == 0 || !size.is_multiple_of(factor) {
            bail!("image size {size} must be a positive multiple of {factor} for {levels} resolution levels");
        }
        Ok(())
    }
}
