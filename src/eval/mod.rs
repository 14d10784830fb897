//! Evaluation: reconstruction and weight metrics, and the `sae eval` driver with its report.
//! The metrics training reports as it goes (core metrics, ground-truth recovery) live in
//! [`crate::metrics`].

pub mod history;
pub mod mcs;
pub mod metrics;
pub mod report;
pub mod run;
pub mod zipf_fit;
