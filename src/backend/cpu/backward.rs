//! Backward phase (twin of kernels/backward.cu, SPEC "Backward"). Only kept entries carry
//! gradient, so every product here costs nnz * d: no B x F x d work.

use super::linalg::{axpy, dot};
use crate::sparse::{LatentView, SparseCodes};
use rayon::prelude::*;

/// `dZ[e] = G_b . W_dec_i` for every kept entry e = (b, i) (CSR order).
pub fn code_grads(codes: &SparseCodes, g: &[f32], w_dec: &[f32], d: usize) -> Vec<f32> {
    let mut dz = vec![0f32; codes.nnz()];
    // Each task owns its row's entries.
    let slices = codes.split_by_rows(1, &mut dz);
    slices.into_par_iter().enumerate().for_each(|(b, out)| {
        let gb = &g[b * d..(b + 1) * d];
        let (ix, _) = codes.row(b);
        for (o, &i) in out.iter_mut().zip(ix) {
            let w = &w_dec[i as usize * d..(i as usize + 1) * d];
            *o = dot(gb, w);
        }
    });
    dz
}

/// One group of kept entries that contributes to the latent-row gradients:
/// `dW_dec_i += sum z * G_b`, `dW_enc_i += sum dpre * xc_b`, `db_enc_i += sum dpre`.
pub struct Contribution<'a> {
    pub codes: &'a SparseCodes,
    pub view: &'a LatentView,
    /// Per entry (CSR order): dL/dpre.
    pub dpre: &'a [f32],
    /// B x d: the gradient w.r.t. this group's reconstruction.
    pub g: &'a [f32],
}

/// Fill the rows of `dw_enc`, `db_enc`, `dw_dec` (dense F x d buffers, overwritten) from the
/// contributions; `xc` is the centred input. Rows of latents with no entry are zeroed.
/// `extra` runs on each touched row afterwards (L1 terms, aligned map, projection).
pub fn latent_row_grads<E>(
    groups: &[Contribution<'_>],
    xc: &[f32],
    d: usize,
    dw_enc: &mut [f32],
    db_enc: &mut [f32],
    dw_dec: &mut [f32],
    extra: E,
) where
    E: Fn(usize, bool, &mut [f32], &mut [f32]) + Sync,
{
    dw_enc.par_chunks_mut(d).zip(dw_dec.par_chunks_mut(d)).zip(db_enc.par_iter_mut()).enumerate().for_each(
        |(i, ((ge, gd), gb))| {
            ge.fill(0.0);
            gd.fill(0.0);
            let mut bsum = 0f32;
            let mut touched = false;
            for grp in groups {
                for e in grp.view.entries(i) {
                    touched = true;
                    let b = grp.view.tok[e] as usize;
                    let p = grp.view.pos[e] as usize;
                    let z = grp.codes.val[p];
                    let dp = grp.dpre[p];
                    axpy(gd, z, &grp.g[b * d..(b + 1) * d]);
                    axpy(ge, dp, &xc[b * d..(b + 1) * d]);
                    bsum += dp;
                }
            }
            *gb = bsum;
            extra(i, touched, ge, gd);
        },
    );
}

/// `db_dec = sum_b G_b - W_enc^T db_enc` (b_dec is subtracted from the input too).
pub fn b_dec_grad(g_col_sums: &[f64], w_enc: &[f32], db_enc: &[f32], d: usize) -> Vec<f32> {
    let parts: Vec<Vec<f64>> = w_enc
        .par_chunks(d * 256)
        .zip(db_enc.par_chunks(256))
        .map(|(w, s)| {
            let mut acc = vec![0f64; d];
            for (row, &c) in w.chunks(d).zip(s) {
                if c != 0.0 {
                    for j in 0..d {
                        acc[j] += c as f64 * row[j] as f64;
                    }
                }
            }
            acc
        })
        .collect();
    let mut out: Vec<f64> = g_col_sums.to_vec();
    for p in parts {
        for j in 0..d {
            out[j] -= p[j];
        }
    }
    out.into_iter().map(|v| v as f32).collect()
}

/// The decoder-norm-weighted L1 penalty `lambda * sum_e z_e ||W_dec_i||` of the kept entries,
/// with what its gradient needs.
pub struct L1Terms {
    pub loss: f64,
    /// ||W_dec_i|| per latent.
    pub norms: Vec<f32>,
    /// sum_b z_bi per latent.
    pub sums: Vec<f32>,
    pub lambda: f32,
}

impl L1Terms {
    /// The penalty's value and its terms; adds `dL1/dpre = lambda ||W_dec_i||` into `dpre`.
    pub fn new(codes: &SparseCodes, w_dec: &[f32], d: usize, lambda: f32, dpre: &mut [f32]) -> Self {
        let norms: Vec<f32> = w_dec.chunks(d).map(|w| dot(w, w).sqrt()).collect();
        let mut sums = vec![0f32; norms.len()];
        let mut loss = 0.0;
        for (e, (&i, &z)) in codes.idx.iter().zip(&codes.val).enumerate() {
            let n = norms[i as usize];
            loss += (lambda * z * n) as f64;
            dpre[e] += lambda * n;
            sums[i as usize] += z;
        }
        Self { loss, norms, sums, lambda }
    }

    /// `d/dw [lambda (sum_b z_bi) ||w||]` added into latent i's decoder-row gradient `gd`.
    pub fn add_row_grad(&self, i: usize, w: &[f32], gd: &mut [f32]) {
        if self.norms[i] > 0.0 {
            axpy(gd, self.lambda * self.sums[i] / self.norms[i], w);
        }
    }
}
