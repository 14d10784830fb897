//! Ground-truth recovery on synthetic data: for each true direction, the maximum cosine
//! similarity to any learned decoder row. Reported: the mean (MMCS) and the fraction above 0.9.

use crate::backend::cpu::gemm::abt;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Recovery {
    pub mmcs: f64,
    pub frac_above_0_9: f64,
    pub n_true: usize,
}

/// `truth`: N x d, `w_dec`: F x d (rows need not be normalised).
pub fn recovery(truth: &[f32], w_dec: &[f32], d: usize) -> Recovery {
    let t = unit_rows(truth, d);
    let w = unit_rows(w_dec, d);
    let (n, f) = (t.len() / d, w.len() / d);
    let mut cos = vec![0f32; n * f];
    abt(&t, &w, n, f, d, &mut cos, false);
    let best: Vec<f64> =
        cos.chunks(f.max(1)).map(|r| r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64).collect();
    let mmcs = best.iter().sum::<f64>() / n.max(1) as f64;
    let frac = best.iter().filter(|&&c| c > 0.9).count() as f64 / n.max(1) as f64;
    Recovery { mmcs, frac_above_0_9: frac, n_true: n }
}

fn unit_rows(m: &[f32], d: usize) -> Vec<f32> {
    let mut out = m.to_vec();
    out.chunks_mut(d).for_each(crate::model::init::normalize);
    out
}
