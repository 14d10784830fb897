//! The thin layer over the CUDA driver: one context on device 0, kernels loaded from the embedded
//! fatbin or compiled by NVRTC, raw device allocations with RAII, kernel launches with plain
//! scalar/pointer arguments, and the cuBLAS handle. Everything runs on the legacy default stream,
//! so host copies are ordered after the kernels before them.
//!
//! The same interface also fronts the host emulator (`Dev::open_emulator`, see emulator.rs): its
//! buffers are guarded host memory and its launches run the host-compiled kernels, so the backend
//! above this layer is the same code on both.

use super::emulator::{self, HostMem};
use super::kernels;
use super::launch::Launch;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::{result as blas_result, sys as blas_sys};
use cudarc::driver::{result, sys, CudaContext, CudaFunction};
use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

/// One kernel argument (every kernel takes only these: device pointers and scalars).
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    Ptr(u64),
    U64(u64),
    U32(u32),
    I32(i32),
    F32(f32),
}

impl<T> From<&DevBuf<T>> for KArg {
    fn from(b: &DevBuf<T>) -> Self {
        KArg::Ptr(b.ptr)
    }
}
impl<T> From<Ptr<T>> for KArg {
    fn from(p: Ptr<T>) -> Self {
        KArg::Ptr(p.addr)
    }
}
impl From<u32> for KArg {
    fn from(v: u32) -> Self {
        KArg::U32(v)
    }
}
impl From<i32> for KArg {
    fn from(v: i32) -> Self {
        KArg::I32(v)
    }
}
impl From<f32> for KArg {
    fn from(v: f32) -> Self {
        KArg::F32(v)
    }
}
impl From<u64> for KArg {
    fn from(v: u64) -> Self {
        KArg::U64(v)
    }
}

/// The null pointer argument (an absent optional input) of an untyped launch.
pub const NULL: KArg = KArg::Ptr(0);

