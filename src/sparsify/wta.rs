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
        group_max(&pre[g * r * cols..(g + 1) * r * cols], cols, acc);
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

/// `acc[j]` = the largest of column j over `rows` (whole rows of `cols`), or 0 where none is
/// greater: non-positive values and NaN count as 0 (`if v > a { v } else { a }` from a = 0, so
/// -0 never replaces +0 either).
///
/// Columns outer, the group's rows inner: each 8-column chunk takes its maximum over all the rows
/// in registers and is stored once, instead of one load and store of `acc` per row (that form
/// read `pre` at 13-14 GB/s on one core where a plain sum reads it at 21). The pass over a
/// 4096 x 4608 `pre`, old and new alternated inside `sae bench sparsifiers` (2-core AMD EPYC,
/// Zen 4, 30 calls each): 4.83 / 3.32 -> 3.17 / 2.62 ms at 2 threads, 6.01 -> 3.95 at 1 (k 32,
/// groups of 16 rows), 3.51 -> 2.67 at k 128 (groups of 9).
fn group_max(rows: &[f32], cols: usize, acc: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    let done = avx::group_max(rows, cols, acc);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    let done = 0;
    group_max_plain(rows, cols, acc, done);
}

/// [`group_max`] for the columns from `j0` on, in plain Rust (the tail, other targets, and the
/// reference its AVX twin is tested against). Row by row, so that it vectorises on any target;
/// on x86 this select compiles to masked stores (`vmaskmovps`, microcoded on AMD), which is one
/// reason the AVX form exists (`f32::max` avoided them but may return -0 for (+0, -0)).
fn group_max_plain(rows: &[f32], cols: usize, acc: &mut [f32], j0: usize) {
    if cols == 0 {
        return;
    }
    let acc = &mut acc[j0.min(cols)..cols];
    acc.fill(0.0);
    for row in rows.chunks_exact(cols) {
        for (a, &v) in acc.iter_mut().zip(&row[j0..]) {
            *a = if v > *a { v } else { *a };
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
mod avx {
    use std::arch::x86_64::{_mm256_loadu_ps, _mm256_max_ps, _mm256_setzero_ps, _mm256_storeu_ps};

    /// The full 8-column chunks of [`super::group_max`]; returns the first column left.
    /// `_mm256_max_ps(v, m)` is `if v > m { v } else { m }` lane by lane (NaN in `v`: `m`).
    #[inline]
    pub(super) fn group_max(rows: &[f32], cols: usize, acc: &mut [f32]) -> usize {
        let n = cols.min(acc.len()) / 8 * 8;
        let nrows = rows.len() / cols.max(1);
        // SAFETY: AVX is enabled for the whole build (the cfg above); the loads read 8 floats at
        // q * cols + j with q < nrows and j + 8 <= n <= cols, inside `rows`; the stores write
        // 8 floats at j + 8 <= n <= acc.len().
        unsafe {
            let p = rows.as_ptr();
            let mut j = 0;
            while j < n {
                let mut m = _mm256_setzero_ps();
                for q in 0..nrows {
                    m = _mm256_max_ps(_mm256_loadu_ps(p.add(q * cols + j)), m);
                }
                _mm256_storeu_ps(acc.as_mut_ptr().add(j), m);
                j += 8;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The group maxima the build uses are bitwise the plain form's, which is the largest value
    /// greater than 0 per column (else +0): every width 0-40 and 4611, 1-17 rows, with NaN,
    /// ±0, ±inf, subnormals and negatives.
    #[test]
    fn group_max_matches_the_plain_form() {
        let mut s = 9u32;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let specials = [f32::NAN, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::from_bits(3), -1.0];
            if (s >> 28) < 3 {
                specials[(s >> 8) as usize % specials.len()]
            } else {
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            }
        };
        for cols in (0..=40).chain([4611]) {
            for nrows in 1..=17 {
                let rows: Vec<f32> = (0..nrows * cols).map(|_| next()).collect();
                let (mut got, mut want) = (vec![f32::NAN; cols], vec![f32::NAN; cols]);
                group_max(&rows, cols, &mut got);
                group_max_plain(&rows, cols, &mut want, 0);
                for j in 0..cols {
                    assert_eq!(got[j].to_bits(), want[j].to_bits(), "cols {cols} rows {nrows} col {j}");
                    let best = (0..nrows).map(|q| rows[q * cols + j]).filter(|v| *v > 0.0).fold(0.0f32, f32::max);
                    assert_eq!(want[j].to_bits(), best.to_bits(), "cols {cols} rows {nrows} col {j}");
                }
            }
        }
    }
}
