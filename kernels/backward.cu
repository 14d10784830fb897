// Backward family (SPEC "Backward"): every product is over kept entries only (nnz * d).
// CPU twins: backend/cpu/backward.rs::{code_grads, latent_row_grads, b_dec_grad},
// model/aligned.rs::backprop_row, sparse.rs::by_latent.
#include "common.cuh"

// dz[e] = G_b . W_dec_i for every kept entry e = (b, i). One block per token; each warp takes
// entries of the row in turn, lanes along d.
extern "C" __global__ void code_grads(const u32* __restrict__ row_ptr, const u32* __restrict__ idx,
                                      const float* __restrict__ g, const float* __restrict__ w_dec, u32 d,
                                      float* __restrict__ dz) {
    const u32 b = blockIdx.x;
    const u32 lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    const float* gb = g + (u64)b * d;
    for (u32 e = row_ptr[b] + wid; e < row_ptr[b + 1]; e += nw) {
        const float* w = w_dec + (u64)idx[e] * d;
        float acc = 0.f;
        for (u32 j = lane; j < d; j += WARP) acc += gb[j] * w[j];
        acc = warp_sum(acc);
        if (lane == 0) dz[e] = acc;
    }
}

// norms[i] = ||W_dec_i||. One block per latent.
extern "C" __global__ void row_norms(const float* __restrict__ w, u32 d, float* __restrict__ norms) {
    __shared__ float scratch[32];
    const float* r = w + (u64)blockIdx.x * d;
    float s = 0.f;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) s += r[j] * r[j];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) norms[blockIdx.x] = sqrtf(s);
}

// relu's L1 term lambda * sum z_bi ||W_dec_i||: dpre[e] += lambda n_i and
// acc[SAE_ACC_L1] += lambda z n_i (a logged loss; acc zeroed by the host). One thread per entry.
// The per-latent code sums the decoder-norm gradient needs are taken by latent_grads, in token
// order: an f32 atomicAdd here would make them, and so the weights, differ run to run on a GPU.
extern "C" __global__ void l1_terms(const u32* __restrict__ idx, const float* __restrict__ val, u32 nnz,
                                    const float* __restrict__ norms, float lambda, float* __restrict__ dpre,
                                    double* __restrict__ acc) {
    u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= nnz) return;
    u32 i = idx[e];
    float n = norms[i], z = val[e];
    dpre[e] += lambda * n;
    atomicAdd(&acc[SAE_ACC_L1], (double)(lambda * z * n));
}

// ---- CSR -> per-latent (CSC) view: counting sort by latent ------------------------------------

// counts[i] = entries of latent i (counts zeroed by the host). One thread per entry.
extern "C" __global__ void csc_count(const u32* __restrict__ idx, u32 nnz, u32* __restrict__ counts) {
    u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < nnz) atomicAdd(&counts[idx[e]], 1u);
}

// Scatter entries into their latent's segment; the order inside a segment is arbitrary here and
// fixed by csc_sort. One block per token. cursor zeroed by the host.
extern "C" __global__ void csc_fill(const u32* __restrict__ row_ptr, const u32* __restrict__ idx,
                                    const u32* __restrict__ col_ptr, u32* __restrict__ cursor,
                                    u32* __restrict__ tok, u32* __restrict__ pos) {
    const u32 b = blockIdx.x;
    for (u32 e = row_ptr[b] + threadIdx.x; e < row_ptr[b + 1]; e += blockDim.x) {
        u32 i = idx[e];
        u32 slot = col_ptr[i] + atomicAdd(&cursor[i], 1u);
        tok[slot] = b;
        pos[slot] = e;
    }
}

