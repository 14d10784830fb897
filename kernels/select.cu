// Selection family: every sparsifier of sparsify/mod.rs, selecting exactly the CPU's set.
//
// Every rule is reduced to a "threshold with a tie cutoff": along a line (a token's row, or a
// latent's column) keep the entries whose key is > T, plus the entries whose key == T at
// positions <= cut (the first `need` ties in index order). Keys are act_key(): the float bits of
// strictly positive values, 0 otherwise, so comparing keys is comparing values and equal keys are
// equal values. The k-th largest key is found by a 4-pass radix select (8 bits per pass) with a
// 256-bin shared histogram. The final kept set is written as CSR (ascending latent per token) by
// a count kernel, an exclusive scan and an ordered fill.
//
//   topk          : rows,    budget k                       -> row rule      (CPU: sparsify::topk)
//   batchtopk/MC  : whole batch, budget k*B, ties by flat b*F+i -> row rule  (sparsify::batchtopk)
//   wta           : columns, budget m[j], ties by token      -> column rule  (sparsify::wta)
//   hybrid        : wta column rule as a prefilter, then rows with budget k_max (sparsify::cap_rows)
//   relu/jumprelu : v > 0 && v > theta[i]                    -> theta rule   (sparsify::select)
//   aux top-k_aux : rows among candidate latents (cmask)      -> row rule    (cpu/aux.rs::select_aux)
#include "common.cuh"

#define RADIX_BINS 256
#define NO_KEEP 0xffffffffu  // threshold above every key: keep nothing

// Key of entry (b, i) after the optional filters: `cmask` (only latents with cmask[i] != 0 are
// candidates) and a column rule (fT, fc) that must hold for the entry to be a candidate.
__device__ __forceinline__ u32 filtered_key(const float* __restrict__ pre, u32 cols, u32 b, u32 i,
                                            const unsigned char* __restrict__ cmask,
                                            const u32* __restrict__ fT, const int* __restrict__ fc) {
    u32 k = act_key(pre[(u64)b * cols + i]);
    if (k != 0u && cmask != 0 && cmask[i] == 0) k = 0u;
    if (k != 0u && fT != 0 && !(k > fT[i] || (k == fT[i] && (int)b <= fc[i]))) k = 0u;
    return k;
}

// Position of the need-th (1-based) entry with key == thr along a line, in index order; -1 when
// need == 0. All threads of the block call it; all get the answer.
__device__ int tie_cutoff(const float* __restrict__ pre, u32 rows, u32 cols, u32 line, int transposed,
                          const unsigned char* __restrict__ cmask, const u32* __restrict__ fT,
                          const int* __restrict__ fc, u32 thr, u32 need, u32* scan_scratch, int* s_cut) {
    if (need == 0u || thr == 0u || thr == NO_KEEP) return -1;
    u32 len = transposed ? rows : cols;
    if (threadIdx.x == 0) *s_cut = -1;
    __syncthreads();
    u32 base = 0;
    for (u32 p0 = 0; p0 < len && base < need; p0 += blockDim.x) {
        u32 p = p0 + threadIdx.x;
        u32 flag = 0;
        if (p < len) {
            u32 b = transposed ? p : line, i = transposed ? line : p;
            flag = filtered_key(pre, cols, b, i, cmask, fT, fc) == thr ? 1u : 0u;
        }
        u32 total;
        u32 before = block_exclusive_scan(flag, scan_scratch, &total);
        if (flag && base + before + 1u == need) *s_cut = (int)p;
        base += total;  // uniform across the block
    }
    __syncthreads();
    return *s_cut;
}

