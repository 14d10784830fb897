//! Per-latent (column) selection: the m_j largest positive entries of column j.
//!
//! Columns are processed in blocks of `BLOCK` adjacent latents; a task scans its block row by
//! row (contiguous 4*BLOCK-byte pieces of each row, no strided gathers) and keeps for every
//! column a streaming threshold filter over a small buffer of candidate keys.

use super::{key, key_idx, key_val, keep_best};
use crate::sparse::SparseCodes;
use rayon::prelude::*;

/// Columns per task.
const BLOCK: usize = 64;
/// Width of the vectorised threshold test.
const LANES: usize = 16;

/// Kept entries of one block of columns: (column, row, value), columns ascending, then rows.
type BlockOut = Vec<(u32, u32, f32)>;

/// Per-column state of a block.
struct Col {
    m: usize,
    cap: usize,
    keys: Vec<u64>,
}

fn wta_block(pre: &[f32], rows: usize, cols: usize, c0: usize, m: &[usize]) -> BlockOut {
    let w = m.len();
    let mut st: Vec<Col> = m
        .iter()
        .map(|&mj| {
            // A column that may keep all of its rows never needs to compact.
            let cap = if mj >= rows { rows } else { (2 * mj + 32).min(rows) };
            Col { m: mj, cap, keys: Vec::with_capacity(cap.min(4 * mj + 64)) }
        })
        .collect();
    // Entry test per column: the current m_j-th best (strict: later rows lose ties); +inf when
    // nothing may be kept.
    let mut thr: Vec<f32> = m.iter().map(|&mj| if mj == 0 { f32::INFINITY } else { 0.0 }).collect();
    let hit = |st: &mut [Col], thr: &mut [f32], j: usize, v: f32, b: usize| {
        let c = &mut st[j];
        c.keys.push(key(v, b as u32));
        if c.keys.len() >= c.cap {
            if let Some(t) = keep_best(&mut c.keys, c.m) {
                thr[j] = t;
            }
        }
    };
    for b in 0..rows {
        let seg = &pre[b * cols + c0..b * cols + c0 + w];
        let mut j0 = 0;
        while j0 + LANES <= w {
            let s = &seg[j0..j0 + LANES];
            let t = &thr[j0..j0 + LANES];
            let mut any = false;
            for q in 0..LANES {
                any |= s[q] > t[q];
            }
            if any {
                for q in 0..LANES {
                    let v = seg[j0 + q];
                    if v > thr[j0 + q] {
                        hit(&mut st, &mut thr, j0 + q, v, b);
                    }
                }
            }
            j0 += LANES;
        }
        for j in j0..w {
            let v = seg[j];
            if v > thr[j] {
                hit(&mut st, &mut thr, j, v, b);
            }
        }
    }
    let mut out = Vec::with_capacity(st.iter().map(|c| c.keys.len().min(c.m)).sum());
    for (j, c) in st.iter_mut().enumerate() {
        if c.m == 0 {
            continue;
        }
        keep_best(&mut c.keys, c.m);
        c.keys.sort_unstable_by_key(|&x| key_idx(x));
        out.extend(c.keys.iter().map(|&x| ((c0 + j) as u32, key_idx(x), key_val(x))));
    }
    out
}

/// Per latent j, the `m[j]` largest positive entries of column j.
pub(super) fn wta(pre: &[f32], rows: usize, cols: usize, m: &[usize]) -> SparseCodes {
    assert_eq!(m.len(), cols, "one budget per latent");
    if rows == 0 || cols == 0 {
        return SparseCodes::empty(rows, cols);
    }
    let blocks: Vec<BlockOut> = m
        .par_chunks(BLOCK)
        .enumerate()
        .map(|(bi, mb)| wta_block(pre, rows, cols, bi * BLOCK, mb))
        .collect();
    // Counting sort by row; columns stay ascending within a row because blocks and their
    // entries come in column order.
    let mut counts = vec![0usize; rows];
    for e in blocks.iter().flatten() {
        counts[e.1 as usize] += 1;
    }
    let row_ptr = super::row_ptr_of(counts);
    let n = row_ptr[rows];
    let mut fill = row_ptr[..rows].to_vec();
    let mut idx = vec![0u32; n];
    let mut val = vec![0f32; n];
    for &(j, b, v) in blocks.iter().flatten() {
        let p = &mut fill[b as usize];
        idx[*p] = j;
        val[*p] = v;
        *p += 1;
    }
    SparseCodes { rows, cols, row_ptr, idx, val }
}
