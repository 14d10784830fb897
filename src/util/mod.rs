//! Small shared helpers.

pub mod atomic;
pub mod context;
pub mod dirlock;
pub mod hugepage;
pub mod json;
pub mod jsonl;
pub mod paths;
pub mod stats;
pub mod sweep;
