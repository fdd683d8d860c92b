//! The ANN counterpart: pytorch-ddpm's U-Net (w86763777/pytorch-ddpm, model.py), with its
//! state_dict names. GroupNorm(32) -> Swish -> conv residual blocks with a time-embedding
//! projection and dropout, softmax self-attention (1x1 q/k/v/proj convs) after the residual of
//! the blocks at chosen levels and in the first middle block, a GroupNorm -> Swish -> conv tail.
//!
//! As for the spiking net, the shared skeleton ([`ddpm_arch`]) is walked once by this model's
//! [`BlockBuilder`], whose arms declare each module's parameters and build its ops, so the
//! parameter names and shapes, the graph and the MAC counts come from one place. The conv, time-embedding, layout and
//! optimizer ops are the SNN's; GroupNorm and attention are ops of their own.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::macs::{net_macs, LayerMacs};
use super::params::{Entry, EntryKind, Params};
use super::skeleton::{skeleton, walk, Arch, Block, BlockBuilder};
use super::unet::{time_embedding, UNet};
use crate::checkpoint::{Tensor, TensorFile};
use crate::graph::{Graph, TensorId};
use crate::ops::embedding::timestep_table;
use crate::ops::{attention, conv, dropout, groupnorm, layout, matmul};

/// pytorch-ddpm's GroupNorm(32, C) everywhere.
pub const GROUPS: usize = 32;

/// Config of the ANN U-Net. Field names are pytorch-ddpm's constructor's (`T`, `ch`, `ch_mult`,
/// `attn`, `num_res_blocks`, `dropout`); `img_ch` (pytorch-ddpm hard-codes 3) and `img_size` are
/// ours. On disk it carries `"model": "ddpm"` (see [`crate::model::Net`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DdpmConfig {
    #[serde(rename = "T", default = "default_diffusion_steps")]
    pub diffusion_steps: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    /// Levels (indices into ch_mult) whose ResBlocks end in self-attention.
    pub attn: Vec<usize>,
    pub num_res_blocks: usize,
    /// Dropout probability before each block2 conv, in training.
    pub dropout: f32,
    #[serde(default = "default_img_ch")]
    pub img_ch: usize,
    #[serde(default = "default_img_size")]
    pub img_size: usize,
}

fn default_diffusion_steps() -> usize {
    1000
}
fn default_img_ch() -> usize {
    3
}
fn default_img_size() -> usize {
    32
}

/// Preset names of `--model ddpm`.
pub const DDPM_PRESETS: &[&str] = &["cifar10", "pytorch-ddpm-cifar10", "mnist", "small", "tiny"];

impl DdpmConfig {
    /// `cifar10`: the paper's ANN counterpart, SDDPM's CIFAR-10 shape (ch 128, mult 1,2,2,4, 2
    /// blocks, attention only in the middle); `pytorch-ddpm-cifar10`: pytorch-ddpm's published
    /// config (mult 1,2,2,2, attention at level 1, dropout 0.1); `mnist`: the cifar10 shape at
    /// 1 channel; `small` and `tiny` for laptops and tests (`small` is the SNN's `small` shape,
    /// attention only in the middle; `tiny` is fixtures-ddpm's shape).
    pub fn preset(name: &str) -> Result<DdpmConfig> {
        let paper = |img_ch| DdpmConfig {
            diffusion_steps: 1000,
            ch: 128,
            ch_mult: vec![1, 2, 2, 4],
            attn: vec![],
            num_res_blocks: 2,
            dropout: 0.0,
            img_ch,
            img_size: 32,
        };
        Ok(match name {
            "cifar10" => paper(3),
            "pytorch-ddpm-cifar10" => DdpmConfig { ch_mult: vec![1, 2, 2, 2], attn: vec![1], dropout: 0.1, ..paper(3) },
            "mnist" => paper(1),
            "small" => DdpmConfig { ch: 32, ch_mult: vec![1, 2, 2], num_res_blocks: 1, ..paper(1) },
            "tiny" => DdpmConfig { ch: 32, ch_mult: vec![1, 2], attn: vec![1], num_res_blocks: 1, ..paper(3) },
            other => bail!("unknown preset '{other}' for --model ddpm; choose one of: {}", DDPM_PRESETS.join(", ")),
        })
    }

