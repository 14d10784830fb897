// Optimiser family: Adam over the flat parameter buffer, the decoder rows' Adam fused with the
// gradient projection and the unit-norm renormalisation, and the per-latent statistics of a step
// (firing counts, smallest kept activation). The host folds those into the dead-latent counters,
// densities and the inference-threshold EMA with the CPU's own code (the state is F floats).
// CPU twins: backend/cpu/adam.rs, backend/cpu/mod.rs::update_tracking, sparsify/threshold.rs.
#include "common.cuh"

// p -= step * m / (sqrt(v) + eps) with m, v updated first; `step` and `eps` carry the bias
// corrections (see adam.rs::adam_step). One thread per element.
extern "C" __global__ void adam_flat(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, u64 n, float b1, float b2, float step, float eps) {
    u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    float gi = g[e];
    float mi = b1 * m[e] + (1.f - b1) * gi;
    float vi = b2 * v[e] + (1.f - b2) * gi * gi;
    m[e] = mi;
    v[e] = vi;
    p[e] -= step * mi / (sqrtf(vi) + eps);
}

// One decoder row per block: g <- g - (g.w / w.w) w (SPEC "Decoder constraint"), Adam on the row,
// then w <- w / ||w|| (norm accumulated in f64 like model/init.rs::normalize).
extern "C" __global__ void adam_dec_rows(float* __restrict__ w_all, float* __restrict__ g_all, float* __restrict__ m_all,
                                         float* __restrict__ v_all, u32 d, float b1, float b2, float step, float eps) {
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    const u64 row = (u64)blockIdx.x * d;
    float* w = w_all + row;
    float* g = g_all + row;
    float* m = m_all + row;
    float* v = v_all + row;
    float gw = 0.f, ww = 0.f;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        gw += g[j] * w[j];
        ww += w[j] * w[j];
    }
    gw = block_sum(gw, scratch);
    ww = block_sum(ww, scratch);
    const float c = ww > 0.f ? gw / ww : 0.f;
    double nn = 0.0;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        float gi = g[j] - c * w[j];
        g[j] = gi;  // the projected gradient, as the CPU's grad buffer holds it
        float mi = b1 * m[j] + (1.f - b1) * gi;
        float vi = b2 * v[j] + (1.f - b2) * gi * gi;
        m[j] = mi;
        v[j] = vi;
        float p = w[j] - step * mi / (sqrtf(vi) + eps);
        w[j] = p;
        nn += (double)p * (double)p;
    }
    nn = block_sum_d(nn, dscratch);
    if (nn > 0.0) {
        float inv = (float)(1.0 / sqrt(nn));
        for (u32 j = threadIdx.x; j < d; j += blockDim.x) w[j] *= inv;
    }
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
