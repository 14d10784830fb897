//! Loading an SAE for inference, independently of training: the SAELens layout (`cfg.json` +
//! `sae_weights.safetensors`, also what every run directory holds), EleutherAI sparsify's
//! (`cfg.json` + `sae.safetensors`) and dictionary_learning's (`config.json` + `ae.pt`, read in
//! [`super::dictionary_learning`]). Tensors may be F32, F16, BF16 or F64.
//!
//! A checkpoint that does not describe one SAE consistently is refused with a message naming
//! the file and the field: a missing tensor, a tensor of the wrong shape, a `cfg.json` value that
//! disagrees with the tensors, an unknown architecture.

use super::dictionary_learning::{load_dictionary_learning, DL_CONFIG_FILE, DL_WEIGHTS_FILE};
use super::saelens::{ExportedSae, RunTimeNorm, CFG_FILE, SAELENS_LN_EPS, WEIGHTS_FILE};
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Weights file of the sparsify layout.
pub const SPARSIFY_WEIGHTS_FILE: &str = "sae.safetensors";

/// Which on-disk layout a checkpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    Saelens,
    Sparsify,
    DictionaryLearning,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Saelens => "saelens",
            Layout::Sparsify => "sparsify",
            Layout::DictionaryLearning => "dictionary_learning",
        }
    }
}

/// The layout of the checkpoint in `dir` (SAELens when both weight files are present).
pub fn detect_layout(dir: &Path) -> Result<Layout> {
    if dir.join(WEIGHTS_FILE).is_file() {
        return Ok(Layout::Saelens);
    }
    if dir.join(SPARSIFY_WEIGHTS_FILE).is_file() {
        return Ok(Layout::Sparsify);
    }
    if dir.join(DL_WEIGHTS_FILE).is_file() {
        return Ok(Layout::DictionaryLearning);
    }
    if !dir.exists() {
        bail!("{}", crate::util::paths::missing(dir, "SAE path"));
    }
    // A sparsify hub checkout holds one sub-directory per hookpoint, a dictionary_learning
    // training folder one per trainer.
    let subs: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    [SPARSIFY_WEIGHTS_FILE, WEIGHTS_FILE, DL_WEIGHTS_FILE].iter().any(|w| e.path().join(w).is_file())
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if !subs.is_empty() {
        let mut subs = subs;
        subs.sort();
        bail!("{}: holds several SAEs; pass one of its sub-directories: {}", dir.display(), subs.join(", "));
    }
    // Run directories that hold no SAE yet say why.
    let diverged = dir.join(crate::train::DIVERGED_FILE);
    if let Some(why) =
        std::fs::read_to_string(&diverged).ok().and_then(|t| serde_json::from_str::<crate::train::Diverged>(&t).ok())
    {
        bail!("{}: a run that diverged ({why}; {}) and wrote no SAE", dir.display(), diverged.display());
    }
    if dir.join(crate::train::CONFIG_FILE).is_file() && !dir.join(CFG_FILE).exists() {
        bail!(
            "{}: a run stopped before its first checkpoint, so it holds no SAE yet: finish it with sae train \
             --resume {}",
            dir.display(),
            dir.display()
        );
    }
    bail!(
        "{}: not an SAE checkpoint: expected {} (SAELens layout) or {} (sparsify layout) beside {}, or {} \
         beside {} (dictionary_learning layout)",
        dir.display(),
        WEIGHTS_FILE,
        SPARSIFY_WEIGHTS_FILE,
        CFG_FILE,
        DL_WEIGHTS_FILE,
        DL_CONFIG_FILE
    )
}

/// Load the SAE in `path`: a directory in either layout, or one of its weight files.
pub fn load_sae(path: &Path) -> Result<ExportedSae> {
    Ok(load_sae_with_layout(path)?.0)
}

/// [`load_sae`], also saying which layout was read.
pub fn load_sae_with_layout(path: &Path) -> Result<(ExportedSae, Layout)> {
    let dir = checkpoint_dir(path);
    // A weight file named explicitly is read in its own layout, even where the folder holds
    // another one too (detect_layout prefers SAELens).
    let named = path.is_file().then(|| path.file_name()).flatten().and_then(|n| match n.to_str()? {
        WEIGHTS_FILE => Some(Layout::Saelens),
        SPARSIFY_WEIGHTS_FILE => Some(Layout::Sparsify),
        DL_WEIGHTS_FILE => Some(Layout::DictionaryLearning),
        _ => None,
    });
    let layout = match named {
        Some(l) => l,
        None => detect_layout(&dir)?,
    };
    let sae = match layout {
        Layout::Saelens => load_saelens(&dir)?,
        Layout::Sparsify => load_sparsify(&dir)?,
        Layout::DictionaryLearning => load_dictionary_learning(&dir)?,
    };
    Ok((sae, layout))
}

