//! The training loop: data -> backend steps -> metrics, checkpoints and the final summary.

pub mod calibrate;
pub mod checkpoint;
pub mod footprint;
pub mod history;
pub mod rundir;
pub mod schedule;

use crate::backend::{self, Backend, InferMode, StepStats};
use crate::config::{Calibration, TrainConfig};
use crate::data::{self, BatchSource};
use crate::export::saelens::ExportedSae;
use crate::metrics::core::{core_metrics, CoreMetrics};
use crate::metrics::recovery::{recovery, Recovery};
use crate::model::{aligned, init, Shape, TrainState};
use crate::util::atomic::write_json_atomic;
use anyhow::{bail, ensure, Context, Result};
use checkpoint::StateMeta;
use indicatif::{ProgressBar, ProgressStyle};
use schedule::Schedule;
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const CONFIG_FILE: &str = "config.json";

/// `dir/config.json` when it is a training run's config: a dictionary_learning checkpoint's
/// `config.json` has the same name.
pub fn run_config_file(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let p = dir.join(CONFIG_FILE);
    (p.is_file() && !crate::export::dictionary_learning::is_dictionary_learning_config(dir)).then_some(p)
}
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
/// Written when the run's loss stopped being finite ([`Diverged`]); removed when a run in the
/// directory finishes. `sae sweep` reads it to record the point as diverged and not train it
/// again.
pub const DIVERGED_FILE: &str = "diverged.json";

/// Final numbers of a run (also written to `summary.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub tokens: u64,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub backend: String,
    pub data: String,
    /// What the data stream did: completed passes over the training rows (an SAE that passed
    /// over its rows several times has fit them: its held-out numbers say how well it
    /// generalises), batches skipped for NaN/Inf, rows excluded for their norm.
    pub data_stats: data::SourceStats,
    /// Held-out metrics with the exported (inference) sparsifier.
    pub eval: CoreMetrics,
    /// Held-out metrics with the training sparsifier, for comparison.
    pub eval_training_sparsifier: CoreMetrics,
    pub recovery: Option<Recovery>,
    /// What threshold calibration did (batch-dependent sparsifiers).
    pub calibration: Option<calibrate::CalibrationReport>,
    pub out: PathBuf,
}

/// Called after every step with (steps done, total steps, the step's statistics). An error stops
/// the run: a checkpoint of the steps done is written first, so `--resume` continues from there,
/// and the error is returned wrapped in [`Interrupted`]. The Python package reports progress and
/// turns Ctrl-C into such an error.
pub type StepHook = std::sync::Arc<dyn Fn(u64, u64, &StepStats) -> Result<()> + Send + Sync>;

/// How a run treats its directory, and who watches it.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Replace a previous run's files in `--out` (never anything else).
    pub overwrite: bool,
    /// With `--resume`: the options to change, from [`rundir::resume_changes`].
    pub resume_changes: serde_json::Map<String, serde_json::Value>,
    pub on_step: Option<StepHook>,
}

/// A run stopped after `step` steps, with a checkpoint written at that step: by its [`StepHook`]
/// (a signal, Ctrl-C in Python), or by data that failed mid-run (the cause says what to fix).
#[derive(Debug)]
pub struct Interrupted {
    pub step: u64,
    pub out: PathBuf,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted after step {}; resume with --resume {}", self.step, self.out.display())
    }
}

impl std::error::Error for Interrupted {}

/// A run whose loss stopped being finite: an outcome of its settings (a learning rate too high
/// for the data, usually), not a fault of the machine or the files, so a sweep records it and
/// goes on to its other points.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Diverged {
    pub step: u64,
    /// The loss as text ("NaN", "inf"): JSON has no such numbers; "finite" when `state` says
    /// what diverged instead.
    pub loss: String,
    /// The trainer state's first impossible value, when the loss stayed finite but the state
    /// did not (Adam's second moments overflow at a learning rate of 1e6): found when a
    /// checkpoint was to be written, at `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.state {
            Some(what) => write!(
                f,
                "the trainer state stopped being finite by step {} ({what}; the loss was still finite): lower --lr \
                 or check the data",
                self.step
            ),
            None => write!(f, "loss became {} at step {}: lower --lr or check the data", self.loss, self.step),
        }
    }
}

