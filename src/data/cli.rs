//! `sae data inspect` and `sae data synth`.

use super::dataset::{median, Dataset};
use super::format::{write_npy, Dtype};
use super::manifest::{Manifest, ManifestShard, GROUND_TRUTH, MANIFEST};
use super::synthetic::{SynthSpec, Synthetic};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand, Debug, Clone)]
pub enum DataArgs {
    /// Validate a dataset and summarise it: shards, rows, d_in, dtype, bytes, norms, NaN/Inf,
    /// massive activations (rows over 10x the median norm). On a sample unless --full.
    Inspect {
        /// A shard file, a directory of shards, or a glob ("dir/acts_*.npy").
        path: PathBuf,
        /// Scan every row instead of a sample of 10,000.
        #[arg(long, default_value_t = false)]
        full: bool,
        /// Tensor name inside safetensors shards.
        #[arg(long)]
        tensor: Option<String>,
        /// Rows sampled when --full is not given.
        #[arg(long, default_value_t = 10_000)]
        sample: usize,
    },
    /// Write the synthetic superposition data as npy shards + manifest.json + ground_truth.npy.
    #[command(allow_negative_numbers = true)]
    Synth {
        /// Output directory (created). It must be empty, or hold a synthetic dataset written
        /// here before and --overwrite be given.
        #[arg(long)]
        out: PathBuf,
        /// Replace the synthetic dataset in --out (only one of ours: a manifest.json with model
        /// "synthetic", its shards and ground_truth.npy; anything else there is refused).
        #[arg(long)]
        overwrite: bool,
        /// Rows (tokens) in total.
        #[arg(long)]
        tokens: usize,
        #[arg(long, default_value_t = 128)]
        d_in: usize,
        /// Ground-truth features.
        #[arg(long, default_value_t = 512)]
        features: usize,
        /// Expected active features per token.
        #[arg(long, default_value_t = 6.0)]
        active: f64,
        /// Zipf exponent of feature frequencies.
        #[arg(long, default_value_t = 1.0)]
        zipf: f64,
        /// Gaussian noise std per coordinate.
        #[arg(long, default_value_t = 0.01)]
        noise: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// float32 (f32), float16 (f16) or bfloat16 (bf16).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Rows per shard.
        #[arg(long, default_value_t = 65_536)]
        shard_tokens: usize,
    },
}

pub fn run(args: DataArgs) -> Result<()> {
    match args {
        DataArgs::Inspect { path, full, tensor, sample } => {
            let r = inspect(&path, tensor.as_deref(), if full { None } else { Some(sample) })?;
            print!("{}", r.render());
            Ok(())
        }
        DataArgs::Synth { out, overwrite, tokens, d_in, features, active, zipf, noise, seed, dtype, shard_tokens } => {
            let spec = SynthSpec { d_in, n_features: features, mean_active: active, zipf, noise, seed };
            spec.check("--")?;
            let stop = crate::cli::stop::install_for_writing(
                "sae data synth stops after the shard under way and removes the shards it wrote",
            )?;
            let m = synth(&out, &spec, tokens, Dtype::parse(&dtype)?, shard_tokens, overwrite, &stop)?;
            println!(
                "wrote {} rows x d_in {} ({}) in {} shard(s), {} and {} to {}",
                tokens,
                d_in,
                m.dtype,
                m.shards.len(),
                MANIFEST,
                GROUND_TRUTH,
                out.display()
            );
            Ok(())
        }
    }
}

/// Summary of a dataset.
#[derive(Clone, Debug, serde::Serialize)]
pub struct InspectReport {
    pub path: String,
    /// (file, rows, bytes)
    pub shards: Vec<(String, usize, u64)>,
    pub rows: usize,
    pub d_in: usize,
    pub dtype: String,
    pub bytes: u64,
    pub manifest: Option<String>,
    /// Rows scanned (all with --full).
    pub scanned_rows: usize,
    pub full: bool,
    pub mean_norm: f64,
    pub median_norm: f64,
    pub max_norm: f64,
    pub nonfinite_values: u64,
    pub nonfinite_rows: u64,
    pub rows_over_10x_median: u64,
}

