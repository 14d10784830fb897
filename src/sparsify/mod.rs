//! Sparsifiers (SPEC "Sparsifiers"): turn the dense pre-activations of a batch into the kept
//! set. `act = ReLU(pre)` is implicit: only strictly positive entries are ever kept (NaN is not
//! positive, so it is never kept).
//!
//! Tie-breaking (every backend must agree): among equal values the lower index wins: the lower
//! latent index within a token (topk, hybrid's cap), the lower token index within a latent
//! (wta), and the lower row-major flat index `b*F + i` for the whole batch (batchtopk).
//!
//! Every rule is exact (bitwise the set a full sort by (value desc, index asc) would give) and
//! deterministic whatever the number of threads: work is split by rows or columns only, and
//! the one batch-wide statistic (batchtopk's histogram) is an integer sum.
//!
//! Implementation notes: positive `f32` values order like their `u32` bit patterns, so a
//! candidate is packed into one `u64` key `value_bits << 32 | !index`; a larger key is a better
//! candidate (larger value, then lower index). Per-row and per-column top-k use a streaming
//! threshold filter over a small buffer (no allocation per row); batchtopk finds its threshold
//! with a histogram of the high bits of the positive values.

//!
//! Layout: `kind.rs` says what each sparsifier is (its predicates, default aux loss, exported
//! architecture); `plan.rs` maps a config to this batch's `Selection`; `cases.rs` is the table
//! of cases everything iterates; one file per rule family does the selecting; `lanes.rs` is the
//! candidate pass (entries at or above a bound, by lane mask) they share.

pub mod aux;
mod batchtopk;
pub mod budget;
pub mod cases;
pub mod kind;
mod lanes;
mod mask;
pub mod plan;
pub mod threshold;
mod topk;
mod wta;

use crate::sparse::SparseCodes;
use rayon::prelude::*;

pub use aux::{select_aux_block, AuxKind};
pub use budget::{BudgetKind, ZipfRounding};
pub use kind::{Architecture, SparsifierKind};
pub use topk::cap_rows;

