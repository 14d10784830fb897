//! Every kernel launch's grid, block and dynamic shared memory, derived in one place.
//!
//! Kernels use static shared memory only (their `__shared__` arrays are sized by compile-time
//! constants: 256 histogram bins, 33-entry scan scratch, 32-entry reduction scratch, the
//! 2 x 16 x 65 encoder GEMM tiles, the 2 x 32 x 33 strided GEMM tiles, csc_sort's 2 x 1024-word
//! token bitmap, col_partials' 8 x 32 f64 lanes), so every launch here has `shmem = 0`. Block sizes are multiples of 32
//! (the block reductions and scans in common.cuh rely on it) and at most 1024.

/// One launch configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shmem: u32,
}

/// Threads per block for elementwise kernels.
pub const ELEMWISE_THREADS: u32 = 256;
/// Threads per block for one-block-per-line kernels (selection, reductions over a row).
pub const LINE_THREADS: u32 = 256;
/// Largest x grid dimension.
pub const MAX_GRID_X: u64 = (1 << 31) - 1;
/// Fallback GEMM tile (must match GEMM_BM/GEMM_BN in kernels/encode.cu) and its thread count.
pub const GEMM_TILE: u32 = 64;
pub const GEMM_THREADS: u32 = 256;
/// Column sums: the most row parts (the f64 partial buffer is `COLSUM_PARTS x d`), the fewest
/// rows in one (below it a part's 8 row lanes would each add only a handful), and the blocks
/// worth having in all (a wide matrix has enough column groups without splitting its rows).
pub const COLSUM_PARTS: usize = 64;
pub const COLSUM_MIN_ROWS: usize = 128;
pub const COLSUM_BLOCKS: usize = 1024;
/// Blocks of the grid-stride batch histogram (enough to fill any current GPU several times).
pub const HIST_BLOCKS: u32 = 1024;

fn check(l: Launch) -> Launch {
    let threads = l.block.0 * l.block.1 * l.block.2;
    assert!(threads > 0 && threads <= 1024, "block of {threads} threads");
    assert_eq!(threads % 32, 0, "block of {threads} threads is not a whole number of warps");
    assert!(l.grid.0 >= 1 && (l.grid.0 as u64) <= MAX_GRID_X, "grid.x = {}", l.grid.0);
    assert!(l.grid.1 >= 1 && l.grid.1 <= 65_535, "grid.y = {}", l.grid.1);
    assert!(l.grid.2 >= 1 && l.grid.2 <= 65_535, "grid.z = {}", l.grid.2);
    assert!(l.shmem <= 48 * 1024, "shared memory {} bytes", l.shmem);
    l
}

fn blocks_for(n: u64, per_block: u32) -> u32 {
    let b = n.div_ceil(per_block as u64).max(1);
    assert!(b <= MAX_GRID_X, "{n} elements need {b} blocks");
    b as u32
}

/// One thread per element (convert, center, bias_relu, residual_grad, aux_grad, adam_flat,
/// l1_terms, csc_count, latent_stats).
pub fn elementwise(n: u64) -> Launch {
    check(Launch { grid: (blocks_for(n, ELEMWISE_THREADS), 1, 1), block: (ELEMWISE_THREADS, 1, 1), shmem: 0 })
}

/// One block per line (a token row or a latent column) of `width` elements: threads grow with
/// the width up to LINE_THREADS (selection, decode, code_grads, latent grads, row reductions,
/// adam_dec_rows and sum_sq_dec_rows).
pub fn per_line(lines: usize, width: usize) -> Launch {
    let threads = (width.next_power_of_two() as u32).clamp(32, LINE_THREADS);
    check(Launch { grid: (blocks_for(lines as u64, 1), 1, 1), block: (threads, 1, 1), shmem: 0 })
}

/// One thread per column of a row-major matrix with `d` columns (col_sums_finish, bdec_grad).
pub fn per_column(d: usize) -> Launch {
    check(Launch { grid: (blocks_for(d as u64, 128), 1, 1), block: (128, 1, 1), shmem: 0 })
}

/// The fallback strided GEMM (gemm_strided): one 32 x 32 output tile per block of 256 threads,
/// the tiles numbered along x only (row tile = block / column tiles), so that neither m nor n
/// meets grid.y's 65,535.
pub fn gemm_strided(m: usize, n: usize) -> Launch {
    let tiles = (m as u64).div_ceil(32).max(1) * (n as u64).div_ceil(32).max(1);
    check(Launch { grid: (blocks_for(tiles, 1), 1, 1), block: (256, 1, 1), shmem: 0 })
}

