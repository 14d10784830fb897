//! `sae eval RUN_OR_CHECKPOINT... [--data PATH] [--tokens N] [--compare] [--against B] [--out DIR]`

use crate::eval::report::{labels, write_outputs, EVAL_FILE, REPORT_FILE};
use crate::eval::run::{evaluate, EvalOptions};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Run directories or SAE checkpoints (SAELens or sparsify layout).
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
}

pub fn run(args: EvalArgs) -> Result<()> {
    super::train_cmd::init_threads(args.threads)?;
    let opts = EvalOptions { data: args.data.clone(), tokens: args.tokens };
    if args.history {
        return history(&args, &opts);
    }
    let names = labels(&args.inputs);
    let mut evals = vec![];
    for (path, label) in args.inputs.iter().zip(&names) {
        let mut e = evaluate(path, label, &opts).with_context(|| format!("evaluating {}", path.display()))?;
        if let Some(b) = &args.against {
            e.against = Some(crate::eval::mcs::against(path, b, &e.weights.alignment)?);
        }
        evals.push(e);
    }
    let out = match &args.out {
        Some(o) => o.clone(),
        None if args.inputs.len() == 1 => crate::export::load::checkpoint_dir(&args.inputs[0]).join("eval"),
        None => PathBuf::from("sae-eval"),
    };
    let table = write_outputs(&evals, &out, args.compare, !args.no_plots)?;
    for e in &evals {
        println!("{}: {} ({} layout, {}), data: {}", e.label, e.path.display(), e.layout, e.architecture, e.data);
    }
    print!("{table}");
    println!("wrote {} and {} in {}", EVAL_FILE, REPORT_FILE, out.display());
    Ok(())
}

/// `sae eval --history RUN`.
fn history(args: &EvalArgs, opts: &EvalOptions) -> Result<()> {
    use crate::eval::history::{evaluate_history, write_history};
    anyhow::ensure!(args.inputs.len() == 1, "--history takes one run directory, not {}", args.inputs.len());
    let run = &args.inputs[0];
    let h = evaluate_history(run, opts)?;
    let out = args.out.clone().unwrap_or_else(|| run.join("eval-history"));
    let text = write_history(&h, &out, !args.no_plots)?;
    for n in &h.notes {
        eprintln!("note: {n}");
    }
    print!("{text}");
    println!("wrote {} and {} in {}", EVAL_FILE, REPORT_FILE, out.display());
    Ok(())
}
