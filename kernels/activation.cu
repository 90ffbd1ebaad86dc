// Activations and dropout, elementwise over flat element counts n (the fused ones over (rows, cols)).
//   gelu_fwd/bwd:    out = gelu(inp); dinp = dout · gelu'(inp), erf (approx = 0) or tanh form; these
//                    and tanh in 16-byte vectors where the pointers allow (common.cuh's map16, zip16)  (=)
//   tanh_fwd/bwd:    out = tanh(inp); dinp = dout · (1 − out²)                                          (=)
//   dropout_:        out = inp · keep(e) / (1 − p), keep from Philox at element e; the forward and the
//                    backward (the same mask) alike                                                   (=)
//   bias_gelu_fwd:   pre += bias (per row, in place); out = gelu(pre) — in 16-byte vectors where the
//                    width and the pointers allow                                                     (=)
//   gelu_bias_bwd:   dpre = dout · gelu'(pre) (=); stage 1 of dbias += Σ_r dpre (partials, summed by
//                    tensor.cu's sum_partials_f32); a 16-byte vector of columns per thread where the
//                    width and pointers allow                                                         (+=)
// GELU is computed from the values as stored (rounded to T), so the backward passes, which read the
// stored tensors, see exactly what the forward used. Elementwise kernels take their pointers, then n,
// then any scalar.
#include "common.cuh"

// The elementwise maps go through common.cuh's map16 / zip16: 16-byte vectors where the pointers allow.
template <typename T>
__device__ void gelu_fwd_impl(T* out, const T* inp, long n, int approx) {
    map16(out, inp, n, [&](float x) { return gelu_f(x, approx); });
}

template <typename T>
__device__ void gelu_bwd_impl(T* dinp, const T* dout, const T* inp, long n, int approx) {
    zip16(dinp, dout, inp, n, [&](float d, float x) { return d * gelu_grad_f(x, approx); });
}

template <typename T>
__device__ void tanh_fwd_impl(T* out, const T* inp, long n) {
    map16(out, inp, n, [](float x) { return tanhf(x); });
}

template <typename T>
__device__ void tanh_bwd_impl(T* dinp, const T* dout, const T* out, long n) {
    zip16(dinp, dout, out, n, [](float d, float y) { return d * (1.f - y * y); });
}

// A 16-byte vector per thread-step (4 fp32 or 8 bf16 elements: the outputs of one or two Philox calls);
// unaligned tensors and the tail (n mod the vector) one by one, with the same draws.
template <typename T>
__device__ void dropout_impl(T* out, const T* inp, long n, DropoutArgs d) {
    constexpr int V = 16 / sizeof(T);
    elementwise16<T>(
        n, aligned16(out) && aligned16(inp),
        [&](int k) {
            float x[V], f[V];
            load16<T>(x, inp + (long)k * V);
#pragma unroll
            for (int q = 0; q < V / 4; q++) dropout_factors4(d, (unsigned long long)k * V + 4 * q, f + 4 * q);
#pragma unroll
            for (int e = 0; e < V; e++) x[e] *= f[e];
            store16<T>(out + (long)k * V, x);
        },
        [&](long e) { out[e] = from_f32<T>(to_f32(inp[e]) * dropout_factor(d, (unsigned long long)e)); });
}

template <typename T>
__device__ void bias_gelu_impl(T* pre, T* out, const T* bias, long rows, int cols, int approx) {
    const long n = rows * cols;
    constexpr int V = 16 / sizeof(T);
    if (cols % V == 0 && n < (1L << 31) && aligned16(pre) && aligned16(out) && aligned16(bias)) {
        // 16-byte vectors (a row holds whole ones) and 32-bit indices.
        const int vectors = (int)(n / V), row_vectors_ = cols / V;
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += gridDim.x * blockDim.x) {
            float p[V], bv[V], o[V];
            load16<T>(p, pre + (long)i * V);
            load16<T>(bv, bias + (i % row_vectors_) * V);
#pragma unroll
            for (int e = 0; e < V; e++) {
                p[e] = to_f32(from_f32<T>(p[e] + bv[e]));  // GELU reads pre as stored
                o[e] = gelu_f(p[e], approx);
            }
            store16<T>(pre + (long)i * V, p);
            store16<T>(out + (long)i * V, o);
        }
        return;
    }
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const T p = from_f32<T>(to_f32(pre[i]) + to_f32(bias[i % cols]));
        pre[i] = p;
        out[i] = from_f32<T>(gelu_f(to_f32(p), approx));
    }
}

