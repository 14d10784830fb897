//! Per-latent (column) selection: the m_j largest positive entries of column j.
//!
//! All passes over `pre` stream whole rows (row-major, no strided gathers):
//! 1. A lower bound t_j on column j's m_j-th largest value: split the column into groups of R
//!    consecutive rows and take the m_j-th largest group maximum (at least m_j entries are
//!    >= it). The group maxima are an elementwise max of R rows (SIMD-friendly).
//! 2. Collect the entries >= t_j (about m_j per column), in row-major order.
//! 3. Per column, the m_j-th best candidate key (value, then lower row) decides; a final pass
//!    over the candidates in row-major order writes the CSR directly.

use super::topk::{LANES, MIN_POS};
use super::{key, row_ptr_of};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Rows per task of the collect pass.
const ROWS_PER_TASK: usize = 32;
/// Columns per task of the threshold step.
const COLS_PER_TASK: usize = 16;

/// Per latent j, the `m[j]` largest positive entries of column j.
pub(super) fn wta(pre: &[f32], rows: usize, cols: usize, m: &[usize]) -> SparseCodes {
    assert_eq!(m.len(), cols, "one budget per latent");
    if rows == 0 || cols == 0 {
        return SparseCodes::empty(rows, cols);
    }
    // Rows per group: about 8 groups per unit of the mean budget, at most 16 rows.
    let mean_m = (m.iter().map(|&x| x.min(rows)).sum::<usize>() / cols).max(1);
    let r = (rows / (8 * mean_m)).clamp(1, 16);
    let ngroups = rows / r;

    // 1. Group maxima gmax[g * cols + j] (non-positive and NaN count as 0), then t_j.
    let mut gmax = vec![0.0f32; ngroups * cols];
    gmax.par_chunks_mut(cols).enumerate().for_each(|(g, acc)| {
        for row in pre[g * r * cols..(g + 1) * r * cols].chunks_exact(cols) {
            for (a, &v) in acc.iter_mut().zip(row) {
                // `f32::max` ignores a NaN `v` (as `v > a` would) and stores unconditionally:
                // `*a = if v > *a { v } else { *a }` compiles to masked stores (vmaskmovps),
                // microcoded on AMD: this pass took 1.5x as long.
                *a = a.max(v);
            }
        }
    });
    let mut thr = vec![0.0f32; cols];
    thr.par_chunks_mut(COLS_PER_TASK).enumerate().for_each_init(Vec::new, |col, (ci, t)| {
        let j0 = ci * COLS_PER_TASK;
        for (q, tj) in t.iter_mut().enumerate() {
            let (j, mj) = (j0 + q, m[j0 + q]);
            *tj = if mj == 0 {
                f32::NAN // nothing passes
            } else if mj > ngroups {
                MIN_POS // every positive entry is a candidate
            } else {
                col.clear();
                col.extend((0..ngroups).map(|g| gmax[g * cols + j].to_bits()));
                // Non-negative floats order like their bits.
                let (_, kth, _) = col.select_nth_unstable_by(mj - 1, |a: &u32, b: &u32| b.cmp(a));
                f32::from_bits(*kth).max(MIN_POS)
            };
        }
    });
    drop(gmax);

    // 2. Candidates (row, column, value) with value >= t_column, row-major.
    let cand: Vec<Vec<(u32, u32, f32)>> = pre
        .par_chunks(cols * ROWS_PER_TASK)
        .enumerate()
        .map(|(ti, chunk)| {
            let mut out = Vec::new();
            for (rb, row) in chunk.chunks_exact(cols).enumerate() {
                let b = (ti * ROWS_PER_TASK + rb) as u32;
                let mut j0 = 0;
                for (s, t) in row.chunks_exact(LANES).zip(thr.chunks_exact(LANES)) {
                    let mut any = false;
                    for q in 0..LANES {
                        any |= s[q] >= t[q];
                    }
                    if any {
                        for q in 0..LANES {
                            if s[q] >= t[q] {
                                out.push((b, (j0 + q) as u32, s[q]));
                            }
                        }
                    }
                    j0 += LANES;
                }
                for j in j0..cols {
                    if row[j] >= thr[j] {
                        out.push((b, j as u32, row[j]));
                    }
                }
            }
            out
        })
        .collect();

    // 3. Per column, the m_j-th best candidate key (0: keep every candidate).
    let mut ccount = vec![0usize; cols];
    for e in cand.iter().flatten() {
        ccount[e.1 as usize] += 1;
    }
    let col_ptr = row_ptr_of(ccount);
    let mut fill = col_ptr[..cols].to_vec();
    let mut ckeys = vec![0u64; col_ptr[cols]];
    for &(b, j, v) in cand.iter().flatten() {
        let p = &mut fill[j as usize];
        ckeys[*p] = key(v, b);
        *p += 1;
    }
    let kth: Vec<u64> = super::split_by(&mut ckeys, &col_ptr)
        .into_par_iter()
        .zip(m)
        .with_min_len(COLS_PER_TASK)
        .map(|(ks, &mj)| if ks.len() <= mj { 0 } else { *ks.select_nth_unstable_by(mj - 1, |a, b| b.cmp(a)).1 })
        .collect();

    // Row-major CSR of the kept candidates.
    let mut counts = vec![0usize; rows];
    let mut idx = Vec::new();
    let mut val = Vec::new();
    for &(b, j, v) in cand.iter().flatten() {
        if key(v, b) >= kth[j as usize] {
            counts[b as usize] += 1;
            idx.push(j);
            val.push(v);
        }
    }
    SparseCodes { rows, cols, row_ptr: row_ptr_of(counts), idx, val }
}
