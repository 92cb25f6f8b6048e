//! Grids of greyscale images (generated digits, reconstructions) with thin separators.

use std::path::Path;

use plotters::prelude::*;

use super::{prepare, render, Drawn};
use crate::{Error, Result};

/// Largest width or height of an image grid in pixels.
pub const MAX_GRID_SIDE: usize = 16_384;

/// Colour of the separators between images (and of empty cells in the last row).
const SEPARATOR: RGBColor = RGBColor(90, 110, 160);

/// A greyscale grid of images with 1-pixel separators.
///
/// `images` is row-major [n, h*w]. Values are mapped linearly from [vmin, vmax] to black..white
/// (clamped); NaN pixels are drawn magenta. With `c = min(cols, n)` columns and
/// `r = ceil(n / c)` rows the PNG is `c*w*scale + c + 1` pixels wide and `r*h*scale + r + 1`
/// pixels high.
#[allow(clippy::too_many_arguments)]
pub fn image_grid(
    path: &Path,
    images: &[f32],
    h: usize,
    w: usize,
    cols: usize,
    vmin: f32,
    vmax: f32,
    scale: usize,
) -> Result<()> {
    if h == 0 || w == 0 || cols == 0 || scale == 0 {
        return Err(Error::Config(format!(
            "image grid needs positive h, w, cols and scale (got {h}, {w}, {cols}, {scale})"
        )));
    }
    let px = h.saturating_mul(w);
    if images.is_empty() || !images.len().is_multiple_of(px) {
        return Err(Error::Shape(format!(
            "{} values is not a whole number of {h}x{w} images",
            images.len()
        )));
    }
    if !(vmin.is_finite() && vmax.is_finite() && vmin < vmax) {
        return Err(Error::Config(format!(
            "image grid needs finite vmin < vmax (got {vmin}, {vmax})"
        )));
    }
    let n = images.len() / px;
    let c = cols.min(n);
    let r = n.div_ceil(c);
    let side = |k: usize, len: usize| {
        len.checked_mul(scale)
            .and_then(|v| v.checked_mul(k))
            .and_then(|v| v.checked_add(k + 1))
    };
    let (width, height) = match (side(c, w), side(r, h)) {
        (Some(a), Some(b)) if a <= MAX_GRID_SIDE && b <= MAX_GRID_SIDE => (a, b),
        _ => {
            return Err(Error::Config(format!(
            "image grid of {r}x{c} images of {h}x{w} at scale {scale} exceeds {MAX_GRID_SIDE} px"
        )))
        }
    };
    prepare(path)?;
    let mut buf = [SEPARATOR.0, SEPARATOR.1, SEPARATOR.2].repeat(width * height);
    for (k, img) in images.chunks_exact(px).enumerate() {
        let (top, left) = ((k / c) * (h * scale + 1) + 1, (k % c) * (w * scale + 1) + 1);
        for (p, &v) in img.iter().enumerate() {
            let rgb = if v.is_nan() {
                [255, 0, 255]
            } else {
                let g = ((v - vmin) / (vmax - vmin)).clamp(0.0, 1.0);
                [(g * 255.0).round() as u8; 3]
            };
            for dy in 0..scale {
                let y = top + (p / w) * scale + dy;
                let x = left + (p % w) * scale;
                for o in (y * width + x..y * width + x + scale).map(|q| 3 * q) {
                    buf[o..o + 3].copy_from_slice(&rgb);
                }
            }
        }
    }
    let draw = |path: &Path| -> Drawn {
        let mut backend = BitMapBackend::new(path, (width as u32, height as u32));
        backend.blit_bitmap((0, 0), (width as u32, height as u32), &buf)?;
        backend.present()?;
        Ok(())
    };
    render(path, draw)
}
