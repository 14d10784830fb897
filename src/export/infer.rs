//! CPU inference with an exported SAE: `pre = (x - b_dec) W_enc^T + b_enc` through the GEMM,
//! the architecture's sparsifier, then the sparse decode `x_hat = z W_dec + b_dec`.
//!
//! | architecture | sparsifier |
//! |---|---|
//! | `jumprelu` | `pre > threshold_i` and `pre > 0` |
//! | `topk` | per token the k largest positive |
//! | `batchtopk` | JumpReLU when a threshold is stored, else the k*B largest of the batch |
//! | `standard` | every positive entry (ReLU) |
//!
//! With a run-time normalisation (SAELens `layer_norm`) each row is normalised before encoding
//! and the reconstruction mapped back to raw units, as SAELens's `encode` / `forward` do.

use super::saelens::{ExportedSae, RunTimeNorm};
use crate::backend::cpu::{decode, encode};
use crate::data::normalize::{row_stats, RowStats};
use crate::sparse::SparseCodes;
use crate::sparsify::{self, Selection};
use anyhow::{bail, ensure, Result};

/// Rows encoded per GEMM call (bounds the B x F buffer) for token-independent sparsifiers.
const CHUNK_ROWS: usize = 4096;

impl ExportedSae {
    /// The selection rule the exported architecture implies.
    pub fn selection(&self) -> Result<Selection<'_>> {
        if let (Some(t), Some(cap)) = (&self.threshold, self.per_token_cap) {
            return Ok(Selection::JumpReluCap { theta: t, k: cap });
        }
        Ok(match (self.architecture.as_str(), &self.threshold, self.k) {
            ("jumprelu", Some(t), _) | ("batchtopk", Some(t), _) => Selection::JumpRelu { theta: t },
            ("jumprelu", None, _) => bail!("jumprelu SAE without a threshold"),
            ("topk", _, Some(k)) => Selection::TopK { k },
            ("batchtopk", None, Some(k)) => Selection::BatchTopK { k },
            ("standard", _, _) => Selection::Relu,
            (a, _, _) => bail!("architecture '{a}' has no sparsifier (k missing?)"),
        })
    }

    /// Whether the codes of a token depend on the other tokens of the batch.
    pub fn batch_dependent(&self) -> bool {
        self.architecture == "batchtopk" && self.threshold.is_none()
    }

    /// Dense pre-activations (rows x d_sae) of rows in the weights' input space (`encode` and
    /// `forward` normalise raw rows first when the SAE has a run-time normalisation).
    pub fn pre_activations(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (d, f) = (self.d_in, self.d_sae);
        ensure!(x.len() == rows * d, "input has {} values, expected {rows} x {d}", x.len());
        let mut xc = vec![0f32; rows * d];
        encode::center(x, &self.b_dec, &mut xc);
        let mut pre = vec![0f32; rows * f];
        encode::encode(&xc, &self.w_enc, &self.b_enc, rows, d, &mut pre);
        Ok(pre)
    }

    /// The rows the weights apply to, and per row the (mean, std) that map a reconstruction
    /// back (empty without a run-time normalisation).
    fn normalized<'a>(&self, x: &'a [f32]) -> (std::borrow::Cow<'a, [f32]>, Vec<(f64, f64)>) {
        let RunTimeNorm::LayerNorm { eps } = self.norm else { return (x.into(), vec![]) };
        let d = self.d_in;
        // torch.std's default is unbiased: ||x - mean|| / sqrt(d - 1).
        let unbiased = ((d.max(2) - 1) as f64).sqrt();
        let mut y = x.to_vec();
        let mut stats = Vec::with_capacity(x.len() / d.max(1));
        for row in y.chunks_mut(d) {
            let RowStats { mean, norm } = row_stats(row);
            let std = norm / unbiased;
            let den = std + eps as f64;
            let inv = if den > 0.0 { 1.0 / den } else { 0.0 };
            row.iter_mut().for_each(|v| *v = ((*v as f64 - mean) * inv) as f32);
            stats.push((mean, std));
        }
        (y.into(), stats)
    }

    /// Sparse codes of `x` (rows x d_in, raw activations).
    pub fn encode(&self, x: &[f32], rows: usize) -> Result<SparseCodes> {
        let (d, f) = (self.d_in, self.d_sae);
        ensure!(x.len() == rows * d, "input has {} values, expected {rows} x {d}", x.len());
        self.encode_normalized(&self.normalized(x).0, rows, f)
    }

    /// Sparse codes of rows already in the weights' input space.
    fn encode_normalized(&self, x: &[f32], rows: usize, f: usize) -> Result<SparseCodes> {
        let sel = self.selection()?;
        let d = self.d_in;
        if self.batch_dependent() || rows <= CHUNK_ROWS {
            let pre = self.pre_activations(x, rows)?;
            return Ok(sparsify::select(&pre, rows, f, &sel));
        }
        let mut lists: Vec<Vec<(u32, f32)>> = Vec::with_capacity(rows);
        for chunk in x.chunks(CHUNK_ROWS * d) {
            let r = chunk.len() / d;
            let pre = self.pre_activations(chunk, r)?;
            let c = sparsify::select(&pre, r, f, &sel);
            for b in 0..r {
                let (ix, vs) = c.row(b);
                lists.push(ix.iter().copied().zip(vs.iter().copied()).collect());
            }
        }
        Ok(SparseCodes::from_rows(f, lists))
    }

    /// `x_hat = z W_dec + b_dec`, in the weights' input space (normalised rows under a run-time
    /// normalisation; [`Self::forward`] maps it back to raw units).
    pub fn decode(&self, codes: &SparseCodes) -> Vec<f32> {
        let mut x_hat = vec![0f32; codes.rows * self.d_in];
        decode::decode(codes, &self.w_dec, Some(&self.b_dec), self.d_in, &mut x_hat);
        x_hat
    }

    /// Codes and reconstruction (raw units) of raw activations `x` (rows x d_in).
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<(SparseCodes, Vec<f32>)> {
        let (d, f) = (self.d_in, self.d_sae);
        ensure!(x.len() == rows * d, "input has {} values, expected {rows} x {d}", x.len());
        let (y, stats) = self.normalized(x);
        let codes = self.encode_normalized(&y, rows, f)?;
        let mut x_hat = self.decode(&codes);
        // SAELens's run_time_activation_ln_out: x_hat * std + mean (no eps).
        for (row, (mean, std)) in x_hat.chunks_mut(d).zip(stats) {
            row.iter_mut().for_each(|v| *v = (*v as f64 * std + mean) as f32);
        }
        Ok((codes, x_hat))
    }
}
