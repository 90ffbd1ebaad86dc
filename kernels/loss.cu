// Softmax cross-entropy per row, fused with its gradient; used for the MLM head (rows = the predicted
// positions, classes = the vocabulary) and the NSP head (classes = 2).
//   cross_entropy_: losses[r] = logsumexp(logits[r]) − logits[r, label_r]; 0 where label_r = -100  (=)
//     with grad: logits[r] is overwritten by (softmax(logits[r]) − onehot(label_r)) · scale (0 on ignored rows)
//   argmax_rows_:   out[r] = the index of the largest logit of row r (the first on ties)          (=)
// One block per row.
#include "common.cuh"

template <typename T>
__device__ void cross_entropy_impl(float* losses, T* logits, const int* labels, int m, int v, int grad, float scale) {
    __shared__ float sh[32];
    const int r = blockIdx.x;
    if (r >= m) return;
    T* z = logits + (long)r * v;
    const int label = labels[r];
    if (label == -100) {
        if (threadIdx.x == 0) losses[r] = 0.f;
        if (grad)
            for (int j = threadIdx.x; j < v; j += blockDim.x) z[j] = from_f32<T>(0.f);
        return;
    }
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, to_f32(z[j]));
    mx = block_max(mx, sh);
    float s = 0.f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(to_f32(z[j]) - mx);
    s = block_sum(s, sh);
    const float lse = mx + logf(s);
    const float target = to_f32(z[label]);
    __syncthreads();  // every thread has read z[label] before it is overwritten
    if (threadIdx.x == 0) losses[r] = lse - target;
    if (grad)
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            const float p = expf(to_f32(z[j]) - lse) * scale;
            z[j] = from_f32<T>(j == label ? p - scale : p);
        }
}

template <typename T>
__device__ void argmax_impl(int* out, const T* logits, int m, int v) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const int r = blockIdx.x;
    if (r >= m) return;
    const T* z = logits + (long)r * v;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float x = to_f32(z[j]);
        if (x > bv) bv = x, bi = j;  // j grows: the first of equals stays
    }
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
    BERTCUDA_KERNEL(cross_entropy_##N, float* losses, T* logits, const int* labels, int m,     \
                                                     int v, int grad, float scale) {                         \
        cross_entropy_impl(losses, logits, labels, m, v, grad, scale);                                      \
    }                                                                                                        \
    BERTCUDA_KERNEL(argmax_rows_##N, int* out, const T* logits, int m, int v) {                     \
        argmax_impl(out, logits, m, v);                                                                     \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(CROSS_ENTROPY)
