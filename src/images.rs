//! Pictures for people and FID tools: sample grids and one PNG per image, written atomically.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use image::{ExtendedColorType, ImageEncoder};

use crate::checkpoint::write_atomic;

/// Decode an image file (PNG or JPEG), with a one-line error naming the file: decoders' messages
/// may span lines, and every error the tool prints is one line.
pub fn open(path: &Path) -> Result<image::DynamicImage> {
    image::open(path).map_err(|e| {
        let why = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        anyhow::anyhow!("{}: cannot decode image ({why})", path.display())
    })
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
