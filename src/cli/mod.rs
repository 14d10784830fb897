//! The `sae` command line.

pub mod bench_cmd;
pub mod eval_cmd;
pub mod export_cmd;
pub mod stop;
pub mod sweep_cmd;
pub mod train_cmd;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// `sae --version`: also how this build gets its CUDA kernels (a binary built without nvcc
/// needs libnvrtc on the GPU machine).
#[cfg(saetrain_fatbin)]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nCUDA kernels: compiled ahead of time by nvcc (embedded fatbin: sm_80/86/89/90, PTX compute_90)"
);
#[cfg(not(saetrain_fatbin))]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\nCUDA kernels: compiled at run time by NVRTC (no nvcc at build time; needs libnvrtc.so.13)"
);

#[derive(Parser, Debug)]
#[command(name = "sae", version, long_version = LONG_VERSION, about = "Train, evaluate and benchmark sparse autoencoders on LM activations")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train an SAE (default: a WTA SAE on built-in synthetic data).
    // Negative numbers are values (`--lr -1`), so that the option's own check can say what is
    // wrong with them instead of clap's "unexpected argument '-1'".
    #[command(allow_negative_numbers = true)]
    Train(Box<train_cmd::TrainArgs>),
    /// Activation shards: inspect them, or write the synthetic dataset to disk.
    #[command(subcommand)]
    Data(crate::data::cli::DataArgs),
    /// Check the CUDA kernels against the CPU backend on this machine's GPU.
    Selftest {
        /// Run the kernels on the host emulator instead of a GPU (slow; what CI checks).
        #[arg(long)]
        emulator: bool,
    },
    /// Benchmarks: a training step split into phases, or every sparsifier's selection.
    #[command(subcommand)]
    Bench(bench_cmd::BenchArgs),
    /// Evaluate run directories or SAE checkpoints on held-out activations.
    #[command(allow_negative_numbers = true)]
    Eval(eval_cmd::EvalArgs),
    /// Write a run's SAE in the SAELens, sparsify or dictionary_learning layout.
    #[command(allow_negative_numbers = true)]
    Export(export_cmd::ExportArgs),
    /// Train and evaluate one run per point of a grid over one or two options.
    Sweep(sweep_cmd::SweepArgs),
}

pub fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    match cli.command {
        Command::Train(args) => {
            let sub = matches.subcommand_matches("train").expect("train subcommand matched");
            train_cmd::run(*args, sub)
        }
        Command::Bench(args) => bench_cmd::run(args),
        Command::Data(args) => crate::data::cli::run(args),
        Command::Selftest { emulator } => {
            use crate::backend::cuda::selftest::{run_selftest_on, Target};
            let report = run_selftest_on(if emulator { Target::Emulator } else { Target::Gpu })?;
            println!("{report}");
            anyhow::ensure!(report.passed(), "CUDA selftest failed");
            Ok(())
        }
        Command::Eval(args) => {
            stop::quit_cleanly_on_signal()?;
            eval_cmd::run(args)
        }
        Command::Export(args) => {
            stop::quit_cleanly_on_signal()?;
            export_cmd::run(args)
        }
        Command::Sweep(args) => sweep_cmd::run(args),
    }
}
