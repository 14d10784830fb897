//! `sae bench step | sparsifiers`: tables on stdout, JSON with `--json FILE`.

use crate::backend::cuda::selftest::Target;
use crate::bench;
use crate::config::{BackendChoice, Precision, SparsifierKind};
use crate::sparsify::cases::cases_of;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum BenchArgs {
    /// A training step per sparsifier, split into phases, against the encoder GEMM alone.
    #[command(allow_negative_numbers = true)]
    Step(StepArgs),
    /// Selection alone for every sparsifier over a grid of shapes.
    #[command(allow_negative_numbers = true)]
    Sparsifiers(SparsifierArgs),
    /// The CUDA backend's device-memory plan for a config, and the largest dictionary that fits.
    #[command(allow_negative_numbers = true)]
    Memory(MemoryArgs),
}

#[derive(Args, Debug)]
pub struct MemoryArgs {
    #[arg(long, default_value_t = 1024)]
    pub d_in: usize,
    #[arg(long, default_value_t = 8192)]
    pub d_sae: usize,
    #[arg(long, default_value_t = 8192)]
    pub batch: usize,
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    #[arg(long, value_enum, default_value_t = crate::config::Precision::F32)]
    pub precision: crate::config::Precision,
    /// Device memory to plan for (GB).
    #[arg(long, default_value_t = 80.0)]
    pub gb: f64,
}

#[derive(Args, Debug)]
pub struct StepArgs {
    #[arg(long, default_value_t = 576)]
    pub d_in: usize,
    #[arg(long, default_value_t = 4608)]
    pub d_sae: usize,
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    #[arg(long, default_value_t = 32)]
    pub k: usize,
    /// Timed steps per sparsifier (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Only these sparsifiers (default: all; wta also times its Zipf-budget form, "wta zipf").
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sparsifier: Vec<SparsifierKind>,
    /// Also write the results as JSON to this file (a new one, unless --overwrite).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Let --json replace an existing file.
    #[arg(long, default_value_t = false)]
    pub overwrite: bool,
    #[arg(long)]
    pub threads: Option<usize>,
    /// cpu, cuda (both encoders: cuBLAS and the fused kernel), or auto (cuda when usable).
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Encoder precision for cuBLAS on CUDA.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// CPU: hold this fraction of latents dead before every step, so the aux loss runs (rows
    /// marked "+aux"; sparsifiers without a default aux loss get aux_k).
    #[arg(long, default_value_t = 0.0)]
    pub dead_fraction: f64,
    /// Sparse or dense products with the codes (as `sae train --dense-codes`; CUDA: the main
    /// codes, and auto only with cuBLAS).
    #[arg(long, value_enum, default_value_t = crate::config::DenseCodes::Auto)]
    pub dense_codes: crate::config::DenseCodes,
}

#[derive(Args, Debug)]
pub struct SparsifierArgs {
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024, 4096])]
    pub batch: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_values_t = vec![4096, 16384])]
    pub d_sae: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_values_t = vec![32, 128])]
    pub k: Vec<usize>,
    /// The full grid: batch 1024..16384, d_sae 4096..65536 (needs ~4 GB for the largest pre).
    #[arg(long)]
    pub full: bool,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also write the results as JSON to this file (a new one, unless --overwrite).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Let --json replace an existing file.
    #[arg(long, default_value_t = false)]
    pub overwrite: bool,
    #[arg(long)]
    pub threads: Option<usize>,
    /// Backends to time (default: the CPU, and CUDA when a device is usable).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub backend: Vec<BackendChoice>,
}

/// The CUDA target a backend choice names, if any (auto: the GPU when one is usable).
fn cuda_target(b: BackendChoice) -> Option<Target> {
    match b {
        BackendChoice::Cpu => None,
        BackendChoice::Cuda => Some(Target::Gpu),
        BackendChoice::CudaEmulator => Some(Target::Emulator),
        BackendChoice::Auto => crate::backend::cuda::probe().ok().map(|_| Target::Gpu),
    }
}

