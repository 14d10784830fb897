//! Reconstruction and sparsity metrics of an SAE on held-out activations (SAEBench "core"
//! definitions, SPEC "Metrics"), accumulated batch by batch, and the weight-only metrics
//! (alignment score, encoder/decoder cosine).
//!
//! Explained variance comes in two forms:
//! - `explained_variance` (corrected): `1 - sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean(X)||^2`,
//!   with the mean taken over the whole evaluation set;
//! - `explained_variance_legacy` (SAEBench's `explained_variance_legacy`, its "old, incorrect,
//!   formula"): the mean over tokens of `1 - ||x_b - x_hat_b||^2 / ||x_b - mean(batch)||^2`, the mean
//!   taken per evaluation batch (SAEBench: per batch of prompts). Tokens equal to their batch mean
//!   are skipped (the ratio is undefined there).

use crate::sparse::SparseCodes;
use serde::Serialize;

/// Density thresholds reported as "fraction of latents above".
pub const DENSITY_HIGH: [f64; 2] = [0.01, 0.1];

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReconMetrics {
    pub tokens: usize,
    pub d_in: usize,
    pub d_sae: usize,
    /// Mean nonzeros per token.
    pub l0: f64,
    /// Mean sum of activations per token.
    pub l1: f64,
    /// `mean_b ||x_b - x_hat_b||^2 / d`
    pub mse: f64,
    /// `sum_b ||x_b - x_hat_b||^2 / sum_b ||x_b - mean(X)||^2`
    pub nmse: f64,
    /// `1 - nmse` (corrected form).
    pub explained_variance: f64,
    /// SAEBench legacy per-token form (see the module docs).
    pub explained_variance_legacy: f64,
    /// Mean over tokens of cos(x_b, x_hat_b) (0 where either is the zero vector).
    pub cosine: f64,
    /// Mean over tokens of ||x_hat_b|| / ||x_b|| (SAEBench `l2_ratio`).
    pub l2_ratio: f64,
    /// `mean ||x_hat||^2 / mean <x, x_hat>` (SAEBench `relative_reconstruction_bias`).
    pub relative_reconstruction_bias: f64,
    /// Latents that fired on no evaluation token.
    pub dead: usize,
    pub alive: usize,
    pub frac_dead: f64,
    pub frac_alive: f64,
    /// Fraction of latents whose density exceeds 1%.
    pub frac_density_above_1pct: f64,
    /// Fraction of latents whose density exceeds 10%.
    pub frac_density_above_10pct: f64,
    /// Number of tokens with exactly i active latents, i = 0..=max L0.
    pub features_per_token_hist: Vec<u64>,
    /// Per latent: fraction of tokens on which it fired.
    pub density: Vec<f64>,
}

/// Batch-by-batch accumulator. The mean of the whole set (for the corrected EV) is given up front.
pub struct ReconAccumulator {
    d: usize,
    f: usize,
    mean: Vec<f64>,
    tokens: usize,
    nnz: u64,
    l1: f64,
    sse: f64,
    total_var: f64,
    cos_sum: f64,
    l2_ratio_sum: f64,
    xhat_sq_sum: f64,
    x_dot_xhat_sum: f64,
    legacy_sum: f64,
    legacy_n: usize,
    fired: Vec<u64>,
    hist: Vec<u64>,
}

/// Column means of a set of row-major batches (f64).
pub fn set_mean<'a>(batches: impl IntoIterator<Item = &'a [f32]>, d: usize) -> Vec<f64> {
    let mut sum = vec![0f64; d];
    let mut n = 0usize;
    for x in batches {
        for row in x.chunks(d) {
            for (s, v) in sum.iter_mut().zip(row) {
                *s += *v as f64;
            }
            n += 1;
        }
    }
    sum.iter_mut().for_each(|s| *s /= n.max(1) as f64);
    sum
}

