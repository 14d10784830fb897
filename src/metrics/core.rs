//! SAEBench "core" metrics over a held-out set (SPEC "Metrics").

use crate::backend::cpu::decode::residual_stats;
use crate::backend::{Backend, InferMode};
use crate::data::Batch;
use anyhow::Result;
use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CoreMetrics {
    pub tokens: usize,
    pub l0: f64,
    pub l1: f64,
    /// mean_b ||x_b - x_hat_b||^2 / d
    pub mse: f64,
    /// sum ||x - x_hat||^2 / sum ||x - mean(X)||^2 over the whole set
    pub nmse: f64,
    pub explained_variance: f64,
    pub cosine: f64,
    pub frac_alive: f64,
    pub dead: usize,
    /// Density summary: fractions of latents firing on more than 1% / 10% of tokens, and the
    /// median log10 density of the alive latents.
    pub frac_density_above_1pct: f64,
    pub frac_density_above_10pct: f64,
    pub median_log10_density: f64,
    /// Fraction of tokens on which each latent fired.
    #[serde(skip)]
    pub density: Vec<f64>,
}

/// Run `backend` over `batches` with `mode` and aggregate. The variance term uses the mean of
/// the whole set (not per batch).
pub fn core_metrics(backend: &mut dyn Backend, batches: &[Batch], mode: InferMode) -> Result<CoreMetrics> {
    let mut tokens = 0usize;
    let (mut nnz, mut l1, mut sse, mut cos) = (0usize, 0f64, 0f64, 0f64);
    let mut fired: Vec<u64> = vec![];
    let d = batches.first().map(|b| b.d_in).unwrap_or(1);
    // Whole-set mean, then sum of squared deviations from it.
    let mut mean = vec![0f64; d];
    for b in batches {
        for row in b.to_f32().chunks(d) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += *v as f64;
            }
        }
        tokens += b.rows;
    }
    mean.iter_mut().for_each(|m| *m /= tokens.max(1) as f64);
    let mut total_var = 0f64;
    for b in batches {
        let x = b.to_f32();
        for row in x.chunks(d) {
            total_var += row.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>();
        }
        let inf = backend.infer(b, mode)?;
        if fired.is_empty() {
            fired = vec![0; inf.codes.cols];
        }
        for &i in &inf.codes.idx {
            fired[i as usize] += 1;
        }
        nnz += inf.codes.nnz();
        l1 += inf.codes.val.iter().map(|v| *v as f64).sum::<f64>();
        let s = residual_stats(&x, &inf.x_hat, d);
        sse += s.sse;
        cos += s.cos_sum;
    }
    let t = tokens.max(1) as f64;
    let nmse = if total_var > 0.0 { sse / total_var } else { 0.0 };
    let alive = fired.iter().filter(|&&c| c > 0).count();
    let density: Vec<f64> = fired.iter().map(|&c| c as f64 / t).collect();
    Ok(CoreMetrics {
        tokens,
        l0: nnz as f64 / t,
        l1: l1 / t,
        mse: sse / t / d as f64,
        nmse,
        explained_variance: 1.0 - nmse,
        cosine: cos / t,
        frac_alive: alive as f64 / fired.len().max(1) as f64,
        dead: fired.len() - alive,
        frac_density_above_1pct: frac_above(&density, 0.01),
        frac_density_above_10pct: frac_above(&density, 0.1),
        median_log10_density: crate::util::stats::median(
            &density.iter().filter(|&&p| p > 0.0).map(|p| p.log10()).collect::<Vec<_>>(),
        ),
        density,
    })
}

fn frac_above(density: &[f64], p: f64) -> f64 {
    density.iter().filter(|&&x| x > p).count() as f64 / density.len().max(1) as f64
}
