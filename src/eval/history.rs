//! `sae eval --history RUN`: a run's training history drawn from its kept checkpoints
//! (`--keep-checkpoints N`) and `history.jsonl` (see `train::history`): the bimodality paper's
//! over-training picture (the alignment histogram per kept checkpoint, its Fig. 16) and the MC/FC
//! paper's density-over-training comparison, as PNGs, a table in `report.md` and the numbers in
//! `eval.json`.

use super::report::markdown_table;
use super::run::{evaluate, EvalOptions};
use crate::plot::{self, Panel, Series};
use crate::train::history::{
    self, DensitySummary, HistoryLine, ScoreSummary, ALIGNMENT_RANGE, COSINE_RANGE, HISTORY_FILE, QUANTILES,
};
use crate::util::atomic::{write_atomic, write_json_atomic};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Curves drawn per picture at most (the palette's size): kept checkpoints or logged steps are
/// thinned evenly, first and last always in.
pub const MAX_CURVES: usize = 8;

/// One kept checkpoint, evaluated on the run's held-out set.
#[derive(Clone, Debug, Serialize)]
pub struct CheckpointPoint {
    pub step: u64,
    pub path: PathBuf,
    pub tokens: usize,
    pub l0: f64,
    pub explained_variance: f64,
    pub mse: f64,
    pub frac_dead: f64,
    pub mmcs: Option<f64>,
    /// Of the whole per-latent vectors (`sae eval`'s `weights.alignment`, `enc_dec_cosine`).
    pub alignment: ScoreSummary,
    pub enc_dec_cosine: ScoreSummary,
    /// Held-out densities (`sae eval`'s `density`).
    pub density: DensitySummary,
}

#[derive(Clone, Debug, Serialize)]
pub struct HistoryEval {
    pub run: PathBuf,
    pub checkpoints: Vec<CheckpointPoint>,
    /// `history.jsonl` as read.
    pub log: Vec<HistoryLine>,
    /// What is missing, in words (also printed and in report.md).
    pub notes: Vec<String>,
}

/// Evaluate every kept checkpoint of `run` and read its history log.
pub fn evaluate_history(run: &Path, opts: &EvalOptions) -> Result<HistoryEval> {
    let kept = history::kept_checkpoints(run);
    let log = history::read_history(run);
    if kept.is_empty() && log.is_empty() {
        bail!(
            "{} has no training history: no kept checkpoints in {}/ and no {HISTORY_FILE}. Train with \
             --keep-checkpoints N (history.jsonl is written at every logging step unless --history-every 0)",
            run.display(),
            history::CHECKPOINTS_DIR
        );
    }
    let mut notes = vec![];
    for (_, dir, missing) in history::incomplete_checkpoints(run) {
        notes.push(format!(
            "{} is left out: it has no {} (a checkpoint being written right now, or a damaged one)",
            dir.display(),
            missing.join(", ")
        ));
    }
    if kept.is_empty() {
        notes.push(format!(
            "no kept checkpoints in {} (train with --keep-checkpoints N): the alignment histograms come from \
             {HISTORY_FILE}'s binned summaries, and there is no held-out table per checkpoint",
            run.join(history::CHECKPOINTS_DIR).display()
        ));
    }
    if log.is_empty() {
        notes.push(format!(
            "no {HISTORY_FILE} in {} (--history-every 0): the running-density curves are left out",
            run.display()
        ));
    }
    let mut checkpoints = vec![];
    for (step, dir) in kept {
        let label = history::kept_name(step);
        let e = crate::util::context::naming(evaluate(&dir, &label, opts), "evaluating", &dir)?;
        checkpoints.push(CheckpointPoint {
            step,
            path: dir,
            tokens: e.exported.tokens,
            l0: e.exported.l0,
            explained_variance: e.exported.explained_variance,
            mse: e.exported.mse,
            frac_dead: e.exported.frac_dead,
            mmcs: e.recovery.map(|r| r.mmcs),
            alignment: ScoreSummary::of(&e.weights.alignment, ALIGNMENT_RANGE),
            enc_dec_cosine: ScoreSummary::of(&e.weights.enc_dec_cosine, COSINE_RANGE),
            density: DensitySummary::of(&e.exported.density),
        });
    }
    Ok(HistoryEval { run: run.to_path_buf(), checkpoints, log, notes })
}

/// Up to `n` indices of `0..len`, evenly spaced, first and last included.
pub fn thin(len: usize, n: usize) -> Vec<usize> {
    if len <= n {
        return (0..len).collect();
    }
    let mut v: Vec<usize> = (0..n).map(|i| (i as f64 * (len - 1) as f64 / (n - 1) as f64).round() as usize).collect();
    v.dedup();
    v
}

fn hist_series<'a>(items: impl Iterator<Item = (u64, &'a ScoreSummary)>) -> Vec<Series> {
    let all: Vec<(u64, &ScoreSummary)> = items.collect();
    thin(all.len(), MAX_CURVES)
        .into_iter()
        .map(|i| Series { label: format!("step {}", all[i].0), points: all[i].1.hist.fractions() })
        .collect()
}

