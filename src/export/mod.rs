//! Checkpoint formats other tools read, loading them back, and CPU inference with them.

pub mod infer;
pub mod load;
pub mod saelens;
pub mod sparsify;

pub use load::{load_sae, Layout};
pub use saelens::ExportedSae;