/// A device pointer to elements of `T`: what the typed launchers (`kernels::launch`) take, so a
/// buffer of the wrong element type is a compile error.
pub struct Ptr<T> {
    addr: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Ptr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Ptr<T> {}

impl<T> Ptr<T> {
    /// The null pointer (an absent optional input).
    pub const fn null() -> Self {
        Self { addr: 0, _t: PhantomData }
    }
    pub fn addr(self) -> u64 {
        self.addr
    }
}

/// A device allocation of elements of `T` (freed on drop).
pub struct DevBuf<T = u8> {
    ptr: u64,
    bytes: usize,
    mem: Mem,
    _t: PhantomData<T>,
}

/// Who owns a buffer's memory.
enum Mem {
    /// Nothing (a zero-byte buffer).
    Empty,
    Driver(Arc<CudaContext>),
    /// Held for its Drop (which unmaps it); the kernels reach it through `ptr`.
    Host(#[allow(dead_code)] HostMem),
}

impl<T: Copy> DevBuf<T> {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Elements of `T` it holds.
    pub fn len(&self) -> usize {
        self.bytes / std::mem::size_of::<T>()
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
    /// Pointer to its first element.
    pub fn p(&self) -> Ptr<T> {
        Ptr { addr: self.ptr, _t: PhantomData }
    }
    /// Pointer `offset` elements in.
    pub fn at(&self, offset: usize) -> Ptr<T> {
        let off = offset * std::mem::size_of::<T>();
        assert!(off <= self.bytes, "offset {off} past a buffer of {} bytes", self.bytes);
        Ptr { addr: self.ptr + off as u64, _t: PhantomData }
    }
    pub fn upload(&self, src: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(src);
        ensure_fits(n, self.bytes)?;
        match &self.mem {
            _ if n == 0 => {}
            Mem::Host(_) => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, self.ptr as *mut u8, n) },
            _ => unsafe { result::memcpy_htod_sync(self.ptr, src) }.map_err(|e| anyhow!("copy to device: {e:?}"))?,
        }
        Ok(())
    }
    /// Copy `src` into the buffer starting at element `offset`.
    pub fn upload_at(&self, offset: usize, src: &[T]) -> Result<()> {
        let start = offset * std::mem::size_of::<T>();
        let n = std::mem::size_of_val(src);
        ensure_fits(start + n, self.bytes)?;
        let dst = self.ptr + start as u64;
        match &self.mem {
            _ if n == 0 => {}
            Mem::Host(_) => unsafe { std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst as *mut u8, n) },
            _ => unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| anyhow!("copy to device: {e:?}"))?,
        }
        Ok(())
    }
    pub fn download(&self, dst: &mut [T]) -> Result<()> {
        self.download_at(0, dst)
    }
    /// Copy `dst.len()` elements starting at element `offset` of the buffer.
    pub fn download_at(&self, offset: usize, dst: &mut [T]) -> Result<()> {
        let start = offset * std::mem::size_of::<T>();
        ensure_fits(start + std::mem::size_of_val(dst), self.bytes)?;
        let src = self.ptr + start as u64;
        match &self.mem {
            _ if dst.is_empty() => {}
            Mem::Host(_) => unsafe {
                std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr() as *mut u8, std::mem::size_of_val(dst))
            },
            _ => unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| anyhow!("copy from device: {e:?}"))?,
        }
        Ok(())
    }
    pub fn to_vec(&self, n: usize) -> Result<Vec<T>>
    where
        T: Default,
    {
        let mut v = vec![T::default(); n];
        self.download(&mut v)?;
        Ok(v)
    }
    /// Set the first `bytes` bytes to `byte`.
    pub fn fill_bytes(&self, byte: u8, bytes: usize) -> Result<()> {
        ensure_fits(bytes, self.bytes)?;
        match &self.mem {
            _ if bytes == 0 => {}
            Mem::Host(_) => unsafe { std::ptr::write_bytes(self.ptr as *mut u8, byte, bytes) },
            _ => unsafe { result::memset_d8_sync(self.ptr, byte, bytes) }.map_err(|e| anyhow!("memset: {e:?}"))?,
        }
        Ok(())
    }
    pub fn zero(&self) -> Result<()> {
        self.fill_bytes(0, self.bytes)
    }
}

fn ensure_fits(n: usize, cap: usize) -> Result<()> {
    if n > cap {
        bail!("copy of {n} bytes into a device buffer of {cap} bytes");
    }
    Ok(())
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        if let Mem::Driver(ctx) = &self.mem {
            let _ = ctx.bind_to_thread();
            let _ = unsafe { result::free_sync(self.ptr) };
        }
        // Host memory unmaps itself.
    }
}

/// Where the kernels came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelOrigin {
    Fatbin,
    Nvrtc(String),
    /// Compiled for the host by build.rs and run by the emulator.
    Emulator,
}

/// The cuBLAS handle (absent when libcublas cannot be loaded: the fallback GEMM runs then).
pub struct Blas {
    pub handle: blas_sys::cublasHandle_t,
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = unsafe { blas_result::destroy_handle(self.handle) };
    }
}

pub struct Dev {
    imp: Imp,
    pub blas: Option<Blas>,
    pub name: String,
    pub cc: (i32, i32),
    pub origin: KernelOrigin,
    /// Why cuBLAS is not used, when it is not.
    pub blas_note: Option<String>,
}

/// A GPU through the driver, or the host emulator.
enum Imp {
    Driver { ctx: Arc<CudaContext>, funcs: HashMap<String, CudaFunction> },
    Emulator,
}

/// Names of every `extern "C" __global__ void NAME(` in the embedded sources.
pub fn kernel_names() -> Vec<String> {
    let mut out = Vec::new();
    for (_, src) in kernels::SOURCES {
        for part in src.split("extern \"C\" __global__ void ").skip(1) {
            if let Some(name) = part.split('(').next() {
                out.push(name.trim().to_string());
            }
        }
    }
    out
}

