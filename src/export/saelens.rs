//! SAELens layout: `cfg.json` + `sae_weights.safetensors` with `W_enc [d_in, d_sae]`, `b_enc`,
//! `W_dec [d_sae, d_in]`, `b_dec` and, for sparsifiers exported as JumpReLU, `threshold [d_sae]`.
//!
//! Input normalisation (scale s applied to raw activations during training) is folded in, so
//! the files work on raw activations: `W_enc' = s W_enc`, `W_dec' = W_dec / s`, `b_dec' = b_dec / s`.
//!
//! Per-token normalisation (`--normalize per-token`) depends on the row and cannot be folded; it
//! is written as SAELens's `normalize_activations: "layer_norm"`, which computes
//! `y = (x - mean) / (std + 1e-5)` with torch's unbiased `std` = ||x - mean|| / sqrt(d - 1)
//! (sae_lens/saes/sae.py, `run_time_activation_ln_in`), i.e. sqrt(d - 1) times our unit-norm
//! row up to that eps. The constant sqrt(d - 1) is folded like a global scale of 1/sqrt(d - 1),
//! and SAELens maps the reconstruction back with `x_hat * std + mean`, our inverse exactly.
//! `saetrain.per_token_normalize` records this; saetrain's loader then applies the rule
//! without the eps, exactly as training did.
//!
//! `cfg.json` follows SAELens 6.x (`SAEConfig.to_dict()`): top-level `architecture`, `d_in`, `d_sae`,
//! `dtype`, `device`, `apply_b_dec_to_input`, `normalize_activations`, `reshape_activations`,
//! `metadata {model_name, hook_name, ..., sae_lens_version}` and, for `topk`, `k` and
//! `rescale_acts_by_decoder_norm`. `metadata.sae_lens_version` must be >= 6.0 or SAELens treats the
//! file as a pre-6.0 config and rebuilds `metadata` from top-level keys. The safetensors file holds
//! exactly the tensors SAELens' module has (its `load_state_dict` is strict).

use crate::config::{Normalize, TrainConfig};
use crate::model::Params;
use crate::sparsify::Architecture;
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;
use std::path::Path;

pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
pub const CFG_FILE: &str = "cfg.json";
/// The SAELens release whose config format `cfg.json` follows.
pub const SAELENS_FORMAT_VERSION: &str = "6.18.0";

/// A run-time transform of each input row before encoding (SAELens `normalize_activations`),
/// undone on the reconstruction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunTimeNorm {
    /// None (also SAELens `expected_average_only_in`, whose scale is folded into the weights).
    None,
    /// SAELens `layer_norm`: `y = (x - mean) / (std + eps)` with the unbiased std
    /// `||x - mean|| / sqrt(d - 1)`; reconstruction `x_hat * std + mean`. SAELens's eps is 1e-5;
    /// saetrain's per-token exports are read with eps 0 (a row with std 0 maps to 0), which is
    /// their training rule exactly.
    LayerNorm { eps: f32 },
}

/// SAELens's `layer_norm` epsilon (`run_time_activation_ln_in(x, eps=1e-5)`).
pub const SAELENS_LN_EPS: f32 = 1e-5;

/// Inference-time weights in the SPEC's orientation (W_enc F x d), normalisation folded in.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedSae {
    pub d_in: usize,
    pub d_sae: usize,
    /// F x d
    pub w_enc: Vec<f32>,
    pub b_enc: Vec<f32>,
    /// F x d
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// Per-latent JumpReLU threshold (None: no threshold applies).
    pub threshold: Option<Vec<f32>>,
    /// SAELens architecture name: "jumprelu", "topk", "batchtopk" or "standard".
    pub architecture: String,
    pub k: Option<usize>,
    /// After the JumpReLU thresholds, at most this many latents per token (hybrid's inference
    /// form; SAELens cannot express it and ignores it, saetrain's loader applies it).
    pub per_token_cap: Option<usize>,
    /// The input transform applied before encoding (per-token normalised training).
    pub norm: RunTimeNorm,
}

