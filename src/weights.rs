//! Which weights a command evaluates, and from which file: our safetensors checkpoints, and the
//! official PyTorch checkpoints of SDDPM and pytorch-ddpm (`.pt`), read directly with the torch
//! zip + restricted pickle reader of [`crate::fid::torchzip`] (nothing in the file is run, the
//! same checks as for the FID weights), so sampling a published checkpoint needs no Python.
//!
//! Of a checkpoint that holds both, the EMA weights are the default, as pytorch-ddpm samples and
//! evaluates from them: `ema.*` in ours (`train --ema`), `ema_model` in pytorch-ddpm's files.
//! `--weights raw` takes the trained ones (`net_model`); official SDDPM files keep only those.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::Path;

use anyhow::{bail, Context as _, Result};

use crate::checkpoint::{Checkpoint, IntTensor, TensorFile};
use crate::model::Net;

/// Which weights of a checkpoint to evaluate (`--weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The exponential moving average of the weights (`ema.*`, `ema_model`).
    Ema,
    /// The trained weights themselves (`net_model` in PyTorch files).
    Raw,
}

/// The state_dicts of a PyTorch training checkpoint, by key.
const RAW_KEY: &str = "net_model";
const EMA_KEY: &str = "ema_model";

/// Whether `path` is a torch file (a zip archive, or a legacy pickle the reader names) rather
/// than safetensors.
pub fn is_torch_file(path: &Path) -> Result<bool> {
    let mut head = [0u8; 4];
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let n = f.read(&mut head).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    // A legacy torch.save file starts with pickle protocol 2 and the LONG1 magic number.
    Ok(head[..n].starts_with(b"PK\x03\x04") || head[..n] == [0x80, 0x02, 0x8a, 0x0a])
}

/// Read the checkpoint at `path` (safetensors or PyTorch) with the weights `which` asks for
/// (None: the EMA weights when the file has them, with a notice), and its model config (from the
/// metadata, else inferred from the shapes; `snn_steps` overrides T).
pub fn open(path: &Path, which: Option<Which>, snn_steps: Option<usize>) -> Result<(Checkpoint, Net)> {
    let ckpt = if is_torch_file(path)? { read_torch(path, which)? } else { read_safetensors(path, which)? };
    let net = ckpt.net(snn_steps)?;
    Ok((ckpt, net))
}

fn read_safetensors(path: &Path, which: Option<Which>) -> Result<Checkpoint> {
    let ckpt = Checkpoint::load(path)?;
    let has_ema = ckpt.tensors.keys().any(|k| k.starts_with("ema."));
    match which {
        Some(Which::Ema) => ckpt.with_ema_weights(),
        None if has_ema => {
            eprintln!(
                "note: {} holds EMA weights (ema.*); evaluating those (--weights raw for the trained ones)",
                path.display()
            );
            ckpt.with_ema_weights()
        }
        _ => Ok(ckpt),
    }
}

/// An official PyTorch checkpoint as a [`Checkpoint`] without metadata (so the config is inferred
/// from the shapes): the state_dict `net_model` or `ema_model` of a training checkpoint, or a bare
/// state_dict; DataParallel's `module.` prefix stripped; BatchNorm counters as integers.
pub fn read_torch(path: &Path, which: Option<Which>) -> Result<Checkpoint> {
    let file = crate::fid::torchzip::load(path)?;
    let holds = |key: &str| file.tensors.keys().any(|n| n.strip_prefix(key).is_some_and(|r| r.starts_with('.')));
    let (has_raw, has_ema) = (holds(RAW_KEY), holds(EMA_KEY));
    let key = match (which, has_raw, has_ema) {
        (Some(Which::Ema), _, true) | (None, _, true) => Some(EMA_KEY),
        (Some(Which::Ema), _, false) => bail!(
            "{}: has no EMA weights ('{EMA_KEY}'; official SDDPM checkpoints keep only '{RAW_KEY}'); use --weights raw",
            path.display()
        ),
        (_, true, _) => Some(RAW_KEY),
        (Some(Which::Raw), false, true) => {
            bail!("{}: holds '{EMA_KEY}' but no '{RAW_KEY}'; use --weights ema", path.display())
        }
        // A bare state_dict (torch.save(model.state_dict())): its weights are the raw ones.
        (_, false, false) => None,
    };
    if which.is_none() && key == Some(EMA_KEY) {
        eprintln!(
            "note: {} holds EMA weights ('{EMA_KEY}'); evaluating those, as pytorch-ddpm samples (--weights raw for '{RAW_KEY}')",
            path.display()
        );
    }
    let mut tensors = BTreeMap::new();
    let mut ints = BTreeMap::new();
    for (name, t) in file.tensors {
        let name = match key {
            Some(k) => match name.strip_prefix(k).and_then(|r| r.strip_prefix('.')) {
                Some(rest) => rest.to_string(),
                None => continue,
            },
            None => name,
        };
        let name = name.strip_prefix("module.").map_or(name.clone(), str::to_string);
        if name.ends_with("num_batches_tracked") {
            // An int64 buffer; the reader hands every tensor over as f32 (exact below 2^24 steps).
            let data = t.data.iter().map(|&v| v as i64).collect();
            ints.insert(name, IntTensor { shape: t.shape, data });
        } else {
            tensors.insert(name, t);
        }
    }
    if !tensors.contains_key("conv.weight") && !tensors.contains_key("head.weight") {
        bail!(
            "{}: no SDDPM or pytorch-ddpm state_dict found (looked for '{RAW_KEY}', '{EMA_KEY}' or a bare \
             state_dict with conv.weight or head.weight)",
            path.display()
        );
    }
    Ok(TensorFile { path: path.to_path_buf(), tensors, ints, metadata: HashMap::new() })
}