// Sort each latent's segment by token (= by entry position, as the CPU's by_latent), so that the
// gradient sums below run in the CPU's order and are deterministic. One block per latent.
// Short segments (every sparsifier but early dense relu): rank = number of smaller positions,
// O(n^2) but n <= SAE_CSC_SHORT. Long ones: a latent occurs at most once per token (a code row
// holds each latent once), so its tokens are a set: mark them in a shared bitmap and read each
// token's rank off the popcounts before it, O(n + rows / 32) per latent instead of O(n^2) (a
// dense relu segment is up to the batch long). The bitmap covers SAE_CSC_WINDOW_WORDS * 32
// tokens; larger batches take one pass per window.
extern "C" __global__ void csc_sort(const u32* __restrict__ col_ptr, const u32* __restrict__ tok_in,
                                    const u32* __restrict__ pos_in, u32 rows, u32* __restrict__ tok_out,
                                    u32* __restrict__ pos_out) {
    __shared__ u32 bits[SAE_CSC_WINDOW_WORDS];
    __shared__ u32 before[SAE_CSC_WINDOW_WORDS];  // set bits in the window's earlier words
    __shared__ u32 scan_scratch[WARP + 1];
    const u32 i = blockIdx.x;
    const u32 s0 = col_ptr[i], s1 = col_ptr[i + 1];
    if (s1 - s0 <= SAE_CSC_SHORT) {
        for (u32 a = s0 + threadIdx.x; a < s1; a += blockDim.x) {
            u32 p = pos_in[a];
            u32 rank = 0;
            for (u32 c = s0; c < s1; c++) rank += pos_in[c] < p ? 1u : 0u;
            pos_out[s0 + rank] = p;
            tok_out[s0 + rank] = tok_in[a];
        }
        return;  // uniform over the block: no barrier is skipped by only some threads
    }
    const u32 span = SAE_CSC_WINDOW_WORDS * 32u;
    u32 placed = 0;  // entries of earlier windows
    for (u32 t0 = 0; t0 < rows; t0 += span) {
        const u32 left = rows - t0;
        const u32 nw = left >= span ? SAE_CSC_WINDOW_WORDS : (left + 31u) / 32u;
        for (u32 w = threadIdx.x; w < nw; w += blockDim.x) bits[w] = 0u;
        __syncthreads();
        for (u32 a = s0 + threadIdx.x; a < s1; a += blockDim.x) {
            u32 t = tok_in[a] - t0;  // wraps past span for tokens before the window
            if (t < span) atomicOr(&bits[t / 32u], 1u << (t % 32u));
        }
        __syncthreads();
        // Each thread takes a run of consecutive words; a block scan orders the runs.
        const u32 per = (nw + blockDim.x - 1) / blockDim.x;
        const u32 w0 = threadIdx.x * per < nw ? threadIdx.x * per : nw;
        const u32 w1 = w0 + per < nw ? w0 + per : nw;
        u32 mine = 0;
        for (u32 w = w0; w < w1; w++) mine += __popc(bits[w]);
        u32 total;
        u32 off = block_exclusive_scan(mine, scan_scratch, &total);
        for (u32 w = w0; w < w1; w++) {
            before[w] = off;
            off += __popc(bits[w]);
        }
        __syncthreads();
        for (u32 a = s0 + threadIdx.x; a < s1; a += blockDim.x) {
            u32 tok = tok_in[a], t = tok - t0;
            if (t >= span) continue;
            u32 w = t / 32u, below = bits[w] & ((1u << (t % 32u)) - 1u);
            u32 r = placed + before[w] + __popc(below);
            tok_out[s0 + r] = tok;
            pos_out[s0 + r] = pos_in[a];
        }
        placed += total;
        __syncthreads();  // bits and before are rewritten by the next window
    }
}

