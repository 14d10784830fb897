//! Checkpoint formats other tools read, loading them back, and CPU inference with them.

pub mod dictionary_learning;
pub mod eleuther;
pub mod infer;
pub mod load;
pub mod saelens;
pub mod torch_pt;

pub use load::{load_sae, Layout};
pub use saelens::ExportedSae;
