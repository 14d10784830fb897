//! Encode phase (kernels/encode.cu; CPU twin backend/cpu/encode.rs): upload and convert the
//! batch, centre it, and the encoder product into `pre` (cuBLAS + bias/ReLU, or the fused
//! hand-written GEMM whose epilogue also applies JumpReLU thresholds and builds batchtopk's
//! first radix histogram).

use super::backend::Ctx;
use super::device::{Dev, Ptr};
use super::kernels as K;
use super::launch as L;
use super::nvtx;
use super::workspace::Ws;
use crate::config::{EncoderKind, Precision};
use crate::data::{Batch, BatchData};
use crate::sparsify::Selection;
use anyhow::{anyhow, ensure, Result};
use cudarc::cublas::{result as blas, sys as bsys};

/// Upload `batch` into `ws.b.x` (converting f16 / bf16 on the device) and centre it into `xc`.
pub fn load_batch(cx: &Ctx, ws: &Ws, batch: &Batch) -> Result<()> {
    let d = cx.shape.d_in;
    ensure!(batch.d_in == d, "batch width {} does not match d_in {}", batch.d_in, d);
    let n = (batch.rows * d) as u64;
    let (dev, b) = (cx.dev, &ws.b);
    {
        let _r = nvtx::range("data");
        match &batch.data {
            BatchData::F32(v) => b.x.upload(v)?,
            BatchData::F16(v) => {
                b.x_raw.upload(bytemuck::cast_slice(v))?;
                K::convert_f16_to_f32(dev, L::elementwise(n), b.x_raw.p(), b.x.p(), n)?;
            }
            BatchData::Bf16(v) => {
                b.x_raw.upload(bytemuck::cast_slice(v))?;
                K::convert_bf16_to_f32(dev, L::elementwise(n), b.x_raw.p(), b.x.p(), n)?;
            }
        }
    }
    K::center(dev, L::elementwise(n), b.x.p(), cx.b_dec(), b.xc.p(), d as u32, n)
}

/// The encoder actually applied: W_enc, or (aligned training) A + alpha W_dec computed into
/// `ws.b.w_eff`.
pub fn effective_encoder(cx: &Ctx, ws: &Ws) -> Result<Ptr<f32>> {
    let (d, f) = (cx.shape.d_in, cx.shape.d_sae);
    if cx.cfg.aligned {
        K::aligned_encoder(cx.dev, L::per_line(f, d), cx.w_enc(), cx.w_dec(), ws.b.w_eff.p(), d as u32)?;
        Ok(ws.b.w_eff.p())
    } else {
        Ok(cx.w_enc())
    }
}

/// `ws.b.pre` from the centred batch (the encoder GEMM and its epilogue), for selection by
/// `sel`: what `sae bench step` times alone as the floor of a step. Returns whether the
/// encoder also built batchtopk's first radix histogram in `ws.b.hist`.
pub fn product(cx: &Ctx, ws: &Ws, sel: &Selection) -> Result<bool> {
    let _r = nvtx::range("encode");
    let (rows, d, f) = (ws.rows, cx.shape.d_in, cx.shape.d_sae);
    let (dev, b) = (cx.dev, &ws.b);
    let w = effective_encoder(cx, ws)?;
    match &dev.blas {
        Some(h) if cx.cfg.encoder == EncoderKind::Cublas => {
            gemm_cublas(dev, h.handle, cx.cfg.precision, ws, w, rows, f, d)?;
            let nf = (rows * f) as u64;
            K::bias_relu(dev, L::elementwise(nf), b.pre.p(), cx.b_enc(), f as u32, nf)?;
            Ok(false)
        }
        _ => {
            // The threshold is exact to apply here: jumprelu keeps v > 0 and v > theta, and
            // every other rule only ever keeps v > 0.
            let theta = match sel {
                Selection::JumpRelu { theta } => {
                    b.theta.upload(theta)?;
                    b.theta.p()
                }
                _ => Ptr::null(),
            };
            let batch_hist = matches!(sel, Selection::BatchTopK { .. });
            let hist = if batch_hist {
                b.hist.zero()?;
                b.hist.p()
            } else {
                Ptr::null()
            };
            let l = L::gemm_fallback(rows, f);
            K::gemm_encode_fused(
                dev,
                l,
                b.xc.p(),
                w,
                cx.b_enc(),
                theta,
                b.pre.p(),
                rows as u32,
                f as u32,
                d as u32,
                hist,
            )?;
            Ok(batch_hist)
        }
    }
}

/// pre (rows x f, row-major) = xc (rows x d) * W^T through cuBLAS; in column-major terms
/// pre^T (f x rows) = op_T(W as d x f) * xc^T (d x rows).
#[allow(clippy::too_many_arguments)]
fn gemm_cublas(
    dev: &Dev,
    h: bsys::cublasHandle_t,
    prec: Precision,
    ws: &Ws,
    w: Ptr<f32>,
    rows: usize,
    f: usize,
    d: usize,
) -> Result<()> {
    use bsys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    use bsys::cudaDataType::{CUDA_R_16BF, CUDA_R_32F};
    let b = &ws.b;
    if prec == Precision::Bf16 {
        // bf16 copies of both operands; f32 accumulation in cuBLAS.
        let (nw, nx) = ((f * d) as u64, (rows * d) as u64);
        K::convert_f32_to_bf16(dev, L::elementwise(nw), w, b.w_bf16.p(), nw)?;
        K::convert_f32_to_bf16(dev, L::elementwise(nx), b.xc.p(), b.xc_bf16.p(), nx)?;
    }
    let (m, n, k) = (f as i32, rows as i32, d as i32);
    let (alpha, beta) = (1.0f32, 0.0f32);
    let ap = &alpha as *const f32 as *const std::ffi::c_void;
    let bp = &beta as *const f32 as *const std::ffi::c_void;
    let pre = b.pre.ptr() as *mut std::ffi::c_void;
    let w = w.addr();
    let r = unsafe {
        match prec {
            Precision::F32 => blas::sgemm(
                h,
                CUBLAS_OP_T,
                CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha,
                w as *const f32,
                k,
                b.xc.ptr() as *const f32,
                k,
                &beta,
                pre as *mut f32,
                m,
            ),
            Precision::Tf32 | Precision::Bf16 => {
                // tf32: the f32 operands with tensor-core rounding; bf16: the bf16 copies.
                let (wp, xp, ty, compute) = if prec == Precision::Tf32 {
                    (w, b.xc.ptr(), CUDA_R_32F, bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32)
                } else {
                    (b.w_bf16.ptr(), b.xc_bf16.ptr(), CUDA_R_16BF, bsys::cublasComputeType_t::CUBLAS_COMPUTE_32F)
                };
                let (wp, xp) = (wp as *const std::ffi::c_void, xp as *const std::ffi::c_void);
                let algo = bsys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT;
                blas::gemm_ex(
                    h,
                    CUBLAS_OP_T,
                    CUBLAS_OP_N,
                    m,
                    n,
                    k,
                    ap,
                    wp,
                    ty,
                    k,
                    xp,
                    ty,
                    k,
                    bp,
                    pre,
                    CUDA_R_32F,
                    m,
                    compute,
                    algo,
                )
            }
        }
    };
    r.map_err(|e| anyhow!("cuBLAS encoder product ({prec:?}) failed: {e:?}"))
}
