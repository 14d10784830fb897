//! Evaluation: the `sae eval` driver with its report, history, Zipf fit and cross-run MCS. The
//! metrics themselves (reconstruction, weights, ground-truth recovery), shared with the training
//! loop, live in [`crate::metrics`].

pub mod history;
pub mod mcs;
pub mod out_dir;
pub mod report;
pub mod run;
pub mod zipf_fit;
