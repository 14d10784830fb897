//! Small vector helpers every CPU phase shares (no phase imports another's file for them).

use rayon::prelude::*;

/// Rows per parallel task where the work per row is small; fixed so that reductions over these
/// chunks are summed in the same order whatever the thread count (bitwise-reproducible runs).
pub const ROW_CHUNK: usize = 64;

/// Column sums in f64, reduced over fixed row chunks (deterministic).
pub fn column_sums(x: &[f32], d: usize) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = x
        .par_chunks(d * ROW_CHUNK)
        .map(|c| {
            let mut acc = vec![0f64; d];
            for r in c.chunks(d) {
                for j in 0..d {
                    acc[j] += r[j] as f64;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f64; d];
    for p in parts {
        for j in 0..d {
            out[j] += p[j];
        }
    }
    out
}

/// `y += a * x` (vectorises: no bounds checks inside the zip).
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `a . b` in f32.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators let the compiler vectorise without reassociating.
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for j in n..a.len() {
        s += a[j] * b[j];
    }
    s
}
