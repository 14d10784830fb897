//! Compact sparse codes: the kept entries of `Z` in CSR order (per token), and the
//! per-latent (CSC) view the backward pass uses to build decoder/encoder row gradients.

use rayon::prelude::*;

/// Rows per block of [`SparseCodes::fold_by_latent`]: fixed, so that its reductions do not
/// depend on the thread count.
pub const FOLD_ROWS: usize = 256;

/// Kept entries of a B x F code, grouped by token (row). Within a row, latent indices are
/// ascending. `val` holds the kept activation (always > 0).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseCodes {
    pub rows: usize,
    pub cols: usize,
    /// `row_ptr[b]..row_ptr[b+1]` are the entries of token b.
    pub row_ptr: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

impl SparseCodes {
    pub fn empty(rows: usize, cols: usize) -> Self {
        Self { rows, cols, row_ptr: vec![0; rows + 1], idx: vec![], val: vec![] }
    }
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }
    /// `per_entry` (one value per kept entry, CSR order) split at blocks of `rows_per_part`
    /// rows, so parallel tasks each own their rows' entries.
    pub fn split_by_rows<'a, T>(&self, rows_per_part: usize, per_entry: &'a mut [T]) -> Vec<&'a mut [T]> {
        assert_eq!(per_entry.len(), self.nnz());
        let step = rows_per_part.max(1);
        let mut parts = Vec::with_capacity(self.rows.div_ceil(step));
        let mut rest = per_entry;
        for b0 in (0..self.rows).step_by(step) {
            let b1 = (b0 + step).min(self.rows);
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(self.row_ptr[b1] - self.row_ptr[b0]);
            parts.push(head);
            rest = tail;
        }
        parts
    }

    /// The positions (CSR order) of row b's entries whose latent lies in `latents`: one
    /// contiguous range, since a row's latents ascend (found by two binary searches).
    pub fn row_entries_in(&self, b: usize, latents: std::ops::Range<u32>) -> std::ops::Range<usize> {
        let (r0, r1) = (self.row_ptr[b], self.row_ptr[b + 1]);
        let ix = &self.idx[r0..r1];
        r0 + ix.partition_point(|&i| i < latents.start)..r0 + ix.partition_point(|&i| i < latents.end)
    }

    pub fn row(&self, b: usize) -> (&[u32], &[f32]) {
        let r = self.row_ptr[b]..self.row_ptr[b + 1];
        (&self.idx[r.clone()], &self.val[r])
    }

    /// Build from per-row lists of (latent, value); each list is sorted by latent here.
    pub fn from_rows(cols: usize, mut rows: Vec<Vec<(u32, f32)>>) -> Self {
        rows.par_iter_mut().for_each(|r| r.sort_unstable_by_key(|e| e.0));
        let mut row_ptr = Vec::with_capacity(rows.len() + 1);
        row_ptr.push(0);
        let mut n = 0;
        for r in &rows {
            n += r.len();
            row_ptr.push(n);
        }
        let mut idx = Vec::with_capacity(n);
        let mut val = Vec::with_capacity(n);
        for r in &rows {
            for &(i, v) in r {
                idx.push(i);
                val.push(v);
            }
        }
        Self { rows: rows.len(), cols, row_ptr, idx, val }
    }

    /// Build from a dense boolean mask over `pre` (B x F): kept entries take their `pre` value.
    pub fn from_mask(pre: &[f32], rows: usize, cols: usize, keep: impl Fn(usize, usize) -> bool + Sync) -> Self {
        let lists: Vec<Vec<(u32, f32)>> = (0..rows)
            .into_par_iter()
            .map(|b| {
                let r = &pre[b * cols..(b + 1) * cols];
                (0..cols).filter(|&i| keep(b, i)).map(|i| (i as u32, r[i])).collect()
            })
            .collect();
        Self::from_rows(cols, lists)
    }

    /// Dense B x F matrix (tests and small tools only).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for b in 0..self.rows {
            let (ix, vs) = self.row(b);
            for (&i, &v) in ix.iter().zip(vs) {
                out[b * self.cols + i as usize] = v;
            }
        }
        out
    }

    /// Number of kept entries per latent.
    pub fn col_counts(&self) -> Vec<u32> {
        self.fold_by_latent(0u32, |_| 1, |a, b| *a += b)
    }

    /// Per latent, `entry(e)` over its kept entries e combined with `add` (`zero` where it kept
    /// nothing). Blocks of [`FOLD_ROWS`] rows run in parallel, entries in CSR order inside a
    /// block, and the blocks are combined in row order: a float sum is bit-identical whatever the
    /// thread count. (Relu keeps half of B x F, where a serial pass over the entries costs as
    /// much as a tenth of a GEMM.)
    pub fn fold_by_latent<T, E, A>(&self, zero: T, entry: E, add: A) -> Vec<T>
    where
        T: Copy + Send + Sync,
        E: Fn(usize) -> T + Sync,
        A: Fn(&mut T, T) + Sync,
    {
        let blocks: Vec<Vec<T>> = (0..self.rows.div_ceil(FOLD_ROWS))
            .into_par_iter()
            .map(|p| {
                let mut acc = vec![zero; self.cols];
                let (b0, b1) = (p * FOLD_ROWS, ((p + 1) * FOLD_ROWS).min(self.rows));
                for e in self.row_ptr[b0]..self.row_ptr[b1] {
                    add(&mut acc[self.idx[e] as usize], entry(e));
                }
                acc
            })
            .collect();
        let mut blocks = blocks.into_iter();
        let mut out = blocks.next().unwrap_or_else(|| vec![zero; self.cols]);
        for b in blocks {
            for (o, v) in out.iter_mut().zip(b) {
                add(o, v);
            }
        }
        out
    }

    /// Per-latent view: for latent i, `col_ptr[i]..col_ptr[i+1]` index into `tok`/`pos`, where
    /// `tok` is the token and `pos` the entry's position in `idx`/`val`. Tokens ascend.
    pub fn by_latent(&self) -> LatentView {
        let counts = self.col_counts();
        let mut col_ptr = Vec::with_capacity(self.cols + 1);
        col_ptr.push(0usize);
        let mut acc = 0usize;
        for c in &counts {
            acc += *c as usize;
            col_ptr.push(acc);
        }
        let mut fill = col_ptr[..self.cols].to_vec();
        let mut tok = vec![0u32; self.nnz()];
        let mut pos = vec![0u32; self.nnz()];
        for b in 0..self.rows {
            for p in self.row_ptr[b]..self.row_ptr[b + 1] {
                let i = self.idx[p] as usize;
                tok[fill[i]] = b as u32;
                pos[fill[i]] = p as u32;
                fill[i] += 1;
            }
        }
        LatentView { col_ptr, tok, pos }
    }
}

