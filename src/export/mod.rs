//! Checkpoint formats other tools read.

pub mod saelens;
