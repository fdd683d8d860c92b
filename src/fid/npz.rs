//! pytorch-fid statistics files: a numpy `.npz` (zip of `.npy`) holding `mu` [d] and `sigma`
//! [d, d], float64. We also write `feats` (float32, the first [`SAVED_FEATURES`] feature rows, as
//! shared/reference/fid.py does) so KID can be computed against saved statistics, and `n`.
//!
//! Files are untrusted: every declared size is checked against the bytes actually present before
//! anything is allocated for it, and any problem is one error naming the file.

use std::io::{Cursor, Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use npyz::WriterBuilder;

use super::Stats;
use crate::checkpoint::write_atomic;

/// Feature rows saved beside `mu` and `sigma` (enough for KID's subsets of 1000).
pub const SAVED_FEATURES: usize = 2000;

/// Most a deflated zip entry can expand (deflate's limit is about 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1100;

/// An array read from a `.npy` entry, converted to f64.
struct Array {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// The raw bytes of zip entry `name`, or None if the archive has no such entry.
pub(crate) fn entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    file_len: u64,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => bail!("{}: cannot read entry {name} ({e})", path.display()),
    };
    let declared = f.size();
    if declared > file_len.saturating_mul(MAX_DEFLATE_RATIO) || f.compressed_size() > file_len {
        bail!("{}: entry {name} declares {declared} bytes, impossible in a {file_len}-byte file", path.display());
    }
    // Grows with the bytes that really arrive, never to the declared size up front.
    let mut bytes = Vec::new();
    (&mut f)
        .take(declared)
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow!("{}: entry {name} is corrupt ({e})", path.display()))?;
    if bytes.len() as u64 != declared {
        bail!("{}: entry {name} is truncated ({} of {declared} bytes)", path.display(), bytes.len());
    }
    Ok(Some(bytes))
}

/// Parse a `.npy` of float32 or float64 values.
fn parse_npy(bytes: &[u8], name: &str, path: &Path) -> Result<Array> {
    // npyz's parse errors span several lines: keep the error on one.
    let bad = |why: String| {
        let why = why.split_whitespace().collect::<Vec<_>>().join(" ");
        anyhow!("{}: {name} is not a valid .npy array ({why})", path.display())
    };
    let mut rest = bytes;
    let header = npyz::NpyHeader::from_reader(&mut rest).map_err(|e| bad(e.to_string()))?;
    let npy = npyz::NpyFile::with_header(header, rest);
    let shape: Vec<usize> = npy.shape().iter().map(|&d| usize::try_from(d).unwrap_or(usize::MAX)).collect();
    let count =
        shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| bad(format!("shape {shape:?}")))?;
    let descr = npy.dtype().descr().trim_matches('\'').to_string();
    let item = match descr.as_str() {
        "<f8" => 8,
        "<f4" => 4,
        other => bail!("{}: {name} has dtype {other}; expected float64 (<f8) or float32 (<f4)", path.display()),
    };
    if count.checked_mul(item).is_none_or(|b| b > rest.len()) {
        return Err(bad(format!("shape {shape:?} needs more bytes than the entry holds")));
    }
    if npy.order() == npyz::Order::Fortran && shape.len() > 1 {
        return Err(bad("Fortran order is not supported; save with np.ascontiguousarray".into()));
    }
    let data = if item == 8 {
        npy.into_vec::<f64>().map_err(|e| bad(e.to_string()))?
    } else {
        npy.into_vec::<f32>().map_err(|e| bad(e.to_string()))?.into_iter().map(f64::from).collect()
    };
    if data.len() != count {
        return Err(bad(format!("{} values for shape {shape:?}", data.len())));
    }
    Ok(Array { shape, data })
}

/// One float array `key` of an `.npz`: (shape, values as f64).
pub fn read_array(path: &Path, key: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file_len = bytes.len() as u64;
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| anyhow!("{}: not a numpy .npz file ({e})", path.display()))?;
    let b = entry(&mut zip, &format!("{key}.npy"), file_len, path)?
        .ok_or_else(|| anyhow!("{}: no array '{key}'", path.display()))?;
    let a = parse_npy(&b, key, path)?;
    Ok((a.shape, a.data))
}

/// Read pytorch-fid statistics (`mu`, `sigma`; `feats` and `n` when present).
pub fn read_stats(path: &Path) -> Result<Stats> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read statistics {}", path.display()))?;
    let file_len = bytes.len() as u64;
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        anyhow!(
            "{}: not a numpy .npz file ({e}); statistics come from `fid --save-stats` or pytorch-fid",
            path.display()
        )
    })?;
    let mut array = |key: &str| -> Result<Option<Array>> {
        let name = format!("{key}.npy");
        entry(&mut zip, &name, file_len, path)?.map(|b| parse_npy(&b, key, path)).transpose()
    };
    let missing =
        |key: &str| anyhow!("{}: no '{key}' array; pytorch-fid statistics hold 'mu' and 'sigma'", path.display());
    let mu = array("mu")?.ok_or_else(|| missing("mu"))?;
    let sigma = array("sigma")?.ok_or_else(|| missing("sigma"))?;
    let feats = array("feats")?;
    let n = array("n")?;
    let dim = mu.data.len();
    if mu.shape.len() != 1 || dim == 0 {
        bail!("{}: 'mu' must be a non-empty vector, got shape {:?}", path.display(), mu.shape);
    }
    if sigma.shape != [dim, dim] {
        bail!("{}: 'sigma' must be [{dim}, {dim}] to match 'mu', got {:?}", path.display(), sigma.shape);
    }
    let features = match feats {
        Some(f) if f.shape.len() == 2 && f.shape[1] == dim => Some(f.data.iter().map(|&v| v as f32).collect()),
        Some(f) => bail!("{}: 'feats' must be [rows, {dim}], got {:?}", path.display(), f.shape),
        None => None,
    };
    let n = match n {
        Some(a) if a.data.len() == 1 && a.data[0] >= 0.0 && a.data[0].fract() == 0.0 => Some(a.data[0] as usize),
        Some(a) => bail!("{}: 'n' must be one whole number, got shape {:?}", path.display(), a.shape),
        None => None,
    };
    Ok(Stats { dim, n, mu: mu.data, sigma: sigma.data, features })
}

fn npy_f64(data: &[f64], shape: &[usize]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(&mut buf).begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    Ok(buf)
}

fn npy_f32(data: &[f32], shape: &[usize]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(&mut buf).begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    Ok(buf)
}

/// Write `stats` as a numpy-readable `.npz` (uncompressed, like np.savez), atomically.
pub fn write_stats(path: &Path, stats: &Stats) -> Result<()> {
    let d = stats.dim;
    let mut entries = vec![("mu.npy", npy_f64(&stats.mu, &[d])?), ("sigma.npy", npy_f64(&stats.sigma, &[d, d])?)];
    if let Some(f) = &stats.features {
        let rows = (f.len() / d).min(SAVED_FEATURES);
        entries.push(("feats.npy", npy_f32(&f[..rows * d], &[rows, d])?));
    }
    if let Some(n) = stats.n {
        entries.push(("n.npy", npy_f64(&[n as f64], &[1])?));
    }
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
    for (name, bytes) in entries {
        zip.start_file(name, opts)?;
        zip.write_all(&bytes)?;
    }
    let bytes = zip.finish().context("writing the .npz archive")?.into_inner();
    write_atomic(path, &bytes)
}
