//! Sparsifiers (SPEC "Sparsifiers"): turn the dense pre-activations of a batch into the kept
//! set. `act = ReLU(pre)` is implicit: only strictly positive entries are ever kept.
//!
//! Tie-breaking (every backend must agree): among equal values the lower index wins: the lower
//! latent index within a token (topk, hybrid's cap), the lower token index within a latent
//! (wta), and the lower row-major flat index `b*F + i` for the whole batch (batchtopk).

pub mod budget;
pub mod threshold;

use crate::sparse::SparseCodes;
use rayon::prelude::*;
use std::cmp::Ordering;

/// A concrete selection rule with its budgets resolved for this batch.
#[derive(Clone, Copy, Debug)]
pub enum Selection<'a> {
    /// Per token, the k largest positive entries.
    TopK { k: usize },
    /// The k*B largest positive entries of the batch.
    BatchTopK { k: usize },
    /// Per latent j, the m[j] largest positive entries of its column.
    Wta { m: &'a [usize] },
    /// WTA with budgets m, then per token at most k_max of the survivors.
    Hybrid { m: &'a [usize], k_max: usize },
    /// Every positive entry.
    Relu,
    /// Entries with pre > theta[j] (and > 0).
    JumpRelu { theta: &'a [f32] },
}

/// Select the kept entries of `pre` (rows x cols, row-major).
pub fn select(pre: &[f32], rows: usize, cols: usize, sel: &Selection) -> SparseCodes {
    assert_eq!(pre.len(), rows * cols, "pre has the wrong size");
    match *sel {
        Selection::TopK { k } => topk(pre, rows, cols, k),
        Selection::BatchTopK { k } => batchtopk(pre, rows, cols, k),
        Selection::Wta { m } => wta(pre, rows, cols, m),
        Selection::Hybrid { m, k_max } => {
            let w = wta(pre, rows, cols, m);
            cap_rows(&w, k_max)
        }
        Selection::Relu => SparseCodes::from_mask(pre, rows, cols, |b, i| pre[b * cols + i] > 0.0),
        Selection::JumpRelu { theta } => {
            assert_eq!(theta.len(), cols);
            SparseCodes::from_mask(pre, rows, cols, |b, i| {
                let v = pre[b * cols + i];
                v > 0.0 && v > theta[i]
            })
        }
    }
}

/// Order: larger value first, then lower index.
#[inline]
fn better(a: (f32, u32), b: (f32, u32)) -> Ordering {
    b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
}

fn top_of(mut cand: Vec<(f32, u32)>, k: usize) -> Vec<(f32, u32)> {
    if cand.len() > k {
        if k == 0 {
            return vec![];
        }
        cand.select_nth_unstable_by(k - 1, |a, b| better(*a, *b));
        cand.truncate(k);
    }
    cand
}

fn topk(pre: &[f32], rows: usize, cols: usize, k: usize) -> SparseCodes {
    let lists: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(cols)
        .map(|r| {
            let cand: Vec<(f32, u32)> =
                r.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| (*v, i as u32)).collect();
            top_of(cand, k).into_iter().map(|(v, i)| (i, v)).collect()
        })
        .collect();
    debug_assert_eq!(lists.len(), rows);
    SparseCodes::from_rows(cols, lists)
}

fn batchtopk(pre: &[f32], rows: usize, cols: usize, k: usize) -> SparseCodes {
    let total = k.saturating_mul(rows);
    let cand: Vec<(f32, u32)> =
        pre.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(i, v)| (*v, i as u32)).collect();
    let kept = top_of(cand, total);
    let mut lists = vec![Vec::new(); rows];
    for (v, flat) in kept {
        let flat = flat as usize;
        lists[flat / cols].push(((flat % cols) as u32, v));
    }
    SparseCodes::from_rows(cols, lists)
}

fn wta(pre: &[f32], rows: usize, cols: usize, m: &[usize]) -> SparseCodes {
    assert_eq!(m.len(), cols);
    let per_col: Vec<Vec<(f32, u32)>> = (0..cols)
        .into_par_iter()
        .map(|j| {
            let cand: Vec<(f32, u32)> = (0..rows)
                .filter_map(|b| {
                    let v = pre[b * cols + j];
                    (v > 0.0).then_some((v, b as u32))
                })
                .collect();
            top_of(cand, m[j])
        })
        .collect();
    let mut lists = vec![Vec::new(); rows];
    for (j, col) in per_col.into_iter().enumerate() {
        for (v, b) in col {
            lists[b as usize].push((j as u32, v));
        }
    }
    SparseCodes::from_rows(cols, lists)
}

/// Keep at most `k_max` entries per row (largest first, lower latent index on ties).
pub fn cap_rows(codes: &SparseCodes, k_max: usize) -> SparseCodes {
    let lists: Vec<Vec<(u32, f32)>> = (0..codes.rows)
        .into_par_iter()
        .map(|b| {
            let (ix, vs) = codes.row(b);
            let cand: Vec<(f32, u32)> = vs.iter().zip(ix).map(|(v, i)| (*v, *i)).collect();
            top_of(cand, k_max).into_iter().map(|(v, i)| (i, v)).collect()
        })
        .collect();
    SparseCodes::from_rows(codes.cols, lists)
}
