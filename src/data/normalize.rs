//! Per-token input normalisation (`--normalize per-token`, the MC/FC paper's section 5): each row
//! x -> (x - mean(x)) / ||x - mean(x)||_2, and [`PerToken`], the batch source that applies it to
//! every training and held-out batch, so that every backend trains on the same normalised rows.
//!
//! Unlike the global scale it depends on the row, so it cannot be folded into weights: the
//! export records it (SAELens `layer_norm`, export/saelens.rs) and every consumer of raw rows
//! (the loader, `sae eval`) applies it with [`row_stats`] and maps reconstructions back with
//! [`denormalize`].

use super::{Batch, BatchData, BatchSource, SourceStats};
use anyhow::{bail, Result};
use rayon::prelude::*;

/// A row's mean and the L2 norm of the row minus its mean (f64: a row of 10^4 large values
/// would lose digits in f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowStats {
    pub mean: f64,
    pub norm: f64,
}

/// Mean and centred norm of `row`.
pub fn row_stats(row: &[f32]) -> RowStats {
    let n = row.len().max(1) as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let norm = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>().sqrt();
    RowStats { mean, norm }
}

/// `row <- (row - mean) / ||row - mean||` in place; a row whose centred norm is 0 (a zero or
/// constant row) becomes 0 rather than NaN. Returns the row's statistics.
pub fn per_token_row(row: &mut [f32]) -> RowStats {
    let s = row_stats(row);
    let inv = if s.norm > 0.0 { 1.0 / s.norm } else { 0.0 };
    row.iter_mut().for_each(|v| *v = ((*v as f64 - s.mean) * inv) as f32);
    s
}

/// Every row of `x` (rows of width `d`) normalised, with the rows' statistics.
pub fn per_token(x: &[f32], d: usize) -> (Vec<f32>, Vec<RowStats>) {
    let mut out = x.to_vec();
    let stats = out.chunks_mut(d).map(per_token_row).collect();
    (out, stats)
}

/// A reconstruction of normalised rows mapped back to raw units: `x_hat * norm + mean` per row.
pub fn denormalize(x_hat: &mut [f32], stats: &[RowStats], d: usize) {
    for (row, s) in x_hat.chunks_mut(d).zip(stats) {
        row.iter_mut().for_each(|v| *v = (*v as f64 * s.norm + s.mean) as f32);
    }
}

/// `batch` with every row normalised, in the batch's own element type (half-precision batches are
/// widened, normalised and rounded back, as the global scale does for them). Rows in parallel:
/// this runs on the training thread, where a GPU backend leaves the cores idle.
pub fn normalize_batch(batch: Batch) -> Batch {
    let d = batch.d_in;
    let mut x = batch.to_f32().into_owned();
    x.par_chunks_mut(d).for_each(|r| {
        per_token_row(r);
    });
    let data = match batch.data {
        BatchData::F32(_) => BatchData::F32(x),
        BatchData::F16(_) => BatchData::F16(x.par_iter().map(|&v| half::f16::from_f32(v)).collect()),
        BatchData::Bf16(_) => BatchData::Bf16(x.par_iter().map(|&v| half::bf16::from_f32(v)).collect()),
    };
    Batch { rows: batch.rows, d_in: d, data }
}

/// A batch source whose training and held-out batches are those of `inner`, normalised per token.
/// Everything else (positions, statistics, ground truth) is the inner source's.
pub struct PerToken {
    inner: Box<dyn BatchSource>,
}

impl PerToken {
    pub fn new(inner: Box<dyn BatchSource>) -> Result<Self> {
        if inner.d_in() < 2 {
            bail!(
                "invalid --normalize per-token: the data has d_in {}, and a centred row of width 1 is always 0",
                inner.d_in()
            );
        }
        Ok(Self { inner })
    }
}

impl BatchSource for PerToken {
    fn d_in(&self) -> usize {
        self.inner.d_in()
    }
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }
    fn next_batch(&mut self) -> Result<Batch> {
        Ok(normalize_batch(self.inner.next_batch()?))
    }
    fn position(&self) -> serde_json::Value {
        self.inner.position()
    }
    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        self.inner.seek(position)
    }
    fn eval_batches(&mut self, tokens: usize) -> Result<Vec<Batch>> {
        Ok(self.inner.eval_batches(tokens)?.into_iter().map(normalize_batch).collect())
    }
    fn ground_truth(&self) -> Option<&[f32]> {
        // The raw directions: centring only removes their small component along the all-ones
        // vector, so the recovery metric (max cosine) still applies.
        self.inner.ground_truth()
    }
    fn input_scale(&self) -> f32 {
        self.inner.input_scale()
    }
    fn manifest(&self) -> Option<&super::Manifest> {
        self.inner.manifest()
    }
    fn stats(&self) -> SourceStats {
        self.inner.stats()
    }
    fn describe(&self) -> String {
        format!("{}; per-token normalised ((x - mean) / ||x - mean||)", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_centred_unit_vectors_and_back() {
        let x = [1.0f32, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0];
        let (y, s) = per_token(&x, 4);
        let r0 = &y[..4];
        assert!(r0.iter().map(|v| *v as f64).sum::<f64>().abs() < 1e-7);
        assert!((r0.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() - 1.0).abs() < 1e-6);
        assert!(y[4..].iter().all(|v| *v == 0.0), "zero and constant rows stay 0: {y:?}");
        let mut back = y.clone();
        denormalize(&mut back, &s, 4);
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}
