//! The activation-shard reader: a [`BatchSource`] over memory-mapped `.npy`/`.safetensors` shards,
//! streaming the rows in the order `order.rs` fixes, on a reader thread (`Prefetcher`) or on
//! the caller's.
//!
//! Rows are gathered straight from the map when a batch is built, so memory stays at one window
//! of pages. The stream position is (epoch, window, offset in window) plus the counters, so `seek`
//! rebuilds one window and continues exactly where an uninterrupted run would be.

use super::dataset::{sum_sq, Dataset};
use super::format::{convert_to_f32, Dtype};
use super::order::{Core, Seg, ShardOptions, Window};
use super::{Batch, BatchData, BatchSource, Manifest, SourceStats};
use anyhow::{anyhow, bail, Result};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    /// Checked on seek where present (checkpoints before 2026-12-07 lack it): the digest of the
    /// rows sampled at open, in hex (`Core::sample_digest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sample: Option<String>,
}

fn digest_hex(d: u64) -> String {
    format!("{d:016x}")
}

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
        let (refs, segs) = c.window_rows(self.pos.epoch, self.pos.window, &self.order, &self.order_start);
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
            // The shards this batch read from (a window spans a few), checked once it is read.
            let mut touched: Vec<u32> = vec![];
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
                if touched.last() != Some(&s) {
                    touched.push(s);
                }
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
            // A shard written to or truncated under its map since it was opened: the batch is not
            // the data (a truncated shard's lost pages read as zeros).
            touched.sort_unstable();
            touched.dedup();
            c.ds.check_intact_of(&touched)?;
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
        let pos = StreamPos {
            train_rows: core.train_rows,
            seed: core.opts.seed,
            data_sample: Some(digest_hex(core.sample_digest)),
            ..Default::default()
        };
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
    /// The digest of the rows sampled at open, as the stream position records it
    /// (`StreamPos::data_sample`): equal for the same contents at any path and any split.
    pub fn data_sample(&self) -> String {
        digest_hex(self.core.sample_digest)
    }
    /// The held-out split as (shard file, first row, rows) segments in file order: what a
    /// consumer outside this reader (the CE evaluation's token windows) must stay inside.
    pub fn held_out_segments(&self) -> Vec<(&Path, usize, usize)> {
        self.core.eval.iter().map(|s| (self.core.ds.shards[s.shard].path.as_path(), s.start, s.len)).collect()
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
        if self.core.opts.evaluation_set {
            bail!("{}: opened as an evaluation set, which has no training rows", self.core.ds.spec.display());
        }
        if self.core.opts.prefetch == 0 {
            let s = self.sync.get_or_insert_with(|| Stream::new(self.core.clone(), self.pos.clone()));
            let b = s.next_batch();
            // After a failed batch the position stays after the last good one (as the reader
            // thread's does), so that a checkpoint written now resumes with the failed batch.
            if b.is_ok() {
                self.pos = s.pos.clone();
            } else {
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
        let now = self.data_sample();
        if let Some(saved) = p.data_sample.as_ref().filter(|&saved| *saved != now) {
            bail!(
                "{}: not the data this run was trained on: its rows sampled at open differ (digest {saved} in the \
                 checkpoint, {now} now), though the row count and seed match; the same path (or an array of the same \
                 shape) with other contents? Resume with the data the run was trained on, or train a new run",
                self.core.ds.spec.display()
            );
        }
        if p.window >= self.core.windows_per_epoch() || p.offset > self.core.window {
            bail!("invalid data position {position}: window/offset out of range");
        }
        self.stop_worker();
        // A checkpoint from before the digest existed gains it from here on.
        self.pos = StreamPos { data_sample: Some(now), ..p };
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
        c.ds.check_intact()?;
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
    fn manifest(&self) -> Option<&Manifest> {
        self.core.ds.manifest.as_ref().map(|(_, m)| m)
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
        let split = match c.opts.evaluation_set {
            true => format!("evaluation set: {} rows held out", c.eval_rows),
            false => format!("{} training rows, {} held out", c.train_rows, c.eval_rows),
        };
        let mut s = format!(
            "activation shards {}: {} shard(s), {} rows x d_in {} {} ({:.2} GB); {split}",
            ds.spec.display(),
            ds.shards.len(),
            ds.total_rows(),
            ds.d_in,
            ds.dtype,
            ds.total_bytes() as f64 / 1e9,
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
            // scripts/harvest.py lists the whole shards of a harvest it was stopped in.
            if let Some(why) = m.extra.as_ref().and_then(|e| e.get("interrupted")).filter(|v| !v.is_null()) {
                let reason = why.get("why").and_then(|w| w.as_str()).unwrap_or("interrupted");
                s += &format!(
                    "; an interrupted harvest ({reason}): these are the rows harvested so far, and \
                     scripts/harvest.py --resume continues it"
                );
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
