//! Which denoiser a run uses: the spiking U-Net (SDDPM) or its ANN counterpart (pytorch-ddpm's
//! U-Net). The sampler, trainer, evaluation, profile and energy build "a denoiser graph" through
//! this one enum, so they work with either without copies.

use anyhow::{anyhow, bail, Result};

use super::ddpm::{build_ddpm, ddpm_init_weights, ddpm_layer_macs, ddpm_parameter_count, ddpm_state_entries};
use super::{build_eval, build_train, init_weights, layer_macs, parameter_count, state_entries};
use super::{DdpmConfig, Entry, LayerMacs, ModelConfig, UNet};
use crate::checkpoint::TensorFile;
use crate::graph::{Graph, TensorId};
use crate::ops::batchnorm::BnGroups;

/// Names of `--model`.
pub const MODELS: &[&str] = &["sddpm", "ddpm"];

#[derive(Debug, Clone, PartialEq)]
pub enum Net {
    /// The spiking U-Net (the paper's SDDPM).
    Sddpm(ModelConfig),
    /// pytorch-ddpm's U-Net (`"model": "ddpm"` in the config JSON).
    Ddpm(DdpmConfig),
}

impl From<ModelConfig> for Net {
    fn from(c: ModelConfig) -> Net {
        Net::Sddpm(c)
    }
}
impl From<&ModelConfig> for Net {
    fn from(c: &ModelConfig) -> Net {
        Net::Sddpm(c.clone())
    }
}
impl From<DdpmConfig> for Net {
    fn from(c: DdpmConfig) -> Net {
        Net::Ddpm(c)
    }
}
impl From<&DdpmConfig> for Net {
    fn from(c: &DdpmConfig) -> Net {
        Net::Ddpm(c.clone())
    }
}
impl From<&Net> for Net {
    fn from(n: &Net) -> Net {
        n.clone()
    }
}

impl Net {
    /// A preset of model `model` (`sddpm` or `ddpm`).
    pub fn preset(model: &str, preset: &str) -> Result<Net> {
        match model {
            "sddpm" => Ok(Net::Sddpm(ModelConfig::preset(preset)?)),
            "ddpm" => Ok(Net::Ddpm(DdpmConfig::preset(preset)?)),
            other => bail!("unknown --model '{other}'; choose one of: {}", MODELS.join(", ")),
        }
    }

    /// Parse a config JSON: `"model": "ddpm"` selects the ANN, no `model` (or `"sddpm"`) the SNN.
    pub fn from_json(json: &str) -> Result<Net> {
        let v: serde_json::Value = serde_json::from_str(json).map_err(|e| anyhow!("not JSON ({e})"))?;
        let model = v.get("model").and_then(|m| m.as_str()).unwrap_or("sddpm");
        match model {
            "sddpm" => Ok(Net::Sddpm(serde_json::from_value(v).map_err(|e| anyhow!("not an SDDPM config ({e})"))?)),
            "ddpm" => Ok(Net::Ddpm(serde_json::from_value(v).map_err(|e| anyhow!("not a DDPM config ({e})"))?)),
            other => bail!("unknown model '{other}'; expected one of: {}", MODELS.join(", ")),
        }
    }

