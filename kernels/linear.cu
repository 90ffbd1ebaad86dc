// The bias of a linear layer y = x·Wᵀ + b (the matrix products themselves are cuBLAS's).
//   add_bias_:          out[r, c] += bias[c]                        (+= on an activation being built)
//   bias_grad_partial_: dbias[c] += Σ_r dout[r, c], stage 1: per block of PARTIAL_ROWS rows, the column
//                       sums into partial[k, c]; stage 2 is tensor.cu's sum_partials_f32      (+=, parameter gradient)
// Shapes (rows, cols) row-major, rows ld elements apart (ld ≥ cols: the MLM logits' padded rows); the
// elements between a row's end and the next row are not touched.
#include "common.cuh"

template <typename T>
__device__ void bias_add_impl(T* out, const T* bias, long rows, int cols, int ld) {
    const long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const long r = i / cols;
        const int c = (int)(i - r * cols);
        T* x = out + r * ld + c;
        *x = from_f32<T>(to_f32(*x) + to_f32(bias[c]));
    }
}

// Stage 1: block (k, y) sums rows [k·PARTIAL_ROWS, (k+1)·PARTIAL_ROWS) of the columns [y·blockDim, (y+1)·blockDim) into
// partial[k, c], one column per thread.
template <typename T>
__device__ void bias_grad_partial_impl(float* __restrict__ partial, const T* __restrict__ dout, long rows, int cols,
                                       long ld) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long r0 = (long)blockIdx.x * PARTIAL_ROWS, r1 = min(rows, r0 + PARTIAL_ROWS);
    float s = 0.f;
#pragma unroll 4
    for (long r = r0; r < r1; r++) s += to_f32(dout[r * ld + c]);
    partial[(long)blockIdx.x * cols + c] = s;
}

#define LINEAR(T, N)                                                                                          \
    BERTCUDA_KERNEL(add_bias_##N, T* out, const T* bias, long rows, int cols, int ld) {                       \
        bias_add_impl(out, bias, rows, cols, ld);                                                             \
    }                                                                                                         \
    BERTCUDA_KERNEL(bias_grad_partial_##N, float* partial, const T* dout, long rows, int cols, long ld) {     \
        bias_grad_partial_impl(partial, dout, rows, cols, ld);                                                \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(LINEAR)
