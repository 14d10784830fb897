//! Optimiser phase (kernels/adam.cu; CPU twins backend/cpu/adam.rs, clip.rs): Adam over the flat
//! parameters with the decoder rows projected and renormalised, AdamW's decay on W_enc and
//! W_dec, gradient-norm clipping, and the per-latent statistics (firing counts, smallest kept
//! value) the host bookkeeping needs.

use super::device::{Dev, DevBuf, Ptr};
use super::kernels as K;
use super::launch as L;
use super::workspace::Ws;
use crate::model::Shape;
use anyhow::Result;

/// Adam's hyper-parameters for one step, bias corrections folded in.
#[derive(Clone, Copy, Debug)]
pub struct Folded {
    pub b1: f32,
    pub b2: f32,
    pub step_size: f32,
    pub eps: f32,
    /// AdamW's factor 1 - lr * wd for W_enc and W_dec (1: plain Adam).
    pub decay: f32,
}

impl Folded {
    /// Same f32 -> f64 path as cpu::adam, so both backends see identical step sizes.
    pub fn new(lr: f32, beta1: f64, beta2: f64, eps: f64, t: u64, weight_decay: f64) -> Self {
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let bc1 = 1.0 - (b1 as f64).powf(t as f64);
        let bc2 = 1.0 - (b2 as f64).powf(t as f64);
        let step_size = (lr as f64 * bc2.sqrt() / bc1) as f32;
        let eps = (eps as f32 as f64 * bc2.sqrt()) as f32;
        Self { b1, b2, step_size, eps, decay: crate::backend::cpu::adam::decay_factor(lr, weight_decay) }
    }
}

/// Gradient-norm clipping for one step: the bound and the accumulator slot the gradient's
/// squared norm is summed into (read by the Adam kernels, so the host never waits for it).
#[derive(Clone, Copy)]
pub struct Clip {
    pub bound: f32,
    pub gsq: Ptr<f64>,
}

/// The optimiser state on the device: parameters, gradients and the two moments, each one flat
/// allocation in the `Shape` layout.
pub struct DevState<'a> {
    pub params: &'a DevBuf<f32>,
    pub grads: &'a DevBuf<f32>,
    pub m: &'a DevBuf<f32>,
    pub v: &'a DevBuf<f32>,
}

/// One Adam step: W_enc and W_dec with AdamW's decay, b_enc and b_dec without; W_dec rows fused
/// with their projection and renormalisation (`unit_decoder`), or plainly (free decoder norms).
/// With `clip`, the gradient's squared norm (of the projected decoder rows) is summed first.
pub fn step(dev: &Dev, shape: Shape, s: &DevState, h: Folded, unit_decoder: bool, clip: Option<Clip>) -> Result<()> {
    let [_, o_benc, o_wdec, o_bdec, end] = shape.offsets();
    let (d, f) = (shape.d_in, shape.d_sae);
    let (bound, gsq) = match clip {
        Some(c) => (c.bound, c.gsq),
        None => (0.0, Ptr::null()),
    };
    if clip.is_some() {
        let sq = |off: usize, n: usize| K::sum_sq(dev, L::grid_stride(n as u64), s.grads.at(off), n as u64, gsq);
        sq(0, o_wdec)?;
        sq(o_bdec, d)?;
        if unit_decoder {
            K::sum_sq_dec_rows(dev, L::per_line(f, d), s.params.at(o_wdec), s.grads.at(o_wdec), d as u32, gsq)?;
        } else {
            sq(o_wdec, o_bdec - o_wdec)?;
        }
    }
    let flat = |off: usize, n: usize, decay: f32| {
        let (p, g, m, v) = (s.params.at(off), s.grads.at(off), s.m.at(off), s.v.at(off));
        let (b1, b2, st, eps) = (h.b1, h.b2, h.step_size, h.eps);
        K::adam_flat(dev, L::elementwise(n as u64), p, g, m, v, n as u64, b1, b2, st, eps, decay, gsq, bound)
    };
    flat(0, o_benc, h.decay)?;
    flat(o_benc, f, 1.0)?;
    if unit_decoder {
        let (p, g, m, v) = (s.params.at(o_wdec), s.grads.at(o_wdec), s.m.at(o_wdec), s.v.at(o_wdec));
        let (b1, b2, st, eps) = (h.b1, h.b2, h.step_size, h.eps);
        K::adam_dec_rows(dev, L::per_line(f, d), p, g, m, v, d as u32, b1, b2, st, eps, h.decay, gsq, bound)?;
    } else {
        flat(o_wdec, o_bdec - o_wdec, h.decay)?;
    }
    flat(o_bdec, end - o_bdec, 1.0)
}

/// Per latent, the number of kept entries and the bits of the smallest kept value
/// (`u32::MAX`: none kept) of the main codes.
pub fn latent_stats(dev: &Dev, ws: &Ws) -> Result<(Vec<u32>, Vec<u32>)> {
    let (b, c) = (&ws.b, &ws.main.b);
    let f = ws.dims.f;
    let nnz = ws.main.nnz as u32;
    b.lat_counts.zero()?;
    b.lat_min.fill_bytes(0xff, 4 * f)?;
    K::latent_stats(dev, L::elementwise(nnz as u64), c.idx.p(), c.val.p(), nnz, b.lat_counts.p(), b.lat_min.p())?;
    Ok((b.lat_counts.to_vec(f)?, b.lat_min.to_vec(f)?))
}
