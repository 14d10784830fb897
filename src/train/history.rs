//! Training history: kept checkpoints (`--keep-checkpoints N`: the SAE every N steps and at the
//! end in `checkpoints/step_NNNNNN/`, never overwritten) and `history.jsonl` (weight and density
//! summaries every `--history-every` steps, default every logging step). `sae eval --history RUN`
//! draws them (see `eval::history`). Definitions: docs/train.md, "Training history".

use super::CONFIG_FILE;
use crate::backend::Backend;
use crate::config::TrainConfig;
use crate::data::BatchSource;
use crate::export::saelens::{CFG_FILE, WEIGHTS_FILE};
use crate::metrics::recon::{mean, weight_metrics};
use crate::model::TrainState;
use crate::util::atomic::{is_our_temporary, parse_temporary, write_json_atomic};
use crate::util::stats::quantile_sorted;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const HISTORY_FILE: &str = "history.jsonl";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// What a kept checkpoint holds: the SAELens pair (what `sae eval` loads) and the run's config
/// (so `sae eval` regenerates the run's held-out set). `config.json` is written last: a
/// checkpoint without it is incomplete (a kill mid-write) and is not listed.
pub const KEPT_FILES: &[&str] = &[WEIGHTS_FILE, CFG_FILE, CONFIG_FILE];

/// Fixed histogram ranges, so that lines of different steps and runs compare bin by bin.
pub const ALIGNMENT_RANGE: (f64, f64, usize) = (-0.5, 1.5, 40);
pub const COSINE_RANGE: (f64, f64, usize) = (-1.0, 1.0, 40);
/// log10 of the density; densities of exactly 0 are counted apart (`zero`).
pub const LOG10_DENSITY_RANGE: (f64, f64, usize) = (-7.0, 0.0, 28);
/// The quantiles reported.
pub const QUANTILES: [f64; 5] = [0.1, 0.25, 0.5, 0.75, 0.9];

/// Counts of values in `n` equal bins over `[lo, hi]` (a value equal to `hi` is in the last
/// bin), with the values below and above the range counted apart; NaN is not counted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<u64>,
    pub below: u64,
    pub above: u64,
}

impl Histogram {
    pub fn of(values: impl IntoIterator<Item = f64>, (lo, hi, n): (f64, f64, usize)) -> Self {
        let mut h = Histogram { lo, hi, counts: vec![0; n], below: 0, above: 0 };
        let w = (hi - lo) / n as f64;
        for v in values {
            if v.is_nan() {
                continue;
            }
            if v < lo {
                h.below += 1;
            } else if v > hi {
                h.above += 1;
            } else {
                h.counts[(((v - lo) / w) as usize).min(n - 1)] += 1;
            }
        }
        h
    }
    /// Bin centres and each bin's share of all values counted (outside the range included).
    pub fn fractions(&self) -> Vec<(f64, f64)> {
        let total = (self.counts.iter().sum::<u64>() + self.below + self.above).max(1) as f64;
        let w = (self.hi - self.lo) / self.counts.len().max(1) as f64;
        self.counts.iter().enumerate().map(|(i, &c)| (self.lo + w * (i as f64 + 0.5), c as f64 / total)).collect()
    }
}

/// Summary of a per-latent score (alignment or encoder/decoder cosine).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreSummary {
    pub mean: f64,
    /// `QUANTILES` in order (q10, q25, median, q75, q90).
    pub quantiles: Vec<f64>,
    /// Share of latents with value > 0.9 ("near 1").
    pub frac_above_0_9: f64,
    /// Share of latents with |value| < 0.1 ("near 0").
    pub frac_abs_below_0_1: f64,
    pub hist: Histogram,
}

impl ScoreSummary {
    pub fn of(v: &[f64], range: (f64, f64, usize)) -> Self {
        let n = v.len().max(1) as f64;
        ScoreSummary {
            mean: mean(v),
            quantiles: quantiles(v),
            frac_above_0_9: v.iter().filter(|x| **x > 0.9).count() as f64 / n,
            frac_abs_below_0_1: v.iter().filter(|x| x.abs() < 0.1).count() as f64 / n,
            hist: Histogram::of(v.iter().copied(), range),
        }
    }
}

/// Summary of per-latent densities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DensitySummary {
    pub mean: f64,
    /// `QUANTILES` of the densities (all latents, zeros included).
    pub quantiles: Vec<f64>,
    /// Latents whose density is exactly 0.
    pub zero: u64,
    /// log10 of the nonzero densities.
    pub log10_hist: Histogram,
}