/// The directory of a checkpoint given as a directory or as one of its weight files.
pub fn checkpoint_dir(path: &Path) -> PathBuf {
    if path.is_file() {
        path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    } else {
        path.to_path_buf()
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    ensure!(v.is_object(), "{}: expected a JSON object", path.display());
    Ok(v)
}

/// A non-negative integer field of `cfg.json` (absent or null: None).
fn cfg_usize(cfg: &Value, file: &Path, field: &str) -> Result<Option<usize>> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            // SAELens allows a float k for batchtopk; accept integral floats.
            let n = v.as_u64().or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64));
            match n {
                Some(n) => Ok(Some(n as usize)),
                None => bail!("{}: field '{field}' must be a non-negative integer, found {v}", file.display()),
            }
        }
    }
}

fn cfg_bool(cfg: &Value, file: &Path, field: &str, default: bool) -> Result<bool> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => bail!("{}: field '{field}' must be true or false, found {v}", file.display()),
    }
}

fn cfg_str<'a>(cfg: &'a Value, file: &Path, field: &str) -> Result<Option<&'a str>> {
    match cfg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(v) => bail!("{}: field '{field}' must be a string, found {v}", file.display()),
    }
}

/// The tensors of one safetensors file, read as f32.
struct Tensors {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Tensors {
    fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
        Ok(Self { path: path.to_path_buf(), bytes })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        Ok(t.shape().to_vec())
    }

    /// Refuse a tensor the layout does not have. SAELens, sparsify and torch load a state dict
    /// strictly, so such a file is not one they wrote or would read, and whatever the tensor
    /// holds (a skip connection, a second threshold) would be dropped here without a word.
    fn only(&self, known: &[&str], layout: &str) -> Result<()> {
        let st = self.st();
        let mut extra: Vec<&str> = st.names().into_iter().filter(|n| !known.contains(n)).collect();
        extra.sort();
        ensure!(
            extra.is_empty(),
            "{}: tensor{} {} not part of the {layout} (expected only {})",
            self.path.display(),
            if extra.len() > 1 { "s" } else { "" },
            extra.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
                + if extra.len() > 1 { " are" } else { " is" },
            known.join(", ")
        );
        Ok(())
    }

    fn missing(&self, name: &str) -> anyhow::Error {
        let st = self.st();
        let mut names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
        names.sort();
        anyhow::anyhow!("{}: missing tensor '{name}' (the file holds: {})", self.path.display(), names.join(", "))
    }

    /// Tensor `name` as f32, checked to have `shape`; `what` says what each axis should be.
    fn get(&self, name: &str, shape: &[usize], what: &str) -> Result<Vec<f32>> {
        let st = self.st();
        let t = st.tensor(name).map_err(|_| self.missing(name))?;
        ensure!(
            t.shape() == shape,
            "{}: tensor '{name}' has shape {:?}, expected {:?} ({what})",
            self.path.display(),
            t.shape(),
            shape
        );
        let data = t.data();
        let out: Vec<f32> = match t.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            other => {
                bail!("{}: tensor '{name}' has dtype {other:?}; expected F32, F16, BF16 or F64", self.path.display())
            }
        };
        if let Some(i) = out.iter().position(|v| !v.is_finite()) {
            bail!("{}: tensor '{name}' holds a non-finite value at flat index {i}", self.path.display());
        }
        Ok(out)
    }
}

/// A shape that must have `n` axes.
fn rank(t: &Tensors, name: &str, n: usize) -> Result<Vec<usize>> {
    let s = t.shape(name)?;
    ensure!(s.len() == n, "{}: tensor '{name}' has shape {s:?}, expected {n} axes", t.path.display());
    Ok(s)
}

/// A `cfg.json` size that, when present, must agree with the tensors.
fn agree(cfg_path: &Path, field: &str, given: Option<usize>, from_tensors: usize, tensor: &str) -> Result<()> {
    if let Some(g) = given {
        ensure!(
            g == from_tensors,
            "{}: field '{field}' is {g} but tensor '{tensor}' implies {from_tensors}",
            cfg_path.display()
        );
    }
    Ok(())
}

fn check_k(cfg_path: &Path, architecture: &str, k: Option<usize>, d_sae: usize) -> Result<usize> {
    let Some(k) = k else { bail!("{}: field 'k' is required for architecture '{architecture}'", cfg_path.display()) };
    ensure!(k >= 1 && k <= d_sae, "{}: field 'k' is {k}; it must lie in 1..={d_sae} (d_sae)", cfg_path.display());
    Ok(k)
}

