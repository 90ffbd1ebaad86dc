// LayerNorm over the last dimension, statistics in fp32.
//   layernorm_fwd:          out[r] = (inp[r] − mean_r) · rstd_r · w + b; mean, rstd (rows) saved    (=)
//   layernorm_bwd:          dinp[r] = rstd_r · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)), dx̂ = dout · w    (=)
//   layernorm_param_partial_bwd: per block of 64 rows, partial[k, c] = Σ dout · x̂, partial[k, C + c] = Σ dout
//   then sum_partials_bwd_f32 adds the partials into dw, db in block order                             (+=)
// One warp per row; shapes (rows, c) row-major.
#include "common.cuh"

template <typename T>
__device__ void layernorm_fwd_impl(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b, int rows,
                                   int c, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* x = inp + (long)row * c;
    float s = 0.f;
    for (int j = lane; j < c; j += 32) s += to_f32(x[j]);
    const float mu = warp_sum(s) / c;
    float v = 0.f;
    for (int j = lane; j < c; j += 32) {
        const float d = to_f32(x[j]) - mu;
        v += d * d;
    }
    const float rs = rsqrtf(warp_sum(v) / c + eps);
    T* o = out + (long)row * c;
    for (int j = lane; j < c; j += 32) o[j] = from_f32<T>((to_f32(x[j]) - mu) * rs * to_f32(w[j]) + to_f32(b[j]));
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

template <typename T>
__device__ void layernorm_bwd_impl(T* dinp, const T* dout, const T* inp, const float* mean, const float* rstd,
                                   const T* w, int rows, int c) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *x = inp + (long)row * c, *g = dout + (long)row * c;
    const float mu = mean[row], rs = rstd[row];
    float a = 0.f, bsum = 0.f;
    for (int j = lane; j < c; j += 32) {
        const float xhat = (to_f32(x[j]) - mu) * rs, dxhat = to_f32(g[j]) * to_f32(w[j]);
        a += dxhat;
        bsum += dxhat * xhat;
    }
    const float mean_dxhat = warp_sum(a) / c, mean_dxhat_xhat = warp_sum(bsum) / c;
    T* d = dinp + (long)row * c;
    for (int j = lane; j < c; j += 32) {
        const float xhat = (to_f32(x[j]) - mu) * rs;
        d[j] = from_f32<T>(rs * (to_f32(g[j]) * to_f32(w[j]) - mean_dxhat - xhat * mean_dxhat_xhat));
    }
}

template <typename T>
__device__ void layernorm_param_partial_impl(float* partial, const T* dout, const T* inp, const float* mean,
                                             const float* rstd, int rows, int c) {
    const int r0 = blockIdx.x * PARTIAL_ROWS, r1 = min(rows, r0 + PARTIAL_ROWS);
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float dw = 0.f, db = 0.f;
        for (int r = r0; r < r1; r++) {
            const float g = to_f32(dout[(long)r * c + j]);
            dw += g * (to_f32(inp[(long)r * c + j]) - mean[r]) * rstd[r];
            db += g;
        }
        partial[(long)blockIdx.x * 2 * c + j] = dw;
        partial[(long)blockIdx.x * 2 * c + c + j] = db;
    }
}

#define LAYERNORM(T, N)                                                                                          \
    BERTCUDA_KERNEL(layernorm_fwd_##N, T* out, float* mean, float* rstd, const T* inp, const T* w,     \
                                                 const T* b, int rows, int c, float eps) {                      \
        layernorm_fwd_impl(out, mean, rstd, inp, w, b, rows, c, eps);                                          \
    }                                                                                                          \
    BERTCUDA_KERNEL(layernorm_bwd_##N, T* dinp, const T* dout, const T* inp, const float* mean,        \
                                                 const float* rstd, const T* w, int rows, int c) {              \
        layernorm_bwd_impl(dinp, dout, inp, mean, rstd, w, rows, c);                                           \
    }                                                                                                          \
    BERTCUDA_KERNEL(layernorm_param_partial_bwd_##N, float* partial, const T* dout, const T* inp,     \
                                                               const float* mean, const float* rstd, int rows, \
                                                               int c) {                                        \
        layernorm_param_partial_impl(partial, dout, inp, mean, rstd, rows, c);                                 \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(LAYERNORM)
