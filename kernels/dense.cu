// Dense family (SPEC "Backward"): the main codes' products as GEMMs, for codes dense enough that
// GEMMs beat gathers (relu at initialisation keeps about half of B x F). The GEMMs themselves are
// cuBLAS sgemm where cuBLAS loads; gemm_strided is the hand-written fallback (and what the
// emulator runs). CPU twin: backend/cpu/dense.rs.
#include "common.cuh"

// out[b][idx[e]] = val[e] for every entry e of row b; out (B x f) zeroed by the host. One block
// per row.
extern "C" __global__ void scatter_codes(const u32* __restrict__ row_ptr, const u32* __restrict__ idx,
                                         const float* __restrict__ val, u32 f, float* __restrict__ out) {
    const u32 b = blockIdx.x;
    float* o = out + (u64)b * f;
    for (u32 e = row_ptr[b] + threadIdx.x; e < row_ptr[b + 1]; e += blockDim.x) o[idx[e]] = val[e];
}

// val[e] = dense[b][idx[e]] for every entry e of row b: a dense product read at the kept
// entries. One block per row.
extern "C" __global__ void gather_codes(const u32* __restrict__ row_ptr, const u32* __restrict__ idx,
                                        const float* __restrict__ dense, u32 f, float* __restrict__ val) {
    const u32 b = blockIdx.x;
    const float* r = dense + (u64)b * f;
    for (u32 e = row_ptr[b] + threadIdx.x; e < row_ptr[b + 1]; e += blockDim.x) val[e] = r[idx[e]];
}

// x[e] += bias[e % d] over a row-major n-element matrix of d columns. One thread per element.
extern "C" __global__ void add_bias_rows(float* __restrict__ x, const float* __restrict__ bias, u32 d, u64 n) {
    u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) x[e] += bias[e % d];
}

#define SG_TILE 32
#define SG_ROWS 8  // thread rows per block: each thread computes SG_TILE / SG_ROWS outputs

// C (m x n, row-major, leading dimension n) = op(A) op(B), or C += op(A) op(B) with accumulate,
// where op(A)[r][c] = a[r * a_r + c * a_c] (m x k) and op(B)[r][c] = b[r * b_r + c * b_c]
// (k x n): the strides say whether an operand is read as stored or transposed. 32 x 32 output
// tiles, k in chunks of 32 through shared memory, 256 threads; f32 accumulation in k order.
// A tile is loaded with consecutive threads along the operand's unit stride (its stored rows),
// so transposed operands are read coalesced too. Grid: the tiles along x, row tile =
// block / column tiles.
extern "C" __global__ void gemm_strided(u32 m, u32 n, u32 k, const float* __restrict__ a, u64 a_r, u64 a_c,
                                        const float* __restrict__ b, u64 b_r, u64 b_c, float* __restrict__ c,
                                        int accumulate) {
    __shared__ float As[SG_TILE][SG_TILE + 1];  // As[r][kk] = op(A)[row0 + r][k0 + kk]
    __shared__ float Bs[SG_TILE][SG_TILE + 1];  // Bs[kk][c] = op(B)[k0 + kk][col0 + c]
    const u32 tx = threadIdx.x % SG_TILE, ty = threadIdx.x / SG_TILE;
    const u32 col_tiles = (n + SG_TILE - 1) / SG_TILE;
    const u32 row0 = (blockIdx.x / col_tiles) * SG_TILE, col0 = (blockIdx.x % col_tiles) * SG_TILE;
    const bool a_rows = a_r == 1 && a_c != 1;  // A transposed: its unit stride runs along op(A)'s rows
    const bool b_rows = b_r == 1 && b_c != 1;  // B transposed: along op(B)'s rows (k)
    float acc[SG_TILE / SG_ROWS];
    for (int r = 0; r < SG_TILE / SG_ROWS; r++) acc[r] = 0.f;
    for (u32 k0 = 0; k0 < k; k0 += SG_TILE) {
        for (u32 q = ty; q < SG_TILE; q += SG_ROWS) {
            // (ar, ak): the element of op(A) this thread loads; tx runs along the unit stride.
            u32 ar = a_rows ? row0 + tx : row0 + q, ak = a_rows ? k0 + q : k0 + tx;
            float av = (ar < m && ak < k) ? a[(u64)ar * a_r + (u64)ak * a_c] : 0.f;
            if (a_rows)
                As[tx][q] = av;
            else
                As[q][tx] = av;
            u32 bk = b_rows ? k0 + tx : k0 + q, bc = b_rows ? col0 + q : col0 + tx;
            float bv = (bk < k && bc < n) ? b[(u64)bk * b_r + (u64)bc * b_c] : 0.f;
            if (b_rows)
                Bs[tx][q] = bv;
            else
                Bs[q][tx] = bv;
        }
        __syncthreads();
        const u32 kn = k - k0 < SG_TILE ? k - k0 : SG_TILE;
        for (u32 kk = 0; kk < kn; kk++) {
            float bv = Bs[kk][tx];
            for (int r = 0; r < SG_TILE / SG_ROWS; r++) acc[r] += As[ty + r * SG_ROWS][kk] * bv;
        }
        __syncthreads();
    }
    const u32 col = col0 + tx;
    if (col >= n) return;
    for (int r = 0; r < SG_TILE / SG_ROWS; r++) {
        u32 row = row0 + ty + r * SG_ROWS;
        if (row < m) {
            float* o = c + (u64)row * n + col;
            *o = accumulate ? *o + acc[r] : acc[r];
        }
    }
}
