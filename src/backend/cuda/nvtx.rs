//! NVTX ranges (encode, select, decode, backward, step, data) for Nsight Systems. libnvToolsExt is
//! loaded at run time; when it is absent (the usual case outside a CUDA toolkit install) every
//! range is a no-op. Set SAETRAIN_NVTX=0 to disable even when present.

use std::ffi::CString;
use std::sync::OnceLock;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("SAETRAIN_NVTX").is_ok_and(|v| v == "0") {
            return false;
        }
        super::guarded(|| Ok(unsafe { cudarc::nvtx::sys::is_culib_present() })).unwrap_or(false)
    })
}

/// A pushed range, popped on drop.
pub struct Range {
    active: bool,
}

/// Push a named range (no-op without libnvToolsExt).
pub fn range(name: &str) -> Range {
    if !enabled() {
        return Range { active: false };
    }
    let c = CString::new(name).unwrap_or_default();
    unsafe { cudarc::nvtx::sys::nvtxRangePushA(c.as_ptr()) };
    Range { active: true }
}

impl Drop for Range {
    fn drop(&mut self) {
        if self.active {
            unsafe { cudarc::nvtx::sys::nvtxRangePop() };
        }
    }
}
