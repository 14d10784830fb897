// Shared device helpers for every kernel family. No system or CUDA headers are included, so the
// same text compiles under nvcc and under NVRTC (which has no host include path).
#pragma once

typedef unsigned int u32;
typedef unsigned long long u64;

// ---- constants shared with Rust: build.rs mirrors every `#define SAE_NAME N` as a Rust const
// `NAME` in backend/cuda/kernels (ACC_*: slots of the step's f64 accumulator; MASK_*: the modes
// of the final selection mask), so host and kernels cannot disagree about a slot or a mode.
#define SAE_ACC_SSE 0        // sum ||x_b - x_hat_b||^2
#define SAE_ACC_TOTAL_VAR 1  // sum ||x_b - mean||^2
#define SAE_ACC_COS 2        // sum cos(x_b, x_hat_b)
#define SAE_ACC_L1 3         // relu's L1 penalty
#define SAE_ACC_AUX_NUM 4    // aux: ||E - E_hat||^2
#define SAE_ACC_AUX_DEN 5    // aux: ||E - mean(E)||^2
#define SAE_ACC_GRAD_SQ 6    // ||g||^2 of the whole gradient (--grad-clip)
#define SAE_ACC_SLOTS 8
#define SAE_MASK_THETA 0     // v > 0 && v > theta[i] (theta null: relu); cmask applies
#define SAE_MASK_ROW 1       // per-row cut (rT[b], rc[b]) on the filtered key
#define SAE_MASK_COL 2       // per-column cut (cT[i], cc[i]) on the filtered key
#define SAE_CSC_SHORT 32         // csc_sort: a latent's segment up to this long is rank-sorted pairwise
#define SAE_CSC_WINDOW_WORDS 1024 // csc_sort: tokens per bitmap pass, / 32 (2 x 4 KB of shared memory)
#define SAE_COLSUM_LANES 8       // col_partials: rows summed side by side in a block of 32 x LANES

#define WARP 32
#define FULL_MASK 0xffffffffu

// ---- reductions -------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    return v;  // valid in lane 0
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ u32 warp_sum_u(u32 v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds >= 32 floats. blockDim.x must be a
// multiple of 32 (launch.rs asserts it).
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    float t = (threadIdx.x < nw) ? scratch[threadIdx.x] : 0.0f;
    if (wid == 0) t = warp_sum(t);
    if (threadIdx.x == 0) scratch[0] = t;
    __syncthreads();
    return scratch[0];
}

__device__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    double t = (threadIdx.x < nw) ? scratch[threadIdx.x] : 0.0;
    if (wid == 0) t = warp_sum_d(t);
    if (threadIdx.x == 0) scratch[0] = t;
    __syncthreads();
    return scratch[0];
}

// Exclusive prefix sum of one u32 per thread across the block, in thread order; `total` gets the
// block's sum. `scratch` holds >= 33 u32.
__device__ u32 block_exclusive_scan(u32 v, u32* scratch, u32* total) {
    int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    u32 incl = v;
    for (int o = 1; o < WARP; o <<= 1) {
        u32 n = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == WARP - 1) scratch[wid] = incl;
    __syncthreads();
    if (wid == 0) {
        u32 w = (lane < nw) ? scratch[lane] : 0u;
        u32 wi = w;
        for (int o = 1; o < WARP; o <<= 1) {
            u32 n = __shfl_up_sync(FULL_MASK, wi, o);
            if (lane >= o) wi += n;
        }
        scratch[lane] = wi - w;  // exclusive offset of warp `lane`
        if (lane == WARP - 1) scratch[WARP] = wi;
    }
    __syncthreads();
    u32 out = scratch[wid] + incl - v;
    *total = scratch[WARP];
    return out;
}

// ---- number formats (bit-level, no cuda_fp16.h / cuda_bf16.h) ---------------------------------

__device__ __forceinline__ float bf16_bits_to_float(unsigned short h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u32 round = 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)((u + round) >> 16);
}

__device__ __forceinline__ float f16_bits_to_float(unsigned short h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 exp = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x3ffu;
    u32 out;
    if (exp == 0) {
        if (man == 0) {
            out = sign;
        } else {  // subnormal: renormalise
            int e = -1;
            do { man <<= 1; e++; } while ((man & 0x400u) == 0);
            man &= 0x3ffu;
            out = sign | ((u32)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 0x1f) {
        out = sign | 0x7f800000u | (man << 13);
    } else {
        out = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return __uint_as_float(out);
}

// ---- selection keys ---------------------------------------------------------------------------

// Order-preserving key of an activation: strictly positive finite/inf floats map to their bit
// pattern (monotone for positive IEEE floats); everything else (<= 0, NaN) maps to 0, "not a
// candidate". Larger key = larger value; equal keys = equal values.
__device__ __forceinline__ u32 act_key(float v) {
    return (v > 0.0f) ? __float_as_uint(v) : 0u;
}

// Float atomic max/min on non-negative values through their bit patterns.
__device__ __forceinline__ void atomic_min_pos(u32* addr, float v) { atomicMin(addr, __float_as_uint(v)); }
