//! `sae eval RUN_OR_CHECKPOINT... [--data PATH] [--tokens N] [--compare] [--against B] [--out DIR]
//! [--model M [--hook H] [--ce-tokens DIR] [--ce-max-tokens N] [--python PY]]`
//!
//! With `--model`, the language-model scores (CE loss / KL, SAEBench "core") come from
//! `scripts/ce_eval.py`, compiled into the binary and run with `--python` (default
//! `$SAETRAIN_PYTHON`, else `python3`, which needs torch and transformers); its `ce_eval.json` is
//! stored beside each SAE and joins the report. Without `--model` nothing needs Python: a
//! `ce_eval.json` already beside an SAE is reported as it is.

use crate::eval::report::{labels, write_outputs, EVAL_FILE, REPORT_FILE};
use crate::eval::run::{evaluate, EvalOptions};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Run directories or SAE checkpoints (SAELens, sparsify or dictionary_learning layout).
    #[arg(required = true, value_name = "RUN_OR_CHECKPOINT")]
    pub inputs: Vec<PathBuf>,
    /// Activation shards to evaluate on (default: each run's own held-out split; required for a
    /// checkpoint that is not a run directory).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out tokens (default: the run's eval_tokens, else 8192).
    #[arg(long)]
    pub tokens: Option<usize>,
    /// Overlay all inputs in one set of pictures.
    #[arg(long, default_value_t = false)]
    pub compare: bool,
    /// Compare each input's latents with this SAE's (run directory or checkpoint, same d_in):
    /// maximum cosine similarity of decoder and encoder rows.
    #[arg(long, value_name = "RUN_OR_CHECKPOINT")]
    pub against: Option<PathBuf>,
    /// Output directory (default: RUN/eval for one input, sae-eval for several).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write into a non-empty --out that holds no earlier evaluation (its eval.json, report.md
    /// and pictures are replaced; other files are left alone).
    #[arg(long, default_value_t = false)]
    pub overwrite: bool,
    /// Skip the PNG pictures.
    #[arg(long, default_value_t = false)]
    pub no_plots: bool,
    /// The training history of one run (its kept checkpoints and history.jsonl) instead of its
    /// final SAE; output default RUN/eval-history.
    #[arg(long, default_value_t = false, conflicts_with = "compare")]
    pub history: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Language model (Hugging Face id, directory or .gguf file): also measure CE loss / KL with
    /// each SAE spliced in (scripts/ce_eval.py; needs Python with torch and transformers).
    #[arg(long)]
    pub model: Option<String>,
    /// Hook to splice at (default: the SAE's cfg.json metadata.hook_name, i.e. where it was
    /// harvested).
    #[arg(long, requires = "model")]
    pub hook: Option<String>,
    /// Harvested token windows for the CE evaluation (default: the SAE's metadata.dataset_path).
    #[arg(long, requires = "model")]
    pub ce_tokens: Option<PathBuf>,
    /// Token positions for the CE evaluation (default: the script's, 65,536).
    #[arg(long, requires = "model")]
    pub ce_max_tokens: Option<usize>,
    /// Python interpreter for the CE evaluation (default: $SAETRAIN_PYTHON, else python3).
    #[arg(long, requires = "model")]
    pub python: Option<PathBuf>,
}

/// The CE script and the module it imports, compiled in so that an installed `sae` finds them.
const CE_SCRIPT: &str = include_str!("../../scripts/ce_eval.py");
const HOOKS_MODULE: &str = include_str!("../../scripts/saetrain_hooks.py");

