//! Candidate passes by lane mask: the one loop every selection uses to find the entries at or
//! above a bound (topk per row, batchtopk with one bound for the batch, wta with one per column).
//!
//! The compares of a 16-wide chunk vectorise into one bit mask, so a pass pays a branch per set
//! bit rather than one per entry (a mispredicted branch on every rare hit). relu and jumprelu
//! (`mask.rs`) use the strict mask to skip chunks with nothing kept.

use rayon::prelude::*;

/// Lanes of a chunk.
pub(crate) const LANES: usize = 16;

/// Smallest positive f32: `v >= MIN_POS` is `v > 0` (false for NaN).
pub(crate) const MIN_POS: f32 = f32::from_bits(1);

/// A candidate: (row, column, value).
pub(crate) type Candidate = (u32, u32, f32);

/// Bit q set where `c[q] >= t[q]`, for a chunk of at most `LANES` entries.
#[inline(always)]
fn lanes_at_least(c: &[f32], t: &[f32]) -> u32 {
    lanes_where::<GE_OQ>(c, t, |v, t| v >= t)
}

/// Bit q set where `c[q] > t[q]`, for a chunk of at most `LANES` entries.
#[inline(always)]
pub(crate) fn lanes_above(c: &[f32], t: &[f32]) -> u32 {
    lanes_where::<GT_OQ>(c, t, |v, t| v > t)
}

/// The AVX compare predicates of `>=` and `>` (ordered, quiet: false on NaN, as the plain
/// compares), by value so that the plain path compiles on every target.
const GE_OQ: i32 = 0x1D;
const GT_OQ: i32 = 0x1E;
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
const _: () = assert!(GE_OQ == std::arch::x86_64::_CMP_GE_OQ && GT_OQ == std::arch::x86_64::_CMP_GT_OQ);

/// Bit q set where `plain(c[q], t[q])`: a full chunk by the AVX predicate `P` (the same compare),
/// partial chunks and targets without AVX by `plain` itself.
#[inline(always)]
fn lanes_where<const P: i32>(c: &[f32], t: &[f32], plain: impl Fn(f32, f32) -> bool) -> u32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    if let (Ok(c), Ok(t)) = (<&[f32; LANES]>::try_from(c), <&[f32; LANES]>::try_from(t)) {
        return avx::mask::<P>(c, t);
    }
    let mut hits = 0u32;
    for (q, (&v, &t)) in c.iter().zip(t).enumerate() {
        hits |= (plain(v, t) as u32) << q;
    }
    hits
}

/// Full-chunk masks by compare + movemask (the build's baseline, x86-64-v3, has AVX). In plain
/// Rust LLVM vectorises the compares but builds the mask with an AND of lane bits and a
/// horizontal OR, about 20 instructions per chunk against 6.
#[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
mod avx {
    use super::LANES;
    use std::arch::x86_64::{_mm256_cmp_ps, _mm256_loadu_ps, _mm256_movemask_ps};

    /// Bit q set where predicate `P` (an ordered compare: false on NaN) holds for `c[q], t[q]`.
    #[inline(always)]
    pub(super) fn mask<const P: i32>(c: &[f32; LANES], t: &[f32; LANES]) -> u32 {
        // SAFETY: AVX is enabled for the whole build (the cfg above); each load reads 8 floats
        // within one of the two 16-float arrays.
        unsafe {
            let lo = _mm256_cmp_ps::<P>(_mm256_loadu_ps(c.as_ptr()), _mm256_loadu_ps(t.as_ptr()));
            let hi = _mm256_cmp_ps::<P>(_mm256_loadu_ps(c.as_ptr().add(8)), _mm256_loadu_ps(t.as_ptr().add(8)));
            (_mm256_movemask_ps(lo) as u32) | ((_mm256_movemask_ps(hi) as u32) << 8)
        }
    }
}

/// The bounds of a candidate pass, handed out a chunk at a time (as slices, so that a full
/// chunk's compares have a known length and vectorise; a closure per column would index with a
/// bounds check per lane, which made wta's pass 1.5x slower).
pub(crate) trait Bounds: Sync {
    /// The bounds of columns `j0..j0 + n` (`n <= LANES`).
    fn of(&self, j0: usize, n: usize) -> &[f32];
}

/// One bound for every column.
pub(crate) struct Uniform([f32; LANES]);

impl Uniform {
    pub(crate) fn new(t: f32) -> Self {
        Uniform([t; LANES])
    }
}

impl Bounds for Uniform {
    #[inline(always)]
    fn of(&self, _: usize, n: usize) -> &[f32] {
        &self.0[..n]
    }
}

/// One bound per column.
impl Bounds for [f32] {
    #[inline(always)]
    fn of(&self, j0: usize, n: usize) -> &[f32] {
        &self[j0..j0 + n]
    }
}

/// The set bits of `hits`, ascending.
#[inline(always)]
fn set_bits(mut hits: u32) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (hits != 0).then(|| {
            let q = hits.trailing_zeros() as usize;
            hits &= hits - 1;
            q
        })
    })
}

