//! The loss and FID plots of a training run (PNG), drawn with plotters and the bundled DejaVu font.

use std::path::Path;

use anyhow::{anyhow, Result};
use image::ImageEncoder;
use plotters::prelude::*;

use crate::fsutil::write_atomic;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Series of at most this many points get a marker on every point.
const MARKED: usize = 50;

/// Plot `points` (step, loss) and a moving average to a PNG at `path`.
pub fn loss_plot(path: &Path, points: &[(u64, f32)], title: &str) -> Result<()> {
    series_plot(path, points, title, "loss (eps MSE)")
}

/// Plot `points` (step, value) and a moving average to a PNG at `path`, y axis named `y_desc`.
pub fn series_plot(path: &Path, points: &[(u64, f32)], title: &str, y_desc: &str) -> Result<()> {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let (w, h) = (800u32, 480u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        let finite: Vec<(u64, f32)> = points.iter().copied().filter(|p| p.1.is_finite() && p.1 >= 0.0).collect();
        // A little room right of the last point, so a point at the end is not drawn on the frame.
        let x_max = (finite.last().map_or(1, |p| p.0) as f64 * 1.02).ceil().max(1.0) as u64;
        let hi = finite.iter().fold(0f32, |hi, p| hi.max(p.1));
        let hi = if finite.is_empty() { 1.0 } else { hi * 1.05 };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0u64..x_max, 0f32..hi)
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .configure_mesh()
            .x_labels(8)
            .y_labels(8)
            .light_line_style(RGBColor(238, 238, 238))
            .x_desc("step")
            .y_desc(y_desc)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
        chart
            .draw_series(LineSeries::new(finite.iter().copied(), RGBColor(160, 190, 230)))
            .map_err(|e| anyhow!("plot: {e}"))?;
        let window = (finite.len() / 20).max(1);
        let smooth: Vec<(u64, f32)> = (0..finite.len())
            .map(|i| {
                let a = i.saturating_sub(window - 1);
                let avg = finite[a..=i].iter().map(|p| p.1).sum::<f32>() / (i - a + 1) as f32;
                (finite[i].0, avg)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(smooth, RGBColor(20, 60, 160).stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?;
        // A line needs two points: with few (FID every N steps), every point is drawn as well.
        if finite.len() <= MARKED {
            chart
                .draw_series(finite.iter().map(|&p| Circle::new(p, 4, RGBColor(20, 60, 160).filled())))
                .map_err(|e| anyhow!("plot: {e}"))?;
        }
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(&buf, w, h, image::ExtendedColorType::Rgb8)?;
    write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    /// Pixels of the series colour in a plot of `points`.
    fn series_pixels(points: &[(u64, f32)]) -> usize {
        let path = std::env::temp_dir().join(format!("sddpm-plot-{}-{}.png", std::process::id(), points.len()));
        super::series_plot(&path, points, "t", "FID").unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        std::fs::remove_file(&path).unwrap();
        img.pixels().filter(|p| p.0 == [20, 60, 160]).count()
    }

    #[test]
    fn a_single_point_is_drawn() {
        assert_eq!(series_pixels(&[]), 0);
        assert!(series_pixels(&[(5, 31.5)]) > 20, "one FID evaluation shows as a point");
        assert!(series_pixels(&[(5, 31.5), (10, 20.0)]) > series_pixels(&[(5, 31.5)]));
    }
}
