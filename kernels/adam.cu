// Optimiser family: Adam over the flat parameter buffer (with AdamW's decay and the gradient
// clipping factor folded in), the decoder rows' Adam fused with the gradient projection and the
// unit-norm renormalisation, the gradient's squared norm, and the per-latent statistics of a step
// (firing counts, smallest kept activation). The host folds those into the dead-latent counters,
// densities and the inference-threshold EMA with the CPU's own code (the state is F floats).
// CPU twins: backend/cpu/adam.rs, backend/cpu/clip.rs, backend/cpu/mod.rs::update_tracking,
// sparsify/threshold.rs.
#include "common.cuh"

// The gradient-clipping factor min(1, clip / (||g|| + 1e-6)) from the f64 sum of squares in
// *gsq (torch.nn.utils.clip_grad_norm_; the CPU twin is cpu/clip.rs::coefficient, the same
// formula in the same precisions). clip <= 0: off, and gsq is not read (it may be null).
__device__ __forceinline__ float clip_coef(const double* gsq, float clip) {
    if (clip <= 0.f) return 1.f;
    double c = (double)clip / (sqrt(*gsq) + 1e-6);
    return c < 1.0 ? (float)c : 1.f;
}

// p <- p * decay - step * m / (sqrt(v) + eps) with m, v updated first from g * clip_coef;
// `step` and `eps` carry the bias corrections (see adam.rs::adam_step), `decay` is AdamW's
// 1 - lr * wd (1 for the biases). One thread per element.
extern "C" __global__ void adam_flat(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, u64 n, float b1, float b2, float step, float eps,
                                     float decay, const double* __restrict__ gsq, float clip) {
    u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    float gi = g[e] * clip_coef(gsq, clip);
    float mi = b1 * m[e] + (1.f - b1) * gi;
    float vi = b2 * v[e] + (1.f - b2) * gi * gi;
    m[e] = mi;
    v[e] = vi;
    p[e] = p[e] * decay - step * mi / (sqrtf(vi) + eps);
}

// g <- g - (g.w / w.w) w on one decoder row (one block), the projection adam_dec_rows and
// sum_sq_dec_rows both use, so that the norm clipped is that of the gradient Adam sees.
__device__ float dec_row_projection(const float* w, const float* g, u32 d, float* scratch) {
    float gw = 0.f, ww = 0.f;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        gw += g[j] * w[j];
        ww += w[j] * w[j];
    }
    gw = block_sum(gw, scratch);
    ww = block_sum(ww, scratch);
    return ww > 0.f ? gw / ww : 0.f;
}

// One decoder row per block: g <- g - (g.w / w.w) w (SPEC "Decoder constraint"), times the
// clipping factor, Adam on the row with AdamW's decay, then w <- w / ||w|| (norm accumulated in
// f64 like model/init.rs::normalize).
extern "C" __global__ void adam_dec_rows(float* __restrict__ w_all, float* __restrict__ g_all, float* __restrict__ m_all,
                                         float* __restrict__ v_all, u32 d, float b1, float b2, float step, float eps,
                                         float decay, const double* __restrict__ gsq, float clip) {
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    const u64 row = (u64)blockIdx.x * d;
    float* w = w_all + row;
    float* g = g_all + row;
    float* m = m_all + row;
    float* v = v_all + row;
    const float c = dec_row_projection(w, g, d, scratch);
    const float cc = clip_coef(gsq, clip);
    double nn = 0.0;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        float gi = g[j] - c * w[j];
        g[j] = gi;  // the projected gradient, as the CPU's grad buffer holds it
        gi *= cc;
        float mi = b1 * m[j] + (1.f - b1) * gi;
        float vi = b2 * v[j] + (1.f - b2) * gi * gi;
        m[j] = mi;
        v[j] = vi;
        float p = w[j] * decay - step * mi / (sqrtf(vi) + eps);
        w[j] = p;
        nn += (double)p * (double)p;
    }
    nn = block_sum_d(nn, dscratch);
    if (nn > 0.0) {
        float inv = (float)(1.0 / sqrt(nn));
        for (u32 j = threadIdx.x; j < d; j += blockDim.x) w[j] *= inv;
    }
}

// *out += sum x_e^2 over e < n in f64 (the gradient's squared norm for --grad-clip): a
// grid-stride loop, one block reduction and one atomicAdd per block.
extern "C" __global__ void sum_sq(const float* __restrict__ x, u64 n, double* __restrict__ out) {
    __shared__ double dscratch[32];
    double s = 0.0;
    for (u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (u64)gridDim.x * blockDim.x) {
        double v = (double)x[e];
        s += v * v;
    }
    s = block_sum_d(s, dscratch);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// *out += ||g_i - (g_i.w_i / w_i.w_i) w_i||^2 summed over the decoder rows (one block per row):
// the squared norm of the projected gradient adam_dec_rows will use, without writing it.
extern "C" __global__ void sum_sq_dec_rows(const float* __restrict__ w_all, const float* __restrict__ g_all, u32 d,
                                           double* __restrict__ out) {
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    const u64 row = (u64)blockIdx.x * d;
    const float* w = w_all + row;
    const float* g = g_all + row;
    const float c = dec_row_projection(w, g, d, scratch);
    double s = 0.0;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        double gi = (double)(g[j] - c * w[j]);
        s += gi * gi;
    }
    s = block_sum_d(s, dscratch);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// counts[i] += 1 and minbits[i] = min(minbits[i], val) for every kept entry (i, val). Kept values
// are > 0, so the float bit patterns order like the values. counts zeroed and minbits set to
// 0xffffffff by the host. One thread per entry.
extern "C" __global__ void latent_stats(const u32* __restrict__ idx, const float* __restrict__ val, u32 nnz,
                                        u32* __restrict__ counts, u32* __restrict__ minbits) {
    u32 e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= nnz) return;
    u32 i = idx[e];
    atomicAdd(&counts[i], 1u);
    atomic_min_pos(&minbits[i], val[e]);
}
