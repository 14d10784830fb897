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

/// `y += sum_q vs[q] * w_row(ix[q])` over the rows `ix` of `w` (rows of `d`), bitwise the same as
/// one [`axpy`] per entry in order (each addition rounded as there), but four rows per pass over
/// `y`: `y` is loaded and stored once per four rows instead of once per row (the decode phase of
/// `sae bench step --sparsifier topk`: 20.4 -> 18.5 ms, medians of 4 paired runs).
#[inline]
pub fn axpy_rows(y: &mut [f32], ix: &[u32], vs: &[f32], w: &[f32], d: usize) {
    let row = |i: u32| &w[i as usize * d..(i as usize + 1) * d];
    let mut quads = ix.chunks_exact(4).zip(vs.chunks_exact(4));
    for (i, a) in quads.by_ref() {
        let (x0, x1, x2, x3) = (row(i[0]), row(i[1]), row(i[2]), row(i[3]));
        for ((((o, x0), x1), x2), x3) in y.iter_mut().zip(x0).zip(x1).zip(x2).zip(x3) {
            *o = (((*o + a[0] * x0) + a[1] * x1) + a[2] * x2) + a[3] * x3;
        }
    }
    let tail = ix.len() / 4 * 4;
    for (&i, &a) in ix[tail..].iter().zip(&vs[tail..]) {
        axpy(y, a, row(i));
    }
}

/// Cache lines at the head of each row that [`prefetch_row_heads`] asks for.
pub const PREFETCH_HEAD_LINES: usize = 4;

