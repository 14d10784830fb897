//! From a training config to this batch's `Selection`: the one place that knows which rule,
//! which budgets and which aux candidates a config means. Both backends call these, so they
//! cannot disagree about what a sparsifier does.

use super::aux::{self, AuxKind, CandidateRule};
use super::budget::{self, BudgetKind};
use super::kind::SparsifierKind;
use super::Selection;
use crate::config::TrainConfig;

/// Per-latent budgets m_j at batch size `rows` (empty for rules without budgets).
pub fn budgets(cfg: &TrainConfig, density: &[f32], rows: usize) -> Vec<usize> {
    if !cfg.sparsifier.per_column() {
        return vec![];
    }
    match cfg.budget {
        BudgetKind::Uniform => vec![cfg.wta_m(rows); cfg.d_sae],
        BudgetKind::Zipf => {
            budget::zipf_budgets(density, rows, cfg.k, cfg.zipf_alpha, cfg.zipf_beta, cfg.m_max_for(rows))
        }
    }
}

/// The training rule of `cfg`, with budgets `m` (from [`budgets`]) and thresholds `theta`.
pub fn training<'a>(cfg: &TrainConfig, m: &'a [usize], theta: &'a [f32]) -> Selection<'a> {
    match cfg.sparsifier {
        SparsifierKind::Topk => Selection::TopK { k: cfg.k },
        SparsifierKind::Batchtopk | SparsifierKind::MutualChoice => Selection::BatchTopK { k: cfg.k },
        SparsifierKind::Wta => Selection::Wta { m },
        SparsifierKind::Hybrid => Selection::Hybrid { m, k_max: cfg.hybrid_k_max() },
        SparsifierKind::Relu => Selection::Relu,
        SparsifierKind::Jumprelu => Selection::JumpRelu { theta },
    }
}

/// The rule of the exported SAE: JumpReLU(theta) for batch-dependent rules, else the training
/// rule.
pub fn exported<'a>(cfg: &TrainConfig, m: &'a [usize], theta: &'a [f32]) -> Selection<'a> {
    if cfg.sparsifier.batch_dependent() {
        Selection::JumpRelu { theta }
    } else {
        training(cfg, m, theta)
    }
}

/// The aux-candidate rule of `cfg`.
pub fn candidate_rule(cfg: &TrainConfig) -> CandidateRule {
    CandidateRule {
        kind: cfg.aux_kind(),
        dead_window: cfg.dead_window_tokens(),
        k: cfg.k,
        zipf_alpha: cfg.zipf_alpha,
        zipf_beta: cfg.zipf_beta,
        density_decay: cfg.density_decay,
    }
}

/// Latents eligible for the aux loss at step `step` (0 = before the first update), ascending.
pub fn aux_candidates(cfg: &TrainConfig, step: u64, since_fired: &[u64], density: &[f32], rows: usize) -> Vec<u32> {
    if cfg.aux_kind() == AuxKind::None {
        return vec![];
    }
    aux::candidates(&candidate_rule(cfg), step, since_fired, density, rows)
}

/// The aux selection over `candidates` for inputs of width `d_in`.
pub fn aux<'a>(cfg: &TrainConfig, candidates: &'a [u32], d_in: usize) -> Selection<'a> {
    Selection::Aux { candidates, k: cfg.k_aux_for(d_in) }
}
