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
use crate::fsutil::write_atomic;

/// Feature rows saved beside `mu` and `sigma` (enough for KID's subsets of 1000).
pub const SAVED_FEATURES: usize = 2000;

/// Most a deflated zip entry can expand (deflate's limit is about 1032:1).
const MAX_DEFLATE_RATIO: u64 = 1100;

/// Largest feature dimension of statistics (pytorch-fid's Inception pool3: 2048; its other
/// `--dims` are 64, 192 and 768). Bounds sigma to 2048^2 doubles before it is read.
pub const MAX_DIM: usize = 2048;

/// An array read from a `.npy` entry, converted to f64.
struct Array {
    shape: Vec<usize>,
    data: Vec<f64>,
}

/// A reader that hashes what passes through it (zip's CRC-32, checked over the whole entry).
struct Crc<R> {
    inner: R,
    hasher: crc32fast::Hasher,
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Up to the first `limit` characters of `s` on one line, for messages about untrusted text.
fn excerpt(s: &str, limit: usize) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    match one.char_indices().nth(limit) {
        Some((at, _)) => format!("{}...", &one[..at]),
        None => one,
    }
}

/// Open zip entry `name` for reading, after checking its declared sizes are possible in a
/// `file_len`-byte file; None if the archive has no such entry.
fn open_entry<'z, R: Read + std::io::Seek>(
    zip: &'z mut zip::ZipArchive<R>,
    name: &str,
    file_len: u64,
    path: &Path,
) -> Result<Option<(zip::read::ZipFile<'z, R>, u64)>> {
    let f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => bail!("{}: cannot read entry {name} ({e})", path.display()),
    };
    let declared = f.size();
    if declared > file_len.saturating_mul(MAX_DEFLATE_RATIO) || f.compressed_size() > file_len {
        bail!("{}: entry {name} declares {declared} bytes, impossible in a {file_len}-byte file", path.display());
    }
    Ok(Some((f, declared)))
}

/// Read the rest of `r` (at most `want` bytes, growing with what arrives), then check the entry
/// ends there and its CRC-32 matches.
fn finish_entry<R: Read>(mut r: Crc<R>, want: u64, crc: u32, name: &str, path: &Path) -> Result<Vec<u8>> {
    // zip's reader checks the CRC itself when it reaches the end (below); say so in one way.
    let corrupt = |e: std::io::Error| {
        if e.to_string().to_lowercase().contains("checksum") {
            anyhow!("{}: entry {name} fails its CRC-32 check (the file is damaged)", path.display())
        } else {
            anyhow!("{}: entry {name} is corrupt ({e})", path.display())
        }
    };
    let mut bytes = Vec::new();
    (&mut r).take(want).read_to_end(&mut bytes).map_err(corrupt)?;
    if bytes.len() as u64 != want {
        bail!("{}: entry {name} is truncated ({} of {want} bytes)", path.display(), bytes.len());
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest).map_err(corrupt)? != 0 {
        bail!("{}: entry {name} is longer than it declares", path.display());
    }
    if r.hasher.finalize() != crc {
        bail!("{}: entry {name} fails its CRC-32 check (the file is damaged)", path.display());
    }
    Ok(bytes)
}

/// The raw bytes of zip entry `name` (sizes and CRC-32 checked), or None if the archive has no
/// such entry.
pub(crate) fn entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    file_len: u64,
    path: &Path,
) -> Result<Option<Vec<u8>>> {
    let Some((f, declared)) = open_entry(zip, name, file_len, path)? else { return Ok(None) };
    let crc = f.crc32();
    finish_entry(Crc { inner: f, hasher: crc32fast::Hasher::new() }, declared, crc, name, path).map(Some)
}

/// The fields of a `.npy` header this reader accepts: little-endian float64 or float32, C order.
struct NpyHeader {
    item: usize,
    shape: Vec<usize>,
}

