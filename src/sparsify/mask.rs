//! Threshold rules: relu (every positive entry) and jumprelu (entries above theta_j and 0).

use super::lanes::{lanes_above, LANES};
use super::{from_row_blocks, row_ptr_of, split_by, RowBlock};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

const ROWS_PER_TASK: usize = 16;

/// Compact the entries of `r` with `r[i] > t[i]` into `si`/`sv`; returns their number. Chunks
/// without a kept entry are skipped; the others are compacted branch-free.
#[inline]
fn compact_row(r: &[f32], t: &[f32], si: &mut [u32], sv: &mut [f32]) -> usize {
    let mut w = 0usize;
    for (c, (vs, ts)) in r.chunks(LANES).zip(t.chunks(LANES)).enumerate() {
        if lanes_above(vs, ts) != 0 {
            for (q, (&v, &t)) in vs.iter().zip(ts).enumerate() {
                si[w] = (c * LANES + q) as u32;
                sv[w] = v;
                w += (v > t) as usize;
            }
        }
    }
    w
}

/// Keep `pre[b, i] > t[i]` (so `t[i] >= 0` keeps only positive entries; NaN never passes).
fn above(pre: &[f32], rows: usize, cols: usize, t: &[f32]) -> SparseCodes {
    debug_assert_eq!(t.len(), cols);
    if rows == 0 || cols == 0 {
        return SparseCodes::empty(rows, cols);
    }
    // Dense outputs (relu keeps about half) are written in place after a counting pass; sparse
    // ones (jumprelu) are collected in one pass. Same result either way.
    let probe = rows.min(8);
    let kept: usize = pre[..probe * cols].chunks_exact(cols).map(|r| count_row(r, t)).sum();
    if kept * 8 > probe * cols {
        two_pass(pre, rows, cols, t)
    } else {
        one_pass(pre, cols, t)
    }
}

fn count_row(r: &[f32], t: &[f32]) -> usize {
    r.iter().zip(t).map(|(v, t)| (*v > *t) as u32).sum::<u32>() as usize
}

/// Count per row, then compact each row straight into its place in the CSR.
fn two_pass(pre: &[f32], rows: usize, cols: usize, t: &[f32]) -> SparseCodes {
    let counts: Vec<usize> = pre.par_chunks(cols).with_min_len(ROWS_PER_TASK).map(|r| count_row(r, t)).collect();
    let row_ptr = row_ptr_of(counts);
    let n = row_ptr[rows];
    let mut idx = vec![0u32; n];
    let mut val = vec![0f32; n];
    let ix_rows = split_by(&mut idx, &row_ptr);
    let vs_rows = split_by(&mut val, &row_ptr);
    pre.par_chunks(cols).zip(ix_rows).zip(vs_rows).with_min_len(ROWS_PER_TASK).for_each_init(
        || (vec![0u32; cols], vec![0f32; cols]),
        |(si, sv), ((r, ix), vs)| {
            let w = compact_row(r, t, si, sv);
            ix.copy_from_slice(&si[..w]);
            vs.copy_from_slice(&sv[..w]);
        },
    );
    SparseCodes { rows, cols, row_ptr, idx, val }
}

/// One pass over `pre` (row tasks collect locally), then one parallel copy into the CSR.
fn one_pass(pre: &[f32], cols: usize, t: &[f32]) -> SparseCodes {
    let blocks: Vec<RowBlock> = pre
        .par_chunks(cols * ROWS_PER_TASK)
        .map_init(
            || (vec![0u32; cols], vec![0f32; cols]),
            |(si, sv), chunk| {
                let mut out = RowBlock { counts: Vec::with_capacity(ROWS_PER_TASK), ..Default::default() };
                for r in chunk.chunks_exact(cols) {
                    let w = compact_row(r, t, si, sv);
                    out.idx.extend_from_slice(&si[..w]);
                    out.val.extend_from_slice(&sv[..w]);
                    out.counts.push(w);
                }
                out
            },
        )
        .collect();
    from_row_blocks(cols, &blocks)
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
