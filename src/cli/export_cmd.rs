//! `sae export RUN --format saelens|sparsify|dictionary-learning --out DIR`

use crate::config::TrainConfig;
use crate::eval::out_dir::{self, RUN_EVAL_DIRS};
use crate::export::dictionary_learning::{is_dictionary_learning_config, DL_CONFIG_FILE, DL_WEIGHTS_FILE};
use crate::export::load::{checkpoint_dir, load_sae_with_layout, SPARSIFY_WEIGHTS_FILE};
use crate::export::saelens::{CFG_FILE, WEIGHTS_FILE};
use crate::export::ExportedSae;
use crate::train::checkpoint::{self, STATE_FILE};
use crate::train::rundir;
use crate::train::{effective_encoder, CONFIG_FILE};
use crate::util::atomic::is_our_temporary;
use crate::util::sweep::{describe, sweep_stale_temporaries};
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Every file an export writes (in any layout): whose stale temporaries it sweeps.
pub const EXPORT_FILES: &[&str] = &[CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE, DL_WEIGHTS_FILE, DL_CONFIG_FILE];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// SAELens 6.x: cfg.json + sae_weights.safetensors.
    Saelens,
    /// EleutherAI sparsify: cfg.json + sae.safetensors (TopK SAEs only).
    Sparsify,
    /// saprmarks/dictionary_learning: ae.pt + config.json (AutoEncoderTopK, JumpReluAutoEncoder
    /// or AutoEncoder), for `dictionary_learning.utils.load_dictionary`.
    DictionaryLearning,
}

impl ExportFormat {
    fn layout(self) -> &'static str {
        match self {
            Self::Saelens => "SAELens",
            Self::Sparsify => "sparsify",
            Self::DictionaryLearning => "dictionary_learning",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Run directory (or an SAE checkpoint in any layout it reads, to convert it).
    pub run: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Write the SAE as TopK with this k (needed for sparsify when the SAE is not TopK, and for
    /// dictionary-learning when it is a batchtopk SAE without thresholds; lossy).
    #[arg(long)]
    pub k: Option<usize>,
    /// SAELens metadata.model_name (e.g. the Hugging Face id of the model).
    #[arg(long)]
    pub model_name: Option<String>,
    /// SAELens metadata.hook_name (e.g. blocks.6.hook_resid_post).
    #[arg(long)]
    pub hook_name: Option<String>,
    /// SAELens metadata.hook_layer.
    #[arg(long)]
    pub hook_layer: Option<usize>,
    /// SAELens metadata.context_size.
    #[arg(long)]
    pub context_size: Option<usize>,
    /// Write into a non-empty --out (replacing the files of the export; others are left alone).
    #[arg(long)]
    pub overwrite: bool,
}

/// Where an export may go. A run directory's `cfg.json` and `sae_weights.safetensors` are its
/// own SAE (what `sae eval` reports as exported, beside the trainer state): another SAE written
/// there, or this SAE in another layout or made lossy (`--k`), would make the run's directory
/// lie, so the only export allowed into a run directory is the run's own plain SAELens one (which
/// rewrites what training wrote), `--overwrite` or not. A checkpoint that is not a run is never
/// converted in place. Any other non-empty directory needs `--overwrite`.
fn check_out(run: &Path, out: &Path, overwrite: bool, format: ExportFormat, k: Option<usize>) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a directory", out.display());
    }
    refuse_run_subdir(out)?;
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    // Temporaries a killed export left are ours (swept next), not the user's files.
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !is_our_temporary(n))
        .collect();
    let own = std::fs::canonicalize(out).ok() == std::fs::canonicalize(checkpoint_dir(run)).ok();
    let holds_run = names.iter().any(|n| n == STATE_FILE || n == rundir::LOCK_FILE)
        || (names.iter().any(|n| n == CONFIG_FILE) && !is_dictionary_learning_config(out));
    let shown = || names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if holds_run && !own {
        bail!(
            "--out {} holds another training run ({}): an export there would replace that run's own SAE ({CFG_FILE}, {WEIGHTS_FILE}), --overwrite or not; choose another --out",
            out.display(),
            shown()
        );
    }
    if own && !names.is_empty() {
        let why = match (format, k) {
            _ if !holds_run => "the export would replace the files it is read from".to_string(),
            (ExportFormat::Saelens, None) => return Ok(()),
            (ExportFormat::Saelens, Some(k)) => {
                format!("the TopK SAE with k {k} (lossy) would replace the run's own SAE ({WEIGHTS_FILE})")
            }
            (ExportFormat::Sparsify, _) => {
                format!("the sparsify layout's {CFG_FILE} would replace the run's SAELens {CFG_FILE}")
            }
            (ExportFormat::DictionaryLearning, _) => {
                format!("the dictionary_learning layout's {DL_CONFIG_FILE} would replace the run's {CONFIG_FILE}")
            }
        };
        let what = if holds_run { "holds a training run" } else { "is the checkpoint being exported" };
        bail!("--out {} {what}: {why}, --overwrite or not; choose another --out", out.display());
    }
    if names.is_empty() || overwrite {
        return Ok(());
    }
    bail!(
        "--out {} is not empty ({}); pass --overwrite to write the export there anyway, or choose another --out",
        out.display(),
        shown()
    )
}

