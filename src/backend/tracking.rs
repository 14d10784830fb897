//! Per-latent bookkeeping every backend shares (F values each, kept on the host): feature-choice
//! budgets, aux-loss candidates, firing counters and densities, and the threshold EMA.
//! One implementation, so the CPU and CUDA backends cannot drift apart.

use crate::config::{AuxKind, BudgetKind, ThresholdMode, TrainConfig};
use crate::sparsify::{budget, threshold};

/// Per-latent budgets m_j for feature choice at batch size `rows`.
pub fn budgets(cfg: &TrainConfig, density: &[f32], rows: usize) -> Vec<usize> {
    match cfg.budget {
        BudgetKind::Uniform => vec![cfg.wta_m(rows); cfg.d_sae],
        BudgetKind::Zipf => {
            budget::zipf_budgets(density, rows, cfg.k, cfg.zipf_alpha, cfg.zipf_beta, cfg.m_max_for(rows))
        }
    }
}

/// Latents eligible for the aux loss at step `step` (0 = before the first update), ascending.
pub fn aux_candidates(cfg: &TrainConfig, step: u64, since_fired: &[u64], density: &[f32], rows: usize) -> Vec<u32> {
    match cfg.aux_kind() {
        AuxKind::None => vec![],
        AuxKind::AuxK => {
            let w = cfg.dead_window_tokens();
            (0..cfg.d_sae as u32).filter(|&i| since_fired[i as usize] >= w).collect()
        }
        AuxKind::AuxZipf => {
            if step == 0 {
                return vec![]; // no density measured yet
            }
            // The EMA starts at 0: remove its bias (as Adam does for its moments) so that
            // "density < 0.6 x the Zipf prediction" compares like with like from step 1.
            let density = budget::bias_corrected(density, step, cfg.density_decay);
            let dying = budget::dying_latents(&density, rows, cfg.k, cfg.zipf_alpha, cfg.zipf_beta);
            (0..cfg.d_sae as u32).filter(|&i| dying[i as usize]).collect()
        }
    }
}

/// Latents that have not fired for `dead_window` tokens.
pub fn dead_count(cfg: &TrainConfig, since_fired: &[u64]) -> usize {
    let w = cfg.dead_window_tokens();
    since_fired.iter().filter(|&&s| s >= w).count()
}

/// After a step: firing counters (`counts[i]` = tokens latent i fired on in this batch of `rows`)
/// and running densities.
pub fn record_firing(cfg: &TrainConfig, since_fired: &mut [u64], density: &mut [f32], counts: &[u32], rows: usize) {
    let decay = cfg.density_decay as f32;
    for ((s, dn), &c) in since_fired.iter_mut().zip(density.iter_mut()).zip(counts) {
        *s = if c > 0 { 0 } else { *s + rows as u64 };
        *dn = decay * *dn + (1.0 - decay) * (c as f32 / rows as f32);
    }
}

/// Threshold EMA after step `step` (0-based index of the step just taken). `min_kept[i]` is the
/// smallest kept activation of latent i in the batch (None if it kept nothing): per latent for
/// feature choice with per-latent thresholds, else its minimum (the batch's smallest kept value)
/// as one scalar, stored repeated.
pub fn update_thresholds(
    cfg: &TrainConfig,
    step: u64,
    theta: &mut [f32],
    theta_set: &mut [bool],
    min_kept: &[Option<f32>],
) {
    if !cfg.sparsifier.batch_dependent() || step < cfg.threshold_start_step() {
        return;
    }
    let decay = cfg.threshold_decay_value() as f32;
    let per_latent = cfg.sparsifier.per_column() && cfg.threshold_mode == ThresholdMode::PerLatent;
    if per_latent {
        for ((th, set), t) in theta.iter_mut().zip(theta_set.iter_mut()).zip(min_kept) {
            if let Some(t) = *t {
                threshold::ema_update(th, set, t, decay);
            }
        }
    } else if let Some(t) = min_kept.iter().flatten().copied().reduce(f32::min) {
        for (th, set) in theta.iter_mut().zip(theta_set.iter_mut()) {
            threshold::ema_update(th, set, t, decay);
        }
    }
}
