//! A model from a checkpoint file: its config from the metadata or inferred from tensor shapes,
//! and the file's tensors checked against the model's state entries. These are methods of
//! [`TensorFile`] kept here, in the model layer, so that the checkpoint format below knows nothing
//! about models.

use anyhow::{anyhow, bail, Result};

use crate::checkpoint::TensorFile;

use super::{state_entries, DdpmConfig, Entry, EntryKind, ModelConfig, Net, NeuronKind};

impl TensorFile {
    /// The model config of an SDDPM checkpoint (see [`TensorFile::net`]); a DDPM checkpoint is
    /// an error here.
    pub fn config(&self, snn_steps: Option<usize>) -> Result<ModelConfig> {
        match self.net(snn_steps)? {
            Net::Sddpm(cfg) => Ok(cfg),
            Net::Ddpm(_) => bail!("{}: holds a DDPM (ANN) model, not the spiking U-Net", self.path.display()),
        }
    }

    /// Which model and config: from the metadata if present (`"model": "ddpm"` selects the ANN),
    /// otherwise inferred from tensor shapes (`head.weight` marks pytorch-ddpm's U-Net).
    /// `snn_steps` (from --snn-steps) overrides the stored T of an SNN; shapes cannot tell T.
    pub fn net(&self, snn_steps: Option<usize>) -> Result<Net> {
        let net = match self.metadata.get("config") {
            Some(json) => Net::from_json(json)
                .map_err(|e| anyhow!("{}: metadata field 'config' is not a model config: {e}", self.path.display()))?,
            None if self.tensors.contains_key("head.weight") => Net::Ddpm(self.infer_ddpm_config()?),
            None => Net::Sddpm(self.infer_config()?),
        };
        let net = match net {
            Net::Sddpm(mut cfg) => {
                if let Some(t) = snn_steps {
                    cfg.snn_steps = t;
                }
                Net::Sddpm(cfg)
            }
            Net::Ddpm(_) if snn_steps.is_some() => {
                bail!("{}: --snn-steps does not apply to a DDPM (ANN) checkpoint", self.path.display())
            }
            ddpm => ddpm,
        };
        net.validate_run(net.img_size(), 1).map_err(|e| anyhow!("{}: {e}", self.path.display()))?;
        let entries = net.state_entries();
        self.check_entry_list(&entries, &net.config_json())?;
        for e in entries.iter().filter(|e| e.kind == EntryKind::Counter) {
            self.counter(&e.name)?;
        }
        self.counter("optim.step")?;
        self.check_finite()?;
        Ok(net)
    }

    /// pytorch-ddpm's config from shapes: ch and img_ch from `head.weight`, T from the table,
    /// levels and blocks from `downblocks.*`, attention levels from `.attn.` keys. Dropout only
    /// matters in training and cannot be seen in weights: 0.
    fn infer_ddpm_config(&self) -> Result<DdpmConfig> {
        let head = self.shape("head.weight")?;
        if head.len() != 4 {
            bail!("{}: 'head.weight' must be [ch, img_ch, 3, 3], got {head:?}", self.path.display());
        }
        let (ch, img_ch) = (head[0], head[1]);
        let table = self.table_rows()?;
        let (mut ch_mult, mut attn) = (Vec::new(), Vec::new());
        let (mut num_res_blocks, mut in_level, mut last_cout, mut level_attn) = (None, 0, ch, false);
        for i in 0.. {
            if let Some(t) = self.tensors.get(&format!("downblocks.{i}.block1.2.weight")) {
                last_cout = t.shape.first().copied().unwrap_or(0);
                in_level += 1;
                level_attn |= self.tensors.contains_key(&format!("downblocks.{i}.attn.proj_q.weight"));
            } else if self.tensors.contains_key(&format!("downblocks.{i}.main.weight")) {
                num_res_blocks.get_or_insert(in_level);
                if level_attn {
                    attn.push(ch_mult.len());
                }
                ch_mult.push(last_cout / ch.max(1));
                (in_level, level_attn) = (0, false);
            } else {
                break;
            }
        }
        if in_level == 0 {
            bail!(
                "{}: no downblocks.*.block1.2.weight found; not a pytorch-ddpm U-Net checkpoint",
                self.path.display()
            );
        }
        if level_attn {
            attn.push(ch_mult.len());
        }
        ch_mult.push(last_cout / ch.max(1));
        Ok(DdpmConfig {
            diffusion_steps: table,
            ch,
            ch_mult,
            attn,
            num_res_blocks: num_res_blocks.unwrap_or(in_level),
            dropout: 0.0,
            img_ch,
            img_size: 32,
        })
    }

