//! Decode phase (twin of kernels/decode.cu): sparse decode, residual statistics, the
//! reconstruction gradient, and the aux loss on the residual. Cost nnz * d, never B x F x d.

use super::linalg::{axpy_rows, column_sums, dot_rows, prefetch_row_heads, ROW_CHUNK};
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
                if b + 1 < codes.rows {
                    prefetch_row_heads(w_dec, codes.row(b + 1).0, d);
                }
                res.copy_from_slice(b_dec);
                axpy_rows(res, ix, vs, w_dec, d);
                let (se, cos) = residual_rows(res, xb, scale, d, gr);
                acc.0 += se;
                acc.1 += cos;
                let n = ix.len();
                dot_rows(gr, ix, w_dec, d, &mut dzc[off..off + n]);
                off += n;
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
        let [se, xx, hh, xh] = residual_row(res, xb, scale, gr);
        acc.0 += se;
        let den = (xx * hh).sqrt();
        acc.1 += if den > 0.0 { xh / den } else { 0.0 };
    }
    acc
}

/// Lanes of the f64 row sums: independent accumulators, so the sums vectorise and do not wait
/// on one add chain (a fixed order, so still bitwise reproducible).
const LANES: usize = 8;

/// One row: `res` (x_hat on entry) becomes `r = x_hat - x` and `g = scale * r`; returns
/// (sum r^2, sum x^2, sum x_hat^2, sum x x_hat) in f64 (r rounded to f32 first, as it is stored).
/// Lane l of the sums takes the elements j = l mod 8 of the full 8-chunks in order, the lanes
/// are added 0..8, then the tail: [`avx::residual_row`] computes exactly this.
#[inline]
fn residual_row(res: &mut [f32], x: &[f32], scale: f32, g: &mut [f32]) -> [f64; 4] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    {
        avx::residual_row(res, x, scale, g)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    {
        residual_row_plain(res, x, scale, g)
    }
}

/// The plain form of [`residual_row`] (the reference its AVX twin is tested against).
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx"), allow(dead_code))]
fn residual_row_plain(res: &mut [f32], x: &[f32], scale: f32, g: &mut [f32]) -> [f64; 4] {
    let mut acc = [[0f64; LANES]; 4];
    let n = res.len() / LANES * LANES;
    for (hc, xc) in res[..n].chunks_exact(LANES).zip(x[..n].chunks_exact(LANES)) {
        for l in 0..LANES {
            let (rv, xv, hv) = ((hc[l] - xc[l]) as f64, xc[l] as f64, hc[l] as f64);
            acc[0][l] += rv * rv;
            acc[1][l] += xv * xv;
            acc[2][l] += hv * hv;
            acc[3][l] += xv * hv;
        }
    }
    let mut out = acc.map(|a| a.iter().sum::<f64>());
    tail_sums(&res[n..], &x[n..], &mut out);
    for ((h, xv), gr) in res.iter_mut().zip(x).zip(g.iter_mut()) {
        let r = *h - xv;
        *h = r;
        *gr = scale * r;
    }
    out
}

/// The elements after the last full 8-chunk, added to the row sums one by one.
#[inline]
fn tail_sums(h: &[f32], x: &[f32], out: &mut [f64; 4]) {
    for (&h, &x) in h.iter().zip(x) {
        let (rv, xv, hv) = ((h - x) as f64, x as f64, h as f64);
        out[0] += rv * rv;
        out[1] += xv * xv;
        out[2] += hv * hv;
        out[3] += xv * hv;
    }
}

/// The residual row by explicit AVX: in plain Rust LLVM built the f64 lane sums with shuffles
/// and blends (857 ns per row of 576 against 364 here, one core, in L1: 2 of the decode phase's
/// 10 ms at B 4096). Each 8-chunk is converted to f64 in two halves of 4 lanes; the residual and
/// gradient are written in the same pass.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
mod avx {
    use super::{tail_sums, LANES};
    use std::arch::x86_64::*;

