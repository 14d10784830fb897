//! The aux losses' selection (SPEC "Auxiliary losses"): which latents are candidates at a step
//! (aux_k: dead; aux_zipf: dying), and per token the `k_aux` largest positive `pre` among them
//! (`Selection::Aux`). The loss itself is computed by the backends.

use super::budget;
use crate::sparse::SparseCodes;
use clap::ValueEnum;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AuxKind {
    None,
    /// Gao et al.: reconstruct the residual from dead latents.
    #[value(alias = "aux_k")]
    #[serde(alias = "aux-k")]
    AuxK,
    /// MC/FC paper: the same with "dying" latents.
    #[value(alias = "aux_zipf")]
    #[serde(alias = "aux-zipf")]
    AuxZipf,
}

/// What the candidate rule needs from the config.
#[derive(Clone, Copy, Debug)]
pub struct CandidateRule {
    pub kind: AuxKind,
    /// Tokens without firing after which a latent is dead (aux_k).
    pub dead_window: u64,
    /// Zipf parameters and the density EMA decay (aux_zipf).
    pub k: usize,
    pub zipf_alpha: f64,
    pub zipf_beta: f64,
    pub density_decay: f64,
    /// The densities started from another run's estimates (`--init-from`), not from 0: they
    /// carry no EMA bias to remove, and are measured before the first step.
    pub density_inherited: bool,
}

/// Latents eligible for the aux loss, ascending, from counters and densities that have had
/// `step` updates (0: none yet, no density measured).
pub fn candidates(rule: &CandidateRule, step: u64, since_fired: &[u64], density: &[f32], rows: usize) -> Vec<u32> {
    let f = since_fired.len() as u32;
    match rule.kind {
        AuxKind::None => vec![],
        AuxKind::AuxK => (0..f).filter(|&i| since_fired[i as usize] >= rule.dead_window).collect(),
        AuxKind::AuxZipf => {
            let density = if rule.density_inherited {
                density.to_vec()
            } else if step == 0 {
                return vec![]; // no density measured yet
            } else {
                // The EMA starts at 0: remove its bias (as Adam does for its moments) so that
                // "density < 0.6 x the Zipf prediction" compares like with like from step 1.
                budget::bias_corrected(density, step, rule.density_decay)
            };
            let dying = budget::dying_latents(&density, rows, rule.k, rule.zipf_alpha, rule.zipf_beta);
            (0..f).filter(|&i| dying[i as usize]).collect()
        }
    }
}

/// Per token, the `k_aux` largest positive `pre` among `candidates` (ascending latent indices);
/// ties go to the lower latent index, as everywhere.
pub(super) fn select_aux(pre: &[f32], rows: usize, cols: usize, candidates: &[u32], k_aux: usize) -> SparseCodes {
    let lists: Vec<Vec<(u32, f32)>> = (0..rows)
        .into_par_iter()
        .map_init(Vec::new, |kept, b| {
            row_aux(&pre[b * cols..(b + 1) * cols], candidates, k_aux, kept);
            kept.iter().map(|&(v, j)| (candidates[j as usize], v)).collect()
        })
        .collect();
    SparseCodes::from_rows(cols, lists)
}

/// The same selection as [`select_aux`], written as a dense `rows x n` block over the `n`
/// candidates: `out[b, j] = pre[b, candidates[j]]` where kept, 0 elsewhere (kept values are
/// positive, so the block is its own mask). For the CPU's dense aux products, which then need
/// no sparse codes at all. Returns the number of kept entries.
pub fn select_aux_block(
    pre: &[f32],
    rows: usize,
    cols: usize,
    candidates: &[u32],
    k_aux: usize,
    out: &mut [f32],
) -> usize {
    let n = candidates.len();
    assert_eq!(pre.len(), rows * cols, "pre has the wrong size");
    assert_eq!(out.len(), rows * n, "the block has the wrong size");
    if n == 0 || k_aux == 0 {
        out.fill(0.0);
        return 0;
    }
    out.par_chunks_mut(n)
        .enumerate()
        .map_init(Vec::new, |kept, (b, o)| {
            let row = &pre[b * cols..(b + 1) * cols];
            // Without branches first: every positive candidate, which is the selection whenever
            // there are at most k_aux of them (dead latents are mostly negative; half positive at
            // initialisation). A branch per candidate mispredicts half the time.
            let mut positive = 0usize;
            for (o, &i) in o.iter_mut().zip(candidates) {
                let v = row[i as usize];
                let keep = v > 0.0;
                *o = if keep { v } else { 0.0 };
                positive += keep as usize;
            }
            if positive <= k_aux {
                return positive;
            }
            row_aux(row, candidates, k_aux, kept);
            o.fill(0.0);
            for &(v, j) in kept.iter() {
                o[j as usize] = v;
            }
            kept.len()
        })
        .sum()
}

/// One token's aux selection into `kept` as (value, position in `candidates`): every positive
/// candidate when there are at most `k_aux` of them, else the `k_aux` largest (ties to the lower
/// latent index, which is the lower position since `candidates` ascend).
fn row_aux(row: &[f32], candidates: &[u32], k_aux: usize, kept: &mut Vec<(f32, u32)>) {
    kept.clear();
    if k_aux == 0 {
        return;
    }
    kept.extend(candidates.iter().enumerate().filter_map(|(j, &i)| {
        let v = row[i as usize];
        (v > 0.0).then_some((v, j as u32))
    }));
    if kept.len() > k_aux {
        kept.select_nth_unstable_by(k_aux - 1, |a, b| {
            b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1))
        });
        kept.truncate(k_aux);
    }
}