// Latent-row gradients of one group of entries (main codes, or the aux codes with accumulate=1):
//   dW_dec_i += sum z * G_b, dW_enc_i += sum dpre * xc_b, db_enc_i += sum dpre,
// and, when l1_sums is not null (relu's main codes), l1_sums[i] = sum z (in token order, so the
// same every run). accumulate = 0 overwrites (rows without entries become 0). One block per
// latent, threads along d.
extern "C" __global__ void latent_grads(const u32* __restrict__ col_ptr, const u32* __restrict__ tok,
                                        const u32* __restrict__ pos, const float* __restrict__ val,
                                        const float* __restrict__ dpre, const float* __restrict__ g,
                                        const float* __restrict__ xc, u32 d, int accumulate,
                                        float* __restrict__ dw_enc, float* __restrict__ db_enc,
                                        float* __restrict__ dw_dec, float* __restrict__ l1_sums) {
    const u32 i = blockIdx.x;
    const u32 s0 = col_ptr[i], s1 = col_ptr[i + 1];
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        float ge = accumulate ? dw_enc[(u64)i * d + j] : 0.f;
        float gd = accumulate ? dw_dec[(u64)i * d + j] : 0.f;
        for (u32 s = s0; s < s1; s++) {
            u32 b = tok[s], p = pos[s];
            gd += val[p] * g[(u64)b * d + j];
            ge += dpre[p] * xc[(u64)b * d + j];
        }
        dw_enc[(u64)i * d + j] = ge;
        dw_dec[(u64)i * d + j] = gd;
    }
    if (threadIdx.x == 0) {
        float bs = accumulate ? db_enc[i] : 0.f;
        for (u32 s = s0; s < s1; s++) bs += dpre[pos[s]];
        db_enc[i] = bs;
    }
    if (l1_sums && threadIdx.x == (blockDim.x > WARP ? WARP : 0)) {
        float z = 0.f;
        for (u32 s = s0; s < s1; s++) z += val[pos[s]];
        l1_sums[i] = z;
    }
}

// Per touched latent row (an entry in the main or aux codes): relu's decoder-norm term, then the
// aligned map's pull-back to (A, W_dec). The decoder projection is fused into adam_dec_rows.
// One block per latent.
extern "C" __global__ void latent_finish(const u32* __restrict__ col_ptr, const u32* __restrict__ aux_col_ptr,
                                         const float* __restrict__ a_all, const float* __restrict__ w_all, u32 d,
                                         const float* __restrict__ l1_sums, const float* __restrict__ norms,
                                         float lambda, int aligned, float* __restrict__ dw_enc,
                                         float* __restrict__ dw_dec) {
    __shared__ float scratch[32];
    const u32 i = blockIdx.x;
    // Rows no code touched have zero gradients, which this map leaves at zero: skip them when the
    // host says which rows were touched (col_ptr null: it cannot, e.g. after several aux groups).
    if (col_ptr) {
        u32 n = col_ptr[i + 1] - col_ptr[i];
        if (aux_col_ptr) n += aux_col_ptr[i + 1] - aux_col_ptr[i];
        if (n == 0) return;
    }
    const float* w = w_all + (u64)i * d;
    float* ge = dw_enc + (u64)i * d;
    float* gd = dw_dec + (u64)i * d;
    if (l1_sums && norms[i] > 0.f) {
        float c = lambda * l1_sums[i] / norms[i];
        for (u32 j = threadIdx.x; j < d; j += blockDim.x) gd[j] += c * w[j];
    }
    if (aligned) {
        const float* a = a_all + (u64)i * d;
        float aw = 0.f, ww = 0.f, gw = 0.f;
        for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
            aw += a[j] * w[j];
            ww += w[j] * w[j];
            gw += ge[j] * w[j];
        }
        aw = block_sum(aw, scratch);
        ww = block_sum(ww, scratch);
        gw = block_sum(gw, scratch);
        if (ww > 0.f) {
            float alpha = (1.f - aw) / ww, c = gw / ww;
            for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
                float gj = ge[j];
                ge[j] = gj - c * w[j];
                gd[j] += alpha * gj - c * (a[j] + 2.f * alpha * w[j]);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) ge[d - 1] = 0.f;
    }
}

// db_dec[j] = colsum_g[j] - sum_i db_enc[i] W_enc[i][j] (b_dec is subtracted from the input too):
// the sum over latents comes in parts from col_partials (weights db_enc, rows W_enc), added here
// in order. One thread per input dimension, f64 accumulation.
extern "C" __global__ void bdec_grad(const double* __restrict__ colsum_g, const double* __restrict__ part,
                                     u32 parts, u32 d, float* __restrict__ out) {
    u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    double acc = 0.0;
    for (u32 p = 0; p < parts; p++) acc += part[(u64)p * d + j];
    out[j] = (float)(colsum_g[j] - acc);
}
