//! The backend boundary. A backend owns the parameters, the optimiser state and everything a
//! training step touches; the training loop hands it batches and a learning rate and reads back
//! statistics, never raw buffers.

pub mod cpu;
pub mod cuda;
pub mod tracking;

use crate::config::{BackendChoice, TrainConfig};
use crate::data::Batch;
use crate::model::TrainState;
use crate::sparse::SparseCodes;
use anyhow::{bail, Result};
use serde::Serialize;

/// What one training step measured on its batch.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct StepStats {
    /// Total loss L = L_rec + L_aux (+ L1).
    pub loss: f64,
    /// (1/B) sum_b ||x_b - x_hat_b||^2
    pub rec_loss: f64,
    pub aux_loss: f64,
    pub l1_loss: f64,
    /// Mean nonzeros per token.
    pub l0: f64,
    /// mean_b ||x_b - x_hat_b||^2 / d
    pub mse: f64,
    /// 1 - NMSE on this batch.
    pub ev: f64,
    /// Latents that have not fired for `dead_window` tokens (before this step's update).
    pub dead: usize,
}

impl StepStats {
    /// From the step's sums: `sse = sum ||x - x_hat||^2`, `total_var = sum ||x - mean||^2`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_sums(
        sse: f64,
        total_var: f64,
        aux_loss: f64,
        l1_loss: f64,
        nnz: usize,
        rows: usize,
        d: usize,
        dead: usize,
    ) -> Self {
        let rec_loss = sse / rows as f64;
        Self {
            loss: rec_loss + aux_loss + l1_loss,
            rec_loss,
            aux_loss,
            l1_loss,
            l0: nnz as f64 / rows as f64,
            mse: rec_loss / d as f64,
            // Undefined without variance to explain (SPEC "Metrics"): NaN, written as null.
            ev: if total_var > 0.0 { 1.0 - sse / total_var } else { f64::NAN },
            dead,
        }
    }
}

/// How codes are chosen at inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InferMode {
    /// The training sparsifier on this batch (batch-dependent ones see this batch).
    Training,
    /// The exported sparsifier: JumpReLU(theta) for batch-dependent sparsifiers, else the training one.
    Exported,
}

/// Codes and reconstruction for one batch, without any update.
pub struct Inference {
    pub codes: SparseCodes,
    /// B x d reconstruction.
    pub x_hat: Vec<f32>,
}

pub trait Backend {
    /// e.g. "cpu (2 threads)" or "cuda: NVIDIA H100 80GB HBM3 (sm_90)".
    fn name(&self) -> String;
    /// One optimiser step on `batch` at learning rate `lr`.
    fn step(&mut self, batch: &Batch, lr: f32) -> Result<StepStats>;
    /// Encode and decode `batch` with the current parameters.
    fn infer(&mut self, batch: &Batch, mode: InferMode) -> Result<Inference>;
    /// A host copy of the full training state (for checkpoints and exports).
    fn state(&self) -> Result<TrainState>;
    /// Replace the inference thresholds (calibration at the end of training).
    fn set_thresholds(&mut self, theta: &[f32], theta_set: &[bool]) -> Result<()>;
    /// Seconds spent per phase since the last call (and reset), for `sae bench step`.
    fn take_phase_times(&mut self) -> PhaseTimes {
        PhaseTimes::default()
    }
}

/// Wall time per phase of the training step, summed over steps.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct PhaseTimes {
    pub encode: f64,
    pub select: f64,
    pub decode: f64,
    pub backward: f64,
    pub optimizer: f64,
}

impl PhaseTimes {
    pub fn total(&self) -> f64 {
        self.encode + self.select + self.decode + self.backward + self.optimizer
    }

    pub fn add(&mut self, o: &PhaseTimes) {
        self.encode += o.encode;
        self.select += o.select;
        self.decode += o.decode;
        self.backward += o.backward;
        self.optimizer += o.optimizer;
    }
}

/// The backend a run will use, decided before the data is opened (so the data can be read in the
/// precision the backend takes) and built once the training state exists: [`choose`], then
/// [`Chosen::create`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    kind: Kind,
    /// Why this backend, the parenthesis of the "backend: ..." sentence.
    reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Cpu,
    Cuda,
    CudaEmulator,
}

/// Resolve the backend the config asks for; `auto` picks CUDA when a device is usable. CUDA is
/// probed at most once, here; `--backend cuda` without a usable device is an error.
pub fn choose(cfg: &TrainConfig) -> Result<Chosen> {
    let (kind, reason) = match cfg.backend {
        BackendChoice::Cpu => (Kind::Cpu, "requested".to_string()),
        BackendChoice::Cuda => match cuda::probe() {
            Ok(_) => (Kind::Cuda, "requested".to_string()),
            Err(e) => bail!("--backend cuda: no usable CUDA device: {e}"),
        },
        BackendChoice::CudaEmulator => {
            (Kind::CudaEmulator, "requested; for checking only: every CUDA thread is a fiber".to_string())
        }
        BackendChoice::Auto => match cuda::probe() {
            Ok(_) => (Kind::Cuda, "auto: CUDA device found".to_string()),
            Err(e) => (Kind::Cpu, format!("auto: {e}")),
        },
    };
    Ok(Chosen { kind, reason })
}

impl Chosen {
    /// Whether the run's step runs on the CPU (its batch buffers in host memory).
    pub fn is_cpu(&self) -> bool {
        self.kind == Kind::Cpu
    }

    /// Whether the backend takes half-precision batches as they were read: the CUDA backend
    /// uploads half-precision shards as they are and converts on the device; the CPU trains on f32.
    pub fn wants_half_input(&self) -> bool {
        matches!(self.kind, Kind::Cuda | Kind::CudaEmulator)
    }

    /// Build the chosen backend on `state`. Returns the backend and a sentence saying what was
    /// chosen and why, e.g. "backend: cpu (2 threads) (requested)".
    pub fn create(self, cfg: &TrainConfig, state: TrainState) -> Result<(Box<dyn Backend>, String)> {
        let b: Box<dyn Backend> = match self.kind {
            Kind::Cpu => Box::new(cpu::CpuBackend::new(cfg.clone(), state)?),
            Kind::Cuda => cuda::create(cfg, state)?,
            Kind::CudaEmulator => {
                let dev = cuda::device::Dev::open_emulator()?;
                Box::new(cuda::backend::CudaBackend::on(dev, cfg.clone(), state)?)
            }
        };
        let why = format!("backend: {} ({})", b.name(), self.reason);
        Ok((b, why))
    }
}
