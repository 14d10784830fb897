//! PNG pictures for `sae eval`, drawn in pure Rust with plotters. Text uses DejaVu Sans,
//! embedded through the `dejavu` crate and registered with plotters' ab_glyph backend, so no
//! system font is needed.
//!
//! Two kinds of picture: line charts (training curves, one or more panels) and histograms
//! (one or more series overlaid as translucent bars with an outline, counts as fractions).
//! Both are drawn in memory and written atomically by [`output::render_png`].

pub mod output;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 540;
const FONT: &str = "sans-serif";

/// Colours of successive series.
pub const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

static FONTS: Once = Once::new();

/// Register the embedded font under the generic family names plotters asks for.
pub fn register_fonts() {
    FONTS.call_once(|| {
        let bytes: &'static [u8] = dejavu::sans::regular();
        for family in ["sans-serif", "serif", "monospace"] {
            // A font that fails to parse would leave text undrawn; the bytes are fixed, so ignore.
            let _ = plotters::style::register_font(family, FontStyle::Normal, bytes);
        }
    });
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

/// One named series of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a line chart.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Logarithmic y axis (points with y <= 0 are dropped).
    pub log_y: bool,
}

fn bounds(it: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in it.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    (lo <= hi).then_some((lo, hi))
}

/// Widen a degenerate or tight range a little so that lines do not sit on the frame.
fn pad(lo: f64, hi: f64, frac: f64) -> (f64, f64) {
    if hi - lo <= f64::EPSILON * lo.abs().max(1.0) {
        let w = lo.abs().max(1.0) * 0.05;
        return (lo - w, hi + w);
    }
    let w = (hi - lo) * frac;
    (lo - w, hi + w)
}

/// Line chart with the panels stacked vertically.
pub fn line_panels(path: &Path, panels: &[Panel]) -> Result<()> {
    let h = (HEIGHT as usize * panels.len().max(1) * 2 / 3).max(HEIGHT as usize) as u32;
    output::render_png(path, (WIDTH, h), |root| {
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_lines(area, panel)?;
        }
        Ok(())
    })
}

fn draw_lines(area: &DrawingArea<BitMapBackend<'_>, Shift>, p: &Panel) -> Result<()> {
    let pts = |s: &Series| -> Vec<(f64, f64)> {
        s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0)).collect()
    };
    let all: Vec<(f64, f64)> = p.series.iter().flat_map(pts).collect();
    let (x0, x1) = bounds(all.iter().map(|q| q.0)).unwrap_or((0.0, 1.0));
    let (y0, y1) = bounds(all.iter().map(|q| q.1)).unwrap_or((0.0, 1.0));
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    // A log axis only pays off over more than a decade (plotters labels powers of ten).
    let log_y = p.log_y && y0 > 0.0 && y1 / y0 > 20.0;
    let mut chart = ChartBuilder::on(area);
    chart.caption(&p.title, (FONT, 22)).margin(12).margin_right(36).x_label_area_size(42).y_label_area_size(80);
    let x_fmt = |v: &f64| match v.abs() {
        a if a >= 1000.0 => format!("{:.0}k", v / 1000.0),
        a if a >= 10.0 || v.fract() == 0.0 => format!("{v:.0}"),
        // Ticks that should be 0 but carry rounding error (-5.6e-17).
        a if a < 1e-9 => "0".into(),
        _ => format_tick(*v),
    };
    if log_y {
        let (y0, y1) = (y0 * 0.8, y1 * 1.25);
        let mut c = chart.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(err)?;
        c.configure_mesh()
            .x_desc(&p.x_label)
            .y_desc(&p.y_label)
            .label_style((FONT, 14))
            .light_line_style(RGBColor(238, 238, 238))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|v| format!("{v:.2e}"))
            .draw()
            .map_err(err)?;
        for (i, s) in p.series.iter().enumerate() {
            let c_ = color(i);
            c.draw_series(LineSeries::new(pts(s), c_.stroke_width(2)))
                .map_err(err)?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c_.stroke_width(2)));
        }
        if p.series.len() > 1 {
            legend(&mut c)?;
        }
    } else {
        let (y0, y1) = pad(y0, y1, 0.05);
        let mut c = chart.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?;
        c.configure_mesh()
            .x_desc(&p.x_label)
            .y_desc(&p.y_label)
            .label_style((FONT, 14))
            .light_line_style(RGBColor(238, 238, 238))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&|v| format_tick(*v))
            .draw()
            .map_err(err)?;
        for (i, s) in p.series.iter().enumerate() {
            let c_ = color(i);
            c.draw_series(LineSeries::new(pts(s), c_.stroke_width(2)))
                .map_err(err)?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c_.stroke_width(2)));
        }
        if p.series.len() > 1 {
            legend(&mut c)?;
        }
    }
    Ok(())
}

