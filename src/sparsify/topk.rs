//! Per-token top-k (and hybrid's per-token cap).
//!
//! Per row, two cheap passes and no allocation (thread-local scratch):
//! 1. A lower bound t on the row's k-th largest value: split the row into disjoint groups and
//!    take the k-th largest group maximum (at least k entries are >= it). Groups are lane q of
//!    R consecutive 16-wide chunks, so the maxima are a vertical (SIMD-friendly) max.
//! 2. Collect the entries >= t (about k of them) and select exactly among them.

use super::lanes::{each_at_least, Uniform, LANES, MIN_POS};
use super::{keep_best, key, key_idx, key_val, row_ptr_of, split_by};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 8;
/// Thread-local scratch of the per-row selection.
#[derive(Default)]
pub(crate) struct Scratch {
    gmax: Vec<u32>,
    keys: Vec<u64>,
    tmp: Vec<u64>,
}

/// Chunks per group for a row of `cols` entries and budget `k`: about 8k groups, at most 16.
fn chunks_per_group(cols: usize, k: usize) -> usize {
    (cols / (8 * k.max(1))).clamp(1, 16)
}

/// Exact top-`k` (`k >= 1`) of one row; afterwards `s.keys` holds the kept keys in index order.
fn row_topk(row: &[f32], k: usize, r: usize, s: &mut Scratch) {
    let block = r * LANES;
    let nblocks = row.len() / block;
    // 1. Lower bound from group maxima (non-positive and NaN count as 0).
    let mut t = MIN_POS;
    if nblocks * LANES >= k {
        s.gmax.clear();
        for blk in row.chunks_exact(block) {
            let mut acc = [0.0f32; LANES];
            for c in blk.chunks_exact(LANES) {
                for q in 0..LANES {
                    acc[q] = if c[q] > acc[q] { c[q] } else { acc[q] };
                }
            }
            s.gmax.extend(acc.iter().map(|x| x.to_bits()));
        }
        // Non-negative floats order like their bits.
        let (_, kth, _) = s.gmax.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        t = f32::from_bits(*kth).max(MIN_POS);
    }
    // 2. Candidates >= t, in index order.
    s.keys.clear();
    each_at_least(row, &Uniform::new(t), |j, v| s.keys.push(key(v, j as u32)));
    keep_best_in_order(&mut s.keys, &mut s.tmp, k);
}

/// Keep the `n` best keys of `keys` (`n >= 1`), preserving their order.
pub(crate) fn keep_best_in_order(keys: &mut Vec<u64>, tmp: &mut Vec<u64>, n: usize) {
    if keys.len() > n {
        tmp.clear();
        tmp.extend_from_slice(keys);
        let (_, nth, _) = tmp.select_nth_unstable_by(n - 1, |a, b| b.cmp(a));
        let nth = *nth;
        keys.retain(|&x| x >= nth);
    }
}

/// Per token, the `k` largest positive entries.
pub(super) fn topk(pre: &[f32], rows: usize, cols: usize, k: usize) -> SparseCodes {
    let slot = k.min(cols);
    if slot == 0 || rows == 0 {
        return SparseCodes::empty(rows, cols);
    }
    let r = chunks_per_group(cols, slot);
    let mut idx = vec![0u32; rows * slot];
    let mut val = vec![0f32; rows * slot];
    let mut counts = vec![0usize; rows];
    pre.par_chunks(cols)
        .zip(idx.par_chunks_mut(slot))
        .zip(val.par_chunks_mut(slot))
        .zip(counts.par_iter_mut())
        .with_min_len(ROWS_PER_TASK)
        .for_each_init(Scratch::default, |s, (((row, ix), vs), cnt)| {
            row_topk(row, slot, r, s);
            for (q, &x) in s.keys.iter().enumerate() {
                ix[q] = key_idx(x);
                vs[q] = key_val(x);
            }
            *cnt = s.keys.len();
        });
    // Squeeze out the unused slots (none when every row had k positives).
    let row_ptr = row_ptr_of(counts.iter().copied());
    if row_ptr[rows] != rows * slot {
        for (b, &c) in counts.iter().enumerate() {
            let (src, dst) = (b * slot, row_ptr[b]);
            idx.copy_within(src..src + c, dst);
            val.copy_within(src..src + c, dst);
        }
        idx.truncate(row_ptr[rows]);
        val.truncate(row_ptr[rows]);
    }
    SparseCodes { rows, cols, row_ptr, idx, val }
}

/// Keep at most `k_max` entries per row (largest first, lower latent index on ties). Entries
/// that are not strictly positive (never produced by [`super::select`]) are dropped.
pub fn cap_rows(codes: &SparseCodes, k_max: usize) -> SparseCodes {
    let rows = codes.rows;
    let counts: Vec<usize> = (0..rows)
        .into_par_iter()
        .with_min_len(64)
        .map(|b| codes.row(b).1.iter().filter(|&&v| v > 0.0).count().min(k_max))
        .collect();
    let row_ptr = row_ptr_of(counts);
    let n = row_ptr[rows];
    let mut idx = vec![0u32; n];
    let mut val = vec![0f32; n];
    let ix_rows = split_by(&mut idx, &row_ptr);
    let vs_rows = split_by(&mut val, &row_ptr);
    ix_rows.into_par_iter().zip(vs_rows).enumerate().with_min_len(64).for_each_init(Vec::new, |keys, (b, (ix, vs))| {
        let (ci, cv) = codes.row(b);
        let pos = cv.iter().filter(|&&v| v > 0.0).count();
        if pos == ix.len() {
            // Nothing to cap: copy the positive entries in order.
            let mut w = 0;
            for (&i, &v) in ci.iter().zip(cv) {
                if v > 0.0 {
                    ix[w] = i;
                    vs[w] = v;
                    w += 1;
                }
            }
            return;
        }
        if ix.is_empty() {
            return;
        }
        keys.clear();
        keys.extend(ci.iter().zip(cv).filter(|(_, &v)| v > 0.0).map(|(&i, &v)| key(v, i)));
        keep_best(keys, ix.len());
        keys.sort_unstable_by_key(|&x| key_idx(x));
        for (q, &x) in keys.iter().enumerate() {
            ix[q] = key_idx(x);
            vs[q] = key_val(x);
        }
    });
    SparseCodes { rows, cols: codes.cols, row_ptr, idx, val }
}
