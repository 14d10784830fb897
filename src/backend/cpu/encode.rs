//! Encode phase (twin of kernels/encode.cu): input centring and the one dense product of the
//! forward pass, through faer (AVX2/AVX-512, multi-threaded).

use super::linalg::ROW_CHUNK;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// `xc = x - b_dec` row by row.
pub fn center(x: &[f32], b_dec: &[f32], xc: &mut [f32]) {
    let d = b_dec.len();
    xc.par_chunks_mut(d * ROW_CHUNK).zip(x.par_chunks(d * ROW_CHUNK)).for_each(|(o, i)| {
        for (orow, irow) in o.chunks_mut(d).zip(i.chunks(d)) {
            for j in 0..d {
                orow[j] = irow[j] - b_dec[j];
            }
        }
    });
}

/// `out (m x n) = a (m x k) * b^T`, with `b` stored n x k; all row-major.
/// `out` is overwritten unless `accumulate`.
pub fn matmul_abt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32], accumulate: bool) {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    let dst = MatMut::from_row_major_slice_mut(out, m, n);
    let lhs = MatRef::from_row_major_slice(a, m, k);
    let rhs = MatRef::from_row_major_slice(b, n, k).transpose();
    let acc = if accumulate { Accum::Add } else { Accum::Replace };
    matmul(dst, acc, lhs, rhs, 1.0f32, par());
}

/// Encoder product `pre = xc W^T + bias` (xc: rows x d, W: F x d).
pub fn encode(xc: &[f32], w: &[f32], bias: &[f32], rows: usize, d: usize, pre: &mut [f32]) {
    let f = bias.len();
    pre.chunks_mut(f).for_each(|r| r.copy_from_slice(bias));
    matmul_abt(xc, w, rows, f, d, pre, true);
}

fn par() -> Par {
    match rayon::current_num_threads() {
        0 | 1 => Par::Seq,
        n => Par::rayon(n),
    }
}
