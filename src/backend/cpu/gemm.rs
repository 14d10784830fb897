//! Every dense matrix product of the CPU backend, in one place: the encoder product, the aux
//! block's four products and the dense-codes path all call [`gemm`], so the engine behind them
//! (faer) and how it is split over threads is decided here once.
//!
//! Threads: a product with a short inner dimension (k <= [`SPLIT_MAX_K`], the encoder's d) and
//! enough rows is cut into one contiguous block of output rows per thread, each block a
//! single-threaded faer product. At these shapes faer's own rayon split cost more than it
//! saved: at 4096 x 4608 x 576 on a 2-core Xeon (AVX-512), seq x 2 row blocks took 97-134 ms
//! against 118-150 ms for `Par::rayon(2)` in four interleaved rounds, and 13.4 against 16.1 ms
//! for the aux block's 4096 x 461 x 576. With a long inner dimension (the dense path's k = B or
//! F) faer's split won (122 against 129 ms), so those keep it.
//!
//! Layout: `a^T b` (the weight gradients, k = B) goes through a column-major scratch
//! ([`transposed_lhs`]); into a row-major output faer ran it at half speed at d 512.
//!
//! Bits: each output element is the same k-long dot product in the same order whether its row
//! block is the whole matrix or a part of it (faer's blocking of k does not depend on m; tested
//! below), so results do not depend on the thread count.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Inner dimensions up to this take the row-block split.
pub const SPLIT_MAX_K: usize = 1024;
/// Fewest output rows per block for the split to be worth a task.
const MIN_BLOCK_ROWS: usize = 64;

/// `out (m x n) = op(a) op(b)` (`+=` when `accumulate`) on row-major slices; `at`/`bt`: use the
/// transpose of the stored matrix (`a` stored m x k, or k x m when `at`; `b` stored k x n, or
/// n x k when `bt`).
#[allow(clippy::too_many_arguments)]
pub fn gemm(a: &[f32], at: bool, b: &[f32], bt: bool, m: usize, n: usize, k: usize, out: &mut [f32], accumulate: bool) {
    assert_eq!(a.len(), m * k, "gemm: lhs is not {m} x {k}");
    assert_eq!(b.len(), n * k, "gemm: rhs is not {k} x {n}");
    assert_eq!(out.len(), m * n, "gemm: out is not {m} x {n}");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    if at && !bt {
        return transposed_lhs(a, b, m, n, k, out, accumulate);
    }
    let lhs =
        if at { MatRef::from_row_major_slice(a, k, m).transpose() } else { MatRef::from_row_major_slice(a, m, k) };
    let rhs =
        if bt { MatRef::from_row_major_slice(b, n, k).transpose() } else { MatRef::from_row_major_slice(b, k, n) };
    let acc = if accumulate { Accum::Add } else { Accum::Replace };
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 {
        return matmul(MatMut::from_row_major_slice_mut(out, m, n), acc, lhs, rhs, 1.0f32, Par::Seq);
    }
    if k > SPLIT_MAX_K || m < threads * MIN_BLOCK_ROWS {
        return matmul(MatMut::from_row_major_slice_mut(out, m, n), acc, lhs, rhs, 1.0f32, Par::rayon(threads));
    }
    let rows_per = m.div_ceil(threads);
    out.par_chunks_mut(rows_per * n).enumerate().for_each(|(t, o)| {
        let (r0, rows) = (t * rows_per, o.len() / n);
        let dst = MatMut::from_row_major_slice_mut(o, rows, n);
        matmul(dst, acc, lhs.subrows(r0, rows), rhs, 1.0f32, Par::Seq);
    });
}

