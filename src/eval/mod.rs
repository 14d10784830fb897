//! Evaluation: SAEBench core metrics on held-out batches and ground-truth recovery.

pub mod core;
pub mod recovery;
