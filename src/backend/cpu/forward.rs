//! Sparse forward pieces: input centring, sparse decode, residual statistics.

use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Rows per parallel task where the work per row is small; fixed so that reductions over these
/// chunks are summed in the same order whatever the thread count (bitwise-reproducible runs).
pub const ROW_CHUNK: usize = 64;

/// `xc = x - b_dec` row by row.
pub fn center(x: &[f32], b_dec: &[f32], xc: &mut [f32]) {
    let d = b_dec.len();
    xc.par_chunks_mut(d * ROW_CHUNK).zip(x.par_chunks(d * ROW_CHUNK)).for_each(|(o, i)| {
        for (orow, irow) in o.chunks_mut(d).zip(i.chunks(d)) {
            for j in 0..d {
                orow[j] = irow[j] - b_dec[j];
            }
        }
    });
}

/// `x_hat = Z W_dec (+ b_dec)`: cost nnz * d.
pub fn decode(codes: &SparseCodes, w_dec: &[f32], b_dec: Option<&[f32]>, d: usize, x_hat: &mut [f32]) {
    x_hat.par_chunks_mut(d).enumerate().for_each(|(b, out)| {
        match b_dec {
            Some(bias) => out.copy_from_slice(bias),
            None => out.fill(0.0),
        }
        let (ix, vs) = codes.row(b);
        for (&i, &v) in ix.iter().zip(vs) {
            axpy(out, v, &w_dec[i as usize * d..(i as usize + 1) * d]);
        }
    });
}

/// Sums needed for loss and metrics of a reconstruction.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResidualStats {
    /// sum_b ||x_b - x_hat_b||^2
    pub sse: f64,
    /// sum_b ||x_b - mean(X)||^2
    pub total_var: f64,
    /// sum_b cos(x_b, x_hat_b)
    pub cos_sum: f64,
}

/// Residual statistics of `x_hat` against `x` (rows x d).
pub fn residual_stats(x: &[f32], x_hat: &[f32], d: usize) -> ResidualStats {
    let rows = x.len() / d;
    let mean = column_sums(x, d).into_iter().map(|s| s / rows.max(1) as f64).collect::<Vec<_>>();
    let parts: Vec<[f64; 3]> = x
        .par_chunks(d * ROW_CHUNK)
        .zip(x_hat.par_chunks(d * ROW_CHUNK))
        .map(|(xs, hs)| {
            let mut acc = [0f64; 3];
            for (xr, hr) in xs.chunks(d).zip(hs.chunks(d)) {
                let (mut se, mut tv, mut xx, mut hh, mut xh) = (0f64, 0f64, 0f64, 0f64, 0f64);
                for j in 0..d {
                    let (a, b) = (xr[j] as f64, hr[j] as f64);
                    se += (a - b) * (a - b);
                    tv += (a - mean[j]) * (a - mean[j]);
                    xx += a * a;
                    hh += b * b;
                    xh += a * b;
                }
                acc[0] += se;
                acc[1] += tv;
                let den = (xx * hh).sqrt();
                acc[2] += if den > 0.0 { xh / den } else { 0.0 };
            }
            acc
        })
        .collect();
    let mut s = ResidualStats::default();
    for p in parts {
        s.sse += p[0];
        s.total_var += p[1];
        s.cos_sum += p[2];
    }
    s
}

/// Column sums in f64, reduced over fixed row chunks (deterministic).
pub fn column_sums(x: &[f32], d: usize) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = x
        .par_chunks(d * ROW_CHUNK)
        .map(|c| {
            let mut acc = vec![0f64; d];
            for r in c.chunks(d) {
                for j in 0..d {
                    acc[j] += r[j] as f64;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f64; d];
    for p in parts {
        for j in 0..d {
            out[j] += p[j];
        }
    }
    out
}

/// `y += a * x` (vectorises: no bounds checks inside the zip).
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}
