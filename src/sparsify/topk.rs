//! Per-token top-k (and hybrid's per-token cap).

use super::{key, key_idx, key_val, keep_best, row_ptr_of, split_by};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 8;
/// Width of the vectorised threshold test.
const LANES: usize = 16;

/// Streaming exact top-`k` of one row (values arrive with ascending index) into `keys`.
/// Afterwards `keys` holds the kept keys, sorted by index.
#[inline]
fn row_topk(row: &[f32], k: usize, cap: usize, keys: &mut Vec<u64>) {
    debug_assert!(k >= 1 && cap > k);
    keys.clear();
    // An entry can only enter if it beats the current k-th best: later entries have higher
    // indices, so they must be strictly larger. Starts at 0: only positive values count.
    let mut thr = 0.0f32;
    let push = |keys: &mut Vec<u64>, thr: &mut f32, v: f32, i: usize| {
        keys.push(key(v, i as u32));
        if keys.len() >= cap {
            *thr = keep_best(keys, k).unwrap_or(*thr);
        }
    };
    let mut chunks = row.chunks_exact(LANES);
    let mut base = 0usize;
    for c in chunks.by_ref() {
        let mut any = false;
        for &v in c {
            any |= v > thr;
        }
        if any {
            for (q, &v) in c.iter().enumerate() {
                if v > thr {
                    push(keys, &mut thr, v, base + q);
                }
            }
        }
        base += LANES;
    }
    for (q, &v) in chunks.remainder().iter().enumerate() {
        if v > thr {
            push(keys, &mut thr, v, base + q);
        }
    }
    keep_best(keys, k);
    keys.sort_unstable_by_key(|&x| key_idx(x));
}

/// Per token, the `k` largest positive entries.
pub(super) fn topk(pre: &[f32], rows: usize, cols: usize, k: usize) -> SparseCodes {
    let slot = k.min(cols);
    if slot == 0 || rows == 0 {
        return SparseCodes::empty(rows, cols);
    }
    let cap = (4 * slot).max(slot + 64);
    let mut idx = vec![0u32; rows * slot];
    let mut val = vec![0f32; rows * slot];
    let mut counts = vec![0usize; rows];
    pre.par_chunks(cols)
        .zip(idx.par_chunks_mut(slot))
        .zip(val.par_chunks_mut(slot))
        .zip(counts.par_iter_mut())
        .with_min_len(ROWS_PER_TASK)
        .for_each_init(
            || Vec::with_capacity(cap),
            |keys, (((row, ix), vs), cnt)| {
                row_topk(row, slot, cap, keys);
                for (q, &x) in keys.iter().enumerate() {
                    ix[q] = key_idx(x);
                    vs[q] = key_val(x);
                }
                *cnt = keys.len();
            },
        );
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