/// Run scripts/ce_eval.py on one SAE and store its `ce_eval.json` beside it (where
/// [`evaluate`] reads it).
/// For a run trained on harvested shards, when the CE evaluation reads their token windows (no
/// `--ce-tokens`, or the run's own data): the run's held-out rows per shard, for
/// `scripts/ce_eval.py --held-out`, so that the language-model scores are measured on text the
/// SAE was not trained on, as the reconstruction metrics are. None otherwise.
fn held_out_rows(args: &EvalArgs, dir: &std::path::Path) -> Result<Option<serde_json::Value>> {
    use crate::config::TrainConfig;
    use crate::data::{ShardOptions, ShardSource};
    let Some(config) = crate::train::run_config_file(dir) else { return Ok(None) };
    let cfg = TrainConfig::load(&config).with_context(|| format!("{}", dir.display()))?;
    let Some(data) = cfg.data.as_deref() else { return Ok(None) };
    if args.ce_tokens.as_deref().is_some_and(|t| !crate::eval::run::same_data(t, Some(data)))
        || data.to_string_lossy().starts_with(crate::data::memory::PREFIX)
    {
        return Ok(None);
    }
    let source = ShardSource::open(data, ShardOptions::from_config(&cfg, false))?;
    let shards = source
        .dataset()
        .shards
        .iter()
        .map(|sh| {
            let segs: Vec<[usize; 2]> = source
                .held_out_segments()
                .into_iter()
                .filter(|(p, _, _)| *p == sh.path.as_path())
                .map(|(_, start, rows)| [start, rows])
                .collect();
            serde_json::json!({"file": sh.path, "rows": sh.rows, "held_out": segs})
        })
        .collect::<Vec<_>>();
    Ok(Some(serde_json::json!({ "shards": shards })))
}

