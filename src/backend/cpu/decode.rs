//! Decode phase (twin of kernels/decode.cu): sparse decode, residual statistics, the
//! reconstruction gradient, and the aux loss on the residual. Cost nnz * d, never B x F x d.

use super::linalg::{axpy_rows, column_sums, dot, ROW_CHUNK};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// `x_hat = Z W_dec (+ b_dec)`: cost nnz * d.
pub fn decode(codes: &SparseCodes, w_dec: &[f32], b_dec: Option<&[f32]>, d: usize, x_hat: &mut [f32]) {
    x_hat.par_chunks_mut(d).enumerate().for_each(|(b, out)| {
        match b_dec {
            Some(bias) => out.copy_from_slice(bias),
            None => out.fill(0.0),
        }
        let (ix, vs) = codes.row(b);
        axpy_rows(out, ix, vs, w_dec, d);
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

/// Decode, residual and code gradients in one pass per token, so each kept decoder row is
/// fetched once and reused from cache: `x_hat_b = b_dec + sum_e z_e W_dec_i`, `r_b = x_hat_b - x_b`
/// (written to `residual` where one is given: only the aux losses read it; x_hat itself is never
/// stored), `g_b = scale * r_b`, `dz_e = g_b . W_dec_i` (CSR order). Returns per-chunk residual
/// sums (sum ||r||^2, sum cos(x, x_hat)) in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn decode_residual_grads(
    codes: &SparseCodes,
    w_dec: &[f32],
    b_dec: &[f32],
    x: &[f32],
    scale: f32,
    residual: Option<&mut [f32]>,
    g: &mut [f32],
    dz: &mut [f32],
) -> (f64, f64) {
    let d = b_dec.len();
    let n = d * ROW_CHUNK;
    // Each task owns its row chunk's entries of dz, and of the residual where it is kept.
    let dz_parts = codes.split_by_rows(ROW_CHUNK, dz);
    let res_parts: Vec<Option<&mut [f32]>> = match residual {
        Some(r) => r.chunks_mut(n).map(Some).collect(),
        None => dz_parts.iter().map(|_| None).collect(),
    };
    let sums: Vec<(f64, f64)> = g
        .par_chunks_mut(n)
        .zip(res_parts.into_par_iter())
        .zip(dz_parts.into_par_iter())
        .enumerate()
        .map(|(c, ((gs, mut rs), dzc))| {
            let mut acc = (0f64, 0f64);
            let mut off = 0;
            // Without a residual buffer, each row is built in one reused row (L1-resident): a
            // B x d stream of writes fewer.
            let mut row = if rs.is_none() { vec![0f32; d] } else { Vec::new() };
            for (r, gr) in gs.chunks_mut(d).enumerate() {
                let b = c * ROW_CHUNK + r;
                let xb = &x[b * d..(b + 1) * d];
                let (ix, vs) = codes.row(b);
                let res = match rs.as_deref_mut() {
                    Some(rs) => &mut rs[r * d..(r + 1) * d],
                    None => &mut row[..],
                };
                res.copy_from_slice(b_dec);
                axpy_rows(res, ix, vs, w_dec, d);
                let (se, cos) = residual_rows(res, xb, scale, d, gr);
                acc.0 += se;
                acc.1 += cos;
                for &i in ix {
                    dzc[off] = dot(gr, &w_dec[i as usize * d..(i as usize + 1) * d]);
                    off += 1;
                }
            }
            acc
        })
        .collect();
    sums.iter().fold((0.0, 0.0), |a, s| (a.0 + s.0, a.1 + s.1))
}

/// For a chunk of rows (all rows x d): `res` holds x_hat on entry and `r = x_hat - x` on return,
/// `g = scale * r`; returns (sum ||r||^2, sum cos(x, x_hat)) in row order, in f64.
pub fn residual_rows(res: &mut [f32], x: &[f32], scale: f32, d: usize, g: &mut [f32]) -> (f64, f64) {
    let mut acc = (0f64, 0f64);
    for ((res, xb), gr) in res.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks_mut(d)) {
        let [se, xx, hh, xh] = row_sums(res, xb);
        for j in 0..d {
            let rj = res[j] - xb[j];
            res[j] = rj;
            gr[j] = scale * rj;
        }
        acc.0 += se;
        let den = (xx * hh).sqrt();
        acc.1 += if den > 0.0 { xh / den } else { 0.0 };
    }
    acc
}

/// Lanes of the f64 row sums: independent accumulators, so the sums vectorise and do not wait
/// on one add chain (a fixed order, so still bitwise reproducible).
const LANES: usize = 8;

/// (sum (h - x)^2, sum x^2, sum h^2, sum x h) of one row, in f64 (r = h - x rounded to f32 first,
/// as the residual is stored).
fn row_sums(h: &[f32], x: &[f32]) -> [f64; 4] {
    let mut acc = [[0f64; LANES]; 4];
    let n = h.len() / LANES * LANES;
    for (hc, xc) in h[..n].chunks_exact(LANES).zip(x[..n].chunks_exact(LANES)) {
        for l in 0..LANES {
            let (rv, xv, hv) = ((hc[l] - xc[l]) as f64, xc[l] as f64, hc[l] as f64);
            acc[0][l] += rv * rv;
            acc[1][l] += xv * xv;
            acc[2][l] += hv * hv;
            acc[3][l] += xv * hv;
        }
    }
    let mut out = acc.map(|a| a.iter().sum::<f64>());
    for j in n..h.len() {
        let (rv, xv, hv) = ((h[j] - x[j]) as f64, x[j] as f64, h[j] as f64);
        out[0] += rv * rv;
        out[1] += xv * xv;
        out[2] += hv * hv;
        out[3] += xv * hv;
    }
    out
}

/// sum_b ||x_b - mean(X)||^2 (two passes, stable for inputs with a large mean).
pub fn total_variance(x: &[f32], d: usize) -> f64 {
    let rows = (x.len() / d).max(1);
    let mean: Vec<f64> = column_sums(x, d).into_iter().map(|s| s / rows as f64).collect();
    let parts: Vec<f64> = x
        .par_chunks(d * ROW_CHUNK)
        .map(|c| {
            // Per column, then summed: the inner loop runs across columns and vectorises.
            let mut acc = vec![0f64; d];
            for r in c.chunks(d) {
                for ((a, v), m) in acc.iter_mut().zip(r).zip(&mean) {
                    let dv = *v as f64 - m;
                    *a += dv * dv;
                }
            }
            acc.iter().sum()
        })
        .collect();
    parts.iter().sum()
}

/// Loss and the gradient w.r.t. `E_hat` of `alpha * ||E - E_hat||^2 / ||E - mean(E)||^2`,
/// where `e = -residual` (`residual = X_hat - X`). Returns (loss, g_aux as B x d).
pub fn aux_loss_and_grad(residual: &[f32], e_hat: &[f32], d: usize, alpha: f32) -> (f64, Vec<f32>) {
    let rows = residual.len() / d;
    // E = -residual.
    let e_mean: Vec<f64> = column_sums(residual, d).into_iter().map(|s| -s / rows.max(1) as f64).collect();
    let parts: Vec<[f64; 2]> = residual
        .par_chunks(d * ROW_CHUNK)
        .zip(e_hat.par_chunks(d * ROW_CHUNK))
        .map(|(rs, hs)| {
            let mut acc = [0f64; 2];
            for (r, h) in rs.chunks(d).zip(hs.chunks(d)) {
                for j in 0..d {
                    let e = -(r[j] as f64);
                    acc[0] += (e - h[j] as f64).powi(2);
                    acc[1] += (e - e_mean[j]).powi(2);
                }
            }
            acc
        })
        .collect();
    let (num, den) = parts.iter().fold((0f64, 0f64), |a, p| (a.0 + p[0], a.1 + p[1]));
    if den <= 0.0 || !den.is_finite() {
        return (0.0, vec![0.0; residual.len()]);
    }
    let loss = alpha as f64 * num / den;
    // dL/dE_hat = -2 alpha (E - E_hat) / den = 2 alpha (residual + E_hat) / den.
    let c = (2.0 * alpha as f64 / den) as f32;
    let g: Vec<f32> = residual.par_iter().zip(e_hat.par_iter()).map(|(r, h)| c * (r + h)).collect();
    (loss, g)
}
