//! dictionary_learning layout (saprmarks/dictionary_learning: the PyPI release 0.1.0 and GitHub
//! main of 2025-08 read it alike): a folder with `ae.pt`, a `torch.save` state dict
//! ([`super::torch_pt`]), and `config.json`, which `dictionary_learning.utils.load_dictionary(
//! folder, device)` reads for `trainer.dict_class` (and `trainer.k`) to pick the class:
//!
//! | saetrain SAE | class | state dict |
//! |---|---|---|
//! | topk | `AutoEncoderTopK` | `encoder.weight [F, d]`, `encoder.bias [F]`, `decoder.weight [d, F]`, `b_dec [d]`, `k` (int32 scalar), `threshold` (f32 scalar, -1: unused) |
//! | thresholds (batchtopk, mutual_choice, wta, hybrid) | `JumpReluAutoEncoder` | `W_enc [d, F]`, `b_enc [F]`, `W_dec [F, d]`, `b_dec [d]`, `threshold [F]` |
//! | standard (relu) | `AutoEncoder` | `encoder.weight [F, d]`, `encoder.bias [F]`, `decoder.weight [d, F]`, `bias [d]` |
//!
//! Where it differs from the SAELens layout, and why:
//! - `JumpReluAutoEncoder.from_pretrained` leaves `apply_b_dec_to_input` False (`pre = x W_enc +
//!   b_enc`), so `b_dec` is folded into the bias: `b_enc - W_enc b_dec`, in f64.
//! - Decoder rows are unit norm, as dictionary_learning's trainers keep them (and as
//!   `AutoEncoder.from_pretrained` makes them by default, asserting the outputs unchanged). Our
//!   rows have norm 1/s after an input scale s is folded in. Latent j of a JumpReLU or standard SAE
//!   is rescaled by its row norm n_j (`W_dec_j / n_j`; `W_enc_j`, `b_enc_j`, `threshold_j` times
//!   n_j): exact, since those rules look at one latent at a time. TopK and hybrid's per-token cap
//!   compare a token's latents, so those SAEs are rescaled by one factor, the mean row norm, which
//!   keeps the ranking. dictionary_learning
//!   therefore gives saetrain's codes times n_j (the codes of a unit-norm decoder: raw activation
//!   units, as its own `scale_biases` leaves them) and the same reconstructions.
//! - dictionary_learning's `BatchTopKSAE` has one scalar threshold; ours are per latent, so a
//!   batchtopk SAE is a `JumpReluAutoEncoder`. One without thresholds is refused: `BatchTopKSAE`
//!   with no threshold keeps every positive code by default.
//! - No class normalises its input at run time: a per-token normalised SAE is refused.
//! - hybrid's per-token cap cannot be expressed: `JumpReluAutoEncoder`, with the cap and what it
//!   changes in `config.json` (`saetrain.per_token_cap_note`).

use super::saelens::{per_token_cap_note, transpose, ExportedSae, RunTimeNorm};
use super::torch_pt::read::TensorData;
use super::torch_pt::{read_state_dict, state_dict_bytes, LoadedTensor, Tensor};
use crate::sparsify::Selection;
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The state dict's file.
pub const DL_WEIGHTS_FILE: &str = "ae.pt";
/// dictionary_learning's config: the same name as a training run's `config.json`, which is why
/// this layout is never written into a run directory.
pub const DL_CONFIG_FILE: &str = "config.json";

/// A tensor of the state dict and its shape.
enum Owned {
    F32(Vec<f32>, Vec<usize>),
    I32(Vec<i32>, Vec<usize>),
}

impl Owned {
    /// The writer's view of it.
    fn view(&self) -> Tensor<'_> {
        match self {
            Self::F32(v, shape) => Tensor::F32(v, shape.clone()),
            Self::I32(v, shape) => Tensor::I32(v, shape.clone()),
        }
    }
}

/// What `ae.pt` holds: the class, its tensors in order, and per latent the factor its decoder row
/// was divided by (its codes multiplied by).
struct StateDict<'a> {
    class: Class<'a>,
    entries: Vec<(&'static str, Owned)>,
    scale: Vec<f64>,
}

/// How an SAE is written for dictionary_learning.
enum Class<'a> {
    TopK { k: usize },
    JumpRelu { theta: &'a [f32] },
    Standard,
}

impl Class<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::TopK { .. } => "AutoEncoderTopK",
            Self::JumpRelu { .. } => "JumpReluAutoEncoder",
            Self::Standard => "AutoEncoder",
        }
    }
}