impl InspectReport {
    pub fn render(&self) -> String {
        let mut s = format!("dataset {}\n", self.path);
        if let Some(m) = &self.manifest {
            s += &format!("manifest {m} (checked)\n");
        }
        for (f, r, b) in &self.shards {
            s += &format!("  {f}: {r} rows, {b} bytes\n");
        }
        s += &format!(
            "shards {}, rows {}, d_in {}, dtype {}, bytes {} ({:.3} GB)\n",
            self.shards.len(),
            self.rows,
            self.d_in,
            self.dtype,
            self.bytes,
            self.bytes as f64 / 1e9
        );
        let how = if self.full { "all rows".to_string() } else { format!("sample of {} rows", self.scanned_rows) };
        // Norms are of the rows without NaN/Inf; where there are none, there are no norms.
        let finite = (self.scanned_rows as u64).saturating_sub(self.nonfinite_rows);
        if finite == 0 && self.scanned_rows > 0 {
            s += &format!("norms ({how}): none, every row scanned holds NaN/Inf\n");
        } else {
            s += &format!(
                "norms ({how}, the {finite} rows without NaN/Inf): mean {:.4}, median {:.4}, max {:.4}\n",
                self.mean_norm, self.median_norm, self.max_norm
            );
        }
        s += &format!(
            "non-finite: {} values in {} rows\nrows over 10x median norm: {}\n",
            self.nonfinite_values, self.nonfinite_rows, self.rows_over_10x_median
        );
        s
    }
}

/// Validate and summarise; `sample`: rows to scan, evenly spread (None: every row).
pub fn inspect(path: &Path, tensor: Option<&str>, sample: Option<usize>) -> Result<InspectReport> {
    let ds = Dataset::open(path, tensor)?;
    let total = ds.total_rows();
    let picks: Vec<(usize, usize)> = match sample {
        Some(n) => {
            let n = n.clamp(1, total);
            (0..n).map(|i| ds.locate((i as u128 * total as u128 / n as u128) as usize)).collect()
        }
        None => ds.shards.iter().enumerate().flat_map(|(s, sh)| (0..sh.rows).map(move |r| (s, r))).collect(),
    };
    // (norm or NaN, non-finite values) per row.
    // Groups of rows, releasing the mapped pages after each so RSS stays small on large data.
    let mut per: Vec<(f64, u64)> = Vec::with_capacity(picks.len());
    // Sampled rows are far apart and each maps a neighbourhood: release after few of them.
    let group = if sample.is_some() { 64 } else { 16_384 };
    for group in picks.chunks(group) {
        per.extend(scan_rows(&ds, group));
        for sh in &ds.shards {
            sh.dont_need_all();
        }
    }
    ds.check_intact()?;
    let norms: Vec<f64> = per.iter().map(|p| p.0).filter(|x| !x.is_nan()).collect();
    let med = median(&norms);
    Ok(InspectReport {
        path: path.display().to_string(),
        shards: ds.shards.iter().map(|s| (s.path.display().to_string(), s.rows, s.data_bytes())).collect(),
        rows: total,
        d_in: ds.d_in,
        dtype: ds.dtype.to_string(),
        bytes: ds.total_bytes(),
        manifest: ds.manifest.as_ref().map(|m| m.0.display().to_string()),
        scanned_rows: picks.len(),
        full: sample.is_none(),
        mean_norm: norms.iter().sum::<f64>() / norms.len().max(1) as f64,
        median_norm: med,
        max_norm: norms.iter().copied().fold(0.0, f64::max),
        nonfinite_values: per.iter().map(|p| p.1).sum(),
        nonfinite_rows: per.iter().filter(|p| p.1 > 0).count() as u64,
        rows_over_10x_median: norms.iter().filter(|&&x| x > 10.0 * med).count() as u64,
    })
}

