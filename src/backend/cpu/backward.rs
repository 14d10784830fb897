//! Backward phase (twin of kernels/backward.cu, SPEC "Backward"). Only kept entries carry
//! gradient, so every product here costs nnz * d: no B x F x d work.

use super::linalg::{axpy, dot, dot_rows};
use crate::sparse::{SparseCodes, FOLD_ROWS};
use rayon::prelude::*;

/// `dZ[e] = G_b . W_dec_i` for every kept entry e = (b, i) (CSR order).
pub fn code_grads(codes: &SparseCodes, g: &[f32], w_dec: &[f32], d: usize) -> Vec<f32> {
    let mut dz = vec![0f32; codes.nnz()];
    // Each task owns its row's entries.
    let slices = codes.split_by_rows(1, &mut dz);
    slices.into_par_iter().enumerate().for_each(|(b, out)| {
        let (ix, _) = codes.row(b);
        dot_rows(&g[b * d..(b + 1) * d], ix, w_dec, d, out);
    });
    dz
}

/// One group of kept entries that contributes to the latent-row gradients:
/// `dW_dec_i += sum z * G_b`, `dW_enc_i += sum dpre * xc_b`, `db_enc_i += sum dpre`.
pub struct Contribution<'a> {
    pub codes: &'a SparseCodes,
    /// Per entry (CSR order): dL/dpre.
    pub dpre: &'a [f32],
    /// B x d: the gradient w.r.t. this group's reconstruction.
    pub g: &'a [f32],
}

/// Latent rows per task of [`latent_row_grads`]: two tasks per thread balance the load, and a
/// chunk's gradient rows (2 x chunk x d floats) stay within [`CHUNK_BYTES`], so that the chunks in
/// flight share the last-level cache.
///
/// Larger chunks re-read fewer G and xc rows (a token's rows are read once per chunk holding one
/// of its entries). On a 2-core AMD EPYC (Zen 4, 32 MB L3), B 4096, F 4608, d 576, k 32, the
/// backward pass alternated call by call inside `sae bench step` (3 sparsifiers x 10 steps, three
/// runs): 512 latents (the earlier cap) 14.2 / 15.4 / 14.6 ms against 13.4 / 14.4 / 12.3 at 1152
/// (what this gives); 13.3 against 12.1 at 768; at 1 thread 24.8 against 21.1. A scratch program
/// timed 128-384 slower than 512, and 2304 (10.6 MB per chunk) slower than 1152. The chunking
/// never changes the sums (per latent: groups, then tokens ascending).
fn latent_chunk(f: usize, d: usize) -> usize {
    let tasks = (2 * rayon::current_num_threads()).max(4);
    let cap = CHUNK_BYTES / (2 * d.max(1) * std::mem::size_of::<f32>());
    f.div_ceil(tasks).clamp(1, cap.max(1))
}

/// The gradient rows one task of [`latent_row_grads`] accumulates into, at most.
const CHUNK_BYTES: usize = 6 << 20;

/// Fill the rows of `dw_enc`, `db_enc`, `dw_dec` (dense F x d buffers, overwritten) from the
/// contributions; `xc` is the centred input. Rows of latents with no entry are zeroed.
/// `extra` runs on each row afterwards with whether any entry touched it (L1 terms, aligned
/// map, projection).
///
/// Token-major inside latent chunks: each task owns a chunk of latent rows and walks the tokens
/// in order, taking each token's entries in its chunk (one contiguous range of the CSR row,
/// [`SparseCodes::row_entries_in`]), so the G and xc rows it reads stream forward while the rows
/// it accumulates into stay in cache. Per latent the sums run over groups, then tokens
/// ascending, whatever the chunking: results do not depend on the thread count.
///
/// Measured alternatives, B 4096, F 4608, d 576, k 32, 2 threads: latent-major gathers, one
/// latent at a time over its tokens (a CSC view), ~1.4x slower; on a Zen 4 (2026-12-04), 1.30x,
/// and 1.35x with a software prefetch of the next entry's G and xc rows. Prefetching, in this
/// loop, the gradient rows of the entry two ahead: 4% slower (first 8 lines) to 24% (all); the
/// first 2 or 4 lines of the next token's gradient rows: tied or slower. The entries were once
/// bucketed per chunk first (a serial pass over all of them, 0.65 ms): alternated call by call
/// inside `sae bench step` (3 sparsifiers x 10 steps, Zen 4), 12.4 / 12.8 ms with it against
/// 11.4 / 11.6 without, and 9.8 against 8.5 at 512/4096.
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
    let f = db_enc.len();
    let chunk = latent_chunk(f, d);
    dw_enc
        .par_chunks_mut(chunk * d)
        .zip(dw_dec.par_chunks_mut(chunk * d))
        .zip(db_enc.par_chunks_mut(chunk))
        .enumerate()
        .for_each(|(c, ((ge, gd), gb))| {
            let base = c * chunk;
            let latents = base as u32..(base + gb.len()) as u32;
            ge.fill(0.0);
            gd.fill(0.0);
            gb.fill(0.0);
            let mut touched = vec![false; gb.len()];
            for grp in groups {
                let codes = grp.codes;
                for b in 0..codes.rows {
                    let (g_row, xc_row) = (&grp.g[b * d..(b + 1) * d], &xc[b * d..(b + 1) * d]);
                    for p in codes.row_entries_in(b, latents.clone()) {
                        let i = codes.idx[p] as usize - base;
                        let (z, dp) = (codes.val[p], grp.dpre[p]);
                        axpy(&mut gd[i * d..(i + 1) * d], z, g_row);
                        axpy(&mut ge[i * d..(i + 1) * d], dp, xc_row);
                        gb[i] += dp;
                        touched[i] = true;
                    }
                }
            }
            for (r, t) in touched.into_iter().enumerate() {
                extra(base + r, t, &mut ge[r * d..(r + 1) * d], &mut gd[r * d..(r + 1) * d]);
            }
        });
}

