//! The dense path of decode and backward, for codes dense enough that GEMMs beat gathers.
//!
//! The sparse path costs nnz x d gathered multiply-adds per product; a GEMM costs B x F x d at
//! a large fraction of the FMA peak. ReLU at initialisation keeps about half of B x F, where the
//! gathers are tens of times slower than four GEMMs (`sae bench step` shows both). With
//! `Z` (B x F, the kept codes, zero elsewhere), `G = dL/dx_hat` and `dP` (B x F, dL/dpre at the
//! kept entries):
//! - decode `x_hat = b_dec + Z W_dec`;
//! - code gradients `dZ = G W_dec^T`, read at the kept entries;
//! - `dW_dec = Z^T G`, `dW_enc = dP^T xc`, `db_enc = column sums of dP`.
//!
//! Same mathematics as `decode.rs` / `backward.rs` (tested against them); only the order of the
//! additions differs.

use super::decode::residual_rows;
use super::linalg::ROW_CHUNK;
use crate::sparse::SparseCodes;
use crate::sparsify;
use rayon::prelude::*;

/// `auto` takes the dense path above this fraction of kept entries (nnz / (B x F)). Measured
/// with `sae bench step --sparsifier relu --dense-codes never|always` at 512/4096, batch 4096,
/// 2 threads (relu at initialisation, density 0.5): the sparse products cost about 45
/// encoder-GEMM times per unit of density (step 24.2x the GEMM), the dense ones about 5.7
/// whatever the density (step 7.5x), so they cross near 0.13; a little below that, because the
/// dense cost is flat and the sparse one grows with nnz.
pub const DENSE_ABOVE: f64 = 0.12;

/// Whether `auto` takes the dense path for `nnz` kept entries of a `rows x cols` batch.
pub fn dense_is_cheaper(nnz: usize, rows: usize, cols: usize) -> bool {
    nnz as f64 > DENSE_ABOVE * rows as f64 * cols as f64
}

/// `out = op(a) op(b)`, overwritten (`gemm.rs`).
#[allow(clippy::too_many_arguments)]
fn gemm(a: &[f32], at: bool, b: &[f32], bt: bool, m: usize, n: usize, k: usize, out: &mut [f32]) {
    super::gemm::gemm(a, at, b, bt, m, n, k, out, false)
}

/// The codes as a dense B x F matrix in `z` (resized, zero where nothing is kept).
pub fn scatter(codes: &SparseCodes, vals: &[f32], z: &mut Vec<f32>) {
    crate::util::hugepage::resize_f32(z, codes.rows * codes.cols);
    z.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
    scatter_at(codes, vals, codes.cols, |e| codes.idx[e] as usize, z);
}

/// `dense[b, at(e)] = vals[e]` for every kept entry e of row b (`dense`: rows x `width`; other
/// entries untouched), in parallel over rows. The inverse of [`gather`].
fn scatter_at(codes: &SparseCodes, vals: &[f32], width: usize, at: impl Fn(usize) -> usize + Sync, dense: &mut [f32]) {
    dense.par_chunks_mut(width.max(1)).enumerate().for_each(|(b, row)| {
        for e in codes.row_ptr[b]..codes.row_ptr[b + 1] {
            row[at(e)] = vals[e];
        }
    });
}