/// SAELens layout (6.x, and pre-6.0 configs where `architecture` is absent).
pub fn load_saelens(dir: &Path) -> Result<ExportedSae> {
    let cfg_path = dir.join(CFG_FILE);
    let w_path = dir.join(WEIGHTS_FILE);
    let cfg = read_json(&cfg_path)?;
    let t = Tensors::open(&w_path)?;

    // Architecture: SAELens 6 names it; older configs default to standard unless the activation is topk.
    let architecture = match cfg_str(&cfg, &cfg_path, "architecture")? {
        Some(a) => a.to_string(),
        None => {
            let act = cfg_str(&cfg, &cfg_path, "activation_fn_str")?.or(cfg_str(&cfg, &cfg_path, "activation_fn")?);
            if act == Some("topk") {
                "topk".to_string()
            } else {
                "standard".to_string()
            }
        }
    };
    const KNOWN: [&str; 4] = ["standard", "topk", "batchtopk", "jumprelu"];
    ensure!(
        KNOWN.contains(&architecture.as_str()),
        "{}: field 'architecture' is '{architecture}', which this loader does not know (known: {})",
        cfg_path.display(),
        KNOWN.join(", ")
    );

    let we = rank(&t, "W_enc", 2)?;
    let (d, f) = (we[0], we[1]);
    ensure!(d > 0 && f > 0, "{}: tensor 'W_enc' has an empty shape {we:?}", w_path.display());
    // Every SAELens config names both sizes (they have no default there); a cfg.json without them
    // is another library's beside SAELens weights (a sparsify export written over a run's).
    for field in ["d_in", "d_sae"] {
        ensure!(
            cfg_usize(&cfg, &cfg_path, field)?.is_some(),
            "{}: field '{field}' is missing; a SAELens cfg.json names d_in and d_sae",
            cfg_path.display()
        );
    }
    agree(&cfg_path, "d_in", cfg_usize(&cfg, &cfg_path, "d_in")?, d, "W_enc")?;
    agree(&cfg_path, "d_sae", cfg_usize(&cfg, &cfg_path, "d_sae")?, f, "W_enc")?;
    let thresholded = matches!(architecture.as_str(), "jumprelu" | "batchtopk");
    let known: &[&str] = if thresholded {
        &["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "scaling_factor"]
    } else {
        &["W_enc", "b_enc", "W_dec", "b_dec", "scaling_factor"]
    };
    t.only(known, &format!("SAELens {architecture} SAE"))?;
    let w_enc_t = t.get("W_enc", &[d, f], "[d_in, d_sae]")?;
    let mut b_enc = t.get("b_enc", &[f], "[d_sae]")?;
    let mut w_dec = t.get("W_dec", &[f, d], "[d_sae, d_in]")?;
    let b_dec = t.get("b_dec", &[d], "[d_in]")?;
    let mut w_enc = super::saelens::transpose(&w_enc_t, d, f);

    let threshold = match architecture.as_str() {
        "jumprelu" => Some(t.get("threshold", &[f], "[d_sae]")?),
        "batchtopk" if t.has("threshold") => Some(t.get("threshold", &[f], "[d_sae]")?),
        _ => None,
    };
    let k = match architecture.as_str() {
        "topk" => {
            let k = cfg_usize(&cfg, &cfg_path, "k")?.or(cfg
                .get("activation_fn_kwargs")
                .and_then(|kw| kw.get("k"))
                .and_then(Value::as_u64)
                .map(|k| k as usize));
            Some(check_k(&cfg_path, "topk", k, f)?)
        }
        "batchtopk" => Some(check_k(&cfg_path, "batchtopk", cfg_usize(&cfg, &cfg_path, "k")?, f)?),
        _ => None,
    };

    let norm = match cfg_str(&cfg, &cfg_path, "normalize_activations")? {
        // SAELens applies no run-time transform for these when loading from disk.
        None | Some("none") | Some("expected_average_only_in") => RunTimeNorm::None,
        // saetrain's per-token exports: the training rule exactly; anyone else's: SAELens's.
        Some("layer_norm") => match cfg.get("saetrain").and_then(|e| e.get("per_token_normalize")) {
            Some(_) => RunTimeNorm::LayerNorm { eps: 0.0 },
            None => RunTimeNorm::LayerNorm { eps: SAELENS_LN_EPS },
        },
        Some(other) => bail!(
            "{}: field 'normalize_activations' is '{other}', which this loader does not support \
             (supported: none, expected_average_only_in, layer_norm)",
            cfg_path.display()
        ),
    };
    if let Some(s) = t.has("scaling_factor").then(|| t.get("scaling_factor", &[f], "[d_sae]")).transpose()? {
        ensure!(
            s.iter().all(|v| *v == 1.0),
            "{}: tensor 'scaling_factor' (finetuning scaling) is not all ones; not supported",
            w_path.display()
        );
    }
    // apply_b_dec_to_input = false: pre = x W_enc^T + b_enc = (x - b_dec) W_enc^T + (b_enc + W_enc b_dec).
    if !cfg_bool(&cfg, &cfg_path, "apply_b_dec_to_input", true)? {
        for (i, be) in b_enc.iter_mut().enumerate() {
            let row = &w_enc[i * d..(i + 1) * d];
            *be += row.iter().zip(&b_dec).map(|(w, b)| w * b).sum::<f32>();
        }
    }
    // rescale_acts_by_decoder_norm (topk): select on pre * ||W_dec_i||, decode z / ||W_dec_i||.
    // Folded: W_enc_i and b_enc_i times n_i, W_dec_i over n_i.
    if architecture == "topk" && cfg_bool(&cfg, &cfg_path, "rescale_acts_by_decoder_norm", false)? {
        for i in 0..f {
            let dec = &mut w_dec[i * d..(i + 1) * d];
            let n = dec.iter().map(|v| v * v).sum::<f32>().sqrt();
            if n > 0.0 {
                dec.iter_mut().for_each(|v| *v /= n);
                w_enc[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= n);
                b_enc[i] *= n;
            }
        }
    }
    let per_token_cap = match cfg.get("per_token_cap") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().map(|c| c as usize).with_context(|| {
            format!("{}: field 'per_token_cap' is {v}, expected a whole number of latents", cfg_path.display())
        })?),
    };
    if let Some(cap) = per_token_cap {
        ensure!(
            (1..=f).contains(&cap),
            "{}: field 'per_token_cap' is {cap}; it must lie in 1..={f} (d_sae)",
            cfg_path.display()
        );
    }
    Ok(ExportedSae { d_in: d, d_sae: f, w_enc, b_enc, w_dec, b_dec, threshold, architecture, k, per_token_cap, norm })
}

