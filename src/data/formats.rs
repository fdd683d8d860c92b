//! Dataset formats and the reference's per-dataset preprocessing.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use image::imageops::FilterType;

/// The embedded default: the first 10,000 MNIST training images (assets/README.md).
const EMBEDDED_MNIST: &[u8] = include_bytes!("../../assets/mnist-train-10k-images-idx3-ubyte.gz");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// MNIST / Fashion-MNIST: 1 channel, Resize(32) (bilinear), no flips.
    Idx,
    /// CIFAR-10 binary batches: 3 channels, 32 px, random horizontal flips.
    Cifar10,
    /// A folder of PNG/JPEG images (CelebA-style): center crop 148/178 of the short side,
    /// resize to the model size, random horizontal flips.
    Folder,
}

/// Images ready for training: u8 pixels [N, C, S, S] (converted to [-1, 1] per batch).
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub format: Format,
    pub channels: usize,
    pub size: usize,
    pub pixels: Vec<u8>,
    /// Random horizontal flips (CIFAR-10 and CelebA in the reference; not MNIST).
    pub flip: bool,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.pixels.len().checked_div(self.channels * self.size * self.size).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The format of `path`, from what it is and holds.
pub fn detect(path: &Path) -> Result<Format> {
    if !path.exists() {
        bail!("data path {} does not exist", path.display());
    }
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if path.is_file() {
        if name.contains("idx3-ubyte") {
            return Ok(Format::Idx);
        }
        bail!(
            "{}: not a dataset file; give an MNIST IDX file (*-images-idx3-ubyte[.gz]), a CIFAR-10 \
             binary folder, or a folder of PNG/JPEG images",
            path.display()
        );
    }
    let entries = list_dir(path)?;
    let has = |pred: &dyn Fn(&str) -> bool| {
        entries.iter().any(|p| pred(&p.file_name().unwrap_or_default().to_string_lossy().to_lowercase()))
    };
    if has(&|n| n.starts_with("data_batch_") && n.ends_with(".bin")) || path.join("cifar-10-batches-bin").is_dir() {
        return Ok(Format::Cifar10);
    }
    if has(&|n| n.contains("train-images-idx3-ubyte")) {
        return Ok(Format::Idx);
    }
    if has(&|n| is_image_name(n)) {
        return Ok(Format::Folder);
    }
    bail!("{}: found no MNIST IDX files, CIFAR-10 data_batch_*.bin or PNG/JPEG images in this folder", path.display())
}

fn is_image_name(n: &str) -> bool {
    n.ends_with(".png") || n.ends_with(".jpg") || n.ends_with(".jpeg")
}

fn list_dir(path: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Load a dataset (`None`: the embedded MNIST subset) at `size` x `size` pixels.
pub fn load(path: Option<&Path>, size: usize) -> Result<Dataset> {
    if size == 0 || size > MAX_SIZE {
        bail!("image size {size} is not a training size (1 to {MAX_SIZE} px; --size)");
    }
    let Some(path) = path else {
        let raw = gunzip_idx(EMBEDDED_MNIST).context("embedded MNIST")?;
        return idx_dataset("embedded MNIST (10,000 images)", &raw, Path::new("<embedded>"), size);
    };
    match detect(path)? {
        Format::Idx => {
            let file = if path.is_file() {
                path.to_path_buf()
            } else {
                list_dir(path)?
                    .into_iter()
                    .find(|p| p.file_name().unwrap_or_default().to_string_lossy().contains("train-images-idx3-ubyte"))
                    .expect("detect found it")
            };
            let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
                gunzip_idx(&bytes).with_context(|| format!("{}: bad gzip data", file.display()))?
            } else {
                bytes
            };
            idx_dataset(&file.display().to_string(), &raw, &file, size)
        }
        Format::Cifar10 => cifar10(path, size),
        Format::Folder => folder(path, size),
    }
}

/// Largest image side a dataset is resized to (the paper's largest is 64; a 4096 px side already
/// needs 16 MiB per grayscale image).
const MAX_SIZE: usize = 4096;

/// Most a dataset may grow when resized: stored images smaller than a quarter of the side they
/// are resized to are refused, so a small file cannot make the loader allocate without bound.
const MAX_UPSCALE: usize = 4;

/// Err unless images of `h` x `w` (from `file`) may be resized to `size` x `size`.
fn check_resize(file: &Path, h: usize, w: usize, size: usize) -> Result<()> {
    if h == 0 || w == 0 {
        bail!("{}: images of {h}x{w} pixels; an image has at least one pixel", file.display());
    }
    if h * MAX_UPSCALE < size || w * MAX_UPSCALE < size {
        bail!(
            "{}: {h}x{w} images are too small to train at {size}x{size} (at most {MAX_UPSCALE}x upscaling); use a smaller --size",
            file.display()
        );
    }
    Ok(())
}

