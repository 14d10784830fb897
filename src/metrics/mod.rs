//! Metrics the training loop reports, below both `train` and `eval`: SAEBench core metrics on
//! held-out batches through a backend, and ground-truth recovery on synthetic data.

pub mod core;
pub mod recovery;