/// EleutherAI sparsify layout: `sae.safetensors` with `encoder.weight [d_sae, d_in]`,
/// `encoder.bias [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`; `cfg.json` with `k`,
/// `num_latents` (0: `expansion_factor * d_in`) and usually `d_in`. A TopK SAE.
pub fn load_sparsify(dir: &Path) -> Result<ExportedSae> {
    let cfg_path = dir.join(CFG_FILE);
    let w_path = dir.join(SPARSIFY_WEIGHTS_FILE);
    let cfg = read_json(&cfg_path)?;
    let t = Tensors::open(&w_path)?;

    if let Some(act) = cfg_str(&cfg, &cfg_path, "activation")? {
        ensure!(
            act == "topk",
            "{}: field 'activation' is '{act}', which this loader does not know (known: topk)",
            cfg_path.display()
        );
    }
    ensure!(
        !cfg_bool(&cfg, &cfg_path, "transcode", false)?,
        "{}: field 'transcode' is true: transcoders are not SAEs and are not supported",
        cfg_path.display()
    );
    ensure!(
        !cfg_bool(&cfg, &cfg_path, "skip_connection", false)? && !t.has("W_skip"),
        "{}: field 'skip_connection' / tensor 'W_skip': skip connections are not supported",
        cfg_path.display()
    );

    t.only(&["encoder.weight", "encoder.bias", "W_dec", "b_dec"], "sparsify TopK SAE")?;
    let we = rank(&t, "encoder.weight", 2)?;
    let (f, d) = (we[0], we[1]);
    ensure!(d > 0 && f > 0, "{}: tensor 'encoder.weight' has an empty shape {we:?}", w_path.display());
    agree(&cfg_path, "d_in", cfg_usize(&cfg, &cfg_path, "d_in")?, d, "encoder.weight")?;
    let num_latents = cfg_usize(&cfg, &cfg_path, "num_latents")?.unwrap_or(0);
    if num_latents > 0 {
        agree(&cfg_path, "num_latents", Some(num_latents), f, "encoder.weight")?;
    } else if let Some(e) = cfg_usize(&cfg, &cfg_path, "expansion_factor")? {
        ensure!(
            e * d == f,
            "{}: field 'expansion_factor' is {e} (x d_in {d} = {}) but tensor 'encoder.weight' has {f} latents",
            cfg_path.display(),
            e * d
        );
    }
    let w_enc = t.get("encoder.weight", &[f, d], "[num_latents, d_in]")?;
    let b_enc = t.get("encoder.bias", &[f], "[num_latents]")?;
    let w_dec = t.get("W_dec", &[f, d], "[num_latents, d_in]")?;
    let b_dec = t.get("b_dec", &[d], "[d_in]")?;
    let k = check_k(&cfg_path, "topk", cfg_usize(&cfg, &cfg_path, "k")?, f)?;
    Ok(ExportedSae {
        d_in: d,
        d_sae: f,
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold: None,
        architecture: "topk".into(),
        k: Some(k),
        per_token_cap: None,
        norm: RunTimeNorm::None,
    })
}