/// Dense twin of `decode::decode_residual_grads`: `residual = x_hat - x`, `g = scale * residual`
/// and `dz` at the kept entries, with `z` holding the dense codes ([`scatter`]) and `work` a
/// B x F scratch buffer. Returns (sum ||r||^2, sum cos(x, x_hat)) over the same row chunks.
#[allow(clippy::too_many_arguments)]
pub fn decode_residual_grads(
    codes: &SparseCodes,
    z: &[f32],
    w_dec: &[f32],
    b_dec: &[f32],
    x: &[f32],
    scale: f32,
    residual: &mut [f32],
    g: &mut [f32],
    dz: &mut [f32],
    work: &mut Vec<f32>,
) -> (f64, f64) {
    let (rows, f, d) = (codes.rows, codes.cols, b_dec.len());
    // x_hat into `residual`, which `residual_rows` turns into x_hat - x in place.
    gemm(z, false, w_dec, false, rows, d, f, residual);
    residual.par_chunks_mut(d.max(1)).for_each(|r| r.iter_mut().zip(b_dec).for_each(|(v, b)| *v += b));
    let n = d * ROW_CHUNK;
    let sums: Vec<(f64, f64)> = residual
        .par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .zip(g.par_chunks_mut(n))
        .map(|((r, xc), gr)| residual_rows(r, xc, scale, d, gr))
        .collect();
    crate::util::hugepage::resize_f32(work, rows * f);
    gemm(g, false, w_dec, true, rows, f, d, work);
    gather(codes, work, f, |e| codes.idx[e] as usize, dz);
    sums.iter().fold((0.0, 0.0), |a, s| (a.0 + s.0, a.1 + s.1))
}

/// `out[e] = dense[b, at(e)]` for every kept entry e of row b (`dense`: rows x `width`), in
/// parallel over blocks of rows.
fn gather(codes: &SparseCodes, dense: &[f32], width: usize, at: impl Fn(usize) -> usize + Sync, out: &mut [f32]) {
    const ROWS: usize = 64;
    codes.split_by_rows(ROWS, out).into_par_iter().enumerate().for_each(|(t, part)| {
        let b0 = t * ROWS;
        let base = codes.row_ptr[b0];
        for b in b0..(b0 + ROWS).min(codes.rows) {
            for e in codes.row_ptr[b]..codes.row_ptr[b + 1] {
                part[e - base] = dense[b * width + at(e)];
            }
        }
    });
}

/// Dense twin of `backward::latent_row_grads` for one group: `dw_dec = Z^T G`, then `z` is
/// overwritten with dP (the kept entries' `dpre`) for `dw_enc = dP^T xc`; `db_enc` = per-latent
/// sums of `dpre`. Returns whether each latent had a kept entry.
#[allow(clippy::too_many_arguments)]
pub fn latent_row_grads(
    codes: &SparseCodes,
    z: &mut Vec<f32>,
    dpre: &[f32],
    g: &[f32],
    xc: &[f32],
    d: usize,
    dw_enc: &mut [f32],
    db_enc: &mut [f32],
    dw_dec: &mut [f32],
) -> Vec<bool> {
    let (rows, f) = (codes.rows, codes.cols);
    gemm(z, true, g, false, f, d, rows, dw_dec);
    scatter(codes, dpre, z);
    gemm(z, true, xc, false, f, d, rows, dw_enc);
    let sums = codes.fold_by_latent((0f32, false), |e| (dpre[e], true), |a, b| *a = (a.0 + b.0, a.1 | b.1));
    db_enc.iter_mut().zip(&sums).for_each(|(o, s)| *o = s.0);
    sums.into_iter().map(|s| s.1).collect()
}

/// An aux loss's codes as a dense `B x n` block over its `n` candidates (a few hundred dead or
/// dying latents), selected straight into the block ([`sparsify::select_aux_block`]): each
/// token keeps up to k_aux of the n candidates, dense enough that the four products run as GEMMs
/// of width n and no sparse codes are built.
pub struct Block {
    /// The block's latents, ascending.
    pub cols: Vec<u32>,
    /// B x n: the kept codes (positive; zero elsewhere, so also the mask of kept entries).
    z: Vec<f32>,
    /// The decoder rows of `cols` (n x d).
    w: Vec<f32>,
    pub nnz: usize,
}

