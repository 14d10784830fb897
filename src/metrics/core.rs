//! SAEBench "core" metrics over a held-out set (SPEC "Metrics").

use super::recon::{set_mean, ReconAccumulator};
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

/// Run `backend` over `batches` with `mode` and aggregate with [`ReconAccumulator`] (the same
/// definitions as `sae eval`). The variance term uses the mean of the whole set (not per batch).
pub fn core_metrics(backend: &mut dyn Backend, batches: &[Batch], mode: InferMode) -> Result<CoreMetrics> {
    let d = batches.first().map(|b| b.d_in).unwrap_or(1);
    let xs: Vec<_> = batches.iter().map(|b| b.to_f32()).collect();
    let mean = set_mean(xs.iter().map(|x| x.as_ref()), d);
    let mut acc: Option<ReconAccumulator> = None;
    for (b, x) in batches.iter().zip(&xs) {
        let inf = backend.infer(b, mode)?;
        acc.get_or_insert_with(|| ReconAccumulator::new(mean.clone(), inf.codes.cols)).add(x, &inf.codes, &inf.x_hat);
    }
    let r = acc.unwrap_or_else(|| ReconAccumulator::new(mean, 0)).finish();
    let median_log10_density =
        crate::util::stats::median(&r.density.iter().filter(|&&p| p > 0.0).map(|p| p.log10()).collect::<Vec<_>>());
    Ok(CoreMetrics {
        tokens: r.tokens,
        l0: r.l0,
        l1: r.l1,
        mse: r.mse,
        nmse: r.nmse,
        explained_variance: r.explained_variance,
        cosine: r.cosine,
        frac_alive: r.frac_alive,
        dead: r.dead,
        frac_density_above_1pct: r.frac_density_above_1pct,
        frac_density_above_10pct: r.frac_density_above_10pct,
        median_log10_density,
        density: r.density,
    })
}