impl ReconAccumulator {
    /// `mean`: column means of the whole evaluation set; `f`: number of latents.
    pub fn new(mean: Vec<f64>, f: usize) -> Self {
        let d = mean.len();
        Self {
            d,
            f,
            mean,
            tokens: 0,
            nnz: 0,
            l1: 0.0,
            sse: 0.0,
            total_var: 0.0,
            cos_sum: 0.0,
            l2_ratio_sum: 0.0,
            xhat_sq_sum: 0.0,
            x_dot_xhat_sum: 0.0,
            legacy_sum: 0.0,
            legacy_n: 0,
            fired: vec![0; f],
            hist: vec![],
        }
    }

    /// One batch: inputs `x`, its codes and reconstruction (both rows x d).
    pub fn add(&mut self, x: &[f32], codes: &SparseCodes, x_hat: &[f32]) {
        let d = self.d;
        let rows = x.len() / d;
        assert_eq!(x.len(), rows * d);
        assert_eq!(x_hat.len(), rows * d);
        assert_eq!(codes.rows, rows);
        assert_eq!(codes.cols, self.f);
        let batch_mean = set_mean([x], d);
        for b in 0..rows {
            let xr = &x[b * d..(b + 1) * d];
            let hr = &x_hat[b * d..(b + 1) * d];
            let (mut se, mut tv, mut tv_batch, mut xx, mut hh, mut xh) = (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
            for j in 0..d {
                let (a, h) = (xr[j] as f64, hr[j] as f64);
                se += (a - h) * (a - h);
                tv += (a - self.mean[j]) * (a - self.mean[j]);
                tv_batch += (a - batch_mean[j]) * (a - batch_mean[j]);
                xx += a * a;
                hh += h * h;
                xh += a * h;
            }
            self.sse += se;
            self.total_var += tv;
            if tv_batch > 0.0 {
                self.legacy_sum += 1.0 - se / tv_batch;
                self.legacy_n += 1;
            }
            let den = (xx * hh).sqrt();
            self.cos_sum += if den > 0.0 { xh / den } else { 0.0 };
            self.l2_ratio_sum += if xx > 0.0 { (hh / xx).sqrt() } else { 0.0 };
            self.xhat_sq_sum += hh;
            self.x_dot_xhat_sum += xh;

            let (ix, vs) = codes.row(b);
            for &i in ix {
                self.fired[i as usize] += 1;
            }
            self.l1 += vs.iter().map(|v| *v as f64).sum::<f64>();
            let n = ix.len();
            self.nnz += n as u64;
            if self.hist.len() <= n {
                self.hist.resize(n + 1, 0);
            }
            self.hist[n] += 1;
        }
        self.tokens += rows;
    }

    pub fn finish(self) -> ReconMetrics {
        let t = self.tokens.max(1) as f64;
        let f = self.f.max(1) as f64;
        // No variance to explain (no tokens, or every row the same): NMSE and EV are undefined
        // (NaN, null in JSON), not a perfect 0 and 1.
        let nmse = if self.total_var > 0.0 { self.sse / self.total_var } else { f64::NAN };
        let density: Vec<f64> = self.fired.iter().map(|&c| c as f64 / t).collect();
        let alive = self.fired.iter().filter(|&&c| c > 0).count();
        let above = |th: f64| density.iter().filter(|&&p| p > th).count() as f64 / f;
        ReconMetrics {
            tokens: self.tokens,
            d_in: self.d,
            d_sae: self.f,
            l0: self.nnz as f64 / t,
            l1: self.l1 / t,
            mse: self.sse / t / self.d.max(1) as f64,
            nmse,
            explained_variance: 1.0 - nmse,
            explained_variance_legacy: if self.legacy_n > 0 { self.legacy_sum / self.legacy_n as f64 } else { 0.0 },
            cosine: self.cos_sum / t,
            l2_ratio: self.l2_ratio_sum / t,
            relative_reconstruction_bias: if self.x_dot_xhat_sum != 0.0 {
                self.xhat_sq_sum / self.x_dot_xhat_sum
            } else {
                0.0
            },
            dead: self.f - alive,
            alive,
            frac_dead: (self.f - alive) as f64 / f,
            frac_alive: alive as f64 / f,
            frac_density_above_1pct: above(DENSITY_HIGH[0]),
            frac_density_above_10pct: above(DENSITY_HIGH[1]),
            features_per_token_hist: self.hist,
            density,
        }
    }
}

/// All reconstruction metrics of one batch (the set is the batch).
pub fn reconstruction_metrics(x: &[f32], codes: &SparseCodes, x_hat: &[f32], d: usize) -> ReconMetrics {
    let mut acc = ReconAccumulator::new(set_mean([x], d), codes.cols);
    acc.add(x, codes, x_hat);
    acc.finish()
}

/// Weight-only metrics per latent and their summary.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WeightMetrics {
    /// `a_i = W_enc_i . W_dec_i`
    pub alignment: Vec<f64>,
    /// `cos(W_enc_i, W_dec_i)` (0 where either row is zero)
    pub enc_dec_cosine: Vec<f64>,
    /// ||W_dec_i||
    pub decoder_norm: Vec<f64>,
    pub summary: WeightSummary,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WeightSummary {
    pub alignment_mean: f64,
    pub alignment_median: f64,
    /// Share of latents with a_i > 0.9.
    pub alignment_frac_above_0_9: f64,
    /// Share of latents with |a_i| < 0.1.
    pub alignment_frac_abs_below_0_1: f64,
    pub enc_dec_cosine_mean: f64,
    pub enc_dec_cosine_median: f64,
    /// Share of latents with cos > 0.9.
    pub enc_dec_cosine_frac_above_0_9: f64,
    /// Share of latents with |cos| < 0.1.
    pub enc_dec_cosine_frac_abs_below_0_1: f64,
    pub decoder_norm_mean: f64,
}

/// Alignment scores and encoder/decoder cosines of `w_enc`, `w_dec` (both F x d).
pub fn weight_metrics(w_enc: &[f32], w_dec: &[f32], d: usize) -> WeightMetrics {
    assert_eq!(w_enc.len(), w_dec.len());
    let mut alignment = vec![];
    let mut cosine = vec![];
    let mut dec_norm = vec![];
    for (e, w) in w_enc.chunks(d).zip(w_dec.chunks(d)) {
        let (mut ew, mut ee, mut ww) = (0f64, 0f64, 0f64);
        for (a, b) in e.iter().zip(w) {
            let (a, b) = (*a as f64, *b as f64);
            ew += a * b;
            ee += a * a;
            ww += b * b;
        }
        alignment.push(ew);
        let den = (ee * ww).sqrt();
        cosine.push(if den > 0.0 { ew / den } else { 0.0 });
        dec_norm.push(ww.sqrt());
    }
    let n = alignment.len().max(1) as f64;
    let frac = |v: &[f64], p: &dyn Fn(f64) -> bool| v.iter().filter(|x| p(**x)).count() as f64 / n;
    let summary = WeightSummary {
        alignment_mean: mean(&alignment),
        alignment_median: median(&alignment),
        alignment_frac_above_0_9: frac(&alignment, &|a| a > 0.9),
        alignment_frac_abs_below_0_1: frac(&alignment, &|a| a.abs() < 0.1),
        enc_dec_cosine_mean: mean(&cosine),
        enc_dec_cosine_median: median(&cosine),
        enc_dec_cosine_frac_above_0_9: frac(&cosine, &|c| c > 0.9),
        enc_dec_cosine_frac_abs_below_0_1: frac(&cosine, &|c| c.abs() < 0.1),
        decoder_norm_mean: mean(&dec_norm),
    };
    WeightMetrics { alignment, enc_dec_cosine: cosine, decoder_norm: dec_norm, summary }
}

pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub use crate::util::stats::median;