fn print_cuda_step(r: &bench::cuda::CudaStepReport) {
    println!("cuda step bench on {}: d_in={} d_sae={} batch={} k={}", r.device, r.d_in, r.d_sae, r.batch, r.k);
    for e in &r.encoders {
        println!("  encoder product, {:<12} {:>9.3} ms = {:>7.2} TFLOP/s", e.encoder, e.ms, e.tflops);
    }
    println!("  (the first rule's; each row's step/GEMM divides by its own rule's product, timed before and after its steps)");
    let rows: Vec<(&str, &bench::StepRow)> = r.rows.iter().map(|r| (r.encoder.as_str(), &r.row)).collect();
    print_step_table(&rows, 3);
    print_fraction_table(&rows);
}

/// Each phase of each row as a fraction of the encoder GEMM (encode contains the GEMM itself, so
/// encode - 1 is what the encoder spends beyond the product).
fn print_fraction_table(rows: &[(&str, &bench::StepRow)]) {
    let lw = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let label = |l: &str| if lw == 0 { String::new() } else { format!("{l:<lw$} ") };
    println!(
        "{}{:<14} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} (x encoder GEMM)",
        label(if lw == 0 { "" } else { "encoder" }),
        "phase / GEMM",
        "encode",
        "select",
        "decode",
        "backward",
        "adam",
        "step"
    );
    for (l, row) in rows {
        let f = &row.phases_over_gemm;
        println!(
            "{}{:<14} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>7.2} {:>7.2}",
            label(l),
            row.sparsifier,
            f.encode,
            f.select,
            f.decode,
            f.backward,
            f.optimizer,
            row.step_over_gemm
        );
    }
}

/// Each phase's modelled traffic as GB/s, against the measured read bandwidth (the encode phase
/// is the GEMM, compute-bound: see the FMA peak above).
fn print_traffic_table(r: &bench::StepReport) {
    println!(
        "{:<14} {:>7} {:>7} {:>8} {:>7} (GB/s of modelled traffic; memory read bandwidth {:.0} GB/s measured)",
        "phase GB/s", "select", "decode", "backward", "adam", r.read_gb_per_s
    );
    for row in &r.rows {
        let Some(t) = &row.traffic else { continue };
        let g = &t.gb_per_s;
        println!("{:<14} {:>7.0} {:>7.0} {:>8.0} {:>7.0}", row.sparsifier, g.select, g.decode, g.backward, g.optimizer);
    }
    println!(
        "  (bytes per phase: src/bench/traffic.rs. Gathered rows count once per kept entry, so a phase served \
         from cache can pass the bandwidth; aux products and the dense path (relu at init) are GEMMs, not counted.)"
    );
}

/// The CPU header: shape, threads, the GEMM and its fraction of the measured FMA peak.
fn cpu_header(r: &bench::StepReport) -> String {
    let mut s = format!(
        "cpu step bench: d_in={} d_sae={} batch={} k={} threads={}; encoder GEMM {:.1} ms = {:.0} GFLOP/s",
        r.d_in, r.d_sae, r.batch, r.k, r.threads, r.gemm_ms, r.gemm_gflops
    );
    match (&r.fma_peak, r.gemm_frac_peak) {
        (Some(p), Some(f)) => {
            s += &format!(
                " = {:.0}% of the FMA peak\n  FMA peak {:.0} GFLOP/s = {} threads x {:.2} GHz x {:.1} FLOP/cycle ({})",
                100.0 * f,
                p.gflops,
                p.threads,
                p.ghz,
                p.flop_per_cycle,
                p.method
            )
        }
        _ => s += "\n  FMA peak: not measured (no FMA loop for this CPU)",
    }
    if r.gemm_frac_peak.is_some_and(|f| f > 1.0) {
        s += "\n  note: the GEMM ran faster than the FMA peak measured before and after it: the machine's speed \
              changed in between (shared or moved cores), so this fraction means nothing; run again";
    }
    if r.cpu_share < 0.9 {
        s += &format!(
            "\n  note: the GEMM got {:.0}% of its {} threads' CPU time (other processes share the cores): every time here is inflated",
            100.0 * r.cpu_share,
            r.threads
        );
    }
    s
}

