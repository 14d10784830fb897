//! The one table of cases that the benches, the CUDA self-test and the tests iterate: every
//! training recipe (`CASES`) and an example of every `Selection` variant
//! (`selection_examples`). A new sparsifier or selection variant that is missing here fails a
//! test below.

use super::aux::AuxKind;
use super::budget::BudgetKind;
use super::kind::SparsifierKind;
use super::Selection;
use crate::config::TrainConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A training recipe: a sparsifier with the options that make it a distinct rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Case {
    /// Report name ("wta zipf").
    pub name: &'static str,
    pub kind: SparsifierKind,
    pub budget: BudgetKind,
}

impl Case {
    /// Set this case's options on `cfg` (everything else is left as it is).
    pub fn apply(&self, cfg: &mut TrainConfig) {
        cfg.sparsifier = self.kind;
        cfg.budget = self.budget;
    }

    /// `base` with this case applied.
    pub fn config(&self, base: &TrainConfig) -> TrainConfig {
        let mut c = base.clone();
        self.apply(&mut c);
        c
    }
}

const fn case(name: &'static str, kind: SparsifierKind) -> Case {
    Case { name, kind, budget: BudgetKind::Uniform }
}

/// Every training recipe, in report order.
pub const CASES: &[Case] = &[
    case("topk", SparsifierKind::Topk),
    case("batchtopk", SparsifierKind::Batchtopk),
    case("mutual_choice", SparsifierKind::MutualChoice),
    case("wta", SparsifierKind::Wta),
    Case { name: "wta zipf", kind: SparsifierKind::Wta, budget: BudgetKind::Zipf },
    case("hybrid", SparsifierKind::Hybrid),
    case("relu", SparsifierKind::Relu),
];

/// The cases of these kinds (all cases when `kinds` is empty).
pub fn cases_of(kinds: &[SparsifierKind]) -> Vec<Case> {
    CASES.iter().filter(|c| kinds.is_empty() || kinds.contains(&c.kind)).copied().collect()
}

/// The aux losses every sparsifier can be trained with, for tables that cross them.
pub const AUX_KINDS: &[AuxKind] = &[AuxKind::None, AuxKind::AuxK, AuxKind::AuxZipf];

/// The inputs the selection examples borrow: budgets, thresholds and aux candidates for a
/// matrix `cols` wide (budgets up to 11, so above a batch of 9).
pub struct SelectionInputs {
    pub m_uniform: Vec<usize>,
    pub m_varied: Vec<usize>,
    pub theta: Vec<f32>,
    pub candidates: Vec<u32>,
}

impl SelectionInputs {
    pub fn new(cols: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let m_varied = (0..cols).map(|_| rng.random_range(0..12)).collect();
        let theta = (0..cols).map(|_| rng.random_range(-0.5f32..1.0)).collect();
        Self {
            m_uniform: vec![5; cols],
            m_varied,
            theta,
            candidates: (0..cols as u32).filter(|i| i % 3 != 1).collect(),
        }
    }
}

/// Named examples covering every `Selection` variant and its edge cases (k = 0, k = F, budgets
/// above B, thresholds below 0) on a matrix `cols` wide.
pub fn selection_examples(inp: &SelectionInputs, cols: usize) -> Vec<(String, Selection<'_>)> {
    vec![
        ("topk k=7".into(), Selection::TopK { k: 7 }),
        ("topk k=0".into(), Selection::TopK { k: 0 }),
        ("topk k=F".into(), Selection::TopK { k: cols }),
        ("batchtopk k=7".into(), Selection::BatchTopK { k: 7 }),
        ("batchtopk k=F (keep all)".into(), Selection::BatchTopK { k: cols }),
        ("wta m=5".into(), Selection::Wta { m: &inp.m_uniform }),
        ("wta varied m".into(), Selection::Wta { m: &inp.m_varied }),
        ("wta above theta".into(), Selection::WtaAbove { m: &inp.m_varied, theta: &inp.theta }),
        ("hybrid m=5 k_max=4".into(), Selection::Hybrid { m: &inp.m_uniform, k_max: 4 }),
        ("relu".into(), Selection::Relu),
        ("jumprelu".into(), Selection::JumpRelu { theta: &inp.theta }),
        ("jumprelu cap 3".into(), Selection::JumpReluCap { theta: &inp.theta, k: 3 }),
        ("jumprelu cap 0".into(), Selection::JumpReluCap { theta: &inp.theta, k: 0 }),
        ("aux top-5 of candidates".into(), Selection::Aux { candidates: &inp.candidates, k: 5 }),
    ]
}

/// Which variant a selection is (an exhaustive match: a new variant must be numbered here,
/// and then `every_selection_variant_has_an_example` demands an example of it).
pub fn variant_index(s: &Selection) -> usize {
    match s {
        Selection::TopK { .. } => 0,
        Selection::BatchTopK { .. } => 1,
        Selection::Wta { .. } => 2,
        Selection::Hybrid { .. } => 3,
        Selection::Relu => 4,
        Selection::JumpRelu { .. } => 5,
        Selection::Aux { .. } => 6,
        Selection::JumpReluCap { .. } => 7,
        Selection::WtaAbove { .. } => 8,
    }
}
/// Number of `Selection` variants.
pub const SELECTION_VARIANTS: usize = 9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trainable_kind_has_a_case() {
        for &k in SparsifierKind::all() {
            assert_eq!(CASES.iter().any(|c| c.kind == k), k.trainable(), "{k:?}: trainable kinds need a case");
        }
        let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CASES.len(), "case names must be unique");
    }

    #[test]
    fn every_selection_variant_has_an_example() {
        let inp = SelectionInputs::new(10);
        let mut seen = [false; SELECTION_VARIANTS];
        for (_, s) in selection_examples(&inp, 10) {
            seen[variant_index(&s)] = true;
        }
        assert!(seen.iter().all(|&s| s), "missing selection examples: {seen:?}");
    }

    #[test]
    fn every_case_validates() {
        for c in CASES {
            let cfg = c.config(&TrainConfig::default());
            cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", c.name));
        }
    }
}
