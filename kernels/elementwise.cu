// Elementwise ops and row reductions.
//   add_fwd:        out[i] = a[i] + b[i]                                   (=)
//   bias_add_fwd:   out[r, c] += bias[c]                                   (+= on an activation being built)
//   bias_grad_*:    dbias[c] += Σ_r dout[r, c], two stages                (+=, parameter gradient)
//   scale_fwd:      x[i] *= factor                                          (in place)
//   fill_fwd:       x[i] = value                                            (=)
// Elementwise kernels take their pointers, then n, then any scalar.
//   gelu_fwd/bwd:   out = gelu(inp); dinp = dout · gelu'(inp), erf (approx = 0) or tanh form   (=)
//   tanh_fwd/bwd:   out = tanh(inp); dinp = dout · (1 − out²)                                 (=)
//   dropout_fwd/bwd: out = inp · keep(e) / (1 − p), keep from Philox at element e            (=)
// Shapes are flat element counts n, or (rows, cols) row-major.
#include "common.cuh"

template <typename T>
__device__ void add_impl(T* out, const T* a, const T* b, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename T>
__device__ void bias_add_impl(T* out, const T* bias, long rows, int cols) {
    const long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(to_f32(out[i]) + to_f32(bias[i % cols]));
}

// Stage 1: block (k, y) sums rows [k·64, (k+1)·64) of the columns [y·blockDim, (y+1)·blockDim) into
// partial[k, c], one column per thread.
template <typename T>
__device__ void bias_grad_partial_impl(float* __restrict__ partial, const T* __restrict__ dout, long rows, int cols) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long r0 = (long)blockIdx.x * PARTIAL_ROWS, r1 = min(rows, r0 + PARTIAL_ROWS);
    float s = 0.f;
#pragma unroll 4
    for (long r = r0; r < r1; r++) s += to_f32(dout[r * cols + c]);
    partial[(long)blockIdx.x * cols + c] = s;
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
__device__ void scale_impl(T* x, float factor, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) * factor);
}

template <typename T>
__device__ void fill_impl(T* x, float value, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(value);
}

template <typename T>
__device__ void gelu_fwd_impl(T* out, const T* inp, long n, int approx) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(gelu_f(to_f32(inp[i]), approx));
}

template <typename T>
__device__ void gelu_bwd_impl(T* dinp, const T* dout, const T* inp, long n, int approx) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        dinp[i] = from_f32<T>(to_f32(dout[i]) * gelu_grad_f(to_f32(inp[i]), approx));
}

template <typename T>
__device__ void tanh_fwd_impl(T* out, const T* inp, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(tanhf(to_f32(inp[i])));
}

template <typename T>
__device__ void tanh_bwd_impl(T* dinp, const T* dout, const T* out, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const float y = to_f32(out[i]);
        dinp[i] = from_f32<T>(to_f32(dout[i]) * (1.f - y * y));
    }
}

template <typename T>
__device__ void dropout_impl(T* out, const T* inp, long n, DropoutArgs d) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = from_f32<T>(to_f32(inp[i]) * dropout_factor(d, (unsigned long long)i));
}

#define ELEMENTWISE(T, N)                                                                                    \
    BERTCUDA_KERNEL(add_fwd_##N, T* out, const T* a, const T* b, long n) { add_impl(out, a, b, n); } \
    BERTCUDA_KERNEL(bias_add_fwd_##N, T* out, const T* bias, long rows, int cols) {                \
        bias_add_impl(out, bias, rows, cols);                                                              \
    }                                                                                                      \
    BERTCUDA_KERNEL(bias_grad_partial_bwd_##N, float* partial, const T* dout, long rows, int cols) { \
        bias_grad_partial_impl(partial, dout, rows, cols);                                                 \
    }                                                                                                      \
    BERTCUDA_KERNEL(scale_fwd_##N, T* x, long n, float factor) { scale_impl(x, factor, n); }      \
    BERTCUDA_KERNEL(fill_fwd_##N, T* x, long n, float value) { fill_impl(x, value, n); }          \
    BERTCUDA_KERNEL(gelu_fwd_##N, T* out, const T* inp, long n, int approx) {                    \
        gelu_fwd_impl(out, inp, n, approx);                                                                \
    }                                                                                                      \
    BERTCUDA_KERNEL(gelu_bwd_##N, T* dinp, const T* dout, const T* inp, long n, int approx) {    \
        gelu_bwd_impl(dinp, dout, inp, n, approx);                                                         \
    }                                                                                                      \
    BERTCUDA_KERNEL(tanh_fwd_##N, T* out, const T* inp, long n) { tanh_fwd_impl(out, inp, n); }  \
    BERTCUDA_KERNEL(tanh_bwd_##N, T* dinp, const T* dout, const T* out, long n) {                \
        tanh_bwd_impl(dinp, dout, out, n);                                                                 \
    }                                                                                                      \
    BERTCUDA_KERNEL(dropout_fwd_##N, T* out, const T* inp, long n, DropoutArgs d) {              \
        dropout_impl(out, inp, n, d);                                                                      \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(ELEMENTWISE)

// The low-precision copy of the parameters the matrix products read: out[i] = bf16(in[i]).
BERTCUDA_KERNEL(cast_fwd_bf16, __nv_bfloat16* out, const float* in, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(in[i]);
}

BERTCUDA_KERNEL(sum_partials_bwd_f32, float* acc, const float* partial, int chunks, int cols, int stride) {
    sum_partials_impl(acc, partial, chunks, cols, stride);
}