/// Parse the Python dict literal of a `.npy` header (`{'descr': '<f8', 'fortran_order': False,
/// 'shape': (2048, 2048), }`); errors quote at most a short excerpt of it.
fn parse_header(text: &str) -> std::result::Result<NpyHeader, String> {
    let value = |key: &str| -> std::result::Result<&str, String> {
        let at = [format!("'{key}'"), format!("\"{key}\"")]
            .iter()
            .find_map(|k| text.find(k.as_str()).map(|i| i + k.len()))
            .ok_or_else(|| format!("no '{key}' in header {}", excerpt(text, 80)))?;
        let rest = text[at..].trim_start();
        rest.strip_prefix(':')
            .map(str::trim_start)
            .ok_or_else(|| format!("bad '{key}' in header {}", excerpt(text, 80)))
    };
    let descr = value("descr")?;
    let quote = descr.chars().next().filter(|c| *c == '\'' || *c == '"').ok_or("'descr' is not a string")?;
    let descr = descr[1..].split(quote).next().unwrap_or_default();
    let item = match descr {
        "<f8" => 8,
        "<f4" => 4,
        other => return Err(format!("dtype {}; expected float64 (<f8) or float32 (<f4)", excerpt(other, 20))),
    };
    let fortran = value("fortran_order")?;
    if fortran.starts_with("True") {
        return Err("Fortran order is not supported; save with np.ascontiguousarray".into());
    } else if !fortran.starts_with("False") {
        return Err("'fortran_order' is not True or False".into());
    }
    let shape = value("shape")?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("'shape' is not a tuple")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>().map_err(|_| format!("'shape' ({}) is not a tuple of sizes", excerpt(inner, 40))))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    // numpy's own limit (NPY_MAXDIMS); also keeps shapes short in messages.
    if shape.len() > 64 {
        return Err(format!("a shape of {} dimensions", shape.len()));
    }
    Ok(NpyHeader { item, shape })
}

/// Read `.npy` entry `key` of an `.npz`, checking its header's shape with `expect` before the
/// data is read (so a declared size cannot make the reader allocate it), then its size and CRC.
fn read_npy<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    key: &str,
    file_len: u64,
    path: &Path,
    expect: &dyn Fn(&[usize]) -> Result<()>,
) -> Result<Option<Array>> {
    let name = format!("{key}.npy");
    let Some((f, declared)) = open_entry(zip, &name, file_len, path)? else { return Ok(None) };
    let crc = f.crc32();
    let mut r = Crc { inner: f, hasher: crc32fast::Hasher::new() };
    let bad = |why: String| anyhow!("{}: {key} is not a valid .npy array ({why})", path.display());
    let mut pre = [0u8; 10];
    r.read_exact(&mut pre).map_err(|_| bad("shorter than an .npy header".into()))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("no \\x93NUMPY magic".into()));
    }
    let (len, used) = match pre[6] {
        1 => (u16::from_le_bytes([pre[8], pre[9]]) as usize, 10),
        2 | 3 => {
            let mut two = [0u8; 2];
            r.read_exact(&mut two).map_err(|_| bad("truncated header".into()))?;
            (u32::from_le_bytes([pre[8], pre[9], two[0], two[1]]) as usize, 12)
        }
        v => return Err(bad(format!("unknown .npy version {v}"))),
    };
    // numpy writes headers of a few hundred bytes; 64 KiB is far more than any real one.
    if len > 1 << 16 || (used + len) as u64 > declared {
        return Err(bad(format!("a header of {len} bytes")));
    }
    let mut header = vec![0u8; len];
    r.read_exact(&mut header).map_err(|_| bad("truncated header".into()))?;
    let h = parse_header(&String::from_utf8_lossy(&header)).map_err(bad)?;
    let count = h.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let body = count.and_then(|c| c.checked_mul(h.item)).filter(|&b| (used + len) as u64 + b as u64 == declared);
    let Some(body) = body else {
        return Err(bad(format!("shape {:?} does not match the entry's {declared} bytes", h.shape)));
    };
    expect(&h.shape).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let bytes = finish_entry(r, body as u64, crc, &name, path)?;
    let data = if h.item == 8 {
        bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
    } else {
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64).collect()
    };
    Ok(Some(Array { shape: h.shape, data }))
}