impl std::error::Error for Diverged {}

/// Train from scratch (`resume = None`) or continue the run in `resume`.
pub fn run(cfg: TrainConfig, resume: Option<&Path>) -> Result<Summary> {
    run_with(cfg, resume, &RunOptions::default())
}

/// [`run`] with the run-directory options.
pub fn run_with(cfg: TrainConfig, resume: Option<&Path>, opts: &RunOptions) -> Result<Summary> {
    let (mut cfg, mut lock) = match resume {
        Some(dir) => {
            let saved = TrainConfig::load(&dir.join(CONFIG_FILE))
                .with_context(|| format!("--resume {}: not a run directory", dir.display()))?;
            let lock = rundir::lock(dir)?;
            // Without its trainer state a run starts again from step 0, right for one killed
            // before its first checkpoint; one that has written an SAE (its trainer state
            // deleted, say, to save space) would be replaced by an untrained start.
            let written = [crate::export::saelens::WEIGHTS_FILE, SUMMARY_FILE].map(|f| dir.join(f));
            if !dir.join(checkpoint::STATE_FILE).exists() {
                if let Some(w) = written.iter().find(|p| p.exists()) {
                    bail!(
                        "--resume {}: {} is missing, so the run cannot continue, but it has written {}: resuming would \
                         train it again from step 0 and replace that. Its SAE stays usable as it is (sae eval, sae \
                         export); to train it again from scratch, use sae train --out {} --overwrite",
                        dir.display(),
                        dir.join(checkpoint::STATE_FILE).display(),
                        w.display(),
                        dir.display()
                    );
                }
            }
            let c = rundir::apply_changes(&saved, &opts.resume_changes)?;
            (TrainConfig { out: dir.to_path_buf(), quiet: cfg.quiet, threads: cfg.threads, ..c }, Some(lock))
        }
        // A new run holds out whole token windows (config.rs, `held_out_windows`); a resumed
        // one keeps the layout its config.json records.
        None => (TrainConfig { held_out_windows: Some(cfg.held_out_windows.unwrap_or(true)), ..cfg }, None),
    };
    cfg.validate()?;
    // The backend is chosen first: it says whether it takes half-precision batches.
    let chosen = backend::choose(&cfg)?;
    // The data may not change on a resume (its digest is checked): say where it must be.
    let where_data = |dir: &Path, data: &Path| {
        let (dir, cfg_file) = (dir.display(), dir.join(CONFIG_FILE));
        let cfg_file = cfg_file.display();
        format!("--resume {dir}: the run reads its data from {} ({cfg_file}); a resumed run reads the same data, so put it back there", data.display())
    };
    let mut source =
        data::open_source_with(&cfg, chosen.wants_half_input()).map_err(|e| match (resume, &cfg.data) {
            (Some(dir), Some(data)) => e.context(where_data(dir, data)),
            _ => e,
        })?;
    let d_in = source.d_in();
    if let Some(d) = cfg.d_in {
        if d != d_in {
            let data = cfg.data.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(synthetic)".into());
            match resume {
                Some(dir) => bail!(
                    "--resume {}: the run was trained on data of width {d} ({} d_in) but its data {data} now has \
                     width {d_in}",
                    dir.display(),
                    dir.join(CONFIG_FILE).display()
                ),
                None => bail!("invalid --d-in {d}: the data {data} has width {d_in}"),
            }
        }
    }
    cfg.d_in = Some(d_in);
    footprint::check(d_in, cfg.d_sae, cfg.batch_size, cfg.eval_tokens, chosen.is_cpu())?;
    let out = cfg.out.clone();
    // `--init-from` is read whole before `--overwrite` deletes anything: a run that cannot be
    // started from (missing, other sizes) leaves the directory it would replace as it was.
    let inherited = match (resume, &cfg.init_from) {
        (None, Some(run)) => {
            if matches!((run.canonicalize(), out.canonicalize()), (Ok(a), Ok(b)) if a == b) {
                bail!(
                    "--init-from {} is this run's own --out: the run would be replaced by one started from it. Copy it elsewhere and start from the copy, or give another --out",
                    run.display()
                );
            }
            Some(init_from(run, &cfg, d_in)?)
        }
        _ => None,
    };
    if lock.is_none() {
        lock = Some(rundir::prepare_new(&out, opts.overwrite)?);
    }
    let _lock = lock;
    // Temporaries of writers killed mid-write, before anything is written here.
    let swept = rundir::sweep_temporaries(&out)?;
    if !cfg.quiet {
        crate::util::sweep::describe(&swept).iter().for_each(|l| eprintln!("{l}"));
    }

    let total = cfg.total_steps();
    // A run killed before its first checkpoint has only its config: it starts again from step 0.
    let resume = resume.filter(|dir| dir.join(checkpoint::STATE_FILE).exists());
    let (state, mut tokens, first_batch) = match resume {
        Some(dir) => {
            let (state, meta) = checkpoint::load(dir)?;
            ensure!(
                meta.d_sae == cfg.d_sae,
                "--resume {}: {} has d_sae {} but {} says {}",
                dir.display(),
                dir.join(checkpoint::STATE_FILE).display(),
                meta.d_sae,
                dir.join(CONFIG_FILE).display(),
                cfg.d_sae
            );
            let command = format!("--resume {}", dir.display());
            checkpoint::check_same_run(dir, &cfg, &meta, &command, ", or train anew with --overwrite")?;
            if total < meta.step {
                bail!(
                    "--resume {}: the run has trained {} steps, more than the {total} asked for",
                    dir.display(),
                    meta.step
                );
            }
            source.seek(&meta.position)?;
            truncate_metrics(&out.join(METRICS_FILE), meta.step)?;
            history::truncate(&out, meta.step)?;
            if !opts.resume_changes.is_empty() {
                record_resume(&out, &cfg, meta.step, &opts.resume_changes)?;
            }
            (state, meta.tokens, None)
        }
        None => {
            write_json_atomic(&out.join(CONFIG_FILE), &cfg)?;
            let _ = std::fs::remove_file(out.join(METRICS_FILE));
            // A resumed run that had no trainer state yet starts again: so does its history.
            let _ = std::fs::remove_file(out.join(history::HISTORY_FILE));
            history::truncate(&out, 0)?;
            let first = source.next_batch()?;
            let state = match (inherited, &cfg.init_from) {
                (Some(state), _) => state,
                // A resume of a run that wrote no trainer state yet starts it again.
                (None, Some(run)) => init_from(run, &cfg, d_in)?,
                (None, None) => {
                    let mut params = init::tied(Shape::new(d_in, cfg.d_sae), cfg.seed, cfg.aligned);
                    let b_dec = init::b_dec_from_batch(&first.to_f32(), d_in, cfg.b_dec_init);
                    params.parts_mut().b_dec.copy_from_slice(&b_dec);
                    TrainState::new(params)
                }
            };
            (state, 0u64, Some(first))
        }
    };
    let start_step = state.step;
    let (mut backend, why) = chosen.create(&cfg, state)?;
    let eval_set = source.eval_batches(cfg.eval_tokens)?;
    let sched = Schedule { lr: cfg.lr, warmup: cfg.warmup(), total, decay_frac: cfg.decay_frac };

    if !cfg.quiet {
        eprintln!("{why}");
        eprintln!("data: {}", source.describe());
        eprintln!(
            "sae: {} d_in={} d_sae={} batch={} steps={} -> {}",
            cfg.sparsifier.name(),
            d_in,
            cfg.d_sae,
            cfg.batch_size,
            total,
            out.display()
        );
    }
    let bar = progress_bar(&cfg, total, start_step);
    let metrics_path = out.join(METRICS_FILE);
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("cannot open {}", metrics_path.display()))?;

    let mut recorder = history::Recorder::open(&cfg, &out)?;
    let t0 = Instant::now();
    let mut window = Window::default();
    let mut pending = first_batch;
    for step in start_step..total {
        let batch = match pending.take() {
            Some(b) => b,
            None => match source.next_batch() {
                Ok(b) => b,
                // Data that fails mid-run (a shard truncated under the run, an epoch of NaN
                // rows) must not cost the steps since the last checkpoint: the position is
                // still after the last good batch, so a resume starts with the failed one.
                Err(why) if step > start_step => {
                    bar.finish_and_clear();
                    save_all(&cfg, backend.as_ref(), source.as_ref(), &out, tokens)?;
                    return Err(why.context(Interrupted { step, out: out.clone() }));
                }
                Err(why) => return Err(why),
            },
        };
        let lr = sched.at(step);
        let stats = backend.step(&batch, lr as f32)?;
        if !stats.loss.is_finite() {
            bar.finish_and_clear();
            let why = Diverged { step, loss: stats.loss.to_string(), state: None };
            write_json_atomic(&out.join(DIVERGED_FILE), &why)?;
            return Err(why.into());
        }
        tokens += batch.rows as u64;
        window.add(&stats);
        let done = step + 1;
        if done.is_multiple_of(cfg.log_every) || done == total {
            let mut line =
                window.mean(done, tokens, lr, t0.elapsed().as_secs_f64(), tokens_since(start_step, &cfg, done));
            line["data"] = serde_json::to_value(source.stats())?;
            if cfg.eval_every > 0 && done.is_multiple_of(cfg.eval_every) && done != total {
                let m = core_metrics(backend.as_mut(), &eval_set, InferMode::Exported)?;
                line["eval"] = serde_json::to_value(&m)?;
            }
            writeln!(metrics, "{line}").with_context(|| format!("cannot write {}", metrics_path.display()))?;
            bar.set_position(done);
            bar.set_message(format!(
                "loss {:.4} L0 {:.1} EV {:.3} dead {}",
                line["loss"].as_f64().unwrap_or(0.0),
                line["l0"].as_f64().unwrap_or(0.0),
                line["ev"].as_f64().unwrap_or(0.0),
                stats.dead
            ));
            window = Window::default();
        }
        recorder.after_step(&cfg, backend.as_ref(), source.as_ref(), &out, (done, total, tokens))?;
        if cfg.checkpoint_every > 0 && done.is_multiple_of(cfg.checkpoint_every) && done != total {
            save_all(&cfg, backend.as_ref(), source.as_ref(), &out, tokens)?;
        }
        if let Some(hook) = &opts.on_step {
            if let Err(why) = hook(done, total, &stats) {
                bar.finish_and_clear();
                save_all(&cfg, backend.as_ref(), source.as_ref(), &out, tokens)?;
                return Err(why.context(Interrupted { step: done, out: out.clone() }));
            }
        }
    }
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let calibrated = calibrate::rows(&cfg, source.as_mut(), &eval_set)
        .and_then(|(batches, rows)| calibrate::calibrate(&cfg, backend.as_mut(), &batches, rows));
    let calibration = match calibrated {
        Ok(c) => c,
        // The steps are trained (the calibration rows may fail to read, like any batch): keep
        // them; a resume trains nothing and calibrates again.
        Err(why) => {
            save_all(&cfg, backend.as_ref(), source.as_ref(), &out, tokens)?;
            return Err(why.context(Interrupted { step: total, out: out.clone() }));
        }
    };
    if let (Some(c), false) = (&calibration, cfg.quiet) {
        let rows = match (c.rows, cfg.threshold_calibration) {
            (Calibration::HeldOut, Calibration::Auto) => {
                "held-out (in-sample: the training stream has no rows left that this SAE has not trained on)"
            }
            (Calibration::HeldOut, _) => "held-out (in-sample)",
            _ => "training-stream",
        };
        eprintln!(
            "thresholds calibrated ({}) on {} tokens, {rows}: exported L0 {:.2} (EMA thresholds {:.2}), training rule {:.2}",
            c.mode, c.tokens, c.calibrated_l0, c.ema_l0, c.target_l0
        );
        if let Some(u) = &c.without_cap {
            eprintln!(
                "  without its per-token cap of {} (SAELens's jumprelu ignores per_token_cap): L0 {:.2}, {:.1}% of tokens over the cap",
                u.cap,
                u.l0,
                100.0 * u.frac_tokens_over_cap
            );
        }
    }
    save_all_with(&cfg, backend.as_ref(), source.as_ref(), &out, tokens, calibration.as_ref())?;
    history::keep_final(&cfg, backend.as_ref(), source.as_ref(), &out, tokens, calibration.as_ref())?;
    // Even with --quiet: data that was silently left out is worth a line.
    if let Some(w) = skipped_warning(&source.stats(), &metrics_path) {
        eprintln!("{w}");
    }

    let eval = core_metrics(backend.as_mut(), &eval_set, InferMode::Exported)?;
    let eval_training_sparsifier = core_metrics(backend.as_mut(), &eval_set, InferMode::Training)?;
    let state = backend.state()?;
    let recovery = source.ground_truth().map(|gt| recovery(gt, state.params.w_dec(), d_in));
    let trained = (total - start_step) * cfg.batch_size as u64;
    let summary = Summary {
        steps: total,
        tokens,
        seconds,
        tokens_per_second: trained as f64 / seconds.max(1e-9),
        backend: backend.name(),
        data: source.describe(),
        data_stats: source.stats(),
        eval,
        eval_training_sparsifier,
        recovery,
        calibration,
        out: out.clone(),
    };
    write_json_atomic(&out.join(SUMMARY_FILE), &summary)?;
    // A finished run has not diverged (an earlier attempt in this directory may have).
    match std::fs::remove_file(out.join(DIVERGED_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", out.join(DIVERGED_FILE).display()))
        }
        _ => {}
    }
    Ok(summary)
}

