// Generic tensor ops, no model math in them; flat element counts n, or (rows, c) row-major.
//   add_:              out[i] = a[i] + b[i]                                                         (=)
//   fill_:             x[i] = value                                                                 (=)
//   sum_partials_f32:  acc[c] += Σ_k partial[k·stride + c], k in order: the second stage of every
//                      two-stage reduction over rows (bias, LayerNorm and GELU + bias gradients)      (+=)
//   gather_rows_:      out[k] = inp[rows[k]]                                                        (=)
//   scatter_add_rows_: dinp[rows[k]] += dout[k]; rows are distinct (checked on the host): one block per
//                      row k, no two blocks write one row.                                          (+=)
// Elementwise kernels take their pointers, then n, then any scalar.
#include "common.cuh"

template <typename T>
__device__ void add_impl(T* out, const T* a, const T* b, long n) {
    zip16(out, a, b, n, [](float x, float y) { return x + y; });
}

template <typename T>
__device__ void fill_impl(T* x, float value, long n) {
    constexpr int V = 16 / sizeof(T);
    float v[V];
    for (int e = 0; e < V; e++) v[e] = value;
    elementwise16<T>(
        n, aligned16(x), [&](int k) { store16<T>(x + (long)k * V, v); }, [&](long e) { x[e] = from_f32<T>(value); });
}

// Stage 2: acc[c] += Σ_k partial[k·stride + c], k in order.
__device__ void sum_partials_impl(float* acc, const float* partial, int chunks, int cols, int stride) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int k = 0; k < chunks; k++) s += partial[(long)k * stride + c];
        acc[c] += s;
    }
}

template <typename T>
__device__ void gather_impl(T* out, const T* inp, const int* rows, int m, int c) {
    const int k = blockIdx.x;
    if (k >= m) return;
    for (int j = threadIdx.x; j < c; j += blockDim.x) out[(long)k * c + j] = inp[(long)rows[k] * c + j];
}

template <typename T>
__device__ void scatter_impl(T* dinp, const T* dout, const int* rows, int m, int c) {
    const int k = blockIdx.x;
    if (k >= m) return;
    T* d = dinp + (long)rows[k] * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) d[j] = from_f32<T>(to_f32(d[j]) + to_f32(dout[(long)k * c + j]));
}

#define TENSOR(T, N)                                                                                   \
    BERTCUDA_KERNEL(add_##N, T* out, const T* a, const T* b, long n) { add_impl(out, a, b, n); }         \
    BERTCUDA_KERNEL(fill_##N, T* x, long n, float value) { fill_impl(x, value, n); }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(TENSOR)

#define ROWS(T, N)                                                                                            \
    BERTCUDA_KERNEL(gather_rows_##N, T* out, const T* inp, const int* rows, int m, int c) {     \
        gather_impl(out, inp, rows, m, c);                                                                    \
    }                                                                                                         \
    BERTCUDA_KERNEL(scatter_add_rows_##N, T* dinp, const T* dout, const int* rows, int m, int c) {  \
        scatter_impl(dinp, dout, rows, m, c);                                                                 \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(ROWS)

BERTCUDA_KERNEL(sum_partials_f32, float* acc, const float* partial, int chunks, int cols, int stride) {
    sum_partials_impl(acc, partial, chunks, cols, stride);
}
