//! CUDA backend against the CPU reference (selection sets exactly; decode/backward/Adam and whole
//! training steps within tolerance).
//!
//! `cuda_matches_cpu` runs the kernels on the GPU; without a usable CUDA device it prints
//! "skipped: no CUDA device". `emulated_cuda_matches_cpu` runs the same checks with every kernel
//! compiled for the host and run by the emulator (src/backend/cuda/emulator.rs), everywhere.

use saetrain::backend::cuda;
use saetrain::backend::cuda::selftest::{run_selftest_on, Target};

#[test]
fn probe_never_panics() {
    // On a machine without CUDA this is an Err with a reason; with one, the device's name.
    match cuda::probe() {
        Ok(s) => println!("CUDA device: {s}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            println!("no CUDA: {msg}");
        }
    }
}

#[test]
fn cuda_matches_cpu() {
    if let Err(e) = cuda::probe() {
        println!("skipped: no CUDA device ({e})");
        return;
    }
    let report = cuda::selftest::run_selftest().expect("selftest could not run");
    println!("{report}");
    assert!(report.passed(), "CUDA backend differs from the CPU reference:\n{report}");
}

#[test]
fn emulated_cuda_matches_cpu() {
    let report = run_selftest_on(Target::Emulator).expect("emulated selftest could not run");
    println!("{report}");
    assert!(report.passed(), "emulated CUDA backend differs from the CPU reference:\n{report}");
    // Every selection rule, every kernel alone and the f32 whole-step configurations ran.
    assert!(report.checks.len() >= 150, "only {} checks ran", report.checks.len());
    // Every kernel has a check of its own at both sizes (the sel_* kernels through the
    // selection checks, which compare every Selection variant's kept set).
    for k in cuda::device::kernel_names() {
        let named = |c: &&cuda::selftest::Check| c.name.split_whitespace().any(|w| w == k);
        let n = report.checks.iter().filter(named).count();
        assert!(k.starts_with("sel_") || n >= 2, "kernel {k} has {n} parity checks, expected one per size set");
    }
}