impl ExportedSae {
    fn dl_class(&self) -> Result<Class<'_>> {
        if self.norm != RunTimeNorm::None {
            bail!(
                "the dictionary_learning layout has no input normalisation, and this SAE expects per-token \
                 normalised inputs (trained with --normalize per-token): export it with --format saelens (layer_norm)"
            );
        }
        Ok(match self.selection()? {
            Selection::TopK { k } => Class::TopK { k },
            Selection::JumpRelu { theta } | Selection::JumpReluCap { theta, .. } => Class::JumpRelu { theta },
            Selection::Relu => Class::Standard,
            Selection::BatchTopK { .. } => bail!(
                "this batchtopk SAE has no thresholds, and dictionary_learning's BatchTopKSAE keeps every positive \
                 code unless told not to: give --k to convert it to TopK, or export it with --format saelens"
            ),
            _ => bail!("architecture '{}' has no dictionary_learning class", self.architecture),
        })
    }

    /// Whether the SAE's rule ranks a token's latents against each other (TopK; hybrid's per-token
    /// cap, which saetrain's loader applies): then one factor for all, which keeps the ranking.
    fn compares_latents(&self, class: &Class) -> bool {
        matches!(class, Class::TopK { .. }) || self.per_token_cap.is_some()
    }

    /// The state dict dictionary_learning's class loads.
    fn dl_state_dict(&self) -> Result<StateDict<'_>> {
        let class = self.dl_class()?;
        let (d, f) = (self.d_in, self.d_sae);
        let norms = self.w_dec.chunks(d).map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt());
        let scale: Vec<f64> = if self.compares_latents(&class) {
            let live: Vec<f64> = norms.filter(|&n| n > 0.0).collect();
            let mean = if live.is_empty() { 1.0 } else { live.iter().sum::<f64>() / live.len() as f64 };
            vec![mean; f]
        } else {
            norms.map(|n| if n > 0.0 { n } else { 1.0 }).collect()
        };
        let by_latent = |v: &[f32], op: fn(f64, f64) -> f64| -> Vec<f32> {
            let width = v.len() / f;
            v.chunks(width).zip(&scale).flat_map(|(r, &c)| r.iter().map(move |&x| op(x as f64, c) as f32)).collect()
        };
        let times = |x: f64, c: f64| x * c;
        let w_enc = by_latent(&self.w_enc, times);
        let w_dec = by_latent(&self.w_dec, |x, c| x / c);
        let f32s = |v: Vec<f32>, shape: Vec<usize>| Owned::F32(v, shape);
        let entries = match &class {
            Class::TopK { k } => vec![
                ("encoder.weight", f32s(w_enc, vec![f, d])),
                ("encoder.bias", f32s(by_latent(&self.b_enc, times), vec![f])),
                ("decoder.weight", f32s(transpose(&w_dec, f, d), vec![d, f])),
                ("b_dec", f32s(self.b_dec.clone(), vec![d])),
                ("k", Owned::I32(vec![i32::try_from(*k).context("k does not fit in int32")?], vec![])),
                ("threshold", f32s(vec![-1.0], vec![])),
            ],
            Class::JumpRelu { theta } => {
                // pre = x W_enc + (b_enc - W_enc b_dec): the input is not centred at load.
                let folded: Vec<f32> = self
                    .w_enc
                    .chunks(d)
                    .zip(&self.b_enc)
                    .map(|(row, &b)| {
                        let wb: f64 = row.iter().zip(&self.b_dec).map(|(&w, &bd)| w as f64 * bd as f64).sum();
                        (b as f64 - wb) as f32
                    })
                    .collect();
                vec![
                    ("W_enc", f32s(transpose(&w_enc, f, d), vec![d, f])),
                    ("b_enc", f32s(by_latent(&folded, times), vec![f])),
                    ("W_dec", f32s(w_dec, vec![f, d])),
                    ("b_dec", f32s(self.b_dec.clone(), vec![d])),
                    // f32::MAX (never fires) stays finite when scaled up.
                    ("threshold", f32s(by_latent(theta, |x, c| (x * c).min(f32::MAX as f64)), vec![f])),
                ]
            }
            Class::Standard => vec![
                ("bias", f32s(self.b_dec.clone(), vec![d])),
                ("encoder.weight", f32s(w_enc, vec![f, d])),
                ("encoder.bias", f32s(by_latent(&self.b_enc, times), vec![f])),
                ("decoder.weight", f32s(transpose(&w_dec, f, d), vec![d, f])),
            ],
        };
        Ok(StateDict { class, entries, scale })
    }

    /// Write `ae.pt` and `config.json` into `dir` (each atomically; weights first). `metadata` is
    /// the SAELens metadata (where the SAE belongs, how it was calibrated), `extra` saetrain's
    /// block; both go under `config.json`'s `saetrain` key.
    pub fn save_dictionary_learning(&self, dir: &Path, metadata: &Value, extra: Option<Value>) -> Result<()> {
        let StateDict { class, entries, scale } = self.dl_state_dict()?;
        let tensors: Vec<(&str, Tensor<'_>)> = entries.iter().map(|(name, t)| (*name, t.view())).collect();
        let bytes = state_dict_bytes("ae", &tensors)?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_atomic(&dir.join(DL_WEIGHTS_FILE), &bytes)?;
        write_json_atomic(&dir.join(DL_CONFIG_FILE), &self.dictionary_learning_cfg(&class, &scale, metadata, extra))
    }

    fn dictionary_learning_cfg(&self, class: &Class, scale: &[f64], md: &Value, extra: Option<Value>) -> Value {
        let mut trainer = json!({
            "dict_class": class.name(),
            "activation_dim": self.d_in,
            "dict_size": self.d_sae,
            "lm_name": md["model_name"],
            "layer": md["hook_layer"],
            "submodule_name": md["hook_name"],
            "device": "cpu",
        });
        if let Class::TopK { k } = class {
            trainer["k"] = json!(k);
        }
        let (lo, hi) = scale.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        let mut ours = json!({
            "saetrain_version": env!("CARGO_PKG_VERSION"),
            "metadata": md,
            "decoder_rows_normalized": format!(
                "decoder rows scaled to unit norm (factors {lo:.6e} to {hi:.6e}; {}), so these codes are saetrain's times \
                 the factor and the reconstructions are saetrain's",
                match self.compares_latents(class) {
                    true => "one factor for all latents, the mean row norm, which keeps the ranking of a token's latents",
                    false => "each latent by its own row norm",
                }
            ),
        });
        if let Some(Value::Object(e)) = extra {
            ours.as_object_mut().expect("an object").extend(e);
        }
        if let Some(cap) = self.per_token_cap {
            ours["per_token_cap"] = json!(cap);
            ours["per_token_cap_note"] =
                json!(per_token_cap_note(cap, "dictionary_learning", "JumpReluAutoEncoder", md));
        }
        let mut c = json!({"trainer": trainer, "saetrain": ours});
        if let Some(ctx) = md.get("context_size").filter(|v| !v.is_null()) {
            c["buffer"] = json!({"d_submodule": self.d_in, "ctx_len": ctx});
        }
        c
    }
}

