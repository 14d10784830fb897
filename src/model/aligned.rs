//! Aligned training (Brzozowski): the encoder actually used is
//! `W_enc_i = A_i + alpha_i W_dec_i`, `alpha_i = (1 - A_i . W_dec_i) / ||W_dec_i||^2`,
//! so that `W_enc_i . W_dec_i = 1` for every latent. A's last column is held at 0, which removes
//! the one direction per row along which A can move without changing W_enc.

use rayon::prelude::*;

/// Compute the effective encoder from A and W_dec (both F x d, row-major).
pub fn effective_encoder(a: &[f32], w_dec: &[f32], d: usize, out: &mut [f32]) {
    out.par_chunks_mut(d).zip(a.par_chunks(d).zip(w_dec.par_chunks(d))).for_each(|(o, (ai, wi))| {
        let (aw, ww) = dot2(ai, wi);
        let alpha = if ww > 0.0 { (1.0 - aw) / ww } else { 0.0 };
        for j in 0..d {
            o[j] = ai[j] + alpha * wi[j];
        }
    });
}

/// Pull a gradient `g` w.r.t. the effective encoder row back to A and W_dec.
///
/// With `s = ||w||^2`, `alpha = (1 - a.w)/s`:
/// `dL/dA = g - (g.w/s) w` (last column zeroed) and
/// `dL/dw += alpha g - (g.w/s) (a + 2 alpha w)`.
/// Rows with `g = 0` contribute nothing, so callers pass only touched rows.
pub fn backprop_row(a: &[f32], w: &[f32], g: &[f32], da: &mut [f32], dw: &mut [f32]) {
    let d = a.len();
    let (aw, ww) = dot2(a, w);
    if ww <= 0.0 {
        da.copy_from_slice(g);
        da[d - 1] = 0.0;
        return;
    }
    let alpha = (1.0 - aw) / ww;
    let gw: f32 = g.iter().zip(w).map(|(x, y)| x * y).sum();
    let c = gw / ww;
    for j in 0..d {
        da[j] = g[j] - c * w[j];
        dw[j] += alpha * g[j] - c * (a[j] + 2.0 * alpha * w[j]);
    }
    da[d - 1] = 0.0;
}

fn dot2(a: &[f32], w: &[f32]) -> (f32, f32) {
    let mut aw = 0.0f32;
    let mut ww = 0.0f32;
    for (x, y) in a.iter().zip(w) {
        aw += x * y;
        ww += y * y;
    }
    (aw, ww)
}
