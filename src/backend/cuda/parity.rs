//! Per-kernel parity, llm.c style: every kernel that the selection checks of selftest.rs do not
//! exercise is launched alone, exactly as the training step launches it (the same `launch.rs`
//! configuration), on inputs from [`ParityInputs`], and compared with its CPU twin, or with a
//! plain obviously-correct loop where the twin is itself an optimised path. Run by
//! `run_selftest_on` for both size sets (on the emulator in CI, on a GPU by `sae selftest`).
//!
//! Each kernel reads its inputs from the CPU reference rather than from the kernel before it, so
//! a failure names the kernel that is wrong. Tolerances: exact for integer outputs, conversions,
//! masks and elementwise arithmetic that is the same single operation on both sides; 1e-5
//! relative to the output's scale (`max |a - b| / max(1, max |b|)`) for f32 sums whose order
//! differs; 1e-9 relative for the f64 accumulators.

use super::adam::Folded;
use super::device::{Dev, DevBuf, Ptr};
use super::kernels as K;
use super::launch as L;
use super::selftest::{max_rel, SelftestReport, Sizes};
use crate::backend::cpu::adam::{self as cpu_adam, AdamHyper};
use crate::backend::cpu::backward::{self as cpu_bwd, Contribution, L1Terms};
use crate::backend::cpu::clip as cpu_clip;
use crate::backend::cpu::{decode as cpu_dec, encode as cpu_enc, linalg};
use crate::model::aligned;
use crate::sparse::{LatentView, SparseCodes};
use crate::sparsify::{self, threshold, Selection};
use anyhow::Result;
use half::{bf16, f16};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::fmt::Debug;

mod dense;

/// f32 results whose summation order differs from the CPU's.
const TOL: f64 = 1e-5;
/// f64 accumulators.
const TOL_F64: f64 = 1e-9;
/// Main codes: top-k of `pre` per token.
const K_MAIN: usize = 8;
/// Aux codes: top-k among the candidates.
const K_AUX: usize = 12;

/// Every input of the per-kernel checks at one size, drawn from fixed seeds: the batch, the
/// parameters, a tie-heavy `pre` with its top-k codes (some latents never fire, and one decoder
/// row is zero, so the "no entry" and "zero norm" branches run) and aux codes, the gradients
/// flowing back and an Adam state.
pub struct ParityInputs {
    pub s: Sizes,
    /// rows x d, N(0.5, 1).
    pub x: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// `x - b_dec`.
    pub xc: Vec<f32>,
    /// F x d: the encoder (and A, the aligned map's free parameter).
    pub w_enc: Vec<f32>,
    /// F x d, unit rows except row 1 (zero) and row 2 (norm 3).
    pub w_dec: Vec<f32>,
    pub b_enc: Vec<f32>,
    /// JumpReLU thresholds in [-0.5, 1), some below 0.
    pub theta: Vec<f32>,
    /// rows x F on a grid of 0.25 (ties everywhere); latents i % 7 == 3 (but not the last) are
    /// never positive.
    pub pre: Vec<f32>,
    /// Top-`K_MAIN` of `pre` per token, and its per-latent view.
    pub codes: SparseCodes,
    pub view: LatentView,
    /// Aux candidates (i % 3 != 1) and the aux codes (top-`K_AUX` among them).
    pub candidates: Vec<u32>,
    pub aux: SparseCodes,
    pub aux_view: LatentView,
    /// Reconstruction gradients (rows x d) of the main and aux groups.
    pub g: Vec<f32>,
    pub g_aux: Vec<f32>,
    /// dL/dpre per entry of the main and aux codes.
    pub dpre: Vec<f32>,
    pub aux_dpre: Vec<f32>,
    pub lambda: f32,
}

impl ParityInputs {
    pub fn new(s: Sizes) -> Self {
        let Sizes { rows, d_in: d, d_sae: f } = s;
        let mut rng = ChaCha8Rng::seed_from_u64(0x5ae_0004);
        let x = normal(&mut rng, rows * d, 1.0, 0.5);
        let b_dec = normal(&mut rng, d, 0.1, 0.5);
        let mut xc = vec![0f32; rows * d];
        cpu_enc::center(&x, &b_dec, &mut xc);
        let w_enc = normal(&mut rng, f * d, 1.0 / (d as f32).sqrt(), 0.0);
        let mut w_dec = normal(&mut rng, f * d, 1.0, 0.0);
        for (i, row) in w_dec.chunks_mut(d).enumerate() {
            crate::model::init::normalize(row);
            match i {
                1 => row.fill(0.0),
                2 => row.iter_mut().for_each(|v| *v *= 3.0),
                _ => {}
            }
        }
        let b_enc = normal(&mut rng, f, 0.2, 0.0);
        let theta = (0..f).map(|_| rng.random_range(-0.5f32..1.0)).collect();
        let pre = Self::pre_matrix(rows, f, 0x5ae_0005);
        let codes = sparsify::select(&pre, rows, f, &Selection::TopK { k: K_MAIN });
        let view = codes.by_latent();
        let candidates: Vec<u32> = (0..f as u32).filter(|i| i % 3 != 1).collect();
        let aux = sparsify::select(&pre, rows, f, &Selection::Aux { candidates: &candidates, k: K_AUX });
        let aux_view = aux.by_latent();
        let g = normal(&mut rng, rows * d, 0.1, 0.0);
        let g_aux = normal(&mut rng, rows * d, 0.1, 0.0);
        let dpre = normal(&mut rng, codes.nnz(), 1.0, 0.0);
        let aux_dpre = normal(&mut rng, aux.nnz(), 1.0, 0.0);
        let lambda = 5.0 / rows as f32;
        Self {
            s,
            x,
            b_dec,
            xc,
            w_enc,
            w_dec,
            b_enc,
            theta,
            pre,
            codes,
            view,
            candidates,
            aux,
            aux_view,
            g,
            g_aux,
            dpre,
            aux_dpre,
            lambda,
        }
    }

