//! The dense path of the main codes' products (kernels/dense.cu; CPU twin backend/cpu/dense.rs):
//! codes dense enough that GEMMs beat gathers. relu at initialisation keeps about half of B x F;
//! the sparse path then costs four gathered products of nnz x d (decode, dL/dz, dW_dec, dW_enc),
//! each reading a d-vector per entry, where four GEMMs of B x F x d run at the device's GEMM
//! rate. With `Z` (B x F, the kept codes scattered), `G = dL/dx_hat` and `dP` (dL/dpre at the
//! kept entries, scattered):
//! - decode `x_hat = Z W_dec + b_dec`;
//! - `dW_dec = Z^T G`, and relu's per-latent code sums `colsum(Z)`;
//! - `dZ = G W_dec^T`, read at the kept entries into the codes' dpre (relu's L1 terms are then
//!   added there, as on the sparse path);
//! - `dW_enc = dP^T xc`, `db_enc = colsum(dP)`.
//!
//! One B x F buffer (`ws.b.dense`) holds Z, then dZ, then dP. The aux codes stay sparse. The
//! GEMMs are cuBLAS sgemm (f32 whatever `--precision`: these are gradients) or, without cuBLAS,
//! the hand-written `gemm_strided`.

use super::backend::Ctx;
use super::backward::GradPtrs;
use super::decode;
use super::device::{Dev, Ptr};
use super::kernels as K;
use super::launch as L;
use super::workspace::Ws;
use crate::config::{DenseCodes, TrainConfig};
use anyhow::{anyhow, Result};
use cudarc::cublas::{result as blas, sys as bsys};

/// Auto: dense above this fraction of B x F kept, and only with cuBLAS (the fallback GEMM is no
/// faster than the gathers). A model, not yet a measurement: at 4096 x 4608 x 576 four f32
/// sgemms take about 2 ms on an H100 (~50 TFLOP/s), and the four gathers about 25 ms per unit of
/// density (each entry reads a 2.3 KB row from L2), so they cross near 0.08. `sae bench step
/// --backend cuda --sparsifier relu --dense-codes never|always` (in scripts/gpu_check.sh) is
/// what should set it.
pub const DENSE_ABOVE: f64 = 0.08;

/// Whether the workspace holds the B x F dense buffer: `--dense-codes always`, or auto with
/// cuBLAS and a sparsifier whose codes can be dense (relu, or a mean budget k above
/// [`DENSE_ABOVE`] of F).
pub fn may_run(cfg: &TrainConfig, blas: bool) -> bool {
    match cfg.dense_codes {
        DenseCodes::Never => false,
        DenseCodes::Always => true,
        DenseCodes::Auto => blas && (cfg.sparsifier.has_l1() || cfg.k as f64 > DENSE_ABOVE * cfg.d_sae as f64),
    }
}

/// Whether this step's main products run dense, from the codes just selected.
pub fn this_step(cx: &Ctx, ws: &Ws) -> bool {
    if !ws.dims.dense {
        return false;
    }
    match cx.cfg.dense_codes {
        DenseCodes::Never => false,
        DenseCodes::Always => true,
        // may_run saw cuBLAS when it allocated the buffer.
        DenseCodes::Auto => ws.main.nnz as f64 > DENSE_ABOVE * ws.rows as f64 * cx.shape.d_sae as f64,
    }
}

/// A row-major matrix operand: its pointer, leading dimension (elements between rows as
/// stored) and whether the product reads it transposed.
#[derive(Clone, Copy)]
pub struct Operand {
    pub p: Ptr<f32>,
    pub ld: usize,
    pub t: bool,
}

/// One row-major product `C (m x n, leading dimension n) = op(A) op(B)` (`accumulate`:
/// `C +=`), op(A) m x k, op(B) k x n.
#[derive(Clone, Copy)]
pub struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
    pub c: Ptr<f32>,
    pub accumulate: bool,
}

impl Product {
    /// `C = op(A) op(B)` at `(m, n, k)`, overwriting C.
    pub fn new((m, n, k): (usize, usize, usize), a: Operand, b: Operand, c: Ptr<f32>) -> Self {
        Self { m, n, k, a, b, c, accumulate: false }
    }
}

/// Run `p`: cuBLAS sgemm where it loads, else the hand-written `gemm_strided`.
pub fn gemm(dev: &Dev, p: &Product) -> Result<()> {
    match &dev.blas {
        Some(h) => sgemm(h.handle, p),
        None => gemm_fallback(dev, p),
    }
}