/// The starting state of `--init-from RUN`: the run's parameters (b_dec included) and running
/// densities (so Zipf budgets rank latents, and aux_zipf finds dying latents, from the first
/// step), with a fresh optimiser, step counter, dead counters and thresholds.
pub fn init_from(run: &Path, cfg: &TrainConfig, d_in: usize) -> Result<TrainState> {
    let ctx = || format!("--init-from {}", run.display());
    if !run.join(CONFIG_FILE).is_file() && run.is_dir() {
        let what = match crate::export::load::load_sae(run) {
            Ok(_) => "an exported SAE, not a training run",
            Err(_) => "not a training run",
        };
        bail!(
            "--init-from {}: {what} (no {CONFIG_FILE}); --init-from starts from a run directory's trainer state",
            run.display()
        );
    }
    let theirs = TrainConfig::load(&run.join(CONFIG_FILE)).with_context(ctx)?;
    let (state, meta) = checkpoint::load(run).with_context(ctx)?;
    if (meta.d_in, meta.d_sae) != (d_in, cfg.d_sae) {
        bail!(
            "--init-from {}: the run has d_in {} and d_sae {}, this one d_in {d_in} and --d-sae {}",
            run.display(),
            meta.d_in,
            meta.d_sae,
            cfg.d_sae
        );
    }
    if theirs.aligned != cfg.aligned {
        bail!(
            "--init-from {}: the run was trained with aligned = {}, this one has --aligned {} (the encoder parameters mean different things)",
            run.display(),
            theirs.aligned,
            cfg.aligned
        );
    }
    if theirs.normalize != cfg.normalize {
        bail!(
            "--init-from {}: the run was trained with --normalize {}, this one has --normalize {} (its weights \
             expect inputs normalised as it trained on them)",
            run.display(),
            theirs.normalize.name(),
            cfg.normalize.name()
        );
    }
    if meta.step < theirs.total_steps() {
        eprintln!(
            "note: --init-from {}: the run has trained {} of its {} steps (a run in progress, or stopped): starting \
             from that checkpoint",
            run.display(),
            meta.step,
            theirs.total_steps()
        );
    }
    let mut fresh = TrainState::new(state.params);
    // The run's densities as estimates: an EMA that started at 0 is divided by its bias now,
    // once (a run that was itself initialised from another holds estimates already). This run's
    // EMA then continues from them and needs no correction (`CandidateRule::density_inherited`);
    // corrected by this run's own step count instead, every density looked 1 / (1 - 0.99^step)
    // times too large and no latent was dying for the first ~100 steps.
    fresh.density = match theirs.init_from {
        Some(_) => state.density,
        None => crate::sparsify::budget::bias_corrected(&state.density, state.step, theirs.density_decay),
    };
    Ok(fresh)
}