/// The step table: one line per (label, row); `label` is the encoder on CUDA, empty on the CPU.
/// `dp`: decimals of the millisecond columns (GPU steps are sub-millisecond).
fn print_step_table(rows: &[(&str, &bench::StepRow)], dp: usize) {
    let lw = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let label = |l: &str| if lw == 0 { String::new() } else { format!("{l:<lw$} ") };
    println!(
        "{}{:<14} {:>9} {:>11} {:>9} {:>8} | {:>7} {:>7} {:>7} {:>8} {:>7} (ms/step)",
        label(if lw == 0 { "" } else { "encoder" }),
        "sparsifier",
        "step ms",
        "tokens/s",
        "step/GEMM",
        "L0",
        "encode",
        "select",
        "decode",
        "backward",
        "adam"
    );
    for (l, row) in rows {
        let p = &row.phases_ms;
        println!(
            "{}{:<14} {:>9.dp$} {:>11.0} {:>9.2} {:>8.1} | {:>7.dp$} {:>7.dp$} {:>7.dp$} {:>8.dp$} {:>7.dp$}",
            label(l),
            row.sparsifier,
            row.step_ms,
            row.tokens_per_s,
            row.step_over_gemm,
            row.l0,
            p.encode,
            p.select,
            p.decode,
            p.backward,
            p.optimizer
        );
    }
}

/// Sizes a benchmark can time: each at least 1, and k at most d_sae (a step of nothing reported
/// millions of tokens per second before).
fn check_sizes(d_in: usize, d_saes: &[usize], batches: &[usize], ks: &[usize]) -> Result<()> {
    for (name, vs) in [("--d-in", &[d_in][..]), ("--d-sae", d_saes), ("--batch", batches), ("--k", ks)] {
        anyhow::ensure!(vs.iter().all(|&v| v >= 1), "invalid {name} 0: must be >= 1");
    }
    let (f, k) = (d_saes.iter().min().copied().unwrap_or(1), ks.iter().max().copied().unwrap_or(1));
    anyhow::ensure!(k <= f, "invalid --k {k}: more than --d-sae {f} latents");
    // What a step allocates must be countable: batch x d_sae within the workspace's 2^32
    // entries (the CUDA backend's limit, and 16 GiB of pre-activations on the CPU), d_sae x d_in
    // within 2^40 (4 TiB of weights).
    let (f_max, b_max) = (d_saes.iter().max().copied().unwrap_or(1), batches.iter().max().copied().unwrap_or(1));
    anyhow::ensure!(
        (b_max as u128) * (f_max as u128) < crate::backend::cuda::memory::MAX_PRE_ENTRIES as u128,
        "invalid --batch {b_max} with --d-sae {f_max}: batch x d_sae must stay below 2^32 entries"
    );
    anyhow::ensure!(
        (d_in as u128) * (f_max as u128) <= crate::backend::cuda::memory::MAX_WEIGHTS as u128,
        "invalid --d-in {d_in} with --d-sae {f_max}: d_in x d_sae must stay within 2^40 weights"
    );
    Ok(())
}

