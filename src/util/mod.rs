//! Small shared helpers.

pub mod atomic;
