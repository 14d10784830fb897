//! Every embedded kernel source compiles under NVRTC (the run-time fallback when no fatbin fits
//! the device). Needs libnvrtc, not a GPU: it is taken from the process's library path, or from
//! $NVRTC_LIB_DIR / target/nvcc-venv (scripts/install-nvcc.sh), in which case the test re-runs
//! itself with LD_LIBRARY_PATH pointing there (the dynamic loader reads it only at start-up).
//! Without libnvrtc it prints "skipped: libnvrtc not found" and passes.

use saetrain::backend::cuda::{self, device};
use std::path::{Path, PathBuf};

const REEXEC: &str = "SAETRAIN_NVRTC_TEST_REEXEC";

fn find_lib_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("NVRTC_LIB_DIR") {
        let d = PathBuf::from(d);
        if d.join("libnvrtc.so.13").exists() {
            return Some(d);
        }
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nvcc-venv");
    find_file(&venv, "libnvrtc.so.13", 8).and_then(|p| p.parent().map(Path::to_path_buf))
}

fn find_file(dir: &Path, name: &str, depth: usize) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
        if p.is_dir() {
            if let Some(found) = find_file(&p, name, depth - 1) {
                return Some(found);
            }
        }
    }
    None
}

#[test]
fn kernel_names_are_found() {
    let names = device::kernel_names();
    for must in [
        "sel_line_radix",
        "sel_mask_fill",
        "decode_rows",
        "code_grads",
        "latent_grads",
        "adam_dec_rows",
        "gemm_encode_fused",
    ] {
        assert!(names.iter().any(|n| n == must), "{must} missing from {names:?}");
    }
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "duplicate kernel names");
    assert_eq!(cuda::HAS_FATBIN, cuda::kernels::FATBIN.is_some());
}

#[test]
fn nvrtc_compiles_all_kernels() {
    if !cuda::nvrtc_present() {
        match find_lib_dir() {
            Some(dir) if std::env::var_os(REEXEC).is_none() => {
                let mut path = dir.into_os_string();
                if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                    path.push(":");
                    path.push(old);
                }
                let status = std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "nvrtc_compiles_all_kernels", "--nocapture", "--test-threads=1"])
                    .env("LD_LIBRARY_PATH", path)
                    .env(REEXEC, "1")
                    .status()
                    .expect("re-run the test binary");
                assert!(status.success(), "NVRTC compile test failed (re-run with LD_LIBRARY_PATH)");
                return;
            }
            _ => {
                println!("skipped: libnvrtc not found");
                return;
            }
        }
    }
    let names = device::kernel_names();
    for arch in ["compute_80", "compute_90"] {
        let t = std::time::Instant::now();
        let ptx = device::compile_nvrtc(arch).unwrap_or_else(|e| panic!("{e:#}"));
        let text = ptx.to_src();
        for n in &names {
            assert!(text.contains(&format!(".entry {n}(")), "{n} missing from the {arch} PTX");
        }
        println!("NVRTC {arch}: {} kernels, {} bytes of PTX in {:.2?}", names.len(), text.len(), t.elapsed());
    }
}
