//! Inference thresholds (SPEC "Thresholds"): what one batch measures, and the EMA update.

use crate::config::{ThresholdMode, TrainConfig};
use crate::sparse::SparseCodes;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Whether, and on which rows, the exported thresholds are calibrated at the end of training
/// (see `train::calibrate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Calibration {
    /// `training` while the training stream's next rows are rows the SAE has not trained on
    /// (synthetic data; shards in their first pass), else `held-out` (default).
    Auto,
    /// Calibrate on the rows the training stream gives next: the held-out rows the summary
    /// reports on stay out of the fit.
    Training,
    /// Calibrate on the held-out rows themselves (the only form before 2026-12-07): the
    /// summary's exported L0 then matches the training rule's by construction, in-sample.
    #[value(alias = "held_out")]
    #[serde(alias = "held-out")]
    HeldOut,
    /// Keep the EMA of batch minima as it is.
    None,
}

/// The smallest kept activation of the batch (batchtopk / mutual_choice).
pub fn batch_min(codes: &SparseCodes) -> Option<f32> {
    codes.val.iter().copied().reduce(f32::min)
}

/// Per latent, the smallest kept activation (wta: its m_j-th largest, or its smallest positive
/// one when fewer than m_j were positive; None when it kept nothing).
pub fn per_latent_min(codes: &SparseCodes) -> Vec<Option<f32>> {
    codes.fold_by_latent(
        None,
        |e| Some(codes.val[e]),
        |slot, v| {
            if let Some(v) = v {
                *slot = Some(slot.map_or(v, |s: f32| s.min(v)));
            }
        },
    )
}

/// Whether [`update_thresholds`] moves any threshold at `step` (so its input is worth building).
pub fn tracked_at(cfg: &TrainConfig, step: u64) -> bool {
    cfg.sparsifier.batch_dependent() && step >= cfg.threshold_start_step()
}

/// A threshold that no activation passes: what a latent that never fired in training gets.
pub const NEVER: f32 = f32::MAX;

/// The thresholds inference uses: theta where it was measured, `NEVER` where the latent never
/// fired while thresholds were tracked (so it cannot fire on every positive pre-activation).
pub fn exported(theta: &[f32], theta_set: &[bool]) -> Vec<f32> {
    measured_or(theta, theta_set, NEVER)
}

/// The thresholds that pre-filter feature choice in its theta phase: theta where measured, 0
/// (no filter beyond ReLU) where not yet.
pub fn prefilter(theta: &[f32], theta_set: &[bool]) -> Vec<f32> {
    measured_or(theta, theta_set, 0.0)
}

/// theta where it was measured, `fill` where not.
fn measured_or(theta: &[f32], theta_set: &[bool], fill: f32) -> Vec<f32> {
    theta.iter().zip(theta_set).map(|(&t, &set)| if set { t } else { fill }).collect()
}

/// `theta <- decay * theta + (1 - decay) * t`, seeded with the first measurement.
pub fn ema_update(theta: &mut f32, set: &mut bool, t: f32, decay: f32) {
    if *set {
        *theta = decay * *theta + (1.0 - decay) * t;
    } else {
        *theta = t;
        *set = true;
    }
}

/// Threshold EMA after step `step` (0-based index of the step just taken). `min_kept[i]` is the
/// smallest kept activation of latent i in the batch (None if it kept nothing): per latent for
/// feature choice with per-latent thresholds, else its minimum (the batch's smallest kept value)
/// as one scalar, stored repeated. Only batch-dependent sparsifiers have thresholds.
pub fn update_thresholds(
    cfg: &TrainConfig,
    step: u64,
    theta: &mut [f32],
    theta_set: &mut [bool],
    min_kept: &[Option<f32>],
) {
    if !tracked_at(cfg, step) {
        return;
    }
    let decay = cfg.threshold_decay_value() as f32;
    let per_latent = cfg.sparsifier.per_column() && cfg.threshold_mode == ThresholdMode::PerLatent;
    if per_latent {
        for ((th, set), t) in theta.iter_mut().zip(theta_set.iter_mut()).zip(min_kept) {
            if let Some(t) = *t {
                ema_update(th, set, t, decay);
            }
        }
    } else if let Some(t) = min_kept.iter().flatten().copied().reduce(f32::min) {
        for (th, set) in theta.iter_mut().zip(theta_set.iter_mut()) {
            ema_update(th, set, t, decay);
        }
    }
}
