// Fused kernels: one pass over the rows where the unfused ops would make two or three.
//   residual_layernorm_fwd: sum = residual + dropout(branch); out = LayerNorm(sum); mean, rstd saved   (=)
//   bias_gelu_fwd:          pre += bias (per row, in place); out = gelu(pre)                            (=)
//   embeddings_layernorm_fwd: emb = word[ids] + position[r mod T] + token_type[types];
//                             out = LayerNorm(emb); mean, rstd saved                                   (=)
//   residual_layernorm_bwd: dsum = LayerNorm'(grad) (the residual's gradient);
//                           grad = dropout'(dsum) in place (the branch's gradient)                     (=)
//   gelu_bias_bwd:          dpre = dout · gelu'(pre) (=); stage 1 of dbias += Σ_r dpre (partials)
// Statistics and GELU are computed from the values as stored (rounded to T), so the backward passes,
// which read the stored tensors, see exactly what the forward used. One warp per row for the LayerNorms.
#include "common.cuh"

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

template <typename T>
__device__ void residual_layernorm_impl(T* sum, T* out, float* mean, float* rstd, const T* residual, const T* branch,
                                        const T* w, const T* b, int rows, int c, float eps, DropoutArgs d) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long base = (long)row * c;
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

template <typename T>
__device__ void bias_gelu_impl(T* pre, T* out, const T* bias, long rows, int cols, int approx) {
    const long n = rows * cols;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const T p = from_f32<T>(to_f32(pre[i]) + to_f32(bias[i % cols]));
        pre[i] = p;
        out[i] = from_f32<T>(gelu_f(to_f32(p), approx));
    }
}

template <typename T>
__device__ void embeddings_layernorm_impl(T* emb, T* out, float* mean, float* rstd, const int* ids, const int* types,
                                          const T* word, const T* position, const T* token_type, const T* w,
                                          const T* b, int rows, int seq, int h, float eps) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T *we = word + (long)ids[row] * h, *pe = position + (long)(row % seq) * h, *te = token_type + (long)types[row] * h;
    const long base = (long)row * h;
    float s = 0.f;
    for (int j = lane; j < h; j += 32) {
        const T v = from_f32<T>(to_f32(we[j]) + to_f32(pe[j]) + to_f32(te[j]));
        emb[base + j] = v;
        s += to_f32(v);
    }
    __syncwarp();
    layernorm_row(out + base, mean, rstd, emb + base, w, b, row, h, eps, s);
}

#define FUSED(T, N)                                                                                               \
    BERTCUDA_KERNEL(residual_layernorm_fwd_##N, T* sum, T* out, float* mean, float* rstd,               \
                                                          const T* residual, const T* branch, const T* w,         \
                                                          const T* b, int rows, int c, float eps, DropoutArgs d) { \
        residual_layernorm_impl(sum, out, mean, rstd, residual, branch, w, b, rows, c, eps, d);                  \
    }                                                                                                             \
    BERTCUDA_KERNEL(bias_gelu_fwd_##N, T* pre, T* out, const T* bias, long rows, int cols, int approx) { \
        bias_gelu_impl(pre, out, bias, rows, cols, approx);                                                       \
    }                                                                                                             \
    BERTCUDA_KERNEL(embeddings_layernorm_fwd_##N, T* emb, T* out, float* mean, float* rstd,             \
                                                            const int* ids, const int* types, const T* word,      \
                                                            const T* position, const T* token_type, const T* w,   \
                                                            const T* b, int rows, int seq, int h, float eps) {    \
        embeddings_layernorm_impl(emb, out, mean, rstd, ids, types, word, position, token_type, w, b, rows, seq, h, \
                                  eps);                                                                           \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(FUSED)

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

#define FUSED_BWD(T, N)                                                                                         \
    BERTCUDA_KERNEL(residual_layernorm_bwd_##N, T* dsum, T* g, const T* sum, const float* mean,     \
                                                          const float* rstd, const T* w, int rows, int c,       \
                                                          DropoutArgs d) {                                       \
        residual_layernorm_bwd_impl(dsum, g, sum, mean, rstd, w, rows, c, d);                                   \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(FUSED_BWD)

// Backward of out = gelu(pre), pre = x·Wᵀ + bias: block (k, y) handles rows [k·64, (k+1)·64) of the
// columns [y·blockDim, (y+1)·blockDim), one column per thread (coalesced across the warp); it writes dpre
// and the column sums of its rows to partial[k, c], summed in order by sum_partials (deterministic). The
// sums read dpre as stored, as the unfused bias_grad would.
template <typename T>
__device__ void gelu_bias_bwd_impl(T* __restrict__ dpre, float* __restrict__ partial, const T* __restrict__ dout,
                                   const T* __restrict__ pre, long rows, int cols, int approx) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const long r0 = (long)blockIdx.x * PARTIAL_ROWS, r1 = min(rows, r0 + PARTIAL_ROWS);
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

#define FUSED_GELU_BWD(T, N)                                                                                    \
    BERTCUDA_KERNEL(gelu_bias_bwd_##N, T* dpre, float* partial, const T* dout, const T* pre, long rows, \
                                                 int cols, int approx) {                                        \
        gelu_bias_bwd_impl(dpre, partial, dout, pre, rows, cols, approx);                                       \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(FUSED_GELU_BWD)
