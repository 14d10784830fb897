//! The shard reader's options ([`ShardOptions`]) and where every training row goes, fixed by the
//! data and the seed: the held-out split, the training chunks, the norm filter and scale (`Core`),
//! and the reproducible order of rows.
//!
//! Layout (fixed by the data alone, independent of the seed):
//! - the held-out split is `eval_tokens` rows in blocks of [`EVAL_BLOCK`] rows spread evenly over
//!   the concatenated shards; those rows are never part of a training chunk;
//! - the remaining rows of each shard are cut into chunks of `chunk_rows` contiguous rows.
//!
//! Order of training rows in epoch `e`: shards in a permutation drawn from (seed, e), each shard's
//! chunks in a permutation drawn from (seed, e, shard). That row sequence is cut into windows of
//! `shuffle_buffer` rows, and each window is emitted in a uniform permutation drawn from
//! (seed, e, window): the token-level shuffle buffer. The windows hold row *references*
//! (`Window`); the stream (`stream.rs`) gathers the rows from the map.

use super::dataset::{median, sample_norms, Dataset};
use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Rows per held-out block.
pub const EVAL_BLOCK: usize = 256;

/// Options of the shard reader (the data fields of the training config, plus reader knobs).
#[derive(Clone, Debug)]
pub struct ShardOptions {
    pub tensor: Option<String>,
    pub batch_size: usize,
    pub seed: u64,
    /// Token-level shuffle window (rows); 0 or 1 keeps the chunk order.
    pub shuffle_buffer: usize,
    /// Held-out rows.
    pub eval_tokens: usize,
    /// Scale rows so that E||s x||^2 = d_in (`--normalize global`; per-token normalisation is
    /// applied on top of the reader, data/normalize.rs).
    pub normalize: bool,
    /// Exclude rows with norm > this x median norm (0 disables).
    pub max_norm_multiple: f64,
    /// Ready batches kept by the reader thread (0: read on the caller's thread).
    pub prefetch: usize,
    /// Return half-precision shards as F16/Bf16 batches instead of converting to f32.
    pub keep_half: bool,
    /// Expected input width (error if the data differs).
    pub d_in: Option<usize>,
    /// Rows per contiguous chunk (unit of the chunk-order shuffle).
    pub chunk_rows: usize,
    /// Rows sampled for the median norm and the scale.
    pub sample_rows: usize,
    /// The data is an evaluation set (`sae eval --data`): it has no training split, so up to
    /// `eval_tokens` of all its rows are held out, not at most half, and no batch is drawn.
    pub evaluation_set: bool,
    /// Hold out whole token windows where the manifest gives `rows_per_window` (the config's
    /// `held_out_windows`; false: blocks of [`EVAL_BLOCK`] rows).
    pub held_out_windows: bool,
}

impl Default for ShardOptions {
    fn default() -> Self {
        Self {
            tensor: None,
            batch_size: 1024,
            seed: 0,
            shuffle_buffer: 65_536,
            eval_tokens: 8192,
            normalize: false,
            max_norm_multiple: 10.0,
            prefetch: 4,
            keep_half: false,
            d_in: None,
            chunk_rows: 1024,
            sample_rows: 10_000,
            evaluation_set: false,
            held_out_windows: false,
        }
    }
}

impl ShardOptions {
    pub fn from_config(cfg: &crate::config::TrainConfig, keep_half: bool) -> Self {
        Self {
            tensor: cfg.tensor.clone(),
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            shuffle_buffer: cfg.shuffle_buffer,
            eval_tokens: cfg.eval_tokens,
            normalize: cfg.normalize == crate::config::Normalize::Global,
            max_norm_multiple: cfg.max_norm_multiple,
            prefetch: cfg.prefetch,
            keep_half,
            d_in: cfg.d_in,
            held_out_windows: cfg.held_out_windows == Some(true),
            ..Self::default()
        }
    }
}

