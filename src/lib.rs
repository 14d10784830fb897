//! saetrain: sparse autoencoders on language-model activations.
//!
//! `docs/SPEC.md` is the contract every backend follows.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod sparse;
pub mod sparsify;
pub mod sweep;
pub mod train;
pub mod util;
