// LayerNorm over the last dimension, statistics in fp32; shapes (rows, c) row-major, one warp per row
// (WARP_ROWS rows per block of THREADS threads, launch.cuh).
//   layernorm_fwd:          out[r] = (inp[r] − mean_r) · rstd_r · w + b; mean, rstd (rows) saved    (=)
//   layernorm_bwd:          dinp[r] = rstd_r · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)), dx̂ = dout · w    (=)
//   layernorm_param_partial_bwd: per block of PARTIAL_ROWS rows, partial[k, c] = Σ dout · x̂,
//     partial[k, C + c] = Σ dout; then tensor.cu's sum_partials_f32 adds the partials into dw, db in
//     block order                                                                                  (+=)
//   residual_layernorm_fwd: sum = residual + dropout(branch); out = LayerNorm(sum); mean, rstd saved (=)
//   residual_layernorm_bwd: dsum = LayerNorm'(grad) (the residual's gradient);
//                           grad = dropout'(dsum) in place (the branch's gradient)                  (=)
// The fused kernels make one pass over the rows where the unfused ops would make two or three;
// statistics are computed from the values as stored (rounded to T), as the backward reads them.
// Rows in registers (common.cuh: layernorm_regs) where the width allows; odd widths stride element-wise.
#include "common.cuh"

template <typename T>
__device__ void layernorm_fwd_impl(T* out, float* mean, float* rstd, const T* inp, const T* w, const T* b, int rows,
                                   int c, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* x = inp + (long)row * c;
    constexpr int V = 16 / sizeof(T);
    if (in_registers<T>(c) && aligned16(inp) && aligned16(out) && aligned16(w) && aligned16(b)) {
        float v[row_vectors<T>][V];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < row_vectors<T>; k++) {
            const int j = (lane + 32 * k) * V;
            if (j >= c) continue;
            load16<T>(v[k], x + j);
#pragma unroll
            for (int e = 0; e < V; e++) s += v[k][e];
        }
        layernorm_regs<T, V>(out + (long)row * c, mean, rstd, v, w, b, row, c, eps, s);
        return;
    }
    float s = 0.f;
    for (int j = lane; j < c; j += 32) s += to_f32(x[j]);
    layernorm_row(out + (long)row * c, mean, rstd, x, w, b, row, c, eps, s);
}

// The LayerNorm backward of a row in registers: d = LN'(g) into dst; with `branch`, also branch =
// dropout'(d) (element indices from `base`), written over g when they are the same row.
template <typename T>
__device__ __forceinline__ void layernorm_bwd_regs(T* dst, const T* g, const T* x, float mu, float rs, const T* w,
                                                   int c, T* branch, DropoutArgs d, long base) {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    float xh[row_vectors<T>][V], dxh[row_vectors<T>][V];
    float a = 0.f, bsum = 0.f;
#pragma unroll
    for (int k = 0; k < row_vectors<T>; k++) {
        const int j = (lane + 32 * k) * V;
        if (j >= c) continue;
        float wv[V], gv[V];
        load16<T>(xh[k], x + j);
        load16<T>(gv, g + j);
        load16<T>(wv, w + j);
#pragma unroll
        for (int e = 0; e < V; e++) {
            xh[k][e] = (xh[k][e] - mu) * rs;
            dxh[k][e] = gv[e] * wv[e];
            a += dxh[k][e];
            bsum += dxh[k][e] * xh[k][e];
        }
    }
    const float mean_dxhat = warp_sum(a) / c, mean_dxhat_xhat = warp_sum(bsum) / c;
#pragma unroll
    for (int k = 0; k < row_vectors<T>; k++) {
        const int j = (lane + 32 * k) * V;
        if (j >= c) continue;
        float o[V];
#pragma unroll
        for (int e = 0; e < V; e++) o[e] = rs * (dxh[k][e] - mean_dxhat - xh[k][e] * mean_dxhat_xhat);
        store16<T>(dst + j, o);
        if (branch) {
            float f[V];
#pragma unroll
            for (int e = 0; e < V; e += 4) dropout_factors4(d, (unsigned long long)(base + j + e), &f[e]);
#pragma unroll
            for (int e = 0; e < V; e++) o[e] = to_f32(from_f32<T>(o[e])) * f[e];
            store16<T>(branch + j, o);
        }
    }
}

template <typename T>
__device__ void layernorm_bwd_impl(T* dinp, const T* dout, const T* inp, const float* mean, const float* rstd,
                                   const T* w, int rows, int c) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *x = inp + (long)row * c, *g = dout + (long)row * c;
    const float mu = mean[row], rs = rstd[row];
    if (in_registers<T>(c) && aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(w)) {
        layernorm_bwd_regs<T>(dinp + (long)row * c, g, x, mu, rs, w, c, nullptr, DropoutArgs{}, 0);
        return;
    }
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