/// Write the synthetic data set to `out`: `acts_NNNNN.npy` shards (shard i = batch i of the
/// synthetic training stream with `shard_tokens` rows), `ground_truth.npy` (features x d_in, f32)
/// and `manifest.json`. `out` must be empty or, with `overwrite`, hold only a synthetic dataset
/// written here before ([`previous_synthetic`]); every file is written atomically and the
/// manifest last, so an interrupted write never leaves a dataset that claims rows it lacks.
/// `stop` is asked before each file (Ctrl-C: `cli::stop`; `&|| Ok(())` for none): on its error the
/// files written so far are removed and the error returned, naming how far it got.
pub fn synth(
    out: &Path,
    spec: &SynthSpec,
    tokens: usize,
    dtype: Dtype,
    shard_tokens: usize,
    overwrite: bool,
    stop: &dyn Fn() -> Result<()>,
) -> Result<Manifest> {
    if tokens == 0 || shard_tokens == 0 {
        bail!("--tokens and --shard-tokens must be >= 1");
    }
    let gen = Synthetic::new(spec.clone(), shard_tokens)?;
    if out.exists() && !out.is_dir() {
        bail!("--out {}: exists and is not a directory", out.display());
    }
    crate::util::paths::refuse_dangling(out, "--out")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let _lock = crate::train::rundir::lock(out)?;
    let mut names = vec![MANIFEST.to_string(), GROUND_TRUTH.to_string()];
    names.extend((0..tokens.div_ceil(shard_tokens)).map(shard_name));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for line in crate::util::sweep::describe(&crate::util::sweep::sweep_stale_temporaries(out, &names)?) {
        eprintln!("{line}");
    }
    // The manifest first: a directory half replaced is no dataset at all, never a stale one.
    for f in previous_synthetic(out, overwrite)? {
        std::fs::remove_file(&f).with_context(|| format!("cannot remove {}", f.display()))?;
    }
    let mut created = Created::default();
    let mut shards = vec![];
    let mut left = tokens;
    let mut i = 0u64;
    let stopped = |done: u64| {
        format!(
            "--out {}: stopped after {done} of {} shards, which are removed again: the same \
             command starts over",
            out.display(),
            tokens.div_ceil(shard_tokens)
        )
    };
    while left > 0 {
        stop().with_context(|| stopped(i))?;
        let rows = left.min(shard_tokens);
        let b = gen.generate(0, i, rows);
        let name = shard_name(i as usize);
        let x = b.to_f32();
        // f16 tops out at 65504: larger values (a large --noise) would be written as infinities.
        if dtype == Dtype::Float16 {
            if let Some(v) = x.iter().find(|v| v.abs() > f32::from(half::f16::MAX)) {
                bail!(
                    "--dtype f16 cannot hold these values: shard {i} has {v:.4e}, beyond f16's largest ({}) \
                     (written, it would be an infinity); lower --noise or use --dtype f32",
                    half::f16::MAX
                );
            }
        }
        write_npy(&out.join(&name), dtype, rows, spec.d_in, &x)?;
        created.0.push(out.join(&name));
        shards.push(ManifestShard { file: name, rows, tokens_file: None });
        left -= rows;
        i += 1;
    }
    stop().with_context(|| stopped(i))?;
    use super::BatchSource;
    let gt = gen.ground_truth().expect("synthetic data has ground truth");
    write_npy(&out.join(GROUND_TRUTH), Dtype::Float32, spec.n_features, spec.d_in, gt)?;
    created.0.push(out.join(GROUND_TRUTH));
    let m = Manifest {
        format: "saetrain-activations".into(),
        version: 1,
        model: Some("synthetic".into()),
        layer: None,
        hook: None,
        d_in: spec.d_in,
        dtype,
        shards,
        total_rows: Some(tokens),
        normalization: Some("none: synthetic superposition data as generated".into()),
        extra: Some(serde_json::json!({ "synthetic": spec, "ground_truth": GROUND_TRUTH })),
    };
    m.save(&out.join(MANIFEST))?;
    created.0.clear(); // a whole dataset now: keep it
    Ok(m)
}