impl ExportedSae {
    /// From training state: `w_enc_eff` is the encoder actually applied (A + alpha W_dec under
    /// aligned training), `theta` the exported thresholds (`sparsify::threshold::exported`),
    /// `scale` the input scale. Per-token training is exported for SAELens `layer_norm`, whose
    /// normalised rows are sqrt(d - 1) times ours: that factor is folded like a scale of
    /// 1/sqrt(d - 1), so the pre-activations (and theta) are unchanged.
    pub fn from_training(cfg: &TrainConfig, p: &Params, w_enc_eff: &[f32], theta: &[f32], scale: f32) -> Self {
        let mut sae = Self::folded(cfg, p, w_enc_eff, theta, scale);
        if cfg.normalize == Normalize::PerToken {
            let s = ((sae.d_in - 1) as f64).sqrt();
            sae.w_enc.iter_mut().for_each(|v| *v = (*v as f64 / s) as f32);
            sae.w_dec.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
            sae.b_dec.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
            sae.norm = RunTimeNorm::LayerNorm { eps: 0.0 };
        }
        sae
    }

    /// [`Self::from_training`] with the global scale folded, before any per-token export form.
    fn folded(cfg: &TrainConfig, p: &Params, w_enc_eff: &[f32], theta: &[f32], scale: f32) -> Self {
        let s = p.parts();
        let (d, f) = (s.shape.d_in, s.shape.d_sae);
        let arch = cfg.sparsifier.exported();
        let (threshold, k, per_token_cap) = match arch {
            // Folding leaves the pre-activations unchanged, so theta carries over as it is.
            Architecture::JumpRelu => (Some(theta.to_vec()), None, None),
            Architecture::JumpReluCapped => (Some(theta.to_vec()), None, Some(cfg.hybrid_k_max())),
            Architecture::TopK => (None, Some(cfg.k), None),
            Architecture::Standard => (None, None, None),
        };
        let architecture = arch.saelens_name();
        Self {
            d_in: d,
            d_sae: f,
            w_enc: w_enc_eff.iter().map(|v| v * scale).collect(),
            b_enc: s.b_enc.to_vec(),
            w_dec: s.w_dec.iter().map(|v| v / scale).collect(),
            b_dec: s.b_dec.iter().map(|v| v / scale).collect(),
            threshold,
            architecture: architecture.to_string(),
            k,
            per_token_cap,
            norm: RunTimeNorm::None,
        }
    }

    /// Write `cfg.json` and `sae_weights.safetensors` into `dir` (each atomically; weights first).
    /// `metadata` entries are merged over the defaults of SAELens' `metadata` block.
    pub fn save(&self, dir: &Path, cfg: &TrainConfig, metadata: serde_json::Value) -> Result<()> {
        let extra = json!({
            "sparsifier": cfg.sparsifier.name(),
            "k": cfg.k,
            "aligned": cfg.aligned,
        });
        self.save_saelens(dir, metadata, Some(extra))
    }

