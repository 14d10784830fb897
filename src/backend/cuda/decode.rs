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

/// Column sums of a `rows x d` matrix in f64, `out[j] = sum_b x[b][j]`: row parts summed side by
/// side (col_partials), then added in order, so the same every run.
pub fn col_sums(dev: &Dev, x: Ptr<f32>, rows: usize, d: usize, part: &DevBuf<f64>, out: Ptr<f64>) -> Result<()> {
    let parts = col_partials(dev, x, Ptr::null(), rows, d, part)?;
    K::col_sums_finish(dev, L::per_column(d), part.p(), parts, d as u32, out, Ptr::null())
}

/// [`col_sums`] rounded to f32 (the dense path's per-latent sums: `db_enc`, relu's code sums).
pub fn col_sums_f32(dev: &Dev, x: Ptr<f32>, rows: usize, d: usize, part: &DevBuf<f64>, out: Ptr<f32>) -> Result<()> {
    let parts = col_partials(dev, x, Ptr::null(), rows, d, part)?;
    K::col_sums_finish(dev, L::per_column(d), part.p(), parts, d as u32, Ptr::null(), out)
}

/// The row parts of `sum_b w[b] x[b][j]` (w null: 1) into `part` (`parts x d`); returns how many
/// parts there are.
pub fn col_partials(dev: &Dev, x: Ptr<f32>, w: Ptr<f32>, rows: usize, d: usize, part: &DevBuf<f64>) -> Result<u32> {
    let (l, parts, per_part) = L::col_partials(rows, d);
    assert!(part.len() >= parts as usize * d, "column-sum parts buffer of {} for {parts} x {d}", part.len());
    K::col_partials(dev, l, x, w, rows as u32, d as u32, per_part, part.p())?;
    Ok(parts)
}

/// x_hat from the main codes (as gathers, or with `dense` as a GEMM: dense.rs), the loss sums
/// into `acc` (SSE, total variance, cosine), the residual and `G = (2/B) (x_hat - x)`.
pub fn reconstruction(cx: &Ctx, ws: &Ws, dense: bool) -> Result<()> {
    let _r = nvtx::range("decode");
    let (dev, b) = (cx.dev, &ws.b);
    let (rows, d) = (ws.rows, cx.shape.d_in);
    let (r32, d32) = (rows as u32, d as u32);
    let bd = (rows * d) as u64;
    b.acc.zero()?;
    match dense {
        true => super::dense::decode(cx, ws)?,
        false => decode_rows(dev, &ws.main, cx.w_dec(), cx.b_dec(), d, &b.x_hat)?,
    }
    col_sums(dev, b.x.p(), rows, d, &b.col_part, b.colsum_x.p())?;
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
    col_sums(dev, b.resid.p(), rows, d, &b.col_part, b.colsum_r.p())?;
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
