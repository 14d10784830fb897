//! The host emulator of the CUDA kernels (emulator/*.cpp, built by build.rs from the same
//! kernels/*.cu text that nvcc and NVRTC compile).
//!
//! It exists so that the whole CUDA backend — every kernel and the host code that sizes, orders
//! and launches them — runs against the CPU oracle on machines without a GPU, CI included
//! (`sae selftest --emulator`, tests/cuda_parity.rs). Each CUDA thread is a fiber; blocks run
//! one after another, in a shuffled order (a GPU gives none); shuffles and `__syncthreads` are
//! real barriers, so a barrier in divergent code, a shuffle after lanes exited, or a launch whose
//! argument widths do not match the kernel's parameters is reported as an error. "Device" memory
//! is host memory with a PROT_NONE page right after each buffer, so a kernel writing or reading
//! past the end of a buffer stops with the kernel, block and thread named.
//!
//! It does not model blocks running at the same time (so no inter-block races), the memory
//! model, timing, or the rounding of nvcc's fused multiply-adds: a GPU run remains the final
//! word (docs/cuda.md).

use super::device::KArg;
use super::launch::Launch;
use anyhow::{bail, Result};
use std::ffi::{c_char, c_void, CString};

extern "C" {
    fn saetrain_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        params: *mut *mut c_void,
        sizes: *const u32,
        nparams: u32,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Run one kernel launch on the host. Blocks until it finishes, like a synchronised launch.
pub fn launch(name: &str, l: Launch, args: &[KArg]) -> Result<()> {
    let mut vals: Vec<KArg> = args.to_vec();
    let mut sizes = Vec::with_capacity(vals.len());
    let mut ptrs: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|a| match a {
            KArg::Ptr(v) | KArg::U64(v) => {
                sizes.push(8u32);
                v as *mut u64 as *mut c_void
            }
            KArg::U32(v) => {
                sizes.push(4);
                v as *mut u32 as *mut c_void
            }
            KArg::I32(v) => {
                sizes.push(4);
                v as *mut i32 as *mut c_void
            }
            KArg::F32(v) => {
                sizes.push(4);
                v as *mut f32 as *mut c_void
            }
        })
        .collect();
    let cname = CString::new(name)?;
    let grid = [l.grid.0, l.grid.1, l.grid.2];
    let block = [l.block.0, l.block.1, l.block.2];
    let mut err = vec![0u8; 1024];
    let rc = unsafe {
        saetrain_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            ptrs.as_mut_ptr(),
            sizes.as_ptr(),
            sizes.len() as u32,
            err.as_mut_ptr() as *mut c_char,
            err.len(),
        )
    };
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        bail!("emulated launch {l:?}: {}", String::from_utf8_lossy(&err[..end]));
    }
    Ok(())
}

/// Emulated device memory: `bytes` bytes ending 0-7 bytes before a PROT_NONE page, so that an
/// access past the end faults (the emulator's fault handler names the kernel).
pub struct HostMem {
    base: *mut c_void,
    len: usize,
    ptr: u64,
}

// The mapping is owned and only reached through `ptr` by one launch at a time.
unsafe impl Send for HostMem {}
unsafe impl Sync for HostMem {}

impl HostMem {
    pub fn new(bytes: usize) -> Result<Self> {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // 8-byte alignment keeps doubles and u64 aligned; f32/u32 buffers of odd length can
        // overrun by 4 bytes unnoticed.
        let body = bytes.div_ceil(8) * 8;
        let data_pages = body.div_ceil(page).max(1);
        let len = (data_pages + 1) * page;
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!("emulator: cannot map {bytes} bytes of host memory");
        }
        let guard = unsafe { (base as *mut u8).add(data_pages * page) };
        if unsafe { libc::mprotect(guard as *mut c_void, page, libc::PROT_NONE) } != 0 {
            unsafe { libc::munmap(base, len) };
            bail!("emulator: cannot protect a guard page");
        }
        let ptr = guard as u64 - body as u64;
        Ok(Self { base, len, ptr })
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::Dev;
    use super::super::launch as L;