    /// A rows x cols pre-activation matrix on a grid of 0.25 in [-2, 2] (heavy ties), with the
    /// latents i % 7 == 3 never positive (so some latents keep nothing under every rule), except
    /// the last one (so that a loop stopping one latent short is caught).
    pub fn pre_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|e| {
                let i = e % cols;
                let dead = i % 7 == 3 && i + 1 != cols;
                let q = if dead { rng.random_range(-8i32..=0) } else { rng.random_range(-8i32..=8) };
                q as f32 * 0.25
            })
            .collect()
    }

    /// The CPU's latent-row gradients of `groups` (main, or main + aux), with no extra terms.
    fn latent_grads(&self, with_aux: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, f) = (self.s.d_in, self.s.d_sae);
        let mut groups = vec![Contribution { codes: &self.codes, dpre: &self.dpre, g: &self.g }];
        if with_aux {
            groups.push(Contribution { codes: &self.aux, dpre: &self.aux_dpre, g: &self.g_aux });
        }
        let (mut ge, mut gb, mut gd) = (vec![0f32; f * d], vec![0f32; f], vec![0f32; f * d]);
        cpu_bwd::latent_row_grads(&groups, &self.xc, self.s.d_in, &mut ge, &mut gb, &mut gd, |_, _, _, _| {});
        (ge, gb, gd)
    }

    fn l1(&self) -> L1Terms {
        let mut dpre = self.dpre.clone();
        L1Terms::new(&self.codes, &self.w_dec, self.s.d_in, self.lambda, &mut dpre)
    }
}

fn normal(rng: &mut ChaCha8Rng, n: usize, scale: f32, shift: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = StandardNormal.sample(rng);
            shift + scale * v
        })
        .collect()
}

fn u32s(v: &[usize]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

/// One check's outcome.
struct Verdict {
    ok: bool,
    detail: String,
}

/// Named errors against one tolerance.
fn within(parts: &[(&str, f64)], tol: f64) -> Verdict {
    let ok = parts.iter().all(|(_, e)| *e <= tol);
    let list: Vec<String> = parts.iter().map(|(n, e)| format!("{n} {e:.2e}")).collect();
    Verdict { ok, detail: format!("max rel err {} (tol {tol:.0e})", list.join(", ")) }
}

/// Exact equality of named outputs.
fn exact(parts: &[(&str, Option<String>)], what: &str) -> Verdict {
    match parts.iter().find_map(|(n, d)| d.as_ref().map(|d| format!("{n}: {d}"))) {
        Some(d) => Verdict { ok: false, detail: d },
        None => Verdict { ok: true, detail: format!("{what} identical") },
    }
}

/// The first element where `got` differs from `want` (None: identical).
fn mismatch<T: PartialEq + Debug>(got: &[T], want: &[T]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} elements vs CPU {}", got.len(), want.len()));
    }
    let e = got.iter().zip(want).position(|(a, b)| a != b)?;
    Some(format!("element {e}: {:?} vs CPU {:?}", got[e], want[e]))
}

/// Bit-exact f32 comparison (any NaN equals any NaN: NaN payloads are not specified).
fn mismatch_bits(got: &[f32], want: &[f32]) -> Option<String> {
    let key = |v: &f32| if v.is_nan() { u32::MAX } else { v.to_bits() };
    let (g, w): (Vec<u32>, Vec<u32>) = (got.iter().map(key).collect(), want.iter().map(key).collect());
    let e = g.iter().zip(&w).position(|(a, b)| a != b);
    match e {
        _ if got.len() != want.len() => Some(format!("{} elements vs CPU {}", got.len(), want.len())),
        Some(e) => Some(format!("element {e}: {:?} vs CPU {:?}", got[e], want[e])),
        None => None,
    }
}

/// `max_rel`, but infinite when a value is non-finite where the reference is finite (f64::max
/// ignores NaN, so a NaN would otherwise pass).
fn err(got: &[f32], want: &[f32]) -> f64 {
    let bad = got.len() != want.len() || got.iter().zip(want).any(|(a, b)| a.is_finite() != b.is_finite());
    if bad {
        f64::INFINITY
    } else {
        max_rel(got, want)
    }
}

/// Relative error of an f64 accumulator.
fn err64(got: f64, want: f64) -> f64 {
    let e = (got - want).abs() / want.abs().max(1.0);
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}

fn err64s(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0f64, |m, (a, b)| {
        let e = (a - b).abs() / scale;
        if e.is_nan() {
            f64::INFINITY
        } else {
            m.max(e)
        }
    })
}

/// Runs the checks of one size set into the report.
struct Checks<'a> {
    rep: &'a mut SelftestReport,
    tag: String,
}

impl Checks<'_> {
    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<Verdict>) {
        let name = format!("kernel {name} [{}]", self.tag);
        match f() {
            Ok(v) => self.rep.push(name, v.ok, v.detail),
            Err(e) => self.rep.push(name, false, format!("error: {e:#}")),
        }
    }
}

/// Every per-kernel check at sizes `s` into `rep` (names "kernel <name> vs <twin> [B=.. d=.. F=..]").
pub fn kernel_checks(dev: &Dev, s: Sizes, rep: &mut SelftestReport) -> Result<()> {
    let inp = ParityInputs::new(s);
    let tag = format!("B={} d={} F={}", s.rows, s.d_in, s.d_sae);
    let mut c = Checks { rep, tag };
    encode_checks(dev, &inp, &mut c);
    decode_checks(dev, &inp, &mut c);
    backward_checks(dev, &inp, &mut c);
    dense::dense_checks(dev, &inp, &mut c);
    adam_checks(dev, &inp, &mut c);
    scan_check(dev, &inp, &mut c);
    Ok(())
}

// ---- encode.cu --------------------------------------------------------------------------------

