//! The activation-shard reader: a [`BatchSource`] over memory-mapped `.npy`/`.safetensors` shards.
//!
//! Layout (fixed by the data alone, independent of the seed):
//! - the held-out split is `eval_tokens` rows in blocks of [`EVAL_BLOCK`] rows spread evenly over
//!   the concatenated shards; those rows are never part of a training chunk;
//! - the remaining rows of each shard are cut into chunks of `chunk_rows` contiguous rows.
//!
//! Order of training rows in epoch `e`: shards in a permutation drawn from (seed, e), each shard's
//! chunks in a permutation drawn from (seed, e, shard). That row sequence is cut into windows of
//! `shuffle_buffer` rows, and each window is emitted in a uniform permutation drawn from
//! (seed, e, window): the token-level shuffle buffer. The windows hold row *references*; rows are
//! gathered straight from the map when a batch is built, so memory stays at one window of pages.
//!
//! The stream position is (epoch, window, offset in window) plus the counters, so `seek` rebuilds
//! one window and continues exactly where an uninterrupted run would be.

use super::format::{convert_to_f32, Dtype, Shard};
use super::manifest::{Manifest, GROUND_TRUTH, MANIFEST};
use super::{Batch, BatchData, BatchSource, SourceStats};
use anyhow::{anyhow, bail, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Rows per held-out block.
pub const EVAL_BLOCK: usize = 256;

/// A validated set of shards sharing `d_in` and `dtype`.
#[derive(Debug)]
pub struct Dataset {
    /// What the user gave (file, directory or glob).
    pub spec: PathBuf,
    pub shards: Vec<Shard>,
    pub d_in: usize,
    pub dtype: Dtype,
    /// The manifest checked against the shards, when one was found.
    pub manifest: Option<(PathBuf, Manifest)>,
    /// Directory holding the shards (and the manifest / ground truth when present).
    pub root: PathBuf,
}

fn has_wildcard(s: &str) -> bool {
    s.contains('*') || s.contains('?') || s.contains('[')
}

/// Match a file name against a glob pattern with `*`, `?` and `[...]` classes.
pub fn glob_match(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    fn rec(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| rec(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && rec(&p[1..], &n[1..]),
            Some('[') => {
                let Some(end) = p.iter().position(|&c| c == ']') else {
                    return !n.is_empty() && n[0] == '[' && rec(&p[1..], &n[1..]);
                };
                if n.is_empty() {
                    return false;
                }
                let (neg, set) = match p.get(1) {
                    Some('!') | Some('^') => (true, &p[2..end]),
                    _ => (false, &p[1..end]),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= n[0] && n[0] <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == n[0];
                        i += 1;
                    }
                }
                hit != neg && rec(&p[end + 1..], &n[1..])
            }
            Some(c) => !n.is_empty() && n[0] == *c && rec(&p[1..], &n[1..]),
        }
    }
    rec(&p, &n)
}

fn is_shard_name(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    (l.ends_with(".npy") || l.ends_with(".safetensors")) && l != GROUND_TRUTH
}