/// Refuse, before a benchmark runs for minutes, a `--json` file it may not write: an existing
/// file without `--overwrite` (it replaced any file before, a run's `config.json` included), and
/// any file in a directory that holds a run, whose files are the run's alone.
fn check_json_target(path: Option<&std::path::Path>, overwrite: bool) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    anyhow::ensure!(
        !crate::eval::out_dir::holds_run(&parent),
        "--json {}: {} holds a run, whose files are its own; write the benchmark elsewhere",
        path.display(),
        parent.display()
    );
    anyhow::ensure!(!path.is_dir(), "--json {}: is a directory; give a file name", path.display());
    anyhow::ensure!(
        overwrite || std::fs::symlink_metadata(path).is_err(),
        "--json {}: the file exists; add --overwrite to replace it",
        path.display()
    );
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args {
        BenchArgs::Memory(a) => {
            use crate::backend::cuda::memory::{largest_d_sae, memory_plan};
            check_sizes(a.d_in, &[a.d_sae], &[a.batch], &[a.k])?;
            anyhow::ensure!(a.gb > 0.0 && a.gb.is_finite(), "invalid --gb {}: must be a positive number of GB", a.gb);
            let plan = memory_plan(a.d_in, a.d_sae, a.batch, a.k, a.precision);
            println!("{plan}");
            println!("fits in {} GB: {}", a.gb, plan.fits(a.gb));
            for d_in in [a.d_in, 4096] {
                let f = largest_d_sae(a.gb, d_in, a.batch, a.k, a.precision);
                println!("largest d_sae in {} GB at d_in={d_in}, batch={}: {f}", a.gb, a.batch);
            }
        }
        BenchArgs::Step(a) => {
            check_json_target(a.json.as_deref(), a.overwrite)?;
            check_sizes(a.d_in, &[a.d_sae], &[a.batch], &[a.k])?;
            anyhow::ensure!(a.steps >= 1, "invalid --steps 0: must be >= 1");
            anyhow::ensure!(
                (0.0..1.0).contains(&a.dead_fraction),
                "invalid --dead-fraction {}: must be in [0, 1)",
                a.dead_fraction
            );
            super::train_cmd::init_threads(a.threads)?;
            let kinds = cases_of(&a.sparsifier);
            if let Some(target) = cuda_target(a.backend) {
                let r = bench::cuda::bench_step(target, &kinds, a.d_in, a.d_sae, a.batch, a.k, a.steps, a.precision)?;
                print_cuda_step(&r);
                if let Some(path) = a.json {
                    crate::util::atomic::write_json_atomic(&path, &r)?;
                }
                return Ok(());
            }
            let opts = bench::StepBenchOptions { dead_fraction: a.dead_fraction, dense_codes: a.dense_codes };
            let r = bench::bench_step_with(&kinds, a.d_in, a.d_sae, a.batch, a.k, a.steps, opts)?;
            println!("{}", cpu_header(&r));
            let rows: Vec<(&str, &bench::StepRow)> = r.rows.iter().map(|row| ("", row)).collect();
            print_step_table(&rows, 1);
            print_fraction_table(&rows);
            print_traffic_table(&r);
            if let Some(path) = a.json {
                crate::util::atomic::write_json_atomic(&path, &r)?;
            }
        }
        BenchArgs::Sparsifiers(a) => {
            check_json_target(a.json.as_deref(), a.overwrite)?;
            check_sizes(1, &a.d_sae, &a.batch, &a.k)?;
            anyhow::ensure!(a.reps >= 1, "invalid --reps 0: must be >= 1");
            super::train_cmd::init_threads(a.threads)?;
            let (batches, d_saes) = if a.full {
                (vec![1024, 4096, 16384], vec![4096, 16384, 65536])
            } else {
                (a.batch.clone(), a.d_sae.clone())
            };
            let backends = if a.backend.is_empty() { vec![BackendChoice::Auto] } else { a.backend.clone() };
            let mut rows = vec![];
            let mut cpu_done = false;
            for b in backends {
                // auto: the CPU, plus the GPU when one is usable.
                if matches!(b, BackendChoice::Cpu | BackendChoice::Auto) && !cpu_done {
                    rows.extend(bench::bench_sparsifiers(&batches, &d_saes, &a.k, a.reps));
                    cpu_done = true;
                }
                if let Some(t) = cuda_target(b) {
                    rows.extend(bench::cuda::bench_sparsifiers(t, &batches, &d_saes, &a.k, a.reps)?);
                }
            }
            println!(
                "{:<8} {:<12} {:>6} {:>7} {:>5} {:>9} {:>8} {:>8}",
                "backend", "sparsifier", "batch", "d_sae", "k", "ms", "GB/s", "of BW"
            );
            for r in &rows {
                println!(
                    "{:<8} {:<12} {:>6} {:>7} {:>5} {:>9.2} {:>8.2} {:>7.0}%",
                    r.backend,
                    r.sparsifier,
                    r.batch,
                    r.d_sae,
                    r.k,
                    r.ms,
                    r.gb_per_s,
                    100.0 * r.frac_bandwidth
                );
            }
            if let Some(path) = a.json {
                crate::util::atomic::write_json_atomic(&path, &rows)?;
            }
        }
    }
    Ok(())
}
