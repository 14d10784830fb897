//! Where a picture goes: drawn into an RGB buffer in memory, encoded as PNG, then written
//! atomically like every other output (temporary, rename). A kill or a full disk leaves the
//! previous picture or none, never a truncated `alignment.png` or an empty one; every error
//! names the picture's file.

use super::{err, register_fonts};
use crate::util::atomic::write_atomic;
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// Draw a `w` x `h` picture with `draw` (on a white background) and write it to `path`.
pub fn render_png(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    register_fonts();
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    (|| -> Result<()> {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)
    })()
    .with_context(|| format!("cannot draw {}", path.display()))?;
    let png = encode_png(&rgb, w, h).with_context(|| format!("cannot encode {} as PNG", path.display()))?;
    write_atomic(path, &png)
}

/// 8-bit RGB pixels (row-major) as a PNG file's bytes.
pub fn encode_png(rgb: &[u8], w: u32, h: u32) -> Result<Vec<u8>> {
    let mut out = vec![];
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(out)
}
