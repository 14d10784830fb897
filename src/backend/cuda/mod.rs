//! CUDA backend (issue 4): hand-written kernels (kernels/*.cu) plus cuBLAS for the one dense
//! product, matching the CPU reference backend's selection exactly and its arithmetic within
//! floating-point tolerance. See docs/cuda.md.
//!
//! Nothing here links CUDA: the driver, cuBLAS, NVRTC and NVTX are loaded at run time, and every
//! entry point first checks that the library exists (cudarc panics otherwise) with a
//! `catch_unwind` as a second guard, so a machine without CUDA gets an `Err`, never a panic.

pub mod backend;
pub mod device;
pub mod emulator;
pub mod launch;
pub mod memory;
pub mod nvtx;
pub mod selftest;

use crate::backend::Backend;
use crate::config::TrainConfig;
use crate::model::TrainState;
use anyhow::{anyhow, bail, Result};

/// The embedded kernel sources (always) and the build-time fatbin (when nvcc was found).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether this build carries a fatbin compiled by nvcc.
pub const HAS_FATBIN: bool = cfg!(saetrain_fatbin);

fn guarded<T>(f: impl FnOnce() -> Result<T> + std::panic::UnwindSafe) -> Result<T> {
    // Silence the default panic message while probing: a panic here is an answer, not a bug.
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(f);
    std::panic::set_hook(prev);
    r.unwrap_or_else(|_| Err(anyhow!("a CUDA library failed to load (panic while probing)")))
}

/// Is libcuda loadable?
pub fn driver_present() -> bool {
    guarded(|| Ok(unsafe { cudarc::driver::sys::is_culib_present() })).unwrap_or(false)
}

/// Is libnvrtc loadable?
pub fn nvrtc_present() -> bool {
    guarded(|| Ok(unsafe { cudarc::nvrtc::sys::is_culib_present() })).unwrap_or(false)
}

/// Is libcublas (and libcublasLt, which it loads) loadable?
pub fn cublas_present() -> bool {
    guarded(|| Ok(unsafe { cudarc::cublas::sys::is_culib_present() && cudarc::cublaslt::sys::is_culib_present() }))
        .unwrap_or(false)
}

/// Is a CUDA device usable? Err says why not, without panicking.
pub fn probe() -> Result<String> {
    if !driver_present() {
        bail!("no CUDA driver (libcuda) found");
    }
    guarded(|| {
        use cudarc::driver::{result, sys};
        result::init().map_err(|e| anyhow!("CUDA driver present but cuInit failed: {e:?}"))?;
        let n = result::device::get_count().map_err(|e| anyhow!("cuDeviceGetCount failed: {e:?}"))?;
        if n < 1 {
            bail!("CUDA driver found but no CUDA device");
        }
        let dev = result::device::get(0).map_err(|e| anyhow!("{e:?}"))?;
        let name = result::device::get_name(dev).map_err(|e| anyhow!("{e:?}"))?;
        let attr = |a| unsafe { result::device::get_attribute(dev, a) };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).unwrap_or(0);
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).unwrap_or(0);
        if major < 8 {
            bail!("{name} is sm_{major}{minor}; the kernels need sm_80 or newer");
        }
        if !HAS_FATBIN && !nvrtc_present() {
            bail!("{name} found, but this build has no fatbin (no nvcc at build time) and libnvrtc is not loadable");
        }
        Ok(format!("{name} (sm_{major}{minor}), {n} device(s)"))
    })
}

pub fn create(cfg: &TrainConfig, state: TrainState) -> Result<Box<dyn Backend>> {
    probe()?;
    Ok(Box::new(backend::CudaBackend::new(cfg.clone(), state)?))
}