    pub fn tdim(&self) -> usize {
        4 * self.ch
    }

    /// Check the numbers make a buildable net; `size` is the image side to run at.
    pub fn validate(&self, size: usize) -> Result<()> {
        if self.ch == 0 || self.ch_mult.is_empty() || self.ch_mult.contains(&0) || self.img_ch == 0 {
            bail!("model config: ch, ch_mult and img_ch must be positive, got {self:?}");
        }
        if !self.ch.is_multiple_of(GROUPS) {
            bail!("model config: ch must be a multiple of {GROUPS} (GroupNorm({GROUPS})), got {}", self.ch);
        }
        if self.num_res_blocks == 0 {
            bail!("model config: num_res_blocks must be at least 1");
        }
        if let Some(bad) = self.attn.iter().find(|&&a| a >= self.ch_mult.len()) {
            bail!("model config: attn level {bad} is out of range for {} levels (ch_mult)", self.ch_mult.len());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("model config: dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.diffusion_steps == 0 {
            bail!("model config: diffusion steps T must be at least 1");
        }
        let widest = self.ch * self.ch_mult.iter().max().unwrap();
        if widest > attention::MAX_C {
            bail!("model config: {widest} channels at the middle attention; the kernel allows {}", attention::MAX_C);
        }
        let levels = self.ch_mult.len() as u32;
        let factor = 1usize << (levels - 1);
        if size == 0 || !size.is_multiple_of(factor) {
            bail!("image size {size} must be a positive multiple of {factor} for {levels} resolution levels");
        }
        Ok(())
    }
}

/// pytorch-ddpm's skeleton ([`skeleton`]): attention on the config's levels and in the first
/// middle block.
pub fn ddpm_arch(cfg: &DdpmConfig) -> Arch {
    skeleton(cfg.ch, &cfg.ch_mult, cfg.num_res_blocks, &cfg.attn, [true, false])
}

/// Every state_dict entry of pytorch-ddpm's UNet (all trainable but the frozen sinusoidal table):
/// the builder's recording pass over the skeleton.
pub fn ddpm_state_entries(cfg: &DdpmConfig) -> Vec<Entry> {
    let mut scratch = Graph::new();
    let mut b = Builder { g: &mut scratch, cfg, params: Params::recording(), dropout: None, dropouts: 0 };
    walk(&ddpm_arch(cfg), &mut b, TensorId(0), TensorId(0));
    b.params.entries()
}

/// Number of values in `.parameters()` (the frozen table included, as PyTorch counts).
pub fn ddpm_parameter_count(cfg: &DdpmConfig) -> usize {
    ddpm_state_entries(cfg).iter().map(|e| e.shape.iter().product::<usize>()).sum()
}

/// Multiply-accumulates of every conv, linear and attention product for one image at
/// `size` x `size`, read off the inference graph (src/model/macs.rs; an ANN has no spiking
/// inputs: `fed_by` is None throughout). The attention products (q^T k and P v) are charged as
/// `{name}.attn.bmm`.
pub fn ddpm_layer_macs(cfg: &DdpmConfig, size: usize) -> Vec<LayerMacs> {
    net_macs(&cfg.into(), size)
}

/// Fresh weights as pytorch-ddpm initialises them (distributions, not PyTorch's values):
/// xavier_uniform for every conv and linear with zero bias, gain 1e-5 for each block2 conv, each
/// attention output projection and the tail conv; GroupNorm weight 1, bias 0; the sinusoidal table.
pub fn ddpm_init_weights(cfg: &DdpmConfig, seed: u64) -> TensorFile {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors = BTreeMap::new();
    let entries = ddpm_state_entries(cfg);
    let is_gn = |module: &str| {
        module.ends_with("block1.0")
            || module.ends_with("block2.0")
            || module.ends_with("group_norm")
            || module == "tail.0"
    };
    for e in &entries {
        let n: usize = e.shape.iter().product();
        let (module, leaf) = e.name.rsplit_once('.').unwrap_or(("", &e.name));
        let data = match leaf {
            _ if e.kind == EntryKind::Frozen => timestep_table(cfg.diffusion_steps, cfg.ch),
            "weight" if is_gn(module) => vec![1.0; n],
            "weight" => {
                let receptive: usize = e.shape[2..].iter().product();
                let (fan_in, fan_out) = (e.shape[1] * receptive, e.shape[0] * receptive);
                let small = module.ends_with("block2.3") || module.ends_with("attn.proj") || module == "tail.2";
                let bound = if small { 1e-5 } else { 1.0 } * (6.0 / (fan_in + fan_out) as f32).sqrt();
                (0..n).map(|_| rng.random_range(-bound..=bound)).collect()
            }
            _ => vec![0.0; n],
        };
        tensors.insert(e.name.clone(), Tensor { shape: e.shape.clone(), data });
    }
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("config".into(), super::Net::Ddpm(cfg.clone()).config_json());
    TensorFile { path: format!("<fresh ddpm model, seed {seed}>").into(), tensors, ints: BTreeMap::new(), metadata }
}

struct Builder<'a> {
    g: &'a mut Graph,
    cfg: &'a DdpmConfig,
    params: Params,
    /// Training with dropout: the probability and the key tensor of the masks.
    dropout: Option<(f32, TensorId)>,
    /// Dropout layers built so far (each gets its own mask stream).
    dropouts: usize,
}

