//! `sae sweep --over OPTION=V1,V2,... [--over OPTION2=W1,W2,...] --out DIR -- [sae train flags]`

use crate::config::TrainConfig;
use crate::sweep::{self, Axis, Definition};
use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct SweepArgs {
    /// A swept option and its values, `OPTION=V1,V2,...` (a config-file key or flag name: k,
    /// d_sae, rate, l1_coeff, sparsifier, lr, ...). Once or twice: the first is the x axis of the
    /// pictures, the second gives one line per value.
    #[arg(long = "over", required = true, value_name = "OPTION=VALUES")]
    pub over: Vec<String>,
    /// Sweep directory: sweep.json, one run directory per grid point, results and pictures.
    /// Running the same command again skips finished runs and resumes interrupted ones.
    #[arg(long)]
    pub out: PathBuf,
    /// Skip the PNG pictures.
    #[arg(long, default_value_t = false)]
    pub no_plots: bool,
    /// `sae train` flags every run shares (after `--`), `--config FILE` included; not --out.
    #[arg(last = true, value_name = "TRAIN_FLAGS")]
    pub train: Vec<String>,
}

/// The shared `sae train` flags, parsed as `sae train` parses them.
#[derive(Parser, Debug)]
#[command(name = "sae sweep ... --", no_binary_name = false, allow_negative_numbers = true)]
struct Shared {
    /// TOML or JSON file with training options (flags given here override it).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    cfg: TrainConfig,
}

pub fn run(args: SweepArgs) -> Result<()> {
    let matches = Shared::command()
        .try_get_matches_from(std::iter::once("sae sweep --".to_string()).chain(args.train.iter().cloned()))
        .context("the sae train flags after --")?;
    let shared = Shared::from_arg_matches(&matches)?;
    let mut base = TrainConfig::resolve(&shared.cfg, &matches, shared.config.as_deref())?;
    // --zipf-from is fitted once, so every run of the grid (and a re-run) uses the same values.
    if let Some(line) = crate::eval::zipf_fit::apply_zipf_from(&mut base)? {
        eprintln!("{line}");
    }
    let given = TrainConfig::given(&shared.cfg, &matches)?;
    if given.contains_key("out") {
        bail!("--out after -- : each run's directory is SWEEP/OPTION=VALUE; give the sweep's --out before --");
    }
    let over = args.over.iter().map(|s| Axis::parse(s)).collect::<Result<Vec<_>>>()?;
    for a in &over {
        if given.contains_key(&a.option) {
            bail!("--{} is swept (--over {}=...): do not also give it after --", a.option.replace('_', "-"), a.option);
        }
    }
    super::train_cmd::init_threads(base.threads)?;
    let def = Definition { over, base };
    let stop = super::stop::install()?;
    let results = sweep::run(&args.out, &def, Some(stop), &mut |line| eprintln!("sweep: {line}")).map_err(|e| {
        match e.downcast_ref::<crate::train::Interrupted>() {
            Some(_) => {
                e.context(format!("sweep stopped; the same sae sweep command continues it from {}", args.out.display()))
            }
            None => e,
        }
    })?;
    let table = sweep::report::write(&args.out, &def, &results, !args.no_plots)?;
    print!("{table}");
    println!(
        "wrote {}, {}, {} in {}",
        sweep::report::RESULTS_CSV,
        sweep::report::RESULTS_JSON,
        crate::eval::report::REPORT_FILE,
        args.out.display()
    );
    Ok(())
}
