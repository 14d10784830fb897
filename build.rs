//! Build script: embeds the CUDA kernel sources (always, for NVRTC at run time) and, when an nvcc
//! is found, compiles them ahead of time into one fatbin (SASS for sm_80/86/89/90 + compute_90
//! PTX) and sets `cfg(saetrain_fatbin)`. nvcc is looked up in $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin
//! and PATH; without one the build continues with a warning (NVRTC compiles at run time then).
//! A kernel that does not compile fails the build. ptxas register/spill lines are written to
//! $OUT_DIR/ptxas.txt and copied to target/ptxas-report.txt.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: &[&str] = &["80", "86", "89", "90"];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(saetrain_fatbin)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");

    let mut cu: Vec<PathBuf> = fs::read_dir(&kdir)
        .expect("kernels/ directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cu.sort();
    for p in &cu {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let common = kdir.join("common.cuh");
    println!("cargo:rerun-if-changed={}", common.display());

    // Rust module with the embedded sources (and the fatbin when built).
    let mut rs = String::new();
    writeln!(rs, "/// kernels/common.cuh").unwrap();
    writeln!(rs, "pub const COMMON: &str = include_str!({:?});", common.display().to_string()).unwrap();
    writeln!(rs, "/// Every kernels/*.cu as (file name, text).").unwrap();
    writeln!(rs, "pub const SOURCES: &[(&str, &str)] = &[").unwrap();
    for p in &cu {
        let name = p.file_name().unwrap().to_string_lossy();
        writeln!(rs, "    ({name:?}, include_str!({:?})),", p.display().to_string()).unwrap();
    }
    writeln!(rs, "];").unwrap();

    match find_nvcc() {
        Some(nvcc) => {
            let fatbin = out.join("saetrain_kernels.fatbin");
            compile_fatbin(&nvcc, &kdir, &cu, &out, &fatbin);
            writeln!(rs, "/// All kernels, compiled by {} at build time.", nvcc.display()).unwrap();
            writeln!(rs, "pub const FATBIN: Option<&[u8]> = Some(include_bytes!({:?}));", fatbin.display().to_string())
                .unwrap();
            println!("cargo:rustc-cfg=saetrain_fatbin");
        }
        None => {
            println!(
                "cargo:warning=nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH): CUDA kernels will be \
                 compiled at run time by NVRTC (scripts/install-nvcc.sh installs nvcc from PyPI)"
            );
            writeln!(rs, "pub const FATBIN: Option<&[u8]> = None;").unwrap();
        }
    }
    fs::write(out.join("kernels.rs"), rs).unwrap();
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} is not a file; looking elsewhere", p.display());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = env::var_os(var) {
            let p = PathBuf::from(h).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|path| env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()))
}

fn compile_fatbin(nvcc: &Path, kdir: &Path, cu: &[PathBuf], out: &Path, fatbin: &Path) {
    // One translation unit that includes every family (common.cuh has #pragma once).
    let all = out.join("saetrain_all.cu");
    let mut text = String::new();
    for p in cu {
        writeln!(text, "#include \"{}\"", p.display()).unwrap();
    }
    fs::write(&all, text).unwrap();

    let mut cmd = Command::new(nvcc);
    cmd.arg("--fatbin").arg("-O3").arg("-std=c++17").arg("-lineinfo").arg("-I").arg(kdir);
    for a in ARCHS {
        cmd.arg(format!("-gencode=arch=compute_{a},code=sm_{a}"));
    }
    cmd.arg("-gencode=arch=compute_90,code=compute_90");
    cmd.arg("-Xptxas").arg("-v");
    if let Some(cc) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(cc);
    }
    cmd.arg("-o").arg(fatbin).arg(&all);
    let res = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let stderr = String::from_utf8_lossy(&res.stderr);
    let stdout = String::from_utf8_lossy(&res.stdout);
    if !res.status.success() {
        panic!("nvcc failed to compile the CUDA kernels ({:?}):\n{stdout}\n{stderr}", cmd);
    }
    let report: String = stderr.lines().filter(|l| l.starts_with("ptxas")).map(|l| format!("{l}\n")).collect();
    fs::write(out.join("ptxas.txt"), &report).unwrap();
    // OUT_DIR = <target>/<profile>/build/<pkg>-<hash>/out
    if let Some(target) = out.ancestors().nth(4) {
        let _ = fs::write(target.join("ptxas-report.txt"), &report);
    }
    let spills = report.lines().filter(|l| l.contains("spill") && !l.contains(" 0 bytes spill stores")).count();
    if spills > 0 {
        println!("cargo:warning=ptxas reports register spills in {spills} kernel(s): see target/ptxas-report.txt");
    }
}
