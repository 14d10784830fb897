//! Batch-wide top-(k*B), exact, with ties at the threshold resolved by row-major flat index.
//!
//! 1. Histogram of the high bits of every positive value (positive `f32` order like their bits),
//!    summed over row blocks in parallel: gives the bucket that holds the threshold.
//! 2. Collect every entry in or above that bucket (row blocks in parallel, flat order).
//! 3. Within the boundary bucket, select the exact threshold T; keep everything > T and the
//!    first (lowest flat index) entries equal to T up to the budget.

use super::row_ptr_of;
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Histogram key: the top `32 - SHIFT` bits of the value.
const SHIFT: u32 = 20;
const NB: usize = 1 << (32 - SHIFT);
/// Bit that marks non-positive (and NaN) values, which are never counted.
const NONPOS: u32 = 1 << (31 - SHIFT);
const ROWS_PER_TASK: usize = 16;

fn histogram(pre: &[f32], cols: usize) -> Vec<u64> {
    pre.par_chunks(cols * ROWS_PER_TASK)
        .fold(
            || vec![0u32; NB],
            |mut h, chunk| {
                for &v in chunk {
                    let b = (v.to_bits() >> SHIFT) | (((!(v > 0.0)) as u32) * NONPOS);
                    h[b as usize] += 1;
                }
                h
            },
        )
        .map(|h| h.into_iter().map(u64::from).collect::<Vec<u64>>())
        .reduce(
            || vec![0u64; NB],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

pub(super) fn batchtopk(pre: &[f32], rows: usize, cols: usize, k: usize) -> SparseCodes {
    let total = k.saturating_mul(rows);
    if total == 0 || cols == 0 {
        return SparseCodes::empty(rows, cols);
    }
    let hist = histogram(pre, cols);
    // Positive values live in buckets 0..NONPOS (+inf in the top one; NaN is marked NONPOS).
    let positives: u64 = hist[..NONPOS as usize].iter().sum();
    if positives <= total as u64 {
        return super::mask::relu(pre, rows, cols);
    }
    let mut above = 0u64; // entries in buckets above `hb`
    let mut hb = NONPOS as usize - 1;
    loop {
        if above + hist[hb] >= total as u64 {
            break;
        }
        above += hist[hb];
        hb -= 1;
    }
    // Every positive entry >= lo is a candidate (lo = start of bucket hb, at least the smallest
    // positive value).
    let lo = f32::from_bits(((hb as u32) << SHIFT).max(1));
    let blocks: Vec<Vec<(u32, u32, f32)>> = pre
        .par_chunks(cols * ROWS_PER_TASK)
        .enumerate()
        .map(|(bi, chunk)| {
            let mut out = Vec::new();
            for (r, row) in chunk.chunks_exact(cols).enumerate() {
                let b = (bi * ROWS_PER_TASK + r) as u32;
                let mut it = row.chunks_exact(16);
                let mut base = 0usize;
                for c in it.by_ref() {
                    let mut any = false;
                    for &v in c {
                        any |= v >= lo;
                    }
                    if any {
                        for (q, &v) in c.iter().enumerate() {
                            if v >= lo {
                                out.push((b, (base + q) as u32, v));
                            }
                        }
                    }
                    base += 16;
                }
                for (q, &v) in it.remainder().iter().enumerate() {
                    if v >= lo {
                        out.push((b, (base + q) as u32, v));
                    }
                }
            }
            out
        })
        .collect();
    // Exact threshold within bucket hb: the need-th largest value there.
    let need = (total as u64 - above) as usize;
    let mut inb: Vec<u32> =
        blocks.iter().flatten().map(|e| e.2.to_bits()).filter(|&x| (x >> SHIFT) as usize == hb).collect();
    debug_assert!(need >= 1 && need <= inb.len());
    inb.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    let t_bits = inb[need - 1];
    let gt_in_bucket = inb.iter().filter(|&&x| x > t_bits).count();
    let mut eq_left = need - gt_in_bucket;
    let t = f32::from_bits(t_bits);
    // Keep > t, and the first `eq_left` equal to t in flat order (blocks are in flat order).
    let mut counts = vec![0usize; rows];
    let mut idx = Vec::with_capacity(total);
    let mut val = Vec::with_capacity(total);
    for &(b, i, v) in blocks.iter().flatten() {
        let keep = if v > t {
            true
        } else if v == t && eq_left > 0 {
            eq_left -= 1;
            true
        } else {
            false
        };
        if keep {
            counts[b as usize] += 1;
            idx.push(i);
            val.push(v);
        }
    }
    debug_assert_eq!(idx.len(), total);
    SparseCodes { rows, cols, row_ptr: row_ptr_of(counts), idx, val }
}