/// Open an `.npz` (a zip); `what` says what the file should be, for the error.
fn open_npz(path: &Path, what: &str) -> Result<(zip::ZipArchive<Cursor<Vec<u8>>>, u64)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file_len = bytes.len() as u64;
    let zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| anyhow!("{}: not a numpy .npz file ({}){what}", path.display(), excerpt(&e.to_string(), 120)))?;
    Ok((zip, file_len))
}

/// One float array `key` of an `.npz`: (shape, values as f64).
pub fn read_array(path: &Path, key: &str) -> Result<(Vec<usize>, Vec<f64>)> {
    let (mut zip, file_len) = open_npz(path, "")?;
    let a = read_npy(&mut zip, key, file_len, path, &|_| Ok(()))?
        .ok_or_else(|| anyhow!("{}: no array '{key}'", path.display()))?;
    Ok((a.shape, a.data))
}

/// Read pytorch-fid statistics (`mu`, `sigma`; `feats` and `n` when present), checked: shapes
/// agree (read before the data they size), every value is finite, sigma is symmetric with a
/// non-negative diagonal, `n` is a whole number of images.
pub fn read_stats(path: &Path) -> Result<Stats> {
    let (mut zip, file_len) = open_npz(path, "; statistics come from `fid --save-stats` or pytorch-fid")?;
    let missing =
        |key: &str| anyhow!("{}: no '{key}' array; pytorch-fid statistics hold 'mu' and 'sigma'", path.display());
    let mu = read_npy(&mut zip, "mu", file_len, path, &|shape| match shape {
        &[d] if (1..=MAX_DIM).contains(&d) => Ok(()),
        &[d] => bail!("'mu' has {d} values; statistics have 1 to {MAX_DIM} dimensions (Inception pool3: 2048)"),
        other => bail!("'mu' must be a non-empty vector, got shape {other:?}"),
    })?
    .ok_or_else(|| missing("mu"))?;
    let dim = mu.data.len();
    let sigma = read_npy(&mut zip, "sigma", file_len, path, &|shape| {
        if shape != [dim, dim] {
            bail!("'sigma' must be [{dim}, {dim}] to match 'mu', got {shape:?}");
        }
        Ok(())
    })?
    .ok_or_else(|| missing("sigma"))?;
    let feats = read_npy(&mut zip, "feats", file_len, path, &|shape| match shape {
        &[_, d] if d == dim => Ok(()),
        other => bail!("'feats' must be [rows, {dim}], got {other:?}"),
    })?;
    let n = read_npy(&mut zip, "n", file_len, path, &|shape| match shape.iter().product::<usize>() {
        1 => Ok(()),
        _ => bail!("'n' must be one whole number, got shape {shape:?}"),
    })?;
    let rows = feats.as_ref().map_or(0, |f| f.shape[0]);
    let n = match n {
        // Whole, at least 2 (a covariance needs 2 images), exact in f64, and no fewer than the
        // feature rows saved.
        Some(a) if a.data[0].fract() == 0.0 && (2.0..=9_007_199_254_740_992.0).contains(&a.data[0]) => {
            let v = a.data[0] as usize;
            if v < rows {
                bail!("{}: 'n' is {v} but 'feats' holds {rows} rows; the statistics are inconsistent", path.display());
            }
            Some(v)
        }
        Some(a) => bail!("{}: 'n' must be a whole number of images (2 to 2^53), got {}", path.display(), a.data[0]),
        None => None,
    };
    let features = feats.map(|f| f.data.iter().map(|&v| v as f32).collect());
    let stats = Stats { dim, n, mu: mu.data, sigma: sigma.data, features };
    stats.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(stats)
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
