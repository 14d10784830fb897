// Decode family: sparse reconstruction and the residual statistics of the loss.
// CPU twins: backend/cpu/forward.rs::{decode, residual_stats, column_sums}, cpu/aux.rs.
#include "common.cuh"

// out[b] = sum_{e in row b} val[e] * W_dec[idx[e]] (+ b_dec): cost nnz * d. One block per token,
// threads along d (coalesced reads of each gathered decoder row).
extern "C" __global__ void decode_rows(const u32* __restrict__ row_ptr, const u32* __restrict__ idx,
                                       const float* __restrict__ val, const float* __restrict__ w_dec,
                                       const float* __restrict__ b_dec, u32 d, float* __restrict__ out) {
    const u32 b = blockIdx.x;
    const u32 e0 = row_ptr[b], e1 = row_ptr[b + 1];
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = b_dec ? b_dec[j] : 0.f;
        for (u32 e = e0; e < e1; e++) acc += val[e] * w_dec[(u64)idx[e] * d + j];
        out[(u64)b * d + j] = acc;
    }
}

// resid = x_hat - x, g = scale * resid (scale = 2/B: dL_rec/dx_hat). One thread per element.
extern "C" __global__ void residual_grad(const float* __restrict__ x, const float* __restrict__ x_hat, u64 n,
                                         float scale, float* __restrict__ resid, float* __restrict__ g) {
    u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) {
        float r = x_hat[e] - x[e];
        resid[e] = r;
        g[e] = scale * r;
    }
}

// Column sums in two passes, so that a long column is summed by many blocks and the result is
// still the same every run (no float atomics): col_partials writes part[p][j] = sum over the rows
// of part p (rows p * per_part ..) of w[b] x[b][j] in f64 (w null: 1; rows with w[b] = 0 are
// skipped, a whole warp at a time), then col_sums_finish or bdec_grad add the parts in order.
// Block: 32 columns x SAE_COLSUM_LANES row lanes; grid (column groups, parts).
extern "C" __global__ void col_partials(const float* __restrict__ x, const float* __restrict__ w, u32 rows, u32 d,
                                        u32 per_part, double* __restrict__ part) {
    __shared__ double lanes[SAE_COLSUM_LANES][WARP];
    const u32 lane = threadIdx.x % WARP, row_lane = threadIdx.x / WARP, nl = blockDim.x / WARP;
    const u32 j = blockIdx.x * WARP + lane;
    const u64 r0 = (u64)blockIdx.y * per_part;
    const u64 r1 = r0 + per_part < rows ? r0 + per_part : rows;
    double acc = 0.0;
    if (j < d)
        for (u64 b = r0 + row_lane; b < r1; b += nl) {
            float c = w ? w[b] : 1.f;
            if (c != 0.f) acc += (double)c * (double)x[b * d + j];
        }
    lanes[row_lane][lane] = acc;
    __syncthreads();
    if (row_lane == 0 && j < d) {
        double s = 0.0;
        for (u32 l = 0; l < nl; l++) s += lanes[l][lane];
        part[(u64)blockIdx.y * d + j] = s;
    }
}

// sum_b x[b][j]: the parts of col_partials added in order, into out (f64) or, where out is null,
// out32 (f32). One thread per column.
extern "C" __global__ void col_sums_finish(const double* __restrict__ part, u32 parts, u32 d, double* __restrict__ out,
                                           float* __restrict__ out32) {
    u32 j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    double acc = 0.0;
    for (u32 p = 0; p < parts; p++) acc += part[(u64)p * d + j];
    if (out)
        out[j] = acc;
    else
        out32[j] = (float)acc;
}

// acc[SSE] += sum ||x_b - xh_b||^2, acc[TOTAL_VAR] += sum ||x_b - mean||^2, acc[COS] += sum cos;
// mean = col_sums / rows. One block per token; acc zeroed by the host.
extern "C" __global__ void row_stats(const float* __restrict__ x, const float* __restrict__ xh,
                                     const double* __restrict__ colsum, u32 rows, u32 d, double* __restrict__ acc) {
    __shared__ double scratch[32];
    const u32 b = blockIdx.x;
    double se = 0, tv = 0, xx = 0, hh = 0, xhp = 0;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        double a = x[(u64)b * d + j], h = xh[(u64)b * d + j], m = colsum[j] / (double)rows;
        se += (a - h) * (a - h);
        tv += (a - m) * (a - m);
        xx += a * a;
        hh += h * h;
        xhp += a * h;
    }
    se = block_sum_d(se, scratch);
    tv = block_sum_d(tv, scratch);
    xx = block_sum_d(xx, scratch);
    hh = block_sum_d(hh, scratch);
    xhp = block_sum_d(xhp, scratch);
    if (threadIdx.x == 0) {
        atomicAdd(&acc[SAE_ACC_SSE], se);
        atomicAdd(&acc[SAE_ACC_TOTAL_VAR], tv);
        double den = sqrt(xx * hh);
        atomicAdd(&acc[SAE_ACC_COS], den > 0.0 ? xhp / den : 0.0);
    }
}

// aux loss sums with E = -resid: acc[AUX_NUM] += ||E - E_hat||^2, acc[AUX_DEN] += ||E - mean(E)||^2,
// where mean(E)_j = -resid_colsum[j] / rows. One block per token.
extern "C" __global__ void aux_sums(const float* __restrict__ resid, const float* __restrict__ e_hat,
                                    const double* __restrict__ resid_colsum, u32 rows, u32 d,
                                    double* __restrict__ acc) {
    __shared__ double scratch[32];
    const u32 b = blockIdx.x;
    double num = 0, den = 0;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        double e = -(double)resid[(u64)b * d + j];
        double m = -resid_colsum[j] / (double)rows;
        double h = e_hat[(u64)b * d + j];
        num += (e - h) * (e - h);
        den += (e - m) * (e - m);
    }
    num = block_sum_d(num, scratch);
    den = block_sum_d(den, scratch);
    if (threadIdx.x == 0) {
        atomicAdd(&acc[SAE_ACC_AUX_NUM], num);
        atomicAdd(&acc[SAE_ACC_AUX_DEN], den);
    }
}

// g_aux = c * (resid + e_hat), c = 2 alpha / den. One thread per element.
extern "C" __global__ void aux_grad(const float* __restrict__ resid, const float* __restrict__ e_hat, float c, u64 n,
                                    float* __restrict__ g) {
    u64 e = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) g[e] = c * (resid[e] + e_hat[e]);
}