/// Contiguous rows `[start, start+len)` of one shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub shard: usize,
    pub start: usize,
    pub len: usize,
}

/// Everything fixed after opening: shards, split, filter and scale. Shared with the reader thread.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) ds: Dataset,
    pub(super) opts: ShardOptions,
    /// Training chunks of each shard, in file order.
    chunks: Vec<Vec<Seg>>,
    /// Held-out segments, in file order.
    pub(super) eval: Vec<Seg>,
    pub(super) train_rows: usize,
    pub(super) eval_rows: usize,
    pub(super) scale: f32,
    pub(super) median_norm: f64,
    /// A digest of the sampled rows (their norms' bits, in order, and the count of non-finite
    /// ones), recorded in the stream position, so that a resume on other contents at the same
    /// spec (a directory harvested again, another array of the same shape) is refused instead
    /// of training on. Rows outside the sample may change unnoticed.
    pub(super) sample_digest: u64,
    /// Squared norm above which a row is excluded (infinite when disabled).
    pub(super) max_sq: f64,
    pub(super) window: usize,
    pub(super) ground_truth: Option<Vec<f32>>,
}

/// Rows per token window, from the manifest's `extra.rows_per_window` (what the harvester
/// writes), where every shard holds whole windows; None otherwise.
fn rows_per_window(ds: &Dataset) -> Option<usize> {
    let (_, m) = ds.manifest.as_ref()?;
    let per = m.extra.as_ref()?.get("rows_per_window")?.as_u64()? as usize;
    (per > 1 && ds.shards.iter().all(|s| s.rows % per == 0)).then_some(per)
}

fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

const TAG_SHARDS: u64 = 0x5348_4152_4453;
const TAG_WINDOW: u64 = 0x5749_4E44_4F57;
const TAG_SAMPLE: u64 = 0x5341_4D50_4C45;