/// The new config (so a later resume keeps the change) and a line in `resumes.jsonl` saying
/// what changed at which step.
fn record_resume(
    out: &Path,
    cfg: &TrainConfig,
    step: u64,
    changes: &serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    write_json_atomic(&out.join(CONFIG_FILE), cfg)?;
    let path = out.join(rundir::RESUMES_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{}", json!({ "at_step": step, "changed": changes }))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The end-of-run line about batches skipped for NaN/Inf values (counted over the whole run,
/// resumes included, as in the metrics), if any were.
fn skipped_warning(stats: &data::SourceStats, metrics: &Path) -> Option<String> {
    let n = stats.skipped_nonfinite_batches;
    (n > 0).then(|| {
        format!(
            "warning: skipped {n} training batch{} holding NaN/Inf values (not trained on; data.skipped_nonfinite_batches in {})",
            if n == 1 { "" } else { "es" },
            metrics.display()
        )
    })
}

fn tokens_since(start_step: u64, cfg: &TrainConfig, done: u64) -> u64 {
    (done - start_step) * cfg.batch_size as u64
}

/// Trainer state (for --resume) and the SAELens checkpoint.
fn save_all(cfg: &TrainConfig, backend: &dyn Backend, source: &dyn BatchSource, out: &Path, tokens: u64) -> Result<()> {
    save_all_with(cfg, backend, source, out, tokens, None)
}

/// [`save_all`], recording a threshold calibration in `cfg.json`'s metadata.
fn save_all_with(
    cfg: &TrainConfig,
    backend: &dyn Backend,
    source: &dyn BatchSource,
    out: &Path,
    tokens: u64,
    calibration: Option<&calibrate::CalibrationReport>,
) -> Result<()> {
    let state = backend.state()?;
    // Never a checkpoint that cannot be loaded: the run diverged (the last good checkpoint stays).
    if let Some(what) = checkpoint::non_finite(&state) {
        let why = Diverged { step: state.step, loss: "finite".into(), state: Some(what) };
        write_json_atomic(&out.join(DIVERGED_FILE), &why)?;
        return Err(why.into());
    }
    let shape = state.shape();
    let meta = StateMeta {
        step: state.step,
        d_in: shape.d_in,
        d_sae: shape.d_sae,
        position: source.position(),
        input_scale: source.input_scale(),
        tokens,
        config: Some(checkpoint::trained_config(cfg)?),
    };
    checkpoint::save(out, &state, &meta)?;
    export(cfg, &state, source, out, tokens, calibration)
}

/// The SAELens checkpoint (`cfg.json` + `sae_weights.safetensors`) of `state` in `dir`.
pub(crate) fn export(
    cfg: &TrainConfig,
    state: &TrainState,
    source: &dyn BatchSource,
    dir: &Path,
    tokens: u64,
    calibration: Option<&calibrate::CalibrationReport>,
) -> Result<()> {
    let w_enc_eff = effective_encoder(cfg, state);
    let theta = crate::sparsify::threshold::exported(&state.theta, &state.theta_set);
    let input_scale = source.input_scale();
    let sae = ExportedSae::from_training(cfg, &state.params, &w_enc_eff, &theta, input_scale);
    let mut md = training_metadata(cfg, tokens, input_scale, &source.position());
    md["threshold_calibration"] = json!(calibration);
    // Where the activations come from (model, hook, context, BOS), from the data's manifest:
    // what SAELens / SAEBench and scripts/ce_eval.py need to splice the SAE back in.
    if let Some(m) = source.manifest() {
        md.as_object_mut().expect("an object").extend(m.saelens_metadata());
    }
    sae.save(dir, cfg, md)
}

/// The SAELens `metadata` entries that say what an SAE was trained on: the data's path, the
/// tokens, the global scale folded into the weights, and the data's sampled digest
/// (`saetrain_data_sample`, from the stream `position`), by which `sae eval EXPORT --data D`
/// knows D for the rows the SAE was trained on.
pub fn training_metadata(
    cfg: &TrainConfig,
    tokens: u64,
    input_scale: f32,
    position: &serde_json::Value,
) -> serde_json::Value {
    json!({
        "dataset_path": cfg.data.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "synthetic".into()),
        "trained_tokens": tokens,
        "input_scale_folded": input_scale,
        "saetrain_data_sample": position.get("data_sample"),
    })
}

/// The encoder actually applied (A + alpha W_dec under aligned training).
pub fn effective_encoder(cfg: &TrainConfig, state: &TrainState) -> Vec<f32> {
    let p = state.params.parts();
    if cfg.aligned {
        let mut out = vec![0f32; p.w_enc.len()];
        aligned::effective_encoder(p.w_enc, p.w_dec, p.shape.d_in, &mut out);
        out
    } else {
        p.w_enc.to_vec()
    }
}

/// Keep only the metric lines of steps <= `step` (a resumed run rewrites what follows). Lines
/// that are not JSON (one cut off by a kill) are dropped, with a note.
pub(crate) fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = crate::util::jsonl::parse(path, &text)
        .into_iter()
        .filter(|(_, v)| v["step"].as_u64().is_some_and(|s| s <= step))
        .map(|(l, _)| format!("{l}\n"))
        .collect();
    crate::util::atomic::write_atomic(path, kept.as_bytes())
}

fn progress_bar(cfg: &TrainConfig, total: u64, start: u64) -> ProgressBar {
    if cfg.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta}) {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(start);
    bar
}

/// Running means of step statistics between two log lines.
#[derive(Default)]
struct Window {
    n: f64,
    sums: [f64; 7],
    dead: usize,
}

impl Window {
    fn add(&mut self, s: &StepStats) {
        self.n += 1.0;
        for (acc, v) in self.sums.iter_mut().zip([s.loss, s.rec_loss, s.aux_loss, s.l1_loss, s.l0, s.mse, s.ev]) {
            *acc += v;
        }
        self.dead = s.dead;
    }
    fn mean(&self, step: u64, tokens: u64, lr: f64, elapsed: f64, trained: u64) -> serde_json::Value {
        let m = |i: usize| self.sums[i] / self.n.max(1.0);
        json!({
            "step": step, "tokens": tokens, "lr": lr,
            "loss": m(0), "rec_loss": m(1), "aux_loss": m(2), "l1_loss": m(3),
            "l0": m(4), "mse": m(5), "ev": m(6), "dead": self.dead,
            "elapsed_s": elapsed, "tokens_per_s": trained as f64 / elapsed.max(1e-9),
        })
    }
}