/// One block per latent of the segment sort (csc_sort): 128 threads, enough to clear and scan its
/// bitmap window in a few passes, few enough to leave the short segments' idle threads cheap.
pub fn csc_sort(f: usize) -> Launch {
    per_line(f, 128)
}

/// Column sums in row parts (col_partials): x over 32-column groups, y over parts of at least
/// [`COLSUM_MIN_ROWS`] rows (at most [`COLSUM_PARTS`]), 32 x `COLSUM_LANES` threads. Returns the
/// launch, the number of parts and the rows per part.
pub fn col_partials(rows: usize, d: usize) -> (Launch, u32, u32) {
    let groups = d.div_ceil(32).max(1);
    let parts = rows.div_ceil(COLSUM_MIN_ROWS).min(COLSUM_BLOCKS.div_ceil(groups)).clamp(1, COLSUM_PARTS) as u32;
    let per_part = (rows.div_ceil(parts as usize)).max(1) as u32;
    let block = 32 * super::kernels::COLSUM_LANES as u32;
    (check(Launch { grid: (blocks_for(d as u64, 32), parts, 1), block: (block, 1, 1), shmem: 0 }), parts, per_part)
}

/// A single block of 1024 threads looping over up to 2^32 - 1 elements in block-sized chunks
/// (exclusive_scan, sel_batch_split).
pub fn scan() -> Launch {
    check(Launch { grid: (1, 1, 1), block: (1024, 1, 1), shmem: 0 })
}

/// A single warp of which one thread works (sel_batch_pick).
pub fn single_thread() -> Launch {
    check(Launch { grid: (1, 1, 1), block: (32, 1, 1), shmem: 0 })
}

/// Grid-stride histogram over `n` keys (sel_batch_hist).
pub fn batch_hist(n: u64) -> Launch {
    let blocks = n.div_ceil(LINE_THREADS as u64).clamp(1, HIST_BLOCKS as u64) as u32;
    check(Launch { grid: (blocks, 1, 1), block: (LINE_THREADS, 1, 1), shmem: 0 })
}

/// Grid-stride reduction over `n` elements, at most HIST_BLOCKS blocks each adding its partial
/// sum once (sum_sq).
pub fn grid_stride(n: u64) -> Launch {
    let blocks = n.div_ceil(LINE_THREADS as u64).clamp(1, HIST_BLOCKS as u64) as u32;
    check(Launch { grid: (blocks, 1, 1), block: (LINE_THREADS, 1, 1), shmem: 0 })
}

/// The fallback GEMM: one 64 x 64 output tile per block, x over latents, y over tokens.
pub fn gemm_fallback(rows: usize, f: usize) -> Launch {
    let gx = blocks_for(f as u64, GEMM_TILE);
    let gy = blocks_for(rows as u64, GEMM_TILE);
    check(Launch { grid: (gx, gy, 1), block: (GEMM_THREADS, 1, 1), shmem: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(elementwise(1).grid.0, 1);
        assert_eq!(elementwise(257).grid.0, 2);
        assert_eq!(per_line(300, 70).block.0, 128);
        assert_eq!(per_line(300, 5).block.0, 32);
        assert_eq!(per_line(300, 100_000).block.0, 256);
        assert_eq!(gemm_fallback(300, 333).grid, (6, 5, 1));
        assert_eq!(batch_hist(1 << 30).grid.0, HIST_BLOCKS);
        let (l, parts, per) = col_partials(4096, 70);
        assert_eq!((l.grid, parts, per), ((3, 32, 1), 32, 128));
        let (l, parts, per) = col_partials(100_000, 576);
        assert_eq!((l.grid.1, parts, per), (57, 57, 1755));
        assert_eq!(col_partials(1, 5).1, 1);
        // Wide: 144 column groups are enough blocks by themselves.
        assert_eq!(col_partials(4096, 4608).1, 8);
        assert_eq!(gemm_strided(4608, 576).grid, (144 * 18, 1, 1));
    }

    #[test]
    #[should_panic]
    fn too_many_rows_for_gemm_grid() {
        gemm_fallback(65_536 * 64 + 1, 10);
    }
}