/// Tick label: plain for ordinary magnitudes, scientific for tiny or huge ones.
pub fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn legend<'a, 'b, X, Y>(c: &mut ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, Y>>) -> Result<()>
where
    'b: 'a,
    X: plotters::coord::ranged1d::Ranged,
    Y: plotters::coord::ranged1d::Ranged,
{
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// One named sample of values to histogram.
#[derive(Clone, Debug)]
pub struct Sample {
    pub label: String,
    pub values: Vec<f64>,
}

/// Histogram settings.
#[derive(Clone, Debug)]
pub struct HistSpec {
    pub title: String,
    pub x_label: String,
    /// Bin range (default: the data's range).
    pub range: Option<(f64, f64)>,
    pub bins: usize,
    /// Integer data: one bin per integer value in the range.
    pub integer: bool,
    /// A line of text under the caption (e.g. how many values fell outside).
    pub note: Option<String>,
}

/// Bin edges and per-sample fractions (values outside the range are not counted).
pub fn bin(samples: &[Sample], spec: &HistSpec) -> (Vec<f64>, Vec<Vec<f64>>) {
    let (lo, hi) =
        spec.range.or_else(|| bounds(samples.iter().flat_map(|s| s.values.iter().copied()))).unwrap_or((0.0, 1.0));
    let (lo, hi, n) = if spec.integer {
        let (lo, hi) = (lo.floor(), hi.ceil().max(lo.floor()));
        (lo - 0.5, hi + 0.5, (hi - lo) as usize + 1)
    } else if hi > lo {
        (lo, hi, spec.bins.max(1))
    } else {
        (lo - 0.5, lo + 0.5, spec.bins.max(1))
    };
    let w = (hi - lo) / n as f64;
    let edges: Vec<f64> = (0..=n).map(|i| lo + w * i as f64).collect();
    let fracs = samples
        .iter()
        .map(|s| {
            let mut c = vec![0f64; n];
            for &v in s.values.iter().filter(|v| v.is_finite()) {
                if v < lo || v > hi {
                    continue;
                }
                let i = (((v - lo) / w) as usize).min(n - 1);
                c[i] += 1.0;
            }
            let total = s.values.len().max(1) as f64;
            c.iter_mut().for_each(|x| *x /= total);
            c
        })
        .collect();
    (edges, fracs)
}

/// Histogram of one or more samples, overlaid.
pub fn histogram(path: &Path, samples: &[Sample], spec: &HistSpec) -> Result<()> {
    output::render_png(path, (WIDTH, HEIGHT), |root| draw_histogram(root, samples, spec))
}

fn draw_histogram(root: &DrawingArea<BitMapBackend<'_>, Shift>, samples: &[Sample], spec: &HistSpec) -> Result<()> {
    let (edges, fracs) = bin(samples, spec);
    let (x0, x1) = (edges[0], *edges.last().expect("edges"));
    let y1 = fracs.iter().flatten().copied().fold(0.0, f64::max).max(1e-9) * 1.1;
    let caption = match &spec.note {
        Some(n) => format!("{}  ({n})", spec.title),
        None => spec.title.clone(),
    };
    let mut c = ChartBuilder::on(root)
        .caption(caption, (FONT, 20))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(42)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(err)?;
    c.configure_mesh()
        .x_desc(&spec.x_label)
        .y_desc("fraction")
        .label_style((FONT, 14))
        .light_line_style(RGBColor(238, 238, 238))
        .x_label_formatter(&|v| format_tick(*v))
        .y_label_formatter(&|v| format_tick(*v))
        .disable_x_mesh()
        .draw()
        .map_err(err)?;
    let alpha = if samples.len() > 1 { 0.35 } else { 0.7 };
    for (i, (s, f)) in samples.iter().zip(&fracs).enumerate() {
        let col = color(i);
        c.draw_series(
            f.iter()
                .enumerate()
                .filter(|(_, y)| **y > 0.0)
                .map(|(b, y)| Rectangle::new([(edges[b], 0.0), (edges[b + 1], *y)], col.mix(alpha).filled())),
        )
        .map_err(err)?
        .label(&s.label)
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], col.mix(alpha).filled()));
        // Outline: a step line over the bars.
        let mut outline = vec![(x0, 0.0)];
        for (b, y) in f.iter().enumerate() {
            outline.push((edges[b], *y));
            outline.push((edges[b + 1], *y));
        }
        outline.push((x1, 0.0));
        c.draw_series(std::iter::once(PathElement::new(outline, col.stroke_width(1)))).map_err(err)?;
    }
    if samples.len() > 1 {
        legend(&mut c)?;
    }
    Ok(())
}

/// One panel with both axes logarithmic (points with x <= 0 or y <= 0 are dropped); `log_y` is
/// ignored. The first series of each pair is drawn as dots, the second as a line (data, fit).
pub fn log_log(path: &Path, p: &Panel) -> Result<()> {
    output::render_png(path, (WIDTH, HEIGHT), |root| {
        let pts = |s: &Series| -> Vec<(f64, f64)> {
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0).collect()
        };
        let all: Vec<(f64, f64)> = p.series.iter().flat_map(pts).collect();
        let (x0, x1) = bounds(all.iter().map(|q| q.0)).unwrap_or((1.0, 10.0));
        let (y0, y1) = bounds(all.iter().map(|q| q.1)).unwrap_or((0.1, 1.0));
        let (x0, x1) = (x0 * 0.8, x1.max(x0 * 10.0) * 1.25);
        let (y0, y1) = (y0 * 0.8, y1.max(y0 * 10.0) * 1.25);
        let mut c = ChartBuilder::on(root)
            .caption(&p.title, (FONT, 20))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(42)
            .y_label_area_size(80)
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(err)?;
        c.configure_mesh()
            .x_desc(&p.x_label)
            .y_desc(&p.y_label)
            .label_style((FONT, 14))
            .light_line_style(RGBColor(238, 238, 238))
            .x_label_formatter(&|v| format_tick(*v))
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw()
            .map_err(err)?;
        for (i, s) in p.series.iter().enumerate() {
            let col = color(i / 2);
            if i % 2 == 0 {
                c.draw_series(pts(s).into_iter().map(|q| Circle::new(q, 2, col.mix(0.6).filled())))
                    .map_err(err)?
                    .label(&s.label)
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, col.filled()));
            } else {
                // One curve: a contrasting fit line; several: each fit in its curve's colour.
                let line = if p.series.len() <= 2 { color(1) } else { col };
                c.draw_series(LineSeries::new(pts(s), line.stroke_width(2)))
                    .map_err(err)?
                    .label(&s.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], line.stroke_width(2)));
            }
        }
        legend(&mut c)
    })
}