impl Block {
    /// The aux selection over `cols` (ascending) with the decoder rows it needs.
    pub fn select(pre: &[f32], rows: usize, f: usize, cols: &[u32], k_aux: usize, w_dec: &[f32], d: usize) -> Self {
        let n = cols.len();
        let mut z = vec![0f32; rows * n];
        let nnz = sparsify::select_aux_block(pre, rows, f, cols, k_aux, &mut z);
        let mut w = vec![0f32; n * d];
        for (row, &i) in w.chunks_mut(d.max(1)).zip(cols) {
            row.copy_from_slice(&w_dec[i as usize * d..(i as usize + 1) * d]);
        }
        Self { cols: cols.to_vec(), z, w, nnz }
    }

    /// The block's entries as sparse codes over all `f` latents (for the sparse path).
    pub fn to_codes(&self, rows: usize, f: usize) -> SparseCodes {
        let n = self.cols.len();
        let lists = (0..rows)
            .into_par_iter()
            .map(|b| {
                let r = &self.z[b * n..(b + 1) * n];
                r.iter().zip(&self.cols).filter(|(v, _)| **v > 0.0).map(|(&v, &i)| (i, v)).collect()
            })
            .collect();
        SparseCodes::from_rows(f, lists)
    }

    /// `x_hat = Z W` (no bias), rows x d.
    pub fn decode(&self, rows: usize, d: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * d];
        gemm(&self.z, false, &self.w, false, rows, d, self.cols.len(), &mut out);
        out
    }

    /// Add `dW_dec = Z^T G`, `dW_enc = dP^T xc` and `db_enc` (column sums of dP, rows in order)
    /// into the full gradients' rows of the block's latents, where `dP = (G W^T)` at the kept
    /// entries; mark the latents with a kept entry in `touched`. Consumes the block's codes.
    #[allow(clippy::too_many_arguments)]
    pub fn add_row_grads(
        &mut self,
        g: &[f32],
        xc: &[f32],
        d: usize,
        dw_enc: &mut [f32],
        db_enc: &mut [f32],
        dw_dec: &mut [f32],
        touched: &mut [bool],
    ) {
        let n = self.cols.len();
        if n == 0 {
            return;
        }
        let rows = self.z.len() / n;
        let mut gd = vec![0f32; n * d];
        gemm(&self.z, true, g, false, n, d, rows, &mut gd);
        let mut dz = vec![0f32; rows * n];
        gemm(g, false, &self.w, true, rows, n, d, &mut dz);
        // dP in place of Z (dz where kept), with per fixed row chunk the column sums of dP and
        // which columns kept anything; the chunks' sums are added in order (deterministic).
        let parts: Vec<(Vec<f32>, Vec<u32>)> = self
            .z
            .par_chunks_mut(n * ROW_CHUNK)
            .zip(dz.par_chunks(n * ROW_CHUNK))
            .map(|(zc, dc)| {
                let (mut sum, mut kept) = (vec![0f32; n], vec![0u32; n]);
                for (zr, dr) in zc.chunks_mut(n).zip(dc.chunks(n)) {
                    for (((z, &dv), s), c) in zr.iter_mut().zip(dr).zip(sum.iter_mut()).zip(kept.iter_mut()) {
                        let k = *z > 0.0;
                        *z = if k { dv } else { 0.0 };
                        *s += *z;
                        *c += k as u32;
                    }
                }
                (sum, kept)
            })
            .collect();
        let (mut db, mut has) = (vec![0f32; n], vec![false; n]);
        for (sum, kept) in parts {
            for j in 0..n {
                db[j] += sum[j];
                has[j] |= kept[j] > 0;
            }
        }
        let mut ge = vec![0f32; n * d];
        gemm(&self.z, true, xc, false, n, d, rows, &mut ge);
        for (j, &i) in self.cols.iter().enumerate() {
            if !has[j] {
                continue;
            }
            let i = i as usize;
            let r = i * d..(i + 1) * d;
            dw_dec[r.clone()].iter_mut().zip(&gd[j * d..(j + 1) * d]).for_each(|(o, v)| *o += v);
            dw_enc[r].iter_mut().zip(&ge[j * d..(j + 1) * d]).for_each(|(o, v)| *o += v);
            db_enc[i] += db[j];
            touched[i] = true;
        }
    }
}