    #[test]
    fn elementwise_kernel_runs() {
        let dev = Dev::open_emulator().unwrap();
        let x: Vec<f32> = (0..300).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..7).map(|i| 0.5 * i as f32).collect();
        let (xd, bd) = (dev.upload(&x).unwrap(), dev.upload(&b).unwrap());
        let out = dev.alloc_f32(300).unwrap();
        dev.launch(
            "center",
            L::elementwise(300),
            &[(&xd).into(), (&bd).into(), (&out).into(), 7u32.into(), 300u64.into()],
        )
        .unwrap();
        let got: Vec<f32> = out.to_vec(300).unwrap();
        for (i, g) in got.iter().enumerate() {
            assert_eq!(*g, x[i] - b[i % 7]);
        }
    }

    /// Blocks run in no fixed order (as on a GPU), so a kernel that depends on block order fails
    /// its parity test: csc_fill, one block per token with one entry each in latent 0, records the
    /// order in which the blocks took their slot.
    #[test]
    fn blocks_run_in_a_shuffled_order() {
        let dev = Dev::open_emulator().unwrap();
        let rows = 50u32;
        let row_ptr: Vec<u32> = (0..=rows).collect();
        let (rp, idx, cp) = (
            dev.upload(&row_ptr).unwrap(),
            dev.upload(&vec![0u32; rows as usize]).unwrap(),
            dev.upload(&[0u32, rows]).unwrap(),
        );
        let cursor = dev.upload(&[0u32]).unwrap();
        let (tok, pos) = (dev.alloc::<u32>(rows as usize).unwrap(), dev.alloc::<u32>(rows as usize).unwrap());
        dev.launch(
            "csc_fill",
            L::per_line(rows as usize, 64),
            &[(&rp).into(), (&idx).into(), (&cp).into(), (&cursor).into(), (&tok).into(), (&pos).into()],
        )
        .unwrap();
        let order: Vec<u32> = tok.to_vec(rows as usize).unwrap();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..rows).collect::<Vec<_>>(), "every block ran once");
        match std::env::var("SAETRAIN_EMU_SCHEDULE").as_deref() {
            Ok("forward") => assert_eq!(order, sorted),
            Ok("reverse") => assert_eq!(order, sorted.iter().rev().copied().collect::<Vec<_>>()),
            _ => assert_ne!(order, sorted, "the default schedule shuffles the blocks"),
        }
    }

    #[test]
    fn argument_widths_are_checked() {
        let dev = Dev::open_emulator().unwrap();
        let xd = dev.alloc_f32(10).unwrap();
        // n is a u64 parameter: passing a u32 must be refused, naming the kernel.
        let e = dev
            .launch(
                "center",
                L::elementwise(10),
                &[(&xd).into(), (&xd).into(), (&xd).into(), 7u32.into(), 10u32.into()],
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("center") && e.contains("sizes"), "{e}");
        let e = dev.launch("no_such_kernel", L::elementwise(1), &[]).unwrap_err().to_string();
        assert!(e.contains("no_such_kernel"), "{e}");
    }

    #[test]
    fn block_reductions_and_scans() {
        // row_norms uses block_sum (two shuffle rounds and three barriers); exclusive_scan the
        // block scan over several chunks.
        let dev = Dev::open_emulator().unwrap();
        let (rows, d) = (5usize, 77usize);
        let w: Vec<f32> = (0..rows * d).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let wd = dev.upload(&w).unwrap();
        let norms = dev.alloc_f32(rows).unwrap();
        dev.launch("row_norms", L::per_line(rows, d), &[(&wd).into(), (d as u32).into(), (&norms).into()]).unwrap();
        let got: Vec<f32> = norms.to_vec(rows).unwrap();
        for r in 0..rows {
            let want = w[r * d..(r + 1) * d].iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
            assert!((got[r] as f64 - want).abs() < 1e-4 * want, "row {r}: {} vs {want}", got[r]);
        }
        let n = 2500usize;
        let input: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 5).collect();
        let ind = dev.upload(&input).unwrap();
        let out = dev.alloc::<u32>(n + 1).unwrap();
        dev.launch("exclusive_scan", L::scan(), &[(&ind).into(), (n as u32).into(), (&out).into()]).unwrap();
        let got: Vec<u32> = out.to_vec(n + 1).unwrap();
        let mut acc = 0u32;
        for i in 0..n {
            assert_eq!(got[i], acc, "prefix {i}");
            acc += input[i];
        }
        assert_eq!(got[n], acc);
    }
}