/// All kernel families as one NVRTC translation unit: common.cuh once, then every .cu with its
/// include line removed (NVRTC has no include path here).
pub fn nvrtc_source() -> String {
    let mut s = kernels::COMMON.replace("#pragma once", "");
    for (name, src) in kernels::SOURCES {
        s.push_str(&format!("\n// ---- {name} ----\n"));
        s.push_str(&src.replace("#include \"common.cuh\"", ""));
    }
    s
}

/// NVRTC options for a `compute_XY` virtual architecture.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "-std=c++17".into(), "-lineinfo".into()]
}

/// Compile every kernel with NVRTC to PTX for `arch` (e.g. "compute_90").
pub fn compile_nvrtc(arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    if !super::nvrtc_present() {
        bail!("libnvrtc not found (set LD_LIBRARY_PATH to a CUDA 13 lib directory)");
    }
    let opts = cudarc::nvrtc::CompileOptions { options: nvrtc_options(arch), ..Default::default() };
    cudarc::nvrtc::compile_ptx_with_opts(nvrtc_source(), opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            anyhow!("NVRTC failed for {arch}:\n{}", log.to_string_lossy())
        }
        other => anyhow!("NVRTC failed for {arch}: {other:?}"),
    })
}

impl Dev {
    /// Context on device 0, kernels loaded, cuBLAS if loadable. Call after `probe()` succeeded.
    pub fn open() -> Result<Self> {
        // cudarc panics when libcuda is missing: check first (probe() does the full check).
        if !super::driver_present() {
            bail!("no CUDA driver (libcuda) found");
        }
        let ctx = CudaContext::new(0).map_err(|e| anyhow!("cannot create a CUDA context: {e:?}"))?;
        let cu_dev = ctx.cu_device();
        let attr = |a| unsafe { result::device::get_attribute(cu_dev, a) };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| anyhow!("{e:?}"))?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(|e| anyhow!("{e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());

        // Kernels: the build-time fatbin when it loads (matching SASS, or PTX the driver can JIT),
        // else NVRTC for this device's architecture.
        let mut fatbin_err = String::from("no fatbin in this build (nvcc absent at build time)");
        let mut module = None;
        if let Some(fb) = kernels::FATBIN {
            match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fb.to_vec())) {
                Ok(m) => module = Some((m, KernelOrigin::Fatbin)),
                Err(e) => fatbin_err = format!("embedded fatbin did not load: {e:?}"),
            }
        }
        let (module, origin) = match module {
            Some(m) => m,
            None => {
                let arch = format!("compute_{major}{minor}");
                let ptx = compile_nvrtc(&arch).with_context(|| fatbin_err.clone())?;
                let m = ctx.load_module(ptx).map_err(|e| anyhow!("NVRTC PTX did not load: {e:?}"))?;
                (m, KernelOrigin::Nvrtc(format!("{arch}; {fatbin_err}")))
            }
        };
        let mut funcs = HashMap::new();
        for n in kernel_names() {
            let f = module.load_function(&n).map_err(|e| anyhow!("kernel {n} missing from the module: {e:?}"))?;
            funcs.insert(n, f);
        }

