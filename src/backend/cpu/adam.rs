//! Adam (with bias correction, as torch.optim.Adam) over the flat parameter buffer, with
//! AdamW's decoupled weight decay and a gradient scale (gradient-norm clipping, clip.rs) folded
//! into the same pass, followed by the decoder's unit-norm renormalisation (SPEC "Decoder
//! constraint").

use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based step number (for bias correction).
    pub t: u64,
    /// AdamW's decay factor `1 - lr * weight_decay` (1: none), applied to p before the update.
    pub decay: f32,
    /// Factor on every gradient element (the clipping coefficient; 1: none).
    pub gscale: f32,
}

const CHUNK: usize = 1 << 14;

impl AdamHyper {
    /// Bias corrections folded into one step size and a rescaled epsilon:
    /// `lr (m/bc1) / (sqrt(v/bc2) + eps) = (lr sqrt(bc2)/bc1) m / (sqrt(v) + eps sqrt(bc2))`.
    fn folded(&self) -> (f32, f32) {
        let bc1 = 1.0 - (self.beta1 as f64).powf(self.t as f64);
        let bc2 = 1.0 - (self.beta2 as f64).powf(self.t as f64);
        ((self.lr as f64 * bc2.sqrt() / bc1) as f32, (self.eps as f64 * bc2.sqrt()) as f32)
    }

    /// The same step without weight decay (the biases: torch users exclude them from decay, and
    /// a decayed b_dec would pull the input centre towards 0).
    pub fn without_decay(self) -> Self {
        Self { decay: 1.0, ..self }
    }
}

/// AdamW's factor `1 - lr * wd` in f32, computed as torch.optim.AdamW does (`param.mul_(1 - lr *
/// weight_decay)`, the scalar in double, the product in the tensor's f32); both backends use it.
pub fn decay_factor(lr: f32, weight_decay: f64) -> f32 {
    (1.0 - lr as f64 * weight_decay) as f32
}

#[inline]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamHyper, step: f32, eps: f32) {
    let (b1, b2, decay, gs) = (h.beta1, h.beta2, h.decay, h.gscale);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        // torch's order: step += 1, p *= 1 - lr wd, then the moments, then p -= step m / (sqrt v + eps).
        // With decay = gscale = 1 both products are exact, so plain Adam is unchanged bit for bit.
        let g = g * gs;
        let mi = b1 * *m + (1.0 - b1) * g;
        let vi = b2 * *v + (1.0 - b2) * g * g;
        *m = mi;
        *v = vi;
        *p = *p * decay - step * mi / (vi.sqrt() + eps);
    }
}

/// `p <- p * decay - lr * m_hat / (sqrt(v_hat) + eps)` for every element (the moments of
/// `gscale * g`).
pub fn adam_step(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: AdamHyper) {
    let (step, eps) = h.folded();
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| update(p, g, m, v, &h, step, eps));
}

/// Adam on the rows of a decoder (F x d) followed, row by row while it is in cache, by the
/// unit-norm renormalisation: the same result as `adam_step` then normalising every row.
pub fn adam_step_renorm_rows(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], d: usize, h: AdamHyper) {
    let (step, eps) = h.folded();
    p.par_chunks_mut(d).zip(g.par_chunks(d)).zip(m.par_chunks_mut(d).zip(v.par_chunks_mut(d))).for_each(
        |((p, g), (m, v))| {
            update(p, g, m, v, &h, step, eps);
            crate::model::init::normalize(p);
        },
    );
}

/// Remove from `g` its component along `w`: `g <- g - (g.w / w.w) w`.
pub fn project_out(g: &mut [f32], w: &[f32]) {
    let gw: f32 = super::linalg::dot(g, w);
    let ww: f32 = super::linalg::dot(w, w);
    if ww > 0.0 {
        let c = gw / ww;
        for (gi, wi) in g.iter_mut().zip(w) {
            *gi -= c * wi;
        }
    }
}
