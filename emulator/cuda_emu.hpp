// The CUDA built-ins the kernels use, for compiling kernels/*.cu as ordinary C++ on the host.
//
// Each emulated thread is a fiber (see runtime.cpp): a block's threads run on the launching OS
// thread, one at a time, switching only at __syncthreads() and at warp shuffles; the blocks of a
// grid run one after another. Because nothing is preempted, atomics are plain read-modify-writes
// and __shared__ arrays are per-OS-thread statics shared by the block's fibers.
//
// What this does not model (see docs/cuda.md, "The emulator"): inter-block races, the memory model,
// timing, and the exact rounding of nvcc's fused multiply-adds.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

struct dim3 {
    unsigned x, y, z;
};

namespace emu {

// The running thread's coordinates; `thread` is rewritten by the scheduler at every switch.
struct Coords {
    dim3 thread, block, block_dim, grid_dim;
};
extern thread_local const Coords* cur;

// Barriers: every live thread of the block / of the calling warp must arrive.
void block_barrier();
void warp_barrier();
// Warp exchange slot of the calling thread, and that of lane `lane` of its warp.
uint64_t* my_slot();
uint64_t warp_slot(unsigned lane);
// Report a kernel bug (wrong mask, ...) and end the launch with an error.
[[noreturn]] void fail(const char* what);

template <class T>
inline T shuffle_from(unsigned mask, T v, int src_lane, bool take) {
    static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
    if (mask != 0xffffffffu) fail("warp shuffle with a partial mask (the kernels use FULL_MASK only)");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    *my_slot() = bits;
    warp_barrier();  // every lane has written
    uint64_t got = take ? warp_slot((unsigned)src_lane) : bits;
    warp_barrier();  // every lane has read before anyone writes again
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

}  // namespace emu

#define threadIdx (emu::cur->thread)
#define blockIdx (emu::cur->block)
#define blockDim (emu::cur->block_dim)
#define gridDim (emu::cur->grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static thread_local

inline void __syncthreads() { emu::block_barrier(); }

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)(threadIdx.x % 32u), seg = lane % width, src = lane + (int)delta;
    return emu::shuffle_from(mask, v, src, seg + (int)delta < width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = (int)(threadIdx.x % 32u), seg = lane % width, src = lane - (int)delta;
    return emu::shuffle_from(mask, v, src, seg >= (int)delta);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = (int)(threadIdx.x % 32u), src = lane ^ lane_mask;
    return emu::shuffle_from(mask, v, src, (src / width) == (lane / width));
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    int lane = (int)(threadIdx.x % 32u);
    return emu::shuffle_from(mask, v, (lane / width) * width + src_lane % width, true);
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }

// Atomics: no thread is preempted between the load and the store (see above), so a plain
// read-modify-write is atomic here. Each returns the old value, as CUDA's do.
template <class T, class U>
inline T atomicAdd(T* a, U v) {
    T old = *a;
    *a = old + (T)v;
    return old;
}
template <class T, class U>
inline T atomicMin(T* a, U v) {
    T old = *a;
    if ((T)v < old) *a = (T)v;
    return old;
}
template <class T, class U>
inline T atomicMax(T* a, U v) {
    T old = *a;
    if ((T)v > old) *a = (T)v;
    return old;
}
template <class T, class U>
inline T atomicExch(T* a, U v) {
    T old = *a;
    *a = (T)v;
    return old;
}
template <class T, class U>
inline T atomicCAS(T* a, U cmp, U v) {
    T old = *a;
    if (old == (T)cmp) *a = (T)v;
    return old;
}

template <class T, class U>
inline T atomicOr(T* a, U v) {
    T old = *a;
    *a = old | (T)v;
    return old;
}

inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
