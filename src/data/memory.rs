//! Activations that live in the caller's memory (a NumPy array handed over by the Python
//! package) instead of shard files. They are registered under a name and reached through the
//! data spec `memory:NAME`, so everything that opens data by its spec (training, `--resume`, the
//! held-out split of `sae eval`) reads them exactly as it reads a shard, without a copy.
//!
//! The registry holds only a borrowed view: whoever registers keeps the bytes alive and
//! unchanged until the returned [`Registration`] is dropped, which removes the entry.

use super::format::Dtype;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// The prefix of a data spec that names registered memory.
pub const PREFIX: &str = "memory:";

/// A read-only view of `rows x d_in` elements of `dtype`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct MemoryView {
    ptr: *const u8,
    pub len: usize,
    pub dtype: Dtype,
    pub rows: usize,
    pub d_in: usize,
}

// SAFETY: the view is only read, and the registrant guarantees the bytes outlive the
// registration and are not written while it exists (see `register`).
unsafe impl Send for MemoryView {}
unsafe impl Sync for MemoryView {}

impl MemoryView {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `register`'s contract: `len` readable bytes at `ptr` for the registration's life.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<MemoryView>>> {
    static R: OnceLock<Mutex<HashMap<String, Arc<MemoryView>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// Removes its entry from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    name: String,
}

impl Registration {
    /// The data spec that reaches the registered memory (`memory:NAME`).
    pub fn spec(&self) -> String {
        format!("{PREFIX}{}", self.name)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        registry().lock().unwrap_or_else(|e| e.into_inner()).remove(&self.name);
    }
}

/// Register `len` bytes at `ptr` as `rows x d_in` elements of `dtype` under `name`.
///
/// # Safety
/// The bytes must stay allocated and unmodified until the returned registration is dropped,
/// and every reader (a training run, an evaluation) must have finished by then.
pub unsafe fn register(
    name: &str,
    ptr: *const u8,
    len: usize,
    dtype: Dtype,
    rows: usize,
    d_in: usize,
) -> Result<Registration> {
    if rows == 0 || d_in == 0 {
        bail!("{PREFIX}{name}: the array has shape ({rows}, {d_in}); expected at least one row and one column");
    }
    let need = rows as u128 * d_in as u128 * dtype.size() as u128;
    if need != len as u128 {
        bail!("{PREFIX}{name}: {len} bytes for ({rows}, {d_in}) {dtype}, which needs {need}");
    }
    let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
    if r.contains_key(name) {
        bail!("{PREFIX}{name} is already registered (one run or evaluation at a time per name)");
    }
    r.insert(name.to_string(), Arc::new(MemoryView { ptr, len, dtype, rows, d_in }));
    Ok(Registration { name: name.to_string() })
}

/// The name of a `memory:NAME` spec (None for a path).
pub fn name_of(spec: &Path) -> Option<&str> {
    spec.to_str()?.strip_prefix(PREFIX)
}

/// The registered view of a `memory:NAME` spec, or an error saying why it cannot be read here.
pub fn lookup(name: &str) -> Result<Arc<MemoryView>> {
    match registry().lock().unwrap_or_else(|e| e.into_inner()).get(name) {
        Some(v) => Ok(v.clone()),
        None => bail!(
            "{PREFIX}{name}: this data was an in-memory array given to saetrain.train() in Python and is not \
             available here; pass the same array again (saetrain.train(array, resume=RUN) or \
             Run.metrics(array)), or give activation shards with --data"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_memory_is_reachable_by_its_spec_until_dropped() {
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let reg = unsafe { register("t-reach", data.as_ptr() as *const u8, 48, Dtype::Float32, 3, 4) }.unwrap();
        assert_eq!(reg.spec(), "memory:t-reach");
        let v = lookup(name_of(Path::new(&reg.spec())).unwrap()).unwrap();
        assert_eq!((v.rows, v.d_in, v.bytes().len()), (3, 4, 48));
        assert!(unsafe { register("t-reach", data.as_ptr() as *const u8, 48, Dtype::Float32, 3, 4) }.is_err());
        drop(reg);
        let e = lookup("t-reach").unwrap_err().to_string();
        assert!(e.contains("in-memory array"), "{e}");
    }

    #[test]
    fn a_size_that_does_not_match_the_shape_is_refused() {
        let data = [0u8; 10];
        let e = unsafe { register("t-size", data.as_ptr(), 10, Dtype::Float32, 2, 2) }.unwrap_err().to_string();
        assert!(e.contains("needs 16"), "{e}");
        assert!(unsafe { register("t-size", data.as_ptr(), 0, Dtype::Float32, 0, 2) }.is_err());
        assert_eq!(name_of(Path::new("shards/")), None);
    }
}
