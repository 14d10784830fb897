//! What each sparsifier is: the one table of its properties. Every question is an exhaustive
//! `match`, so a new variant does not compile until each one is answered for it (and
//! `cases::CASES` must then list it, or `every_trainable_kind_has_a_case` fails).

use super::aux::AuxKind;
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// Which selection rule turns `act = ReLU(pre)` into the sparse code (SPEC "Sparsifiers").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SparsifierKind {
    /// Per token, the k largest activations (Gao et al. 2024).
    Topk,
    /// The k*B largest activations of the whole batch (Bussmann et al. 2024).
    Batchtopk,
    /// Same selection as batchtopk; trained with aux_k + aux_zipf by default (Ayonrinde).
    #[value(alias = "mutual_choice")]
    #[serde(alias = "mutual-choice")]
    MutualChoice,
    /// Winner-takes-all / feature choice: per latent, the m_j largest of its B values.
    #[value(alias = "feature_choice", alias = "feature-choice")]
    #[serde(alias = "feature_choice")]
    Wta,
    /// Every positive activation, with an L1 penalty weighted by decoder norms.
    Relu,
    /// WTA first, then at most `k_max` survivors per token.
    Hybrid,
    /// Inference only: act > theta.
    Jumprelu,
}

/// The SAELens architecture a trained SAE is exported as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Per-token top-k at inference (`k` in `cfg.json`).
    TopK,
    /// `pre > threshold_i` with the EMA thresholds: the inference form of every batch-dependent
    /// rule.
    JumpRelu,
    /// Plain ReLU.
    Standard,
    /// JumpReLU, then at most k latents per token: hybrid's inference form. SAELens has no such
    /// architecture: it is written as `jumprelu` with `per_token_cap` beside it, which
    /// saetrain's loader applies and SAELens ignores (the export says so).
    JumpReluCapped,
}

impl Architecture {
    /// The `architecture` string of SAELens' `cfg.json`.
    pub fn saelens_name(self) -> &'static str {
        match self {
            Self::TopK => "topk",
            Self::JumpRelu | Self::JumpReluCapped => "jumprelu",
            Self::Standard => "standard",
        }
    }
}

impl SparsifierKind {
    /// Every kind, in report order.
    pub fn all() -> &'static [SparsifierKind] {
        Self::value_variants()
    }

    /// The config-file spelling (also accepted by the CLI).
    pub fn name(self) -> &'static str {
        match self {
            Self::Topk => "topk",
            Self::Batchtopk => "batchtopk",
            Self::MutualChoice => "mutual_choice",
            Self::Wta => "wta",
            Self::Relu => "relu",
            Self::Hybrid => "hybrid",
            Self::Jumprelu => "jumprelu",
        }
    }

    /// Whether `sae train` can train with it (jumprelu is only the inference form).
    pub fn trainable(self) -> bool {
        match self {
            Self::Topk | Self::Batchtopk | Self::MutualChoice | Self::Wta | Self::Relu | Self::Hybrid => true,
            Self::Jumprelu => false,
        }
    }

    /// Whether a token's code depends on the rest of its batch: at inference such a rule is
    /// replaced by JumpReLU with the EMA threshold.
    pub fn batch_dependent(self) -> bool {
        match self {
            Self::Batchtopk | Self::MutualChoice | Self::Wta | Self::Hybrid => true,
            Self::Topk | Self::Relu | Self::Jumprelu => false,
        }
    }

    /// Whether the rule selects per latent (a column of the batch) with budgets m_j.
    pub fn per_column(self) -> bool {
        match self {
            Self::Wta | Self::Hybrid => true,
            Self::Topk | Self::Batchtopk | Self::MutualChoice | Self::Relu | Self::Jumprelu => false,
        }
    }

    /// Whether `--k` is the rule's own budget (per token, or per token on average over the
    /// batch). Feature choice uses k too, but only through Zipf budgets (see `TrainConfig`).
    pub fn uses_k(self) -> bool {
        match self {
            Self::Topk | Self::Batchtopk | Self::MutualChoice => true,
            Self::Wta | Self::Relu | Self::Hybrid | Self::Jumprelu => false,
        }
    }

    /// Whether the loss carries the decoder-norm-weighted L1 penalty.
    pub fn has_l1(self) -> bool {
        match self {
            Self::Relu => true,
            Self::Topk | Self::Batchtopk | Self::MutualChoice | Self::Wta | Self::Hybrid | Self::Jumprelu => false,
        }
    }

    /// The aux losses trained with when `--aux` is not given, as each paper trains them: aux_k
    /// for topk (Gao et al.) and batchtopk (Bussmann et al.); aux_k + aux_zipf for mutual
    /// choice (the MC/FC paper's recommendation); none for feature choice (the WTA paper trains
    /// on MSE only, and a fixed budget per latent leaves no latent dead) and for relu.
    pub fn default_aux(self) -> &'static [AuxKind] {
        match self {
            Self::Relu | Self::Jumprelu | Self::Wta | Self::Hybrid => &[],
            Self::MutualChoice => &[AuxKind::AuxK, AuxKind::AuxZipf],
            Self::Topk | Self::Batchtopk => &[AuxKind::AuxK],
        }
    }

    /// What the exported checkpoint is.
    pub fn exported(self) -> Architecture {
        match self {
            Self::Topk => Architecture::TopK,
            Self::Batchtopk | Self::MutualChoice | Self::Wta | Self::Jumprelu => Architecture::JumpRelu,
            Self::Hybrid => Architecture::JumpReluCapped,
            Self::Relu => Architecture::Standard,
        }
    }
}
