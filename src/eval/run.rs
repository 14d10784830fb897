//! `sae eval` on one run directory or checkpoint: load the exported SAE, draw held-out
//! activations, compute every metric with the exported sparsifier (and, for a run directory,
//! with the training sparsifier through the CPU backend), plus weight metrics, ground-truth
//! recovery on synthetic data and the language-model numbers of `ce_eval.json` when present.

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, InferMode};
use crate::config::{Normalize, TrainConfig};
use crate::data::{self, normalize, Batch, BatchSource, ShardOptions, ShardSource};
use crate::export::load::{checkpoint_dir, load_sae_with_layout, Layout};
use crate::export::ExportedSae;
use crate::metrics::recon::{set_mean, weight_metrics, ReconAccumulator, ReconMetrics, WeightMetrics};
use crate::metrics::recovery::{recovery, Recovery};
use crate::model::TrainState;
use crate::train::checkpoint::{self, StateMeta, STATE_FILE};
use crate::train::{CONFIG_FILE, METRICS_FILE};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// File the CE/KL script writes into a run directory.
pub const CE_EVAL_FILE: &str = "ce_eval.json";
/// Default held-out tokens when neither `--tokens` nor the run's config says.
pub const DEFAULT_EVAL_TOKENS: usize = 8192;

#[derive(Clone, Debug, Default)]
pub struct EvalOptions {
    /// Activation shards to evaluate on (default: the run's own held-out split).
    pub data: Option<PathBuf>,
    /// Held-out tokens (default: the run's `eval_tokens`, else 8192).
    pub tokens: Option<usize>,
}

/// One point of the training curves read from `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CurvePoint {
    pub step: f64,
    pub loss: Option<f64>,
    pub l0: Option<f64>,
    pub ev: Option<f64>,
    /// Held-out EV of the periodic evaluations, where the line has one.
    pub eval_ev: Option<f64>,
}

/// Everything `sae eval` measured for one SAE.
#[derive(Clone, Debug, Serialize)]
pub struct SaeEval {
    pub label: String,
    pub path: PathBuf,
    /// A training run directory (config.json + trainer_state) rather than a bare checkpoint.
    pub is_run: bool,
    /// For a run directory: the step of the checkpoint evaluated, and the run's planned steps
    /// (`step < steps`: a run in progress or stopped, its thresholds not yet calibrated).
    pub step: Option<u64>,
    pub steps: Option<u64>,
    pub layout: String,
    pub architecture: String,
    pub k: Option<usize>,
    pub d_in: usize,
    pub d_sae: usize,
    /// The held-out data, in words.
    pub data: String,
    /// The training sparsifier (run directories only).
    pub training_sparsifier: Option<String>,
    /// Metrics with the exported (inference) sparsifier, on raw activations.
    pub exported: ReconMetrics,
    /// Metrics with the training sparsifier (run directories only), on raw activations.
    pub training: Option<ReconMetrics>,
    pub weights: WeightMetrics,
    /// Ground-truth recovery (synthetic data only).
    pub recovery: Option<Recovery>,
    /// Contents of `ce_eval.json` when the run directory has one.
    pub ce_eval: Option<serde_json::Value>,
    /// Training curves from `metrics.jsonl` (run directories only).
    pub curves: Vec<CurvePoint>,
    /// Zipf-Mandelbrot fit of the exported densities by rank (`None`: fewer than 3 alive).
    pub zipf_fit: Option<super::zipf_fit::ZipfFit>,
    /// `--against B`: this SAE's latents against B's (maximum cosine similarity).
    pub against: Option<super::mcs::Against>,
}

impl SaeEval {
    /// ", step N of M, unfinished" for a checkpoint of a run that has not finished, else "".
    pub fn unfinished(&self) -> String {
        match (self.step, self.steps) {
            (Some(a), Some(b)) if a < b => format!(", step {a} of {b}, unfinished"),
            _ => String::new(),
        }
    }
}

