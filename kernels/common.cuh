// Shared helpers of the bertcuda kernels: storage types, warp/block reductions, Philox4x32-10.
//
// Storage types: float (fp32), __nv_bfloat16 (bf16) and __half (fp16); arithmetic is always fp32.
// Every kernel family is a template over the storage type, instantiated as extern "C" functions named
// <op>_<fwd|bwd>_<dtype>.
#pragma once

#ifndef BERTCUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#include <stdint.h>

#include "launch.cuh"

// A kernel: extern "C", named <op>_<fwd|bwd>_<dtype>. On the emulated device (emu/cuda_emu.h) it is also
// registered by name with its parameter list, which each launch is checked against.
#ifdef BERTCUDA_EMU
#define BERTCUDA_KERNEL(name, ...)                          \
    extern "C" void name(__VA_ARGS__);                      \
    static bcemu::Kernel bcemu_kernel_##name(#name, &name); \
    extern "C" void name(__VA_ARGS__)
#else
#define BERTCUDA_KERNEL(name, ...) extern "C" __global__ void name(__VA_ARGS__)
#endif

// ---- storage <-> fp32 ---------------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

// ---- reductions -----------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result. `shared`
// holds 32 floats. The order of additions is fixed by the thread layout: deterministic.
__device__ __forceinline__ float block_sum(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < warps ? shared[lane] : -INFINITY;
    return warp_max(v);
}

// ---- Philox4x32-10: the dropout masks of the CPU backend (src/backend/philox.rs), bit for bit ----------
__device__ __forceinline__ uint4 philox4x32(uint4 c, uint2 k) {
#pragma unroll
    for (int r = 0; r < 10; r++) {
        const uint32_t hi0 = __umulhi(0xD2511F53u, c.x), lo0 = 0xD2511F53u * c.x;
        const uint32_t hi1 = __umulhi(0xCD9E8D57u, c.z), lo1 = 0xCD9E8D57u * c.z;
        c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
        k.x += 0x9E3779B9u;
        k.y += 0xBB67AE85u;
    }
    return c;
}

// The 32-bit draw of element e: lane e mod 4 of the block at counter e / 4.
__device__ __forceinline__ uint32_t philox_draw(uint2 key, unsigned long long e) {
    const unsigned long long blk = e >> 2;
    const uint4 r = philox4x32(make_uint4((uint32_t)blk, (uint32_t)(blk >> 32), 0u, 0u), key);
    switch (e & 3) {
        case 0: return r.x;
        case 1: return r.y;
        case 2: return r.z;
        default: return r.w;
    }
}

// Dropout: kept when the draw is >= threshold (= p · 2^32), then scaled by 1/(1-p).
struct DropoutArgs {
    uint32_t key0, key1;
    uint32_t threshold;
    float inv_keep;
    int enabled;
};

__device__ __forceinline__ float dropout_factor(const DropoutArgs& d, unsigned long long e) {
    if (!d.enabled) return 1.f;
    return philox_draw(make_uint2(d.key0, d.key1), e) >= d.threshold ? d.inv_keep : 0.f;
}

// The factors of elements e0 .. e0 + 3, e0 a multiple of 4: the four outputs of one Philox call (the same
// draws as dropout_factor's, element by element).
__device__ __forceinline__ void dropout_factors4(const DropoutArgs& d, unsigned long long e0, float f[4]) {
    if (!d.enabled) {
        f[0] = f[1] = f[2] = f[3] = 1.f;
        return;
    }
    const unsigned long long blk = e0 >> 2;
    const uint4 r = philox4x32(make_uint4((uint32_t)blk, (uint32_t)(blk >> 32), 0u, 0u), make_uint2(d.key0, d.key1));
    f[0] = r.x >= d.threshold ? d.inv_keep : 0.f;
    f[1] = r.y >= d.threshold ? d.inv_keep : 0.f;
    f[2] = r.z >= d.threshold ? d.inv_keep : 0.f;
    f[3] = r.w >= d.threshold ? d.inv_keep : 0.f;
}