/// Ask for the first [`PREFETCH_HEAD_LINES`] cache lines of the rows `ix` of `w` (rows of `d`)
/// to be brought into L2, a token ahead of their gather: the hardware prefetcher follows a row
/// once it has seen its first lines, but each gathered row starts at a random place in W_dec.
/// Only a hint (no effect on results). Decode phase, B 4096, F 4608, d 576, k 32, 2 threads,
/// Zen 4, alternated call by call inside `sae bench step` (3 sparsifiers x 10 steps, five
/// runs): 11.4 / 9.0 / 7.6 / 8.9 / 9.1 ms without, 10.2 / 8.9 / 7.2 / 7.9 / 8.3 with 4 lines,
/// 10.8 / 8.5 / 8.7 / 8.1 / 8.6 with every line of the rows (36); 2 or 8 lines won two runs of
/// three against none.
#[inline]
pub fn prefetch_row_heads(w: &[f32], ix: &[u32], d: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let head = (PREFETCH_HEAD_LINES * 16).min(d);
        for &i in ix {
            let start = i as usize * d;
            for line in w[start..start + head].chunks(16) {
                // SAFETY: SSE is part of every x86-64 target, and a prefetch of an address in
                // a live slice reads nothing and cannot fault.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr() as *const i8) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, ix, d);
}

/// `a . b` in f32: four vectors of 8 accumulators over each 32-chunk (independent add chains:
/// one chain of 8 waited on the add latency, 47 against 33 ns per dot of 576, one core, in L1),
/// folded lane-wise to 8 as `(a0 + a1) + (a2 + a3)`, then the remaining 8-chunks, the 8 lanes
/// in order and the tail. [`avx::dot`] computes exactly this.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    {
        avx::dot(a, b)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    {
        dot_plain(a, b)
    }
}

/// `(a . b0, a . b1)`, bitwise `(dot(a, b0), dot(a, b1))`, with `a` loaded once for both
/// (b0 and b1 of a's length).
#[inline]
pub fn dot2(a: &[f32], b0: &[f32], b1: &[f32]) -> (f32, f32) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    {
        avx::dot2(a, b0, b1)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    {
        (dot_plain(a, b0), dot_plain(a, b1))
    }
}

/// `out[q] = g . w_row(ix[q])` over the rows `ix` of `w` (rows of `d`), each bitwise [`dot`],
/// two rows per pass over `g` ([`dot2`]). Decode's dZ, inside `sae bench step` with the old
/// one-dot loop alternated call by call (B 4096, k 32, 2 threads, Zen 4, 3 sparsifiers x 10
/// steps): 7.7 / 7.6 / 7.6 / 8.1 / 8.3 / 8.6 -> 7.2 / 7.6 / 7.4 / 6.9 / 7.7 / 7.8 ms for the
/// whole decode phase at 576/4608, 7.2 / 6.8 / 6.9 / 6.6 -> 6.7 / 6.0 / 6.0 / 6.9 at 512/4096.
#[inline]
pub fn dot_rows(g: &[f32], ix: &[u32], w: &[f32], d: usize, out: &mut [f32]) {
    let row = |i: u32| &w[i as usize * d..(i as usize + 1) * d];
    let mut pairs = ix.chunks_exact(2).zip(out.chunks_exact_mut(2));
    for (i, o) in pairs.by_ref() {
        (o[0], o[1]) = dot2(g, row(i[0]), row(i[1]));
    }
    if ix.len() % 2 == 1 {
        let last = ix.len() - 1;
        out[last] = dot(g, row(ix[last]));
    }
}

/// The plain form of [`dot`] (the reference its AVX twin is tested against). In plain Rust,
/// 32 accumulators compiled to shuffles and ran slower than 8 (75 against 47 ns).
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx"), allow(dead_code))]
fn dot_plain(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (n32, n8) = (n / 32 * 32, n / 8 * 8);
    let mut acc = [0f32; 32];
    for (ca, cb) in a[..n32].chunks_exact(32).zip(b[..n32].chunks_exact(32)) {
        for l in 0..32 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut lanes: [f32; 8] = std::array::from_fn(|l| (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]));
    for (ca, cb) in a[n32..n8].chunks_exact(8).zip(b[n32..n8].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    finish_dot(lanes, &a[n8..n], &b[n8..n])
}

/// The 8 lanes summed in order, then the tail.
#[inline]
fn finish_dot(lanes: [f32; 8], a: &[f32], b: &[f32]) -> f32 {
    let mut s = lanes.iter().sum::<f32>();
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// `dot` by explicit AVX (the build's x86-64-v3 baseline has it): mul then add, not FMA, so that
/// it rounds as the plain form.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
mod avx {
    use std::arch::x86_64::*;

    #[inline]
    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (n32, n8) = (n / 32 * 32, n / 8 * 8);
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY: AVX is enabled for the whole build (the cfg above); every load covers 8 floats
        // at j + 8 <= n8 <= the length of both slices.
        let lanes = unsafe {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut j = 0;
            while j < n32 {
                for (q, acc) in acc.iter_mut().enumerate() {
                    let p = _mm256_mul_ps(_mm256_loadu_ps(pa.add(j + 8 * q)), _mm256_loadu_ps(pb.add(j + 8 * q)));
                    *acc = _mm256_add_ps(*acc, p);
                }
                j += 32;
            }
            let mut s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            while j < n8 {
                s = _mm256_add_ps(s, _mm256_mul_ps(_mm256_loadu_ps(pa.add(j)), _mm256_loadu_ps(pb.add(j))));
                j += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), s);
            lanes
        };
        super::finish_dot(lanes, &a[n8..n], &b[n8..n])
    }

    /// [`dot`] against two rows at once: the same accumulators per row, a's chunks loaded once.
    #[inline]
    pub(super) fn dot2(a: &[f32], b0: &[f32], b1: &[f32]) -> (f32, f32) {
        let n = a.len().min(b0.len()).min(b1.len());
        let (n32, n8) = (n / 32 * 32, n / 8 * 8);
        let (pa, p0, p1) = (a.as_ptr(), b0.as_ptr(), b1.as_ptr());
        // SAFETY: as in `dot`: every load covers 8 floats at j + 8 <= n8 <= each length.
        let (l0, l1) = unsafe {
            let (mut c0, mut c1) = ([_mm256_setzero_ps(); 4], [_mm256_setzero_ps(); 4]);
            let mut j = 0;
            while j < n32 {
                for q in 0..4 {
                    let x = _mm256_loadu_ps(pa.add(j + 8 * q));
                    c0[q] = _mm256_add_ps(c0[q], _mm256_mul_ps(x, _mm256_loadu_ps(p0.add(j + 8 * q))));
                    c1[q] = _mm256_add_ps(c1[q], _mm256_mul_ps(x, _mm256_loadu_ps(p1.add(j + 8 * q))));
                }
                j += 32;
            }
            let mut s0 = _mm256_add_ps(_mm256_add_ps(c0[0], c0[1]), _mm256_add_ps(c0[2], c0[3]));
            let mut s1 = _mm256_add_ps(_mm256_add_ps(c1[0], c1[1]), _mm256_add_ps(c1[2], c1[3]));
            while j < n8 {
                let x = _mm256_loadu_ps(pa.add(j));
                s0 = _mm256_add_ps(s0, _mm256_mul_ps(x, _mm256_loadu_ps(p0.add(j))));
                s1 = _mm256_add_ps(s1, _mm256_mul_ps(x, _mm256_loadu_ps(p1.add(j))));
                j += 8;
            }
            let (mut l0, mut l1) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(l0.as_mut_ptr(), s0);
            _mm256_storeu_ps(l1.as_mut_ptr(), s1);
            (l0, l1)
        };
        (super::finish_dot(l0, &a[n8..n], &b0[n8..n]), super::finish_dot(l1, &a[n8..n], &b1[n8..n]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dot the build uses (and `dot2`, two of them at once) is bitwise the plain form, which
    /// is the f64 dot within f32 rounding: every length 0-80 (every 32-, 8- and scalar tail),
    /// 576 and 577.
    #[test]
    fn dot_matches_the_plain_form_and_f64() {
        let mut s = 5u32;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * [1e-3f32, 1.0, 1e4][(s >> 4) as usize % 3]
        };
        for n in (0..=80).chain([576, 577]) {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let (got, want) = (dot(&a, &b), dot_plain(&a, &b));
            assert_eq!(got.to_bits(), want.to_bits(), "n {n}: {got} vs {want}");
            let c: Vec<f32> = (0..n).map(|_| next()).collect();
            let (p, q) = dot2(&a, &b, &c);
            assert_eq!((p.to_bits(), q.to_bits()), (want.to_bits(), dot_plain(&a, &c).to_bits()), "dot2, n {n}");
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let mag: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum();
            assert!((want as f64 - exact).abs() <= 1e-6 * mag, "n {n}: {want} vs {exact}");
        }
    }

    /// Uniform values in [-0.5, 0.5) from a seeded LCG (the same stream for the same seed).
    fn uniform(seed: u32) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        }
    }

    #[test]
    fn dot_rows_is_bitwise_one_dot_per_row() {
        let mut next = uniform(11);
        for d in [1usize, 7, 33, 576] {
            let w: Vec<f32> = (0..13 * d).map(|_| next()).collect();
            let g: Vec<f32> = (0..d).map(|_| next()).collect();
            for n in 0..8 {
                let ix: Vec<u32> = (0..n).map(|q| ((q * 5 + 3) % 13) as u32).collect();
                let mut got = vec![f32::NAN; n];
                dot_rows(&g, &ix, &w, d, &mut got);
                for (q, &i) in ix.iter().enumerate() {
                    let want = dot(&g, &w[i as usize * d..(i as usize + 1) * d]);
                    assert_eq!(got[q].to_bits(), want.to_bits(), "d={d} n={n} q={q}");
                }
            }
        }
    }

    #[test]
    fn axpy_rows_is_bitwise_one_axpy_per_row_in_order() {
        // Awkward widths, and entry counts that leave every tail length after the groups of 4.
        let mut next = uniform(7);
        for d in [1usize, 7, 33] {
            let w: Vec<f32> = (0..13 * d).map(|_| next()).collect();
            for n in 0..10 {
                let ix: Vec<u32> = (0..n).map(|q| ((q * 5 + 3) % 13) as u32).collect();
                let vs: Vec<f32> = (0..n).map(|_| next() * 1e3).collect();
                let y0: Vec<f32> = (0..d).map(|_| next()).collect();
                let mut want = y0.clone();
                for (&i, &a) in ix.iter().zip(&vs) {
                    axpy(&mut want, a, &w[i as usize * d..(i as usize + 1) * d]);
                }
                let mut got = y0.clone();
                axpy_rows(&mut got, &ix, &vs, &w, d);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "d={d} n={n}");
            }
        }
    }
}