impl Builder<'_> {
    fn p(&mut self, name: &str) -> TensorId {
        self.params.get(self.g, name)
    }

    fn recording(&self) -> bool {
        self.params.is_recording()
    }

    fn conv(&mut self, x: TensorId, name: &str, stride: usize) -> TensorId {
        let (w, b) = (self.p(&format!("{name}.weight")), self.p(&format!("{name}.bias")));
        let k = self.g.shape(w)[2];
        conv::conv2d(self.g, x, w, Some(b), stride, k / 2, name)
    }

    /// A stride-1 conv whose epilogue adds a time embedding and/or a residual.
    fn conv_add(&mut self, x: TensorId, name: &str, epilogue: conv::Epilogue) -> TensorId {
        let (w, b) = (self.p(&format!("{name}.weight")), self.p(&format!("{name}.bias")));
        let k = self.g.shape(w)[2];
        conv::conv2d_fused(self.g, x, w, Some(b), 1, k / 2, epilogue, name)
    }

    fn gn(&mut self, x: TensorId, name: &str, swish: bool) -> TensorId {
        let (w, b) = (self.p(&format!("{name}.weight")), self.p(&format!("{name}.bias")));
        groupnorm::groupnorm(self.g, x, w, b, GROUPS, swish, name)
    }

    /// The modules of [`Self::attention`] over `c` channels, in pytorch-ddpm's order.
    fn declare_attention(&mut self, name: &str, c: usize) {
        self.params.affine(&format!("{name}.group_norm"), c);
        for p in ["proj_q", "proj_k", "proj_v", "proj"] {
            self.params.conv(&format!("{name}.{p}"), c, c, 1);
        }
    }

    /// AttnBlock: x + proj(attention(q(h), k(h), v(h))), h = GroupNorm(x).
    fn attention(&mut self, x: TensorId, name: &str) -> TensorId {
        let h = self.gn(x, &format!("{name}.group_norm"), false);
        let q = self.conv(h, &format!("{name}.proj_q"), 1);
        let k = self.conv(h, &format!("{name}.proj_k"), 1);
        let v = self.conv(h, &format!("{name}.proj_v"), 1);
        let a = attention::attention(self.g, q, k, v, &format!("{name}.softmax"));
        // x + proj(a), the add done in proj's epilogue (float addition commutes: same bits).
        self.conv_add(a, &format!("{name}.proj"), conv::Epilogue { emb: None, residual: Some(x) })
    }
}

