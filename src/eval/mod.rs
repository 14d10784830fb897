//! Evaluation: SAEBench core metrics on held-out batches, ground-truth recovery, weight
//! metrics, and the `sae eval` driver with its report.

pub mod core;
pub mod metrics;
pub mod recovery;
pub mod report;
pub mod run;