fn run_ce_eval(args: &EvalArgs, model: &str, input: &std::path::Path) -> Result<()> {
    use crate::eval::run::CE_EVAL_FILE;
    let dir = crate::export::load::checkpoint_dir(input);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = std::env::temp_dir().join(format!("saetrain-ce-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        let script = tmp.join("ce_eval.py");
        std::fs::write(&script, CE_SCRIPT).with_context(|| format!("cannot write {}", script.display()))?;
        std::fs::write(tmp.join("saetrain_hooks.py"), HOOKS_MODULE)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let out = tmp.join(CE_EVAL_FILE);
        let python = args
            .python
            .clone()
            .or_else(|| std::env::var_os("SAETRAIN_PYTHON").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("python3"));
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(&script).arg("--sae").arg(&dir).arg("--model").arg(model).arg("--out").arg(&out);
        if let Some(h) = &args.hook {
            cmd.arg("--hook").arg(h);
        }
        if let Some(t) = &args.ce_tokens {
            cmd.arg("--tokens").arg(t);
        }
        if let Some(n) = args.ce_max_tokens {
            cmd.arg("--max-tokens").arg(n.to_string());
        }
        if let Some(held_out) = held_out_rows(args, &dir)? {
            let file = tmp.join("held_out.json");
            std::fs::write(&file, held_out.to_string()).with_context(|| format!("cannot write {}", file.display()))?;
            cmd.arg("--held-out").arg(&file);
        }
        let status = cmd.status().with_context(|| format!("cannot run {} (--python)", python.display()))?;
        if !status.success() {
            anyhow::bail!("scripts/ce_eval.py failed ({status}) for {}", dir.display());
        }
        let bytes = std::fs::read(&out).with_context(|| {
            format!("scripts/ce_eval.py wrote no result: does {} have torch and transformers?", python.display())
        })?;
        crate::util::atomic::write_atomic(&dir.join(CE_EVAL_FILE), &bytes)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

pub fn run(args: EvalArgs) -> Result<()> {
    super::train_cmd::init_threads(args.threads)?;
    let opts = EvalOptions { data: args.data.clone(), tokens: args.tokens };
    if args.history {
        return history(&args, &opts);
    }
    let out = match &args.out {
        Some(o) => o.clone(),
        None if args.inputs.len() == 1 => crate::export::load::checkpoint_dir(&args.inputs[0]).join("eval"),
        None => PathBuf::from("sae-eval"),
    };
    // Checked before the (long) evaluation, so that a refused --out costs nothing.
    let mut out = crate::eval::out_dir::prepare(&out, &args.inputs, args.overwrite)?;
    let names = labels(&args.inputs);
    let mut evals = vec![];
    // Every input is evaluated even after one fails, so that one run says what is wrong with
    // each; a report of only some of them is not written.
    let mut failed = vec![];
    for (path, label) in args.inputs.iter().zip(&names) {
        let one = || -> Result<crate::eval::run::SaeEval> {
            if let Some(model) = &args.model {
                run_ce_eval(&args, model, path).with_context(|| format!("CE evaluation of {}", path.display()))?;
            }
            let mut e = crate::util::context::naming(evaluate(path, label, &opts), "evaluating", path)?;
            if let Some(b) = &args.against {
                e.against = Some(crate::eval::mcs::against(path, b, &e.weights.alignment)?);
            }
            Ok(e)
        };
        match one() {
            Ok(e) => {
                warn_if_not_finite(&e);
                evals.push(e);
            }
            Err(e) if args.inputs.len() == 1 => return Err(e),
            Err(e) => failed.push(format!("{}: {e:#}", path.display())),
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "{} of the {} inputs could not be evaluated, so no report was written (the other {} evaluated \
             fine; drop the failed ones to report those):\n  {}",
            failed.len(),
            args.inputs.len(),
            args.inputs.len() - failed.len(),
            failed.join("\n  ")
        );
    }

    out.begin()?;
    let (table, files) = write_outputs(&evals, &out.staging(), args.compare, !args.no_plots)?;
    out.finish(&files)?;
    for e in &evals {
        let (label, path, layout, arch, more) =
            (&e.label, e.path.display(), &e.layout, &e.architecture, e.unfinished());
        println!("{label}: {path} ({layout} layout, {arch}{more}), data: {}", e.data);
    }
    print!("{table}");
    println!("wrote {} and {} in {}", EVAL_FILE, REPORT_FILE, out.dir.display());
    Ok(())
}

/// Say so when an SAE's metrics are not numbers: weights so large that its outputs overflow
/// f32 (a diverged or damaged SAE) give NaN or infinite errors, which the report would otherwise
/// show without a word.
fn warn_if_not_finite(e: &crate::eval::run::SaeEval) {
    let m = &e.exported;
    let bad: Vec<String> = [("MSE", m.mse), ("EV", m.explained_variance), ("L0", m.l0)]
        .iter()
        .filter(|(_, v)| !v.is_finite() || v.abs() > 1e30)
        .map(|(n, v)| format!("{n} {v:.4e}"))
        .collect();
    if !bad.is_empty() && m.tokens > 0 {
        eprintln!(
            "warning: {}: {} on {} tokens: its reconstructions overflow or explode (weights too large for f32?); \
             these numbers say nothing about the SAE's quality",
            e.path.display(),
            bad.join(", "),
            m.tokens
        );
    }
}

/// `sae eval --history RUN`.
fn history(args: &EvalArgs, opts: &EvalOptions) -> Result<()> {
    use crate::eval::history::{evaluate_history, write_history};
    anyhow::ensure!(args.inputs.len() == 1, "--history takes one run directory, not {}", args.inputs.len());
    let run = &args.inputs[0];
    let out = args.out.clone().unwrap_or_else(|| run.join("eval-history"));
    let mut out = crate::eval::out_dir::prepare(&out, &args.inputs, args.overwrite)?;
    let h = evaluate_history(run, opts)?;
    out.begin()?;
    let (text, files) = write_history(&h, &out.staging(), !args.no_plots)?;
    out.finish(&files)?;
    for n in &h.notes {
        eprintln!("note: {n}");
    }
    print!("{text}");
    println!("wrote {} and {} in {}", EVAL_FILE, REPORT_FILE, out.dir.display());
    Ok(())
}
