//! Threshold rules: relu (every positive entry) and jumprelu (entries above theta_j and 0).

use super::{row_ptr_of, split_by};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

const ROWS_PER_TASK: usize = 8;

/// Keep `pre[b, i] > t[i]` (so `t[i] >= 0` keeps only positive entries; NaN never passes).
fn above(pre: &[f32], rows: usize, cols: usize, t: &[f32]) -> SparseCodes {
    debug_assert_eq!(t.len(), cols);
    if rows == 0 || cols == 0 {
        return SparseCodes::empty(rows, cols);
    }
    let counts: Vec<usize> = pre
        .par_chunks(cols)
        .with_min_len(ROWS_PER_TASK)
        .map(|r| r.iter().zip(t).map(|(v, t)| (*v > *t) as usize).sum())
        .collect();
    let row_ptr = row_ptr_of(counts);
    let n = row_ptr[rows];
    let mut idx = vec![0u32; n];
    let mut val = vec![0f32; n];
    let ix_rows = split_by(&mut idx, &row_ptr);
    let vs_rows = split_by(&mut val, &row_ptr);
    pre.par_chunks(cols).zip(ix_rows).zip(vs_rows).with_min_len(ROWS_PER_TASK).for_each_init(
        || (vec![0u32; cols + 1], vec![0f32; cols + 1]),
        |(si, sv), ((r, ix), vs)| {
            // Branch-free compaction into scratch, then one copy.
            let mut w = 0usize;
            for (i, (&v, &t)) in r.iter().zip(t).enumerate() {
                si[w] = i as u32;
                sv[w] = v;
                w += (v > t) as usize;
            }
            ix.copy_from_slice(&si[..w]);
            vs.copy_from_slice(&sv[..w]);
        },
    );
    SparseCodes { rows, cols, row_ptr, idx, val }
}

/// Every strictly positive entry.
pub(super) fn relu(pre: &[f32], rows: usize, cols: usize) -> SparseCodes {
    above(pre, rows, cols, &vec![0.0; cols])
}

/// Entries with `pre > theta[i]` and `pre > 0`.
pub(super) fn jumprelu(pre: &[f32], rows: usize, cols: usize, theta: &[f32]) -> SparseCodes {
    assert_eq!(theta.len(), cols, "one threshold per latent");
    let t: Vec<f32> = theta.iter().map(|&x| if x.is_nan() { x } else { x.max(0.0) }).collect();
    above(pre, rows, cols, &t)
}