/// The pictures; returns (file, caption) for each.
pub fn pictures(h: &HistoryEval, out: &Path) -> Result<Vec<(String, String)>> {
    let mut pics = vec![];
    // Fig. 16 of the bimodality paper: the alignment histogram over training.
    let (source, al, cs) = if h.checkpoints.is_empty() {
        let al = hist_series(h.log.iter().map(|l| (l.step, &l.alignment)));
        let cs = hist_series(h.log.iter().map(|l| (l.step, &l.enc_dec_cosine)));
        ("logged steps (history.jsonl)", al, cs)
    } else {
        let al = hist_series(h.checkpoints.iter().map(|c| (c.step, &c.alignment)));
        let cs = hist_series(h.checkpoints.iter().map(|c| (c.step, &c.enc_dec_cosine)));
        ("kept checkpoints", al, cs)
    };
    let panels = [
        Panel {
            title: format!("alignment score W_enc_i . W_dec_i over training ({source})"),
            x_label: format!("alignment score (bins of {:.2})", bin_width(ALIGNMENT_RANGE)),
            y_label: "fraction of latents".into(),
            series: al,
            log_y: false,
        },
        Panel {
            title: "cos(W_enc_i, W_dec_i) over training".into(),
            x_label: format!("cosine (bins of {:.2})", bin_width(COSINE_RANGE)),
            y_label: "fraction of latents".into(),
            series: cs,
            log_y: false,
        },
    ];
    let file = "history_alignment.png".to_string();
    plot::line_panels(&out.join(&file), &panels)?;
    pics.push((
        file,
        format!(
            "Alignment and encoder/decoder cosine histograms per step ({source}; cf. the bimodality paper's Fig. 16)"
        ),
    ));

    // The MC/FC paper's density over training: running-density quantiles, dead share, histograms.
    if !h.log.is_empty() {
        let q = |i: usize| Series {
            label: format!("q{:02}", (QUANTILES[i] * 100.0).round()),
            points: h
                .log
                .iter()
                .filter(|l| l.density.quantiles[i] > 0.0)
                .map(|l| (l.step as f64, l.density.quantiles[i].log10()))
                .collect(),
        };
        let mut dead = vec![Series {
            label: "running (trainer's dead rule)".into(),
            points: h.log.iter().map(|l| (l.step as f64, l.frac_dead)).collect(),
        }];
        if !h.checkpoints.is_empty() {
            dead.push(Series {
                label: "held-out (kept checkpoints)".into(),
                points: h.checkpoints.iter().map(|c| (c.step as f64, c.frac_dead)).collect(),
            });
        }
        let idx = thin(h.log.len(), MAX_CURVES);
        let dens: Vec<Series> = idx
            .iter()
            .map(|&i| Series {
                label: format!("step {}", h.log[i].step),
                points: h.log[i].density.log10_hist.fractions(),
            })
            .collect();
        let panels = [
            Panel {
                title: "log10 running density quantiles over training".into(),
                x_label: "step".into(),
                y_label: "log10 density".into(),
                series: (0..QUANTILES.len()).map(q).collect(),
                log_y: false,
            },
            Panel {
                title: "dead latents".into(),
                x_label: "step".into(),
                y_label: "fraction dead".into(),
                series: dead,
                log_y: false,
            },
            Panel {
                title: "log10 running density histogram".into(),
                x_label: "log10 density".into(),
                y_label: "fraction of latents".into(),
                series: dens,
                log_y: false,
            },
        ];
        let file = "history_density.png".to_string();
        plot::line_panels(&out.join(&file), &panels)?;
        pics.push((
            file,
            "Running feature density over training: quantiles, dead share and histograms (cf. the MC/FC paper)".into(),
        ));
    }
    Ok(pics)
}

fn bin_width((lo, hi, n): (f64, f64, usize)) -> f64 {
    (hi - lo) / n as f64
}