/// Evaluate the SAE at `path` (run directory, checkpoint directory or weight file).
pub fn evaluate(path: &Path, label: &str, opts: &EvalOptions) -> Result<SaeEval> {
    let dir = checkpoint_dir(path);
    let run_cfg = match crate::train::run_config_file(&dir) {
        Some(p) => Some(TrainConfig::load(&p).with_context(|| format!("{}", dir.display()))?),
        None => None,
    };
    let has_state = dir.join(STATE_FILE).is_file();
    let is_run = run_cfg.is_some() && has_state;
    let (sae, layout, state) = snapshot(path, is_run)?;
    if let (Some((state, meta)), Some(rc)) = (&state, &run_cfg) {
        // config.json says which rows were held out and how the SAE encodes: one edited since
        // the checkpoint would report on training rows, or on another SAE.
        let command = format!("sae eval {}", dir.display());
        crate::train::checkpoint::check_same_run(&dir, rc, meta, &command, "")?;
        check_same_sae(&dir, &sae, rc, state)?;
    }
    let (step, steps) = match (&state, &run_cfg) {
        (Some((_, meta)), Some(c)) => (Some(meta.step), Some(c.total_steps())),
        _ => (None, None),
    };
    if let (Some(step), Some(c)) = (step, &run_cfg) {
        if let Some(note) = unfinished_note(&dir, step, c, "evaluating") {
            eprintln!("{note}");
        }
    }

    // Where the held-out activations come from.
    let mut cfg = match (&opts.data, &run_cfg) {
        (Some(p), Some(c)) => TrainConfig { data: Some(p.clone()), ..c.clone() },
        (Some(p), None) => TrainConfig { data: Some(p.clone()), ..TrainConfig::default() },
        (None, Some(c)) => c.clone(),
        (None, None) => bail!(
            "{}: not a run directory (no {CONFIG_FILE}), so there is no held-out set to regenerate: give --data",
            dir.display()
        ),
    };
    // Raw activations: the exported SAE has the run's global scale folded in and applies its
    // per-token normalisation itself (`normalize_activations: layer_norm`).
    cfg.normalize = Normalize::None;
    if cfg.data.is_some() && opts.data.is_some() {
        cfg.d_in = None;
    }
    // A run that held out no rows gives no default here: on its own data that is refused below
    // (pointing at --data), on another set the default applies.
    let tokens =
        opts.tokens.or(run_cfg.as_ref().map(|c| c.eval_tokens).filter(|&t| t > 0)).unwrap_or(DEFAULT_EVAL_TOKENS);
    ensure!(tokens > 0, "invalid --tokens 0: must be >= 1");
    cfg.quiet = true;

    // A separate evaluation set has no training split, so all of it may be used; the run's own
    // shards keep the run's split (the split moves with its size, so a split of `tokens` rows
    // would hold rows the run trained on), and at most its held-out rows are used. The
    // synthetic held-out set is drawn apart from the training stream at any size.
    let mut separate =
        opts.data.as_deref().is_some_and(|p| !same_data(p, run_cfg.as_ref().and_then(|c| c.data.as_deref())));
    let mut opened = None;
    let mut training_rows = false;
    if let (true, Some(p)) = (separate, &cfg.data) {
        let o = ShardOptions { evaluation_set: true, eval_tokens: tokens, ..ShardOptions::from_config(&cfg, false) };
        let s = ShardSource::open(p, o)?;
        // Another path to the contents the run trained on (a copy on another disk): its split.
        let trained_on = state.as_ref().and_then(|(_, m)| m.position.get("data_sample")?.as_str().map(String::from));
        if run_cfg.is_none() {
            if let Some(note) = training_rows_note(&dir, p, &s) {
                eprintln!("{note}");
                training_rows = true;
            }
        }
        if run_cfg.is_some() && trained_on.is_some_and(|d| d == s.data_sample()) {
            eprintln!(
                "note: {} holds the data {} was trained on (the same rows sampled at open): evaluating on the run's \
                 held-out split of it",
                p.display(),
                dir.display()
            );
            separate = false;
        } else {
            opened = Some(s);
        }
    }
    let own_split = match &run_cfg {
        Some(rc) if !separate && cfg.data.is_some() => Some(rc.eval_tokens),
        _ => None,
    };
    match own_split {
        Some(0) => bail!(
            "{}: the run held out no rows (--eval-tokens 0), so it trained on every row of its data: give a \
             separate evaluation set with --data",
            dir.display()
        ),
        Some(held_out) => cfg.eval_tokens = held_out,
        None => cfg.eval_tokens = tokens,
    }
    let mut source: Box<dyn BatchSource> = match opened {
        Some(s) => Box::new(s),
        None => data::open_source(&cfg)?,
    };
    ensure!(
        source.d_in() == sae.d_in,
        "the data {} has width {} but the SAE in {} has d_in {}",
        cfg.data.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(synthetic)".into()),
        source.d_in(),
        dir.display(),
        sae.d_in
    );
    // The run's own split is the held-out set only of the data it trained on: a shard added or
    // replaced since moves the split (or changes its rows), and "held-out" would then include
    // rows it trained on. The same check as a resume's (row count, seed, sampled digest).
    if let (Some(_), Some((_, meta))) = (own_split, &state) {
        if let Err(e) = source.seek(&meta.position) {
            bail!(
                "sae eval {}: its data {} is not what the run trained on ({e:#}), so the run's held-out split of it would include training rows; evaluate with the data it trained on, or give a separate evaluation set with --data",
                dir.display(),
                cfg.data.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
            );
        }
    }
    let batches = source.eval_batches(tokens)?;
    if batches.is_empty() {
        let st = source.stats();
        let data = cfg.data.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "(synthetic)".into());
        let why = match (st.skipped_nonfinite_batches, st.excluded_large_norm_rows) {
            (0, 0) => {
                "every held-out batch was empty or held NaN/Inf values: `sae data inspect` shows where".to_string()
            }
            (n, 0) => format!("{n} batches skipped for NaN/Inf values: `sae data inspect` shows where"),
            (n, m) => format!("{n} batches skipped for NaN/Inf values, {m} rows excluded for their norm"),
        };
        bail!("sae eval {}: the data {data} gave no held-out tokens ({why})", dir.display());
    }
    let got: usize = batches.iter().map(|b| b.rows).sum();
    if opts.tokens.is_some_and(|t| got < t) {
        match own_split {
            Some(held_out) => eprintln!(
                "note: --tokens {tokens}: the run held out {held_out} rows (its --eval-tokens), {got} of them usable; \
                 evaluating on those (its other rows were trained on; --data with a separate set can give more)"
            ),
            None => eprintln!("note: --tokens {tokens}: the data has {got} usable held-out rows; evaluating on those"),
        }
    }
    let scale = source.input_scale();
    let raw: Vec<Vec<f32>> = batches.iter().map(|b| unscale(&b.to_f32(), scale)).collect();
    let mean = set_mean(raw.iter().map(|v| v.as_slice()), sae.d_in);

    let exported = eval_exported(&sae, &batches, &raw, mean.clone())?;
    let (training, training_sparsifier) = match (state, run_cfg) {
        (Some(state), Some(rc)) => {
            let name = rc.sparsifier.name().to_string();
            (Some(eval_training(&dir, rc, state, &batches, &raw, mean)?), Some(name))
        }
        _ => (None, None),
    };
    let weights = weight_metrics(&sae.w_enc, &sae.w_dec, sae.d_in);
    let recovery = source.ground_truth().map(|gt| recovery(gt, &sae.w_dec, sae.d_in));
    let ce_eval = read_ce_eval(&dir)?;
    let curves = read_curves(&dir.join(METRICS_FILE))?;
    let zipf_fit = super::zipf_fit::fit(&exported.density);
    Ok(SaeEval {
        label: label.to_string(),
        path: dir.clone(),
        is_run,
        step,
        steps,
        layout: layout.name().to_string(),
        architecture: sae.architecture.clone(),
        k: sae.k,
        d_in: sae.d_in,
        d_sae: sae.d_sae,
        data: match training_rows {
            true => format!("{}; the SAE was trained on this data: these rows are not held out", source.describe()),
            false => source.describe(),
        },
        training_sparsifier,
        exported,
        training,
        weights,
        recovery,
        ce_eval,
        curves,
        zipf_fit,
        against: None,
    })
}