/// `db_dec = sum_b G_b - W_enc^T db_enc` (b_dec is subtracted from the input too).
pub fn b_dec_grad(g_col_sums: &[f64], w_enc: &[f32], db_enc: &[f32], d: usize) -> Vec<f32> {
    let parts: Vec<Vec<f64>> = w_enc
        .par_chunks(d * 256)
        .zip(db_enc.par_chunks(256))
        .map(|(w, s)| {
            let mut acc = vec![0f64; d];
            for (row, &c) in w.chunks(d).zip(s) {
                // Zipped (no bounds checks): 0.33 -> 0.25 ms at F 4608, d 576, 2 threads.
                if c != 0.0 {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += c as f64 * v as f64;
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
        let norms: Vec<f32> = w_dec.par_chunks(d.max(1)).map(|w| dot(w, w).sqrt()).collect();
        // Per block of rows (fixed: the loss's sum does not depend on the thread count).
        let losses: Vec<f64> = codes
            .split_by_rows(FOLD_ROWS, dpre)
            .into_par_iter()
            .enumerate()
            .map(|(p, part)| {
                let e0 = codes.row_ptr[p * FOLD_ROWS];
                let mut loss = 0.0;
                for (e, dp) in (e0..).zip(part) {
                    let n = norms[codes.idx[e] as usize];
                    loss += (lambda * codes.val[e] * n) as f64;
                    *dp += lambda * n;
                }
                loss
            })
            .collect();
        let sums = codes.fold_by_latent(0f32, |e| codes.val[e], |a, b| *a += b);
        Self { loss: losses.iter().sum(), norms, sums, lambda }
    }

    /// `d/dw [lambda (sum_b z_bi) ||w||]` added into latent i's decoder-row gradient `gd`.
    pub fn add_row_grad(&self, i: usize, w: &[f32], gd: &mut [f32]) {
        if self.norms[i] > 0.0 {
            axpy(gd, self.lambda * self.sums[i] / self.norms[i], w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunked gradients are bitwise one plain `axpy` per entry, groups in order then tokens
    /// ascending per latent; latents nobody kept are zero and `extra` sees them untouched; with 1
    /// and 3 threads. F 1100 (not a multiple of any chunk), d 13, two groups, an empty row.
    #[test]
    fn latent_row_grads_are_the_plain_sums_in_order() {
        let (rows, f, d) = (37usize, 1100usize, 13usize);
        let mut s = 3u32;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let mut group = |per_row: usize| {
            let lists = (0..rows)
                .map(|b| {
                    if b == 5 {
                        vec![]
                    } else {
                        (0..per_row).map(|q| (((b * 131 + q * 977) % 1000) as u32, 1.0 + q as f32)).collect()
                    }
                })
                .collect();
            let codes = SparseCodes::from_rows(f, lists);
            let dpre: Vec<f32> = (0..codes.nnz()).map(|_| next()).collect();
            let g: Vec<f32> = (0..rows * d).map(|_| next()).collect();
            (codes, dpre, g)
        };
        let (a, b) = (group(9), group(3));
        let xc: Vec<f32> = (0..rows * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let (mut we, mut be, mut wd) = (vec![0f32; f * d], vec![0f32; f], vec![0f32; f * d]);
        for (codes, dpre, g) in [&a, &b] {
            for bt in 0..rows {
                let r = codes.row_ptr[bt]..codes.row_ptr[bt + 1];
                for ((&i, &z), &dp) in codes.idx[r.clone()].iter().zip(&codes.val[r.clone()]).zip(&dpre[r]) {
                    let i = i as usize;
                    axpy(&mut wd[i * d..(i + 1) * d], z, &g[bt * d..(bt + 1) * d]);
                    axpy(&mut we[i * d..(i + 1) * d], dp, &xc[bt * d..(bt + 1) * d]);
                    be[i] += dp;
                }
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (mut ge, mut gb, mut gd) = (vec![f32::NAN; f * d], vec![f32::NAN; f], vec![f32::NAN; f * d]);
            let seen: Vec<std::sync::atomic::AtomicU8> = (0..f).map(|_| Default::default()).collect();
            pool.install(|| {
                let groups = [
                    Contribution { codes: &a.0, dpre: &a.1, g: &a.2 },
                    Contribution { codes: &b.0, dpre: &b.1, g: &b.2 },
                ];
                latent_row_grads(&groups, &xc, d, &mut ge, &mut gb, &mut gd, |i, t, _, _| {
                    seen[i].store(1 + t as u8, std::sync::atomic::Ordering::Relaxed);
                });
            });
            assert_eq!(bits(&gd), bits(&wd), "dW_dec, {threads} threads");
            assert_eq!(bits(&ge), bits(&we), "dW_enc, {threads} threads");
            assert_eq!(bits(&gb), bits(&be), "db_enc, {threads} threads");
            for (i, s) in seen.iter().enumerate() {
                let kept = a.0.idx.contains(&(i as u32)) || b.0.idx.contains(&(i as u32));
                assert_eq!(s.load(std::sync::atomic::Ordering::Relaxed), 1 + kept as u8, "latent {i}");
            }
            assert!((1000..f).all(|i| gd[i * d..(i + 1) * d].iter().all(|v| v.to_bits() == 0)));
        }
    }
}
