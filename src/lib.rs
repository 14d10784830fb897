//! saetrain: sparse autoencoders on language-model activations.
//!
//! `../shared/SPEC.md` (copied to `docs/SPEC.md`) is the contract every backend follows.

pub mod backend;
pub mod config;
pub mod data;
pub mod model;
pub mod sparse;
pub mod sparsify;