/// CSC companion of [`SparseCodes`].
#[derive(Clone, Debug, Default)]
pub struct LatentView {
    pub col_ptr: Vec<usize>,
    pub tok: Vec<u32>,
    pub pos: Vec<u32>,
}

impl LatentView {
    pub fn entries(&self, i: usize) -> std::ops::Range<usize> {
        self.col_ptr[i]..self.col_ptr[i + 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Awkward codes: 3 blocks of FOLD_ROWS and a partial one, empty rows, 37 latents of which
    /// some never fire, values with many rounding-sensitive digits.
    fn awkward_codes() -> SparseCodes {
        let rows = 3 * FOLD_ROWS + 41;
        let lists = (0..rows)
            .map(|b| {
                (0..37u32)
                    .filter(|i| (b * 7 + *i as usize * 13) % 5 < 2 && i % 11 != 4 && b % 9 != 3)
                    .map(|i| (i, 1.0 + ((b * 31 + i as usize * 17) % 97) as f32 / 7.0))
                    .collect()
            })
            .collect();
        SparseCodes::from_rows(37, lists)
    }

    #[test]
    fn fold_by_latent_matches_a_serial_pass_and_ignores_the_thread_count() {
        let c = awkward_codes();
        let (mut count, mut sum, mut min) = (vec![0u32; c.cols], vec![0f64; c.cols], vec![None; c.cols]);
        for (&i, &v) in c.idx.iter().zip(&c.val) {
            let i = i as usize;
            count[i] += 1;
            sum[i] += v as f64;
            min[i] = Some(min[i].map_or(v, |m: f32| m.min(v)));
        }
        assert_eq!(c.col_counts(), count);
        assert!(count.contains(&0), "some latent never fires");
        let fold = |c: &SparseCodes| c.fold_by_latent(0f32, |e| c.val[e], |a, b| *a += b);
        let sums = fold(&c);
        for (s, w) in sums.iter().zip(&sum) {
            assert!((*s as f64 - w).abs() <= 1e-6 * w.abs().max(1.0) * c.rows as f64, "{s} vs {w}");
        }
        assert_eq!(crate::sparsify::threshold::per_latent_min(&c), min);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| fold(&c));
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| fold(&c));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one), bits(&sums));
        assert_eq!(bits(&three), bits(&sums));
        assert_eq!(SparseCodes::empty(0, 5).col_counts(), vec![0; 5]);
    }

    #[test]
    fn split_by_rows_gives_each_block_of_rows_its_entries() {
        let c = SparseCodes::from_rows(
            4,
            vec![vec![(0, 1.0)], vec![], vec![(1, 2.0), (3, 3.0)], vec![(2, 4.0)], vec![(0, 5.0)]],
        );
        let mut v = c.val.clone();
        let lens: Vec<usize> = c.split_by_rows(2, &mut v).iter().map(|p| p.len()).collect();
        assert_eq!(lens, [1, 3, 1]);
        let mut v = c.val.clone();
        let parts: Vec<Vec<f32>> = c.split_by_rows(1, &mut v).iter().map(|p| p.to_vec()).collect();
        assert_eq!(parts, [vec![1.0], vec![], vec![2.0, 3.0], vec![4.0], vec![5.0]]);
    }
}
