//! Gradient-norm clipping as torch.nn.utils.clip_grad_norm_: the gradient of every parameter
//! (after the decoder projection) is one vector g; when ||g||_2 exceeds C it is scaled by
//! `C / (||g|| + 1e-6)`, else left alone. The sum of squares is taken in f64 (CUDA twin:
//! kernels/adam.cu `sum_sq`, `sum_sq_dec_rows`, and `clip_coef`, which applies the same formula).

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `sum g_i^2` in f64, chunk by chunk and then in chunk order, so that the result does not
/// depend on the thread count.
pub fn sum_sq(g: &[f32]) -> f64 {
    let parts: Vec<f64> = g.par_chunks(CHUNK).map(|c| c.iter().map(|&v| v as f64 * v as f64).sum()).collect();
    parts.iter().sum()
}

/// The factor the gradient is multiplied by: `min(1, C / (sqrt(sum_sq) + 1e-6))` (torch's 1e-6
/// keeps a zero gradient finite), in f32 as torch applies it. `clip <= 0`: off (1).
pub fn coefficient(sum_sq: f64, clip: f32) -> f32 {
    if clip <= 0.0 {
        return 1.0;
    }
    let c = clip as f64 / (sum_sq.sqrt() + 1e-6);
    if c < 1.0 {
        c as f32
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_only_above_the_bound() {
        let g = [3.0f32, 4.0];
        assert_eq!(sum_sq(&g), 25.0);
        assert_eq!(coefficient(25.0, 10.0), 1.0);
        assert!((coefficient(25.0, 1.0) - 0.2).abs() < 1e-7);
        assert_eq!(coefficient(25.0, 0.0), 1.0);
    }
}
