//! Checkpoints in safetensors: tensors under the official state_dict names, the model config as
//! JSON in the metadata key `config` (the reference's field names), optimizer state under
//! `optim.*`. Files converted from the official PyTorch code (no metadata) load when the config
//! can be inferred from tensor shapes (that, and checking a file against a model, is the model's
//! business: [`crate::model`]'s `load.rs`, the layer above, adds those methods to
//! [`TensorFile`]). Writes are atomic ([`crate::fsutil`]): a crash never leaves
//! half a checkpoint, and a link at the destination is replaced, never written through.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use safetensors::{Dtype, SafeTensors};

/// An integer tensor read from a file, widened to i64.
#[derive(Debug, Clone, PartialEq)]
pub struct IntTensor {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// A tensor read from a file, converted to f32 (integer tensors are kept apart).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A safetensors file in memory: a checkpoint, or the input/output of `forward`.
#[derive(Debug, Clone)]
pub struct TensorFile {
    pub path: PathBuf,
    /// Floating-point tensors by name, as f32.
    pub tensors: BTreeMap<String, Tensor>,
    /// Integer tensors (BatchNorm num_batches_tracked, timesteps, counters) by name, as i64.
    pub ints: BTreeMap<String, IntTensor>,
    pub metadata: HashMap<String, String>,
}

fn to_f32(path: &Path, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytemuck::pod_collect_to_vec(bytes),
        Dtype::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(bytes).into_iter().map(|v| v as f32).collect(),
        Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes).into_iter().map(f32::from).collect(),
        Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(bytes).into_iter().map(f32::from).collect(),
        other => bail!(
            "{}: tensor '{name}' has dtype {other:?}; expected a float tensor (f32, f64, f16 or bf16)",
            path.display()
        ),
    })
}

fn to_i64(bytes: &[u8], dtype: Dtype) -> Vec<i64> {
    match dtype {
        Dtype::I64 => bytemuck::pod_collect_to_vec(bytes),
        _ => bytemuck::pod_collect_to_vec::<u8, i32>(bytes).into_iter().map(i64::from).collect(),
    }
}