/// `out = a^T b` (`a` stored k x m, `b` stored k x n: the weight gradients of the dense path and
/// of the aux block, k = B). Into a row-major `out` faer ran this form at half the speed of the
/// others (4096 x 512 x 4096, 2 threads: 238 ms against 102-106 for `a b` and `a b^T`); into a
/// column-major one, where every operand is column-major to faer, 120 ms. So the product goes
/// into a column-major scratch and is transposed into `out` (m x n, small next to m x n x k).
fn transposed_lhs(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32], accumulate: bool) {
    let mut t = crate::util::hugepage::zeroed_f32(m * n);
    let dst = MatMut::from_column_major_slice_mut(&mut t, m, n);
    let lhs = MatRef::from_row_major_slice(a, k, m).transpose();
    let rhs = MatRef::from_row_major_slice(b, k, n);
    matmul(dst, Accum::Replace, lhs, rhs, 1.0f32, par());
    // t holds out column-major: out[i][j] = t[j * m + i].
    out.par_chunks_mut(n * 16).enumerate().for_each(|(c, rows)| {
        for (r, orow) in rows.chunks_mut(n).enumerate() {
            let i = c * 16 + r;
            for (j, o) in orow.iter_mut().enumerate() {
                let v = t[j * m + i];
                *o = if accumulate { *o + v } else { v };
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

/// `out (m x n) = a (m x k) b^T` with `b` stored n x k (`+=` when `accumulate`).
pub fn abt(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, out: &mut [f32], accumulate: bool) {
    gemm(a, false, b, true, m, n, k, out, accumulate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(i: usize, s: f32) -> f32 {
        ((i as f32 * 0.37 + s).sin() * 3.0).round() / 4.0 + 0.01 * (i % 97) as f32
    }

    /// Every transpose combination against an f64 product, on awkward shapes, accumulating and
    /// overwriting (`out` starts as NaN), with 1 and 3 threads bit for bit (the row-block split,
    /// faer's own split, and the transposed-lhs path through a column-major scratch).
    #[test]
    fn gemm_matches_f64_and_does_not_depend_on_threads() {
        for (m, n, k) in
            [(1, 1, 1), (3, 5, 7), (200, 33, 13), (391, 70, 129), (257, 9, 1100), (1030, 17, 1100), (5, 4, 0)]
        {
            for (at, bt) in [(false, false), (false, true), (true, false), (true, true)] {
                let a: Vec<f32> = (0..m * k).map(|i| val(i, 0.3)).collect();
                let b: Vec<f32> = (0..n * k).map(|i| val(i, 1.7)).collect();
                let ea = |i: usize, p: usize| if at { a[p * m + i] } else { a[i * k + p] } as f64;
                let eb = |p: usize, j: usize| if bt { b[j * k + p] } else { b[p * n + j] } as f64;
                let want: Vec<f64> =
                    (0..m * n).map(|e| (0..k).map(|p| ea(e / n, p) * eb(p, e % n)).sum::<f64>() + 0.5).collect();
                // The f32 error bound of a k-term sum: k eps sum |a b| (plus the 0.5 it starts from).
                let tol: Vec<f64> = (0..m * n)
                    .map(|e| {
                        let mag: f64 = (0..k).map(|p| (ea(e / n, p) * eb(p, e % n)).abs()).sum::<f64>() + 0.5;
                        (k + 1) as f64 * f32::EPSILON as f64 * mag
                    })
                    .collect();
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut out = vec![0.5f32; m * n];
                    pool.install(|| gemm(&a, at, &b, bt, m, n, k, &mut out, true));
                    out
                };
                let (one, three) = (run(1), run(3));
                let mut fresh = vec![f32::NAN; m * n];
                gemm(&a, at, &b, bt, m, n, k, &mut fresh, false);
                for (e, w) in want.iter().enumerate() {
                    assert!((fresh[e] as f64 + 0.5 - w).abs() <= tol[e], "{m}x{n}x{k} {at} {bt}: overwrite");
                }
                for (e, w) in want.iter().enumerate() {
                    assert!((one[e] as f64 - w).abs() <= tol[e], "{m}x{n}x{k} {at} {bt}");
                }
                assert!(
                    one.iter().zip(&three).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}x{n}x{k} {at} {bt}: 1 vs 3 threads"
                );
            }
        }
    }
}
