// The optimizer over the one contiguous parameter buffer.
//   sum_squares_partial_: partial[k] = Σ x² over block k's fixed range (inf/NaN propagate)
//   sum_squares_final_f32: out[0] = Σ_k partial[k], k in order: the squared gradient norm and the
//                            finite check in one pass, deterministic.                                 (=)
//   scale_: x[i] *= factor (the gradients: unscaling, clipping)                               (in place)
//   adamw_f32: torch's AdamW on every element, fp32 master weights and moments:
//     p −= lr·wd·p where decay[i]; m = m + (1−β1)(g − m); v = β2·v + (1−β2)·g²;
//     p −= lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)                                                       (in place)
//   lamb_moments_f32 / lamb_norms_f32 / lamb_apply_f32: NVIDIA's FusedLAMB in three deterministic passes
//     over chunks of LAMB_CHUNK elements (launch.cuh; the chunk table from optim::Lamb):
//     1. per chunk: g' = g / divisor, m, v updated, u = (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε) + wd·p,
//        Σp² and Σu² of the chunk;
//     2. per tensor: its chunks' sums in order → ‖p‖², ‖u‖²;
//     3. per chunk: r = ‖p‖/‖u‖ (1 when either is 0, or outside the trusted tensors), p −= lr·r·u.   (in place)
#include "common.cuh"

template <typename T>
__device__ void scale_impl(T* x, float factor, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        x[i] = from_f32<T>(to_f32(x[i]) * factor);
}

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

BERTCUDA_KERNEL(sum_squares_final_f32, float* out, const float* partial, int k) {
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

BERTCUDA_KERNEL(adamw_f32, float* params, const float* grads, float* m, float* v, const int* decay,
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

// Computed on the host in f64 and rounded once, as the CPU backend does.
struct LambArgs {
    float beta1, one_minus_beta1, beta2, one_minus_beta2;
    float bias_correction1, bias_correction2;  // 1 − β1ᵗ, 1 − β2ᵗ
    float eps, weight_decay, grad_divisor, lr;
    int all_tensors;
};

__device__ __forceinline__ float lamb_update(float m, float v, float p, float wd, const LambArgs& a) {
    return (m / a.bias_correction1) / (sqrtf(v / a.bias_correction2) + a.eps) + wd * p;
}

// The chunk table: per chunk [start, len, tensor, decays], then per tensor [first chunk, chunks].
BERTCUDA_KERNEL(lamb_moments_f32, const float* params, const float* grads, float* m, float* v, const int* table,
                float* partials, LambArgs a) {
    __shared__ float sh[32];
    const int* c = table + 4 * blockIdx.x;
    const int start = c[0], len = c[1];
    const float wd = c[3] ? a.weight_decay : 0.f;
    float wsum = 0.f, usum = 0.f;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const int k = start + i;
        const float g = grads[k] / a.grad_divisor;
        const float mi = a.beta1 * m[k] + a.one_minus_beta1 * g;
        const float vi = a.beta2 * v[k] + a.one_minus_beta2 * g * g;
        m[k] = mi;
        v[k] = vi;
        const float p = params[k];
        const float u = lamb_update(mi, vi, p, wd, a);
        wsum += p * p;
        usum += u * u;
    }
    wsum = block_sum(wsum, sh);
    usum = block_sum(usum, sh);
    if (threadIdx.x == 0) {
        partials[2 * blockIdx.x] = wsum;
        partials[2 * blockIdx.x + 1] = usum;
    }
}

// One thread per tensor: its chunks' partial sums, in order.
BERTCUDA_KERNEL(lamb_norms_f32, const int* table, int chunks, int tensors, const float* partials, float* norms) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tensors) return;
    const int first = table[4 * chunks + 2 * t], count = table[4 * chunks + 2 * t + 1];
    float w = 0.f, u = 0.f;
    for (int k = first; k < first + count; k++) {
        w += partials[2 * k];
        u += partials[2 * k + 1];
    }
    norms[2 * t] = w;
    norms[2 * t + 1] = u;
}

BERTCUDA_KERNEL(lamb_apply_f32, float* params, const float* m, const float* v, const int* table, const float* norms,
                LambArgs a) {
    const int* c = table + 4 * blockIdx.x;
    const int start = c[0], len = c[1], t = c[2];
    const bool decays = c[3] != 0;
    const float wd = decays ? a.weight_decay : 0.f;
    const float wn = sqrtf(norms[2 * t]), un = sqrtf(norms[2 * t + 1]);
    const bool trusted = a.all_tensors || (decays && a.weight_decay != 0.f);
    const float ratio = (trusted && wn > 0.f && un > 0.f) ? wn / un : 1.f;
    const float step = a.lr * ratio;
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const int k = start + i;
        params[k] -= step * lamb_update(m[k], v[k], params[k], wd, a);
    }
}

#define SUM_SQUARES(T, N)                                                                                   \
    BERTCUDA_KERNEL(sum_squares_partial_##N, float* partial, const T* x, long n, long chunk) { \
        sum_squares_partial_impl(partial, x, n, chunk);                                                     \
    }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(SUM_SQUARES)

#define SCALE(T, N)                                                                                           \
    BERTCUDA_KERNEL(scale_##N, T* x, long n, float factor) { scale_impl(x, factor, n); }

BERTCUDA_INSTANTIATE_FLOAT_TYPES(SCALE)
