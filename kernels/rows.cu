// Row gathers for the heads, and their gradient.
//   gather_rows_fwd:  out[k] = inp[rows[k]]                        (=)
//   scatter_rows_bwd: dinp[rows[k]] += dout[k]; rows are distinct (checked on the host): one block per
//                     row k, no two blocks write one row.          (+=)
#include "common.cuh"

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

#define ROWS(T, N)                                                                                            \
    BERTCUDA_KERNEL(gather_rows_fwd_##N, T* out, const T* inp, const int* rows, int m, int c) {     \
        gather_impl(out, inp, rows, m, c);                                                                    \
    }                                                                                                         \
    BERTCUDA_KERNEL(scatter_rows_bwd_##N, T* dinp, const T* dout, const int* rows, int m, int c) {  \
        scatter_impl(dinp, dout, rows, m, c);                                                                 \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(ROWS)