/// The files a [`synth`] has written so far, removed if it fails before its manifest (a full
/// disk at shard 40): the directory is left as empty as it was found, so that a retry, with or
/// without --overwrite, finds nothing it must refuse.
#[derive(Default)]
struct Created(Vec<PathBuf>);

impl Drop for Created {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn shard_name(i: usize) -> String {
    format!("acts_{i:05}.npy")
}

/// The files of the synthetic dataset in `out` that `--overwrite` replaces, manifest first
/// (none when `out` is empty). Refuses a non-empty `out` without `overwrite`, and with it any
/// file that is not part of a synthetic dataset of ours: a harvested dataset uses the same shard
/// names (`acts_NNNNN.npy`), and a user's activations are never replaced.
pub fn previous_synthetic(out: &Path, overwrite: bool) -> Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .with_context(|| format!("cannot list {}", out.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", out.display()))?;
    names.retain(|n| n != crate::train::rundir::LOCK_FILE && !crate::util::atomic::is_our_temporary(n));
    names.sort();
    if names.is_empty() {
        return Ok(vec![]);
    }
    let listing = match names.len() {
        n if n > 4 => format!("{}, ... ({n} entries)", names[..4].join(", ")),
        _ => names.join(", "),
    };
    if !overwrite {
        bail!(
            "--out {} is not empty ({listing}): pass --overwrite to replace a synthetic dataset written there \
             before (nothing else is ever replaced), or choose another --out",
            out.display()
        );
    }
    let manifest = out.join(MANIFEST);
    let ours = match Manifest::load(&manifest) {
        Ok(m) if m.model.as_deref() == Some("synthetic") => m,
        _ => bail!(
            "--out {} holds {listing} but no synthetic dataset of ours ({MANIFEST} with model \"synthetic\"): \
             --overwrite replaces only that; choose another --out",
            out.display()
        ),
    };
    let mut files: Vec<String> = vec![MANIFEST.into(), GROUND_TRUTH.into()];
    files.extend(ours.shards.iter().map(|s| s.file.clone()));
    let foreign: Vec<&String> = names.iter().filter(|n| !files.contains(n)).collect();
    if !foreign.is_empty() {
        bail!(
            "--out {}: {} {} not part of the synthetic dataset there ({MANIFEST} does not list {}); --overwrite \
             replaces only that dataset: move {} or choose another --out",
            out.display(),
            foreign.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
            if foreign.len() == 1 { "is" } else { "are" },
            if foreign.len() == 1 { "it" } else { "them" },
            if foreign.len() == 1 { "it" } else { "them" },
        );
    }
    Ok(files.iter().filter(|f| names.contains(f)).map(|f| out.join(f)).collect())
}

/// (norm, or NaN when non-finite; non-finite values) of each (shard, row).
fn scan_rows(ds: &Dataset, rows: &[(usize, usize)]) -> Vec<(f64, u64)> {
    rows.par_chunks(1024)
        .flat_map_iter(|c| {
            let mut row = vec![0f32; ds.d_in];
            c.iter()
                .map(|&(s, r)| {
                    let sh = &ds.shards[s];
                    super::format::convert_to_f32(sh.dtype, sh.bytes(r, 1), &mut row);
                    let bad = row.iter().filter(|v| !v.is_finite()).count() as u64;
                    let sq: f64 = row.iter().map(|&v| v as f64 * v as f64).sum();
                    (if bad > 0 { f64::NAN } else { sq.sqrt() }, bad)
                })
                .collect::<Vec<_>>()
        })
        .collect()
}