fn encode_checks(dev: &Dev, inp: &ParityInputs, c: &mut Checks) {
    let Sizes { rows, d_in: d, d_sae: f } = inp.s;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5ae_0006);
    // Every 16-bit pattern (zeros, subnormals, infinities, NaNs), then rows x d random ones.
    let halves: Vec<u16> = (0..=u16::MAX).chain((0..rows * d).map(|_| rng.random::<u16>())).collect();
    let n = halves.len() as u64;
    c.run("convert_f16_to_f32 vs half::f16::to_f32", || {
        let (src, out) = (dev.upload(&halves)?, dev.alloc::<f32>(halves.len())?);
        K::convert_f16_to_f32(dev, L::elementwise(n), src.p(), out.p(), n)?;
        let want: Vec<f32> = halves.iter().map(|&h| f16::from_bits(h).to_f32()).collect();
        Ok(exact(&[("f32", mismatch_bits(&out.to_vec(halves.len())?, &want))], &format!("{n} values")))
    });
    c.run("convert_bf16_to_f32 vs half::bf16::to_f32", || {
        let (src, out) = (dev.upload(&halves)?, dev.alloc::<f32>(halves.len())?);
        K::convert_bf16_to_f32(dev, L::elementwise(n), src.p(), out.p(), n)?;
        let want: Vec<f32> = halves.iter().map(|&h| bf16::from_bits(h).to_f32()).collect();
        Ok(exact(&[("f32", mismatch_bits(&out.to_vec(halves.len())?, &want))], &format!("{n} values")))
    });
    // Rounding ties (even and odd), the largest finite values, infinities, NaNs, subnormals;
    // then random bit patterns and random normal values.
    let special: [u32; 14] = [
        0x0000_0000,
        0x8000_0000,
        0x0000_0001,
        0x007f_ffff,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x3f80_7fff,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
    ];
    let mut floats: Vec<f32> = special.iter().map(|&b| f32::from_bits(b)).collect();
    floats.extend((0..rows * d).map(|_| f32::from_bits(rng.random::<u32>())));
    floats.extend(normal(&mut rng, rows * d, 1.0, 0.0));
    c.run("convert_f32_to_bf16 vs half::bf16::from_f32", || {
        let nf = floats.len() as u64;
        let (src, out) = (dev.upload(&floats)?, dev.alloc::<u16>(floats.len())?);
        K::convert_f32_to_bf16(dev, L::elementwise(nf), src.p(), out.p(), nf)?;
        let want: Vec<u16> = floats.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        Ok(exact(&[("bf16 bits", mismatch(&out.to_vec(floats.len())?, &want))], &format!("{nf} values")))
    });

    c.run("center vs cpu::encode::center", || {
        let nx = (rows * d) as u64;
        let (x, bd, xc) = (dev.upload(&inp.x)?, dev.upload(&inp.b_dec)?, dev.alloc::<f32>(rows * d)?);
        K::center(dev, L::elementwise(nx), x.p(), bd.p(), xc.p(), d as u32, nx)?;
        Ok(exact(&[("xc", mismatch_bits(&xc.to_vec(rows * d)?, &inp.xc))], "xc"))
    });

    c.run("aligned_encoder vs model::aligned::effective_encoder", || {
        let (a, w, out) = (dev.upload(&inp.w_enc)?, dev.upload(&inp.w_dec)?, dev.alloc::<f32>(f * d)?);
        K::aligned_encoder(dev, L::per_line(f, d), a.p(), w.p(), out.p(), d as u32)?;
        let mut want = vec![0f32; f * d];
        aligned::effective_encoder(&inp.w_enc, &inp.w_dec, d, &mut want);
        Ok(within(&[("W_enc", err(&out.to_vec(f * d)?, &want))], TOL))
    });

    c.run("bias_relu vs ReLU(pre + b_enc) loop", || {
        let nf = (rows * f) as u64;
        let raw = normal(&mut ChaCha8Rng::seed_from_u64(0x5ae_0007), rows * f, 1.0, 0.0);
        let (pre, be) = (dev.upload(&raw)?, dev.upload(&inp.b_enc)?);
        K::bias_relu(dev, L::elementwise(nf), pre.p(), be.p(), f as u32, nf)?;
        let want: Vec<f32> = raw.iter().enumerate().map(|(e, v)| (v + inp.b_enc[e % f]).max(0.0)).collect();
        Ok(exact(&[("pre", mismatch_bits(&pre.to_vec(rows * f)?, &want))], "pre"))
    });

    // The fused GEMM three ways: plain, with JumpReLU thresholds, with batchtopk's histogram.
    let fused = |theta: Option<&[f32]>, hist: bool| -> Result<(Vec<f32>, Vec<u32>)> {
        let (xc, w, be) = (dev.upload(&inp.xc)?, dev.upload(&inp.w_enc)?, dev.upload(&inp.b_enc)?);
        let th = dev.upload(theta.unwrap_or(&[]))?;
        let (pre, h) = (dev.upload(&vec![f32::NAN; rows * f])?, dev.alloc::<u32>(256)?);
        let thp = if theta.is_some() { th.p() } else { Ptr::null() };
        let hp = if hist { h.p() } else { Ptr::null() };
        let l = L::gemm_fallback(rows, f);
        K::gemm_encode_fused(dev, l, xc.p(), w.p(), be.p(), thp, pre.p(), rows as u32, f as u32, d as u32, hp)?;
        Ok((pre.to_vec(rows * f)?, h.to_vec(256)?))
    };
    let plain = fused(None, false);
    c.run("gemm_encode_fused vs cpu::encode::encode + ReLU", || {
        let (got, _) = plain.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let mut want = vec![0f32; rows * f];
        cpu_enc::encode(&inp.xc, &inp.w_enc, &inp.b_enc, rows, d, &mut want);
        want.iter_mut().for_each(|v| *v = v.max(0.0));
        Ok(within(&[("pre", err(got, &want))], TOL))
    });
    c.run("gemm_encode_fused theta vs sparsify::select JumpRelu", || {
        let (base, _) = plain.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let (got, _) = fused(Some(&inp.theta), false)?;
        let want = sparsify::select(base, rows, f, &Selection::JumpRelu { theta: &inp.theta }).to_dense();
        let kept = want.iter().filter(|v| **v != 0.0).count();
        Ok(exact(&[("pre", mismatch_bits(&got, &want))], &format!("mask ({kept} kept)")))
    });
    c.run("gemm_encode_fused hist vs 256-bin count of top key bytes", || {
        let (base, _) = plain.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let (got, hist) = fused(None, true)?;
        let mut want = vec![0u32; 256];
        for v in got.iter().filter(|v| **v > 0.0) {
            want[(v.to_bits() >> 24) as usize] += 1;
        }
        let n: u32 = want.iter().sum();
        Ok(exact(
            &[("pre", mismatch_bits(&got, base)), ("hist", mismatch(&hist, &want))],
            &format!("pre and histogram of {n} keys"),
        ))
    });
}

