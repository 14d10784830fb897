//! Feature-choice budgets: uniform (WTA paper) and Zipf (MC/FC paper, Algorithm 1), and the
//! "dying latent" rule of aux_zipf.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Per-latent budgets for feature choice (`wta`, `hybrid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// m_j = max(1, floor(B * rate)) for every latent.
    Uniform,
    /// Zipf budgets by running-density rank (MC/FC paper, Algorithm 1).
    Zipf,
}

/// Latent order by running density, most frequent first (ties: lower index first; a NaN
/// density ranks as the lowest, so the order is total and the sort cannot panic).
pub fn density_ranks(density: &[f32]) -> Vec<usize> {
    // `+ 0.0` makes -0.0 tie with 0.0.
    let d = |i: usize| if density[i].is_nan() { f32::NEG_INFINITY } else { density[i] + 0.0 };
    let mut order: Vec<usize> = (0..density.len()).collect();
    order.sort_by(|&a, &b| d(b).total_cmp(&d(a)).then(a.cmp(&b)));
    order
}

/// Zipf budgets: with latents ranked by running density (rank 1 = most frequent),
/// `N = B*k / sum_{i=1..F} (i+beta)^-alpha`, `m_(i) = min(floor(N / (i+beta)^alpha), m_max)`.
pub fn zipf_budgets(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64, m_max: usize) -> Vec<usize> {
    let f = density.len();
    let z: f64 = (1..=f).map(|i| (i as f64 + beta).powf(-alpha)).sum();
    let n = (batch * k) as f64 / z;
    let mut m = vec![0usize; f];
    for (r, &latent) in density_ranks(density).iter().enumerate() {
        let i = (r + 1) as f64;
        m[latent] = ((n / (i + beta).powf(alpha)).floor() as usize).min(m_max);
    }
    m
}

/// Zipf-predicted firing density of each latent (its budget divided by the batch).
pub fn zipf_predicted_density(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64) -> Vec<f32> {
    zipf_budgets(density, batch, k, alpha, beta, usize::MAX).iter().map(|&m| m as f32 / batch as f32).collect()
}

/// aux_zipf's dying latents: bottom quarter by running density AND density < 0.6 x the Zipf
/// prediction for its rank.
pub fn dying_latents(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64) -> Vec<bool> {
    let f = density.len();
    let order = density_ranks(density);
    let predicted = zipf_predicted_density(density, batch, k, alpha, beta);
    let mut dying = vec![false; f];
    let bottom_start = f - f / 4;
    for &latent in &order[bottom_start..] {
        dying[latent] = density[latent] < 0.6 * predicted[latent];
    }
    dying
}

/// A running density EMA (started at 0) with its bias removed: `density / (1 - decay^step)`.
pub fn bias_corrected(density: &[f32], step: u64, decay: f64) -> Vec<f32> {
    let c = 1.0 - (decay as f32).powi(step.min(i32::MAX as u64) as i32);
    if c <= 0.0 {
        return density.to_vec();
    }
    density.iter().map(|d| d / c).collect()
}
