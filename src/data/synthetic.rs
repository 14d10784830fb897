//! The built-in toy model of superposition (SPEC "Synthetic data"): N unit ground-truth
//! directions in R^d (N > d); each token is a sparse non-negative combination of them with
//! Zipf-distributed feature frequencies, plus small Gaussian noise.
//!
//! Every batch is a pure function of (seed, batch index), so positions are a counter and
//! `--resume` continues exactly. The held-out split uses a separate stream of the same seed.

use super::{Batch, BatchSource};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SynthSpec {
    pub d_in: usize,
    pub n_features: usize,
    /// Expected number of active features per token.
    pub mean_active: f64,
    /// Feature i (0-based) fires with probability proportional to (i+1)^-zipf.
    pub zipf: f64,
    /// Std of the Gaussian noise per coordinate.
    pub noise: f64,
    pub seed: u64,
}

impl SynthSpec {
    /// Refuse a spec that cannot generate data, naming the flags by `prefix` (`--synth-` for
    /// `sae train`, `--` for `sae data synth`). Before, NaN noise or zipf generated NaN rows or
    /// rows of another scale, more active features than features were silently capped, and a
    /// direction table too large for memory aborted in the allocator.
    pub fn check(&self, prefix: &str) -> Result<()> {
        if self.d_in == 0 || self.n_features == 0 {
            bail!("invalid {prefix}d-in {} / {prefix}features {}: both must be >= 1", self.d_in, self.n_features);
        }
        for (name, v) in [("noise", self.noise), ("zipf", self.zipf)] {
            // `!(v >= 0)` refuses NaN too.
            if !(v >= 0.0 && v.is_finite()) {
                bail!("invalid {prefix}{name} {v}: must be a finite number >= 0");
            }
        }
        if !(self.mean_active > 0.0 && self.mean_active <= self.n_features as f64) {
            bail!(
                "invalid {prefix}active {}: the mean number of active features must be > 0 and at most {prefix}features ({})",
                self.mean_active,
                self.n_features
            );
        }
        let bytes = (self.d_in as u128) * (self.n_features as u128) * 4;
        if let Some(total) = crate::train::footprint::total_memory() {
            if bytes > total {
                bail!(
                    "invalid {prefix}d-in {} x {prefix}features {}: the feature directions alone take {:.1} GB, more than this machine's {:.1} GB of memory",
                    self.d_in,
                    self.n_features,
                    bytes as f64 / 1e9,
                    total as f64 / 1e9
                );
            }
        }
        Ok(())
    }
}

/// Rows per independently seeded chunk: generation is parallel yet identical for any thread count.
const CHUNK: usize = 64;
/// Stream id of the held-out split.
const EVAL_STREAM: u64 = 1 << 40;

pub struct Synthetic {
    spec: SynthSpec,
    batch_size: usize,
    /// N x d unit rows.
    dirs: Vec<f32>,
    /// Firing probability per feature.
    prob: Vec<f64>,
    next_index: u64,
}

impl Synthetic {
    pub fn new(spec: SynthSpec, batch_size: usize) -> Result<Self> {
        if spec.d_in == 0 || spec.n_features == 0 {
            bail!("synthetic data needs d_in >= 1 and n_features >= 1");
        }
        if spec.mean_active.is_nan() || spec.mean_active <= 0.0 {
            bail!("invalid --synth-active {}: must be > 0", spec.mean_active);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0xD1C7_0000);
        let d = spec.d_in;
        let mut dirs = vec![0f32; spec.n_features * d];
        for row in dirs.chunks_mut(d) {
            for v in row.iter_mut() {
                *v = StandardNormal.sample(&mut rng);
            }
            crate::model::init::normalize(row);
        }
        let w: Vec<f64> = (0..spec.n_features).map(|i| ((i + 1) as f64).powf(-spec.zipf)).collect();
        let s: f64 = w.iter().sum();
        let prob = w.iter().map(|x| (x / s * spec.mean_active).min(1.0)).collect();
        Ok(Self { spec, batch_size, dirs, prob, next_index: 0 })
    }

    pub fn spec(&self) -> &SynthSpec {
        &self.spec
    }

    /// Per-feature firing probabilities (ground truth of the frequency distribution).
    pub fn probabilities(&self) -> &[f64] {
        &self.prob
    }

    /// Batch number `index` of stream `stream` (0 = training).
    pub fn generate(&self, stream: u64, index: u64, rows: usize) -> Batch {
        let d = self.spec.d_in;
        let mut x = vec![0f32; rows * d];
        x.par_chunks_mut(CHUNK * d).enumerate().for_each(|(c, chunk)| {
            let seed = self.spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream;
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(index);
            rng.set_word_pos((c as u128) << 32);
            self.fill_chunk(&mut rng, chunk);
        });
        Batch::from_f32(rows, d, x)
    }

    fn fill_chunk(&self, rng: &mut ChaCha8Rng, chunk: &mut [f32]) {
        let d = self.spec.d_in;
        let n_rows = chunk.len() / d;
        // Per feature, skip geometrically to the rows where it fires: work ~ active entries.
        for (f, &p) in self.prob.iter().enumerate() {
            if p <= 0.0 {
                continue;
            }
            let dir = &self.dirs[f * d..(f + 1) * d];
            let log_q = (1.0 - p).ln();
            let mut r: usize = 0;
            loop {
                if p < 1.0 {
                    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    r += (u.ln() / log_q).floor() as usize;
                }
                if r >= n_rows {
                    break;
                }
                let mag: f32 = rng.random_range(0.5..1.5);
                let row = &mut chunk[r * d..(r + 1) * d];
                for (o, v) in row.iter_mut().zip(dir) {
                    *o += mag * v;
                }
                r += 1;
            }
        }
        if self.spec.noise > 0.0 {
            let s = self.spec.noise as f32;
            for v in chunk.iter_mut() {
                let z: f32 = StandardNormal.sample(rng);
                *v += s * z;
            }
        }
    }
}

impl BatchSource for Synthetic {
    fn d_in(&self) -> usize {
        self.spec.d_in
    }
    fn batch_size(&self) -> usize {
        self.batch_size
    }
    fn next_batch(&mut self) -> Result<Batch> {
        let b = self.generate(0, self.next_index, self.batch_size);
        self.next_index += 1;
        Ok(b)
    }
    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "batches": self.next_index })
    }
    fn seek(&mut self, position: &serde_json::Value) -> Result<()> {
        match position.get("batches").and_then(|v| v.as_u64()) {
            Some(n) => {
                self.next_index = n;
                Ok(())
            }
            None => bail!("synthetic data position must be {{\"batches\": N}}, got {position}"),
        }
    }
    fn eval_batches(&mut self, tokens: usize) -> Result<Vec<Batch>> {
        let mut out = vec![];
        let mut left = tokens;
        let mut i = 0;
        while left > 0 {
            let rows = left.min(self.batch_size);
            out.push(self.generate(EVAL_STREAM, i, rows));
            left -= rows;
            i += 1;
        }
        Ok(out)
    }
    fn ground_truth(&self) -> Option<&[f32]> {
        Some(&self.dirs)
    }
    fn describe(&self) -> String {
        let s = &self.spec;
        format!(
            "synthetic superposition: {} features in d={} (mean {} active, zipf {}, noise {}), seed {}",
            s.n_features, s.d_in, s.mean_active, s.zipf, s.noise, s.seed
        )
    }
}