impl Core {
    pub(super) fn new(ds: Dataset, opts: ShardOptions) -> Result<Self> {
        if opts.batch_size == 0 {
            bail!("invalid --batch-size 0");
        }
        if let Some(d) = opts.d_in {
            if d != ds.d_in {
                bail!(
                    "--d-in {d} does not match the data: {} has d_in {} ({})",
                    ds.spec.display(),
                    ds.d_in,
                    ds.shards[0].path.display()
                );
            }
        }
        if !(opts.max_norm_multiple >= 0.0 && opts.max_norm_multiple.is_finite()) {
            bail!("invalid --max-norm-multiple {}: must be >= 0 (0 disables)", opts.max_norm_multiple);
        }
        let n = ds.total_rows();
        // An evaluation set gives all its rows when asked for more; a training set keeps at
        // least half of them, and one batch, for training.
        let e = if opts.evaluation_set { opts.eval_tokens.min(n) } else { opts.eval_tokens };
        if n < opts.batch_size && !opts.evaluation_set {
            bail!("{}: only {n} rows, fewer than one batch of --batch-size {}", ds.spec.display(), opts.batch_size);
        }
        if !opts.evaluation_set && (e > n / 2 || n - e < opts.batch_size) {
            bail!(
                "--eval-tokens {e} is too large for {} ({n} rows): the held-out split may take at most half \
                 the rows and must leave at least one batch ({} rows) for training",
                ds.spec.display(),
                opts.batch_size
            );
        }
        // Held-out blocks, spread evenly over the global row space: of EVAL_BLOCK rows, or of
        // whole token windows (at least EVAL_BLOCK rows), counted in windows, so that every
        // block starts and ends on a window boundary.
        let unit = match opts.held_out_windows {
            true => rows_per_window(&ds).unwrap_or(1),
            false => 1,
        };
        let e = match unit {
            1 => e,
            _ => e.div_ceil(unit) * unit,
        };
        if !opts.evaluation_set && unit > 1 && (e > n / 2 || n - e < opts.batch_size) {
            bail!(
                "--eval-tokens {} is too large for {} ({n} rows): held out in whole windows of {unit} rows it is {e} \
                 rows, and the held-out split may take at most half the rows and must leave at least one batch",
                opts.eval_tokens,
                ds.spec.display()
            );
        }
        let e = e.min(n);
        let t = n - e;
        let block = EVAL_BLOCK.div_ceil(unit) * unit;
        let nb = e.div_ceil(block);
        let mut eval_global = vec![];
        for i in 0..nb {
            let len = if i + 1 == nb { e - i * block } else { block };
            let start = (i as u128 * (t / unit) as u128 / nb as u128) as usize * unit + i * block;
            eval_global.push((start, start + len));
        }
        // Per-shard segments.
        let mut chunks = vec![vec![]; ds.shards.len()];
        let mut eval = vec![];
        let chunk_rows = opts.chunk_rows.max(1);
        let mut base = 0;
        let mut k = 0;
        for (si, sh) in ds.shards.iter().enumerate() {
            let (lo, hi) = (base, base + sh.rows);
            let mut cur = lo;
            let push_train = |a: usize, b: usize, chunks: &mut Vec<Vec<Seg>>| {
                let mut s = a;
                while s < b {
                    let l = chunk_rows.min(b - s);
                    chunks[si].push(Seg { shard: si, start: s - lo, len: l });
                    s += l;
                }
            };
            while cur < hi {
                while k < eval_global.len() && eval_global[k].1 <= cur {
                    k += 1;
                }
                match eval_global.get(k) {
                    Some(&(a, b)) if a < hi => {
                        if a > cur {
                            push_train(cur, a, &mut chunks);
                        }
                        let ea = a.max(cur);
                        let eb = b.min(hi);
                        eval.push(Seg { shard: si, start: ea - lo, len: eb - ea });
                        cur = eb;
                    }
                    _ => {
                        push_train(cur, hi, &mut chunks);
                        cur = hi;
                    }
                }
            }
            base = hi;
        }
        let train_rows: usize = chunks.iter().flatten().map(|c| c.len).sum();
        debug_assert_eq!(train_rows, t);

        let (norms, bad) = sample_norms(&ds, opts.sample_rows);
        // A shard truncated (or rewritten) since it was mapped gave zeros, or other rows, to the
        // sample: the scale, the norm cut and the digest would be of data that is not there.
        ds.check_intact().context("while sampling rows at open")?;
        let sample_digest = norms.iter().fold(bad as u64, |h, n| mix(h, n.to_bits(), TAG_SAMPLE));
        // Rows of zeros (padding written by a harvest, say) carry nothing to reconstruct. When
        // half or more of the sample is zeros, their median norm is 0, and the norm cut would
        // drop every row that is not: the cut then takes the median of the nonzero rows.
        let nonzero: Vec<f64> = norms.iter().copied().filter(|&x| x > 0.0).collect();
        ensure!(
            norms.is_empty() || !nonzero.is_empty(),
            "{}: every one of the {} rows sampled at open is all zeros: there is nothing to train on or evaluate",
            ds.spec.display(),
            norms.len()
        );
        let med = match median(&norms) {
            m if m > 0.0 || nonzero.is_empty() => m,
            _ => {
                eprintln!(
                    "warning: {}: {} of the {} rows sampled at open are all zeros; the norm cut and scale use the \
                     median norm of the others",
                    ds.spec.display(),
                    norms.len() - nonzero.len(),
                    norms.len()
                );
                median(&nonzero)
            }
        };
        let max_norm = if opts.max_norm_multiple > 0.0 { opts.max_norm_multiple * med } else { f64::INFINITY };
        let max_sq = max_norm * max_norm;
        let kept: Vec<f64> = norms.iter().copied().filter(|&x| x <= max_norm).collect();
        let scale = if opts.normalize {
            let ms = kept.iter().map(|x| x * x).sum::<f64>() / kept.len().max(1) as f64;
            if !(ms > 0.0 && ms.is_finite()) {
                bail!("{}: cannot normalise: the sampled rows have zero mean squared norm", ds.spec.display());
            }
            (ds.d_in as f64 / ms).sqrt() as f32
        } else {
            1.0
        };
        let ground_truth = ds.ground_truth()?;
        let window = opts.shuffle_buffer.max(1);
        Ok(Self {
            ds,
            opts,
            chunks,
            eval,
            train_rows,
            eval_rows: e,
            scale,
            median_norm: med,
            sample_digest,
            max_sq,
            window,
            ground_truth,
        })
    }

