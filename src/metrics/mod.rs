//! Metrics of an SAE, below both `train` and `eval`: the SAEBench core metrics accumulated batch
//! by batch (`recon`, the one definition both the training loop's held-out evaluation and
//! `sae eval` use), their summary through a backend (`core`), the weight-only metrics, and
//! ground-truth recovery on synthetic data.

pub mod core;
pub mod recon;
pub mod recovery;