template <typename T>
__device__ void residual_layernorm_impl(T* sum, T* out, float* mean, float* rstd, const T* residual, const T* branch,
                                        const T* w, const T* b, int rows, int c, float eps, DropoutArgs d) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long base = (long)row * c;
    constexpr int V = 16 / sizeof(T);
    if (in_registers<T>(c) && aligned16(sum) && aligned16(out) && aligned16(residual) && aligned16(branch) &&
        aligned16(w) && aligned16(b)) {
        float v[row_vectors<T>][V];
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < row_vectors<T>; k++) {
            const int j = (lane + 32 * k) * V;
            if (j >= c) continue;
            float rv[V], bv[V];
            load16<T>(rv, residual + base + j);
            load16<T>(bv, branch + base + j);
            float f[V];  // the dropout factors, four per Philox call (base + j is a multiple of V)
#pragma unroll
            for (int e = 0; e < V; e += 4) dropout_factors4(d, (unsigned long long)(base + j + e), &f[e]);
#pragma unroll
            for (int e = 0; e < V; e++) {
                // As the element-wise path: the dropped branch rounded to T, then the sum rounded to T.
                const float dropped = to_f32(from_f32<T>(bv[e] * f[e]));
                v[k][e] = to_f32(from_f32<T>(rv[e] + dropped));
                s += v[k][e];
            }
            store16<T>(sum + base + j, v[k]);
        }
        layernorm_regs<T, V>(out + base, mean, rstd, v, w, b, row, c, eps, s);
        return;
    }
    float s = 0.f;
    for (int j = lane; j < c; j += 32) {
        const long e = base + j;
        // As dropout_fwd then add: the dropped branch is rounded to T before the residual is added.
        const float dropped = to_f32(from_f32<T>(to_f32(branch[e]) * dropout_factor(d, (unsigned long long)e)));
        const T v = from_f32<T>(to_f32(residual[e]) + dropped);
        sum[e] = v;
        s += to_f32(v);
    }
    __syncwarp();
    layernorm_row(out + base, mean, rstd, sum + base, w, b, row, c, eps, s);
}

// Backward of out = LayerNorm(sum), sum = residual + dropout(branch), one warp per row:
//   dsum = LN'(g) (=, the residual's gradient); g is then overwritten with dropout'(dsum), the branch's
//   gradient. The LayerNorm weight gradients are reduced separately (layernorm_param_partial_bwd), before.
template <typename T>
__device__ void residual_layernorm_bwd_impl(T* dsum, T* g, const T* sum, const float* mean, const float* rstd,
                                            const T* w, int rows, int c, DropoutArgs d) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long base = (long)row * c;
    const float mu = mean[row], rs = rstd[row];
    if (in_registers<T>(c) && aligned16(dsum) && aligned16(g) && aligned16(sum) && aligned16(w)) {
        // Each lane reads its vectors of g before writing them: in place is safe.
        layernorm_bwd_regs<T>(dsum + base, g + base, sum + base, mu, rs, w, c, g + base, d, base);
        return;
    }
    float a = 0.f, bsum = 0.f;
    for (int j = lane; j < c; j += 32) {
        const float xhat = (to_f32(sum[base + j]) - mu) * rs, dxhat = to_f32(g[base + j]) * to_f32(w[j]);
        a += dxhat;
        bsum += dxhat * xhat;
    }
    const float mean_dxhat = warp_sum(a) / c, mean_dxhat_xhat = warp_sum(bsum) / c;
    // Every lane reads its own elements of g before writing them: in place is safe.
    for (int j = lane; j < c; j += 32) {
        const long e = base + j;
        const float xhat = (to_f32(sum[e]) - mu) * rs;
        const T ds = from_f32<T>(rs * (to_f32(g[e]) * to_f32(w[j]) - mean_dxhat - xhat * mean_dxhat_xhat));
        dsum[e] = ds;
        g[e] = from_f32<T>(to_f32(ds) * dropout_factor(d, (unsigned long long)e));
    }
}

#define FUSED_NORM(T, N)                                                                                           \
    BERTCUDA_KERNEL(residual_layernorm_fwd_##N, T* sum, T* out, float* mean, float* rstd,                          \
                                                          const T* residual, const T* branch, const T* w,          \
                                                          const T* b, int rows, int c, float eps, DropoutArgs d) { \
        residual_layernorm_impl(sum, out, mean, rstd, residual, branch, w, b, rows, c, eps, d);                    \
    }                                                                                                              \
    BERTCUDA_KERNEL(residual_layernorm_bwd_##N, T* dsum, T* g, const T* sum, const float* mean,                    \
                                                          const float* rstd, const T* w, int rows, int c,          \
                                                          DropoutArgs d) {                                         \
        residual_layernorm_bwd_impl(dsum, g, sum, mean, rstd, w, rows, c, d);                                      \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(FUSED_NORM)