impl TensorFile {
    /// Read a safetensors file; any problem is one error line naming the file.
    pub fn load(path: &Path) -> Result<TensorFile> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e}); is it truncated?", path.display()))?;
        let (_, meta) =
            SafeTensors::read_metadata(&bytes).map_err(|e| anyhow!("{}: bad header: {e}", path.display()))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let mut tensors = BTreeMap::new();
        let mut ints = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = view.dtype();
            if matches!(dtype, Dtype::I64 | Dtype::I32) {
                let data = to_i64(view.data(), dtype);
                let shape = view.shape().to_vec();
                ints.insert(name, IntTensor { shape, data });
                continue;
            }
            let data = to_f32(path, &name, dtype, view.data())?;
            tensors.insert(name, Tensor { shape: view.shape().to_vec(), data });
        }
        Ok(TensorFile { path: path.to_path_buf(), tensors, ints, metadata })
    }

    /// Diffusion steps T, the rows of the sinusoidal time-embedding table [T, ch].
    pub(crate) fn table_rows(&self) -> Result<usize> {
        let name = "time_embedding.timembedding.0.weight";
        match self.shape(name)? {
            &[t, _] => Ok(t),
            other => bail!("{}: '{name}' must be [T, ch], got {other:?}", self.path.display()),
        }
    }

    pub(crate) fn shape(&self, name: &str) -> Result<&[usize]> {
        self.get(name).map(|t| &t.shape[..])
    }

    /// Every float tensor is finite: a checkpoint holding NaN or infinity (a corrupt file, or the
    /// state of a diverged run) would sample black images or train on silently.
    pub fn check_finite(&self) -> Result<()> {
        for (name, t) in &self.tensors {
            if let Some(i) = t.data.iter().position(|v| !v.is_finite()) {
                bail!(
                    "{}: tensor '{name}' holds {} at element {i}; the checkpoint is corrupt or from a diverged run \
                     (use an earlier checkpoint)",
                    self.path.display(),
                    t.data[i]
                );
            }
        }
        Ok(())
    }

    /// A counter (`optim.step`, BatchNorm `num_batches_tracked`): one non-negative integer, or
    /// None when the file has none.
    pub fn counter(&self, name: &str) -> Result<Option<u64>> {
        if self.tensors.contains_key(name) {
            bail!("{}: '{name}' is a float tensor; a counter is one int64 value", self.path.display());
        }
        let Some(t) = self.ints.get(name) else { return Ok(None) };
        match t.data[..] {
            [v] if v >= 0 => Ok(Some(v as u64)),
            [v] => bail!("{}: counter '{name}' is {v}; it must be at least 0", self.path.display()),
            _ => bail!(
                "{}: counter '{name}' has shape {:?} ({} values); it must hold exactly one int64 value",
                self.path.display(),
                t.shape,
                t.data.len()
            ),
        }
    }

    /// An integer tensor (e.g. timesteps), as i64.
    pub fn get_ints(&self, name: &str) -> Result<&IntTensor> {
        if let Some(t) = self.tensors.get(name) {
            bail!(
                "{}: '{name}' is a float tensor {:?}; it must be int64 or int32 (e.g. torch.long)",
                self.path.display(),
                t.shape
            );
        }
        self.ints
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing integer tensor '{name}' (int64 or int32)", self.path.display()))
    }

    /// A copy whose model weights are the EMA weights (`ema.*`), for sampling.
    pub fn with_ema_weights(&self) -> Result<TensorFile> {
        let mut out = self.clone();
        let mut found = false;
        for (name, t) in &self.tensors {
            if let Some(base) = name.strip_prefix("ema.") {
                out.tensors.insert(base.to_string(), t.clone());
                found = true;
            }
        }
        if !found {
            bail!("{}: has no EMA weights (ema.*); train with --ema to keep them", self.path.display());
        }
        Ok(out)
    }

    /// A batch of square images `name` [B, channels, S, S].
    pub fn get_images(&self, name: &str, channels: usize) -> Result<&Tensor> {
        let x = self.get(name)?;
        let s = &x.shape;
        if s.len() != 4 || s[1] != channels || s[2] != s[3] {
            bail!("{}: '{name}' must be [B, {channels}, S, S] for this model, got {s:?}", self.path.display());
        }
        Ok(x)
    }

    /// Integer timesteps `name` ([count], int64 or int32), each in 0..`steps`.
    pub fn get_timesteps(&self, name: &str, count: usize, steps: usize) -> Result<Vec<u32>> {
        let t = self.get_ints(name)?;
        if t.shape != [count] {
            bail!("{}: '{name}' must be [{count}] (one timestep per image), got {:?}", self.path.display(), t.shape);
        }
        t.data
            .iter()
            .map(|&v| {
                if v < 0 || v as usize >= steps {
                    bail!("{}: timestep {v} in '{name}' is outside 0..{steps}", self.path.display());
                }
                Ok(v as u32)
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        if self.ints.contains_key(name) {
            bail!("{}: '{name}' is an integer tensor; it must be a float tensor (float32)", self.path.display());
        }
        self.tensors.get(name).ok_or_else(|| anyhow!("{}: missing tensor '{name}'", self.path.display()))
    }
}

/// Checkpoints are tensor files whose names are the model's.
pub type Checkpoint = TensorFile;

/// A tensor to write.
pub enum Data<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// Write tensors and metadata as safetensors atomically (temporary file, then rename).
pub fn save(path: &Path, tensors: Vec<(String, Vec<usize>, Data)>, metadata: HashMap<String, String>) -> Result<()> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, shape, data) in tensors {
        match data {
            Data::F32(v) => owned.push((name, Dtype::F32, shape, bytemuck::cast_slice(v).to_vec())),
            Data::I64(v) => owned.push((name, Dtype::I64, shape, bytemuck::cast_slice(v).to_vec())),
        }
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow!("tensor '{name}': {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| anyhow!("serializing {}: {e}", path.display()))?;
    crate::fsutil::write_atomic_synced(path, &bytes)
}
