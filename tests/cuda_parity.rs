//! CUDA backend against the CPU reference (selection sets exactly; decode/backward/Adam and whole
//! training steps within tolerance). Without a usable CUDA device: "skipped: no CUDA device".

use saetrain::backend::cuda;

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