impl BlockBuilder for Builder<'_> {
    fn time_embedding(&mut self, t: TensorId) -> TensorId {
        time_embedding(self.g, &mut self.params, t, [self.cfg.diffusion_steps, self.cfg.ch, self.cfg.tdim()])
    }

    fn stem(&mut self, x: TensorId) -> TensorId {
        self.params.conv("head", self.cfg.ch, self.cfg.img_ch, 3);
        if self.recording() {
            return x;
        }
        self.conv(x, "head", 1)
    }

    fn block(&mut self, block: &Block, x: TensorId, temb_act: TensorId) -> TensorId {
        match block {
            Block::Res { name, cin, cout, attn } => {
                let (cin, cout) = (*cin, *cout);
                self.params.affine(&format!("{name}.block1.0"), cin);
                self.params.conv(&format!("{name}.block1.2"), cout, cin, 3);
                self.params.linear(&format!("{name}.temb_proj.1"), cout, self.cfg.tdim());
                self.params.affine(&format!("{name}.block2.0"), cout);
                self.params.conv(&format!("{name}.block2.3"), cout, cout, 3);
                if cin != cout {
                    self.params.conv(&format!("{name}.shortcut"), cout, cin, 1);
                }
                if *attn {
                    self.declare_attention(&format!("{name}.attn"), cout);
                }
                if self.recording() {
                    return x;
                }
                // h = conv1(..) + temb_proj(temb) and h = conv2(..) + shortcut(x): both adds are
                // done in the convs' epilogues, so the addends come first.
                let h = self.gn(x, &format!("{name}.block1.0"), true);
                let (pw, pb) =
                    (self.p(&format!("{name}.temb_proj.1.weight")), self.p(&format!("{name}.temb_proj.1.bias")));
                let proj = matmul::linear(self.g, temb_act, pw, Some(pb), &format!("{name}.temb_proj"));
                let epilogue = conv::Epilogue { emb: Some(proj), residual: None };
                let h = self.conv_add(h, &format!("{name}.block1.2"), epilogue);
                let mut h = self.gn(h, &format!("{name}.block2.0"), true);
                if let Some((p, key)) = self.dropout {
                    h = dropout::dropout(self.g, h, p, key, self.dropouts, &format!("{name}.block2.2"));
                    self.dropouts += 1;
                }
                let shortcut = if cin != cout { self.conv(x, &format!("{name}.shortcut"), 1) } else { x };
                let epilogue = conv::Epilogue { emb: None, residual: Some(shortcut) };
                let h = self.conv_add(h, &format!("{name}.block2.3"), epilogue);
                if *attn {
                    self.attention(h, &format!("{name}.attn"))
                } else {
                    h
                }
            }
            Block::Down { name, c } | Block::Up { name, c } => {
                let main = format!("{name}.main");
                self.params.conv(&main, *c, *c, 3);
                if self.recording() {
                    return x;
                }
                if matches!(block, Block::Down { .. }) {
                    self.conv(x, &main, 2)
                } else {
                    let u = layout::upsample2x(self.g, x, &format!("{name}.upsample"));
                    self.conv(u, &main, 1)
                }
            }
        }
    }

    fn concat(&mut self, h: TensorId, skip: TensorId, name: &str) -> TensorId {
        if self.recording() {
            return h;
        }
        layout::concat_channels(self.g, h, skip, name)
    }

    fn tail(&mut self, h: TensorId, ch: usize) -> TensorId {
        self.params.affine("tail.0", ch);
        self.params.conv("tail.2", self.cfg.img_ch, ch, 3);
        if self.recording() {
            return h;
        }
        let h = self.gn(h, "tail.0", true);
        self.conv(h, "tail.2", 1)
    }
}

/// Append pytorch-ddpm's U-Net to `g`: x [B, C, H, W] (f32), t [B] (u32 timesteps) -> eps.
/// GroupNorm has no running statistics, so training and inference differ only in dropout (in
/// training, with dropout > 0, masks keyed by the returned `dropout_key` input) and in every
/// parameter being declared, in state_dict order. The result carries no folds and no spikes.
pub fn build_ddpm(g: &mut Graph, cfg: &DdpmConfig, x: TensorId, t: TensorId, train: bool) -> UNet {
    let params = Params::building(ddpm_state_entries(cfg));
    let dropout_key = (train && cfg.dropout > 0.0).then(|| g.input("dropout.key", &[4]));
    let dropout = dropout_key.map(|k| (cfg.dropout, k));
    let mut b = Builder { g, cfg, params, dropout, dropouts: 0 };
    if train {
        b.params.declare_all(b.g);
    }
    let eps = walk(&ddpm_arch(cfg), &mut b, x, t);
    UNet { params: b.params.finish(), eps, spikes: Vec::new(), folds: Vec::new(), dropout_key }
}