// ---- decode.cu --------------------------------------------------------------------------------

fn decode_checks(dev: &Dev, inp: &ParityInputs, c: &mut Checks) {
    let Sizes { rows, d_in: d, .. } = inp.s;
    let n = rows * d;
    let mut x_hat = vec![0f32; n];
    cpu_dec::decode(&inp.codes, &inp.w_dec, Some(&inp.b_dec), d, &mut x_hat);
    let resid: Vec<f32> = x_hat.iter().zip(&inp.x).map(|(h, x)| h - x).collect();
    let scale = 2.0 / rows as f32;
    let (r32, d32) = (rows as u32, d as u32);

    c.run("residual_grad vs x_hat - x, (2/B) r loop", || {
        let (x, xh) = (dev.upload(&inp.x)?, dev.upload(&x_hat)?);
        let (r, g) = (dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?);
        K::residual_grad(dev, L::elementwise(n as u64), x.p(), xh.p(), n as u64, scale, r.p(), g.p())?;
        let want_g: Vec<f32> = resid.iter().map(|r| scale * r).collect();
        Ok(exact(
            &[("resid", mismatch_bits(&r.to_vec(n)?, &resid)), ("g", mismatch_bits(&g.to_vec(n)?, &want_g))],
            "resid and g",
        ))
    });

    c.run("col_partials + col_sums_finish vs cpu::linalg::column_sums", || {
        let (x, out) = (dev.upload(&inp.x)?, dev.alloc::<f64>(d)?);
        let part = dev.alloc::<f64>(L::COLSUM_PARTS * d)?;
        super::decode::col_sums(dev, x.p(), rows, d, &part, out.p())?;
        let parts = L::col_partials(rows, d).1;
        let v = within(&[("sums", err64s(&out.to_vec(d)?, &linalg::column_sums(&inp.x, d)))], TOL_F64);
        Ok(Verdict { detail: format!("{} ({parts} row parts)", v.detail), ..v })
    });

    c.run("row_stats vs cpu::decode::residual_stats", || {
        let (x, xh) = (dev.upload(&inp.x)?, dev.upload(&x_hat)?);
        let (cs, acc) = (dev.upload(&linalg::column_sums(&inp.x, d))?, dev.alloc::<f64>(K::ACC_SLOTS)?);
        K::row_stats(dev, L::per_line(rows, d), x.p(), xh.p(), cs.p(), r32, d32, acc.p())?;
        let a = acc.to_vec(K::ACC_SLOTS)?;
        let want = cpu_dec::residual_stats(&inp.x, &x_hat, d);
        Ok(within(
            &[
                ("sse", err64(a[K::ACC_SSE], want.sse)),
                ("total_var", err64(a[K::ACC_TOTAL_VAR], want.total_var)),
                ("cos", err64(a[K::ACC_COS], want.cos_sum)),
            ],
            TOL_F64,
        ))
    });

    // The aux loss on the residual: sums, then the gradient with c from the device's sums (as
    // decode.rs::aux_loss does).
    let alpha = 1.0f32 / 32.0;
    let mut e_hat = vec![0f32; n];
    cpu_dec::decode(&inp.aux, &inp.w_dec, None, d, &mut e_hat);
    let (want_loss, want_g) = cpu_dec::aux_loss_and_grad(&resid, e_hat.clone(), d, alpha);
    let sums = || -> Result<(f64, f64)> {
        let (r, eh) = (dev.upload(&resid)?, dev.upload(&e_hat)?);
        let (cs, acc) = (dev.upload(&linalg::column_sums(&resid, d))?, dev.alloc::<f64>(K::ACC_SLOTS)?);
        K::aux_sums(dev, L::per_line(rows, d), r.p(), eh.p(), cs.p(), r32, d32, acc.p())?;
        let a = acc.to_vec(K::ACC_SLOTS)?;
        Ok((a[K::ACC_AUX_NUM], a[K::ACC_AUX_DEN]))
    };
    let got = sums();
    c.run("aux_sums vs cpu::decode::aux_loss_and_grad", || {
        let (num, den) = *got.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        // The plain f64 sums, since the CPU twin returns only their ratio.
        let mean: Vec<f64> = linalg::column_sums(&resid, d).iter().map(|s| -s / rows as f64).collect();
        let (mut pn, mut pd) = (0f64, 0f64);
        for (e, (r, h)) in resid.iter().zip(&e_hat).enumerate() {
            let ev = -(*r as f64);
            pn += (ev - *h as f64).powi(2);
            pd += (ev - mean[e % d]).powi(2);
        }
        let loss = alpha as f64 * num / den;
        Ok(within(&[("num", err64(num, pn)), ("den", err64(den, pd)), ("loss", err64(loss, want_loss))], TOL_F64))
    });
    c.run("aux_grad vs cpu::decode::aux_loss_and_grad", || {
        let (_, den) = *got.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let cg = (2.0 * alpha as f64 / den) as f32;
        let (r, eh, g) = (dev.upload(&resid)?, dev.upload(&e_hat)?, dev.alloc::<f32>(n)?);
        K::aux_grad(dev, L::elementwise(n as u64), r.p(), eh.p(), cg, n as u64, g.p())?;
        Ok(within(&[("g_aux", err(&g.to_vec(n)?, &want_g))], TOL))
    });
}

