//! Decode phase (kernels/decode.cu; CPU twin backend/cpu/decode.rs): the sparse decode, the
//! loss sums, the reconstruction gradient G, and the aux loss on the residual.

use super::backend::Ctx;
use super::device::{Dev, DevBuf, Ptr};
use super::kernels as K;
use super::launch as L;
use super::nvtx;
use super::workspace::{DevCodes, Ws};
use anyhow::Result;

/// `out = codes W_dec (+ b_dec)`.
pub fn decode_rows(
    dev: &Dev,
    codes: &DevCodes,
    w_dec: Ptr<f32>,
    b_dec: Ptr<f32>,
    d: usize,
    out: &DevBuf<f32>,
) -> Result<()> {
    let c = &codes.b;
    let rows = c.row_ptr.len() - 1;
    K::decode_rows(dev, L::per_line(rows, d), c.row_ptr.p(), c.idx.p(), c.val.p(), w_dec, b_dec, d as u32, out.p())
}

/// x_hat from the main codes, the loss sums into `acc` (SSE, total variance, cosine),
/// the residual and `G = (2/B) (x_hat - x)`.
pub fn reconstruction(cx: &Ctx, ws: &Ws) -> Result<()> {
    let _r = nvtx::range("decode");
    let (dev, b) = (cx.dev, &ws.b);
    let (rows, d) = (ws.rows, cx.shape.d_in);
    let (r32, d32) = (rows as u32, d as u32);
    let bd = (rows * d) as u64;
    b.acc.zero()?;
    decode_rows(dev, &ws.main, cx.w_dec(), cx.b_dec(), d, &b.x_hat)?;
    K::col_sums(dev, L::per_column(d), b.x.p(), r32, d32, b.colsum_x.p())?;
    K::row_stats(dev, L::per_line(rows, d), b.x.p(), b.x_hat.p(), b.colsum_x.p(), r32, d32, b.acc.p())?;
    let scale = 2.0 / rows as f32;
    K::residual_grad(dev, L::elementwise(bd), b.x.p(), b.x_hat.p(), bd, scale, b.resid.p(), b.g.p())
}

/// The aux loss `alpha ||E - E_hat||^2 / ||E - mean(E)||^2` (E = -residual) from the aux
/// codes, with its gradient w.r.t. E_hat in `ws.b.g_aux`. Returns the loss.
pub fn aux_loss(cx: &Ctx, ws: &Ws) -> Result<f64> {
    let (dev, b) = (cx.dev, &ws.b);
    let (rows, d) = (ws.rows, cx.shape.d_in);
    let (r32, d32) = (rows as u32, d as u32);
    let bd = (rows * d) as u64;
    decode_rows(dev, &ws.aux, cx.w_dec(), Ptr::null(), d, &b.e_hat)?;
    debug_assert_eq!(K::ACC_AUX_DEN, K::ACC_AUX_NUM + 1);
    b.acc.upload_at(K::ACC_AUX_NUM, &[0f64; 2])?; // each aux loss sums afresh
    K::col_sums(dev, L::per_column(d), b.resid.p(), r32, d32, b.colsum_r.p())?;
    K::aux_sums(dev, L::per_line(rows, d), b.resid.p(), b.e_hat.p(), b.colsum_r.p(), r32, d32, b.acc.p())?;
    let mut nd = [0f64; 2];
    b.acc.download_at(K::ACC_AUX_NUM, &mut nd)?;
    let (num, den) = (nd[0], nd[1]);
    if den <= 0.0 || !den.is_finite() {
        b.g_aux.zero()?;
        return Ok(0.0);
    }
    let alpha = cx.cfg.aux_alpha;
    let c = (2.0 * alpha / den) as f32;
    K::aux_grad(dev, L::elementwise(bd), b.resid.p(), b.e_hat.p(), c, bd, b.g_aux.p())?;
    Ok(alpha * num / den)
}
