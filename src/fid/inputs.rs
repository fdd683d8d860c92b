//! What `fid` compares: folders of PNG/JPEG images (each file as it is: the protocol resizes
//! every image to 299 on its own, so sizes may differ), datasets in a format `train` reads
//! (MNIST/Fashion IDX at 28 px, CIFAR-10 binary at 32 px), or pytorch-fid `.npz` statistics.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};

use super::inception::{Inception, Preprocess, DIM};
use super::{npz, Stats};
use crate::data::{self, Format};
use crate::gpu::Context;

/// Images to run through the network.
pub enum Images {
    Files(Vec<PathBuf>),
    /// u8 pixels [N, C, S, S].
    Dataset {
        pixels: Vec<u8>,
        channels: usize,
        size: usize,
    },
}

/// One side of a comparison.
pub enum Input {
    Stats(Stats),
    Images(Images),
}

fn is_image(p: &Path) -> bool {
    p.extension().is_some_and(|e| matches!(e.to_string_lossy().to_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

impl Input {
    pub fn open(path: &Path) -> Result<Input> {
        if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz")) {
            return Ok(Input::Stats(npz::read_stats(path)?));
        }
        if !path.exists() {
            bail!(
                "{} does not exist; give a folder of PNG/JPEG images, a dataset or a .npz statistics file",
                path.display()
            );
        }
        let format = data::detect(path)?;
        let images = match format {
            Format::Folder => {
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .with_context(|| format!("cannot list {}", path.display()))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.is_file() && is_image(p))
                    .collect();
                files.sort();
                Images::Files(files)
            }
            Format::Idx | Format::Cifar10 => {
                let size = if format == Format::Idx { 28 } else { 32 };
                let d = data::load(Some(path), size)?;
                Images::Dataset { pixels: d.pixels, channels: d.channels, size }
            }
        };
        if images.len() < 2 {
            bail!("{}: {} image(s); FID needs at least 2", path.display(), images.len());
        }
        Ok(Input::Images(images))
    }
}

impl Images {
    pub fn len(&self) -> usize {
        match self {
            Images::Files(f) => f.len(),
            Images::Dataset { pixels, channels, size } => pixels.len() / (channels * size * size),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` as u8 HWC pixels with 1 (grayscale) or 3 channels.
    pub fn get(&self, i: usize) -> Result<(Vec<u8>, [usize; 3])> {
        match self {
            Images::Files(files) => {
                let path = &files[i];
                let img = crate::images::open(path)?;
                let (w, h) = (img.width() as usize, img.height() as usize);
                let (pixels, c) = crate::images::pil_pixels(img);
                Ok((pixels, [c, h, w]))
            }
            Images::Dataset { pixels, channels, size } => {
                let (c, s) = (*channels, *size);
                let chw = &pixels[i * c * s * s..][..c * s * s];
                let mut hwc = vec![0u8; c * s * s];
                for (j, &v) in chw.iter().enumerate() {
                    hwc[(j % (s * s)) * c + j / (s * s)] = v;
                }
                Ok((hwc, [c, s, s]))
            }
        }
    }

    /// Err, naming the file, if an image is too large to go to the GPU in one binding of
    /// `max_bytes` (it is uploaded whole before the resize to 299). Reads only the files' headers,
    /// so it runs before the network is built.
    pub fn check_fits(&self, max_bytes: u64) -> Result<()> {
        let Images::Files(files) = self else { return Ok(()) };
        for f in files {
            // An unreadable header is the decoder's to report, with the file, when it is read.
            let Ok((w, h)) = image::image_dimensions(f) else { continue };
            let bytes = 3 * w as u64 * h as u64 * 4;
            if bytes > max_bytes {
                bail!(
                    "{}: a {w}x{h} image needs {} MiB on the GPU, more than one binding allows ({} MiB); \
                     downscale it (pytorch-fid resizes every image to 299x299 anyway)",
                    f.display(),
                    bytes >> 20,
                    max_bytes >> 20
                );
            }
        }
        Ok(())
    }

    /// What image `i` is called in messages: its file, or its index in the dataset.
    fn name(&self, i: usize) -> String {
        match self {
            Images::Files(f) => f[i].display().to_string(),
            Images::Dataset { .. } => format!("image {i} of the dataset"),
        }
    }

    /// Features [n, 2048] of every image, `net.batch` at a time; `done(images)` after each batch.
    pub fn features(&self, ctx: &Context, net: &Inception, done: &mut dyn FnMut(u64)) -> Result<Vec<f32>> {
        self.features_of(ctx, net, 0..self.len(), done)
    }

    /// [`Images::features`] of the images `range` only (one MPI rank's share): each image's
    /// features do not depend on the others in its batch, so shares give the rows of the whole.
    pub fn features_of(
        &self,
        ctx: &Context,
        net: &Inception,
        range: std::ops::Range<usize>,
        done: &mut dyn FnMut(u64),
    ) -> Result<Vec<f32>> {
        let mut pre = Preprocess::default();
        let mut feats = Vec::with_capacity(range.len() * DIM);
        let mut batch = Vec::new();
        for (k, i) in range.clone().enumerate() {
            let (pixels, shape) = self.get(i)?;
            // Errors of an image's own graph (too large for the adapter) name the image.
            batch.extend(pre.run(ctx, &pixels, shape).map_err(|e| anyhow!("{}: {e:#}", self.name(i)))?);
            if (k + 1) % net.batch == 0 || k + 1 == range.len() {
                feats.extend(net.features(ctx, &batch)?);
                batch.clear();
                done(k as u64 + 1);
            }
        }
        Ok(feats)
    }
}