// ---- backward.cu ------------------------------------------------------------------------------

fn backward_checks(dev: &Dev, inp: &ParityInputs, c: &mut Checks) {
    let Sizes { rows, d_in: d, d_sae: f } = inp.s;
    let d32 = d as u32;
    let codes = &inp.codes;
    let nnz = codes.nnz();
    let l1 = inp.l1();

    c.run("row_norms vs cpu::backward::L1Terms::new", || {
        let (w, out) = (dev.upload(&inp.w_dec)?, dev.alloc::<f32>(f)?);
        K::row_norms(dev, L::per_line(f, d), w.p(), d32, out.p())?;
        Ok(within(&[("norms", err(&out.to_vec(f)?, &l1.norms))], TOL))
    });

    c.run("l1_terms vs cpu::backward::L1Terms::new", || {
        let (idx, val, norms) = (dev.upload(&codes.idx)?, dev.upload(&codes.val)?, dev.upload(&l1.norms)?);
        let (dpre, acc) = (dev.upload(&inp.dpre)?, dev.alloc::<f64>(K::ACC_SLOTS)?);
        let l = L::elementwise(nnz as u64);
        K::l1_terms(dev, l, idx.p(), val.p(), nnz as u32, norms.p(), inp.lambda, dpre.p(), acc.p())?;
        let mut want_dpre = inp.dpre.clone();
        let want = L1Terms::new(codes, &inp.w_dec, d, inp.lambda, &mut want_dpre);
        let loss = acc.to_vec(K::ACC_SLOTS)?[K::ACC_L1];
        Ok(within(
            &[
                ("dpre", err(&dpre.to_vec(nnz)?, &want_dpre)),
                ("loss", (loss - want.loss).abs() / want.loss.abs().max(1.0)),
            ],
            TOL,
        ))
    });

    // The per-latent view, kernel by kernel; each reads the CPU's result of the one before.
    let col_ptr = u32s(&inp.view.col_ptr);
    c.run("csc_count vs SparseCodes::col_counts", || {
        let (idx, counts) = (dev.upload(&codes.idx)?, dev.alloc::<u32>(f)?);
        K::csc_count(dev, L::elementwise(nnz as u64), idx.p(), nnz as u32, counts.p())?;
        Ok(exact(&[("counts", mismatch(&counts.to_vec(f)?, &codes.col_counts()))], &format!("{nnz} entries")))
    });
    c.run("csc_fill vs SparseCodes::by_latent", || {
        let (rp, idx, cp) = (dev.upload(&u32s(&codes.row_ptr))?, dev.upload(&codes.idx)?, dev.upload(&col_ptr)?);
        let (cursor, tok, pos) = (dev.alloc::<u32>(f)?, dev.alloc::<u32>(nnz)?, dev.alloc::<u32>(nnz)?);
        K::csc_fill(dev, L::per_line(rows, 64), rp.p(), idx.p(), cp.p(), cursor.p(), tok.p(), pos.p())?;
        // The order inside a segment is arbitrary here: compare each segment sorted.
        let (mut tok, mut pos) = (tok.to_vec(nnz)?, pos.to_vec(nnz)?);
        for i in 0..f {
            let r = inp.view.entries(i);
            let mut pairs: Vec<(u32, u32)> =
                tok[r.clone()].iter().copied().zip(pos[r.clone()].iter().copied()).collect();
            pairs.sort_unstable_by_key(|p| p.1);
            for (s, (t, p)) in r.zip(pairs) {
                tok[s] = t;
                pos[s] = p;
            }
        }
        Ok(exact(
            &[("tok", mismatch(&tok, &inp.view.tok)), ("pos", mismatch(&pos, &inp.view.pos))],
            "segments (as sets)",
        ))
    });
    // csc_sort on shuffled segments: the main codes (short segments, pairwise ranks) and dense
    // relu-like codes (long segments at the larger size: the token bitmap); once, not per size,
    // a batch longer than one bitmap window.
    let dense = SparseCodes::from_mask(&inp.pre, rows, f, |b, i| inp.pre[b * f + i] > 0.0);
    let dense_view = dense.by_latent();
    c.run("csc_sort vs SparseCodes::by_latent", || csc_sort_check(dev, codes, &inp.view));
    c.run("csc_sort dense relu-like codes vs SparseCodes::by_latent", || csc_sort_check(dev, &dense, &dense_view));
    if rows == super::selftest::SIZES.rows {
        let long_batch = csc_long_batch();
        let view = long_batch.by_latent();
        c.run("csc_sort past one bitmap window vs SparseCodes::by_latent", || csc_sort_check(dev, &long_batch, &view));
    }

    // latent_grads: main codes overwriting rows full of garbage, then the aux codes on top; the
    // main group also writes relu's per-latent code sums (over garbage too), the aux group none.
    let lat = L::per_line(f, d);
    let grads = || -> Result<[Vec<f32>; 7]> {
        let garbage = normal(&mut ChaCha8Rng::seed_from_u64(0x5ae_0009), f * d + f, 1e3, 0.0);
        let (ge, gb, gd) =
            (dev.upload(&garbage[..f * d])?, dev.upload(&garbage[f * d..])?, dev.upload(&garbage[..f * d])?);
        let xc = dev.upload(&inp.xc)?;
        let sums = dev.upload(&garbage[..f])?;
        let mut out = vec![];
        for (cd, view, dpre, g, accumulate) in
            [(codes, &inp.view, &inp.dpre, &inp.g, 0), (&inp.aux, &inp.aux_view, &inp.aux_dpre, &inp.g_aux, 1)]
        {
            let (cp, tok, pos) = (dev.upload(&u32s(&view.col_ptr))?, dev.upload(&view.tok)?, dev.upload(&view.pos)?);
            let (val, dp, gg) = (dev.upload(&cd.val)?, dev.upload(dpre)?, dev.upload(g)?);
            let (cp, tok, pos, val, dp, gg) = (cp.p(), tok.p(), pos.p(), val.p(), dp.p(), gg.p());
            let sp = if accumulate == 0 { sums.p() } else { Ptr::null() };
            K::latent_grads(dev, lat, cp, tok, pos, val, dp, gg, xc.p(), d32, accumulate, ge.p(), gb.p(), gd.p(), sp)?;
            out.extend([ge.to_vec(f * d)?, gb.to_vec(f)?, gd.to_vec(f * d)?]);
        }
        out.push(sums.to_vec(f)?);
        Ok(out.try_into().expect("seven outputs"))
    };
    let got = grads();
    for (name, with_aux) in [("latent_grads main", false), ("latent_grads + aux (accumulate=1)", true)] {
        c.run(&format!("{name} vs cpu::backward::latent_row_grads"), || {
            let g = got.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
            let o = if with_aux { 3 } else { 0 };
            let (ge, gb, gd) = inp.latent_grads(with_aux);
            Ok(within(
                &[
                    ("dW_enc", err(&g[o], &ge)),
                    ("db_enc", err(&g[o + 1], &gb)),
                    ("dW_dec", err(&g[o + 2], &gd)),
                    // Written by the main group, left alone by the aux group.
                    ("l1_sums", err(&g[6], &l1.sums)),
                ],
                TOL,
            ))
        });
    }

    // latent_finish on the CPU's main + aux gradients: L1 term, aligned pull-back, both.
    let (ge0, gb0, gd0) = inp.latent_grads(true);
    for (name, relu, aligned, with_aux) in [
        ("latent_finish relu vs cpu::backward::L1Terms::add_row_grad", true, false, false),
        ("latent_finish aligned + aux vs model::aligned::backprop_row", false, true, true),
        ("latent_finish relu aligned vs L1Terms::add_row_grad + aligned::backprop_row", true, true, false),
    ] {
        c.run(name, || {
            let (cp, acp) = (dev.upload(&col_ptr)?, dev.upload(&u32s(&inp.aux_view.col_ptr))?);
            let (a, w, sums, norms) =
                (dev.upload(&inp.w_enc)?, dev.upload(&inp.w_dec)?, dev.upload(&l1.sums)?, dev.upload(&l1.norms)?);
            let (ge, gd) = (dev.upload(&ge0)?, dev.upload(&gd0)?);
            let acp_p = if with_aux { acp.p() } else { Ptr::null() };
            let (sp, np) = if relu { (sums.p(), norms.p()) } else { (Ptr::null(), Ptr::null()) };
            let al = aligned as i32;
            K::latent_finish(dev, lat, cp.p(), acp_p, a.p(), w.p(), d32, sp, np, inp.lambda, al, ge.p(), gd.p())?;
            let (mut want_e, mut want_d) = (ge0.clone(), gd0.clone());
            for i in 0..f {
                let mut n = inp.view.entries(i).len();
                if with_aux {
                    n += inp.aux_view.entries(i).len();
                }
                if n == 0 {
                    continue;
                }
                let r = i * d..(i + 1) * d;
                let w = &inp.w_dec[r.clone()];
                if relu {
                    l1.add_row_grad(i, w, &mut want_d[r.clone()]);
                }
                if aligned {
                    let g_eff = want_e[r.clone()].to_vec();
                    aligned::backprop_row(&inp.w_enc[r.clone()], w, &g_eff, &mut want_e[r.clone()], &mut want_d[r]);
                }
            }
            Ok(within(
                &[("dW_enc", err(&ge.to_vec(f * d)?, &want_e)), ("dW_dec", err(&gd.to_vec(f * d)?, &want_d))],
                TOL,
            ))
        });
    }

    c.run("col_partials (weighted) + bdec_grad vs cpu::backward::b_dec_grad", || {
        let cs = linalg::column_sums(&inp.g, d);
        let (csd, w, gb, out) = (dev.upload(&cs)?, dev.upload(&inp.w_enc)?, dev.upload(&gb0)?, dev.alloc::<f32>(d)?);
        let part = dev.alloc::<f64>(L::COLSUM_PARTS * d)?;
        let parts = super::decode::col_partials(dev, w.p(), gb.p(), f, d, &part)?;
        K::bdec_grad(dev, L::per_column(d), csd.p(), part.p(), parts, d32, out.p())?;
        let zero = gb0.iter().filter(|v| **v == 0.0).count();
        let v = within(&[("db_dec", err(&out.to_vec(d)?, &cpu_bwd::b_dec_grad(&cs, &inp.w_enc, &gb0, d)))], TOL);
        Ok(Verdict { detail: format!("{} ({zero} latents with db_enc = 0, {parts} parts)", v.detail), ..v })
    });
}