/// Resolve a file / directory / glob to shard paths (sorted) and the manifest to check, if any.
pub fn resolve(spec: &Path) -> Result<(Vec<PathBuf>, Option<PathBuf>, PathBuf)> {
    let s = spec.to_string_lossy();
    if s.is_empty() {
        bail!("empty data path");
    }
    if has_wildcard(&s) {
        let parent = spec.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let pat = spec.file_name().and_then(|n| n.to_str()).ok_or_else(|| anyhow!("{s}: invalid glob"))?;
        if has_wildcard(&parent.to_string_lossy()) {
            bail!("{s}: wildcards are only supported in the file name, not in directories");
        }
        let rd = std::fs::read_dir(parent)
            .with_context(|| format!("{s}: cannot list directory {} of the glob", parent.display()))?;
        let mut files = vec![];
        for e in rd {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if glob_match(pat, &name) && e.path().is_file() && name != MANIFEST {
                files.push(e.path());
            }
        }
        files.sort();
        if files.is_empty() {
            bail!("{s}: no file matches the glob");
        }
        let m = parent.join(MANIFEST);
        return Ok((files, m.is_file().then_some(m), parent.to_path_buf()));
    }
    if !spec.exists() {
        bail!("{s}: data path does not exist");
    }
    if spec.is_dir() {
        let m = spec.join(MANIFEST);
        if m.is_file() {
            let man = Manifest::load(&m)?;
            if man.shards.is_empty() {
                bail!("{}: field shards is empty", m.display());
            }
            let files: Vec<PathBuf> = man.shards.iter().map(|x| spec.join(&x.file)).collect();
            for f in &files {
                if !f.is_file() {
                    bail!("{}: listed in {} (field shards) but missing", f.display(), m.display());
                }
            }
            return Ok((files, Some(m), spec.to_path_buf()));
        }
        let mut files = vec![];
        for e in std::fs::read_dir(spec).with_context(|| format!("{s}: cannot list directory"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if is_shard_name(&name) && e.path().is_file() {
                files.push(e.path());
            }
        }
        files.sort();
        if files.is_empty() {
            bail!("{s}: directory holds no .npy or .safetensors file");
        }
        return Ok((files, None, spec.to_path_buf()));
    }
    let root = spec.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    if spec.file_name().is_some_and(|n| n == MANIFEST) {
        return resolve(&root);
    }
    let m = root.join(MANIFEST);
    Ok((vec![spec.to_path_buf()], m.is_file().then_some(m), root))
}

impl Dataset {
    /// Open and validate every shard: format, header, dtype, shape, size; shared d_in and dtype;
    /// the manifest when present.
    pub fn open(spec: &Path, tensor: Option<&str>) -> Result<Self> {
        let (files, manifest_path, root) = resolve(spec)?;
        let manifest = match &manifest_path {
            Some(p) => Some((p.clone(), Manifest::load(p)?)),
            None => None,
        };
        let mut shards: Vec<Shard> = Vec::with_capacity(files.len());
        for f in &files {
            let sh = Shard::open(f, tensor)?;
            if let Some(first) = shards.first() {
                if sh.d_in != first.d_in {
                    bail!(
                        "{}: d_in {} differs from {} in {} (all shards must share d_in)",
                        f.display(),
                        sh.d_in,
                        first.d_in,
                        first.path.display()
                    );
                }
                if sh.dtype != first.dtype {
                    bail!(
                        "{}: dtype {} differs from {} in {} (all shards must share the dtype)",
                        f.display(),
                        sh.dtype,
                        first.dtype,
                        first.path.display()
                    );
                }
            }
            if let Some((mp, m)) = &manifest {
                m.check(mp, &sh)?;
            }
            shards.push(sh);
        }
        let d_in = shards[0].d_in;
        let dtype = shards[0].dtype;
        Ok(Self { spec: spec.to_path_buf(), shards, d_in, dtype, manifest, root })
    }

    pub fn total_rows(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.data_bytes()).sum()
    }

    /// (shard, row) of global row `g`.
    pub fn locate(&self, mut g: usize) -> (usize, usize) {
        for (i, s) in self.shards.iter().enumerate() {
            if g < s.rows {
                return (i, g);
            }
            g -= s.rows;
        }
        panic!("row out of range");
    }

    /// `ground_truth.npy` beside the shards, checked against d_in.
    pub fn ground_truth(&self) -> Result<Option<Vec<f32>>> {
        let p = self.root.join(GROUND_TRUTH);
        if !p.is_file() {
            return Ok(None);
        }
        let (_, d, v) = super::format::read_f32(&p)?;
        if d != self.d_in {
            bail!("{}: d_in {d} differs from the data's d_in {}", p.display(), self.d_in);
        }
        Ok(Some(v))
    }
}

/// Row norms of an evenly spaced sample of up to `n` rows (non-finite rows are left out;
/// second value: how many were).
pub fn sample_norms(ds: &Dataset, n: usize) -> (Vec<f64>, usize) {
    let total = ds.total_rows();
    let n = n.min(total).max(1);
    let mut norms = Vec::with_capacity(n);
    let mut bad = 0;
    let mut row = Vec::with_capacity(ds.d_in);
    for i in 0..n {
        let g = (i as u128 * total as u128 / n as u128) as usize;
        let (s, r) = ds.locate(g);
        row.clear();
        ds.shards[s].push_row_f32(r, &mut row);
        let sq = sum_sq(&row);
        if sq.is_finite() {
            norms.push(sq.sqrt());
        } else {
            bad += 1;
        }
        // A read maps the row's neighbourhood too (up to megabytes with large folios): release
        // it at once so the sample does not pull the whole data set into the resident set.
        ds.shards[s].dont_need(r, 1);
    }
    for s in &ds.shards {
        s.dont_need_all();
    }
    (norms, bad)
}