// Backward of out = gelu(pre), pre = x·Wᵀ + bias: block (k, y) handles rows [k·64, (k+1)·64) of the
// columns [y·blockDim·w, (y+1)·blockDim·w), w = `per_thread` consecutive columns per thread — a 16-byte
// vector (16 / sizeof(T) columns) where the launcher found the width and pointers allow, else one —
// coalesced across the warp; it writes dpre and the column sums of its rows to partial[k, c], summed in
// order by sum_partials (deterministic). The sums read dpre as stored, as the unfused bias_grad would.
template <typename T>
__device__ void gelu_bias_bwd_impl(T* __restrict__ dpre, float* __restrict__ partial, const T* __restrict__ dout,
                                   const T* __restrict__ pre, long rows, int cols, int approx, int per_thread) {
    constexpr int V = 16 / sizeof(T);
    const long r0 = (long)blockIdx.x * PARTIAL_ROWS, r1 = min(rows, r0 + PARTIAL_ROWS);
    if (per_thread == V) {
        const int c = (blockIdx.y * blockDim.x + threadIdx.x) * V;
        if (c >= cols) return;
        float s[V] = {};
        for (long r = r0; r < r1; r++) {
            const long e = r * cols + c;
            float d[V], x[V];
            load16<T>(d, dout + e);
            load16<T>(x, pre + e);
#pragma unroll
            for (int k = 0; k < V; k++) {
                d[k] = to_f32(from_f32<T>(d[k] * gelu_grad_f(x[k], approx)));
                s[k] += d[k];
            }
            store16<T>(dpre + e, d);
        }
#pragma unroll
        for (int k = 0; k < V; k++) partial[(long)blockIdx.x * cols + c + k] = s[k];
        return;
    }
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.f;
#pragma unroll 4
    for (long r = r0; r < r1; r++) {
        const long e = r * cols + c;
        const T d = from_f32<T>(to_f32(dout[e]) * gelu_grad_f(to_f32(pre[e]), approx));
        dpre[e] = d;
        s += to_f32(d);
    }
    partial[(long)blockIdx.x * cols + c] = s;
}

#define ACTIVATION(T, N)                                                                                      \
    BERTCUDA_KERNEL(gelu_fwd_##N, T* out, const T* inp, long n, int approx) {                                 \
        gelu_fwd_impl(out, inp, n, approx);                                                                   \
    }                                                                                                         \
    BERTCUDA_KERNEL(gelu_bwd_##N, T* dinp, const T* dout, const T* inp, long n, int approx) {                 \
        gelu_bwd_impl(dinp, dout, inp, n, approx);                                                            \
    }                                                                                                         \
    BERTCUDA_KERNEL(tanh_fwd_##N, T* out, const T* inp, long n) { tanh_fwd_impl(out, inp, n); }               \
    BERTCUDA_KERNEL(tanh_bwd_##N, T* dinp, const T* dout, const T* out, long n) {                             \
        tanh_bwd_impl(dinp, dout, out, n);                                                                    \
    }                                                                                                         \
    BERTCUDA_KERNEL(dropout_##N, T* out, const T* inp, long n, DropoutArgs d) {                               \
        dropout_impl(out, inp, n, d);                                                                         \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(ACTIVATION)

#define FUSED_ACTIVATION(T, N)                                                                                \
    BERTCUDA_KERNEL(bias_gelu_fwd_##N, T* pre, T* out, const T* bias, long rows, int cols, int approx) {      \
        bias_gelu_impl(pre, out, bias, rows, cols, approx);                                                   \
    }                                                                                                         \
    BERTCUDA_KERNEL(gelu_bias_bwd_##N, T* dpre, float* partial, const T* dout, const T* pre, long rows,       \
                    int cols, int approx, int per_thread) {                                                   \
        gelu_bias_bwd_impl(dpre, partial, dout, pre, rows, cols, approx, per_thread);                         \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(FUSED_ACTIVATION)