    #[inline]
    pub(super) fn residual_row(res: &mut [f32], x: &[f32], scale: f32, g: &mut [f32]) -> [f64; 4] {
        let len = res.len().min(x.len()).min(g.len());
        let n = len / LANES * LANES;
        // SAFETY: AVX is enabled for the whole build (the cfg above); every load and store covers
        // 8 floats at j < n <= the length of each slice.
        let mut out = unsafe {
            let sc = _mm256_set1_ps(scale);
            // Sum q's lanes 0-3 in acc[2q], lanes 4-7 in acc[2q + 1].
            let mut acc = [_mm256_setzero_pd(); 8];
            let mut j = 0;
            while j < n {
                let h = _mm256_loadu_ps(res.as_ptr().add(j));
                let xv = _mm256_loadu_ps(x.as_ptr().add(j));
                let r = _mm256_sub_ps(h, xv);
                _mm256_storeu_ps(res.as_mut_ptr().add(j), r);
                _mm256_storeu_ps(g.as_mut_ptr().add(j), _mm256_mul_ps(sc, r));
                let halves = [
                    (_mm256_castps256_ps128(r), _mm256_castps256_ps128(xv), _mm256_castps256_ps128(h)),
                    (_mm256_extractf128_ps::<1>(r), _mm256_extractf128_ps::<1>(xv), _mm256_extractf128_ps::<1>(h)),
                ];
                for (q, (r, xv, h)) in halves.into_iter().enumerate() {
                    let (r, xv, h) = (_mm256_cvtps_pd(r), _mm256_cvtps_pd(xv), _mm256_cvtps_pd(h));
                    acc[q] = _mm256_add_pd(acc[q], _mm256_mul_pd(r, r));
                    acc[2 + q] = _mm256_add_pd(acc[2 + q], _mm256_mul_pd(xv, xv));
                    acc[4 + q] = _mm256_add_pd(acc[4 + q], _mm256_mul_pd(h, h));
                    acc[6 + q] = _mm256_add_pd(acc[6 + q], _mm256_mul_pd(xv, h));
                }
                j += LANES;
            }
            let mut out = [0f64; 4];
            for (s, o) in out.iter_mut().enumerate() {
                let mut lanes = [0f64; LANES];
                _mm256_storeu_pd(lanes.as_mut_ptr(), acc[2 * s]);
                _mm256_storeu_pd(lanes.as_mut_ptr().add(4), acc[2 * s + 1]);
                *o = lanes.iter().sum();
            }
            out
        };
        // The tail: sums from x_hat before it is overwritten.
        tail_sums(&res[n..len], &x[n..len], &mut out);
        for ((h, xv), gr) in res[n..len].iter_mut().zip(&x[n..len]).zip(&mut g[n..len]) {
            let r = *h - xv;
            *h = r;
            *gr = scale * r;
        }
        out
    }
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
/// where `e = -residual` (`residual = X_hat - X`). Returns (loss, g_aux as B x d), g_aux written
/// over `e_hat` (which nothing reads afterwards: a B x d allocation fewer per aux step).
pub fn aux_loss_and_grad(residual: &[f32], mut e_hat: Vec<f32>, d: usize, alpha: f32) -> (f64, Vec<f32>) {
    let rows = residual.len() / d;
    // E = -residual.
    let e_mean: Vec<f64> = column_sums(residual, d).into_iter().map(|s| -s / rows.max(1) as f64).collect();
    let parts: Vec<[f64; 2]> = residual
        .par_chunks(d * ROW_CHUNK)
        .zip(e_hat.par_chunks(d * ROW_CHUNK))
        .map(|(rs, hs)| {
            // Per column, then summed (as `total_variance`): the inner loop runs across columns
            // and vectorises, where one f64 sum per chunk waited on its add chain (2.6 ms on one
            // core at B 4096, d 576).
            let (mut num, mut den) = (vec![0f64; d], vec![0f64; d]);
            for (r, h) in rs.chunks(d).zip(hs.chunks(d)) {
                for ((((n, dn), &r), &h), m) in num.iter_mut().zip(den.iter_mut()).zip(r).zip(h).zip(&e_mean) {
                    let e = -(r as f64);
                    *n += (e - h as f64) * (e - h as f64);
                    *dn += (e - m) * (e - m);
                }
            }
            [num.iter().sum(), den.iter().sum()]
        })
        .collect();
    let (num, den) = parts.iter().fold((0f64, 0f64), |a, p| (a.0 + p[0], a.1 + p[1]));
    if den <= 0.0 || !den.is_finite() {
        e_hat.fill(0.0);
        return (0.0, e_hat);
    }
    let loss = alpha as f64 * num / den;
    // dL/dE_hat = -2 alpha (E - E_hat) / den = 2 alpha (residual + E_hat) / den.
    let c = (2.0 * alpha as f64 / den) as f32;
    e_hat.par_iter_mut().zip(residual.par_iter()).for_each(|(h, r)| *h = c * (r + *h));
    (loss, e_hat)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row the build uses (AVX where the target has it) is bitwise the plain form, and the
    /// plain form's sums are the f64 sums of the row: every length 0-40 (every tail), 576 and
    /// 577, values from 1e-30 to 1e6 and ±0.
    #[test]
    fn residual_row_matches_the_plain_form_and_f64() {
        let mut s = 11u64;
        let mut next = || {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            let mag = [1e-30f32, 1e-3, 1.0, 1e6][(s >> 20) as usize % 4];
            if (s >> 30).is_multiple_of(17) {
                -0.0
            } else {
                (u - 0.5) * mag
            }
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for len in (0..=40).chain([576, 577]) {
            let h: Vec<f32> = (0..len).map(|_| next()).collect();
            let x: Vec<f32> = (0..len).map(|_| next()).collect();
            let (mut r1, mut g1) = (h.clone(), vec![f32::NAN; len]);
            let (mut r2, mut g2) = (h.clone(), vec![f32::NAN; len]);
            let got = residual_row(&mut r1, &x, 0.37, &mut g1);
            let want = residual_row_plain(&mut r2, &x, 0.37, &mut g2);
            assert_eq!(got.map(f64::to_bits), want.map(f64::to_bits), "sums, len {len}");
            assert_eq!(bits(&r1), bits(&r2), "residual, len {len}");
            assert_eq!(bits(&g1), bits(&g2), "gradient, len {len}");
            let mut f = [0f64; 4];
            for j in 0..len {
                let r = (h[j] - x[j]) as f64;
                assert_eq!(r2[j].to_bits(), (h[j] - x[j]).to_bits());
                assert_eq!(g2[j].to_bits(), (0.37f32 * (h[j] - x[j])).to_bits());
                let (xv, hv) = (x[j] as f64, h[j] as f64);
                f = [f[0] + r * r, f[1] + xv * xv, f[2] + hv * hv, f[3] + xv * hv];
            }
            let scale = [f[0], f[1], f[2], (f[1] * f[2]).sqrt()];
            for q in 0..4 {
                assert!((want[q] - f[q]).abs() <= 1e-12 * scale[q], "sum {q}, len {len}: {} vs {}", want[q], f[q]);
            }
        }
    }
}