        let (blas, blas_note) = if !super::cublas_present() {
            (None, Some("libcublas not found: hand-written GEMM".to_string()))
        } else {
            match std::panic::catch_unwind(blas_result::create_handle) {
                Ok(Ok(handle)) => (Some(Blas { handle }), None),
                Ok(Err(e)) => (None, Some(format!("cublasCreate failed ({e:?}): hand-written GEMM"))),
                Err(_) => (None, Some("cuBLAS could not be loaded: hand-written GEMM".to_string())),
            }
        };
        Ok(Self { imp: Imp::Driver { ctx, funcs }, blas, name, cc: (major, minor), origin, blas_note })
    }

    /// The host emulator: every kernel compiled for the CPU, no cuBLAS (the hand-written GEMM
    /// runs), guarded host memory. Slow (each CUDA thread is a fiber): for parity checks only.
    pub fn open_emulator() -> Result<Self> {
        Ok(Self {
            imp: Imp::Emulator,
            blas: None,
            name: "CUDA emulator on the host".into(),
            cc: (0, 0),
            origin: KernelOrigin::Emulator,
            blas_note: Some("emulator: hand-written GEMM".into()),
        })
    }

    pub fn bind(&self) -> Result<()> {
        match &self.imp {
            Imp::Driver { ctx, .. } => ctx.bind_to_thread().map_err(|e| anyhow!("bind CUDA context: {e:?}")),
            Imp::Emulator => Ok(()),
        }
    }

    /// A zeroed allocation of `n` elements of `T`.
    pub fn alloc<T: Copy>(&self, n: usize) -> Result<DevBuf<T>> {
        let bytes = n * std::mem::size_of::<T>();
        let (ptr, mem) = match &self.imp {
            _ if bytes == 0 => (0, Mem::Empty),
            Imp::Driver { ctx, .. } => {
                let ptr = unsafe { result::malloc_sync(bytes) }
                    .map_err(|e| anyhow!("cudaMalloc of {bytes} bytes failed: {e:?} (see `sae bench` memory plan)"))?;
                (ptr, Mem::Driver(ctx.clone()))
            }
            Imp::Emulator => {
                let h = HostMem::new(bytes)?;
                (h.ptr(), Mem::Host(h))
            }
        };
        let b = DevBuf { ptr, bytes, mem, _t: PhantomData };
        b.zero()?;
        Ok(b)
    }

    pub fn alloc_f32(&self, n: usize) -> Result<DevBuf<f32>> {
        self.alloc(n)
    }

    /// Upload `v` into a new allocation.
    pub fn upload<T: Copy>(&self, v: &[T]) -> Result<DevBuf<T>> {
        let b = self.alloc(v.len())?;
        b.upload(v)?;
        Ok(b)
    }

    /// Launch kernel `name` with configuration `l` on the default stream.
    pub fn launch(&self, name: &str, l: Launch, args: &[KArg]) -> Result<()> {
        let funcs = match &self.imp {
            Imp::Driver { funcs, .. } => funcs,
            Imp::Emulator => return emulator::launch(name, l, args),
        };
        let f = funcs.get(name).ok_or_else(|| anyhow!("unknown kernel {name}"))?;
        let mut vals: Vec<KArg> = args.to_vec();
        let mut ptrs: Vec<*mut c_void> = vals
            .iter_mut()
            .map(|a| match a {
                KArg::Ptr(v) | KArg::U64(v) => v as *mut u64 as *mut c_void,
                KArg::U32(v) => v as *mut u32 as *mut c_void,
                KArg::I32(v) => v as *mut i32 as *mut c_void,
                KArg::F32(v) => v as *mut f32 as *mut c_void,
            })
            .collect();
        unsafe { result::launch_kernel(f.cu_function(), l.grid, l.block, l.shmem, std::ptr::null_mut(), &mut ptrs) }
            .map_err(|e| anyhow!("launch of {name} {l:?} failed: {e:?}"))?;
        if cfg!(debug_assertions) || std::env::var_os("SAETRAIN_CUDA_SYNC").is_some() {
            self.sync().with_context(|| format!("kernel {name}"))?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        match &self.imp {
            Imp::Driver { ctx, .. } => ctx.synchronize().map_err(|e| anyhow!("CUDA error: {e:?}")),
            Imp::Emulator => Ok(()), // emulated launches finish before they return
        }
    }

    /// Memory (free, total) in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        match &self.imp {
            Imp::Driver { ctx, .. } => ctx.mem_get_info().map_err(|e| anyhow!("{e:?}")),
            Imp::Emulator => bail!("the emulator has no device memory to report"),
        }
    }
}
