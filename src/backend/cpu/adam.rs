//! Adam (with bias correction, as torch.optim.Adam) over the flat parameter buffer, followed by
//! the decoder's unit-norm renormalisation (SPEC "Decoder constraint").

use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AdamHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// 1-based step number (for bias correction).
    pub t: u64,
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
}

#[inline]
fn update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamHyper, step: f32, eps: f32) {
    let (b1, b2) = (h.beta1, h.beta2);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let mi = b1 * *m + (1.0 - b1) * g;
        let vi = b2 * *v + (1.0 - b2) * g * g;
        *m = mi;
        *v = vi;
        *p -= step * mi / (vi.sqrt() + eps);
    }
}

/// `p -= lr * m_hat / (sqrt(v_hat) + eps)` for every element.
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
