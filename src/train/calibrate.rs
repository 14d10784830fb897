//! Threshold calibration at the end of training (SPEC "Thresholds"). The EMA of batch minima
//! under-fires at inference (held-out L0 about 2/3 of k on real activations). Calibration picks
//! the thresholds so that the exported JumpReLU keeps, on the calibration rows, as many entries
//! as the training rule keeps there: one global threshold for batch-level rules (batchtopk,
//! mutual_choice), one per latent for feature choice (wta, hybrid). The rows are the training
//! stream's next ones ([`rows`]), so that the held-out metrics of the exported SAE are measured
//! on rows its thresholds were not fitted to.

use super::effective_encoder;
use crate::backend::cpu::encode;
use crate::backend::{Backend, InferMode};
use crate::config::{ThresholdMode, TrainConfig};
use crate::data::{Batch, BatchSource};
use crate::sparsify::threshold::{Calibration, NEVER};
use crate::sparsify::{self, Architecture, Selection};
use anyhow::Result;
use serde::Serialize;
use std::borrow::Cow;

/// What calibration did, for the summary and `cfg.json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CalibrationReport {
    /// "global" or "per_latent".
    pub mode: String,
    /// Which rows: `training` (the training stream's next rows) or `held_out`.
    pub rows: Calibration,
    pub tokens: usize,
    /// L0 of the training rule on the calibration rows: the target.
    pub target_l0: f64,
    /// L0 with the EMA thresholds on those rows, before calibration.
    pub ema_l0: f64,
    /// L0 with the calibrated thresholds on those rows.
    pub calibrated_l0: f64,
    /// hybrid only: the same thresholds without the per-token cap, as SAELens's jumprelu (which
    /// cannot express the cap) runs the exported file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub without_cap: Option<WithoutCap>,
}

/// What hybrid's exported thresholds do without its per-token cap, on the calibration rows.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WithoutCap {
    /// The cap (`per_token_cap` in cfg.json).
    pub cap: usize,
    pub l0: f64,
    /// Share of tokens whose thresholds keep more than `cap` latents: the tokens on which SAELens
    /// and saetrain give different codes.
    pub frac_tokens_over_cap: f64,
}

/// The rows to calibrate on, and which they are (`Training` or `HeldOut`), for
/// `cfg.threshold_calibration`. `Training`: the batches the training stream gives next, as many
/// rows as the held-out set (at least one batch, so that a run without a held-out set is
/// calibrated too), drawn without moving the stream: its position (and its counts of skipped
/// rows) is restored afterwards, so a run continued with a larger --steps trains on what an
/// uninterrupted run would have. `Auto` takes them only while they are rows the SAE has not
/// trained on (the stream is in its first pass): on rows it has fit, pre-activations run larger
/// than on new data, and thresholds fitted there over-fire on new data (+17% L0 on the 24,576
/// training rows of shared/data/smollm2-l15 after 8 passes).
pub fn rows<'a>(
    cfg: &TrainConfig,
    source: &mut dyn BatchSource,
    held_out: &'a [Batch],
) -> Result<(Cow<'a, [Batch]>, Calibration)> {
    let wanted = cfg.threshold_calibration;
    let in_first_pass = |s: &dyn BatchSource| s.stats().epochs == 0;
    match wanted {
        _ if !cfg.sparsifier.batch_dependent() => return Ok((held_out.into(), wanted)),
        Calibration::None | Calibration::HeldOut => return Ok((held_out.into(), wanted)),
        Calibration::Auto if !in_first_pass(source) => return Ok((held_out.into(), Calibration::HeldOut)),
        Calibration::Auto | Calibration::Training => {}
    }
    let at = source.position();
    let n = cfg.eval_tokens.div_ceil(cfg.batch_size).max(1);
    let drawn: Result<Vec<Batch>> = (0..n).map(|_| source.next_batch()).collect();
    let new_rows = in_first_pass(source);
    source.seek(&at)?;
    let drawn = drawn?;
    if wanted == Calibration::Auto && !new_rows {
        return Ok((held_out.into(), Calibration::HeldOut));
    }
    Ok((drawn.into(), Calibration::Training))
}

/// The largest values of a stream, up to `keep` of them, in bounded memory.
struct Largest {
    keep: usize,
    vals: Vec<f32>,
}

impl Largest {
    fn new(keep: usize) -> Self {
        Self { keep, vals: vec![] }
    }
    fn push(&mut self, v: f32) {
        self.vals.push(v);
        if self.vals.len() > 2 * self.keep + 1024 {
            self.trim();
        }
    }
    fn trim(&mut self) {
        if self.vals.len() > self.keep {
            if self.keep > 0 {
                self.vals.select_nth_unstable_by(self.keep - 1, |a, b| b.total_cmp(a));
            }
            self.vals.truncate(self.keep);
        }
    }
    /// Trimmed and sorted, largest first.
    fn sorted(mut self) -> Vec<f32> {
        self.trim();
        self.vals.sort_by(|a, b| b.total_cmp(a));
        self.vals
    }
}

/// A threshold that `need` of the (descending) `vals` exceed: midway between the need-th and
/// the (need+1)-th largest; 0 when there are no more than `need` positive values; NEVER when
/// nothing is needed.
fn threshold_for(vals: &[f32], need: usize) -> f32 {
    if need == 0 {
        return NEVER;
    }
    match (vals.get(need - 1), vals.get(need)) {
        (Some(&a), Some(&b)) => 0.5 * (a + b),
        _ => 0.0,
    }
}