/// A run's trainer state and what is saved beside it.
type Checkpoint = (TrainState, StateMeta);

/// An export (no run directory beside it) evaluated on the data it was trained on: its cfg.json
/// records that data's sampled digest (`metadata.saetrain_data_sample`). Its held-out split is
/// not known here, so the rows are training rows: said, so that the numbers are not read as
/// held-out ones.
fn training_rows_note(dir: &Path, data: &Path, s: &ShardSource) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(crate::export::saelens::CFG_FILE)).ok()?;
    let md = serde_json::from_str::<serde_json::Value>(&text).ok()?.get("metadata")?.clone();
    (md.get("saetrain_data_sample")?.as_str()? == s.data_sample()).then(|| {
        format!(
            "note: {} holds the data the SAE in {} was trained on (metadata.saetrain_data_sample): these numbers \
             include its training rows, they are not held-out ones; evaluate its run directory (which knows its \
             held-out split) or give a separate evaluation set",
            data.display(),
            dir.display()
        )
    })
}

/// The exported SAE and, for a run directory, its trainer state, of one checkpoint. A run in
/// progress writes, at each checkpoint, `trainer_state`, then the SAE's weights, then `cfg.json`
/// (each by an atomic rename). So when `cfg.json`'s `trained_tokens`, read first, equals the
/// tokens of the state read last, the weights read between are of that checkpoint too; else a
/// checkpoint landed meanwhile, and everything is read again.
fn snapshot(path: &Path, is_run: bool) -> Result<(ExportedSae, Layout, Option<Checkpoint>)> {
    let dir = &checkpoint_dir(path);
    let trained_tokens = || -> Option<u64> {
        let text = std::fs::read_to_string(dir.join(crate::export::saelens::CFG_FILE)).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["metadata"]["trained_tokens"].as_u64()
    };
    for _ in 0..3 {
        let tokens = trained_tokens();
        let (sae, layout) = load_sae_with_layout(path)?;
        if !is_run {
            return Ok((sae, layout, None));
        }
        let (state, meta) = checkpoint::load(dir)?;
        if tokens.is_none_or(|t| t == meta.tokens) {
            return Ok((sae, layout, Some((state, meta))));
        }
    }
    if crate::train::rundir::being_written(dir) {
        bail!("{}: a run in progress wrote checkpoints faster than they could be read; try again", dir.display())
    }
    let (tokens, state_tokens) = (trained_tokens().unwrap_or_default(), checkpoint::load(dir)?.1.tokens);
    bail!(
        "{}: field 'metadata.trained_tokens' is {tokens} but {} holds {state_tokens} trained tokens, and no trainer is writing there: the run's SAELens files are not its latest checkpoint's (replaced by hand?); `sae export {} --format saelens --out {}` writes them again from its trainer state",
        dir.join(crate::export::saelens::CFG_FILE).display(),
        dir.join(STATE_FILE).display(),
        dir.display(),
        dir.display()
    )
}

