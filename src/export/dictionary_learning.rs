//! dictionary_learning layout (saprmarks/dictionary_learning: the PyPI release 0.1.0 and GitHub
//! main of 2025-08 read it alike): a folder with `ae.pt`, a `torch.save` state dict
//! ([`super::torch_save`]), and `config.json`, which `dictionary_learning.utils.load_dictionary(
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
//!   n_j): exact, since those rules look at one latent at a time. TopK compares latents, so its
//!   SAE is rescaled by one factor, the mean row norm, which keeps its ranking. dictionary_learning
//!   therefore gives saetrain's codes times n_j (the codes of a unit-norm decoder: raw activation
//!   units, as its own `scale_biases` leaves them) and the same reconstructions.
//! - dictionary_learning's `BatchTopKSAE` has one scalar threshold; ours are per latent, so a
//!   batchtopk SAE is a `JumpReluAutoEncoder`. One without thresholds is refused: `BatchTopKSAE`
//!   with no threshold keeps every positive code by default.
//! - No class normalises its input at run time: a per-token normalised SAE is refused.
//! - hybrid's per-token cap cannot be expressed: `JumpReluAutoEncoder`, with the cap and what it
//!   changes in `config.json` (`saetrain.per_token_cap_note`).

use super::saelens::{per_token_cap_note, transpose, ExportedSae, RunTimeNorm};
use super::torch_save::{state_dict_bytes, Tensor};
use crate::sparsify::Selection;
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

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

/// What `ae.pt` holds: the class, its tensors in order, and per latent the factor its decoder row
/// was divided by (its codes multiplied by).
struct StateDict {
    class: Class,
    entries: Vec<(&'static str, Owned)>,
    scale: Vec<f64>,
}

/// How an SAE is written for dictionary_learning.
enum Class {
    TopK { k: usize },
    JumpRelu { theta: Vec<f32> },
    Standard,
}

impl Class {
    fn name(&self) -> &'static str {
        match self {
            Self::TopK { .. } => "AutoEncoderTopK",
            Self::JumpRelu { .. } => "JumpReluAutoEncoder",
            Self::Standard => "AutoEncoder",
        }
    }
}

impl ExportedSae {
    /// The dictionary_learning class of this SAE (`config.json` `trainer.dict_class`).
    pub fn dictionary_learning_class(&self) -> Result<&'static str> {
        Ok(self.dl_class()?.name())
    }

    fn dl_class(&self) -> Result<Class> {
        if self.norm != RunTimeNorm::None {
            bail!(
                "the dictionary_learning layout has no input normalisation, and this SAE expects per-token \
                 normalised inputs (trained with --normalize per-token): export it with --format saelens (layer_norm)"
            );
        }
        Ok(match self.selection()? {
            Selection::TopK { k } => Class::TopK { k },
            Selection::JumpRelu { theta } | Selection::JumpReluCap { theta, .. } => {
                Class::JumpRelu { theta: theta.to_vec() }
            }
            Selection::Relu => Class::Standard,
            Selection::BatchTopK { .. } => bail!(
                "this batchtopk SAE has no thresholds, and dictionary_learning's BatchTopKSAE keeps every positive \
                 code unless told not to: give --k to convert it to TopK, or export it with --format saelens"
            ),
            _ => bail!("architecture '{}' has no dictionary_learning class", self.architecture),
        })
    }

    /// The state dict dictionary_learning's class loads.
    fn dl_state_dict(&self) -> Result<StateDict> {
        let class = self.dl_class()?;
        let (d, f) = (self.d_in, self.d_sae);
        let norms = self.w_dec.chunks(d).map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt());
        let scale: Vec<f64> = match class {
            Class::TopK { .. } => {
                let live: Vec<f64> = norms.filter(|&n| n > 0.0).collect();
                let mean = if live.is_empty() { 1.0 } else { live.iter().sum::<f64>() / live.len() as f64 };
                vec![mean; f]
            }
            _ => norms.map(|n| if n > 0.0 { n } else { 1.0 }).collect(),
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
                    ("threshold", f32s(by_latent(theta, times), vec![f])),
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
        let tensors: Vec<(&str, Tensor<'_>)> = entries
            .iter()
            .map(|(name, t)| {
                let t = match t {
                    Owned::F32(v, shape) => Tensor::F32(v, shape.clone()),
                    Owned::I32(v, shape) => Tensor::I32(v, shape.clone()),
                };
                (*name, t)
            })
            .collect();
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
                match class {
                    Class::TopK { .. } => "one factor for all latents, the mean row norm, which keeps TopK's ranking",
                    _ => "each latent by its own row norm",
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
