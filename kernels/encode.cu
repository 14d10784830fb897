// Encoder family: input conversion, centring, the aligned encoder map, the bias/ReLU epilogue of
// the cuBLAS path and the hand-written tiled GEMM used when cuBLAS cannot be loaded.
// CPU twins: backend/cpu/forward.rs::center, model/aligned.rs::effective_encoder,
// backend/cpu/gemm.rs::encode.
#include "common.cuh"

// x (n halves as raw bits) -> f32. One thread per element.
extern "C" __global__ void convert_f16_to_f32(const unsigned short* __restrict__ in, float* __restrict__ out, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f16_bits_to_float(in[i]);
}

extern "C" __global__ void convert_bf16_to_f32(const unsigned short* __restrict__ in, float* __restrict__ out, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_bits_to_float(in[i]);
}

extern "C" __global__ void convert_f32_to_bf16(const float* __restrict__ in, unsigned short* __restrict__ out, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = float_to_bf16_bits(in[i]);
}

// xc = x - b_dec, row-major rows x d. One thread per element.
extern "C" __global__ void center(const float* __restrict__ x, const float* __restrict__ b_dec,
                                  float* __restrict__ xc, u32 d, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) xc[i] = x[i] - b_dec[i % d];
}

// Aligned training: W_enc_i = A_i + alpha_i W_dec_i, alpha_i = (1 - A_i.W_dec_i)/||W_dec_i||^2
// (0 when the decoder row is zero). One block per latent row.
extern "C" __global__ void aligned_encoder(const float* __restrict__ a, const float* __restrict__ w_dec,
                                           float* __restrict__ out, u32 d) {
    __shared__ float scratch[32];
    u64 row = (u64)blockIdx.x * d;
    float aw = 0.f, ww = 0.f;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        float av = a[row + j], wv = w_dec[row + j];
        aw += av * wv;
        ww += wv * wv;
    }
    aw = block_sum(aw, scratch);
    ww = block_sum(ww, scratch);
    float alpha = ww > 0.f ? (1.f - aw) / ww : 0.f;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) out[row + j] = a[row + j] + alpha * w_dec[row + j];
}

// Epilogue of the cuBLAS product: pre[b][i] = ReLU(pre[b][i] + b_enc[i]). ReLU here is exact
// with respect to every sparsifier: only strictly positive entries can ever be kept.
extern "C" __global__ void bias_relu(float* __restrict__ pre, const float* __restrict__ b_enc, u32 f, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = pre[i] + b_enc[i % f];
        pre[i] = v > 0.f ? v : 0.f;
    }
}

// The fused encoder: pre (rows x f) = xc (rows x d) * W^T + b_enc, kept where it is > 0 and,
// when `theta` is given (JumpReLU inference), > theta[c]; zero elsewhere. W is f x d row-major
// (both operands contiguous along d). When `hist` is given, the epilogue also adds the top byte
// of every kept value's key to hist[256]: the first pass of batchtopk's radix select, which then
// starts at its second digit instead of reading B x F again.
// Block tile GEMM_BM x GEMM_BN, K tile GEMM_BK, 256 threads, each computing a 4 x 4 micro-tile.
// Grid and block are fixed in launch.rs::gemm_fallback.
#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 16
extern "C" __global__ void gemm_encode_fused(const float* __restrict__ xc, const float* __restrict__ w,
                                             const float* __restrict__ b_enc, const float* __restrict__ theta,
                                             float* __restrict__ pre, u32 rows, u32 f, u32 d,
                                             u32* __restrict__ hist) {
    __shared__ float As[GEMM_BK][GEMM_BM + 1];  // As[k][m] = xc[row0+m][k0+k]
    __shared__ float Bs[GEMM_BK][GEMM_BN + 1];  // Bs[k][n] = w[col0+n][k0+k]
    __shared__ u32 h[256];
    if (hist)
        for (u32 t = threadIdx.x; t < 256; t += blockDim.x) h[t] = 0u;
    __syncthreads();
    const u32 row0 = blockIdx.y * GEMM_BM, col0 = blockIdx.x * GEMM_BN;
    const u32 tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // 16 x 16 threads
    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
    for (u32 k0 = 0; k0 < d; k0 += GEMM_BK) {
        // 64 x 16 elements per operand, 256 threads: 4 each. Consecutive threads read along k.
        for (u32 l = threadIdx.x; l < GEMM_BM * GEMM_BK; l += blockDim.x) {
            u32 m = l / GEMM_BK, k = l % GEMM_BK;
            u32 r = row0 + m, c = col0 + m, kk = k0 + k;
            As[k][m] = (r < rows && kk < d) ? xc[(u64)r * d + kk] : 0.f;
            Bs[k][m] = (c < f && kk < d) ? w[(u64)c * d + kk] : 0.f;
        }
        __syncthreads();
        for (u32 k = 0; k < GEMM_BK; k++) {
            float a[4], b[4];
            for (int i = 0; i < 4; i++) a[i] = As[k][ty * 4 + i];
            for (int j = 0; j < 4; j++) b[j] = Bs[k][tx * 4 + j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; i++) {
        u32 r = row0 + ty * 4 + i;
        if (r >= rows) continue;
        for (int j = 0; j < 4; j++) {
            u32 c = col0 + tx * 4 + j;
            if (c >= f) continue;
            float v = acc[i][j] + b_enc[c];
            bool keep = v > 0.f && (theta == 0 || v > theta[c]);
            pre[(u64)r * f + c] = keep ? v : 0.f;
            if (hist && keep) atomicAdd(&h[act_key(v) >> 24], 1u);
        }
    }
    if (hist) {  // uniform across the block
        __syncthreads();
        for (u32 t = threadIdx.x; t < 256; t += blockDim.x)
            if (h[t]) atomicAdd(&hist[t], h[t]);
    }
}
