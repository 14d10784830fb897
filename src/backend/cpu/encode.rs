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
///
/// The GEMM overwrites `pre` and the bias is added in a second pass: prefilling `pre` with the
/// bias and accumulating costs a B x F write plus a read in the GEMM's epilogue, measured 4-6 ms
/// (7-10% of the GEMM) slower at B 4096, F 4608, d 576. Row-blocked GEMMs with the bias added
/// while a block is in cache were slower still (faer blocks the full product better).
pub fn encode(xc: &[f32], w: &[f32], bias: &[f32], rows: usize, d: usize, pre: &mut [f32]) {
    let f = bias.len();
    matmul_abt(xc, w, rows, f, d, pre, false);
    pre.par_chunks_mut(f * ROW_CHUNK).for_each(|c| {
        for row in c.chunks_mut(f) {
            for (p, b) in row.iter_mut().zip(bias) {
                *p += b;
            }
        }
    });
}

fn par() -> Par {
    match rayon::current_num_threads() {
        0 | 1 => Par::Seq,
        n => Par::rayon(n),
    }
}

/// Buffers of [`center_and_encode`], reused across steps.
#[derive(Default)]
pub struct BiasFold {
    /// `[xc | 1]`, rows x (d + 1).
    xa: Vec<f32>,
    /// `[W | bias]`, F x (d + 1).
    wa: Vec<f32>,
}

/// `xc = x - b_dec` and `pre = xc W^T + bias`, the bias folded into the product as one more
/// inner dimension (`[xc | 1] [W | bias]^T`): the GEMM writes `pre` once and no pass over B x F
/// follows. Copying W and xc into the widened operands moves (F + B) x d floats, far less than
/// the B x F read and write of a bias pass.
#[allow(clippy::too_many_arguments)]
pub fn center_and_encode(
    x: &[f32],
    b_dec: &[f32],
    w: &[f32],
    bias: &[f32],
    rows: usize,
    xc: &mut [f32],
    pre: &mut [f32],
    fold: &mut BiasFold,
) {
    let (d, f) = (b_dec.len(), bias.len());
    let da = d + 1;
    crate::util::hugepage::resize_f32(&mut fold.xa, rows * da);
    crate::util::hugepage::resize_f32(&mut fold.wa, f * da);
    fold.xa
        .par_chunks_mut(da * ROW_CHUNK)
        .zip(xc.par_chunks_mut(d * ROW_CHUNK))
        .zip(x.par_chunks(d * ROW_CHUNK))
        .for_each(|((a, o), i)| {
            for ((arow, orow), irow) in a.chunks_mut(da).zip(o.chunks_mut(d)).zip(i.chunks(d)) {
                for j in 0..d {
                    let v = irow[j] - b_dec[j];
                    orow[j] = v;
                    arow[j] = v;
                }
                arow[d] = 1.0;
            }
        });
    fold.wa.par_chunks_mut(da * ROW_CHUNK).zip(w.par_chunks(d * ROW_CHUNK)).zip(bias.par_chunks(ROW_CHUNK)).for_each(
        |((a, wr), br)| {
            for ((arow, wrow), &b) in a.chunks_mut(da).zip(wr.chunks(d)).zip(br) {
                arow[..d].copy_from_slice(wrow);
                arow[d] = b;
            }
        },
    );
    matmul_abt(&fold.xa, &fold.wa, rows, f, da, pre, false);
}