impl DensitySummary {
    pub fn of(density: &[f64]) -> Self {
        DensitySummary {
            mean: mean(density),
            quantiles: quantiles(density),
            zero: density.iter().filter(|p| **p == 0.0).count() as u64,
            log10_hist: Histogram::of(density.iter().filter(|p| **p > 0.0).map(|p| p.log10()), LOG10_DENSITY_RANGE),
        }
    }
}

fn quantiles(v: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    QUANTILES.iter().map(|&q| quantile_sorted(&s, q)).collect()
}

/// One line of `history.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryLine {
    pub step: u64,
    pub tokens: u64,
    /// `a_i = W_enc_i . W_dec_i` (the effective encoder; as `sae eval` computes it).
    pub alignment: ScoreSummary,
    /// `cos(W_enc_i, W_dec_i)`.
    pub enc_dec_cosine: ScoreSummary,
    /// The trainer's running density (EMA of each batch's firing fraction, `--density-decay`).
    pub density: DensitySummary,
    /// Latents dead by the trainer's rule (no firing for `dead_window` tokens), as a share.
    pub frac_dead: f64,
}

impl HistoryLine {
    pub fn of(cfg: &TrainConfig, state: &TrainState, tokens: u64) -> Self {
        let d = state.shape().d_in;
        let w = weight_metrics(&super::effective_encoder(cfg, state), state.params.w_dec(), d);
        let density: Vec<f64> = state.density.iter().map(|&p| p as f64).collect();
        let dead = crate::backend::tracking::dead_count(cfg, &state.since_fired);
        HistoryLine {
            step: state.step,
            tokens,
            alignment: ScoreSummary::of(&w.alignment, ALIGNMENT_RANGE),
            enc_dec_cosine: ScoreSummary::of(&w.enc_dec_cosine, COSINE_RANGE),
            density: DensitySummary::of(&density),
            frac_dead: dead as f64 / state.density.len().max(1) as f64,
        }
    }
}

/// `history.jsonl`, read back (lines that do not parse are skipped, with a note).
pub fn read_history(run: &Path) -> Vec<HistoryLine> {
    let path = run.join(HISTORY_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return vec![] };
    crate::util::jsonl::parse_as(&path, &text)
}

/// The name of the kept checkpoint of `step`.
pub fn kept_name(step: u64) -> String {
    format!("step_{step:06}")
}

/// The step of a kept checkpoint's directory name.
pub fn parse_kept(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step_")?;
    digits.bytes().all(|b| b.is_ascii_digit()).then(|| digits.parse().ok()).flatten()
}

/// Every `checkpoints/step_*` directory of `run`, complete or not, by step.
fn kept_dirs(run: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(run.join(CHECKPOINTS_DIR)) else { return vec![] };
    let mut v: Vec<(u64, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((parse_kept(&e.file_name().to_string_lossy())?, e.path())))
        .collect();
    v.sort();
    v
}

/// The complete kept checkpoints of `run`, by step.
pub fn kept_checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    kept_dirs(run).into_iter().filter(|(_, d)| KEPT_FILES.iter().all(|f| d.join(f).is_file())).collect()
}

/// The kept checkpoint directories of `run` that lack some of [`KEPT_FILES`] (one being written
/// right now, or a damaged one), by step, with the files they lack.
pub fn incomplete_checkpoints(run: &Path) -> Vec<(u64, PathBuf, Vec<&'static str>)> {
    kept_dirs(run)
        .into_iter()
        .filter_map(|(step, d)| {
            let missing: Vec<&'static str> = KEPT_FILES.iter().copied().filter(|f| !d.join(f).is_file()).collect();
            (!missing.is_empty()).then_some((step, d, missing))
        })
        .collect()
}

/// Whether `checkpoints` holds only what training writes there (step directories holding kept
/// files and their temporaries), so that `--overwrite` may remove it.
pub fn only_ours(checkpoints: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(checkpoints) else { return false };
    rd.flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        parse_kept(&name).is_some()
            && e.file_type().is_ok_and(|t| t.is_dir())
            && std::fs::read_dir(e.path()).is_ok_and(|files| {
                files.flatten().all(|f| {
                    let n = f.file_name().to_string_lossy().into_owned();
                    f.file_type().is_ok_and(|t| t.is_file()) && (KEPT_FILES.contains(&n.as_str()) || is_ours_tmp(&n))
                })
            })
    })
}

fn is_ours_tmp(name: &str) -> bool {
    is_our_temporary(name) && parse_temporary(name).is_some_and(|(t, _)| KEPT_FILES.contains(&t))
}