/// Codes over more tokens than one csc_sort bitmap window holds, with 5 latents: 0 in every
/// token, 1 in every third, 2 in none, 3 in three tokens across the windows (a short segment),
/// 4 in every 1000th (a long segment, sparse in each window).
fn csc_long_batch() -> SparseCodes {
    let rows = K::CSC_WINDOW_WORDS * 32 + 77;
    let lists = (0..rows)
        .map(|b| {
            let mut l = vec![(0u32, 1.0f32)];
            if b % 3 == 0 {
                l.push((1, 1.0));
            }
            if [5, rows - 45, rows - 1].contains(&b) {
                l.push((3, 1.0));
            }
            if b % 1000 == 999 {
                l.push((4, 1.0));
            }
            l
        })
        .collect();
    SparseCodes::from_rows(5, lists)
}

/// csc_sort, launched as the step launches it, on `view` with each segment shuffled (on the
/// emulator csc_fill's output is already sorted, so a sort that did nothing would pass on it).
fn csc_sort_check(dev: &Dev, codes: &SparseCodes, view: &LatentView) -> Result<Verdict> {
    let (rows, f) = (codes.row_ptr.len() - 1, view.col_ptr.len() - 1);
    let nnz = view.tok.len();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5ae_0008);
    let (mut tok_in, mut pos_in) = (view.tok.clone(), view.pos.clone());
    for i in 0..f {
        let r = view.entries(i);
        let mut pairs: Vec<(u32, u32)> =
            tok_in[r.clone()].iter().copied().zip(pos_in[r.clone()].iter().copied()).collect();
        pairs.shuffle(&mut rng);
        pairs.reverse();
        for (s, (t, p)) in r.zip(pairs) {
            tok_in[s] = t;
            pos_in[s] = p;
        }
    }
    let (cp, ti, pi) = (dev.upload(&u32s(&view.col_ptr))?, dev.upload(&tok_in)?, dev.upload(&pos_in)?);
    let (tok, pos) = (dev.alloc::<u32>(nnz)?, dev.alloc::<u32>(nnz)?);
    K::csc_sort(dev, L::csc_sort(f), cp.p(), ti.p(), pi.p(), rows as u32, tok.p(), pos.p())?;
    let longest = (0..f).map(|i| view.entries(i).len()).max().unwrap_or(0);
    Ok(exact(
        &[("tok", mismatch(&tok.to_vec(nnz)?, &view.tok)), ("pos", mismatch(&pos.to_vec(nnz)?, &view.pos))],
        &format!("{rows} tokens, longest segment {longest}: tok and pos"),
    ))
}