/// Whether `dir/config.json` is dictionary_learning's, not a training run's `config.json`: it
/// names `trainer.dict_class`, or it sits beside `ae.pt` with no trainer state (a run never holds
/// `ae.pt`: that export is refused there), so that a broken one is reported as that layout's.
pub fn is_dictionary_learning_config(dir: &Path) -> bool {
    if dir.join(DL_WEIGHTS_FILE).is_file() && !dir.join(crate::train::checkpoint::STATE_FILE).exists() {
        return true;
    }
    let cfg = std::fs::read_to_string(dir.join(DL_CONFIG_FILE)).ok();
    let cfg = cfg.and_then(|t| serde_json::from_str::<Value>(&t).ok());
    cfg.is_some_and(|c| c["trainer"]["dict_class"].is_string())
}

/// The classes [`load_dictionary_learning`] reads.
const KNOWN_CLASSES: [&str; 5] =
    ["AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "AutoEncoder"];

/// A dictionary_learning checkpoint (`ae.pt` + `config.json`, one folder of what its trainers
/// write), read as its class's `from_pretrained` + default `encode` would run it:
/// - `AutoEncoderTopK`: TopK with the state dict's `k` (`encode` ignores its threshold by default).
/// - `BatchTopKSAE`, `MatryoshkaBatchTopKSAE`: `encode` thresholds by default: JumpReLU with the
///   scalar threshold for every latent (refused while it is still -1, never estimated).
/// - `JumpReluAutoEncoder`: the input is not centred (`apply_b_dec_to_input` False from a file),
///   so `b_enc + W_enc b_dec` is the bias of our centred form.
/// - `AutoEncoder`: `from_pretrained` normalises the decoder's columns by default (and scales the
///   encoder to match); so does this loader, with torch's `allclose` test for "already unit".
/// - A `saetrain.per_token_cap` (saetrain's hybrid exports) is applied, as for SAELens files.
pub fn load_dictionary_learning(dir: &Path) -> Result<ExportedSae> {
    let cfg_path = dir.join(DL_CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let Some(class) = cfg["trainer"]["dict_class"].as_str() else {
        bail!("{}: field 'trainer.dict_class' is missing or not a string", cfg_path.display())
    };
    ensure!(
        KNOWN_CLASSES.contains(&class),
        "{}: field 'trainer.dict_class' is '{class}', which this loader does not read (known: {})",
        cfg_path.display(),
        KNOWN_CLASSES.join(", ")
    );
    let w_path = dir.join(DL_WEIGHTS_FILE);
    let sd = StateDictFile { path: w_path.clone(), entries: read_state_dict(&w_path)? };
    sd.only(class)?;
    // The weights in our orientation (F x d encoder and decoder), then the class's rule.
    let (w_enc, b_enc, w_dec, b_dec) = match class {
        "AutoEncoderTopK" | "BatchTopKSAE" | "AutoEncoder" => {
            let [f, d] = sd.shape2("encoder.weight")?;
            let bias = if class == "AutoEncoder" { "bias" } else { "b_dec" };
            (
                sd.get("encoder.weight", &[f, d], "[dict_size, activation_dim]")?,
                sd.get("encoder.bias", &[f], "[dict_size]")?,
                transpose(&sd.get("decoder.weight", &[d, f], "[activation_dim, dict_size]")?, d, f),
                sd.get(bias, &[d], "[activation_dim]")?,
            )
        }
        _ => {
            let [d, f] = sd.shape2("W_enc")?;
            (
                transpose(&sd.get("W_enc", &[d, f], "[activation_dim, dict_size]")?, d, f),
                sd.get("b_enc", &[f], "[dict_size]")?,
                sd.get("W_dec", &[f, d], "[dict_size, activation_dim]")?,
                sd.get("b_dec", &[d], "[activation_dim]")?,
            )
        }
    };
    let (d, f) = (b_dec.len(), b_enc.len());
    // load_dictionary builds the class from these and then loads the state dict into it, so a
    // size that disagrees with the tensors is a file it cannot load.
    for (field, want) in [("activation_dim", d), ("dict_size", f)] {
        if let Some(given) = config_int(&cfg, &cfg_path, field)? {
            ensure!(
                given == want as i64,
                "{}: field 'trainer.{field}' is {given} but the tensors of {} have {want}",
                cfg_path.display(),
                w_path.display()
            );
        }
    }
    let mut sae = ExportedSae {
        d_in: d,
        d_sae: f,
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold: None,
        architecture: "standard".into(),
        k: None,
        per_token_cap: None,
        norm: RunTimeNorm::None,
    };
    match class {
        "AutoEncoderTopK" => {
            let kk = sd.int_scalar("k")?;
            if let Some(given) = config_int(&cfg, &cfg_path, "k")? {
                ensure!(
                    given == kk,
                    "{}: field 'trainer.k' is {given} but tensor 'k' of {} is {kk}",
                    cfg_path.display(),
                    w_path.display()
                );
            }
            ensure!(
                kk >= 1 && kk as usize <= f,
                "{}: tensor 'k' is {kk}; it must lie in 1..={f} (dict_size)",
                w_path.display()
            );
            sae.k = Some(kk as usize);
            sae.architecture = "topk".into();
        }
        "BatchTopKSAE" | "MatryoshkaBatchTopKSAE" => {
            // Their encode thresholds and does not use k, but from_pretrained refuses a config
            // whose k disagrees with the state dict's.
            if let (Some(given), true) = (config_int(&cfg, &cfg_path, "k")?, sd.entries.iter().any(|(n, _)| n == "k")) {
                let kk = sd.int_scalar("k")?;
                ensure!(
                    given == kk,
                    "{}: field 'trainer.k' is {given} but tensor 'k' of {} is {kk}",
                    cfg_path.display(),
                    w_path.display()
                );
            }
            let t = sd.float_scalar("threshold")?;
            ensure!(
                t >= 0.0,
                "{}: tensor 'threshold' is {t}: never estimated during training, and {class}'s default encode \
                 then keeps every positive code; it cannot be read as the SAE it was trained to be",
                w_path.display()
            );
            sae.threshold = Some(vec![t; f]);
            sae.architecture = "jumprelu".into();
        }
        "JumpReluAutoEncoder" => {
            sae.threshold = Some(sd.get("threshold", &[f], "[dict_size]")?);
            // x W_enc + b_enc = W_enc (x - b_dec) + (b_enc + W_enc b_dec)
            for (row, b) in sae.w_enc.chunks(d).zip(sae.b_enc.iter_mut()) {
                *b = (*b as f64 + row.iter().zip(&sae.b_dec).map(|(&w, &bd)| w as f64 * bd as f64).sum::<f64>()) as f32;
            }
            sae.architecture = "jumprelu".into();
            if let Some(cap) = cfg["saetrain"]["per_token_cap"].as_u64() {
                ensure!(
                    cap >= 1 && cap as usize <= f,
                    "{}: field 'saetrain.per_token_cap' is {cap}; it must lie in 1..={f} (dict_size)",
                    cfg_path.display()
                );
                sae.per_token_cap = Some(cap as usize);
            }
        }
        _ => normalize_decoder_like_from_pretrained(&mut sae),
    }
    Ok(sae)
}

/// `config.json`'s `trainer.FIELD` as a whole number (absent or null: None); anything else is
/// refused, as `from_pretrained`'s comparisons with the state dict would fail on it.
fn config_int(cfg: &Value, cfg_path: &Path, field: &str) -> Result<Option<i64>> {
    match &cfg["trainer"][field] {
        Value::Null => Ok(None),
        v => match v.as_i64() {
            Some(n) => Ok(Some(n)),
            None => bail!("{}: field 'trainer.{field}' is {v}, expected a whole number", cfg_path.display()),
        },
    }
}

/// `AutoEncoder.normalize_decoder`: unless every decoder column's norm is `allclose` to 1
/// (|n - 1| <= 1e-8 + 1e-5), divide each by its norm and multiply its encoder row and bias by it.
fn normalize_decoder_like_from_pretrained(sae: &mut ExportedSae) {
    let d = sae.d_in;
    let norms: Vec<f64> =
        sae.w_dec.chunks(d).map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()).collect();
    if norms.iter().all(|&n| (n - 1.0).abs() <= 1e-8 + 1e-5) {
        return;
    }
    for (j, &n) in norms.iter().enumerate() {
        // torch divides by a zero norm too (a NaN column); a dead row is left as it is instead.
        if n == 0.0 {
            continue;
        }
        sae.w_dec[j * d..(j + 1) * d].iter_mut().for_each(|v| *v = (*v as f64 / n) as f32);
        sae.w_enc[j * d..(j + 1) * d].iter_mut().for_each(|v| *v = (*v as f64 * n) as f32);
        sae.b_enc[j] = (sae.b_enc[j] as f64 * n) as f32;
    }
}

/// A read state dict and its file, for errors that name both.
struct StateDictFile {
    path: PathBuf,
    entries: Vec<(String, LoadedTensor)>,
}

impl StateDictFile {
    /// Refuse a state dict with entries `class` does not have: `load_state_dict` is strict there,
    /// so dictionary_learning would refuse the file, and what the entry holds would be dropped here.
    fn only(&self, class: &str) -> Result<()> {
        let known: &[&str] = match class {
            "AutoEncoderTopK" | "BatchTopKSAE" => {
                &["encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"]
            }
            "MatryoshkaBatchTopKSAE" => &["W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"],
            "JumpReluAutoEncoder" => &["W_enc", "b_enc", "W_dec", "b_dec", "threshold"],
            _ => &["encoder.weight", "encoder.bias", "decoder.weight", "bias"],
        };
        let extra: Vec<&str> = self.entries.iter().map(|(n, _)| n.as_str()).filter(|n| !known.contains(n)).collect();
        ensure!(
            extra.is_empty(),
            "{}: {} not part of the state dict of {class} (expected only {})",
            self.path.display(),
            extra.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
                + if extra.len() > 1 { " are" } else { " is" },
            known.join(", ")
        );
        Ok(())
    }

    fn tensor(&self, name: &str) -> Result<&LoadedTensor> {
        match self.entries.iter().find(|(n, _)| n == name) {
            Some((_, t)) => Ok(t),
            None => {
                let names: Vec<&str> = self.entries.iter().map(|(n, _)| n.as_str()).collect();
                bail!("{}: missing tensor '{name}' (the file holds: {})", self.path.display(), names.join(", "))
            }
        }
    }
    fn shape2(&self, name: &str) -> Result<[usize; 2]> {
        match self.tensor(name)?.shape[..] {
            [a, b] if a > 0 && b > 0 => Ok([a, b]),
            ref s => bail!("{}: tensor '{name}' has shape {s:?}, expected two non-empty axes", self.path.display()),
        }
    }
    /// Tensor `name` as f32, checked to have `shape` (`what` names its axes) and finite values.
    fn get(&self, name: &str, shape: &[usize], what: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name)?;
        ensure!(
            t.shape == shape,
            "{}: tensor '{name}' has shape {:?}, expected {shape:?} ({what})",
            self.path.display(),
            t.shape
        );
        let TensorData::Float(v) = &t.data else {
            bail!("{}: tensor '{name}' holds integers, expected floats", self.path.display())
        };
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{}: tensor '{name}' holds a non-finite value at flat index {i}", self.path.display());
        }
        Ok(v.clone())
    }
    fn int_scalar(&self, name: &str) -> Result<i64> {
        match &self.tensor(name)?.data {
            TensorData::Int(v) if v.len() == 1 => Ok(v[0]),
            _ => bail!("{}: tensor '{name}' is not one integer", self.path.display()),
        }
    }
    fn float_scalar(&self, name: &str) -> Result<f32> {
        match &self.tensor(name)?.data {
            TensorData::Float(v) if v.len() == 1 && v[0].is_finite() => Ok(v[0]),
            _ => bail!("{}: tensor '{name}' is not one finite number", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sae(architecture: &str, threshold: Option<Vec<f32>>, k: Option<usize>) -> ExportedSae {
        let (d, f) = (3, 4);
        ExportedSae {
            d_in: d,
            d_sae: f,
            w_enc: (0..f * d).map(|i| (i as f32 * 0.37).sin()).collect(),
            b_enc: vec![0.1, -0.2, 0.3, 0.0],
            // rows of norm 2, 0.5, 0 (a dead row: left as it is) and 1
            w_dec: vec![2.0, 0.0, 0.0, 0.0, 0.3, 0.4, 0.0, 0.0, 0.0, 0.6, 0.0, 0.8],
            b_dec: vec![0.5, -1.0, 2.0],
            threshold,
            architecture: architecture.into(),
            k,
            per_token_cap: None,
            norm: RunTimeNorm::None,
        }
    }

    fn tensor<'a>(entries: &'a [(&str, Owned)], name: &str) -> &'a [f32] {
        match entries.iter().find(|(n, _)| *n == name) {
            Some((_, Owned::F32(v, _))) => v,
            _ => panic!("no f32 tensor {name}"),
        }
    }

    /// The class's `encode` and `decode` as dictionary_learning writes them (trainers/top_k.py,
    /// dictionary.py), in f64 on the state dict: codes (rows x F) and reconstructions.
    fn their_forward(class: &Class, sd: &[(&str, Owned)], x: &[f64], d: usize, f: usize) -> (Vec<f64>, Vec<f64>) {
        let rows = x.len() / d;
        let (mut z, mut xh) = (vec![0f64; rows * f], vec![0f64; rows * d]);
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let mut pre = vec![0f64; f];
            // (encoder(x - b_dec) | x @ W_enc + b_enc | encoder(x - bias)), then the rule
            match class {
                Class::JumpRelu { .. } => {
                    let (w, b) = (tensor(sd, "W_enc"), tensor(sd, "b_enc")); // d x F
                    for j in 0..f {
                        pre[j] = (0..d).map(|i| xr[i] * w[i * f + j] as f64).sum::<f64>() + b[j] as f64;
                    }
                    let t = tensor(sd, "threshold");
                    pre.iter_mut().zip(t).for_each(|(p, &t)| *p = if *p > t as f64 { p.max(0.0) } else { 0.0 });
                }
                _ => {
                    let (w, b) = (tensor(sd, "encoder.weight"), tensor(sd, "encoder.bias")); // F x d
                    let c = tensor(sd, if matches!(class, Class::TopK { .. }) { "b_dec" } else { "bias" });
                    for j in 0..f {
                        pre[j] = ((0..d).map(|i| (xr[i] - c[i] as f64) * w[j * d + i] as f64).sum::<f64>()
                            + b[j] as f64)
                            .max(0.0);
                    }
                    if let Class::TopK { k } = class {
                        let mut order: Vec<usize> = (0..f).collect();
                        order.sort_by(|&a, &b| pre[b].total_cmp(&pre[a]));
                        order[*k..].iter().for_each(|&j| pre[j] = 0.0);
                    }
                }
            }
            let (wd, bd): (Vec<f64>, &[f32]) = match class {
                Class::JumpRelu { .. } => {
                    (tensor(sd, "W_dec").iter().map(|&v| v as f64).collect(), tensor(sd, "b_dec"))
                }
                _ => {
                    let wt = tensor(sd, "decoder.weight"); // d x F
                    let w = (0..f * d).map(|e| wt[(e % d) * f + e / d] as f64).collect();
                    (w, tensor(sd, if matches!(class, Class::TopK { .. }) { "b_dec" } else { "bias" }))
                }
            };
            for i in 0..d {
                xh[r * d + i] = (0..f).map(|j| pre[j] * wd[j * d + i]).sum::<f64>() + bd[i] as f64;
            }
            z[r * f..(r + 1) * f].copy_from_slice(&pre);
        }
        (z, xh)
    }

    /// Each class, run as dictionary_learning runs it on the state dict we write, gives
    /// saetrain's codes times the row factor and saetrain's reconstructions (awkward sizes:
    /// d 7, F 37, rows of unequal norm, a zero row, b_dec far from 0, a latent that never fires).
    #[test]
    fn each_class_gives_our_codes_times_the_factor_and_our_reconstructions() {
        let (d, f, rows) = (7, 37, 23);
        let mut rng = 0x2545f4914f6cdd1du64;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        };
        let mut w_dec: Vec<f32> = (0..f * d).map(|_| rand() as f32).collect();
        for (j, row) in w_dec.chunks_mut(d).enumerate() {
            let g = if j == 5 { 0.0 } else { 0.2 + (j % 4) as f32 };
            row.iter_mut().for_each(|v| *v *= g);
        }
        let base = ExportedSae {
            d_in: d,
            d_sae: f,
            w_enc: (0..f * d).map(|_| rand() as f32).collect(),
            b_enc: (0..f).map(|_| 0.3 * rand() as f32).collect(),
            w_dec,
            b_dec: (0..d).map(|_| 5.0 * rand() as f32).collect(),
            threshold: None,
            architecture: "standard".into(),
            k: None,
            per_token_cap: None,
            norm: RunTimeNorm::None,
        };
        let mut theta: Vec<f32> = (0..f).map(|_| 0.3 * rand().abs() as f32).collect();
        theta[3] = f32::MAX;
        let saes = [
            ExportedSae { architecture: "topk".into(), k: Some(4), ..base.clone() },
            ExportedSae { architecture: "jumprelu".into(), threshold: Some(theta), ..base.clone() },
            base,
        ];
        let x: Vec<f32> = (0..rows * d).map(|i| (rand() * 3.0) as f32 + if i % d == 0 { 2.0 } else { 0.0 }).collect();
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        for s in &saes {
            let StateDict { class, entries: sd, scale } = s.dl_state_dict().unwrap();
            let (codes, recon) = s.forward(&x, rows).unwrap();
            let ours = codes.to_dense();
            let (z, xh) = their_forward(&class, &sd, &x64, d, f);
            let row_max = |r: usize| ours[r * f..(r + 1) * f].iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            for (e, (&a, &b)) in ours.iter().zip(&z).enumerate() {
                let want = a as f64 * scale[e % f];
                let tol = 1e-4 * (row_max(e / f) * scale[e % f]).max(1e-3);
                assert!((b - want).abs() <= tol, "{} entry {e}: theirs {b}, ours x factor {want}", class.name());
            }
            for (e, (&a, &b)) in recon.iter().zip(&xh).enumerate() {
                assert!(
                    (b - a as f64).abs() <= 1e-4 * (1.0 + (a as f64).abs()),
                    "{} recon {e}: {b} vs {a}",
                    class.name()
                );
            }
            assert!(ours.iter().filter(|&&v| v != 0.0).count() > rows, "{}: too few codes to test", class.name());
        }
        // dead decoder row: factor 1; the never-firing latent fires nowhere
        let sd = saes[1].dl_state_dict().unwrap();
        assert_eq!(sd.scale[5], 1.0);
        assert!(tensor(&sd.entries, "threshold")[3] >= f32::MAX);
    }

    /// Our exports read back by our loader: the codes of the file (ours times the factor) and
    /// our reconstructions; hybrid's cap comes back with it.
    #[test]
    fn exports_read_back_as_the_files_say() {
        let (d, f, rows) = (5, 19, 31);
        let w_dec: Vec<f32> = (0..f * d).map(|i| ((i * 7 % 11) as f32 - 5.0) * (1.0 + (i / d % 3) as f32)).collect();
        let base = ExportedSae {
            d_in: d,
            d_sae: f,
            w_enc: (0..f * d).map(|i| (i as f32 * 0.61).cos()).collect(),
            b_enc: (0..f).map(|j| 0.05 * j as f32 - 0.4).collect(),
            w_dec,
            b_dec: vec![1.0, -2.0, 0.5, 3.0, -0.25],
            threshold: None,
            architecture: "standard".into(),
            k: None,
            per_token_cap: None,
            norm: RunTimeNorm::None,
        };
        let theta: Vec<f32> = (0..f).map(|j| 0.1 * (j % 4) as f32).collect();
        let saes = [
            ExportedSae { architecture: "topk".into(), k: Some(3), ..base.clone() },
            ExportedSae { architecture: "jumprelu".into(), threshold: Some(theta.clone()), ..base.clone() },
            ExportedSae {
                architecture: "jumprelu".into(),
                threshold: Some(theta),
                per_token_cap: Some(2),
                ..base.clone()
            },
            base,
        ];
        let x: Vec<f32> = (0..rows * d).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.7).collect();
        for (n, s) in saes.iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            s.save_dictionary_learning(dir.path(), &json!({}), None).unwrap();
            let back = load_dictionary_learning(dir.path()).unwrap();
            assert_eq!(back.per_token_cap, s.per_token_cap, "case {n}");
            let scale = s.dl_state_dict().unwrap().scale;
            let (ours, recon) = s.forward(&x, rows).unwrap();
            let (theirs, recon_back) = back.forward(&x, rows).unwrap();
            let (ours, theirs) = (ours.to_dense(), theirs.to_dense());
            for (e, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
                let want = a as f64 * scale[e % f];
                assert!((b as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "case {n} entry {e}: {b} vs {want}");
            }
            for (&a, &b) in recon.iter().zip(&recon_back) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "case {n}: {a} vs {b}");
            }
        }
    }

    /// Files dictionary_learning's own trainers write: a BatchTopKSAE's scalar threshold becomes
    /// every latent's; an AutoEncoder's decoder is normalised as `from_pretrained` does; and what
    /// cannot be read says why.
    #[test]
    fn their_classes_read_as_their_from_pretrained_runs_them() {
        let (d, f) = (3, 4);
        let w_enc: Vec<f32> = (0..f * d).map(|i| i as f32 * 0.1 - 0.5).collect();
        let dec_t: Vec<f32> = (0..d * f).map(|i| 2.0 + i as f32).collect(); // d x F, columns of norm > 1
        let (b_enc, b_dec) = (vec![0.1f32; f], vec![0.2f32; d]);
        let write = |class: &str, entries: &[(&str, Tensor<'_>)]| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(DL_WEIGHTS_FILE), state_dict_bytes("ae", entries).unwrap()).unwrap();
            std::fs::write(
                dir.path().join(DL_CONFIG_FILE),
                json!({"trainer": {"dict_class": class, "k": 2}}).to_string(),
            )
            .unwrap();
            dir
        };
        let k = [2i32];
        for t in [0.25f32, -1.0] {
            let th = [t];
            let dir = write(
                "BatchTopKSAE",
                &[
                    ("encoder.weight", Tensor::F32(&w_enc, vec![f, d])),
                    ("encoder.bias", Tensor::F32(&b_enc, vec![f])),
                    ("decoder.weight", Tensor::F32(&dec_t, vec![d, f])),
                    ("b_dec", Tensor::F32(&b_dec, vec![d])),
                    ("k", Tensor::I32(&k, vec![])),
                    ("threshold", Tensor::F32(&th, vec![])),
                ],
            );
            match load_dictionary_learning(dir.path()) {
                Ok(s) => {
                    assert_eq!(s.threshold, Some(vec![0.25; f]));
                    assert_eq!(s.architecture, "jumprelu");
                    assert_eq!(s.w_dec, transpose(&dec_t, d, f));
                }
                Err(e) => assert!(t < 0.0 && format!("{e:#}").contains("never estimated"), "{e:#}"),
            }
        }
        let dir = write(
            "AutoEncoder",
            &[
                ("bias", Tensor::F32(&b_dec, vec![d])),
                ("encoder.weight", Tensor::F32(&w_enc, vec![f, d])),
                ("encoder.bias", Tensor::F32(&b_enc, vec![f])),
                ("decoder.weight", Tensor::F32(&dec_t, vec![d, f])),
            ],
        );
        let s = load_dictionary_learning(dir.path()).unwrap();
        let dec = transpose(&dec_t, d, f);
        for j in 0..f {
            let n = dec[j * d..(j + 1) * d].iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            for i in 0..d {
                assert!((s.w_dec[j * d + i] as f64 - dec[j * d + i] as f64 / n).abs() < 1e-6);
                assert!((s.w_enc[j * d + i] as f64 - w_enc[j * d + i] as f64 * n).abs() < 1e-5);
            }
            assert!((s.b_enc[j] as f64 - 0.1 * n).abs() < 1e-5);
        }
        // What load_dictionary would refuse: an entry the class does not have (its
        // load_state_dict is strict), config sizes or a k that disagree with the tensors.
        let autoencoder = [
            ("bias", Tensor::F32(&b_dec, vec![d])),
            ("encoder.weight", Tensor::F32(&w_enc, vec![f, d])),
            ("encoder.bias", Tensor::F32(&b_enc, vec![f])),
            ("decoder.weight", Tensor::F32(&dec_t, vec![d, f])),
        ];
        let mut extra = autoencoder.to_vec();
        extra.push(("foo", Tensor::F32(&b_dec, vec![d])));
        let e = format!("{:#}", load_dictionary_learning(write("AutoEncoder", &extra).path()).unwrap_err());
        assert!(e.contains("'foo' is not part of the state dict of AutoEncoder"), "{e}");
        let dir = write("AutoEncoder", &autoencoder);
        for (trainer, says) in [
            (json!({"dict_class": "AutoEncoder", "activation_dim": 64}), "'trainer.activation_dim' is 64"),
            (json!({"dict_class": "AutoEncoder", "dict_size": 999}), "'trainer.dict_size' is 999"),
            (json!({"dict_class": "AutoEncoder", "dict_size": "4"}), "expected a whole number"),
        ] {
            std::fs::write(dir.path().join(DL_CONFIG_FILE), json!({ "trainer": trainer }).to_string()).unwrap();
            let e = format!("{:#}", load_dictionary_learning(dir.path()).unwrap_err());
            assert!(e.contains(says) && e.contains(DL_CONFIG_FILE), "{e}");
        }
        let topk = [
            ("encoder.weight", Tensor::F32(&w_enc, vec![f, d])),
            ("encoder.bias", Tensor::F32(&b_enc, vec![f])),
            ("decoder.weight", Tensor::F32(&dec_t, vec![d, f])),
            ("b_dec", Tensor::F32(&b_dec, vec![d])),
            ("k", Tensor::I32(&k, vec![])),
        ];
        let dir = write("AutoEncoderTopK", &topk);
        assert_eq!(load_dictionary_learning(dir.path()).unwrap().k, Some(2));
        for (kk, says) in [(json!("2"), "expected a whole number"), (json!(3), "'trainer.k' is 3")] {
            let cfg = json!({"trainer": {"dict_class": "AutoEncoderTopK", "k": kk}});
            std::fs::write(dir.path().join(DL_CONFIG_FILE), cfg.to_string()).unwrap();
            let e = format!("{:#}", load_dictionary_learning(dir.path()).unwrap_err());
            assert!(e.contains(says), "{e}");
        }
        let dir = write("GatedAutoEncoder", &[("bias", Tensor::F32(&b_dec, vec![d]))]);
        let e = format!("{:#}", load_dictionary_learning(dir.path()).unwrap_err());
        assert!(e.contains("'GatedAutoEncoder'") && e.contains("known: AutoEncoderTopK"), "{e}");
        let dir = write("AutoEncoder", &[("bias", Tensor::F32(&b_dec, vec![d]))]);
        let e = format!("{:#}", load_dictionary_learning(dir.path()).unwrap_err());
        assert!(e.contains("ae.pt") && e.contains("missing tensor 'encoder.weight' (the file holds: bias)"), "{e}");
    }

    #[test]
    fn topk_is_scaled_by_one_factor_and_keeps_its_k() {
        let s = sae("topk", None, Some(2));
        let dir = std::env::temp_dir().join(format!("saetrain-dl-topk-{}", std::process::id()));
        s.save_dictionary_learning(&dir, &json!({"model_name": "m", "hook_layer": 3, "context_size": 128}), None)
            .unwrap();
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(DL_CONFIG_FILE)).unwrap()).unwrap();
        assert_eq!(cfg["trainer"]["dict_class"], "AutoEncoderTopK");
        assert_eq!(cfg["trainer"]["k"], 2);
        assert_eq!(cfg["trainer"]["lm_name"], "m");
        assert_eq!(cfg["trainer"]["layer"], 3);
        assert_eq!(cfg["buffer"]["ctx_len"], 128);
        // mean of the live norms (2, 0.5, 1): the one factor
        let note = cfg["saetrain"]["decoder_rows_normalized"].as_str().unwrap();
        assert!(note.contains("factors 1.166667e0 to 1.166667e0"), "{note}");
        assert!(dir.join(DL_WEIGHTS_FILE).is_file());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_the_layout_cannot_hold_is_refused_with_the_way_out() {
        let e = sae("batchtopk", None, Some(2)).dl_class().err().unwrap();
        assert!(format!("{e:#}").contains("give --k to convert it to TopK"), "{e:#}");
        let mut s = sae("topk", None, Some(2));
        s.norm = RunTimeNorm::LayerNorm { eps: 0.0 };
        let e = s.dl_class().err().unwrap();
        assert!(format!("{e:#}").contains("--format saelens (layer_norm)"), "{e:#}");
    }
}
