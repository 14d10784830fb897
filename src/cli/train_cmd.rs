//! `sae train`: resolve the config (defaults < --config file < flags), train, print the summary.

use crate::config::TrainConfig;
use crate::train::{self, rundir, RunOptions, Summary};
use anyhow::{Context, Result};
use clap::{ArgMatches, Args};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// TOML or JSON file with any of the options below (flags given here override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint. Only --steps, --tokens,
    /// --threads, --quiet, --log-every, --eval-every, --checkpoint-every, --keep-checkpoints,
    /// --history-every, --prefetch, --backend and --dense-codes may differ from the saved config
    /// (changes are recorded in resumes.jsonl).
    #[arg(long, conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// Replace a previous run's files in --out (refused when --out also holds other files: they
    /// are never deleted).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    #[command(flatten)]
    pub cfg: TrainConfig,
}

pub fn run(args: TrainArgs, matches: &ArgMatches) -> Result<()> {
    let (cfg, mut opts) = prepare(&args, matches)?;
    match args.resume.as_deref() {
        Some(dir) => refuse_a_running_sweeps_point(dir, "--resume")?,
        None => refuse_a_running_sweeps_point(&cfg.out, "--out")?,
    }
    init_threads(cfg.threads)?;
    opts.on_step = Some(super::stop::install()?);
    let summary = train::run_with(cfg, args.resume.as_deref(), &opts)?;
    print_summary(&summary);
    Ok(())
}

/// The resolved config and run options of parsed `sae train` arguments (shared with the Python
/// package, which parses its keyword arguments as these flags).
pub fn prepare(args: &TrainArgs, matches: &ArgMatches) -> Result<(TrainConfig, RunOptions)> {
    let mut cfg = TrainConfig::resolve(&args.cfg, matches, args.config.as_deref())?;
    if args.resume.is_none() {
        // The fitted values go into config.json: a resume reads them back, it does not refit.
        // The fit may evaluate the source run: in a pool of its own, sized as --threads says, so
        // that rayon's global pool is still free to be sized for training (`init_threads`).
        let fit = |cfg: &mut TrainConfig| crate::eval::zipf_fit::apply_zipf_from(cfg);
        let line = match cfg.threads {
            Some(n) => rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .context("cannot size the thread pool")?
                .install(|| fit(&mut cfg))?,
            None => fit(&mut cfg)?,
        };
        if let Some(line) = line {
            eprintln!("{line}");
        }
    }
    let mut opts = RunOptions { overwrite: args.overwrite, ..Default::default() };
    if let (Some(dir), Some(clap::parser::ValueSource::CommandLine)) = (&args.resume, matches.value_source("out")) {
        let same = matches!((dir.canonicalize(), args.cfg.out.canonicalize()), (Ok(a), Ok(b)) if a == b);
        anyhow::ensure!(
            same,
            "--resume {} continues the run in that directory; --out {} names another: drop --out (a resume \
             writes where the run is)",
            dir.display(),
            args.cfg.out.display()
        );
    }
    if let Some(dir) = &args.resume {
        // Refuse options that differ from the saved config (unless safe to change).
        if let Ok(saved) = TrainConfig::load(&dir.join(train::CONFIG_FILE)) {
            opts.resume_changes = rundir::resume_changes(&saved, &TrainConfig::given(&args.cfg, matches)?)?;
        }
    }
    Ok((cfg, opts))
}

/// A run directory inside a sweep that is running now is that sweep's to write (its lock is on
/// the sweep's directory, not on points it has not reached yet).
fn refuse_a_running_sweeps_point(out: &std::path::Path, flag: &str) -> Result<()> {
    let Some(sweep) = out.parent().filter(|p| !p.as_os_str().is_empty()) else { return Ok(()) };
    anyhow::ensure!(
        !(sweep.join(crate::sweep::SWEEP_FILE).is_file() && rundir::being_written(sweep)),
        "{flag} {} is a point of the sweep in {}, which is running now: the sweep trains it; wait for the sweep \
         to finish, or choose another --out",
        out.display(),
        sweep.display()
    );
    Ok(())
}

/// Size rayon's global pool once (the CPU backend and the GEMM share it).
pub fn init_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("cannot size the thread pool")?;
    }
    Ok(())
}

pub fn print_summary(s: &Summary) {
    let e = &s.eval;
    println!("run: {}", s.out.display());
    println!("backend: {}   data: {}", s.backend, s.data);
    println!(
        "trained {} steps, {} tokens in {:.1} s ({:.0} tokens/s)",
        s.steps, s.tokens, s.seconds, s.tokens_per_second
    );
    match s.data_stats.epochs {
        0 => {}
        n => println!(
            "data: {n} full pass{} over the training rows; the held-out rows below were never trained on",
            if n == 1 { "" } else { "es" }
        ),
    }
    if e.tokens == 0 {
        println!("held-out: none (--eval-tokens 0), so no held-out metrics; sae eval RUN --data DIR measures them");
        return print_recovery(s);
    }
    println!("held-out ({} tokens, exported sparsifier):", e.tokens);
    println!("  L0            {:>10.2}", e.l0);
    println!("  MSE           {:>10.5}", e.mse);
    println!("  EV            {:>10.4}", e.explained_variance);
    println!("  alive         {:>10.4}   dead {}", e.frac_alive, e.dead);
    let t = &s.eval_training_sparsifier;
    println!("  (training sparsifier: L0 {:.2}, EV {:.4}, alive {:.4})", t.l0, t.explained_variance, t.frac_alive);
    print_recovery(s)
}

fn print_recovery(s: &Summary) {
    if let Some(r) = &s.recovery {
        println!("ground truth ({} features):", r.n_true);
        println!("  MMCS          {:>10.4}", r.mmcs);
        println!("  recovered>0.9 {:>10.4}", r.frac_above_0_9);
    }
}