// GELU, the erf form (BERT's "gelu", approx = 0) or the tanh form (approx = 1), and its derivative.
__device__ __forceinline__ float gelu_f(float x, int approx) {
    if (approx) {
        const float c = 0.7978845608028654f;  // sqrt(2/pi)
        return 0.5f * x * (1.f + tanhf(c * (x + 0.044715f * x * x * x)));
    }
    return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
}

__device__ __forceinline__ float gelu_grad_f(float x, int approx) {
    if (approx) {
        const float c = 0.7978845608028654f, a = 0.044715f;
        const float t = tanhf(c * (x + a * x * x * x));
        return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * c * (1.f + 3.f * a * x * x);
    }
    const float cdf = 0.5f * (1.f + erff(x * 0.7071067811865476f));
    const float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
    return cdf + x * pdf;
}

// ---- LayerNorm of one row (norm.cu's fused LayerNorms, embedding.cu's embeddings + LayerNorm) ---------
// LayerNorm of the row already stored in `src` (fp32 statistics), written to `dst`.
template <typename T>
__device__ void layernorm_row(T* dst, float* mean, float* rstd, const T* src, const T* w, const T* b, int row, int c,
                              float eps, float sum) {
    const int lane = threadIdx.x & 31;
    const float mu = warp_sum(sum) / c;
    float v = 0.f;
    for (int j = lane; j < c; j += 32) {
        const float d = to_f32(src[j]) - mu;
        v += d * d;
    }
    const float rs = rsqrtf(warp_sum(v) / c + eps);
    for (int j = lane; j < c; j += 32) dst[j] = from_f32<T>((to_f32(src[j]) - mu) * rs * to_f32(w[j]) + to_f32(b[j]));
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// ---- rows in registers ---------------------------------------------------------------------------------
// Rows in registers: when a row's length is a multiple of V = 16 / sizeof(T) elements and at most
// 32·row_vectors<T>·V (bf16 rows up to 1024 elements, BERT-large's; fp32 rows up to 768), and every
// pointer is 16-byte aligned, each lane holds its vectors — elements
// (lane + 32·k)·V .. +V − 1 — in registers: every tensor read once and written once, with 16-byte accesses.
// Otherwise (odd widths) the lanes stride over the row element by element (layernorm_row).
template <typename T>
constexpr int row_vectors = sizeof(T) == 2 ? 4 : 6;

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

template <typename T>
__device__ __forceinline__ bool in_registers(int c) {
    constexpr int V = 16 / sizeof(T);
    return c % V == 0 && c <= 32 * row_vectors<T> * V;
}

template <typename T>
__device__ __forceinline__ void load16(float (&out)[16 / sizeof(T)], const T* p) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int k = 0; k < (int)(16 / sizeof(T)); k++) out[k] = to_f32(e[k]);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&in)[16 / sizeof(T)]) {
    uint4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int k = 0; k < (int)(16 / sizeof(T)); k++) e[k] = from_f32<T>(in[k]);
    *reinterpret_cast<uint4*>(p) = v;
}

// Elementwise over n elements of T, grid-stride: with every pointer 16-byte aligned and n below 2^31,
// thread i takes vectors i, i + threads, … of V = 16 / sizeof(T) elements (`vec(k)`: elements k·V …
// k·V + V − 1, 32-bit indices), then the tail (n mod V) element by element (`one(e)`); unaligned tensors
// element by element throughout.
template <typename T, typename Vec, typename One>
__device__ __forceinline__ void elementwise16(long n, bool aligned, Vec vec, One one) {
    constexpr int V = 16 / sizeof(T);
    const long first = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x;
    long done = 0;
    if (aligned && n < (1L << 31)) {
        const int vectors = (int)(n / V);
        for (int k = (int)first; k < vectors; k += (int)stride) vec(k);
        done = (long)vectors * V;
    }
    for (long e = done + first; e < n; e += stride) one(e);
}