/// Call `f(j, row[j])`, in index order, for every entry with `row[j] >= bound j` (NaN entries
/// and NaN bounds never pass).
#[inline(always)]
pub(crate) fn each_at_least<B: Bounds + ?Sized>(row: &[f32], bounds: &B, mut f: impl FnMut(usize, f32)) {
    let mut it = row.chunks_exact(LANES);
    let mut j0 = 0usize;
    for c in it.by_ref() {
        for q in set_bits(lanes_at_least(c, bounds.of(j0, LANES))) {
            f(j0 + q, c[q]);
        }
        j0 += LANES;
    }
    let c = it.remainder();
    for q in set_bits(lanes_at_least(c, bounds.of(j0, c.len()))) {
        f(j0 + q, c[q]);
    }
}

/// Every entry of `pre` (rows of `cols`) with `pre[b, j] >= bound j`, one row-major list per
/// task of `rows_per_task` consecutive rows (tasks in parallel); `capacity` is each list's
/// expected length.
pub(crate) fn collect_at_least<B: Bounds + ?Sized>(
    pre: &[f32],
    cols: usize,
    rows_per_task: usize,
    capacity: usize,
    bounds: &B,
) -> Vec<Vec<Candidate>> {
    pre.par_chunks(cols * rows_per_task)
        .enumerate()
        .map(|(ti, chunk)| {
            let mut out = Vec::with_capacity(capacity);
            for (r, row) in chunk.chunks_exact(cols).enumerate() {
                let b = (ti * rows_per_task + r) as u32;
                each_at_least(row, bounds, |j, v| out.push((b, j as u32, v)));
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every length from empty to past two chunks, bounds per column and NaNs in both.
    #[test]
    fn each_at_least_visits_exactly_the_entries_at_or_above_their_bound_in_order() {
        for n in 0..40usize {
            let row: Vec<f32> =
                (0..n).map(|j| if j % 7 == 3 { f32::NAN } else { ((j * 37) % 11) as f32 - 3.0 }).collect();
            let bound: Vec<f32> = (0..n).map(|j| if j % 13 == 5 { f32::NAN } else { (j % 5) as f32 - 1.0 }).collect();
            let mut got = Vec::new();
            each_at_least(&row[..], &bound[..], |j, v| got.push((j, v)));
            let want: Vec<(usize, f32)> = (0..n).filter(|&j| row[j] >= bound[j]).map(|j| (j, row[j])).collect();
            assert_eq!(got, want, "n = {n}");
            let mut got = Vec::new();
            each_at_least(&row[..], &Uniform::new(1.0), |j, v| got.push((j, v)));
            let want: Vec<(usize, f32)> = (0..n).filter(|&j| row[j] >= 1.0).map(|j| (j, row[j])).collect();
            assert_eq!(got, want, "n = {n}, one bound");
        }
    }

    /// The full-chunk masks against the plain compares: ties, signed zeros, subnormals,
    /// infinities and NaNs on both sides, in every lane.
    #[test]
    fn chunk_masks_match_the_plain_compares() {
        let special = [0.0, -0.0, MIN_POS, -MIN_POS, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-39];
        let mut s = 11u32;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            s >> 8
        };
        for _ in 0..2000 {
            let c: Vec<f32> = (0..LANES).map(|_| special[next() as usize % special.len()]).collect();
            let t: Vec<f32> = (0..LANES).map(|_| special[next() as usize % special.len()]).collect();
            let plain = |pred: fn(f32, f32) -> bool| (0..LANES).fold(0u32, |m, q| m | ((pred(c[q], t[q]) as u32) << q));
            assert_eq!(lanes_at_least(&c, &t), plain(|v, t| v >= t), "{c:?} >= {t:?}");
            assert_eq!(lanes_above(&c, &t), plain(|v, t| v > t), "{c:?} > {t:?}");
            // The plain loop itself (what partial chunks take), on the same chunk.
            assert_eq!(
                lanes_where::<GE_OQ>(&c[..LANES - 1], &t[..LANES - 1], |v, t| v >= t),
                plain(|v, t| v >= t) & 0x7fff
            );
        }
    }

    #[test]
    fn collect_at_least_lists_each_task_row_major() {
        let (rows, cols) = (7usize, 19usize);
        let pre: Vec<f32> = (0..rows * cols).map(|i| ((i * 29) % 17) as f32 - 8.0).collect();
        let bound: Vec<f32> = (0..cols).map(|j| (j % 4) as f32).collect();
        let lists = collect_at_least(&pre, cols, 3, 0, &bound[..]);
        assert_eq!(lists.len(), 3);
        let flat: Vec<Candidate> = lists.concat();
        let want: Vec<Candidate> = (0..rows * cols)
            .filter(|&i| pre[i] >= (i % cols % 4) as f32)
            .map(|i| ((i / cols) as u32, (i % cols) as u32, pre[i]))
            .collect();
        assert_eq!(flat, want);
        for (t, l) in lists.iter().enumerate() {
            assert!(l.iter().all(|e| e.0 as usize / 3 == t), "task {t} holds only its rows");
        }
    }
}