/// Sum of squares in f64 (vectorisable); NaN/Inf when the row holds a non-finite value.
pub fn sum_sq(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            acc[k] += c[k] as f64 * c[k] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in it.remainder() {
        s += v as f64 * v as f64;
    }
    s
}

pub use crate::util::stats::median;

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
    /// Scale rows so that E||s x||^2 = d_in.
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
            normalize: cfg.normalize,
            max_norm_multiple: cfg.max_norm_multiple,
            prefetch: cfg.prefetch,
            keep_half,
            d_in: cfg.d_in,
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
struct Core {
    ds: Dataset,
    opts: ShardOptions,
    /// Training chunks of each shard, in file order.
    chunks: Vec<Vec<Seg>>,
    /// Held-out segments, in file order.
    eval: Vec<Seg>,
    train_rows: usize,
    eval_rows: usize,
    scale: f32,
    median_norm: f64,
    /// Squared norm above which a row is excluded (infinite when disabled).
    max_sq: f64,
    window: usize,
    ground_truth: Option<Vec<f32>>,
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

impl Core {
    fn new(ds: Dataset, opts: ShardOptions) -> Result<Self> {
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
        let e = opts.eval_tokens;
        if n < opts.batch_size {
            bail!("{}: only {n} rows, fewer than one batch of --batch-size {}", ds.spec.display(), opts.batch_size);
        }
        if e > n / 2 || n - e < opts.batch_size {
            bail!(
                "--eval-tokens {e} is too large for {} ({n} rows): the held-out split may take at most half \
                 the rows and must leave at least one batch ({} rows) for training",
                ds.spec.display(),
                opts.batch_size
            );
        }
        // Held-out blocks, spread evenly over the global row space.
        let t = n - e;
        let nb = e.div_ceil(EVAL_BLOCK);
        let mut eval_global = vec![];
        for i in 0..nb {
            let len = if i + 1 == nb { e - i * EVAL_BLOCK } else { EVAL_BLOCK };
            let start = (i as u128 * t as u128 / nb as u128) as usize + i * EVAL_BLOCK;
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

        let (norms, _) = sample_norms(&ds, opts.sample_rows);
        let med = median(&norms);
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
            max_sq,
            window,
            ground_truth,
        })
    }

    /// Training chunks in the order of epoch `epoch`.
    fn epoch_order(&self, epoch: u64) -> Vec<Seg> {
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

    fn windows_per_epoch(&self) -> u64 {
        self.train_rows.div_ceil(self.window) as u64
    }
}

/// Where the stream stands, plus the counters; serialised as the checkpoint position.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StreamPos {
    pub epoch: u64,
    pub window: u64,
    /// Rows of the window already consumed.
    pub offset: usize,
    pub skipped_nonfinite_batches: u64,
    pub excluded_large_norm_rows: u64,
    pub nonfinite_values: u64,
    /// Checked on seek: the data and seed the position belongs to.
    pub train_rows: usize,
    pub seed: u64,
}

/// A loaded window: row references (shard, row) in emission order, and its segments.
type Window = (Vec<(u32, usize)>, Vec<Seg>);

/// The row stream (runs on the reader thread).
struct Stream {
    core: Arc<Core>,
    pos: StreamPos,
    order_epoch: Option<u64>,
    order: Vec<Seg>,
    /// Start row (within the epoch order) of each chunk.
    order_start: Vec<usize>,
    /// Loaded window: row references (shard, row) in emission order, and its segments.
    win: Option<Window>,
    row: Vec<f32>,
}

impl Stream {
    fn new(core: Arc<Core>, pos: StreamPos) -> Self {
        let d = core.ds.d_in;
        Self { core, pos, order_epoch: None, order: vec![], order_start: vec![], win: None, row: Vec::with_capacity(d) }
    }

