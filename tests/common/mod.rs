//! Code the integration tests share; a test binary that needs it declares `mod common;`.

// A test binary uses only part of what is here.
#![allow(dead_code)]

pub mod cli;
pub mod reference;