/// The per-checkpoint table (header first).
pub fn checkpoint_table(h: &HistoryEval) -> Vec<Vec<String>> {
    let mut t = vec![[
        "step",
        "EV",
        "L0",
        "dead",
        "MMCS",
        "align mean",
        "align > 0.9",
        "|align| < 0.1",
        "cos mean",
        "median density",
    ]
    .map(String::from)
    .to_vec()];
    for c in &h.checkpoints {
        t.push(vec![
            c.step.to_string(),
            format!("{:.4}", c.explained_variance),
            format!("{:.2}", c.l0),
            format!("{:.4}", c.frac_dead),
            c.mmcs.map(|m| format!("{m:.4}")).unwrap_or_default(),
            format!("{:.4}", c.alignment.mean),
            format!("{:.4}", c.alignment.frac_above_0_9),
            format!("{:.4}", c.alignment.frac_abs_below_0_1),
            format!("{:.4}", c.enc_dec_cosine.mean),
            format!("{:.3e}", c.density.quantiles[2]),
        ]);
    }
    t
}

/// The logged steps' table (at most 12 rows, evenly thinned).
pub fn log_table(h: &HistoryEval) -> Vec<Vec<String>> {
    let mut t =
        vec![["step", "density q10", "density q50", "density q90", "dead", "align mean", "align > 0.9", "cos mean"]
            .map(String::from)
            .to_vec()];
    for i in thin(h.log.len(), 12) {
        let l = &h.log[i];
        t.push(vec![
            l.step.to_string(),
            format!("{:.3e}", l.density.quantiles[0]),
            format!("{:.3e}", l.density.quantiles[2]),
            format!("{:.3e}", l.density.quantiles[4]),
            format!("{:.4}", l.frac_dead),
            format!("{:.4}", l.alignment.mean),
            format!("{:.4}", l.alignment.frac_above_0_9),
            format!("{:.4}", l.enc_dec_cosine.mean),
        ]);
    }
    t
}

/// `eval.json`, the pictures and `report.md` in `out`; returns the text for stdout.
pub fn write_history(h: &HistoryEval, out: &Path, draw: bool) -> Result<(String, Vec<String>)> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let pics = if draw { pictures(h, out)? } else { vec![] };
    let mut files = vec![super::report::EVAL_FILE.to_string(), super::report::REPORT_FILE.to_string()];
    files.extend(pics.iter().map(|(file, _)| file.clone()));
    let doc = json!({
        "saetrain_version": env!("CARGO_PKG_VERSION"),
        "definitions": {
            "alignment": "W_enc_i . W_dec_i",
            "enc_dec_cosine": "cos(W_enc_i, W_dec_i)",
            "quantiles": QUANTILES,
            "quantile": "linear interpolation between order statistics at q (n - 1)",
            "hist": "counts in equal bins over [lo, hi]; below / above counted apart",
            "density.log10_hist": "log10 of the nonzero densities; `zero` counts the zeros",
            "log": "history.jsonl: the trainer's running density (EMA of each batch's firing fraction) and frac_dead by its dead rule",
            "checkpoints": "each kept checkpoint evaluated on the run's held-out set (exported sparsifier)",
        },
        "history": h,
        (super::out_dir::FILES_KEY): files,
    });
    let mut md = String::new();
    let _ = writeln!(md, "# Training history of `{}`\n", h.run.display());
    for n in &h.notes {
        let _ = writeln!(md, "- note: {n}");
    }
    let mut text = String::new();
    if !h.checkpoints.is_empty() {
        let t = checkpoint_table(h);
        let _ = writeln!(md, "\n## Kept checkpoints (held-out, exported sparsifier)\n\n{}", markdown_table(&t));
        text.push_str(&super::report::text_table(&t));
    }
    if !h.log.is_empty() {
        let t = log_table(h);
        let _ = writeln!(md, "\n## Logged steps ({HISTORY_FILE}, running density)\n\n{}", markdown_table(&t));
        if h.checkpoints.is_empty() {
            text.push_str(&super::report::text_table(&t));
        }
    }
    let _ = writeln!(md, "\nAll numbers: `{}`.\n", super::report::EVAL_FILE);
    for (file, caption) in &pics {
        let _ = writeln!(md, "## {caption}\n\n![{caption}]({file})\n");
    }
    write_atomic(&out.join(super::report::REPORT_FILE), md.as_bytes())?;
    write_json_atomic(&out.join(super::report::EVAL_FILE), &doc)?;
    Ok((text, files))
}
