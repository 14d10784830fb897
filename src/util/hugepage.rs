//! Large buffers backed by transparent huge pages where the kernel offers them on request
//! (`/sys/kernel/mm/transparent_hugepage/enabled` = madvise): the sparse passes gather rows
//! all over W_dec, G and xc, and with 4 KB pages nearly every gather is a TLB miss.

/// Buffers smaller than this stay on ordinary pages.
const MIN_BYTES: usize = 4 << 20;
const HUGE: usize = 2 << 20;

/// A zeroed `Vec<f32>` of length `n`; on Linux, its 2 MB-aligned interior is advised as
/// MADV_HUGEPAGE before the first touch, so the pages faulted in are huge pages.
pub fn zeroed_f32(n: usize) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    advise(v.as_mut_ptr() as usize, n * 4);
    v.resize(n, 0.0);
    v
}

/// A copy of `v` on huge pages ([`zeroed_f32`], then filled).
pub fn copy_f32(v: &[f32]) -> Vec<f32> {
    let mut h = zeroed_f32(v.len());
    h.copy_from_slice(v);
    h
}

/// `Vec::resize(n, 0.0)`, advising huge pages when the buffer must be reallocated.
pub fn resize_f32(v: &mut Vec<f32>, n: usize) {
    if v.capacity() < n {
        let mut grown = zeroed_f32(n);
        grown[..v.len()].copy_from_slice(v);
        *v = grown;
    } else {
        v.resize(n, 0.0);
    }
}

#[cfg(target_os = "linux")]
fn advise(addr: usize, bytes: usize) {
    if bytes < MIN_BYTES {
        return;
    }
    let start = addr.div_ceil(HUGE) * HUGE;
    let end = (addr + bytes) / HUGE * HUGE;
    if end > start {
        // SAFETY: the range lies inside an allocation we own and have not touched yet; the
        // advice only changes how the kernel backs it (failure is harmless and ignored).
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_addr: usize, _bytes: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_resized_and_copied_buffers_are_plain_vectors() {
        for n in [0, 7, (MIN_BYTES / 4) + 12_345] {
            let v = zeroed_f32(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|x| *x == 0.0));
        }
        let mut v = vec![1.0f32; 3];
        resize_f32(&mut v, 5);
        assert_eq!(v, [1.0, 1.0, 1.0, 0.0, 0.0]);
        resize_f32(&mut v, (MIN_BYTES / 4) * 2);
        assert_eq!(v[..5], [1.0, 1.0, 1.0, 0.0, 0.0]);
        assert!(v[5..].iter().all(|x| *x == 0.0), "the grown part is zeroed");
        resize_f32(&mut v, 2);
        assert_eq!(v, [1.0, 1.0]);
        let big: Vec<f32> = (0..(MIN_BYTES / 4) + 3).map(|i| i as f32).collect();
        assert_eq!(copy_f32(&big), big);
        assert_eq!(copy_f32(&[]), Vec::<f32>::new());
    }
}
