//! From a training config to this batch's `Selection`: the one place that knows which rule,
//! which budgets and which aux candidates a config means. Both backends call these, so they
//! cannot disagree about what a sparsifier does.

use super::aux::{self, AuxKind, CandidateRule};
use super::budget::{self, BudgetKind, ZipfRounding};
use super::kind::{Architecture, SparsifierKind};
use super::Selection;
use crate::config::TrainConfig;

/// Per-latent budgets m_j at batch size `rows` for step `step` (0-based; systematic Zipf
/// rounding draws its offset from the seed and the step), empty for rules without budgets.
pub fn budgets(cfg: &TrainConfig, density: &[f32], rows: usize, step: u64) -> Vec<usize> {
    if !cfg.sparsifier.per_column() {
        return vec![];
    }
    let (k, a, b, m_max) = (cfg.k, cfg.zipf_alpha, cfg.zipf_beta, cfg.m_max_for(rows));
    match (cfg.budget, cfg.zipf_rounding) {
        (BudgetKind::Uniform, _) => vec![cfg.wta_m(rows); cfg.d_sae],
        (BudgetKind::Zipf, ZipfRounding::Floor) => budget::zipf_budgets(density, rows, k, a, b, m_max),
        (BudgetKind::Zipf, ZipfRounding::Systematic) => {
            let u = budget::rounding_offset(cfg.seed, step);
            budget::zipf_budgets_exact(density, rows, k, a, b, m_max, u)
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

/// Whether step `step` (0-based) is in feature choice's theta phase: the first
/// `--wta-theta-steps` steps after the thresholds have their first measurement.
pub fn in_theta_phase(cfg: &TrainConfig, step: u64) -> bool {
    let start = cfg.threshold_start_step();
    cfg.sparsifier == SparsifierKind::Wta
        && cfg.wta_theta_steps > 0
        && step > start
        && step <= start + cfg.wta_theta_steps
}

/// The rule a training step uses: the training rule, except in feature choice's theta phase,
/// where only entries above their latent's threshold (`filter`, from `threshold::prefilter`)
/// compete for the budgets.
pub fn step_rule<'a>(
    cfg: &TrainConfig,
    m: &'a [usize],
    theta: &'a [f32],
    filter: &'a [f32],
    step: u64,
) -> Selection<'a> {
    if in_theta_phase(cfg, step) {
        Selection::WtaAbove { m, theta: filter }
    } else {
        training(cfg, m, theta)
    }
}

/// The rule of the exported SAE: JumpReLU(theta) for batch-dependent rules (hybrid keeping its
/// per-token cap after the thresholds), else the training rule. `theta` is the exported form
/// (`threshold::exported`).
pub fn exported<'a>(cfg: &TrainConfig, m: &'a [usize], theta: &'a [f32]) -> Selection<'a> {
    match cfg.sparsifier.exported() {
        Architecture::JumpRelu => Selection::JumpRelu { theta },
        Architecture::JumpReluCapped => Selection::JumpReluCap { theta, k: cfg.hybrid_k_max() },
        Architecture::TopK | Architecture::Standard => training(cfg, m, theta),
    }
}

/// The candidate rule of the aux loss `kind` under `cfg`.
pub fn candidate_rule(cfg: &TrainConfig, kind: AuxKind) -> CandidateRule {
    CandidateRule {
        kind,
        dead_window: cfg.dead_window_tokens(),
        k: cfg.k,
        zipf_alpha: cfg.zipf_alpha,
        zipf_beta: cfg.zipf_beta,
        density_decay: cfg.density_decay,
        density_inherited: cfg.init_from.is_some(),
    }
}

/// Per aux loss in force, the latents eligible for it at step `step` (0 = the first), ascending,
/// from the dead counters and densities of the steps before (`since_fired`, `density`) with this
/// batch's main codes counted in (`counts`: tokens each latent fired on of the `rows`). So a
/// latent that fires in this batch is not dead in it, and a latent becomes dead in the batch
/// that makes its window, as Gao et al.'s code has it ("has to go after stats update!",
/// openai/sparse_autoencoder train.py; dictionary_learning and BatchTopK do the same). Losses
/// without candidates at this step are left out.
pub fn aux_candidates(
    cfg: &TrainConfig,
    step: u64,
    since_fired: &[u64],
    density: &[f32],
    counts: &[u32],
    rows: usize,
) -> Vec<(AuxKind, Vec<u32>)> {
    let kinds = cfg.aux_kinds();
    if kinds.is_empty() {
        return vec![];
    }
    let (since, density) = crate::backend::tracking::counted(cfg, since_fired, density, counts, rows);
    kinds
        .into_iter()
        .map(|kind| (kind, aux::candidates(&candidate_rule(cfg, kind), step + 1, &since, &density, rows)))
        .filter(|(_, c)| !c.is_empty())
        .collect()
}

/// The aux selection over `candidates` for inputs of width `d_in`.
pub fn aux<'a>(cfg: &TrainConfig, candidates: &'a [u32], d_in: usize) -> Selection<'a> {
    Selection::Aux { candidates, k: cfg.k_aux_for(d_in) }
}
