//! Per-kernel parity of the dense codes path (kernels/dense.cu, backend/cuda/dense.rs): the
//! scatter and gather against `SparseCodes::to_dense` and a plain loop, and each of the three
//! GEMM forms the path uses (as stored x as stored, transposed x as stored, as stored x
//! transposed), through `dense::gemm` (cuBLAS where it loads) and `gemm_strided` itself,
//! against f64 loops.

use super::super::dense::{self, Operand, Product};
use super::super::device::Dev;
use super::super::kernels as K;
use super::super::launch as L;
use super::{err, exact, mismatch_bits, within, Checks, ParityInputs, Verdict, TOL};
use crate::backend::cuda::selftest::Sizes;

/// One GEMM form: name, A, A transposed, B, B transposed, m, n, k.
type Form<'a> = (&'a str, &'a [f32], bool, &'a [f32], bool, usize, usize, usize);

pub(super) fn dense_checks(dev: &Dev, inp: &ParityInputs, c: &mut Checks) {
    let Sizes { rows, d_in: d, d_sae: f } = inp.s;
    let codes = &inp.codes;
    let nnz = codes.nnz();
    let z = codes.to_dense();
    let rp: Vec<u32> = codes.row_ptr.iter().map(|&v| v as u32).collect();

    c.run("scatter_codes vs SparseCodes::to_dense", || {
        let (rp, idx, val) = (dev.upload(&rp)?, dev.upload(&codes.idx)?, dev.upload(&codes.val)?);
        let out = dev.upload(&vec![0f32; rows * f])?;
        K::scatter_codes(dev, L::per_line(rows, 64), rp.p(), idx.p(), val.p(), f as u32, out.p())?;
        Ok(exact(&[("Z", mismatch_bits(&out.to_vec(rows * f)?, &z))], &format!("{nnz} entries in {rows} x {f}")))
    });

    c.run("gather_codes vs dense[b][idx[e]] loop", || {
        let m: Vec<f32> = (0..rows * f).map(|e| e as f32 * 0.5 - 7.0).collect();
        let (rp, idx, md) = (dev.upload(&rp)?, dev.upload(&codes.idx)?, dev.upload(&m)?);
        let out = dev.alloc::<f32>(nnz)?;
        K::gather_codes(dev, L::per_line(rows, 64), rp.p(), idx.p(), md.p(), f as u32, out.p())?;
        let mut want = vec![0f32; nnz];
        for b in 0..rows {
            for e in codes.row_ptr[b]..codes.row_ptr[b + 1] {
                want[e] = m[b * f + codes.idx[e] as usize];
            }
        }
        Ok(exact(&[("val", mismatch_bits(&out.to_vec(nnz)?, &want))], "values at the kept entries"))
    });

    c.run("add_bias_rows vs x + b loop", || {
        let n = rows * d;
        let (x, b) = (dev.upload(&inp.x)?, dev.upload(&inp.b_dec)?);
        K::add_bias_rows(dev, L::elementwise(n as u64), x.p(), b.p(), d as u32, n as u64)?;
        let want: Vec<f32> = inp.x.iter().enumerate().map(|(e, v)| v + inp.b_dec[e % d]).collect();
        Ok(exact(&[("x", mismatch_bits(&x.to_vec(n)?, &want))], "x + b_dec"))
    });

    // The path's three products at this size: x_hat = Z W_dec (NN), dW_dec = Z^T G (TN), and
    // dZ = G W_dec^T (NT), the last one onto a non-zero C (accumulate).
    let forms: [Form; 3] = [
        ("Z W_dec", &z, false, &inp.w_dec, false, rows, d, f),
        ("Z^T G", &z, true, &inp.g, false, f, d, rows),
        ("G W_dec^T + C", &inp.g, false, &inp.w_dec, true, rows, f, d),
    ];
    for fallback in [false, true] {
        for &(what, a, ta, b, tb, m, n, k) in &forms {
            let name = match fallback {
                false => format!("dense::gemm {what} ({m} x {n} x {k}) vs f64 loop"),
                true => format!("gemm_strided {what} ({m} x {n} x {k}) vs f64 loop"),
            };
            let accumulate = tb;
            c.run(&name, || {
                let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
                let c0: Vec<f32> = (0..m * n).map(|e| if accumulate { (e % 13) as f32 - 6.0 } else { 1e3 }).collect();
                let (ad, bd, cd) = (dev.upload(a)?, dev.upload(b)?, dev.upload(&c0)?);
                let (oa, ob) = (Operand { p: ad.p(), ld: lda, t: ta }, Operand { p: bd.p(), ld: ldb, t: tb });
                let product = Product { m, n, k, a: oa, b: ob, c: cd.p(), accumulate };
                match fallback {
                    false => dense::gemm(dev, &product)?,
                    true => dense::gemm_fallback(dev, &product)?,
                }
                let mut want = vec![0f32; m * n];
                for r in 0..m {
                    for col in 0..n {
                        let mut s = if accumulate { c0[r * n + col] as f64 } else { 0.0 };
                        for i in 0..k {
                            let av = if ta { a[i * lda + r] } else { a[r * lda + i] };
                            let bv = if tb { b[col * ldb + i] } else { b[i * ldb + col] };
                            s += av as f64 * bv as f64;
                        }
                        want[r * n + col] = s as f32;
                    }
                }
                Ok(within(&[("C", err(&cd.to_vec(m * n)?, &want))], TOL))
            });
        }
    }

    c.run("col_partials + col_sums_finish (f32) vs column sums of Z", || {
        let (zd, out) = (dev.upload(&z)?, dev.alloc::<f32>(f)?);
        let part = dev.alloc::<f64>(L::COLSUM_PARTS * f)?;
        super::super::decode::col_sums_f32(dev, zd.p(), rows, f, &part, out.p())?;
        let mut want = vec![0f64; f];
        for b in 0..rows {
            for i in 0..f {
                want[i] += z[b * f + i] as f64;
            }
        }
        let want: Vec<f32> = want.iter().map(|&v| v as f32).collect();
        let v = within(&[("sums", err(&out.to_vec(f)?, &want))], TOL);
        Ok(Verdict { detail: format!("{} (rounded to f32)", v.detail), ..v })
    });
}