// Per line (row, or column when `transposed`): the threshold key thr[line] and tie cutoff
// cut[line] that keep the `budget` largest candidates, ties to the lower position. budget is
// kbuf[line] when kbuf is given, else k. Fewer candidates than the budget: keep all (thr = 0).
// One block per line; blockDim a multiple of 32.
extern "C" __global__ void sel_line_radix(const float* __restrict__ pre, u32 rows, u32 cols, int transposed,
                                          u32 k, const u32* __restrict__ kbuf,
                                          const unsigned char* __restrict__ cmask, const u32* __restrict__ fT,
                                          const int* __restrict__ fc, u32* __restrict__ thr_out,
                                          int* __restrict__ cut_out) {
    __shared__ u32 hist[RADIX_BINS];
    __shared__ u32 s_prefix, s_remaining, s_all;
    __shared__ u32 scan_scratch[WARP + 1];
    __shared__ int s_cut;
    const u32 line = blockIdx.x;
    const u32 len = transposed ? rows : cols;
    const u32 budget = kbuf ? kbuf[line] : k;
    if (budget == 0u) {
        if (threadIdx.x == 0) { thr_out[line] = NO_KEEP; cut_out[line] = -1; }
        return;
    }
    if (threadIdx.x == 0) { s_prefix = 0u; s_remaining = budget; s_all = 0u; }
    u32 mask = 0u;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (u32 t = threadIdx.x; t < RADIX_BINS; t += blockDim.x) hist[t] = 0u;
        __syncthreads();
        const u32 prefix = s_prefix;
        for (u32 p = threadIdx.x; p < len; p += blockDim.x) {
            u32 b = transposed ? p : line, i = transposed ? line : p;
            u32 key = filtered_key(pre, cols, b, i, cmask, fT, fc);
            if (key != 0u && (key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            if (shift == 24) {
                u32 total = 0;
                for (int t = 0; t < RADIX_BINS; t++) total += hist[t];
                if (total <= budget) s_all = 1u;
            }
            if (!s_all) {
                u32 cum = 0;
                for (int bin = RADIX_BINS - 1; bin >= 0; bin--) {
                    if (cum + hist[bin] >= s_remaining) {
                        s_prefix |= ((u32)bin) << shift;
                        s_remaining -= cum;
                        break;
                    }
                    cum += hist[bin];
                }
            }
        }
        __syncthreads();
        if (s_all) break;  // uniform
        mask |= 0xffu << shift;
    }
    u32 thr = s_all ? 0u : s_prefix;
    u32 need = s_all ? 0u : s_remaining;
    int cut = tie_cutoff(pre, rows, cols, line, transposed, cmask, fT, fc, thr, need, scan_scratch, &s_cut);
    if (threadIdx.x == 0) { thr_out[line] = thr; cut_out[line] = cut; }
}

// ---- whole-batch radix select (batchtopk, mutual_choice) ---------------------------------------
// state[0] prefix, [1] mask, [2] remaining, [3] keep-all flag. The host zeroes state and hist,
// sets state[2] = k*B, then runs (hist, pick) for shift = 24, 16, 8, 0.

extern "C" __global__ void sel_batch_hist(const float* __restrict__ pre, u64 n, const u32* __restrict__ state,
                                          u32* __restrict__ hist, u32 shift) {
    __shared__ u32 h[RADIX_BINS];
    for (u32 t = threadIdx.x; t < RADIX_BINS; t += blockDim.x) h[t] = 0u;
    __syncthreads();
    const u32 prefix = state[0], mask = state[1];
    if (state[3] == 0u) {
        for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (u64)gridDim.x * blockDim.x) {
            u32 key = act_key(pre[e]);
            if (key != 0u && (key & mask) == prefix) atomicAdd(&h[(key >> shift) & 0xffu], 1u);
        }
    }
    __syncthreads();
    for (u32 t = threadIdx.x; t < RADIX_BINS; t += blockDim.x)
        if (h[t]) atomicAdd(&hist[t], h[t]);
}

// One thread: choose this pass's digit, then clear the histogram for the next pass.
extern "C" __global__ void sel_batch_pick(u32* __restrict__ state, u32* __restrict__ hist, u32 shift) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (state[3] == 0u) {
        if (shift == 24u) {
            u64 total = 0;
            for (int t = 0; t < RADIX_BINS; t++) total += hist[t];
            if (total <= (u64)state[2]) state[3] = 1u;
        }
        if (state[3] == 0u) {
            u32 cum = 0;
            for (int bin = RADIX_BINS - 1; bin >= 0; bin--) {
                if (cum + hist[bin] >= state[2]) {
                    state[0] |= ((u32)bin) << shift;
                    state[2] -= cum;
                    break;
                }
                cum += hist[bin];
            }
            state[1] |= 0xffu << shift;
        }
    }
    for (int t = 0; t < RADIX_BINS; t++) hist[t] = 0u;
}

// Per row: how many entries equal the batch threshold key. One block per row.
extern "C" __global__ void sel_row_eq_count(const float* __restrict__ pre, u32 cols, const u32* __restrict__ state,
                                            u32* __restrict__ eq) {
    __shared__ float scratch[32];
    const u32 b = blockIdx.x;
    const u32 thr = state[0];
    float c = 0.f;  // counts < 2^24 per row, exact in f32
    if (state[3] == 0u)
        for (u32 i = threadIdx.x; i < cols; i += blockDim.x) c += act_key(pre[(u64)b * cols + i]) == thr ? 1.f : 0.f;
    c = block_sum(c, scratch);
    if (threadIdx.x == 0) eq[b] = (u32)c;
}

// Split the batch's `remaining` ties over rows in row order (lower flat index first), giving each
// row its threshold and the number of ties it keeps (in need_out; converted to a cutoff by
// sel_row_ties): row b keeps min(eq[b], remaining - ties of the rows before it), clamped at 0,
// which is what a greedy walk over the rows takes. One block; a scan over the rows in chunks.
extern "C" __global__ void sel_batch_split(const u32* __restrict__ state, const u32* __restrict__ eq, u32 rows,
                                           u32* __restrict__ thr_out, u32* __restrict__ need_out) {
    __shared__ u32 scan_scratch[WARP + 1];
    const int all = state[3] != 0u;
    const u32 thr = all ? 0u : state[0];
    const u32 remaining = all ? 0u : state[2];
    u32 carry = 0;  // ties of earlier chunks (< B x F < 2^32, which Ws::new enforces, as every sum here)
    for (u32 b0 = 0; b0 < rows; b0 += blockDim.x) {
        u32 b = b0 + threadIdx.x;
        u32 e = b < rows ? eq[b] : 0u;
        u32 total;
        u32 prior = carry + block_exclusive_scan(e, scan_scratch, &total);
        if (b < rows) {
            u32 left = prior < remaining ? remaining - prior : 0u;
            thr_out[b] = thr;
            need_out[b] = left < e ? (u32)left : e;
        }
        carry += total;
    }
}