/// [`gemm`] by the hand-written `gemm_strided` (no cuBLAS; the parity checks call it directly).
pub fn gemm_fallback(dev: &Dev, p: &Product) -> Result<()> {
    // op(X)[r][c] = x[r * s_r + c * s_c]: as stored (ld, 1), transposed (1, ld).
    let s = |o: Operand| if o.t { (1u64, o.ld as u64) } else { (o.ld as u64, 1u64) };
    let ((ar, ac), (br, bc)) = (s(p.a), s(p.b));
    let (m, n, k) = (p.m as u32, p.n as u32, p.k as u32);
    let l = L::gemm_strided(p.m, p.n);
    K::gemm_strided(dev, l, m, n, k, p.a.p, ar, ac, p.b.p, br, bc, p.c, p.accumulate as i32)
}

/// cuBLAS is column-major: a row-major matrix is its transpose there, so row-major
/// `C = op(A) op(B)` is column-major `C^T = op(B)^T op(A)^T`, i.e. sgemm with the operands
/// swapped and each one's transpose flag kept (a row-major operand read as stored is, seen
/// column-major, already transposed once).
fn sgemm(h: bsys::cublasHandle_t, p: &Product) -> Result<()> {
    use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let (alpha, beta) = (1.0f32, if p.accumulate { 1.0f32 } else { 0.0 });
    let Product { m, n, k, a, b, c, .. } = *p;
    let r = unsafe {
        blas::sgemm(
            h,
            op(b.t),
            op(a.t),
            n as i32,
            m as i32,
            k as i32,
            &alpha,
            b.p.addr() as *const f32,
            b.ld as i32,
            a.p.addr() as *const f32,
            a.ld as i32,
            &beta,
            c.addr() as *mut f32,
            n as i32,
        )
    };
    r.map_err(|e| anyhow!("cuBLAS sgemm ({m} x {n} x {k}) of the dense codes path failed: {e:?}"))
}

/// `ws.b.dense = Z`: the main codes' values scattered into B x F.
fn scatter(dev: &Dev, ws: &Ws, val: Ptr<f32>, f: usize) -> Result<()> {
    let c = &ws.main.b;
    ws.b.dense.zero()?;
    K::scatter_codes(dev, L::per_line(ws.rows, 64), c.row_ptr.p(), c.idx.p(), val, f as u32, ws.b.dense.p())
}

/// `ws.b.x_hat = Z W_dec + b_dec` from the main codes.
pub fn decode(cx: &Ctx, ws: &Ws) -> Result<()> {
    let (dev, b) = (cx.dev, &ws.b);
    let (rows, d, f) = (ws.rows, cx.shape.d_in, cx.shape.d_sae);
    scatter(dev, ws, ws.main.b.val.p(), f)?;
    let z = Operand { p: b.dense.p(), ld: f, t: false };
    let w_dec = Operand { p: cx.w_dec(), ld: d, t: false };
    gemm(dev, &Product::new((rows, d, f), z, w_dec, b.x_hat.p()))?;
    let n = (rows * d) as u64;
    K::add_bias_rows(dev, L::elementwise(n), b.x_hat.p(), cx.b_dec(), d as u32, n)
}

/// The main codes' latent-row gradients (overwriting every row, as the sparse path's
/// `latent_grads` does), their dpre, and relu's L1 terms. `ws.b.dense` still holds Z from
/// [`decode`].
pub fn main_grads(cx: &Ctx, ws: &Ws, grads: &GradPtrs, lambda: f32) -> Result<()> {
    let (dev, b) = (cx.dev, &ws.b);
    let (rows, d, f) = (ws.rows, cx.shape.d_in, cx.shape.d_sae);
    let dense = b.dense.p();
    let as_stored = |p: Ptr<f32>, ld: usize| Operand { p, ld, t: false };
    let transposed = |p: Ptr<f32>, ld: usize| Operand { p, ld, t: true };
    // dW_dec (F x d) = Z^T G; relu's code sums are Z's column sums.
    gemm(dev, &Product::new((f, d, rows), transposed(dense, f), as_stored(b.g.p(), d), grads.w_dec))?;
    if cx.cfg.sparsifier.has_l1() {
        decode::col_sums_f32(dev, dense, rows, f, &b.col_part, b.l1_sums.p())?;
    }
    // dZ (B x F) = G W_dec^T, read at the kept entries.
    gemm(dev, &Product::new((rows, f, d), as_stored(b.g.p(), d), transposed(cx.w_dec(), d), dense))?;
    let c = &ws.main.b;
    K::gather_codes(dev, L::per_line(rows, 64), c.row_ptr.p(), c.idx.p(), dense, f as u32, c.dpre.p())?;
    if cx.cfg.sparsifier.has_l1() {
        super::backward::l1_terms(cx, ws, lambda)?;
    }
    // dW_enc (F x d) = dP^T xc, db_enc = colsum(dP).
    scatter(dev, ws, c.dpre.p(), f)?;
    gemm(dev, &Product::new((f, d, rows), transposed(dense, f), as_stored(b.xc.p(), d), grads.w_enc))?;
    decode::col_sums_f32(dev, dense, rows, f, &b.col_part, grads.b_enc)
}
