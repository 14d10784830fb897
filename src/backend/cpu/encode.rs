//! Encode phase (twin of kernels/encode.cu): input centring and the one dense product of the
//! forward pass (`gemm.rs`).

use super::gemm::abt;
use super::linalg::ROW_CHUNK;
use rayon::prelude::*;

/// `xc = x - b_dec` row by row.
pub fn center(x: &[f32], b_dec: &[f32], xc: &mut [f32]) {
    let d = b_dec.len();
    xc.par_chunks_mut(d * ROW_CHUNK).zip(x.par_chunks(d * ROW_CHUNK)).for_each(|(o, i)| {
        for (orow, irow) in o.chunks_mut(d).zip(i.chunks(d)) {
            for ((o, &xv), &bv) in orow.iter_mut().zip(irow).zip(b_dec) {
                *o = xv - bv;
            }
        }
    });
}

/// Encoder product `pre = xc W^T + bias` (xc: rows x d, W: F x d).
///
/// The GEMM overwrites `pre` and the bias is added in a second pass: prefilling `pre` with the
/// bias and accumulating costs a B x F write plus a read in the GEMM's epilogue, measured 4-6 ms
/// (7-10% of the GEMM) slower at B 4096, F 4608, d 576. Row-blocked GEMMs with the bias added
/// while a block is in cache were slower still (faer blocks the full product better).
pub fn encode(xc: &[f32], w: &[f32], bias: &[f32], rows: usize, d: usize, pre: &mut [f32]) {
    let f = bias.len();
    abt(xc, w, rows, f, d, pre, false);
    pre.par_chunks_mut(f * ROW_CHUNK).for_each(|c| {
        for row in c.chunks_mut(f) {
            for (p, b) in row.iter_mut().zip(bias) {
                *p += b;
            }
        }
    });
}

/// Whether folding the bias into the GEMM ([`center_and_encode`]) beats a bias pass after it
/// ([`encode`]) for inputs of width `d`: a deterministic rule of the shape (the two round
/// differently, and runs must be reproducible). The fold widens the inner dimension to d + 1,
/// free at d = 576 or 640 but an extra k-block of faer's GEMM (one more pass over `pre`, +7%)
/// when d is a multiple of its block depth: measured at d 512 and 1024 (B 4096 and 2048,
/// F 4096/4608, 2 threads), where the fold lost 1-1.5 ms of step time and won 1.5-2.5 ms at
/// d 576. Widths that are multiples of 128 (512, 768, 1024, 2048, 4096) take the bias pass.
pub fn fold_pays(d: usize) -> bool {
    !d.is_multiple_of(128)
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
                // Zipped, not indexed (no bounds checks to keep): the indexed form took 1.3-2.0
                // ms per step against 1.1-1.3 at B 4096, d 576, 2 threads (Zen 4, two runs of
                // each alternated); in `center`, 0.86-1.00 against 0.66-1.00 at d 512.
                for (((a, o), &xv), &bv) in arow[..d].iter_mut().zip(orow.iter_mut()).zip(irow).zip(b_dec) {
                    let v = xv - bv;
                    *o = v;
                    *a = v;
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
    abt(&fold.xa, &fold.wa, rows, f, da, pre, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both encoder paths against an f64 reference on awkward shapes (rows < F, d not a multiple
    /// of anything, d = 128 where the fold is not taken by default).
    #[test]
    fn folded_and_unfolded_encoders_match_the_f64_reference() {
        for (rows, d, f) in [(1, 1, 1), (3, 5, 7), (7, 13, 70), (5, 128, 33)] {
            let val = |i: usize, s: f32| ((i as f32 * 0.37 + s).sin() * 3.0).round() / 4.0 + 0.01 * i as f32;
            let x: Vec<f32> = (0..rows * d).map(|i| val(i, 0.1)).collect();
            let w: Vec<f32> = (0..f * d).map(|i| val(i, 1.3)).collect();
            let b_dec: Vec<f32> = (0..d).map(|i| val(i, 2.0)).collect();
            let b_enc: Vec<f32> = (0..f).map(|i| val(i, 3.0)).collect();
            let mut want = vec![0f64; rows * f];
            for b in 0..rows {
                for j in 0..f {
                    let dotv: f64 = (0..d).map(|t| (x[b * d + t] as f64 - b_dec[t] as f64) * w[j * d + t] as f64).sum();
                    want[b * f + j] = dotv + b_enc[j] as f64;
                }
            }
            let (mut xc1, mut pre1) = (vec![0f32; rows * d], vec![0f32; rows * f]);
            center_and_encode(&x, &b_dec, &w, &b_enc, rows, &mut xc1, &mut pre1, &mut BiasFold::default());
            let (mut xc2, mut pre2) = (vec![0f32; rows * d], vec![0f32; rows * f]);
            center(&x, &b_dec, &mut xc2);
            encode(&xc2, &w, &b_enc, rows, d, &mut pre2);
            assert_eq!(xc1, xc2, "the same centred input");
            let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
            for (k, &wv) in want.iter().enumerate() {
                for (name, got) in [("folded", pre1[k]), ("bias pass", pre2[k])] {
                    assert!((got as f64 - wv).abs() <= 1e-5 * scale, "{name} {rows}x{d}x{f} [{k}]: {got} vs {wv}");
                }
            }
        }
        assert!(fold_pays(576) && fold_pays(23) && !fold_pays(512) && !fold_pays(1024));
    }
}
