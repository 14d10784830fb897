//! Inference thresholds (SPEC "Thresholds"): what one batch measures, and the EMA update.

use crate::sparse::SparseCodes;

/// The smallest kept activation of the batch (batchtopk / mutual_choice).
pub fn batch_min(codes: &SparseCodes) -> Option<f32> {
    codes.val.iter().copied().reduce(f32::min)
}

/// Per latent, the smallest kept activation (wta: its m_j-th largest, or its smallest positive
/// one when fewer than m_j were positive; None when it kept nothing).
pub fn per_latent_min(codes: &SparseCodes) -> Vec<Option<f32>> {
    let mut out: Vec<Option<f32>> = vec![None; codes.cols];
    for (&i, &v) in codes.idx.iter().zip(&codes.val) {
        let slot = &mut out[i as usize];
        *slot = Some(slot.map_or(v, |s| s.min(v)));
    }
    out
}

/// `theta <- decay * theta + (1 - decay) * t`, seeded with the first measurement.
pub fn ema_update(theta: &mut f32, set: &mut bool, t: f32, decay: f32) {
    if *set {
        *theta = decay * *theta + (1.0 - decay) * t;
    } else {
        *theta = t;
        *set = true;
    }
}
