//! EleutherAI sparsify layout: `sae.safetensors` (`encoder.weight [num_latents, d_in]`,
//! `encoder.bias`, `W_dec [num_latents, d_in]`, `b_dec [d_in]`, exactly the module's parameters:
//! sparsify loads them strictly) and `cfg.json` (`SparseCoderConfig` fields plus `d_in`, which
//! `SparseCoder.load_from_disk` requires). sparsify SAEs are TopK SAEs (ReLU, then the k largest).
//!
//! Named after EleutherAI, not `sparsify`, so that it is not confused with [`crate::sparsify`] (the
//! selection rules); the CLI value stays `--format sparsify`.

use super::load::SPARSIFY_WEIGHTS_FILE;
use super::saelens::{serialize_f32, ExportedSae, RunTimeNorm, CFG_FILE};
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;

impl ExportedSae {
    /// The `cfg.json` sparsify writes for this SAE (which must be `topk`).
    pub fn sparsify_cfg(&self) -> Result<serde_json::Value> {
        let Some(k) = self.k.filter(|_| self.architecture == "topk") else {
            bail!(
                "the sparsify layout holds TopK SAEs only; this SAE is '{}' (export it with --format saelens, \
                 or give --k to convert it to TopK)",
                self.architecture
            );
        };
        if self.norm != RunTimeNorm::None {
            bail!(
                "the sparsify layout has no input normalisation, and this SAE expects per-token normalised \
                 inputs (trained with --normalize per-token): export it with --format saelens (layer_norm)"
            );
        }
        let expansion = if self.d_sae.is_multiple_of(self.d_in) { self.d_sae / self.d_in } else { 0 };
        Ok(json!({
            "activation": "topk",
            "expansion_factor": expansion.max(1),
            "normalize_decoder": true,
            "num_latents": self.d_sae,
            "k": k,
            "multi_topk": false,
            "skip_connection": false,
            "transcode": false,
            "d_in": self.d_in,
        }))
    }

    /// Write `cfg.json` and `sae.safetensors` into `dir` (each atomically; weights first).
    pub fn save_sparsify(&self, dir: &Path) -> Result<()> {
        let cfg = self.sparsify_cfg()?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let (d, f) = (self.d_in, self.d_sae);
        let tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("encoder.weight", vec![f, d], &self.w_enc),
            ("encoder.bias", vec![f], &self.b_enc),
            ("W_dec", vec![f, d], &self.w_dec),
            ("b_dec", vec![d], &self.b_dec),
        ];
        write_atomic(&dir.join(SPARSIFY_WEIGHTS_FILE), &serialize_f32(&tensors)?)?;
        write_json_atomic(&dir.join(CFG_FILE), &cfg)
    }

    /// The same weights read as a TopK SAE with `k` latents per token (a lossy conversion for
    /// SAEs trained with another sparsifier, made only when asked for).
    pub fn as_topk(&self, k: usize) -> Result<ExportedSae> {
        if k == 0 || k > self.d_sae {
            bail!("invalid --k {k}: must lie in 1..={} (d_sae)", self.d_sae);
        }
        Ok(ExportedSae {
            threshold: None,
            architecture: "topk".into(),
            k: Some(k),
            per_token_cap: None,
            ..self.clone()
        })
    }
}