    fn load_window(&mut self) {
        let c = self.core.clone();
        if self.order_epoch != Some(self.pos.epoch) {
            self.order = c.epoch_order(self.pos.epoch);
            self.order_start.clear();
            let mut acc = 0;
            for s in &self.order {
                self.order_start.push(acc);
                acc += s.len;
            }
            self.order_epoch = Some(self.pos.epoch);
        }
        let a = self.pos.window as usize * c.window;
        let b = (a + c.window).min(c.train_rows);
        let mut refs = Vec::with_capacity(b - a);
        let mut segs = vec![];
        let mut i = self.order_start.partition_point(|&s| s <= a) - 1;
        let mut g = a;
        while g < b {
            let s = self.order[i];
            let off = g - self.order_start[i];
            let l = (s.len - off).min(b - g);
            segs.push(Seg { shard: s.shard, start: s.start + off, len: l });
            refs.extend((0..l).map(|k| (s.shard as u32, s.start + off + k)));
            g += l;
            i += 1;
        }
        if c.window > 1 {
            let mut rng =
                ChaCha8Rng::seed_from_u64(mix(c.opts.seed, self.pos.epoch, TAG_WINDOW ^ self.pos.window << 16));
            shuffle(&mut refs, &mut rng);
        }
        for s in &segs {
            c.ds.shards[s.shard].will_need(s.start, s.len);
        }
        self.win = Some((refs, segs));
    }

    fn next_row(&mut self) -> (u32, usize) {
        loop {
            if self.win.is_none() {
                self.load_window();
            }
            let (refs, segs) = self.win.as_ref().unwrap();
            if self.pos.offset < refs.len() {
                let r = refs[self.pos.offset];
                self.pos.offset += 1;
                return r;
            }
            for s in segs {
                self.core.ds.shards[s.shard].dont_need(s.start, s.len);
            }
            self.win = None;
            self.pos.offset = 0;
            self.pos.window += 1;
            if self.pos.window >= self.core.windows_per_epoch() {
                self.pos.window = 0;
                self.pos.epoch += 1;
            }
        }
    }

    fn next_batch(&mut self) -> Result<Batch> {
        let c = self.core.clone();
        let (bsz, d) = (c.opts.batch_size, c.ds.d_in);
        let half = c.opts.keep_half && c.ds.dtype != Dtype::Float32;
        let max_skips = c.train_rows / bsz + 2;
        let mut skips = 0;
        loop {
            // Zeroed allocation: fresh pages from the OS, no memset; rows are written in place.
            let mut f32s: Vec<f32> = if half { vec![] } else { vec![0f32; bsz * d] };
            let mut raw: Vec<u16> = Vec::with_capacity(if half { bsz * d } else { 0 });
            let mut bad = false;
            let mut rows = 0;
            let mut scanned = 0usize;
            while rows < bsz {
                scanned += 1;
                if scanned > c.train_rows + bsz {
                    bail!(
                        "{}: no usable rows: every row is excluded by --max-norm-multiple {}",
                        c.ds.spec.display(),
                        c.opts.max_norm_multiple
                    );
                }
                let (s, r) = self.next_row();
                let sh = &c.ds.shards[s as usize];
                let bytes = sh.bytes(r, 1);
                // f32 batches: convert straight into the batch; half batches: into the scratch row.
                let st = rows * d;
                let row: &mut [f32] = if half {
                    self.row.resize(d, 0.0);
                    &mut self.row
                } else {
                    &mut f32s[st..st + d]
                };
                convert_to_f32(sh.dtype, bytes, row);
                let sq = sum_sq(row);
                let nonfinite = if sq.is_finite() { 0 } else { row.iter().filter(|v| !v.is_finite()).count() as u64 };
                let keep = if nonfinite > 0 {
                    self.pos.nonfinite_values += nonfinite;
                    bad = true;
                    rows += 1;
                    false
                } else if sq > c.max_sq {
                    self.pos.excluded_large_norm_rows += 1;
                    false
                } else {
                    rows += 1;
                    !bad // once bad, the batch is discarded: keep consuming its rows only
                };
                if !keep {
                    continue;
                }
                if half {
                    if c.scale == 1.0 {
                        raw.extend(bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])));
                    } else if sh.dtype == Dtype::Float16 {
                        raw.extend(self.row.iter().map(|&v| half::f16::from_f32(v * c.scale).to_bits()));
                    } else {
                        raw.extend(self.row.iter().map(|&v| half::bf16::from_f32(v * c.scale).to_bits()));
                    }
                } else if c.scale != 1.0 {
                    f32s[st..st + d].iter_mut().for_each(|v| *v *= c.scale);
                }
            }
            if bad {
                self.pos.skipped_nonfinite_batches += 1;
                skips += 1;
                if skips > max_skips {
                    bail!(
                        "{}: {} consecutive batches held NaN/Inf values (more than an epoch): the data is unusable",
                        c.ds.spec.display(),
                        skips
                    );
                }
                continue;
            }
            let data = if !half {
                BatchData::F32(f32s)
            } else if c.ds.dtype == Dtype::Float16 {
                BatchData::F16(raw.into_iter().map(half::f16::from_bits).collect())
            } else {
                BatchData::Bf16(raw.into_iter().map(half::bf16::from_bits).collect())
            };
            return Ok(Batch { rows: bsz, d_in: d, data });
        }
    }
}

