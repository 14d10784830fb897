//! `manifest.json`: what a directory of activation shards holds. Written by `scripts/harvest.py`
//! and `sae data synth`; optional for users. When present it is checked against the files.

use super::format::{Dtype, Shard};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Component, Path};

pub const MANIFEST: &str = "manifest.json";
pub const GROUND_TRUTH: &str = "ground_truth.npy";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestShard {
    /// File name relative to the manifest's directory.
    pub file: String,
    pub rows: usize,
    /// Token ids of these rows (int32 npy, same row order), when the harvester saved them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always "saetrain-activations".
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_version")]
    pub version: u32,
    /// Source model (Hugging Face id), or "synthetic".
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub layer: Option<i64>,
    /// Hook name, e.g. `blocks.15.hook_resid_pre`.
    #[serde(default)]
    pub hook: Option<String>,
    pub d_in: usize,
    /// float32 | float16 | bfloat16
    pub dtype: Dtype,
    pub shards: Vec<ManifestShard>,
    #[serde(default)]
    pub total_rows: Option<usize>,
    /// How the stored values were scaled (e.g. "none: raw residual stream").
    #[serde(default)]
    pub normalization: Option<String>,
    /// Anything else (context length, dataset, synthetic spec, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<serde_json::Value>,
}

fn default_format() -> String {
    "saetrain-activations".into()
}
fn default_version() -> u32 {
    1
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let m: Manifest = crate::util::json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid manifest: {e}", path.display()))?;
        for s in &m.shards {
            check_inside(path, &s.file)?;
        }
        check_extra(path, m.extra.as_ref())?;
        if let Some(t) = m.total_rows {
            let s: usize = m.shards.iter().map(|s| s.rows).sum();
            if t != s {
                bail!("{}: field total_rows = {t} but the shards' rows sum to {s}", path.display());
            }
        }
        Ok(m)
    }

    /// Written atomically (a temporary beside it, then a rename): a reader never sees half a
    /// manifest, and a failed write leaves the old one and no temporary.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::util::atomic::write_atomic(path, (text + "\n").as_bytes())
    }

    /// The SAELens `cfg.json` `metadata` fields this data set determines: `model_name`,
    /// `hook_name`, `hook_layer`, `context_size` and `prepend_bos`, each only when the manifest
    /// says it (`model`, `hook`, `layer` or the layer of a `blocks.L.hook_*` hook,
    /// `extra.context_length`, `extra.prepend_bos`). The harvester writes all of them; a
    /// synthetic data set (`model` "synthetic", no hook) gives only `model_name`.
    pub fn saelens_metadata(&self) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::Value;
        let mut md = serde_json::Map::new();
        if let Some(m) = &self.model {
            md.insert("model_name".into(), Value::from(m.as_str()));
        }
        if let Some(h) = &self.hook {
            md.insert("hook_name".into(), Value::from(h.as_str()));
        }
        let hook_layer = self.layer.or_else(|| self.hook.as_deref().and_then(hook_layer));
        if let Some(l) = hook_layer {
            md.insert("hook_layer".into(), Value::from(l));
        }
        let extra = self.extra.as_ref();
        if let Some(c) = extra.and_then(|e| e.get("context_length")).filter(|v| v.is_u64()) {
            md.insert("context_size".into(), c.clone());
        }
        if let Some(b) = extra.and_then(|e| e.get("prepend_bos")).filter(|v| v.is_boolean()) {
            md.insert("prepend_bos".into(), b.clone());
        }
        md
    }

    /// Check an opened shard against its entry (file name = the shard's name).
    pub fn check(&self, manifest_path: &Path, shard: &Shard) -> Result<()> {
        let name = shard.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let mp = manifest_path.display();
        // By file name, or by path for an entry in a sub-directory (`sub/a.npy`).
        let dir = manifest_path.parent().unwrap_or(Path::new(""));
        let Some(entry) = self.shards.iter().find(|s| s.file == name || dir.join(&s.file) == shard.path) else {
            bail!("{}: not listed in {mp} (field shards)", shard.path.display());
        };
        if shard.d_in != self.d_in {
            bail!("{}: d_in {} but {mp} says d_in = {}", shard.path.display(), shard.d_in, self.d_in);
        }
        if shard.dtype != self.dtype {
            bail!("{}: dtype {} but {mp} says dtype = {}", shard.path.display(), shard.dtype, self.dtype);
        }
        if shard.rows != entry.rows {
            bail!("{}: {} rows but {mp} says rows = {} for this shard", shard.path.display(), shard.rows, entry.rows);
        }
        Ok(())
    }
}

/// The `extra` fields this tool reads must have their type: a `rows_per_window` of "127" (a
/// string) would otherwise be ignored, and held-out rows would split token windows unnoticed.
fn check_extra(path: &Path, extra: Option<&serde_json::Value>) -> Result<()> {
    let Some(extra) = extra else { return Ok(()) };
    let Some(fields) = extra.as_object() else {
        bail!("{}: field extra = {extra}: expected an object", path.display());
    };
    type Check = fn(&serde_json::Value) -> bool;
    let positive: Check = |v| v.as_u64().is_some_and(|n| n > 0);
    let checks: [(&str, &str, Check); 3] = [
        ("rows_per_window", "a positive integer (activation rows per token window)", positive),
        ("context_length", "a positive integer (tokens per window)", positive),
        ("prepend_bos", "true or false", |v| v.is_boolean()),
    ];
    for (name, expected, ok) in checks {
        match fields.get(name) {
            Some(v) if !v.is_null() && !ok(v) => {
                bail!("{}: field extra.{name} = {v}: expected {expected}", path.display())
            }
            _ => {}
        }
    }
    Ok(())
}

/// L of a TransformerLens / SAELens hook name `blocks.L.<anything>`.
fn hook_layer(hook: &str) -> Option<i64> {
    hook.strip_prefix("blocks.")?.split('.').next()?.parse().ok()
}

/// A shard entry must name a file inside the manifest's directory: a relative path without
/// `..` (an entry like `../good.npy` would read data from outside the dataset).
fn check_inside(manifest_path: &Path, file: &str) -> Result<()> {
    let mp = manifest_path.display();
    if file.is_empty() {
        bail!("{mp}: field shards: an entry has an empty file name");
    }
    let dir = manifest_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if Path::new(file).is_absolute() {
        bail!(
            "{mp}: field shards: file '{file}' is an absolute path; entries are paths relative to the dataset directory {}",
            dir.display()
        );
    }
    if Path::new(file).components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        bail!(
            "{mp}: field shards: file '{file}' escapes the dataset directory {}; entries must be paths inside it",
            dir.display()
        );
    }
    Ok(())
}
