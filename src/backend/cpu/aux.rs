//! Auxiliary losses aux_k (Gao et al.) and aux_zipf (MC/FC paper): reconstruct the detached
//! residual `E = X - X_hat` from the top `k_aux` dead (or dying) latents of each token.

use super::forward::{column_sums, ROW_CHUNK};
use crate::sparse::SparseCodes;
use rayon::prelude::*;
use std::cmp::Ordering;

/// Per token, the `k_aux` largest positive `pre` among `candidates` (ascending latent indices);
/// ties go to the lower latent index, as everywhere.
pub fn select_aux(pre: &[f32], rows: usize, cols: usize, candidates: &[u32], k_aux: usize) -> SparseCodes {
    let lists: Vec<Vec<(u32, f32)>> = (0..rows)
        .into_par_iter()
        .map(|b| {
            let r = &pre[b * cols..(b + 1) * cols];
            let mut cand: Vec<(f32, u32)> =
                candidates.iter().filter(|&&i| r[i as usize] > 0.0).map(|&i| (r[i as usize], i)).collect();
            if cand.len() > k_aux {
                cand.select_nth_unstable_by(k_aux - 1, |a, b| {
                    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
                });
                cand.truncate(k_aux);
            }
            cand.into_iter().map(|(v, i)| (i, v)).collect()
        })
        .collect();
    SparseCodes::from_rows(cols, lists)
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
