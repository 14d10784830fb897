//! Feature-choice budgets: uniform (WTA paper) and Zipf (MC/FC paper, Algorithm 1), and the
//! "dying latent" rule of aux_zipf.

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// How Zipf budgets are rounded to whole tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ZipfRounding {
    /// Systematic (stochastic) rounding of the continuous budgets, with the cap water-filled:
    /// every batch spends exactly B*k (or F*m_max when that is less) and every latent's
    /// expected budget is its continuous Zipf budget, so none is starved. Seeded by (seed,
    /// step): deterministic, and a resumed run draws the same budgets.
    Systematic,
    /// The MC/FC paper's Algorithm 1 literally: `floor`. Low ranks get m = 0 and the batch
    /// under-spends B*k.
    Floor,
}

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

/// Continuous Zipf budgets by latent: `x_(i) = min(N / (i+beta)^alpha, m_max)`, with N chosen so
/// that they sum to `min(B*k, F*m_max)` (water-filling: the mass the cap removes from the top
/// ranks goes to the others, in proportion to their Zipf weight).
pub fn zipf_continuous(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64, m_max: usize) -> Vec<f64> {
    let f = density.len();
    let w: Vec<f64> = (1..=f).map(|i| (i as f64 + beta).powf(-alpha)).collect();
    let cap = m_max as f64;
    let target = ((batch * k) as f64).min(cap * f as f64);
    let spent = |n: f64| w.iter().map(|&wi| (n * wi).min(cap)).sum::<f64>();
    // spent(n) is continuous and non-decreasing in n: bisect for spent(n) = target.
    let mut hi = target / w.iter().sum::<f64>();
    if spent(hi) < target {
        let mut lo = hi;
        while spent(hi) < target * (1.0 - 1e-12) {
            lo = hi;
            hi *= 2.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if spent(mid) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let mut x = vec![0f64; f];
    for (r, &latent) in density_ranks(density).iter().enumerate() {
        x[latent] = (hi * w[r]).min(cap);
    }
    x
}

/// Systematic rounding of `x` (non-negative, summing to an integer up to rounding): with one
/// uniform offset `u` in [0, 1), `m_j = floor(C_j + u) - floor(C_{j-1} + u)` over the cumulative
/// sums C. Each m_j is floor(x_j) or ceil(x_j), E[m_j] = x_j, and the m_j sum to round(sum x).
pub fn systematic_round(x: &[f64], u: f64) -> Vec<usize> {
    let total = x.iter().sum::<f64>().round();
    let mut c = 0f64;
    let mut prev = u.floor();
    let mut out = Vec::with_capacity(x.len());
    for (j, &xj) in x.iter().enumerate() {
        c += xj;
        // The last cumulative sum is exactly the rounded total, so the budgets add up to it.
        let cj = if j + 1 == x.len() { total } else { c };
        let now = (cj + u).floor();
        out.push((now - prev).max(0.0) as usize);
        prev = now;
    }
    out
}

/// Zipf budgets that spend exactly `min(B*k, F*m_max)`, systematic rounding with offset `u`.
pub fn zipf_budgets_exact(
    density: &[f32],
    batch: usize,
    k: usize,
    alpha: f64,
    beta: f64,
    m_max: usize,
    u: f64,
) -> Vec<usize> {
    let x = zipf_continuous(density, batch, k, alpha, beta, m_max);
    systematic_round(&x, u).into_iter().map(|m| m.min(m_max)).collect()
}

/// The uniform offset of step `step` of a run seeded `seed` (splitmix64 of both): the same
/// budgets on every backend and after a resume.
pub fn rounding_offset(seed: u64, step: u64) -> f64 {
    let mut z = seed ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Zipf-predicted firing density of each latent (its floored budget divided by the batch:
/// the literal Algorithm 1; `zipf_expected_density` is the continuous one).
pub fn zipf_predicted_density(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64) -> Vec<f32> {
    zipf_budgets(density, batch, k, alpha, beta, usize::MAX).iter().map(|&m| m as f32 / batch as f32).collect()
}

/// The continuous Zipf density of each latent's rank: `N / (i+beta)^alpha / B` with
/// `N = B*k / sum_{i=1..F} (i+beta)^-alpha` (no floor, no cap).
pub fn zipf_expected_density(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64) -> Vec<f64> {
    zipf_continuous(density, batch, k, alpha, beta, usize::MAX).into_iter().map(|x| x / batch as f64).collect()
}

/// aux_zipf's dying latents, the MC/FC paper's Definition 3.1: latent i is dying when (1) it is
/// in the bottom quarter by running density, (2) its density is below 0.6 x the continuous Zipf
/// density of its rank, and (3) every lower-ranked latent is dying too. So the dying set is the
/// longest run of latents from the lowest rank up that satisfy (1) and (2).
pub fn dying_latents(density: &[f32], batch: usize, k: usize, alpha: f64, beta: f64) -> Vec<bool> {
    let f = density.len();
    let order = density_ranks(density);
    let expected = zipf_expected_density(density, batch, k, alpha, beta);
    let mut dying = vec![false; f];
    let bottom_start = f - f / 4;
    for &latent in order[bottom_start..].iter().rev() {
        if (density[latent] as f64) < 0.6 * expected[latent] {
            dying[latent] = true;
        } else {
            break; // condition 3: a live latent ends the run
        }
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
