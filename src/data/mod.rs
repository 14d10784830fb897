//! Batch sources. The trainer only sees [`BatchSource`]: the synthetic generator (the default)
//! and the activation-shard reader both implement it.

pub mod cli;
pub mod dataset;
pub mod format;
pub mod manifest;
pub mod map_guard;
pub mod memory;
pub mod normalize;
pub mod order;
pub mod stream;
pub mod synthetic;

pub use dataset::Dataset;
pub use format::Dtype;
pub use manifest::Manifest;
pub use order::ShardOptions;
pub use stream::ShardSource;

use anyhow::Result;
use std::borrow::Cow;

/// Element storage of one batch. The CPU backend trains on f32; the CUDA backend uploads
/// half-precision bytes as they were read and converts on the device.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchData {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    Bf16(Vec<half::bf16>),
}

/// `rows` tokens of width `d_in`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub d_in: usize,
    pub data: BatchData,
}

impl Batch {
    pub fn from_f32(rows: usize, d_in: usize, x: Vec<f32>) -> Self {
        assert_eq!(x.len(), rows * d_in);
        Self { rows, d_in, data: BatchData::F32(x) }
    }
    /// The batch as f32 (borrowed when it already is).
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &self.data {
            BatchData::F32(v) => Cow::Borrowed(v),
            BatchData::F16(v) => Cow::Owned(v.iter().map(|h| h.to_f32()).collect()),
            BatchData::Bf16(v) => Cow::Owned(v.iter().map(|h| h.to_f32()).collect()),
        }
    }
}

/// Counters a source reports into the metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SourceStats {
    /// Batches skipped because they held NaN/Inf.
    pub skipped_nonfinite_batches: u64,
    /// Rows excluded for a norm above `max_norm_multiple` x median.
    pub excluded_large_norm_rows: u64,
    /// Completed passes over the data.
    pub epochs: u64,
}

/// A deterministic, resumable stream of training batches plus a held-out split.
pub trait BatchSource: Send {
    /// Width of each token.
    fn d_in(&self) -> usize;
    /// Tokens per batch.
    fn batch_size(&self) -> usize;
    /// Next training batch (exactly `batch_size` rows).
    fn next_batch(&mut self) -> Result<Batch>;
    /// Opaque position after the last batch returned, saved in checkpoints.
    fn position(&self) -> serde_json::Value;
    /// Continue from a saved position: the batches that follow are those an uninterrupted run
    /// would have drawn.
    fn seek(&mut self, position: &serde_json::Value) -> Result<()>;
    /// Held-out evaluation batches (never returned by `next_batch`), up to `tokens` rows total.
    fn eval_batches(&mut self, tokens: usize) -> Result<Vec<Batch>>;
    /// Ground-truth feature directions (N x d_in, unit rows) when the data is synthetic.
    fn ground_truth(&self) -> Option<&[f32]> {
        None
    }
    /// Scale applied to raw activations (1.0 when not normalised); folded into exports.
    fn input_scale(&self) -> f32 {
        1.0
    }
    fn stats(&self) -> SourceStats {
        SourceStats::default()
    }
    /// One line describing the data, for logs and the run summary.
    fn describe(&self) -> String;
    /// The data set's `manifest.json`, when it has one (where the activations come from).
    fn manifest(&self) -> Option<&Manifest> {
        None
    }
}

/// The trainer's constructor: the built-in synthetic data when `cfg.data` is None, else the
/// activation-shard reader (f32 batches); normalised per token under `--normalize per-token`.
pub fn open_source(cfg: &crate::config::TrainConfig) -> Result<Box<dyn BatchSource>> {
    open_source_with(cfg, false)
}

/// As [`open_source`]; `keep_half`: half-precision shards are returned as F16/Bf16 batches
/// (for a consumer that converts on the device) instead of f32.
pub fn open_source_with(cfg: &crate::config::TrainConfig, keep_half: bool) -> Result<Box<dyn BatchSource>> {
    let raw = open_raw(cfg, keep_half)?;
    match cfg.normalize {
        crate::config::Normalize::PerToken => Ok(Box::new(normalize::PerToken::new(raw)?)),
        _ => Ok(raw),
    }
}

/// The source before per-token normalisation (the global scale, a property of the whole data
/// set, is applied by the shard reader itself).
fn open_raw(cfg: &crate::config::TrainConfig, keep_half: bool) -> Result<Box<dyn BatchSource>> {
    match &cfg.data {
        None => Ok(Box::new(synthetic::Synthetic::new(cfg.synth_spec(), cfg.batch_size)?)),
        Some(path) => Ok(Box::new(ShardSource::open(path, ShardOptions::from_config(cfg, keep_half))?)),
    }
}