/// Refuse an `--out` inside one of the folders a run directory's trainer and `sae eval` manage
/// (`checkpoints/`, `eval/`, `eval-history/`), at any depth, links resolved: an export there
/// would be taken for (or block) their own contents (`checkpoints/` holds only `step_NNNNNN/`
/// checkpoints, and `train --overwrite` refuses to replace what it does not know there).
fn refuse_run_subdir(out: &Path) -> Result<()> {
    let abs = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    // Resolve the part that exists (links included); the rest is appended as given.
    let mut real = abs.clone();
    let mut rest = vec![];
    while !real.exists() {
        match (real.file_name().map(|n| n.to_os_string()), real.parent()) {
            (Some(n), Some(p)) => {
                rest.push(n);
                real = p.to_path_buf();
            }
            _ => break,
        }
    }
    let mut full = std::fs::canonicalize(&real).unwrap_or(real);
    full.extend(rest.iter().rev());
    let managed = |sub: &str| sub == crate::train::history::CHECKPOINTS_DIR || RUN_EVAL_DIRS.contains(&sub);
    for dir in full.ancestors().skip(1).filter(|dir| out_dir::holds_run(dir)) {
        let below = full.strip_prefix(dir).ok().and_then(|r| r.components().next());
        if let Some(sub) = below.map(|c| c.as_os_str().to_string_lossy().into_owned()) {
            if managed(&sub) {
                bail!(
                    "--out {} is inside the {sub}/ folder of the training run {}, which the run manages itself; choose another --out",
                    out.display(),
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// Say so when a run's own SAELens weights cannot be read: the export is rebuilt from its
/// trainer state (always, since that is the latest checkpoint), so a corrupt or missing
/// `sae_weights.safetensors` is harmless, but it should not pass unnoticed.
fn rebuild_note(path: &Path) -> Option<String> {
    let dir = checkpoint_dir(path);
    if !(dir.join(CONFIG_FILE).is_file() && dir.join(STATE_FILE).is_file()) {
        return None;
    }
    let weights = dir.join(WEIGHTS_FILE);
    let why = match load_sae_with_layout(&dir) {
        Ok(_) => return None,
        Err(_) if !weights.exists() => "is missing".to_string(),
        Err(e) => format!("cannot be read: {e:#}"),
    };
    let what = if weights.exists() { "the run's SAELens weights".to_string() } else { weights.display().to_string() };
    Some(format!("note: {what} {why}; exporting the SAE rebuilt from {}", dir.join(STATE_FILE).display()))
}

/// The SAE of `path` with normalisation folded in: rebuilt from the trainer state of a run
/// directory, else read from a checkpoint. Also returns the SAELens metadata and extra block.
pub fn sae_for_export(path: &Path) -> Result<(ExportedSae, serde_json::Value, Option<serde_json::Value>)> {
    let dir = checkpoint_dir(path);
    if dir.join(CONFIG_FILE).is_file() && dir.join(STATE_FILE).is_file() {
        let cfg = TrainConfig::load(&dir.join(CONFIG_FILE))?;
        let (state, meta) = checkpoint::load(&dir)?;
        // The SAE is rebuilt from the trainer state as config.json describes it (sparsifier, k,
        // normalisation): a config edited since would export another SAE than was trained.
        let command = format!("sae export {}", dir.display());
        checkpoint::check_same_run(&dir, &cfg, &meta, &command, "")?;
        if let Some(note) = crate::eval::run::unfinished_note(&dir, meta.step, &cfg, "exporting") {
            eprintln!("{note}");
        }
        let w_enc_eff = effective_encoder(&cfg, &state);
        let theta = crate::sparsify::threshold::exported(&state.theta, &state.theta_set);
        let sae = ExportedSae::from_training(&cfg, &state.params, &w_enc_eff, &theta, meta.input_scale);
        let mut md = crate::train::training_metadata(&cfg, meta.tokens, meta.input_scale, &meta.position);
        md.as_object_mut().expect("an object").extend(provenance(&dir));
        let extra = json!({"sparsifier": cfg.sparsifier.name(), "k": cfg.k, "aligned": cfg.aligned});
        return Ok((sae, md, Some(extra)));
    }
    let (sae, layout) = load_sae_with_layout(path)?;
    Ok((sae, serde_json::Value::Object(provenance(&dir)), Some(json!({"converted_from": layout.name()}))))
}

/// The keys saying where an SAE belongs (`model_name`, `hook_name`, `hook_layer`,
/// `context_size`, `prepend_bos`) from `dir/cfg.json`'s SAELens `metadata`, those that are set:
/// a run's come from its data's manifest and carry over to its exports; and how its thresholds
/// were calibrated (`threshold_calibration`), dropped again where an export has no thresholds.
fn provenance(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
    const KEYS: [&str; 6] =
        ["model_name", "hook_name", "hook_layer", "context_size", "prepend_bos", "threshold_calibration"];
    let cfg = std::fs::read_to_string(dir.join(CFG_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let Some(serde_json::Value::Object(md)) = cfg.and_then(|c| c.get("metadata").cloned()) else {
        return serde_json::Map::new();
    };
    md.into_iter().filter(|(k, v)| KEYS.contains(&k.as_str()) && !v.is_null()).collect()
}

pub fn run(args: ExportArgs) -> Result<()> {
    check_out(&args.run, &args.out, args.overwrite, args.format, args.k)?;
    // A run directory (it has a lock file) may have its trainer writing there right now: the
    // export's files are the trainer's own (sae_weights.safetensors, cfg.json), so hold the
    // run's lock while writing, and refuse, naming the trainer's pid, while a trainer holds it.
    let _lock = match args.out.join(rundir::LOCK_FILE).exists() {
        true => Some(rundir::lock(&args.out).with_context(|| format!("export to --out {}", args.out.display()))?),
        false => None,
    };
    // Any other --out is locked too, with a lock that writes no file (a `.sae.lock` would make
    // it look like a run), and checked again under it: two exports into one new directory
    // both passed the check above, and one's cfg.json could end beside the other's weights.
    crate::util::paths::refuse_dangling(&args.out, "--out")?;
    let created = !args.out.exists();
    let _dir_lock = match &_lock {
        Some(_) => None,
        None => {
            std::fs::create_dir_all(&args.out)
                .with_context(|| format!("cannot create --out {}", args.out.display()))?;
            let l = crate::util::dirlock::lock_dir(&args.out, "sae export --out")?;
            check_out(&args.run, &args.out, args.overwrite, args.format, args.k)?;
            Some(l)
        }
    };
    let written = write_export(&args);
    if written.is_err() && created {
        // Nothing was exported: leave no empty directory behind (remove_dir removes only an
        // empty one).
        let _ = std::fs::remove_dir(&args.out);
    }
    written
}

/// The export itself, into a checked and locked `--out`.
fn write_export(args: &ExportArgs) -> Result<()> {
    for line in describe(&sweep_stale_temporaries(&args.out, EXPORT_FILES)?) {
        eprintln!("{line}");
    }
    if let Some(note) = rebuild_note(&args.run) {
        eprintln!("{note}");
    }
    let (mut sae, mut md, extra) = crate::util::context::naming(sae_for_export(&args.run), "export", &args.run)?;
    if let Some(k) = args.k {
        sae = sae.as_topk(k)?;
    }
    if sae.threshold.is_none() {
        md.as_object_mut().map(|m| m.remove("threshold_calibration"));
    }
    for (key, v) in [
        ("model_name", args.model_name.clone().map(serde_json::Value::from)),
        ("hook_name", args.hook_name.clone().map(serde_json::Value::from)),
        ("hook_layer", args.hook_layer.map(serde_json::Value::from)),
        ("context_size", args.context_size.map(serde_json::Value::from)),
    ] {
        if let Some(v) = v {
            md[key] = v;
        }
    }
    match args.format {
        ExportFormat::Saelens => sae.save_saelens(&args.out, md, extra)?,
        ExportFormat::Sparsify => sae.save_sparsify(&args.out)?,
        ExportFormat::DictionaryLearning => {
            sae.save_dictionary_learning(&args.out, &md, extra)?;
            if let Some(cap) = sae.per_token_cap {
                eprintln!(
                    "note: dictionary_learning's JumpReluAutoEncoder has no per-token cap: tokens whose thresholds \
                     keep more than {cap} latents fire all of them there (config.json saetrain.per_token_cap_note)"
                );
            }
        }
    }
    println!(
        "exported {} SAE (d_in {}, d_sae {}{}) to {} in the {} layout",
        sae.architecture,
        sae.d_in,
        sae.d_sae,
        sae.k.map(|k| format!(", k {k}")).unwrap_or_default(),
        args.out.display(),
        args.format.layout()
    );
    for gone in remove_other_layouts(&args.out, args.format)? {
        eprintln!("note: removed {} (another layout's export, replaced by --overwrite)", gone.display());
    }
    Ok(())
}

/// The files of another layout's export left in `out` (an `--overwrite` into a directory that
/// held, say, a SAELens export while this one is dictionary_learning's), removed once this
/// export is in place: left there, `sae eval` and the libraries' loaders, which look for their
/// own layout's files first, would read the old SAE, and a shared `cfg.json` would pair one
/// export's config with another's weights. A run directory's own files are never among them
/// (only its own SAELens export is written there, and `config.json` is removed only where it is
/// a dictionary_learning config).
fn remove_other_layouts(out: &Path, format: ExportFormat) -> Result<Vec<PathBuf>> {
    if out_dir::holds_run(out) {
        return Ok(vec![]);
    }
    let stale: &[&str] = match format {
        ExportFormat::Saelens => &[SPARSIFY_WEIGHTS_FILE, DL_CONFIG_FILE, DL_WEIGHTS_FILE],
        ExportFormat::Sparsify => &[WEIGHTS_FILE, DL_CONFIG_FILE, DL_WEIGHTS_FILE],
        ExportFormat::DictionaryLearning => &[CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE],
    };
    let mut removed = vec![];
    for name in stale {
        let p = out.join(name);
        if !p.is_file() || (*name == DL_CONFIG_FILE && !is_dictionary_learning_config(out)) {
            continue;
        }
        std::fs::remove_file(&p).with_context(|| format!("cannot remove {} (another layout's export)", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}
