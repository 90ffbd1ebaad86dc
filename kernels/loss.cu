// Softmax cross-entropy per row, fused with its gradient; used for the MLM head (rows = the predicted
// positions, classes = the vocabulary) and the NSP head (classes = 2).
// Rows of v classes, ld elements apart (ld ≥ v: the MLM logits' rows padded to a multiple of 64; the
// padding is neither read nor written).
//   cross_entropy_: losses[r] = logsumexp(logits[r]) − logits[r, label_r]; 0 where label_r = -100  (=)
//     with grad: logits[r] is overwritten by (softmax(logits[r]) − onehot(label_r)) · scale (0 on ignored rows),
//     scale times *scale_by when scale_by is not null (the loss scale on the device)
//   argmax_rows_:   out[r] = the index of the largest logit of row r (the first on ties)          (=)
// One block per row; the row in 16-byte vectors between its unaligned ends.
#include "common.cuh"

// One pass for the maximum and the sum together (online: the sum rescaled when the maximum grows), a
// second for the gradient; both in 16-byte vectors between the row's unaligned ends (common.cuh's row16).
template <typename T>
__device__ void cross_entropy_impl(float* losses, T* logits, const int* labels, int m, int v, long ld, int grad, float scale,
                                   const float* scale_by) {
    __shared__ float sh[32];
    constexpr int V = 16 / sizeof(T);
    const int r = blockIdx.x;
    if (r >= m) return;
    T* z = logits + r * ld;
    const int label = labels[r];
    if (label == -100) {
        if (threadIdx.x == 0) losses[r] = 0.f;
        if (grad) {
            float zero[V] = {};
            row16(z, v, [&](int j) { store16<T>(z + j, zero); }, [&](int j) { z[j] = from_f32<T>(0.f); });
        }
        return;
    }
    // From the lowest float, not -inf: a logit of -inf adds exp(-inf) = 0, a NaN makes the loss NaN.
    float mx = -3.402823466e38f, s = 0.f;
    auto add = [&](float x) {
        if (x > mx) {
            s = s * expf(mx - x) + 1.f;
            mx = x;
        } else {
            s += expf(x - mx);
        }
    };
    row16(
        z, v,
        [&](int j) {
            float x[V];
            load16<T>(x, z + j);
#pragma unroll
            for (int e = 0; e < V; e++) add(x[e]);
        },
        [&](int j) { add(to_f32(z[j])); });
    const float block_mx = block_max(mx, sh);
    s = block_sum(s * expf(mx - block_mx), sh);
    const float lse = block_mx + logf(s);
    const float target = to_f32(z[label]);
    __syncthreads();  // every thread has read z[label] before it is overwritten
    if (threadIdx.x == 0) losses[r] = lse - target;
    if (!grad) return;
    if (scale_by) scale *= *scale_by;  // a power of two (the loss scale): exact
    auto dz = [&](float x, int j) {
        const float p = expf(x - lse) * scale;
        return j == label ? p - scale : p;
    };
    row16(
        z, v,
        [&](int j) {
            float x[V];
            load16<T>(x, z + j);
#pragma unroll
            for (int e = 0; e < V; e++) x[e] = dz(x[e], j + e);
            store16<T>(z + j, x);
        },
        [&](int j) { z[j] = from_f32<T>(dz(to_f32(z[j]), j)); });
}

template <typename T>
__device__ void argmax_impl(int* out, const T* logits, int m, int v, long ld) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    constexpr int V = 16 / sizeof(T);
    const int r = blockIdx.x;
    if (r >= m) return;
    const T* z = logits + r * ld;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    auto see = [&](float x, int j) {
        if (x > bv) bv = x, bi = j;  // j grows: the first of equals stays
    };
    row16(
        z, v,
        [&](int j) {
            float x[V];
            load16<T>(x, z + j);
#pragma unroll
            for (int e = 0; e < V; e++) see(x[e], j + e);
        },
        [&](int j) { see(to_f32(z[j]), j); });
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) best_v[warp] = bv, best_i[warp] = bi;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++)
            if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) bv = best_v[w], bi = best_i[w];
        out[r] = bi == 0x7fffffff ? 0 : bi;
    }
}

#define CROSS_ENTROPY(T, N)                                                                                  \
    BERTCUDA_KERNEL(cross_entropy_##N, float* losses, T* logits, const int* labels, int m, int v, long ld,    \
                    int grad, float scale, const float* scale_by) {                                          \
        cross_entropy_impl(losses, logits, labels, m, v, ld, grad, scale, scale_by);                        \
    }                                                                                                        \
    BERTCUDA_KERNEL(argmax_rows_##N, int* out, const T* logits, int m, int v, long ld) {                     \
        argmax_impl(out, logits, m, v, ld);                                                                 \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(CROSS_ENTROPY)