// A unary elementwise map out = f(in) over n elements of T, in 16-byte vectors where elementwise16 allows.
template <typename T, typename F>
__device__ __forceinline__ void map16(T* out, const T* in, long n, F f) {
    constexpr int V = 16 / sizeof(T);
    elementwise16<T>(
        n, aligned16(out) && aligned16(in),
        [&](int k) {
            float x[V];
            load16<T>(x, in + (long)k * V);
#pragma unroll
            for (int e = 0; e < V; e++) x[e] = f(x[e]);
            store16<T>(out + (long)k * V, x);
        },
        [&](long e) { out[e] = from_f32<T>(f(to_f32(in[e]))); });
}

// A binary elementwise map out = f(a, b) over n elements of T, as map16.
template <typename T, typename F>
__device__ __forceinline__ void zip16(T* out, const T* a, const T* b, long n, F f) {
    constexpr int V = 16 / sizeof(T);
    elementwise16<T>(
        n, aligned16(out) && aligned16(a) && aligned16(b),
        [&](int k) {
            float x[V], y[V];
            load16<T>(x, a + (long)k * V);
            load16<T>(y, b + (long)k * V);
#pragma unroll
            for (int e = 0; e < V; e++) x[e] = f(x[e], y[e]);
            store16<T>(out + (long)k * V, x);
        },
        [&](long e) { out[e] = from_f32<T>(f(to_f32(a[e]), to_f32(b[e]))); });
}

// The elements of one row of `len` T, over a block's threads: element by element up to the row's first
// 16-byte boundary (`one(j)`), then 16-byte vectors (`vec(j)`: elements j … j + V − 1, V = 16 / sizeof(T)),
// then the tail element by element. Each thread meets its elements in increasing order.
template <typename T, typename Vec, typename One>
__device__ __forceinline__ void row16(const T* row, int len, Vec vec, One one) {
    constexpr int V = 16 / sizeof(T);
    const int misaligned = (int)(((uintptr_t)row & 15) / sizeof(T));
    const int head = ((uintptr_t)row % sizeof(T)) != 0 ? len : min(len, (V - misaligned) % V);
    const int vectors = (len - head) / V;
    for (int j = threadIdx.x; j < head; j += blockDim.x) one(j);
    for (int k = threadIdx.x; k < vectors; k += blockDim.x) vec(head + k * V);
    for (int j = head + vectors * V + threadIdx.x; j < len; j += blockDim.x) one(j);
}

// LayerNorm of a row held in registers (`sum`: this lane's part of its sum) into dst; mean and rstd saved.
template <typename T, int V>
__device__ __forceinline__ void layernorm_regs(T* dst, float* mean, float* rstd, const float (&v)[row_vectors<T>][V],
                                               const T* w, const T* b, int row, int c, float eps, float sum) {
    const int lane = threadIdx.x & 31;
    const float mu = warp_sum(sum) / c;
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < row_vectors<T>; k++)
        if ((lane + 32 * k) * V < c)
#pragma unroll
            for (int e = 0; e < V; e++) q += (v[k][e] - mu) * (v[k][e] - mu);
    const float rs = rsqrtf(warp_sum(q) / c + eps);
#pragma unroll
    for (int k = 0; k < row_vectors<T>; k++) {
        const int j = (lane + 32 * k) * V;
        if (j >= c) continue;
        float wv[V], bv[V], o[V];
        load16<T>(wv, w + j);
        load16<T>(bv, b + j);
#pragma unroll
        for (int e = 0; e < V; e++) o[e] = (v[k][e] - mu) * rs * wv[e] + bv[e];
        store16<T>(dst + j, o);
    }
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}


// The storage types every kernel template is instantiated for: fp32 and bf16 (the CUDA backend stores
// activations in fp32, or bf16 under --precision bf16; fp16 runs fp32 storage with fp16 tensor-core
// matrix products, so no kernel has an fp16 instantiation).
#define BERTCUDA_INSTANTIATE_FLOAT_TYPES(MACRO) \
    MACRO(float, f32)                           \
    MACRO(__nv_bfloat16, bf16)
