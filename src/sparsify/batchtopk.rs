//! Batch-wide top-(k*B), exact, with ties at the threshold resolved by row-major flat index.
//!
//! Positive `f32` values order like their bits, so a histogram of the high bits locates the
//! threshold:
//! 1. A candidate bound `lo`: from a histogram of every `SAMPLE`-th row, the value above which
//!    the sample holds a little more than its share of the budget.
//! 2. Collect every entry >= lo (row tasks in parallel, row-major order). If fewer than k*B
//!    entries were collected, the sample misled: redo with the exact bound from a histogram of
//!    the whole batch.
//! 3. Among the candidates (a superset of the answer), find the exact threshold T; keep
//!    everything > T and the first (lowest flat index) entries equal to T up to the budget.

use super::lanes::{collect_at_least, Candidate, Uniform, MIN_POS};
use super::row_ptr_of;
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Histogram key: the top 16 bits of the value.
const SHIFT: u32 = 16;
const NB: usize = 1 << (32 - SHIFT);
/// Bit that marks non-positive (and NaN) values, which are never counted.
const NONPOS: u32 = 1 << (31 - SHIFT);
/// Every SAMPLE-th row estimates the bound.
const SAMPLE: usize = 8;
const ROWS_PER_TASK: usize = 16;

#[inline(always)]
fn bucket(v: f32) -> usize {
    ((v.to_bits() >> SHIFT) | ((((v > 0.0) as u32) ^ 1) * NONPOS)) as usize
}

/// Histogram of the rows `b = stride * s` (positive values in buckets below NONPOS).
fn histogram(pre: &[f32], rows: usize, cols: usize, stride: usize) -> Vec<u64> {
    (0..rows.div_ceil(stride))
        .into_par_iter()
        .with_min_len(ROWS_PER_TASK)
        .fold(
            || vec![0u32; NB],
            |mut h, s| {
                let b = s * stride;
                for &v in &pre[b * cols..(b + 1) * cols] {
                    h[bucket(v)] += 1;
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

/// The highest bucket `hb` with at least `need` positive entries in buckets >= hb, and the
/// count in buckets above it; None when there are fewer than `need` positive entries.
fn boundary(hist: &[u64], need: u64) -> Option<(usize, u64)> {
    let mut above = 0u64;
    for hb in (0..NONPOS as usize).rev() {
        if above + hist[hb] >= need {
            return Some((hb, above));
        }
        above += hist[hb];
    }
    None
}

/// Smallest value of bucket `hb` (at least the smallest positive value).
fn bucket_start(hb: usize) -> f32 {
    f32::from_bits(((hb as u32) << SHIFT).max(1))
}

/// Every entry >= lo as (row, column, value), row-major, one list per row task.
fn collect(pre: &[f32], cols: usize, lo: f32) -> Vec<Vec<Candidate>> {
    collect_at_least(pre, cols, ROWS_PER_TASK, 0, &Uniform::new(lo))
}

pub(super) fn batchtopk(pre: &[f32], rows: usize, cols: usize, k: usize) -> SparseCodes {
    let total = k.saturating_mul(rows);
    if total == 0 || cols == 0 {
        return SparseCodes::empty(rows, cols);
    }
    // 1.-2. Candidates from the sampled bound, if it holds.
    let mut cand = None;
    if rows >= 32 * SAMPLE {
        let nsample = rows.div_ceil(SAMPLE);
        // 8% over the sample's share: at 3% the sample fell short on 8 of 52 steps of `sae bench
        // step` (batchtopk, mutual choice at 576/4608), each then paying a full histogram and a
        // second collect; at 8%, none of 52, for ~8% more candidates to sort out.
        let share = (total as f64 * nsample as f64 / rows as f64 * 1.08) as u64 + 64;
        if let Some((hb, _)) = boundary(&histogram(pre, rows, cols, SAMPLE), share) {
            let c = collect(pre, cols, bucket_start(hb));
            if c.iter().map(Vec::len).sum::<usize>() >= total {
                cand = Some(c);
            }
        }
    }
    let cand = match cand {
        Some(c) => c,
        None => {
            let hist = histogram(pre, rows, cols, 1);
            match boundary(&hist, total as u64) {
                Some((hb, _)) => collect(pre, cols, bucket_start(hb)),
                // No more positive entries than the budget: keep them all.
                None => return super::mask::relu(pre, rows, cols),
            }
        }
    };
    // 3. Exact threshold among the candidates.
    let mut hist = vec![0u64; NB];
    for e in cand.iter().flatten() {
        hist[bucket(e.2)] += 1;
    }
    let (hb, above) = boundary(&hist, total as u64).expect("candidates cover the budget");
    let need = (total as u64 - above) as usize;
    let mut inb: Vec<u32> =
        cand.iter().flatten().map(|e| e.2.to_bits()).filter(|&x| (x >> SHIFT) as usize == hb).collect();
    inb.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    let t_bits = inb[need - 1];
    let mut eq_left = need - inb.iter().filter(|&&x| x > t_bits).count();
    let t = f32::from_bits(t_bits);
    debug_assert!(t >= MIN_POS);
    // Keep > t, and the first `eq_left` equal to t in flat order.
    let mut counts = vec![0usize; rows];
    let mut idx = Vec::with_capacity(total);
    let mut val = Vec::with_capacity(total);
    for &(b, i, v) in cand.iter().flatten() {
        let keep = v > t
            || (v == t && eq_left > 0 && {
                eq_left -= 1;
                true
            });
        if keep {
            counts[b as usize] += 1;
            idx.push(i);
            val.push(v);
        }
    }
    debug_assert_eq!(idx.len(), total);
    SparseCodes { rows, cols, row_ptr: row_ptr_of(counts), idx, val }
}
