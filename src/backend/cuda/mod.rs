//! CUDA backend (issue 4). Until it lands, `probe` reports that none is built.

use crate::backend::Backend;
use crate::config::TrainConfig;
use crate::model::TrainState;
use anyhow::{bail, Result};

/// Is a CUDA device usable? Err says why not, without panicking.
pub fn probe() -> Result<String> {
    bail!("no CUDA backend in this build")
}

pub fn create(_cfg: &TrainConfig, _state: TrainState) -> Result<Box<dyn Backend>> {
    bail!("no CUDA backend in this build")
}
