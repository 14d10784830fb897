//! CPU inference with an exported SAE: `pre = (x - b_dec) W_enc^T + b_enc` through the GEMM,
//! the architecture's sparsifier, then the sparse decode `x_hat = z W_dec + b_dec`.
//!
//! | architecture | sparsifier |
//! |---|---|
//! | `jumprelu` | `pre > threshold_i` and `pre > 0` |
//! | `topk` | per token the k largest positive |
//! | `batchtopk` | JumpReLU when a threshold is stored, else the k*B largest of the batch |
//! | `standard` | every positive entry (ReLU) |

use super::saelens::ExportedSae;
use crate::backend::cpu::{decode, encode};
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

    /// Dense pre-activations (rows x d_sae).
    pub fn pre_activations(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (d, f) = (self.d_in, self.d_sae);
        ensure!(x.len() == rows * d, "input has {} values, expected {rows} x {d}", x.len());
        let mut xc = vec![0f32; rows * d];
        encode::center(x, &self.b_dec, &mut xc);
        let mut pre = vec![0f32; rows * f];
        encode::encode(&xc, &self.w_enc, &self.b_enc, rows, d, &mut pre);
        Ok(pre)
    }

    /// Sparse codes of `x` (rows x d_in).
    pub fn encode(&self, x: &[f32], rows: usize) -> Result<SparseCodes> {
        let sel = self.selection()?;
        let (d, f) = (self.d_in, self.d_sae);
        ensure!(x.len() == rows * d, "input has {} values, expected {rows} x {d}", x.len());
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

    /// `x_hat = z W_dec + b_dec`.
    pub fn decode(&self, codes: &SparseCodes) -> Vec<f32> {
        let mut x_hat = vec![0f32; codes.rows * self.d_in];
        decode::decode(codes, &self.w_dec, Some(&self.b_dec), self.d_in, &mut x_hat);
        x_hat
    }

    /// Codes and reconstruction of `x` (rows x d_in).
    pub fn forward(&self, x: &[f32], rows: usize) -> Result<(SparseCodes, Vec<f32>)> {
        let codes = self.encode(x, rows)?;
        let x_hat = self.decode(&codes);
        Ok((codes, x_hat))
    }
}