    /// Training chunks in the order of epoch `epoch`.
    pub(super) fn epoch_order(&self, epoch: u64) -> Vec<Seg> {
        let seed = self.opts.seed;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch, TAG_SHARDS));
        let mut shards: Vec<usize> = (0..self.chunks.len()).collect();
        shuffle(&mut shards, &mut rng);
        let mut out = Vec::with_capacity(self.chunks.iter().map(|c| c.len()).sum());
        for s in shards {
            let mut c = self.chunks[s].clone();
            let mut r = ChaCha8Rng::seed_from_u64(mix(seed, epoch, TAG_SHARDS ^ (s as u64 + 1) << 8));
            shuffle(&mut c, &mut r);
            out.extend(c);
        }
        out
    }

    /// Window `window` of epoch `epoch`: its row references in emission order, and its segments.
    /// `order` is `Core::epoch_order` of that epoch, `order_start` the start row of each of its
    /// chunks.
    pub(super) fn window_rows(&self, epoch: u64, window: u64, order: &[Seg], order_start: &[usize]) -> Window {
        let c = self;
        let a = window as usize * c.window;
        let b = (a + c.window).min(c.train_rows);
        let mut refs = Vec::with_capacity(b - a);
        let mut segs = vec![];
        let mut i = order_start.partition_point(|&s| s <= a) - 1;
        let mut g = a;
        while g < b {
            let s = order[i];
            let off = g - order_start[i];
            let l = (s.len - off).min(b - g);
            segs.push(Seg { shard: s.shard, start: s.start + off, len: l });
            refs.extend((0..l).map(|k| (s.shard as u32, s.start + off + k)));
            g += l;
            i += 1;
        }
        if c.window > 1 {
            let mut rng = ChaCha8Rng::seed_from_u64(mix(c.opts.seed, epoch, TAG_WINDOW ^ window << 16));
            shuffle(&mut refs, &mut rng);
        }
        (refs, segs)
    }

    pub(super) fn windows_per_epoch(&self) -> u64 {
        self.train_rows.div_ceil(self.window) as u64
    }
}

/// A loaded window: row references (shard, row) in emission order, and its segments.
pub(super) type Window = (Vec<(u32, usize)>, Vec<Seg>);

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard truncated between its mapping and the open's sample: an error naming the file, not
    /// a scale and digest computed from the zeros the lost pages read as.
    #[test]
    fn a_shard_truncated_under_the_opens_sample_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acts.npy");
        let (rows, d) = (20_000usize, 64usize);
        let data: Vec<f32> = (0..rows * d).map(|i| 1.0 + (i % 7) as f32).collect();
        crate::data::format::write_npy(&path, crate::data::format::Dtype::Float32, rows, d, &data).unwrap();
        let ds = Dataset::open(&path, None).unwrap();
        if let Err(e) = Core::new(ds, ShardOptions::default()) {
            panic!("{e:#}");
        }
        let ds = Dataset::open(&path, None).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(4096).unwrap();
        let Err(e) = Core::new(ds, ShardOptions::default()) else { panic!("a truncated shard must be refused") };
        let e = format!("{e:#}");
        assert!(e.contains("acts.npy") && e.contains("truncated") && e.contains("sampling rows at open"), "{e}");
    }
}