/// Calibrate the backend's thresholds on `eval`, the batches of [`rows`] (`rows` says which
/// they are). Returns None for sparsifiers without thresholds.
pub fn calibrate(
    cfg: &TrainConfig,
    backend: &mut dyn Backend,
    eval: &[Batch],
    rows: Calibration,
) -> Result<Option<CalibrationReport>> {
    if !cfg.sparsifier.batch_dependent() || cfg.threshold_calibration == Calibration::None || eval.is_empty() {
        return Ok(None);
    }
    let f = cfg.d_sae;
    let tokens: usize = eval.iter().map(|b| b.rows).sum();
    // Targets: what the training rule keeps per latent on these rows; and the EMA's L0.
    let mut counts = vec![0usize; f];
    let mut ema_nnz = 0usize;
    for b in eval {
        let codes = backend.infer(b, InferMode::Training)?.codes;
        for (c, n) in counts.iter_mut().zip(codes.col_counts()) {
            *c += n as usize;
        }
        ema_nnz += backend.infer(b, InferMode::Exported)?.codes.nnz();
    }
    let total: usize = counts.iter().sum();
    let per_latent = cfg.sparsifier.per_column() && cfg.threshold_mode == ThresholdMode::PerLatent;
    // The pre-activations of the trained SAE on the same rows (the backend's own inputs).
    let state = backend.state()?;
    let (d, p) = (state.shape().d_in, state.params.parts());
    let w = effective_encoder(cfg, &state);
    // Per latent, room to raise a latent's quota (hybrid's cap drops some of what the
    // thresholds keep; see below).
    let mut global = Largest::new(total + 1);
    let mut cols: Vec<Largest> =
        if per_latent { counts.iter().map(|&c| Largest::new(2 * c + 16)).collect() } else { vec![] };
    let pre_of = |b: &Batch| {
        let x = b.to_f32();
        let mut xc = vec![0f32; x.len()];
        encode::center(&x, p.b_dec, &mut xc);
        let mut pre = vec![0f32; b.rows * f];
        encode::encode(&xc, &w, p.b_enc, b.rows, d, &mut pre);
        pre
    };
    for b in eval {
        let pre = pre_of(b);
        for row in pre.chunks(f) {
            for (j, &v) in row.iter().enumerate() {
                if v > 0.0 {
                    if per_latent {
                        cols[j].push(v);
                    } else {
                        global.push(v);
                    }
                }
            }
        }
    }
    let exported_counts = |backend: &mut dyn Backend| -> Result<Vec<usize>> {
        let mut got = vec![0usize; f];
        for b in eval {
            for (g, n) in got.iter_mut().zip(backend.infer(b, InferMode::Exported)?.codes.col_counts()) {
                *g += n as usize;
            }
        }
        Ok(got)
    };
    let mut got;
    let theta: Vec<f32>;
    if per_latent {
        let cols: Vec<Vec<f32>> = cols.into_iter().map(Largest::sorted).collect();
        let mut need = counts.clone();
        let mut t: Vec<f32> = cols.iter().zip(&need).map(|(v, &n)| threshold_for(v, n)).collect();
        backend.set_thresholds(&t, &vec![true; f])?;
        got = exported_counts(backend)?;
        // Hybrid: the per-token cap after the thresholds drops entries, so a latent keeps fewer
        // than its quota; raise the quotas of those that fall short, a few rounds.
        let capped = cfg.sparsifier.exported() == Architecture::JumpReluCapped;
        for _ in 0..4 {
            if !capped || got == counts {
                break;
            }
            for j in 0..f {
                if got[j] < counts[j] {
                    need[j] = (need[j] + counts[j] - got[j]).min(cols[j].len());
                }
            }
            t = cols.iter().zip(&need).map(|(v, &n)| threshold_for(v, n)).collect();
            backend.set_thresholds(&t, &vec![true; f])?;
            got = exported_counts(backend)?;
        }
        theta = t;
    } else {
        let vals = global.sorted();
        theta = vec![threshold_for(&vals, total); f];
        backend.set_thresholds(&theta, &vec![true; f])?;
        got = exported_counts(backend)?;
    }
    let calibrated_nnz: usize = got.iter().sum();
    let l0 = |n: usize| n as f64 / tokens as f64;
    // The exported rule without its cap (`Selection::JumpRelu`, what SAELens runs), counted per
    // token against the cap. One more encoder pass over the calibration rows, hybrid only.
    let without_cap = (cfg.sparsifier.exported() == Architecture::JumpReluCapped).then(|| {
        let cap = cfg.hybrid_k_max();
        let (mut nnz, mut over) = (0usize, 0usize);
        for b in eval {
            let codes = sparsify::select(&pre_of(b), b.rows, f, &Selection::JumpRelu { theta: &theta });
            for r in 0..b.rows {
                let n = codes.row(r).0.len();
                nnz += n;
                over += (n > cap) as usize;
            }
        }
        WithoutCap { cap, l0: l0(nnz), frac_tokens_over_cap: over as f64 / tokens as f64 }
    });
    Ok(Some(CalibrationReport {
        mode: if per_latent { "per_latent" } else { "global" }.into(),
        rows,
        tokens,
        target_l0: l0(total),
        ema_l0: l0(ema_nnz),
        calibrated_l0: l0(calibrated_nnz),
        without_cap,
    }))
}