    /// The SAELens writer without a training config (format conversion); `extra` is stored under
    /// the top-level key `saetrain` (SAELens ignores unknown top-level keys).
    pub fn save_saelens(
        &self,
        dir: &Path,
        metadata: serde_json::Value,
        extra: Option<serde_json::Value>,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let (d, f) = (self.d_in, self.d_sae);
        let w_enc_t = transpose(&self.w_enc, f, d); // d x F
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("W_enc", vec![d, f], &w_enc_t),
            ("b_enc", vec![f], &self.b_enc),
            ("W_dec", vec![f, d], &self.w_dec),
            ("b_dec", vec![d], &self.b_dec),
        ];
        if let Some(t) = &self.threshold {
            tensors.push(("threshold", vec![f], t));
        }
        let bytes = serialize_f32(&tensors)?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        write_json_atomic(&dir.join(CFG_FILE), &self.saelens_cfg(metadata, extra))
    }

    /// The SAELens 6.x `cfg.json` object of this SAE.
    pub fn saelens_cfg(&self, metadata: serde_json::Value, extra: Option<serde_json::Value>) -> serde_json::Value {
        let mut md = json!({
            "model_name": null,
            "hook_name": null,
            "hook_layer": null,
            "hook_head_index": null,
            "prepend_bos": true,
            "context_size": null,
            "dataset_path": null,
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": null,
            "saetrain_version": env!("CARGO_PKG_VERSION"),
        });
        if let serde_json::Value::Object(given) = metadata {
            for (k, v) in given {
                md[k.as_str()] = v;
            }
        }
        let architecture = self.architecture.as_str();
        let mut c = json!({
            "architecture": architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": true,
            "normalize_activations": match self.norm {
                RunTimeNorm::None => "none",
                RunTimeNorm::LayerNorm { .. } => "layer_norm",
            },
            "reshape_activations": "none",
            "metadata": md,
        });
        if let Some(k) = self.k {
            c["k"] = json!(k);
        }
        if architecture == "topk" {
            c["rescale_acts_by_decoder_norm"] = json!(false);
        }
        if let Some(cap) = self.per_token_cap {
            c["per_token_cap"] = json!(cap);
            c["per_token_cap_note"] =
                json!(per_token_cap_note(cap, "SAELens", "jumprelu architecture", &c["metadata"]));
        }
        if let Some(e) = extra {
            c["saetrain"] = e;
        }
        if self.norm == (RunTimeNorm::LayerNorm { eps: 0.0 }) {
            if !c["saetrain"].is_object() {
                c["saetrain"] = json!({});
            }
            c["saetrain"]["per_token_normalize"] = json!({
                "rule": "x -> (x - mean(x)) / ||x - mean(x)||_2 per token (a row with ||x - mean(x)|| = 0 maps to 0)",
                "folded": format!("sqrt(d_in - 1) = {}: W_enc / it, W_dec and b_dec * it", ((self.d_in - 1) as f64).sqrt()),
                "note": "trained on per-token normalised activations (--normalize per-token). SAELens's layer_norm \
                         gives (x - mean) / (std + 1e-5) with the unbiased std ||x - mean|| / sqrt(d_in - 1), which is \
                         sqrt(d_in - 1) times the training rule except for that 1e-5 (relative difference \
                         1e-5 * sqrt(d_in - 1) / ||x - mean||); sqrt(d_in - 1) is folded into the weights, so SAELens \
                         gives the training codes on raw activations up to that 1e-5. saetrain's loader applies \
                         the rule without it.",
            });
        }
        c
    }
}

/// What a per-token cap of `cap` means to a library whose class (`architecture`) cannot express
/// it, with how much it matters as the calibration measured it (`metadata.threshold_calibration`).
pub fn per_token_cap_note(cap: usize, library: &str, architecture: &str, metadata: &serde_json::Value) -> String {
    let cal = &metadata["threshold_calibration"];
    let measured = match &cal["without_cap"] {
        u if u.is_object() => format!(
            " (on the {} calibration tokens: {:.1}% of tokens, L0 {:.2} without the cap against {:.2} with it)",
            cal["tokens"],
            100.0 * u["frac_tokens_over_cap"].as_f64().unwrap_or(f64::NAN),
            u["l0"].as_f64().unwrap_or(f64::NAN),
            cal["calibrated_l0"].as_f64().unwrap_or(f64::NAN),
        ),
        _ => String::new(),
    };
    format!(
        "trained as hybrid: after the thresholds, keep at most {cap} latents per token (the largest). \
         {library}'s {architecture} cannot express this and ignores this key, so in {library} the tokens \
         whose thresholds keep more than {cap} latents fire all of them{measured}; saetrain's loader \
         (sae eval, saetrain.load) applies the cap."
    )
}

/// Row-major transpose of an r x c matrix.
pub fn transpose(m: &[f32], r: usize, c: usize) -> Vec<f32> {
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = m[i * c + j];
        }
    }
    out
}

/// Serialise named f32 tensors to safetensors bytes.
pub fn serialize_f32(tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<Vec<u8>> {
    serialize_f32_with_metadata(tensors, None)
}

pub fn serialize_f32_with_metadata(
    tensors: &[(&str, Vec<usize>, &[f32])],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            Ok((name.to_string(), TensorView::new(Dtype::F32, shape.clone(), bytes)?))
        })
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}