/// Remove one kept checkpoint directory: its files (ours only), then the directory, which fails
/// (and says so) if anything else is in it.
fn remove_kept(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if KEPT_FILES.contains(&n.as_str()) || is_ours_tmp(&n) {
            std::fs::remove_file(e.path()).with_context(|| format!("cannot remove {}", e.path().display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| format!("cannot remove {} (it holds other files)", dir.display()))
}

/// `--overwrite`: remove `RUN/checkpoints` (checked first with [`only_ours`]).
pub fn remove_all(run: &Path) -> Result<()> {
    for (_, d) in kept_dirs(run) {
        remove_kept(&d)?;
    }
    let c = run.join(CHECKPOINTS_DIR);
    std::fs::remove_dir(&c).with_context(|| format!("--overwrite: cannot remove {}", c.display()))
}

/// `--resume` from `step`: the history after it is dropped (it is trained again): lines of
/// `history.jsonl` past it and kept checkpoints past it, complete or not. Those up to `step`
/// stay as they are.
pub fn truncate(run: &Path, step: u64) -> Result<()> {
    super::truncate_metrics(&run.join(HISTORY_FILE), step)?;
    for (s, d) in kept_dirs(run) {
        if s > step {
            remove_kept(&d)?;
        }
    }
    Ok(())
}

/// Stale temporaries in the kept checkpoints (see [`super::rundir::sweep_temporaries`]).
pub fn sweep_temporaries(run: &Path) -> Result<Vec<(PathBuf, u32)>> {
    let mut out = vec![];
    for (_, d) in kept_dirs(run) {
        out.extend(crate::util::sweep::sweep_stale_temporaries(&d, KEPT_FILES)?);
    }
    Ok(out)
}

/// Write the kept checkpoint of the state's step: the exported SAE and the config (last).
pub fn keep(
    cfg: &TrainConfig,
    state: &TrainState,
    source: &dyn BatchSource,
    out: &Path,
    tokens: u64,
    calibration: Option<&super::calibrate::CalibrationReport>,
) -> Result<PathBuf> {
    let dir = out.join(CHECKPOINTS_DIR).join(kept_name(state.step));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    super::export(cfg, state, source, &dir, tokens, calibration)?;
    write_json_atomic(&dir.join(CONFIG_FILE), cfg)?;
    Ok(dir)
}

/// What the training loop calls after each step: a `history.jsonl` line and a kept checkpoint
/// where due (the final kept checkpoint is [`keep_final`]'s, after threshold calibration).
pub struct Recorder {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Recorder {
    /// Append to `RUN/history.jsonl` (a new run removed it; a resume truncated it).
    pub fn open(cfg: &TrainConfig, out: &Path) -> Result<Self> {
        let path = out.join(HISTORY_FILE);
        let file = match history_every(cfg) {
            0 => None,
            _ => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            ),
        };
        Ok(Recorder { file, path })
    }

    pub fn after_step(
        &mut self,
        cfg: &TrainConfig,
        backend: &dyn Backend,
        source: &dyn BatchSource,
        out: &Path,
        (done, total, tokens): (u64, u64, u64),
    ) -> Result<()> {
        let every = history_every(cfg);
        let log = self.file.is_some() && (done.is_multiple_of(every) || done == total);
        let keep_now = cfg.keep_checkpoints > 0 && done.is_multiple_of(cfg.keep_checkpoints) && done != total;
        if !log && !keep_now {
            return Ok(());
        }
        let state = backend.state()?;
        if let (true, Some(f)) = (log, self.file.as_mut()) {
            let line = serde_json::to_string(&HistoryLine::of(cfg, &state, tokens))?;
            writeln!(f, "{line}").with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        if keep_now {
            keep(cfg, &state, source, out, tokens, None)?;
        }
        Ok(())
    }
}

/// The final kept checkpoint (the run's own final SAE, calibrated thresholds included).
pub fn keep_final(
    cfg: &TrainConfig,
    backend: &dyn Backend,
    source: &dyn BatchSource,
    out: &Path,
    tokens: u64,
    calibration: Option<&super::calibrate::CalibrationReport>,
) -> Result<()> {
    if cfg.keep_checkpoints > 0 {
        keep(cfg, &backend.state()?, source, out, tokens, calibration)?;
    }
    Ok(())
}

/// The history cadence in force (0: off).
pub fn history_every(cfg: &TrainConfig) -> u64 {
    cfg.history_every.unwrap_or(cfg.log_every)
}