/// Decompress a gzipped IDX image file, reading no more than its header declares (plus one byte,
/// so a longer file is still caught as a size mismatch): a gzip bomb stops there. The declared
/// size itself must fit what DEFLATE can expand this file to (at most 1032x).
fn gunzip_idx(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut dec = flate2::read::GzDecoder::new(bytes);
    let mut header = [0u8; 16];
    dec.read_exact(&mut header).map_err(|e| anyhow!("shorter than an IDX header ({e})"))?;
    let word = |i: usize| u64::from(u32::from_be_bytes(header[4 * i..4 * i + 4].try_into().expect("4 bytes")));
    if word(0) != 0x803 {
        return Ok(header.to_vec()); // idx_dataset names the wrong magic number
    }
    let (n, h, w) = (word(1), word(2), word(3));
    let body = n.checked_mul(h).and_then(|v| v.checked_mul(w)).filter(|&b| b <= 1032 * bytes.len() as u64);
    let Some(body) = body else {
        bail!("declares {n} images of {h}x{w}, more than a {}-byte gzip file can hold", bytes.len());
    };
    let mut out = header.to_vec();
    dec.take(body + 1).read_to_end(&mut out)?;
    Ok(out)
}

fn idx_dataset(name: &str, raw: &[u8], file: &Path, size: usize) -> Result<Dataset> {
    let err = |what: &str| anyhow!("{}: {what}; expected an IDX image file (magic 0x00000803)", file.display());
    if raw.len() < 16 {
        return Err(err("file too short"));
    }
    let word = |i: usize| u32::from_be_bytes(raw[4 * i..4 * i + 4].try_into().unwrap()) as usize;
    if word(0) != 0x803 {
        return Err(err(&format!("magic number {:#x}", word(0))));
    }
    let (n, h, w) = (word(1), word(2), word(3));
    // Checked: absurd declared sizes must not wrap around to the file's length.
    if n.checked_mul(h).and_then(|v| v.checked_mul(w)).and_then(|v| v.checked_add(16)) != Some(raw.len()) {
        return Err(err(&format!("header says {n} images of {h}x{w} but the file holds {} bytes", raw.len() - 16)));
    }
    if n == 0 {
        return Err(err("header says 0 images"));
    }
    check_resize(file, h, w, size)?;
    let mut pixels = Vec::with_capacity(n * size * size);
    for i in 0..n {
        let img = image::GrayImage::from_raw(w as u32, h as u32, raw[16 + i * h * w..16 + (i + 1) * h * w].to_vec())
            .expect("sizes checked");
        // The reference: transforms.Resize(32) (bilinear) on 28x28 MNIST.
        let img = if (h, w) == (size, size) {
            img
        } else {
            image::imageops::resize(&img, size as u32, size as u32, FilterType::Triangle)
        };
        pixels.extend_from_slice(img.as_raw());
    }
    Ok(Dataset { name: name.to_string(), format: Format::Idx, channels: 1, size, pixels, flip: false })
}

fn cifar10(path: &Path, size: usize) -> Result<Dataset> {
    let dir =
        if path.join("cifar-10-batches-bin").is_dir() { path.join("cifar-10-batches-bin") } else { path.to_path_buf() };
    let files: Vec<PathBuf> = list_dir(&dir)?
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            n.starts_with("data_batch_") && n.ends_with(".bin")
        })
        .collect();
    if size != 32 {
        bail!("CIFAR-10 images are 32x32; the model is configured for {size}x{size} (use --size 32)");
    }
    let mut pixels = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        if bytes.is_empty() || bytes.len() % 3073 != 0 {
            bail!(
                "{}: {} bytes is not a whole number of CIFAR-10 records (1 label + 3072 pixels)",
                f.display(),
                bytes.len()
            );
        }
        for rec in bytes.chunks(3073) {
            pixels.extend_from_slice(&rec[1..]); // already [3, 32, 32], channel-major
        }
    }
    Ok(Dataset { name: dir.display().to_string(), format: Format::Cifar10, channels: 3, size: 32, pixels, flip: true })
}

fn folder(path: &Path, size: usize) -> Result<Dataset> {
    let files: Vec<PathBuf> = list_dir(path)?
        .into_iter()
        .filter(|p| is_image_name(&p.file_name().unwrap_or_default().to_string_lossy().to_lowercase()))
        .collect();
    let mut pixels = Vec::with_capacity(files.len() * 3 * size * size);
    for f in &files {
        let img = crate::images::open_rgb8(f)?;
        // The reference's CelebA pipeline: CenterCrop(148) of the 178x218 aligned faces, then
        // Resize(64). For other image sizes the same fraction (148/178) of the short side.
        let short = img.width().min(img.height());
        let crop = ((short as f64) * 148.0 / 178.0).round().max(1.0) as u32;
        check_resize(f, crop as usize, crop as usize, size)?;
        let (x0, y0) = ((img.width() - crop) / 2, (img.height() - crop) / 2);
        let cropped = image::imageops::crop_imm(&img, x0, y0, crop, crop).to_image();
        let resized = image::imageops::resize(&cropped, size as u32, size as u32, FilterType::Triangle);
        for c in 0..3 {
            pixels.extend(resized.pixels().map(|p| p[c]));
        }
    }
    Ok(Dataset { name: path.display().to_string(), format: Format::Folder, channels: 3, size, pixels, flip: true })
}
