//! Small shared helpers.

pub mod atomic;
pub mod context;
pub mod dirlock;
pub mod hugepage;
pub mod stats;
pub mod sweep;