    fn infer_config(&self) -> Result<ModelConfig> {
        let stem = self.shape("conv.weight")?;
        if stem.len() != 4 {
            bail!("{}: 'conv.weight' must be [ch, img_ch, 3, 3], got {stem:?}", self.path.display());
        }
        let (ch, img_ch) = (stem[0], stem[1]);
        let table = self.table_rows()?;
        let mut ch_mult = Vec::new();
        let mut num_res_blocks = None;
        let mut in_level = 0;
        let mut last_cout = ch;
        for i in 0.. {
            if let Some(t) = self.tensors.get(&format!("downblocks.{i}.conv1.weight")) {
                last_cout = t.shape.first().copied().unwrap_or(0);
                in_level += 1;
            } else if self.tensors.contains_key(&format!("downblocks.{i}.conv.weight")) {
                num_res_blocks.get_or_insert(in_level);
                ch_mult.push(last_cout / ch.max(1));
                in_level = 0;
            } else {
                break;
            }
        }
        if in_level == 0 {
            bail!("{}: no downblocks.*.conv1.weight found; not an SDDPM U-Net checkpoint", self.path.display());
        }
        ch_mult.push(last_cout / ch.max(1));
        Ok(ModelConfig {
            diffusion_steps: table,
            ch,
            ch_mult,
            num_res_blocks: num_res_blocks.unwrap_or(in_level),
            snn_steps: 4,
            img_ch,
            img_size: 32,
            attn: Vec::new(),
            heads: 1,
            neuron: NeuronKind::If,
            tau: 2.0,
        })
    }

    /// Every tensor the model needs is present with the right shape, and nothing else is there
    /// (except optimizer state, EMA weights and counters). Errors name the tensors.
    pub fn check_entries(&self, cfg: &ModelConfig) -> Result<()> {
        self.check_entry_list(&state_entries(cfg), &serde_json::to_string(cfg).unwrap_or_default())
    }

    /// [`TensorFile::check_entries`] against any model's entries; `config` is shown in errors.
    pub fn check_entry_list(&self, expected: &[Entry], config: &str) -> Result<()> {
        let mut missing = Vec::new();
        let mut wrong = Vec::new();
        let mut integer = Vec::new();
        for e in expected.iter().filter(|e| e.kind != EntryKind::Counter) {
            match self.tensors.get(&e.name) {
                None if self.ints.contains_key(&e.name) => integer.push(e.name.clone()),
                None => missing.push(e.name.clone()),
                Some(t) if t.shape != e.shape => {
                    wrong.push(format!("{} is {:?}, expected {:?}", e.name, t.shape, e.shape))
                }
                Some(_) => {}
            }
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|e| e.name.as_str()).collect();
        let extra: Vec<&String> = self
            .tensors
            .keys()
            .filter(|k| !known.contains(k.as_str()) && !k.starts_with("optim.") && !k.starts_with("ema."))
            .collect();
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(6).map(|s| s.as_str()).collect();
            format!(
                "{}{}",
                shown.join(", "),
                if v.len() > 6 { format!(" (+{} more)", v.len() - 6) } else { String::new() }
            )
        };
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing {}", list(&missing)));
        }
        if !integer.is_empty() {
            problems.push(format!("integer tensors where floats belong (save them as float32): {}", list(&integer)));
        }
        if !wrong.is_empty() {
            problems.push(format!("wrong shape: {}", list(&wrong)));
        }
        if !extra.is_empty() {
            let extra: Vec<String> = extra.into_iter().cloned().collect();
            problems.push(format!("unexpected {}", list(&extra)));
        }
        if !problems.is_empty() {
            bail!("{}: does not match the model config {} ({})", self.path.display(), config, problems.join("; "));
        }
        Ok(())
    }
}
