//! Code the integration tests share; a test binary that needs it declares `mod common;`.

// A test binary uses only part of what is here.
#![allow(dead_code)]

pub mod cli;
pub mod reference;

/// A TopK SAE (k 4) of d_in `d` and `f` latents with every weight `w` and zero biases: a large
/// checkpoint cheaply (the export-signal test), or one whose outputs overflow (`w` near f32::MAX).
pub fn constant_topk_sae(d: usize, f: usize, w: f32) -> saetrain::export::ExportedSae {
    saetrain::export::ExportedSae {
        d_in: d,
        d_sae: f,
        w_enc: vec![w; f * d],
        b_enc: vec![0.0; f],
        w_dec: vec![w; f * d],
        b_dec: vec![0.0; d],
        threshold: None,
        architecture: "topk".into(),
        k: Some(4),
        per_token_cap: None,
        norm: saetrain::export::saelens::RunTimeNorm::None,
    }
}