/// A concrete selection rule with its budgets resolved for this batch.
#[derive(Clone, Copy, Debug)]
pub enum Selection<'a> {
    /// Per token, the k largest positive entries.
    TopK { k: usize },
    /// The k*B largest positive entries of the batch.
    BatchTopK { k: usize },
    /// Per latent j, the m[j] largest positive entries of its column.
    Wta { m: &'a [usize] },
    /// WTA with budgets m among the entries above theta[j] (the WTA paper's initial phase: "theta
    /// is used to sparsify activations before the WTA step").
    WtaAbove { m: &'a [usize], theta: &'a [f32] },
    /// WTA with budgets m, then per token at most k_max of the survivors.
    Hybrid { m: &'a [usize], k_max: usize },
    /// Every positive entry.
    Relu,
    /// Entries with pre > theta[j] (and > 0).
    JumpRelu { theta: &'a [f32] },
    /// JumpReLU, then per token at most `k` of the survivors (the largest): hybrid's inference
    /// form, which keeps its per-token cap.
    JumpReluCap { theta: &'a [f32], k: usize },
    /// The aux loss's codes: per token, the k largest positive entries among the candidate
    /// latents (ascending indices).
    Aux { candidates: &'a [u32], k: usize },
}

/// Select the kept entries of `pre` (rows x cols, row-major).
pub fn select(pre: &[f32], rows: usize, cols: usize, sel: &Selection) -> SparseCodes {
    assert_eq!(pre.len(), rows * cols, "pre has the wrong size");
    assert!(rows <= u32::MAX as usize && cols <= u32::MAX as usize, "rows and cols must fit in u32");
    match *sel {
        Selection::TopK { k } => topk::topk(pre, rows, cols, k),
        Selection::BatchTopK { k } => batchtopk::batchtopk(pre, rows, cols, k),
        Selection::Wta { m } => wta::wta(pre, rows, cols, m),
        Selection::WtaAbove { m, theta } => {
            assert_eq!(theta.len(), cols, "thresholds for {} latents, expected {cols}", theta.len());
            // Entries at or below their threshold are no candidates (NaN thresholds pass nothing).
            let above: Vec<f32> = pre
                .chunks(cols.max(1))
                .flat_map(|r| r.iter().zip(theta).map(|(&v, &t)| if v > t { v } else { 0.0 }))
                .collect();
            wta::wta(&above, rows, cols, m)
        }
        Selection::Hybrid { m, k_max } => {
            let w = wta::wta(pre, rows, cols, m);
            cap_rows(&w, k_max)
        }
        Selection::Relu => mask::relu(pre, rows, cols),
        Selection::JumpRelu { theta } => mask::jumprelu(pre, rows, cols, theta),
        Selection::JumpReluCap { theta, k } => cap_rows(&mask::jumprelu(pre, rows, cols, theta), k),
        Selection::Aux { candidates, k } => aux::select_aux(pre, rows, cols, candidates, k),
    }
}

/// Candidate key of a strictly positive value `v` at index `i`: a larger key is a better
/// candidate (larger value; on equal values, lower index).
#[inline(always)]
pub(crate) fn key(v: f32, i: u32) -> u64 {
    debug_assert!(v > 0.0);
    ((v.to_bits() as u64) << 32) | (!i) as u64
}

/// Value of a key.
#[inline(always)]
pub(crate) fn key_val(k: u64) -> f32 {
    f32::from_bits((k >> 32) as u32)
}

/// Index of a key.
#[inline(always)]
pub(crate) fn key_idx(k: u64) -> u32 {
    !(k as u32)
}

/// Keep the `n` best (largest) keys of `keys` (`n >= 1`, unordered afterwards); returns the
/// value of the n-th best when something was dropped.
#[inline]
pub(crate) fn keep_best(keys: &mut Vec<u64>, n: usize) -> Option<f32> {
    debug_assert!(n >= 1);
    if keys.len() <= n {
        return None;
    }
    keys.select_nth_unstable_by(n - 1, |a, b| b.cmp(a));
    keys.truncate(n);
    Some(key_val(keys[n - 1]))
}

/// Split `buf` into consecutive mutable pieces `ptr[r]..ptr[r+1]`.
pub(crate) fn split_by<'a, T>(mut buf: &'a mut [T], ptr: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(ptr.len().saturating_sub(1));
    for w in ptr.windows(2) {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(w[1] - w[0]);
        out.push(head);
        buf = tail;
    }
    out
}

/// The kept entries of a block of consecutive rows, in CSR order: per row its count, then all
/// the rows' latent indices and values.
#[derive(Default)]
pub(crate) struct RowBlock {
    pub counts: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

/// Codes over `cols` latents from consecutive row blocks (covering every row, in order), each
/// block copied into its place in parallel.
pub(crate) fn from_row_blocks(cols: usize, blocks: &[RowBlock]) -> SparseCodes {
    let row_ptr = row_ptr_of(blocks.iter().flat_map(|b| b.counts.iter().copied()));
    let block_ptr = row_ptr_of(blocks.iter().map(|b| b.idx.len()));
    let (rows, n) = (row_ptr.len() - 1, row_ptr[row_ptr.len() - 1]);
    let mut idx = vec![0u32; n];
    let mut val = vec![0f32; n];
    split_by(&mut idx, &block_ptr).into_par_iter().zip(split_by(&mut val, &block_ptr)).zip(blocks).for_each(
        |((ix, vs), b)| {
            ix.copy_from_slice(&b.idx);
            vs.copy_from_slice(&b.val);
        },
    );
    SparseCodes { rows, cols, row_ptr, idx, val }
}

/// Exclusive prefix sum of per-row counts: `row_ptr` of length rows+1.
pub(crate) fn row_ptr_of(counts: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut ptr = vec![0usize];
    let mut acc = 0usize;
    for c in counts {
        acc += c;
        ptr.push(acc);
    }
    ptr
}