// Per row: cutoff position of the row's need[b]-th tie. One block per row.
extern "C" __global__ void sel_row_ties(const float* __restrict__ pre, u32 rows, u32 cols, const u32* __restrict__ thr,
                                        const u32* __restrict__ need, int* __restrict__ cut_out) {
    __shared__ u32 scan_scratch[WARP + 1];
    __shared__ int s_cut;
    const u32 b = blockIdx.x;
    int cut = tie_cutoff(pre, rows, cols, b, 0, 0, 0, 0, thr[b], need[b], scan_scratch, &s_cut);
    if (threadIdx.x == 0) cut_out[b] = cut;
}

// ---- final mask -> CSR -----------------------------------------------------------------------
// mode SAE_MASK_THETA: v > 0 && v > theta[i] (theta null: relu); cmask applies.
// mode SAE_MASK_ROW: row rule (rT[b], rc[b]) on the filtered key.
// mode SAE_MASK_COL: column rule (cT[i], cc[i]) on the filtered key.
__device__ __forceinline__ bool keep_entry(const float* __restrict__ pre, u32 cols, u32 b, u32 i, int mode,
                                           const float* __restrict__ theta, const u32* __restrict__ T,
                                           const int* __restrict__ C, const unsigned char* __restrict__ cmask,
                                           const u32* __restrict__ fT, const int* __restrict__ fc) {
    if (mode == SAE_MASK_THETA) {
        float v = pre[(u64)b * cols + i];
        if (cmask != 0 && cmask[i] == 0) return false;
        return v > 0.f && (theta == 0 || v > theta[i]);
    }
    u32 key = filtered_key(pre, cols, b, i, cmask, fT, fc);
    if (key == 0u) return false;
    if (mode == SAE_MASK_ROW) return key > T[b] || (key == T[b] && (int)i <= C[b]);
    return key > T[i] || (key == T[i] && (int)b <= C[i]);
}

extern "C" __global__ void sel_mask_count(const float* __restrict__ pre, u32 cols, int mode,
                                          const float* __restrict__ theta, const u32* __restrict__ T,
                                          const int* __restrict__ C, const unsigned char* __restrict__ cmask,
                                          const u32* __restrict__ fT, const int* __restrict__ fc,
                                          u32* __restrict__ counts) {
    __shared__ float scratch[32];
    const u32 b = blockIdx.x;
    float c = 0.f;
    for (u32 i = threadIdx.x; i < cols; i += blockDim.x)
        c += keep_entry(pre, cols, b, i, mode, theta, T, C, cmask, fT, fc) ? 1.f : 0.f;
    c = block_sum(c, scratch);
    if (threadIdx.x == 0) counts[b] = (u32)c;
}

// Ordered compaction of row b's kept entries to idx/val[row_ptr[b]..], ascending latent.
extern "C" __global__ void sel_mask_fill(const float* __restrict__ pre, u32 cols, int mode,
                                         const float* __restrict__ theta, const u32* __restrict__ T,
                                         const int* __restrict__ C, const unsigned char* __restrict__ cmask,
                                         const u32* __restrict__ fT, const int* __restrict__ fc,
                                         const u32* __restrict__ row_ptr, u32* __restrict__ idx,
                                         float* __restrict__ val) {
    __shared__ u32 scan_scratch[WARP + 1];
    const u32 b = blockIdx.x;
    u32 out = row_ptr[b];
    for (u32 i0 = 0; i0 < cols; i0 += blockDim.x) {
        u32 i = i0 + threadIdx.x;
        u32 flag = (i < cols && keep_entry(pre, cols, b, i, mode, theta, T, C, cmask, fT, fc)) ? 1u : 0u;
        u32 total;
        u32 before = block_exclusive_scan(flag, scan_scratch, &total);
        if (flag) {
            idx[out + before] = i;
            val[out + before] = pre[(u64)b * cols + i];
        }
        out += total;
    }
}

// Exclusive prefix sum of n u32 into out[0..=n] (out[n] = total). One block of 1024 threads.
extern "C" __global__ void exclusive_scan(const u32* __restrict__ in, u32 n, u32* __restrict__ out) {
    __shared__ u32 scan_scratch[WARP + 1];
    u32 carry = 0;
    for (u32 i0 = 0; i0 < n; i0 += blockDim.x) {
        u32 i = i0 + threadIdx.x;
        u32 v = i < n ? in[i] : 0u;
        u32 total;
        u32 before = block_exclusive_scan(v, scan_scratch, &total);
        if (i < n) out[i] = carry + before;
        carry += total;
    }
    if (threadIdx.x == 0) out[n] = carry;
}
