// The optimizer over the one contiguous parameter buffer.
//   sum_squares_partial_fwd: partial[k] = Σ x² over block k's fixed range (inf/NaN propagate)
//   sum_squares_final_fwd:   out[0] = Σ_k partial[k], k in order: the squared gradient norm and the
//                            finite check in one pass, deterministic.                                 (=)
//   adamw_fwd: torch's AdamW on every element, fp32 master weights and moments:
//     p −= lr·wd·p where decay[i]; m = m + (1−β1)(g − m); v = β2·v + (1−β2)·g²;
//     p −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)                                                       (in place)
#include "common.cuh"

template <typename T>
__device__ void sum_squares_partial_impl(float* partial, const T* x, long n, long chunk) {
    __shared__ float sh[32];
    const long start = (long)blockIdx.x * chunk, end = min(n, start + chunk);
    float s = 0.f;
    for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float v = to_f32(x[i]);
        s += v * v;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

BERTCUDA_KERNEL(sum_squares_final_fwd_f32, float* out, const float* partial, int k) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        float s = 0.f;
        for (int i = 0; i < k; i++) s += partial[i];
        out[0] = s;
    }
}

// Computed on the host in f64 and rounded once, as the CPU backend does.
struct AdamWArgs {
    float decay_factor;           // 1 − lr·wd
    float step_size;              // lr / (1 − β1ᵗ)
    float one_minus_beta1, beta2, one_minus_beta2;
    float bias_correction2_sqrt;  // √(1 − β2ᵗ)
    float eps;
};

BERTCUDA_KERNEL(adamw_fwd_f32, float* params, const float* grads, float* m, float* v, const int* decay,
                                         long n, AdamWArgs a) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float p = params[i];
        const float g = grads[i];
        if (decay[i]) p *= a.decay_factor;
        const float mi = m[i] + (g - m[i]) * a.one_minus_beta1;
        const float vi = v[i] * a.beta2 + g * g * a.one_minus_beta2;
        const float denom = sqrtf(vi) / a.bias_correction2_sqrt + a.eps;
        params[i] = p - a.step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}

#define SUM_SQUARES(T, N)                                                                                   \
    BERTCUDA_KERNEL(sum_squares_partial_fwd_##N, float* partial, const T* x, long n, long chunk) { \
        sum_squares_partial_impl(partial, x, n, chunk);                                                     \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(SUM_SQUARES)
