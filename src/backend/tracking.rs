//! Per-latent bookkeeping every backend shares (F values each, kept on the host): firing
//! counters and running densities. One implementation, so the CPU and CUDA backends cannot
//! drift apart. (Budgets and aux candidates are the sparsifier's: `sparsify::plan`; the
//! threshold EMA is `sparsify::threshold`.)

use crate::config::TrainConfig;

/// Latents that have not fired for `dead_window` tokens.
pub fn dead_count(cfg: &TrainConfig, since_fired: &[u64]) -> usize {
    let w = cfg.dead_window_tokens();
    since_fired.iter().filter(|&&s| s >= w).count()
}

/// The counters and densities as they stand once this batch (`counts` of `rows` tokens) is
/// counted, on copies: what the aux losses pick their candidates from ([`crate::sparsify::plan::aux_candidates`]).
pub fn counted(
    cfg: &TrainConfig,
    since_fired: &[u64],
    density: &[f32],
    counts: &[u32],
    rows: usize,
) -> (Vec<u64>, Vec<f32>) {
    let (mut s, mut d) = (since_fired.to_vec(), density.to_vec());
    record_firing(cfg, &mut s, &mut d, counts, rows);
    (s, d)
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