// ---- adam.cu ----------------------------------------------------------------------------------

fn adam_checks(dev: &Dev, inp: &ParityInputs, c: &mut Checks) {
    let Sizes { d_in: d, d_sae: f, .. } = inp.s;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5ae_000a);
    let (lr, beta1, beta2, eps, t) = (1e-2f32, 0.9f64, 0.999f64, 1e-8f64, 3u64);
    // A state after a few steps: m ~ 0.1 g, v ~ 0.01 g^2, some gradients exactly zero.
    let state = |rng: &mut ChaCha8Rng, n: usize| {
        let p = normal(rng, n, 0.05, 0.0); // small, so that p's error is the step's
        let mut g = normal(rng, n, 0.1, 0.0);
        g.iter_mut().step_by(7).for_each(|v| *v = 0.0);
        let m = normal(rng, n, 0.01, 0.0);
        let v: Vec<f32> = normal(rng, n, 0.03, 0.0).iter().map(|x| x * x).collect();
        (p, g, m, v)
    };
    // Plain Adam, then AdamW's decay with an active clip (bound a third of the gradient's norm;
    // the kernels read the squared norm from the device, here the CPU's).
    for (tag, wd, clip_frac) in [("", 0.0, 0.0), (" adamw + clip", 0.5, 1.0 / 3.0)] {
        let h = Folded::new(lr, beta1, beta2, eps, t, wd);
        let plain =
            AdamHyper { lr, beta1: beta1 as f32, beta2: beta2 as f32, eps: eps as f32, t, decay: 1.0, gscale: 1.0 };
        // `gsq`: the squared norm the kernel is given; the CPU twin gets the factor it implies.
        let clipped = |gsq: f64| -> Result<(AdamHyper, f32, Option<DevBuf<f64>>)> {
            if clip_frac == 0.0 {
                return Ok((plain, 0.0, None));
            }
            let bound = (clip_frac * gsq.sqrt()) as f32;
            let hyper = AdamHyper { decay: h.decay, gscale: cpu_clip::coefficient(gsq, bound), ..plain };
            Ok((hyper, bound, Some(dev.upload(&[gsq])?)))
        };
        let ptr = |b: &Option<DevBuf<f64>>| b.as_ref().map_or(Ptr::null(), |b| b.p());

        c.run(&format!("adam_flat{tag} vs cpu::adam::adam_step"), || {
            let n = f * d + f;
            let (p0, g, m0, v0) = state(&mut rng, n);
            let (hyper, bound, gsq) = clipped(cpu_clip::sum_sq(&g))?;
            let (p, gg, m, v) = (dev.upload(&p0)?, dev.upload(&g)?, dev.upload(&m0)?, dev.upload(&v0)?);
            let n64 = n as u64;
            let (b1, b2, st, e, dc) = (h.b1, h.b2, h.step_size, h.eps, hyper.decay);
            K::adam_flat(
                dev,
                L::elementwise(n64),
                p.p(),
                gg.p(),
                m.p(),
                v.p(),
                n64,
                b1,
                b2,
                st,
                e,
                dc,
                ptr(&gsq),
                bound,
            )?;
            let (mut wp, mut wm, mut wv) = (p0.clone(), m0, v0);
            cpu_adam::adam_step(&mut wp, &g, &mut wm, &mut wv, hyper);
            // The update itself (p is ~1, the step ~lr), so that a wrong step size shows.
            let (gp, cpu_step): (Vec<f32>, Vec<f32>) = (p.to_vec(n)?, wp.iter().zip(&p0).map(|(a, b)| a - b).collect());
            let gpu_step: Vec<f32> = gp.iter().zip(&p0).map(|(a, b)| a - b).collect();
            let step_scale = cpu_step.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let step_err = err(&gpu_step, &cpu_step) / step_scale.min(1.0);
            Ok(within(
                &[
                    ("p", err(&gp, &wp)),
                    ("step", step_err),
                    ("m", err(&m.to_vec(n)?, &wm)),
                    ("v", err(&v.to_vec(n)?, &wv)),
                ],
                TOL,
            ))
        });

        c.run(&format!("adam_dec_rows{tag} vs cpu::adam::{{project_out, adam_step_renorm_rows}}"), || {
            let n = f * d;
            let (_, g0, m0, v0) = state(&mut rng, n);
            let mut g0 = g0;
            g0[(f - 1) * d..].fill(0.0); // a row without gradient
            let w0 = inp.w_dec.clone(); // row 1 is zero, row 2 has norm 3
            let (mut wp, mut wg, mut wm, mut wv) = (w0.clone(), g0.clone(), m0.clone(), v0.clone());
            for (gr, wr) in wg.chunks_mut(d).zip(wp.chunks(d)) {
                cpu_adam::project_out(gr, wr);
            }
            let (hyper, bound, gsq) = clipped(cpu_clip::sum_sq(&wg))?;
            let (w, g, m, v) = (dev.upload(&w0)?, dev.upload(&g0)?, dev.upload(&m0)?, dev.upload(&v0)?);
            let (b1, b2, st, e, dc) = (h.b1, h.b2, h.step_size, h.eps, hyper.decay);
            let l = L::per_line(f, d);
            K::adam_dec_rows(dev, l, w.p(), g.p(), m.p(), v.p(), d as u32, b1, b2, st, e, dc, ptr(&gsq), bound)?;
            cpu_adam::adam_step_renorm_rows(&mut wp, &wg, &mut wm, &mut wv, d, hyper);
            Ok(within(
                &[
                    ("W_dec", err(&w.to_vec(n)?, &wp)),
                    ("projected g", err(&g.to_vec(n)?, &wg)),
                    ("m", err(&m.to_vec(n)?, &wm)),
                    ("v", err(&v.to_vec(n)?, &wv)),
                ],
                TOL,
            ))
        });
    }

    // The gradient's squared norm (--grad-clip): added onto what the slot holds.
    c.run("sum_sq vs cpu::clip::sum_sq", || {
        let mut detail = vec![];
        // The last length is past one full grid (1024 blocks of 256), so the grid stride turns.
        for n in [1, d, f * d + f, 1024 * 256 + 3] {
            let x = normal(&mut rng, n, 0.1, 0.0);
            let (xd, out) = (dev.upload(&x)?, dev.upload(&[0.25f64])?);
            K::sum_sq(dev, L::grid_stride(n as u64), xd.p(), n as u64, out.p())?;
            let (got, want) = (out.to_vec(1)?[0], 0.25 + cpu_clip::sum_sq(&x));
            let e = err64(got, want);
            if e > TOL_F64 {
                return Ok(Verdict { ok: false, detail: format!("n = {n}: {got} vs CPU {want} (rel err {e:.2e})") });
            }
            detail.push(format!("{e:.1e}"));
        }
        Ok(Verdict { ok: true, detail: format!("max rel err {} (tol {TOL_F64:.0e})", detail.join(", ")) })
    });
    c.run("sum_sq_dec_rows vs cpu::adam::project_out + cpu::clip::sum_sq", || {
        let n = f * d;
        let g0 = normal(&mut rng, n, 0.1, 0.0);
        let mut wg = g0.clone();
        for (gr, wr) in wg.chunks_mut(d).zip(inp.w_dec.chunks(d)) {
            cpu_adam::project_out(gr, wr);
        }
        let (w, g, out) = (dev.upload(&inp.w_dec)?, dev.upload(&g0)?, dev.upload(&[0.25f64])?);
        K::sum_sq_dec_rows(dev, L::per_line(f, d), w.p(), g.p(), d as u32, out.p())?;
        let (got, want) = (out.to_vec(1)?[0], 0.25 + cpu_clip::sum_sq(&wg));
        // Each row's projection is an f32 dot product in another order: f32 tolerance.
        Ok(within(&[("||Pg||^2", err64(got, want))], TOL))
    });

    c.run("latent_stats vs SparseCodes::col_counts, threshold::per_latent_min", || {
        let codes = &inp.codes;
        let nnz = codes.nnz();
        let (idx, val) = (dev.upload(&codes.idx)?, dev.upload(&codes.val)?);
        let (counts, minb) = (dev.alloc::<u32>(f)?, dev.upload(&vec![u32::MAX; f])?);
        K::latent_stats(dev, L::elementwise(nnz as u64), idx.p(), val.p(), nnz as u32, counts.p(), minb.p())?;
        let want_min: Vec<u32> =
            threshold::per_latent_min(codes).iter().map(|m| m.map_or(u32::MAX, |v| v.to_bits())).collect();
        let none = want_min.iter().filter(|m| **m == u32::MAX).count();
        Ok(exact(
            &[
                ("counts", mismatch(&counts.to_vec(f)?, &codes.col_counts())),
                ("min", mismatch(&minb.to_vec(f)?, &want_min)),
            ],
            &format!("counts and minima ({none} latents without entry)"),
        ))
    });
}

// ---- select.cu: the scan every CSR / CSC build uses -------------------------------------------

fn scan_check(dev: &Dev, inp: &ParityInputs, c: &mut Checks) {
    let Sizes { rows, d_sae: f, .. } = inp.s;
    let ns = [0, 1, rows, f, 1023, 1024, 1025, 2 * 1024 + rows + 1];
    c.run("exclusive_scan vs prefix sum", || {
        let mut rng = ChaCha8Rng::seed_from_u64(0x5ae_000b);
        for &n in &ns {
            let v: Vec<u32> = (0..n).map(|_| rng.random_range(0..1000u32)).collect();
            let (src, out) = (dev.upload(&v)?, dev.alloc::<u32>(n + 1)?);
            K::exclusive_scan(dev, L::scan(), src.p(), n as u32, out.p())?;
            let mut want = Vec::with_capacity(n + 1);
            let mut acc = 0u32;
            want.push(0);
            for x in &v {
                acc += x;
                want.push(acc);
            }
            if let Some(d) = mismatch(&out.to_vec(n + 1)?, &want) {
                return Ok(Verdict { ok: false, detail: format!("n = {n}: {d}") });
            }
        }
        Ok(Verdict { ok: true, detail: format!("identical for n = {ns:?}") })
    });
}