    /// The config as JSON (what checkpoints store in metadata key `config`).
    pub fn config_json(&self) -> String {
        match self {
            Net::Sddpm(c) => serde_json::to_string(c).expect("config serializes"),
            Net::Ddpm(c) => {
                let mut v = serde_json::to_value(c).expect("config serializes");
                v.as_object_mut().expect("an object").insert("model".into(), "ddpm".into());
                v.to_string()
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Net::Sddpm(_) => "sddpm",
            Net::Ddpm(_) => "ddpm",
        }
    }

    pub fn diffusion_steps(&self) -> usize {
        match self {
            Net::Sddpm(c) => c.diffusion_steps,
            Net::Ddpm(c) => c.diffusion_steps,
        }
    }

    pub fn img_ch(&self) -> usize {
        match self {
            Net::Sddpm(c) => c.img_ch,
            Net::Ddpm(c) => c.img_ch,
        }
    }

    pub fn img_size(&self) -> usize {
        match self {
            Net::Sddpm(c) => c.img_size,
            Net::Ddpm(c) => c.img_size,
        }
    }

    pub fn set_img_ch(&mut self, ch: usize) {
        match self {
            Net::Sddpm(c) => c.img_ch = ch,
            Net::Ddpm(c) => c.img_ch = ch,
        }
    }

    pub fn set_img_size(&mut self, size: usize) {
        match self {
            Net::Sddpm(c) => c.img_size = size,
            Net::Ddpm(c) => c.img_size = size,
        }
    }

    /// Set the spiking time steps T (from --snn-steps); the ANN has none, so that is an error.
    pub fn set_snn_steps(&mut self, t: usize) -> Result<()> {
        match self {
            Net::Sddpm(c) => c.snn_steps = t,
            Net::Ddpm(_) => bail!("--snn-steps does not apply to --model ddpm (an ANN has no spiking steps)"),
        }
        Ok(())
    }

    /// Spiking time steps T (None for the ANN).
    pub fn snn_steps(&self) -> Option<usize> {
        match self {
            Net::Sddpm(c) => Some(c.snn_steps),
            Net::Ddpm(_) => None,
        }
    }

    /// Check the config builds at `size` px with `batch` images.
    pub fn validate_run(&self, size: usize, batch: usize) -> Result<()> {
        match self {
            Net::Sddpm(c) => c.validate_run(size, batch),
            Net::Ddpm(c) => {
                if batch == 0 {
                    bail!("the batch size must be at least 1");
                }
                c.validate(size)
            }
        }
    }

    /// Every state_dict entry, in the reference's order.
    pub fn state_entries(&self) -> Vec<Entry> {
        match self {
            Net::Sddpm(c) => state_entries(c),
            Net::Ddpm(c) => ddpm_state_entries(c),
        }
    }

    pub fn parameter_count(&self) -> usize {
        match self {
            Net::Sddpm(c) => parameter_count(c),
            Net::Ddpm(c) => ddpm_parameter_count(c),
        }
    }

    /// MACs per layer for one image (per spiking step for the SNN).
    pub fn layer_macs(&self, size: usize) -> Vec<LayerMacs> {
        match self {
            Net::Sddpm(c) => layer_macs(c, size),
            Net::Ddpm(c) => ddpm_layer_macs(c, size),
        }
    }

    /// Fresh weights (the reference's initialisation), deterministic for a seed.
    pub fn init_weights(&self, seed: u64) -> TensorFile {
        match self {
            Net::Sddpm(c) => init_weights(c, seed),
            Net::Ddpm(c) => ddpm_init_weights(c, seed),
        }
    }

    /// The inference graph: x [B, C, H, W], t [B] -> eps. `v_th` is the SNN's firing threshold
    /// (threshold guidance); the ANN has none.
    pub fn build_eval(&self, g: &mut Graph, x: TensorId, t: TensorId, v_th: f32) -> UNet {
        match self {
            Net::Sddpm(c) => build_eval(g, c, x, t, v_th),
            Net::Ddpm(c) => build_ddpm(g, c, x, t, false),
        }
    }

    /// The training graph, recorded for backward (with the ANN's dropout keyed by
    /// [`UNet::dropout_key`]); the SNN's BatchNorm statistics over `bn_groups` groups of the
    /// batch (`--bn-groups`; the ANN has no BatchNorm, so only one group).
    pub fn build_train(&self, g: &mut Graph, x: TensorId, t: TensorId, bn_groups: BnGroups) -> Result<UNet> {
        match self {
            Net::Sddpm(c) => Ok(build_train(g, c, x, t, bn_groups)),
            Net::Ddpm(_) if bn_groups.count > 1 => {
                bail!("--bn-groups applies to the SNN's BatchNorm; the ANN (--model ddpm) has none: leave it at 1")
            }
            Net::Ddpm(c) => Ok(build_ddpm(g, c, x, t, true)),
        }
    }
}

/// A run config (config.json) stores the net as its config JSON, `"model"` included.
impl serde::Serialize for Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let v: serde_json::Value = serde_json::from_str(&self.config_json()).map_err(serde::ser::Error::custom)?;
        v.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Net, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Net::from_json(&v.to_string()).map_err(serde::de::Error::custom)
    }
}
