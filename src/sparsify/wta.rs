//! Per-latent (column) selection: the m_j largest positive entries of column j.
//!
//! All passes over `pre` stream whole rows (row-major, no strided gathers):
//! 1. A lower bound t_j on column j's m_j-th largest value: split the column into groups of R
//!    consecutive rows and take the m_j-th largest group maximum (at least m_j entries are
//!    >= it). The group maxima are an elementwise max of R rows (SIMD-friendly).
//! 2. Collect the entries >= t_j (about m_j per column), in row-major order.
//! 3. Per column, the m_j-th best candidate key (value, then lower row) decides, found per
//!    range of columns (one task per thread); a final pass over each row block's candidates,
//!    already row-major, writes its part of the CSR.
//!
//! Work is split by rows or by columns, and the thresholds and m_j-th keys are values, not
//! positions: the kept set is the same on any number of threads.

use super::lanes::{collect_at_least, MIN_POS};
use super::{from_row_blocks, key, RowBlock};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Rows per task of the collect pass.
const ROWS_PER_TASK: usize = 32;
/// Columns per task of the threshold step: the task copies their group maxima into one tile of
/// `ngroups x TILE_COLS` floats (1 KB from each group's row; a column alone touches one cache
/// line per group, each on its own page).
const TILE_COLS: usize = 256;
/// Fewest columns per task of the per-column selection among candidates.
const MIN_RANGE_COLS: usize = 16;

/// Per latent j, the `m[j]` largest positive entries of column j.
pub(super) fn wta(pre: &[f32], rows: usize, cols: usize, m: &[usize]) -> SparseCodes {
    assert_eq!(m.len(), cols, "one budget per latent");
    if rows == 0 || cols == 0 {
        return SparseCodes::empty(rows, cols);
    }
    // Rows per group: about 4 groups per unit of the mean budget, at most 16 rows. (8 gave a
    // tighter bound, 4-7% more candidates than kept instead of 12-38%, but its per-column
    // selections over twice the groups cost more than the extra candidates: 32-36 against
    // 27-30 ms for everything after the group maxima at B 4096, F 4608, k 128.)
    let mean_m = (m.iter().map(|&x| x.min(rows)).sum::<usize>() / cols).max(1);
    let r = (rows / (4 * mean_m)).clamp(1, 16);
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
    thr.par_chunks_mut(TILE_COLS).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(tile, col), (p, t)| {
            let (j0, w) = (p * TILE_COLS, t.len());
            tile.clear();
            for g in 0..ngroups {
                tile.extend_from_slice(&gmax[g * cols + j0..g * cols + j0 + w]);
            }
            for (q, tj) in t.iter_mut().enumerate() {
                let mj = m[j0 + q];
                *tj = if mj == 0 {
                    f32::NAN // nothing passes
                } else if mj > ngroups {
                    MIN_POS // every positive entry is a candidate
                } else {
                    col.clear();
                    col.extend((0..ngroups).map(|g| tile[g * w + q].to_bits()));
                    // Non-negative floats order like their bits.
                    let (_, kth, _) = col.select_nth_unstable_by(mj - 1, |a: &u32, b: &u32| b.cmp(a));
                    f32::from_bits(*kth).max(MIN_POS)
                };
            }
        },
    );
    drop(gmax);

    // 2. Candidates (row, column, value) with value >= t_column, row-major (up to about 1.4 m_j
    //    per column).
    let expected = (m.iter().map(|&x| x.min(rows)).sum::<usize>() / rows.div_ceil(ROWS_PER_TASK) * 3 / 2)
        .min(ROWS_PER_TASK * cols);
    let cand = collect_at_least(pre, cols, ROWS_PER_TASK, expected, &thr[..]);

    // 3. Per column, the m_j-th best candidate key (0: keep every candidate), in ranges of
    //    columns, one task per thread: a range's keys stay in cache, where one column-major array
    //    of all of them (4.4 MB at B 4096, k 128) took random writes on one core. First each row
    //    task's candidates are split by range (one pass over them all, in parallel), so that a
    //    range task reads only its own: scanning every candidate per range made the work grow
    //    with the thread count.
    let width = cols.div_ceil(rayon::current_num_threads()).max(MIN_RANGE_COLS);
    let nranges = cols.div_ceil(width);
    let by_range: Vec<Vec<Vec<(u32, u64)>>> = cand
        .par_iter()
        .map(|list| {
            let mut parts: Vec<Vec<(u32, u64)>> =
                (0..nranges).map(|_| Vec::with_capacity(list.len() / nranges + 16)).collect();
            for &(b, j, v) in list {
                parts[j as usize / width].push((j, key(v, b)));
            }
            parts
        })
        .collect();
    let mut kth = vec![0u64; cols];
    kth.par_chunks_mut(width).enumerate().for_each(|(p, kt)| {
        let (j0, w) = (p * width, kt.len());
        let mine = || by_range.iter().flat_map(|parts| &parts[p]);
        let mut ptr = vec![0usize; w + 1];
        for &(j, _) in mine() {
            ptr[j as usize - j0 + 1] += 1;
        }
        for q in 0..w {
            ptr[q + 1] += ptr[q];
        }
        let mut keys = vec![0u64; ptr[w]];
        let mut fill = ptr[..w].to_vec();
        for &(j, k) in mine() {
            let f = &mut fill[j as usize - j0];
            keys[*f] = k;
            *f += 1;
        }
        for (q, kq) in kt.iter_mut().enumerate() {
            let (ks, mj) = (&mut keys[ptr[q]..ptr[q + 1]], m[j0 + q]);
            *kq = if ks.len() <= mj { 0 } else { *ks.select_nth_unstable_by(mj - 1, |a, b| b.cmp(a)).1 };
        }
    });
    drop(by_range);

    // Row-major CSR of the kept candidates: each task's rows from its own (row-major) list.
    let blocks: Vec<RowBlock> = cand
        .par_iter()
        .enumerate()
        .map(|(ti, list)| {
            let b0 = ti * ROWS_PER_TASK;
            let mut out = RowBlock {
                counts: vec![0; ROWS_PER_TASK.min(rows - b0)],
                idx: Vec::with_capacity(list.len()),
                val: Vec::with_capacity(list.len()),
            };
            for &(b, j, v) in list {
                if key(v, b) >= kth[j as usize] {
                    out.counts[b as usize - b0] += 1;
                    out.idx.push(j);
                    out.val.push(v);
                }
            }
            out
        })
        .collect();
    from_row_blocks(cols, &blocks)
}
