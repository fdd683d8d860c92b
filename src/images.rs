//! Pictures for people and FID tools: sample grids and one PNG per image, written atomically.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use image::{ExtendedColorType, ImageEncoder};

use crate::fsutil::write_atomic;

/// Decode an image file (PNG or JPEG), with a one-line error naming the file: decoders' messages
/// may span lines, and every error the tool prints is one line.
pub fn open(path: &Path) -> Result<image::DynamicImage> {
    image::open(path).map_err(|e| {
        let why = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        anyhow::anyhow!("{}: cannot decode image ({why})", path.display())
    })
}

/// The pixels of `img` as PIL's `Image.open(f).convert("RGB")` gives them (pytorch-fid and the
/// reference's datasets read images so), interleaved, with 1 channel for grayscale (repeated to
/// RGB by the caller) or 3: alpha is dropped; 16-bit grayscale is clipped to 255 (PIL opens it as
/// mode I;16 and clips on conversion); 16-bit color keeps the high byte (PIL's RGB;16B unpacker).
pub fn pil_pixels(img: image::DynamicImage) -> (Vec<u8>, usize) {
    use image::DynamicImage as D;
    match img {
        D::ImageLuma16(b) => (b.into_raw().into_iter().map(|v| v.min(255) as u8).collect(), 1),
        D::ImageLumaA16(b) => (b.into_raw().chunks_exact(2).map(|p| (p[0] >> 8) as u8).collect(), 1),
        D::ImageRgb16(b) => (b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(), 3),
        D::ImageRgba16(b) => {
            (b.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).map(|v| (v >> 8) as u8).collect(), 3)
        }
        img if img.color().has_color() => (img.into_rgb8().into_raw(), 3),
        img => (img.into_luma8().into_raw(), 1),
    }
}

/// [`open`] as 8-bit RGB with PIL's conversion ([`pil_pixels`]).
pub fn open_rgb8(path: &Path) -> Result<image::RgbImage> {
    let img = open(path)?;
    let (w, h) = (img.width(), img.height());
    let (pixels, c) = pil_pixels(img);
    let rgb = if c == 3 { pixels } else { pixels.iter().flat_map(|&v| [v, v, v]).collect() };
    image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| anyhow::anyhow!("{}: inconsistent image size", path.display()))
}

/// [-1, 1] -> u8 as torchvision's save_image: floor(255 * (x + 1) / 2 + 0.5), clamped.
pub fn to_u8(x: f32) -> u8 {
    (((x + 1.0) * 0.5) * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// Encode interleaved u8 pixels (1 or 3 channels) as PNG bytes.
fn png_bytes(pixels: &[u8], width: usize, height: usize, channels: usize) -> Result<Vec<u8>> {
    let color = match channels {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        c => bail!("cannot write a {c}-channel image as PNG (1 or 3 channels)"),
    };
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(pixels, width as u32, height as u32, color)
        .context("encoding PNG")?;
    Ok(out)
}

/// Encode interleaved u8 pixels as JPEG (quality 95) bytes.
fn jpeg_bytes(pixels: &[u8], width: usize, height: usize, channels: usize) -> Result<Vec<u8>> {
    let color = match channels {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        c => bail!("cannot write a {c}-channel image as JPEG (1 or 3 channels)"),
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .write_image(pixels, width as u32, height as u32, color)
        .context("encoding JPEG")?;
    Ok(out)
}

/// Whether `path` names a JPEG file (.jpg, .jpeg); everything else is written as PNG.
fn is_jpeg(path: &Path) -> bool {
    path.extension().is_some_and(|e| matches!(e.to_string_lossy().to_lowercase().as_str(), "jpg" | "jpeg"))
}

/// Images [n, C, H, W] in [-1, 1] as a grid (`cols` wide, 2 px black padding, like
/// torchvision.utils.make_grid) written to `path`: JPEG for a .jpg/.jpeg name, else PNG.
pub fn save_grid(path: &Path, images: &[f32], [n, c, h, w]: [usize; 4], cols: usize) -> Result<()> {
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let pad = 2;
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut pixels = vec![0u8; gw * gh * c];
    for i in 0..n {
        let (ox, oy) = (pad + (i % cols) * (w + pad), pad + (i / cols) * (h + pad));
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    let v = images[((i * c + ch) * h + y) * w + x];
                    pixels[((oy + y) * gw + ox + x) * c + ch] = to_u8(v);
                }
            }
        }
    }
    let bytes = if is_jpeg(path) { jpeg_bytes(&pixels, gw, gh, c)? } else { png_bytes(&pixels, gw, gh, c)? };
    write_atomic(path, &bytes)
}

/// One PNG per image into `dir`, named by global index (000000.png, ...), for FID tools.
pub fn save_each(dir: &Path, images: &[f32], [n, c, h, w]: [usize; 4], first_index: usize) -> Result<()> {
    for i in 0..n {
        let mut pixels = vec![0u8; h * w * c];
        for ch in 0..c {
            for p in 0..h * w {
                pixels[p * c + ch] = to_u8(images[(i * c + ch) * h * w + p]);
            }
        }
        let path = dir.join(format!("{:06}.png", first_index + i));
        write_atomic(&path, &png_bytes(&pixels, w, h, c)?)?;
    }
    Ok(())
}