type Msg = Result<(Batch, StreamPos)>;

struct Prefetcher {
    rx: Option<Receiver<Msg>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    fn spawn(core: Arc<Core>, pos: StreamPos, depth: usize) -> Self {
        let (tx, rx) = sync_channel::<Msg>(depth.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::Builder::new()
            .name("sae-data-reader".into())
            .spawn(move || {
                let mut s = Stream::new(core, pos);
                while !st.load(Ordering::Relaxed) {
                    let r = s.next_batch().map(|b| (b, s.pos.clone()));
                    let err = r.is_err();
                    if tx.send(r).is_err() || err {
                        break;
                    }
                }
            })
            .expect("cannot spawn the data reader thread");
        Self { rx: Some(rx), stop, handle: Some(handle) }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.rx.take(); // unblocks a pending send
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The shard reader.
pub struct ShardSource {
    core: Arc<Core>,
    /// Position after the last batch returned.
    pos: StreamPos,
    worker: Option<Prefetcher>,
    sync: Option<Stream>,
}

impl ShardSource {
    /// Open a dataset (file, directory or glob) and validate it.
    pub fn open(path: &Path, opts: ShardOptions) -> Result<Self> {
        let ds = Dataset::open(path, opts.tensor.as_deref())?;
        Self::from_dataset(ds, opts)
    }

    pub fn from_dataset(ds: Dataset, opts: ShardOptions) -> Result<Self> {
        let core = Arc::new(Core::new(ds, opts)?);
        let pos = StreamPos { train_rows: core.train_rows, seed: core.opts.seed, ..Default::default() };
        Ok(Self { core, pos, worker: None, sync: None })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.core.ds
    }
    pub fn train_rows(&self) -> usize {
        self.core.train_rows
    }
    pub fn eval_rows(&self) -> usize {
        self.core.eval_rows
    }
    /// Median row norm of the sample (raw units).
    pub fn median_norm(&self) -> f64 {
        self.core.median_norm
    }
    /// Norm above which rows are excluded (raw units; infinite when disabled).
    pub fn max_norm(&self) -> f64 {
        self.core.max_sq.sqrt()
    }
    /// Held-out segments (shard, start, len), for tests and tools.
    pub fn eval_segments(&self) -> &[Seg] {
        &self.core.eval
    }
    /// Non-finite values met so far in training rows.
    pub fn nonfinite_values(&self) -> u64 {
        self.pos.nonfinite_values
    }
    /// The full position and counters after the last batch returned.
    pub fn stream_pos(&self) -> &StreamPos {
        &self.pos
    }

    fn stop_worker(&mut self) {
        self.worker = None;
        self.sync = None;
    }
}

impl BatchSource for ShardSource {
    fn d_in(&self) -> usize {
        self.core.ds.d_in
    }
    fn batch_size(&self) -> usize {
        self.core.opts.batch_size
    }
    fn next_batch(&mut self) -> Result<Batch> {
        if self.core.opts.prefetch == 0 {
            let s = self.sync.get_or_insert_with(|| Stream::new(self.core.clone(), self.pos.clone()));
            let b = s.next_batch();
            self.pos = s.pos.clone();
            if b.is_err() {
                self.sync = None;
            }
            return b;
        }
        if self.worker.is_none() {
            self.worker = Some(Prefetcher::spawn(self.core.clone(), self.pos.clone(), self.core.opts.prefetch));
        }
        let msg = self.worker.as_ref().unwrap().rx.as_ref().unwrap().recv();
        match msg {
            Ok(Ok((b, pos))) => {
                self.pos = pos;
                Ok(b)
            }
            Ok(Err(e)) => {
                self.worker = None;
                Err(e)
            }
            Err(_) => {
                self.worker = None;
                Err(anyhow!("the data reader thread stopped unexpectedly"))
            }
        }
    }
    fn position(&self) -> serde_json::Value {
        serde_json::to_value(&self.pos).expect("position serialises")
    }
    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        let p: StreamPos =
            serde_json::from_value(position.clone()).map_err(|e| anyhow!("invalid data position {position}: {e}"))?;
        if p.train_rows != self.core.train_rows || p.seed != self.core.opts.seed {
            bail!(
                "the saved data position belongs to other data or another seed ({} training rows, seed {}; now {} rows, seed {})",
                p.train_rows,
                p.seed,
                self.core.train_rows,
                self.core.opts.seed
            );
        }
        if p.window >= self.core.windows_per_epoch() || p.offset > self.core.window {
            bail!("invalid data position {position}: window/offset out of range");
        }
        self.stop_worker();
        self.pos = p;
        Ok(())
    }
    fn eval_batches(&mut self, tokens: usize) -> Result<Vec<Batch>> {
        let c = &self.core;
        let (bsz, d) = (c.opts.batch_size, c.ds.d_in);
        let half = c.opts.keep_half && c.ds.dtype != Dtype::Float32;
        let mut rows: Vec<f32> = vec![];
        let mut n = 0;
        let mut row = vec![0f32; d];
        'outer: for s in &c.eval {
            let sh = &c.ds.shards[s.shard];
            for r in s.start..s.start + s.len {
                if n >= tokens {
                    break 'outer;
                }
                convert_to_f32(sh.dtype, sh.bytes(r, 1), &mut row);
                let sq = sum_sq(&row);
                if !sq.is_finite() || sq > c.max_sq {
                    continue;
                }
                rows.extend(row.iter().map(|&v| v * c.scale));
                n += 1;
            }
            sh.dont_need(s.start, s.len);
        }
        let mut out = vec![];
        for ch in rows.chunks(bsz * d) {
            let r = ch.len() / d;
            let data = if !half {
                BatchData::F32(ch.to_vec())
            } else if c.ds.dtype == Dtype::Float16 {
                BatchData::F16(ch.iter().map(|&v| half::f16::from_f32(v)).collect())
            } else {
                BatchData::Bf16(ch.iter().map(|&v| half::bf16::from_f32(v)).collect())
            };
            out.push(Batch { rows: r, d_in: d, data });
        }
        Ok(out)
    }
    fn ground_truth(&self) -> Option<&[f32]> {
        self.core.ground_truth.as_deref()
    }
    fn input_scale(&self) -> f32 {
        self.core.scale
    }
    fn stats(&self) -> SourceStats {
        SourceStats {
            skipped_nonfinite_batches: self.pos.skipped_nonfinite_batches,
            excluded_large_norm_rows: self.pos.excluded_large_norm_rows,
            epochs: self.pos.epoch,
        }
    }
    fn describe(&self) -> String {
        let c = &self.core;
        let ds = &c.ds;
        let mut s = format!(
            "activation shards {}: {} shard(s), {} rows x d_in {} {} ({:.2} GB); {} training rows, {} held out",
            ds.spec.display(),
            ds.shards.len(),
            ds.total_rows(),
            ds.d_in,
            ds.dtype,
            ds.total_bytes() as f64 / 1e9,
            c.train_rows,
            c.eval_rows
        );
        if let Some((_, m)) = &ds.manifest {
            if let Some(model) = &m.model {
                s += &format!("; model {model}");
            }
            if let Some(h) = &m.hook {
                s += &format!(" {h}");
            } else if let Some(l) = m.layer {
                s += &format!(" layer {l}");
            }
        }
        if c.max_sq.is_finite() {
            s += &format!(
                "; rows with norm > {:.4} ({} x median {:.4}) excluded",
                c.max_sq.sqrt(),
                c.opts.max_norm_multiple,
                c.median_norm
            );
        }
        if c.opts.normalize {
            s += &format!("; normalised by {:.6}", c.scale);
        }
        s += &format!("; shuffle window {} rows, seed {}", c.window, c.opts.seed);
        s
    }
}
