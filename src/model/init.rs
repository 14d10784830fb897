//! Initialisation (SPEC "Parameters"): tied weights, zero encoder bias, decoder bias from the
//! first batch (mean or geometric median).

use super::{Params, Shape};
use crate::config::BDecInit;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// `W_dec` rows from a fixed-seed normal, normalised to unit norm; `W_enc = W_dec`; `b_enc = 0`.
/// With aligned training `W_enc` holds A: the tied value satisfies the constraint already
/// (a.w = 1 gives alpha = 0), and A's last column is zeroed (its parametrisation fixes it).
pub fn tied(shape: Shape, seed: u64, aligned: bool) -> Params {
    let (f, d) = (shape.d_sae, shape.d_in);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5AE_1417);
    let mut p = Params::zeros(shape);
    let parts = p.parts_mut();
    for row in parts.w_dec.chunks_mut(d) {
        for v in row.iter_mut() {
            *v = StandardNormal.sample(&mut rng);
        }
        normalize(row);
    }
    parts.w_enc.copy_from_slice(parts.w_dec);
    if aligned {
        // A = W_dec with the last column removed still maps to W_enc_i = W_dec_i + alpha W_dec_i
        // with alpha = (1 - a.w)/1; keep it simple: A_i = W_dec_i - w_last * e_last.
        for row in parts.w_enc.chunks_mut(d) {
            row[d - 1] = 0.0;
        }
    }
    let _ = f;
    p
}

pub fn normalize(row: &mut [f32]) {
    let n = row.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
    if n > 0.0 {
        let inv = (1.0 / n) as f32;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Decoder bias from the first batch `x` (rows x d).
pub fn b_dec_from_batch(x: &[f32], d: usize, how: BDecInit) -> Vec<f32> {
    match how {
        BDecInit::Mean => mean_rows(x, d),
        BDecInit::GeometricMedian => geometric_median(x, d, 100, 1e-6),
    }
}

pub fn mean_rows(x: &[f32], d: usize) -> Vec<f32> {
    let n = (x.len() / d).max(1);
    let mut acc = vec![0f64; d];
    for row in x.chunks(d) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += *v as f64;
        }
    }
    acc.iter().map(|a| (a / n as f64) as f32).collect()
}

/// Weiszfeld iterations, started from the mean, in f64.
pub fn geometric_median(x: &[f32], d: usize, iters: usize, tol: f64) -> Vec<f32> {
    let n = x.len() / d;
    let mut m: Vec<f64> = mean_rows(x, d).iter().map(|v| *v as f64).collect();
    for _ in 0..iters {
        let mut num = vec![0f64; d];
        let mut den = 0f64;
        for row in x.chunks(d).take(n) {
            let dist = row.iter().zip(&m).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt();
            let w = 1.0 / dist.max(1e-12);
            den += w;
            for (acc, v) in num.iter_mut().zip(row) {
                *acc += w * *v as f64;
            }
        }
        let next: Vec<f64> = num.iter().map(|v| v / den).collect();
        let shift = next.iter().zip(&m).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
        let scale = next.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        m = next;
        if shift / scale < tol {
            break;
        }
    }
    m.iter().map(|v| *v as f32).collect()
}