/// A run's exported SAE must be the one its trainer state and config describe (the same sizes,
/// architecture and k): else the report would set one SAE's numbers beside another's.
fn check_same_sae(dir: &Path, sae: &ExportedSae, cfg: &TrainConfig, state: &TrainState) -> Result<()> {
    let arch = cfg.sparsifier.exported().saelens_name();
    let k = (arch == "topk").then_some(cfg.k);
    let shape = state.params.shape;
    let (saved, trained) =
        ((sae.d_in, sae.d_sae, sae.architecture.as_str(), sae.k), (shape.d_in, shape.d_sae, arch, k));
    ensure!(
        saved == trained,
        "{}: holds a {} SAE (d_in {}, d_sae {}{}) but the run's {} and {CONFIG_FILE} describe a {} SAE (d_in {}, d_sae {}{}): its SAELens files are not this run's (replaced by hand, or by an export of another SAE?); `sae export {} --format saelens --out {}` writes them again from its trainer state",
        dir.join(crate::export::saelens::WEIGHTS_FILE).display(),
        saved.2,
        saved.0,
        saved.1,
        saved.3.map(|k| format!(", k {k}")).unwrap_or_default(),
        STATE_FILE,
        trained.2,
        trained.0,
        trained.1,
        trained.3.map(|k| format!(", k {k}")).unwrap_or_default(),
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// The note for a checkpoint of a run that has not reached its planned steps (`doing`:
/// "evaluating", "exporting"), None for a finished one.
pub(crate) fn unfinished_note(dir: &Path, step: u64, cfg: &TrainConfig, doing: &str) -> Option<String> {
    let steps = cfg.total_steps();
    let thresholds = match cfg.sparsifier.batch_dependent() {
        true => ", whose thresholds are the training EMA's, not yet calibrated",
        false => "",
    };
    (step < steps).then(|| {
        format!(
            "note: {} has trained {step} of its {steps} steps (a run in progress, or stopped): {doing} that \
             checkpoint{thresholds}",
            dir.display()
        )
    })
}

/// Whether `given` names the run's own training data (`run`): the same path, or one that
/// resolves to the same file or directory.
pub(crate) fn same_data(given: &Path, run: Option<&Path>) -> bool {
    let Some(run) = run else { return false };
    given == run || matches!((given.canonicalize(), run.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

fn unscale(x: &[f32], scale: f32) -> Vec<f32> {
    if scale == 1.0 {
        x.to_vec()
    } else {
        x.iter().map(|v| v / scale).collect()
    }
}

/// Metrics of the exported SAE on raw activations, one batch at a time.
pub fn eval_exported(sae: &ExportedSae, batches: &[Batch], raw: &[Vec<f32>], mean: Vec<f64>) -> Result<ReconMetrics> {
    let mut acc = ReconAccumulator::new(mean, sae.d_sae);
    for (b, x) in batches.iter().zip(raw) {
        let (codes, x_hat) = sae.forward(x, b.rows)?;
        acc.add(x, &codes, &x_hat);
    }
    Ok(acc.finish())
}

/// Metrics of the training sparsifier: the run's trainer state on the CPU backend, fed the
/// activations as it saw them in training (times its input scale, or normalised per token),
/// reconstructions mapped back to raw units.
fn eval_training(
    dir: &Path,
    cfg: TrainConfig,
    (state, meta): Checkpoint,
    batches: &[Batch],
    raw: &[Vec<f32>],
    mean: Vec<f64>,
) -> Result<ReconMetrics> {
    let s = meta.input_scale;
    let f = state.shape().d_sae;
    let per_token = cfg.normalize == Normalize::PerToken;
    let mut backend = CpuBackend::new(cfg, state).with_context(|| format!("{}", dir.display()))?;
    let mut acc = ReconAccumulator::new(mean, f);
    for (b, x) in batches.iter().zip(raw) {
        let (xs, stats) = match per_token {
            true => normalize::per_token(x, b.d_in),
            false => (x.iter().map(|v| v * s).collect(), vec![]),
        };
        let inf = backend.infer(&Batch::from_f32(b.rows, b.d_in, xs), InferMode::Training)?;
        let mut x_hat = unscale(&inf.x_hat, s);
        if per_token {
            normalize::denormalize(&mut x_hat, &stats, b.d_in);
        }
        acc.add(x, &inf.codes, &x_hat);
    }
    Ok(acc.finish())
}

fn read_ce_eval(dir: &Path) -> Result<Option<serde_json::Value>> {
    let p = dir.join(CE_EVAL_FILE);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let v = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
    Ok(Some(v))
}

/// Loss, L0 and EV per logged step (lines that do not parse are skipped, with a note).
pub fn read_curves(path: &Path) -> Result<Vec<CurvePoint>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(vec![]) };
    Ok(crate::util::jsonl::parse(path, &text)
        .into_iter()
        .filter_map(|(_, v)| {
            Some(CurvePoint {
                step: v.get("step")?.as_f64()?,
                loss: v.get("loss").and_then(|x| x.as_f64()),
                l0: v.get("l0").and_then(|x| x.as_f64()),
                ev: v.get("ev").and_then(|x| x.as_f64()),
                eval_ev: v.get("eval").and_then(|e| e.get("explained_variance")).and_then(|x| x.as_f64()),
            })
        })
        .collect())
}
